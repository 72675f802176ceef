"""Launch a grid of independent runs: algorithms x seeds x betas x datasets.

    python sweep.py --algorithms fedavg fedprox --seeds 0 1 2 --betas 0.1 0.5 --out log/sweep \\
        -- --comm_round 20 --num_local_iterations 50

Flags after `--` go to every run. Each run's stdout is tee'd to
    <out>/<dataset>_<partition>_beta<beta>/<algorithm>_seed<s>.log     (what tables.py reads)
and its run directory is <out>/<setting>/runs/<algorithm>_seed<s>/ (checkpoint, metrics, and
the run's stderr in stderr.txt). Runs go to `--jobs` local processes of one torch thread each,
or with `--backend ray` to Ray tasks of one CPU each (`--ray_address` for a cluster: `--out`
must then lie on a filesystem every node shares; the logs are written by this process).

Sweeps can be restarted: a run whose log ends at its last round is skipped, a run with a
checkpoint is resumed (so raising --comm_round extends the runs). `--dry_run` prints the
command lines and runs nothing.
"""
import argparse
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from engine.parallel import start_ray
from engine import registry
from utils import DATASETS, SCENARIOS, UsageError

HERE = os.path.dirname(os.path.abspath(__file__))

# flags the sweep sets for every run, so they cannot come after --
GRID_FLAGS = {"dataset": "--datasets", "partition": "--partition", "beta": "--betas",
              "init_seed": "--seeds", "logdir": "--out", "log_file_name": "(the sweep names runs)",
              "resume": "(the sweep resumes runs itself)"}
FINAL_LINE = re.compile(r">> Final Acc: .*\(round (\d+)\)")
ROUND_LINE = re.compile(r">> Round (\d+) \| Current Acc: ([0-9.]+)")


@dataclass
class SweepRun:
    setting: str          # <dataset>_<partition>_beta<beta>
    name: str             # <algorithm>_seed<s>
    command: list         # starts with "python": the interpreter of whoever executes it
    log_path: str
    run_dir: str


def parse_sweep_args(argv):
    if "--" in argv:
        split = argv.index("--")
        argv, extra = argv[:split], argv[split + 1:]
    else:
        extra = []
    p = argparse.ArgumentParser(description="Run a grid of federated runs (flags after -- go to every run).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--algorithms", nargs="+", required=True, choices=list(registry.ALGORITHMS),
                   help="names of the registry (python main.py --list)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--betas", nargs="+", type=float, default=[0.5])
    p.add_argument("--datasets", nargs="+", default=["fashionmnist"], choices=list(DATASETS))
    p.add_argument("--partition", default="noniid")
    p.add_argument("--out", default="log/sweep", help="root of the logs and run directories")
    p.add_argument("--jobs", type=int, default=2,
                   help="runs at a time (local processes, or the CPUs of a local Ray)")
    p.add_argument("--backend", default="local", choices=["local", "ray"])
    p.add_argument("--ray_address", default=None, help="Ray cluster address (default: start a local Ray)")
    p.add_argument("--dry_run", action="store_true", help="print the command lines, run nothing")
    args = p.parse_args(argv)
    if args.jobs < 1:
        raise UsageError(f"--jobs must be at least 1 (got {args.jobs})")
    return args, extra


def check_extra_flags(extra, algorithms):
    """The flags after --: flags of every algorithm of the sweep, and none that the grid sets.
    Returns the parsed run flags (for --comm_round)."""
    from engine.loop import algorithm_parser
    unset = object()
    for name in algorithms:
        entry = registry.get(name)
        parser = algorithm_parser(entry.load(), entry.presets)
        parser.set_defaults(**{dest: unset for dest in GRID_FLAGS})
        flags, unknown = parser.parse_known_args(extra)
        if unknown:
            raise UsageError(f"run flags after -- that {name} does not have: {' '.join(unknown)} "
                             f"(see python main.py --algorithm {name} --help)")
        for dest, instead in GRID_FLAGS.items():
            if getattr(flags, dest) is not unset:
                raise UsageError(f"--{dest} after -- is set by the sweep; use sweep.py {instead}")
    given = {word.split("=")[0][2:] for word in extra if word.startswith("--")}
    for dest, value in SCENARIOS.get(flags.scenario, {}).items():      # --scenario's settings, unless given
        if dest not in given and dest not in GRID_FLAGS:
            setattr(flags, dest, value)
    return flags


def plan(args, extra):
    """Every run of the grid, in the order dataset, beta, algorithm, seed."""
    out = os.path.abspath(args.out)
    runs = []
    for dataset in args.datasets:
        for beta in args.betas:
            setting = f"{dataset}_{args.partition}_beta{beta}"
            for algorithm in args.algorithms:
                script, *algorithm_flags = registry.get(algorithm).command()
                if not os.path.isfile(os.path.join(HERE, script)):
                    raise UsageError(f"--algorithms {algorithm}: {script} does not exist in {HERE}")
                for seed in args.seeds:
                    name = f"{algorithm}_seed{seed}"
                    runs_dir = os.path.join(out, setting, "runs")
                    command = ["python", "-u", script, *algorithm_flags, "--dataset", dataset,
                               "--partition", args.partition, "--beta", str(beta), "--init_seed", str(seed),
                               "--logdir", runs_dir, "--log_file_name", name, "--threads", "1", *extra]
                    runs.append(SweepRun(setting, name, command, os.path.join(out, setting, name + ".log"),
                                         os.path.join(runs_dir, name)))
    return runs


