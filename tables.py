"""The comparison table: final-round and best-round test accuracy of every algorithm in every
setting, mean ± standard deviation over seeds.

    python tables.py log/                                   # every *.log under log/
    python tables.py log/fashionmnist_noniid_beta0.1 --format latex --output table.tex
    python tables.py old_logs/fedavg.log old_logs/moon.log  # published-format logs work too

A log is read only through its lines `>> Round {r} | Current Acc: {acc}, Best Acc: {best}`
(the published FedHUG code's format; every other line is ignored):
    final = Current Acc of the highest round,   best = max over rounds of Current Acc.
Grouping: the algorithm is the file name without `.log` and without a `_seed<s>` suffix
(`fedavgm_seed2.log` -> fedavgm); the setting is the folder the log lies in.
"""
import argparse
import csv
import io
import json
import os
import re
import statistics
import sys
from dataclasses import dataclass

from engine import registry

ROUND_LINE = re.compile(r">> Round (\d+) \| Current Acc: ([0-9.eE+-]+), Best Acc: ([0-9.eE+-]+)")
SEED_SUFFIX = re.compile(r"^(?P<algorithm>.+?)_seed(?P<seed>\d+)$")

# Row order and display names from the registry; other names keep their file name.
ALGORITHM_NAMES = {entry.name: entry.display for entry in registry.ALGORITHMS.values()}
EVALUATION_LINE = re.compile(r"^evaluation: (\w+) \((.*)\)$")

LAST_ROUNDS = 10     # the window of the stability columns
FINAL_TITLE = "Final-round test accuracy (%)"
BEST_TITLE = "Best-round test accuracy (%): best round (selected on the test set)"

HELP_EPILOG = """\
paths:
  FOLDER   searched recursively for *.log files (tee'd logs, published-format logs);
           the run directories that the scripts write (log.txt, metrics.jsonl) are not
           read by the walk, so a run is never counted twice
  FILE     one log file
  RUN_DIR  a run directory (holding metrics.jsonl) named directly, e.g. log/*/runs/*;
           its algorithm and seed come from its name like a log's (run.sh names them
           <algorithm>_seed<s>), its setting from the folder above (above runs/ if in one)

grouping (--group_by):
  folder   setting = name of the folder the log lies in (default)
  path     setting = that folder's path as given, for folders of the same name

cells: mean ± sample standard deviation (ddof=1, Bessel's correction) over the runs
(seeds) of one algorithm in one setting, accuracy in percent with 2 decimals; a cell of a
single run shows the accuracy alone, without ±. The second table selects each run's best
round on the test set: it is optimistic, report it beside the final round, not instead.
csv: one row per (metric, setting, algorithm): runs, mean, std (empty for one run), rounds
(a range such as 15-70 when the runs differ).
"""


@dataclass
class RunCurve:
    """One run's accuracy (a fraction in [0, 1]) at each logged round."""
    setting: str
    algorithm: str
    seed: str            # "" when the file name carries no _seed<s> suffix
    path: str
    rounds: list
    accuracies: list
    evaluation: str = "global"     # the protocol (--eval); published-format logs are "global"
    records: list = None           # its metrics.jsonl records when its run directory is found (bytes, seconds)

    @property
    def final(self):
        return self.accuracies[-1]

    @property
    def best(self):
        return max(self.accuracies)

    @property
    def num_rounds(self):
        """Rounds run, counted from the logged round numbers (which start at 0)."""
        return self.rounds[-1] + 1

    @property
    def best_round(self):
        """The first round that reached the best accuracy."""
        return self.rounds[self.accuracies.index(self.best)]

    @property
    def last_window(self):
        """The accuracies of the last LAST_ROUNDS logged rounds (all of them in a shorter run)."""
        return self.accuracies[-LAST_ROUNDS:]

    @property
    def last_mean(self):
        return statistics.fmean(self.last_window)

    @property
    def last_std(self):
        """Sample std (ddof=1) of the accuracy over the last rounds: the round-to-round swing."""
        window = self.last_window
        return statistics.stdev(window) if len(window) > 1 else 0.0

    def per_round(self, key, scale=1.0):
        """Mean over the training rounds of a metrics record field (None without records)."""
        values = [r[key] for r in self.records or () if not r.get("evaluation_only") and r.get(key) is not None]
        return statistics.fmean(values) * scale if values else None

    @property
    def mb_up(self):
        return self.per_round("bytes_uploaded", 1e-6)

    @property
    def mb_down(self):
        return self.per_round("bytes_downloaded", 1e-6)

    @property
    def seconds(self):
        return self.per_round("seconds")


