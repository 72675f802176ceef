"""The rounds progress bar of a run started by hand, kept out of logs: drawn on stderr only when it
is a terminal. (run.sh's runs write into their logs, so they draw nothing; engine/jobs.py draws one
bar for the whole job.)
"""
import os
import sys

from tqdm import tqdm


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
