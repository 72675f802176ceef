"""The tables of docs/pfl-results.md from the run directories of a personalised comparison
(`bash run.sh --profile pfl` or sweep.py with `-- --scenario pfllib`):

    python docs/pfl_tables.py log/pfl-fedavgcnn/fashionmnist_pfllib_beta0.1/runs

Per algorithm, over its seeds (run directories <algorithm>_seed<s>, read from metrics.jsonl):
best-round and final-round local-test accuracy (mean ± sample std, ddof 1, in percent), the
best round of each seed, the bytes one training round moves (uploaded, downloaded; mean over
the training rounds, which are the same every round for these methods), and the seconds a
training round takes (mean over rounds and seeds; evaluation of all clients included).
"""
import argparse
import json
import os
import re
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from engine import registry  # noqa: E402
from tables import mean_std  # noqa: E402

RUN_NAME = re.compile(r"^(?P<algorithm>.+)_seed(?P<seed>\d+)$")


def read_runs(folder):
    runs = {}
    for name in sorted(os.listdir(folder)):
        match = RUN_NAME.match(name)
        path = os.path.join(folder, name, "metrics.jsonl")
        if not match or not os.path.isfile(path):
            continue
        with open(path) as f:
            records = [json.loads(line) for line in f]
        if not records or not records[-1].get("evaluation_only"):
            continue                 # unfinished: its evaluation-only round is missing
        runs.setdefault(match["algorithm"], []).append(records)
    return runs


def cell(values, scale=100.0, digits=2):
    return mean_std([v * scale for v in values], digits)


def table(runs):
    order = [name for name in registry.ALGORITHMS if name in runs] + sorted(set(runs) - set(registry.ALGORITHMS))
    lines = ["| algorithm | seeds | best (%) | best rounds | final (%) | other series, final (%) | "
             "MB up / round | MB down / round | s / round |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name in order:
        seeds = runs[name]
        best = [max(r["accuracy"] for r in records) for records in seeds]
        best_rounds = [max(records, key=lambda r: r["accuracy"])["round"] for records in seeds]
        final = [records[-1]["accuracy"] for records in seeds]
        others = sorted(k for k in seeds[0][-1] if k.startswith("accuracy_"))
        other_text = "; ".join(f"{k[len('accuracy_'):]} {cell([records[-1][k] for records in seeds])}"
                               for k in others) or "-"
        training = [r for records in seeds for r in records if not r.get("evaluation_only")]
        up = statistics.mean(r["bytes_uploaded"] for r in training) / 1e6
        down = statistics.mean(r["bytes_downloaded"] for r in training) / 1e6
        seconds = statistics.mean(r["seconds"] for r in training)
        display = registry.ALGORITHMS[name].display if name in registry.ALGORITHMS else name
        lines.append(f"| {display} | {len(seeds)} | {cell(best)} | {', '.join(map(str, best_rounds))} | "
                     f"{cell(final)} | {other_text} | {up:.2f} | {down:.2f} | {seconds:.0f} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", help="a folder of run directories <algorithm>_seed<s>")
    args = parser.parse_args(argv)
    runs = read_runs(args.runs)
    if not runs:
        print(f"error: no finished run directories <algorithm>_seed<s> in {args.runs}", file=sys.stderr)
        return 2
    print(table(runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