class NoLogs(Exception):
    """Nothing readable at the paths given: printed as one line, exit status 2."""


# ----------------------------------------------------------------------------- reading

def split_name(stem):
    """'fedavgm_seed2' -> ('fedavgm', '2'); 'moon' -> ('moon', '')."""
    match = SEED_SUFFIX.match(stem)
    return (match["algorithm"], match["seed"]) if match else (stem, "")


def curve_from_rounds(by_round, setting, stem, path, evaluation="global"):
    """Sort {round: accuracy} into a RunCurve (a replayed or repeated round keeps its last value).
    Runs evaluated under another protocol than `global` get their own column: "<setting> [local]"."""
    algorithm, seed = split_name(stem)
    rounds = sorted(by_round)
    if evaluation != "global":
        setting = f"{setting} [{evaluation}]"
    return RunCurve(setting, algorithm, seed, path, rounds, [by_round[r] for r in rounds], evaluation)


def read_records(run_dir):
    """The metrics records of a run directory ([] when it has none)."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def read_log(path, setting):
    """A RunCurve from the `>> Round` lines of a text log, or None when it has none. Its
    metrics records (bytes, seconds) come from the run directory run.sh puts beside it
    (runs/<log name>/), when there is one."""
    by_round, evaluation = {}, "global"
    with open(path, errors="replace") as f:
        for line in f:
            protocol = EVALUATION_LINE.match(line.rstrip("\n"))
            if protocol:
                evaluation = protocol[1]
            for match in ROUND_LINE.finditer(line):   # finditer: tqdm's \r can glue lines together
                by_round[int(match[1])] = float(match[2])
    if not by_round:
        return None
    stem = os.path.splitext(os.path.basename(path))[0]
    curve = curve_from_rounds(by_round, setting, stem, path, evaluation)
    curve.records = read_records(os.path.join(os.path.dirname(path), "runs", stem)) or None
    return curve


def read_run_dir(path, setting):
    """A RunCurve from a run directory's metrics.jsonl (one JSON record a round)."""
    by_round, evaluation = {}, "global"
    records = read_records(path)
    for record in records:
        if record["accuracy"] is None:       # a round that --eval_every did not evaluate
            continue
        by_round[int(record["round"])] = float(record["accuracy"])
        evaluation = record.get("evaluation", "global")
    if not by_round:
        return None
    curve = curve_from_rounds(by_round, setting, os.path.basename(os.path.normpath(path)), path, evaluation)
    curve.records = records
    return curve


def setting_of(folder, group_by):
    folder = os.path.normpath(folder)
    return os.path.basename(os.path.abspath(folder)) if group_by == "folder" else folder


