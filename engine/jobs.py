"""run.sh's scheduler: the runs of a job, as many at a time as there are cores, one progress bar,
and logs that never interleave.

    python -m engine.jobs add JOBFILE --name NAME --log LOG --run_dir DIR --units U
                          [--after NAME] [--warm_start PATH --warm_units U] [--resumed] -- COMMAND ...
    python -m engine.jobs run JOBFILE --cores C

`add` appends one run (a JSON line) to JOBFILE; `run` runs them all:

- Runs start in list order, one per core, each a serial one-thread process: every core is busy
  and none waits for another at the end of each round, as workers of one run would (a run's
  results are identical whatever its --workers, so this changes no number). A run started when
  no other run is waiting gets every free core as --workers (the last runs of a job).
- When no waiting run can start and a core is free, the running run with the most time left
  (at least --min_widen_seconds at its pace so far) is widened: it stops after the round in
  progress with its checkpoint (a file PAUSE_FILE in its run directory asks for that; it exits
  PAUSED_EXIT) and continues from it with the free cores added as --workers. Its numbers are
  those of one run with any --workers; its log says where it continued.
- A run with --after waits until that run has finished, then starts before the runs still
  waiting: the warm-started FedHUG, the longest run of the default job, waits for FedAvg.
  --warm_start PATH adds --load_path PATH when the file exists by then (FedAvg's checkpoint
  after round start_round-1), and the run counts --warm_units rounds; without the file it says
  so and computes every round.
- Each run writes stdout and stderr to its log. Stdout shows one log at a time, whole, in the
  order the runs started: the oldest unfinished run live, the others when their turn comes. So a
  tee'd run.sh log is the runs' logs one after the other, as when they ran one by one.
- The bar (stderr, only when it is a terminal) counts the rounds in every run's metrics.jsonl
  against the rounds the job computes, with the time elapsed and left (each run's rounds to go
  at its own seconds a round so far, over the cores).

Exit status: 0 all runs succeeded; 1 some failed (listed; the others ran to the end); 2 a run
refused its flags (nothing else starts, the running ones are stopped; an earlier log of that run
is put back); 130 interrupted (each run keeps its last checkpoint: run.sh again continues).
"""
import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time

from engine.progress import format_minutes, terminal_width

POLL_SECONDS = 0.2
STOP_SECONDS = 60           # how long stopped runs get to exit before they are killed
MIN_WIDEN_SECONDS = 60      # widen a run only when it has at least this long left (a restart costs seconds)
PAUSE_FILE = ".pause"       # engine/loop.py: found in its run directory after a round, the run
PAUSED_EXIT = 75            # checkpoints, removes it and exits with this status (EX_TEMPFAIL)


