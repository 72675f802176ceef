"""The rounds progress bar, kept out of logs.

A run started by hand shows its own rounds bar on stderr when stderr is a terminal. A run
started by run.sh shows one bar for the whole job (every algorithm and seed): run.sh sets

    FL_JOB      "<index> <count> <units done> <units in all> <job start, epoch seconds> <label>"
    FL_JOB_FD   a file descriptor open on run.sh's own stderr (a terminal, or nothing is shown)

and sends the run's stdout and stderr to its tee'd log, so the bar never lands in a log. A
unit is one round this job computes (a warm-started FedHUG counts only its own rounds).
"""
import os
import sys
import time

from tqdm import tqdm


class JobBar:
    """One bar over the whole job: position = units done before this run + this run's rounds;
    time left = elapsed since the job started x units left / units done."""

    def __init__(self, stream, index, count, done, total, job_start, label, first_round, start_round):
        self.done, self.job_start, self.first_round = done, job_start, first_round
        self.bar = tqdm(total=total, initial=done + start_round - first_round, file=stream, ncols=terminal_width(stream),
                        desc=f"run.sh [{index}/{count}] {label}",
                        bar_format="{desc} {percentage:3.0f}%|{bar}| {n}/{total} rounds{postfix}")
        self.refresh()

    def refresh(self):
        elapsed = time.time() - self.job_start
        position = self.bar.n
        left = elapsed * (self.bar.total - position) / position if position else None
        self.bar.set_postfix_str(f"{format_minutes(elapsed)} elapsed"
                                 + (f", ~{format_minutes(left)} left" if left is not None else ""), refresh=True)

    def round_done(self, round_index):
        self.bar.n = self.done + round_index + 1 - self.first_round
        time.sleep(0.05)        # let tee put the round's log lines on the terminal first
        self.refresh()

    def clear(self):
        """Wipe the bar off its line before a log line is printed (it comes back at the round's end)."""
        self.bar.clear()

    def close(self):
        self.bar.close()


class RunBar:
    """The run's own rounds bar on stderr (only when it is a terminal)."""

    def __init__(self, start_round, comm_round):
        self.bar = tqdm(total=comm_round, initial=start_round, desc="rounds", file=sys.stderr,
                        disable=not sys.stderr.isatty())

    def round_done(self, round_index):
        self.bar.update(round_index + 1 - self.bar.n)

    def clear(self):
        self.bar.clear()

    def close(self):
        self.bar.close()


def terminal_width(stream):
    """The terminal's columns (100 when it reports none, as some pseudo-terminals do)."""
    try:
        return os.get_terminal_size(stream.fileno()).columns or 100
    except OSError:
        return 100


def format_minutes(seconds):
    minutes, seconds = divmod(int(seconds), 60)
    return f"{minutes} min {seconds:02d} s" if minutes else f"{seconds} s"


def rounds_bar(first_round, start_round, comm_round):
    """The job's bar when run.sh asked for one and its stderr is a terminal, else the run's own.
    `first_round`: the first round this run computes itself (a warm start's), `start_round`:
    where it starts now (after a resume)."""
    job, fd = os.environ.get("FL_JOB"), os.environ.get("FL_JOB_FD")
    if job and fd:
        try:
            index, count, done, total, job_start, label = job.split(" ", 5)
            if os.isatty(int(fd)):
                stream = os.fdopen(os.dup(int(fd)), "w")
                return JobBar(stream, int(index), int(count), int(done), int(total), float(job_start), label,
                              first_round, start_round)
        except (ValueError, OSError):
            pass            # a malformed or closed job description: no job bar, the run goes on
    return RunBar(start_round, comm_round)