def collect_runs(paths, group_by="folder"):
    """Every run under `paths` (folders, .log files, run directories), as RunCurves."""
    runs, empty = [], []
    for path in paths:
        if os.path.isdir(path) and os.path.isfile(os.path.join(path, "metrics.jsonl")):
            parent = os.path.dirname(os.path.abspath(os.path.normpath(path)))
            if os.path.basename(parent) == "runs":
                parent = os.path.dirname(parent)
            found = [(read_run_dir, path, parent)]
        elif os.path.isdir(path):
            found = [(read_log, os.path.join(folder, name), folder)
                     for folder, subfolders, names in sorted(os.walk(path))
                     for name in sorted(names) if name.endswith(".log")]
        elif os.path.isfile(path):
            found = [(read_log, path, os.path.dirname(path) or ".")]
        else:
            raise NoLogs(f"{path} does not exist")
        if not found:
            raise NoLogs(f"no *.log files under {path} (give a folder of logs, a .log file "
                         "or a run directory holding metrics.jsonl)")
        for reader, file, folder in found:
            run = reader(file, setting_of(folder, group_by))
            if run is None:
                empty.append(file)
            else:
                runs.append(run)
    for file in empty:
        print(f"warning: {file} has no '>> Round' lines; skipped", file=sys.stderr)
    if not runs:
        raise NoLogs(f"no '>> Round' lines in the logs at {', '.join(paths)}")
    return runs


# ----------------------------------------------------------------------------- the table

def algorithm_order(algorithms):
    known = [a for a in ALGORITHM_NAMES if a in algorithms]
    return known + sorted(a for a in algorithms if a not in ALGORITHM_NAMES)


def display_name(algorithm):
    return ALGORITHM_NAMES.get(algorithm, algorithm)


def summarise(values):
    """(mean, sample std with ddof=1 or None for one value) of accuracies in percent."""
    percent = [100.0 * v for v in values]
    return statistics.fmean(percent), (statistics.stdev(percent) if len(percent) > 1 else None)


def span(numbers):
    """'3' when all numbers are 3, '1-3' when they range from 1 to 3."""
    numbers = sorted(set(numbers))
    return f"{numbers[0]}" if len(numbers) == 1 else f"{numbers[0]}-{numbers[-1]}"


def mean_std(values, digits=2):
    """'mean ± sample std (ddof=1)' of numbers, the number alone for one value (the results
    documents' cells)."""
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.fmean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def cell_text(mean, std):
    return f"{mean:.2f}" if std is None else f"{mean:.2f} ± {std:.2f}"


class Comparison:
    """The runs grouped into cells: (setting, algorithm) -> [RunCurve]."""

    def __init__(self, runs):
        self.cells = {}
        for run in runs:
            self.cells.setdefault((run.setting, run.algorithm), []).append(run)
        self.settings = sorted({s for s, _ in self.cells})
        self.algorithms = algorithm_order({a for _, a in self.cells})

    def values(self, metric, setting, algorithm):
        """The runs' final or best accuracies (fractions) in one cell; [] when it is empty."""
        return [getattr(run, metric) for run in self.cells.get((setting, algorithm), [])]

    def footnote(self):
        runs_per_cell = span(len(runs) for runs in self.cells.values())
        rounds = span(run.num_rounds for runs in self.cells.values() for run in runs)
        protocols = sorted({run.evaluation for runs in self.cells.values() for run in runs})
        evaluation = "; ".join(f"{p}: {registry.EVAL_PROTOCOLS.get(p, p)}" for p in protocols)
        return (f"mean ± sample std (ddof=1) over {runs_per_cell} run(s) (seeds) per cell, a single "
                f"run without ±; final round = last logged round ({rounds} rounds); "
                f"evaluation protocol ({evaluation})")

    def warn_uneven_rounds(self):
        for setting in self.settings:
            lengths = {run.num_rounds for (s, _), runs in self.cells.items() if s == setting for run in runs}
            if len(lengths) > 1:
                print(f"warning: setting {setting}: runs of different lengths "
                      f"({', '.join(str(n) for n in sorted(lengths))} rounds); its final-round cells are not "
                      "comparable (an unfinished run, or logs of another profile)", file=sys.stderr)

    def grid(self, metric):
        """Rows of cell texts ('' for an empty cell), one per algorithm, one column per setting."""
        rows = []
        for algorithm in self.algorithms:
            row = []
            for setting in self.settings:
                values = self.values(metric, setting, algorithm)
                row.append(cell_text(*summarise(values)) if values else "")
            rows.append(row)
        return rows