def default_sigint():
    """In a run's process before it starts: SIGINT back to its default, so Python turns it into
    KeyboardInterrupt (checkpoint kept, clean exit). A job started in the background of a
    script (`bash run.sh &`) inherits SIGINT ignored, and its runs would then ignore the SIGINT
    this scheduler stops them with, until killed."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Run:
    """One line of the job file and, once started, its process."""

    def __init__(self, spec):
        self.name, self.log, self.run_dir = spec["name"], spec["log"], spec["run_dir"]
        self.argv, self.units, self.after = spec["argv"], spec["units"], spec.get("after")
        self.warm_start, self.warm_units = spec.get("warm_start"), spec.get("warm_units")
        self.resumed = spec.get("resumed", False)
        self.process = self.status = None
        self.workers = 0
        self.printed = None         # bytes of the log already on stdout (None: not even its header)
        self.printed_whole = False
        self.final_records = None   # own_records once the run has ended (its file no longer changes)
        self.pausing = False        # asked to stop after its round, to continue with more workers
        self.continuing = False     # stopped so: its next start continues from its checkpoint

    def own_records(self):
        """The lines of metrics.jsonl this run computed (a warm start's copied ones are not its
        own); read until the run has ended, then remembered."""
        if self.final_records is not None:
            return self.final_records
        try:
            with open(os.path.join(self.run_dir, "metrics.jsonl")) as f:
                records = [line for line in f if line.strip() and '"warm_start_from"' not in line]
        except OSError:
            records = []
        if self.status is not None:
            self.final_records = records
        return records

    def rounds_done(self):
        """Rounds this run has computed."""
        return min(len(self.own_records()), self.units)

    def round_seconds(self):
        """The seconds of each round it computed, from metrics.jsonl."""
        seconds = []
        for line in self.own_records():
            try:
                seconds.append(float(json.loads(line)["seconds"]))
            except (ValueError, KeyError, TypeError):
                pass                      # a line being written
        return seconds

    def seconds_left(self, pace=None, seconds=None):
        """Its rounds still to compute times its mean seconds a round so far (before its first
        round: `pace`, or None); 0 once it has ended."""
        if self.status is not None:
            return 0.0
        seconds = self.round_seconds() if seconds is None else seconds
        pace = sum(seconds) / len(seconds) if seconds else pace
        return None if pace is None else max(0, self.units - len(seconds)) * pace

    def ask_to_pause(self):
        open(os.path.join(self.run_dir, PAUSE_FILE), "w").close()
        self.pausing = True

    def clear_pause(self):
        """No request left behind for a later start of this run (it ended, or was stopped first)."""
        self.pausing = False
        try:
            os.remove(os.path.join(self.run_dir, PAUSE_FILE))
        except OSError:
            pass

    def header(self):
        notes = [f"{self.workers} worker{'s' if self.workers > 1 else ''}"]
        if self.resumed:
            notes.append(f"continuing {self.run_dir}")
        if "--load_path" in self.argv:
            notes.append(f"warm start from {self.argv[self.argv.index('--load_path') + 1]}")
        return f"run.sh: === {self.name} ({', '.join(notes)}) ===\n"


class Bar:
    """The job's progress bar on a terminal (nothing otherwise): rounds of all runs."""

    def __init__(self, runs, stream, cores=1):
        self.runs, self.stream, self.cores = runs, stream, cores
        self.enabled = stream.isatty()
        self.started = time.time()
        self.shown = False

    def seconds_left(self):
        """Every unfinished run's time left at its own seconds a round (one not started yet: at
        the mean round of all runs so far), spread over the cores, and at least the longest of
        them; None before any round. Rounds differ: a FedHUG round costs ~3.5 of FedAvg's."""
        seconds = {run: run.round_seconds() for run in self.runs}
        every_round = [s for run_seconds in seconds.values() for s in run_seconds]
        if not every_round:
            return None
        pace = sum(every_round) / len(every_round)
        left = [run.seconds_left(pace, seconds[run]) for run in self.runs]
        return max(sum(left) / self.cores, max(left))

    def draw(self):
        if not self.enabled:
            return
        total = sum(run.units for run in self.runs)
        done = sum(run.rounds_done() for run in self.runs)
        elapsed = time.time() - self.started
        seconds_left = self.seconds_left()
        left = f", ~{format_minutes(seconds_left)} left" if seconds_left is not None else ""
        finished = sum(run.status is not None for run in self.runs)
        running = ", ".join(run.name for run in self.runs if run.process and run.status is None)
        width = terminal_width(self.stream)
        filled = int(20 * done / total) if total else 20
        text = (f"run.sh [{finished}/{len(self.runs)} runs] {done}/{total} rounds |{'#' * filled}{'.' * (20 - filled)}| "
                f"{format_minutes(elapsed)} elapsed{left}; running {running or '-'}")
        self.stream.write("\r" + text[:width - 1].ljust(width - 1))
        self.stream.flush()
        self.shown = True

    def clear(self):
        if self.enabled and self.shown:
            self.stream.write("\r" + " " * (terminal_width(self.stream) - 1) + "\r")
            self.stream.flush()
            self.shown = False


