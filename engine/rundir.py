"""A run directory: log.txt (the tee-able log), metrics.jsonl (one record a round), config.yaml,
checkpoint.pt, global_model.pt.

A checkpoint records how many log lines and metrics records were written when it was taken; a
resumed run keeps exactly those (dropping whatever a killed process wrote after it), replays
the log lines to stdout, and appends. So checkpoints stay small whatever the run's length.
"""
import json
import os
import sys
import time

import yaml

from utils import UsageError


class RunDirectory:
    def __init__(self, path, log_lines_kept=None, records_kept=None, replay=True):
        """A new run directory at `path`, or (resume) an existing one cut back to the given
        numbers of log lines and metrics records, whose kept lines are printed unless not `replay`."""
        self.path = path
        self.before_print = None        # called before a line is printed (a progress bar wiping itself)
        self.log_path = os.path.join(path, "log.txt")
        self.metrics_path = os.path.join(path, "metrics.jsonl")
        self.records = []
        if log_lines_kept is None:
            self.lines = []
            self.log_file = open(self.log_path, "w")
            self.metrics_file = open(self.metrics_path, "w")
        else:
            self.lines = read_first_lines(self.log_path, log_lines_kept)
            record_lines = read_first_lines(self.metrics_path, records_kept)
            self.records = [json.loads(line) for line in record_lines]
            # cut both files back atomically (a kill now leaves them whole), then append
            atomic_write_lines(self.log_path, self.lines)
            atomic_write_lines(self.metrics_path, record_lines)
            self.log_file = open(self.log_path, "a")
            self.metrics_file = open(self.metrics_path, "a")
            for line in self.lines if replay else ():
                print(line, flush=True)

    @staticmethod
    def create(logdir, name):
        """Make (and probe) a new run directory; refuse one that already holds a run."""
        path = os.path.join(logdir, name)
        if os.path.exists(os.path.join(path, "checkpoint.pt")) or os.path.exists(os.path.join(path, "log.txt")):
            raise UsageError(f"run directory {path} already holds a run; continue it with "
                             f"--resume {path} or choose another --log_file_name")
        try:
            os.makedirs(path, exist_ok=True)
            probe = os.path.join(path, ".write-test")
            open(probe, "w").close()
            os.unlink(probe)
        except OSError as e:
            raise UsageError(f"cannot write the run directory {path}: {e.strerror}; choose a writable --logdir")
        print(f"run directory: {path}", file=sys.stderr)
        return RunDirectory(path)

    @staticmethod
    def default_name(algorithm, args):
        return (f"{algorithm}_{args.dataset}_{args.partition}_beta{args.beta}_seed{args.init_seed}"
                f"_{time.strftime('%Y%m%d-%H%M%S')}")

    def file(self, name):
        return os.path.join(self.path, name)

    def log(self, line=""):
        """Print and write a line (or several, split at newlines)."""
        if self.before_print is not None:
            self.before_print()
        for part in str(line).split("\n"):
            self.lines.append(part)
            print(part, flush=True)
            self.log_file.write(part + "\n")
        self.log_file.flush()

    def write_metrics(self, record):
        self.records.append(record)
        self.metrics_file.write(json.dumps(record) + "\n")
        self.metrics_file.flush()

    def write_config(self, config):
        with open(self.file("config.yaml"), "w") as f:
            yaml.safe_dump(config, f, sort_keys=True)

    def flush(self):
        """Make the log and the metrics durable (before a checkpoint that counts them)."""
        for f in (self.log_file, self.metrics_file):
            f.flush()
            os.fsync(f.fileno())

    def close(self):
        self.log_file.close()
        self.metrics_file.close()


def atomic_write_lines(path, lines):
    """Replace a file by these lines through a temporary file and a rename."""
    temporary = path + ".tmp"
    with open(temporary, "w") as f:
        f.writelines(line + "\n" for line in lines)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)


def read_first_lines(path, count):
    """The first `count` lines of a file (without newlines); a clear error if it has fewer."""
    lines = []
    if count:
        try:
            with open(path) as f:
                for line in f:
                    if len(lines) == count:
                        break
                    lines.append(line.rstrip("\n"))
        except OSError as e:
            raise UsageError(f"cannot read {path} ({e.strerror}); a resume needs the run directory's "
                             "log.txt and metrics.jsonl beside its checkpoint")
    if len(lines) < count:
        raise UsageError(f"{path} holds {len(lines)} lines but the checkpoint counts {count}: the run "
                         "directory is incomplete; resume from an intact run directory")
    return lines