# The per-setting table: (column, RunCurve attribute, scale, decimals). Accuracies in percent.
DETAIL_COLUMNS = [("final", "final", 100, 2), ("best", "best", 100, 2), ("best round", "best_round", 1, 1),
                  (f"last-{LAST_ROUNDS} mean", "last_mean", 100, 2), (f"last-{LAST_ROUNDS} std", "last_std", 100, 2),
                  ("MB up / round", "mb_up", 1, 3), ("MB down / round", "mb_down", 1, 3),
                  ("s / round", "seconds", 1, 2)]
DETAILS_NOTE = (f"last-{LAST_ROUNDS} mean / std: mean and sample std (ddof=1) of a run's accuracy over its last "
                f"{LAST_ROUNDS} logged rounds (std = the round-to-round swing), then mean ± std over seeds; "
                "best round: the first round reaching the best accuracy; MB (10^6 bytes) up / down: all clients' "
                "uploads / downloads in a round, mean over training rounds; s / round: wall-clock seconds of a "
                "round (local training, aggregation, evaluation), mean over rounds (rounds taken over by a warm "
                "start count with the seconds of the run they come from); – : no run directory (bytes and "
                "seconds are read from metrics.jsonl)")


def detail_cell(runs, attribute, scale, decimals):
    """mean ± std (ddof=1) over the runs of one attribute; '' when no run has it."""
    values = [getattr(run, attribute) for run in runs]
    values = [v * scale for v in values if v is not None]
    if not values:
        return ""
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.0f}" if attribute == "best_round" else f"{mean:.{decimals}f}"
    return f"{mean:.{decimals}f} ± {statistics.stdev(values):.{decimals}f}"


def details_rows(comparison, setting):
    """(algorithm, [cell texts]) of every algorithm that has runs in `setting`."""
    rows = []
    for algorithm in comparison.algorithms:
        runs = comparison.cells.get((setting, algorithm))
        if runs:
            rows.append((algorithm, [detail_cell(runs, attr, scale, dec) for _, attr, scale, dec in DETAIL_COLUMNS]))
    return rows


def details_title(comparison, setting):
    runs = [run for (s, _), cell in comparison.cells.items() if s == setting for run in cell]
    return (f"{setting}: stability, communication and time ({span(run.num_rounds for run in runs)} rounds, "
            f"{span(len(cell) for (s, _), cell in comparison.cells.items() if s == setting)} seed(s))")


# ----------------------------------------------------------------------------- formats