class Job:
    def __init__(self, runs, cores, out=sys.stdout, err=sys.stderr, min_widen_seconds=MIN_WIDEN_SECONDS):
        self.runs, self.cores, self.out, self.err = runs, max(1, cores), out, err
        self.min_widen_seconds = min_widen_seconds
        self.bar = Bar(runs, err, self.cores)
        self.by_name = {run.name: run for run in runs}
        self.start_order = []
        for run in runs:
            if run.after and run.after not in self.by_name:
                run.after = None       # the run it would wait for is not in this job

    # ------------------------------------------------------------------------ starting runs
    def waiting(self):
        return [run for run in self.runs if run.process is None and run.status is None]

    def ready(self):
        """Waiting runs whose --after run has finished; those that waited for one first."""
        ready = [run for run in self.waiting()
                 if run.after is None or self.by_name[run.after].status is not None]
        return sorted(ready, key=lambda run: run.after is None)

    def start(self, run, free_cores):
        others_waiting = len(self.waiting()) > 1
        run.workers = free_cores if run.continuing or not others_waiting else 1
        if run.continuing:              # it paused (widen): the same run from its checkpoint
            if "--resume" not in run.argv:
                run.argv += ["--resume", run.run_dir]
            if "--no_replay" not in run.argv:
                run.argv.append("--no_replay")     # its log holds the lines so far
            log = open(run.log, "ab")
            log.write(f"run.sh: === {run.name} continues from its checkpoint with {run.workers} "
                      f"worker{'s' if run.workers > 1 else ''} ===\n".encode())
            log.flush()
        else:
            if run.warm_start:
                if os.path.exists(run.warm_start):
                    run.argv += ["--load_path", run.warm_start]
                    run.units = run.warm_units
                else:
                    self.err.write(f"run.sh: note: {run.warm_start} does not exist; {run.name} computes every "
                                   "round itself\n")
            run.clear_pause()                # one left behind by a job that was killed
            if os.path.exists(run.log):
                shutil.copyfile(run.log, run.log + ".previous")
            log = open(run.log, "wb")
            self.start_order.append(run)
        with log:
            run.process = subprocess.Popen(run.argv + ["--workers", str(run.workers)], stdout=log,
                                           stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                           preexec_fn=default_sigint)

    def start_what_fits(self):
        busy = sum(run.workers for run in self.runs if run.process and run.status is None)
        for run in self.ready():
            if busy >= self.cores:
                break
            self.start(run, self.cores - busy)
            busy += run.workers

    def widen(self):
        """No waiting run ready to start and a core free: ask the running run with the most time
        left (at least min_widen_seconds) to pause after its round; poll() then starts it again
        with the free cores."""
        running = [run for run in self.runs if run.process and run.status is None]
        if self.ready() or any(run.pausing for run in running) or sum(run.workers for run in running) >= self.cores:
            return
        left = [(run.seconds_left(), run) for run in running]
        left = [(seconds, run) for seconds, run in left if seconds is not None and seconds >= self.min_widen_seconds]
        if left:
            max(left, key=lambda pair: pair[0])[1].ask_to_pause()

    # ------------------------------------------------------------------------ output
    def say(self, line):
        self.bar.clear()
        self.out.write(line + "\n")
        self.out.flush()

    def write_bytes(self, data):
        """A log's bytes as they are (a chunk may end inside a UTF-8 character)."""
        self.out.flush()
        if hasattr(self.out, "buffer"):
            self.out.buffer.write(data)
            self.out.buffer.flush()
        else:
            self.out.write(data.decode(errors="replace"))

    def print_logs(self):
        """Put on stdout what the oldest run not yet printed whole has written since; go on to the
        next run once it has finished and all of its log is out."""
        for run in self.start_order:
            if run.printed_whole:
                continue
            if run.printed is None:
                self.say(run.header().rstrip("\n"))
                run.printed = 0
            with open(run.log, "rb") as log:
                log.seek(run.printed)
                chunk = log.read()
            if chunk:
                self.bar.clear()
                self.write_bytes(chunk)
                run.printed += len(chunk)
            if run.status is None:
                return                           # still running: the runs after it wait their turn
            run.printed_whole = True

    # ------------------------------------------------------------------------ the loop
    def poll(self):
        for run in self.runs:
            if run.process and run.status is None:
                code = run.process.poll()
                if code == PAUSED_EXIT:          # checkpointed after a round: waits to start again
                    run.process, run.continuing, run.pausing = None, True, False
                elif code is not None:
                    run.status = code
                    run.clear_pause()
                    if code != 2 and os.path.exists(run.log + ".previous"):
                        os.remove(run.log + ".previous")

    def stop_running(self, signalled=False):
        """Stop every running run: each keeps its last checkpoint. `signalled`: they had the
        terminal's SIGINT already (Ctrl-C), so they get time to exit before a SIGINT of ours; a
        run still there after STOP_SECONDS is killed."""
        deadline = time.time() + STOP_SECONDS
        for run in self.runs:
            if run.process and run.status is None:
                if not signalled:
                    try:
                        run.process.send_signal(signal.SIGINT)
                    except OSError:
                        pass
                try:
                    run.status = run.process.wait(timeout=max(0.1, deadline - time.time()))
                except subprocess.TimeoutExpired:
                    run.process.kill()
                    run.status = run.process.wait()
                run.clear_pause()
        for run in self.runs:
            if run.continuing and run.process is None and run.status is None:
                run.status = PAUSED_EXIT         # paused, not started again: its checkpoint is kept

    def run(self):
        try:
            while True:
                self.poll()
                refused = [run for run in self.runs if run.status == 2]
                if refused:
                    return self.refuse(refused[0])
                self.start_what_fits()
                self.widen()
                self.print_logs()
                if all(run.status is not None for run in self.runs):
                    break
                self.bar.draw()
                time.sleep(POLL_SECONDS)
        except KeyboardInterrupt:
            self.stop_running(signalled=True)
            self.print_logs()        # stop_running has every status
            return 130
        self.bar.clear()
        failed = [run for run in self.runs if run.status != 0]
        for run in failed:
            self.err.write(f"run.sh: failed: {run.name} (exit {run.status}, see {run.log})\n")
        return 1 if failed else 0

    def refuse(self, run):
        self.stop_running()
        self.print_logs()        # stop_running has every status
        if os.path.exists(run.log + ".previous"):
            os.replace(run.log + ".previous", run.log)      # nothing ran: keep the earlier log
        if run.resumed:
            self.err.write(f"run.sh: {run.run_dir} holds a run made with other flags (above); "
                           "use another --logroot or --fresh\n")
        else:
            self.err.write(f"run.sh: {run.name} refused its flags (above)\n")
        return 2