def prepare(run, last_round):
    """'skip' when the run's log ends at `last_round`; else make the run's folders and return
    'resume' (a checkpoint exists: continue it) or 'start' (a leftover without checkpoint is removed)."""
    if os.path.isfile(run.log_path):
        with open(run.log_path) as f:
            finals = FINAL_LINE.findall(f.read())
        if finals and int(finals[-1]) == last_round:
            return "skip"
    if os.path.isfile(os.path.join(run.run_dir, "checkpoint.pt")):
        run.command += ["--resume", run.run_dir]
        return "resume"
    if os.path.isdir(run.run_dir):
        shutil.rmtree(run.run_dir)
    os.makedirs(run.run_dir)
    return "start"


def default_sigint():
    """In the run's process: Ctrl-C stops it at its last checkpoint, even where the parent
    ignores or blocks SIGINT (a Ray worker does both)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def execute(command, cwd, log_path=None):
    """Run one command with one torch thread. With `log_path`, stdout is tee'd there as it
    comes, else it is returned: (exit status, stdout or None, stderr). Interrupted (Ctrl-C, or
    a cancelled Ray task: raised between two lines), it interrupts the run, which stops at its
    last checkpoint."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    command = [sys.executable] + command[1:]
    with subprocess.Popen(command, cwd=cwd, env=env, text=True, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, preexec_fn=default_sigint) as process:
        stderr_lines, stdout_lines = [], []
        reader = threading.Thread(target=lambda: stderr_lines.extend(process.stderr))
        reader.start()
        log = open(log_path, "w") if log_path else None
        try:
            for line in process.stdout:
                if log:
                    log.write(line)
                    log.flush()
                else:
                    stdout_lines.append(line)
            process.wait()
        except BaseException:
            process.send_signal(signal.SIGINT)
            process.wait()
            raise
        finally:
            if log:
                log.close()
        reader.join()
    return process.returncode, None if log_path else "".join(stdout_lines), "".join(stderr_lines)


def finish(run, status, stdout, stderr, started, results, lock):
    """Write what the run left (stdout when it came back whole, stderr), print one line."""
    if stdout is not None:
        with open(run.log_path, "w") as f:
            f.write(stdout)
    with open(os.path.join(run.run_dir, "stderr.txt"), "w") as f:
        f.write(stderr)
    with open(run.log_path) as f:
        rounds = ROUND_LINE.findall(f.read())
    with lock:
        results[run.log_path] = status
        if status == 0:
            accuracy = f"round {rounds[-1][0]} acc {float(rounds[-1][1]):.4f}" if rounds else "no rounds"
            print(f"done    {run.setting}/{run.name}: {accuracy} ({time.time() - started:.0f} s)", flush=True)
        else:
            last = [line for line in stderr.splitlines() if line.strip()][-1:] or ["(no stderr)"]
            print(f"FAILED  {run.setting}/{run.name} (exit {status}): {last[0]}", flush=True)


def run_local(runs, jobs):
    results, lock = {}, threading.Lock()

    def one(run):
        started = time.time()
        status, stdout, stderr = execute(run.command, HERE, run.log_path)
        finish(run, status, stdout, stderr, started, results, lock)

    pool = ThreadPoolExecutor(max_workers=jobs)
    try:
        for future in [pool.submit(one, run) for run in runs]:
            future.result()
    except KeyboardInterrupt:      # the running runs got the same Ctrl-C: no new one starts
        pool.shutdown(cancel_futures=True)
        raise
    pool.shutdown()
    return results


def run_ray(runs, jobs, address):
    ray = start_ray(address, jobs)
    cwd = None if address else HERE     # on a cluster: the task's working directory, a copy of this folder
    remote_execute = ray.remote(num_cpus=1)(execute)
    pending = {remote_execute.remote(run.command, cwd): (run, time.time()) for run in runs}
    results, lock = {}, threading.Lock()
    try:
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)   # Ctrl-C is seen between waits
            if not done:
                continue
            run, started = pending.pop(done[0])
            status, stdout, stderr = ray.get(done[0])
            finish(run, status, stdout, stderr, started, results, lock)
    except KeyboardInterrupt:      # interrupt the running runs (they keep their checkpoints)
        for reference in pending:
            ray.cancel(reference)
        ray.wait(list(pending), num_returns=len(pending), timeout=30)
        raise
    finally:
        ray.shutdown()
    return results


def main(argv=None):
    try:
        args, extra = parse_sweep_args(sys.argv[1:] if argv is None else argv)
        flags = check_extra_flags(extra, args.algorithms)
        runs = plan(args, extra)
        if args.dry_run:
            for run in runs:
                print(f"{shlex.join(run.command)} | tee {shlex.quote(run.log_path)}")
            return 0
        todo = []
        for run in runs:
            # --eval local ends with an evaluation-only round R (engine/evaluation.py)
            action = prepare(run, flags.comm_round if flags.eval == "local" else flags.comm_round - 1)
            print(f"{action:7} {run.setting}/{run.name}", flush=True)
            if action != "skip":
                todo.append(run)
        if args.backend == "ray":
            results = run_ray(todo, args.jobs, args.ray_address)
        else:
            results = run_local(todo, args.jobs)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; the same command continues the sweep (runs resume from their checkpoints)",
              file=sys.stderr)
        return 130
    failed = [path for path, status in results.items() if status != 0]
    print(f"{len(runs)} runs: {len(runs) - len(todo)} skipped, {len(todo) - len(failed)} done, "
          f"{len(failed)} failed" + "".join(f"\n  failed: {path}" for path in failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