def to_markdown(comparison):
    parts = []
    for title, metric in ((FINAL_TITLE, "final"), (BEST_TITLE, "best")):
        lines = [f"### {title}", "",
                 "| algorithm | " + " | ".join(comparison.settings) + " |",
                 "|---|" + "---:|" * len(comparison.settings)]
        for algorithm, row in zip(comparison.algorithms, comparison.grid(metric)):
            lines.append(f"| {display_name(algorithm)} | " + " | ".join(c or "–" for c in row) + " |")
        parts.append("\n".join(lines))
    for setting in comparison.settings:
        lines = [f"### {details_title(comparison, setting)}", "",
                 "| algorithm | " + " | ".join(name for name, *_ in DETAIL_COLUMNS) + " |",
                 "|---|" + "---:|" * len(DETAIL_COLUMNS)]
        for algorithm, cells in details_rows(comparison, setting):
            lines.append(f"| {display_name(algorithm)} | " + " | ".join(c or "–" for c in cells) + " |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n\n" + comparison.footnote() + "\n\n" + DETAILS_NOTE + "\n"


def latex_escape(text):
    return re.sub(r"([_&%#$])", r"\\\1", text)


def to_latex(comparison):
    """Two booktabs tables; cells as $mean \\pm std$."""
    parts = []
    for title, metric in ((FINAL_TITLE, "final"), (BEST_TITLE, "best")):
        lines = [r"\begin{table}[t]", r"\centering",
                 rf"\caption{{{latex_escape(title.replace('%', 'percent'))}}}",
                 r"\begin{tabular}{l" + "c" * len(comparison.settings) + "}", r"\toprule",
                 "Algorithm & " + " & ".join(latex_escape(s) for s in comparison.settings) + r" \\",
                 r"\midrule"]
        for algorithm, row in zip(comparison.algorithms, comparison.grid(metric)):
            cells = ["$" + c.replace("±", r"\pm") + "$" if c else "--" for c in row]
            lines.append(f"{latex_escape(display_name(algorithm))} & " + " & ".join(cells) + r" \\")
        lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
        parts.append("\n".join(lines))
    for setting in comparison.settings:
        lines = [r"\begin{table}[t]", r"\centering", rf"\caption{{{latex_escape(details_title(comparison, setting))}}}",
                 r"\begin{tabular}{l" + "c" * len(DETAIL_COLUMNS) + "}", r"\toprule",
                 "Algorithm & " + " & ".join(latex_escape(name) for name, *_ in DETAIL_COLUMNS) + r" \\",
                 r"\midrule"]
        for algorithm, cells in details_rows(comparison, setting):
            cells = ["$" + c.replace("±", r"\pm") + "$" if c else "--" for c in cells]
            lines.append(f"{latex_escape(display_name(algorithm))} & " + " & ".join(cells) + r" \\")
        lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
        parts.append("\n".join(lines))
    return f"% {comparison.footnote()}\n% {DETAILS_NOTE}\n" + "\n\n".join(parts) + "\n"


def to_csv(comparison):
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["metric", "setting", "algorithm", "evaluation", "runs", "mean", "std", "rounds"])
    for metric, attribute, scale in [("final", "final", 100), ("best", "best", 100)] + [
            (CSV_NAMES[attribute], attribute, scale) for _, attribute, scale, _ in DETAIL_COLUMNS[2:]]:
        for algorithm in comparison.algorithms:
            for setting in comparison.settings:
                runs = comparison.cells.get((setting, algorithm))
                values = [getattr(run, attribute) for run in runs or ()]
                values = [v * scale for v in values if v is not None]
                if not values:
                    continue
                std = statistics.stdev(values) if len(values) > 1 else None
                writer.writerow([metric, setting, algorithm, runs[0].evaluation, len(values),
                                 f"{statistics.fmean(values):.4f}", "" if std is None else f"{std:.4f}",
                                 span(run.num_rounds for run in runs)])
    return out.getvalue()


# csv metric names of the per-setting columns (accuracies in percent, MB = 10^6 bytes)
CSV_NAMES = {"best_round": "best_round", "last_mean": f"last{LAST_ROUNDS}_mean", "last_std": f"last{LAST_ROUNDS}_std",
             "mb_up": "mb_up_per_round", "mb_down": "mb_down_per_round", "seconds": "seconds_per_round"}


FORMATS = {"markdown": to_markdown, "csv": to_csv, "latex": to_latex}


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Comparison table of final-round and best-round test accuracy "
                    "(mean ± std over seeds) from federated-learning logs.",
        epilog=HELP_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", metavar="PATH", help="folders, .log files or run directories")
    parser.add_argument("--format", choices=sorted(FORMATS), default="markdown")
    parser.add_argument("--output", "-o", help="also write the table to this file")
    parser.add_argument("--group_by", choices=("folder", "path"), default="folder",
                        help="how a log's setting (table column) is named (default: folder)")
    parser.add_argument("--title", help="a line printed above the tables (markdown, latex), e.g. what profile "
                        "made the runs")
    args = parser.parse_args(argv)
    try:
        comparison = Comparison(collect_runs(args.paths, args.group_by))
    except NoLogs as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    comparison.warn_uneven_rounds()
    text = FORMATS[args.format](comparison)
    if args.title and args.format == "markdown":
        text = f"**{args.title}**\n\n{text}"
    elif args.title and args.format == "latex":
        text = f"% {args.title}\n{text}"
    print(text, end="")
    if args.output:
        with open(args.output, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