# ---------------------------------------------------------------------------- command line

def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m engine.jobs", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    add = commands.add_parser("add", help="append a run to the job file")
    add.add_argument("job_file")
    add.add_argument("--name", required=True)
    add.add_argument("--log", required=True)
    add.add_argument("--run_dir", required=True)
    add.add_argument("--units", type=int, required=True, help="rounds the run computes")
    add.add_argument("--after", help="the name of a run to wait for")
    add.add_argument("--warm_start", help="a checkpoint to continue from when it exists when the run starts")
    add.add_argument("--warm_units", type=int, help="rounds the run computes when warm-started")
    add.add_argument("--resumed", action="store_true", help="the run continues a checkpoint of its own")
    run = commands.add_parser("run", help="run every run of the job file")
    run.add_argument("job_file")
    run.add_argument("--cores", type=int, default=os.cpu_count() or 1)
    run.add_argument("--min_widen_seconds", type=float, default=MIN_WIDEN_SECONDS,
                     help="widen the last running run only when it has at least this many seconds left")
    argv = sys.argv[1:] if argv is None else list(argv)
    command = argv[argv.index("--") + 1:] if "--" in argv else []       # add's run command line
    args = parser.parse_args(argv[:argv.index("--")] if "--" in argv else argv)

    if args.command == "add":
        if not command:
            parser.error("add needs the run's command line after --")
        spec = {"name": args.name, "log": args.log, "run_dir": args.run_dir, "units": args.units,
                "after": args.after, "warm_start": args.warm_start, "warm_units": args.warm_units,
                "resumed": args.resumed, "argv": command}
        with open(args.job_file, "a") as f:
            f.write(json.dumps(spec) + "\n")
        return 0
    with open(args.job_file) as f:
        runs = [Run(json.loads(line)) for line in f if line.strip()]
    return Job(runs, args.cores, min_widen_seconds=args.min_widen_seconds).run()


if __name__ == "__main__":
    sys.exit(main())
