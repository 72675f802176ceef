"""The tables of docs/inco-results.md from a sweep of the InCo family (sweep.py ... --out log/inco
-- --scenario inco ...):

    python docs/inco_tables.py log/inco

Per setting folder (fashionmnist_noniid_beta<b>) and algorithm, over its seeds (run directories
runs/<algorithm>_seed<s>, metrics.jsonl): the final round's group accuracies (each depth's model
on the official test set) and their unweighted mean, as mean ± sample std (ddof 1) over seeds, in
percent; InCo* minus Hetero* of the same base method (mean over seeds of the paired difference,
seed by seed, and how many seeds it is positive on); MB up a round and seconds a round; when the
runs were scored at several rounds (--eval_every), the paired difference at each of them.
"""
import argparse
import json
import os
import re
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tables import mean_std  # noqa: E402

RUN_NAME = re.compile(r"^(?P<algorithm>.+)_seed(?P<seed>\d+)$")
BASES = ("avg", "prox", "scaffold", "nova", "moon")
DISPLAY = {"avg": "Avg", "prox": "Prox", "scaffold": "Scaffold", "nova": "Nova", "moon": "MOON"}


def final_records(folder):
    """{algorithm: {seed: the last metrics record}} of the finished runs under folder/runs."""
    runs = {}
    runs_dir = os.path.join(folder, "runs")
    for name in sorted(os.listdir(runs_dir)) if os.path.isdir(runs_dir) else ():
        match, path = RUN_NAME.match(name), os.path.join(runs_dir, name, "metrics.jsonl")
        if not match or not os.path.isfile(path):
            continue
        with open(path) as f:
            records = [json.loads(line) for line in f if line.strip()]
        if records and records[-1].get("group_accuracies"):
            runs.setdefault(match["algorithm"], {})[int(match["seed"])] = records
    return runs


def cell(values, digits=2):
    return mean_std([100.0 * v for v in values], digits) if values else "n/a"


def setting_table(runs):
    groups = sorted({g for seeds in runs.values() for records in seeds.values()
                     for g in records[-1]["group_accuracies"]})
    head = ["method", "seeds", "mean over groups (%)"] + [g.replace("inco-cnn-", "depth ") for g in groups] + \
           ["MB up / round", "s / round"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" + "---:|" * (len(head) - 1)]
    for base in BASES:
        for family in ("hetero", "inco"):
            name = family + base
            if name not in runs:
                continue
            seeds = runs[name]
            last = [records[-1] for records in seeds.values()]
            up = statistics.mean(r["bytes_uploaded"] for records in seeds.values() for r in records) / 1e6
            seconds = statistics.mean(r["seconds"] for records in seeds.values() for r in records)
            row = [f"{'Hetero' if family == 'hetero' else 'InCo'}{DISPLAY[base]}", str(len(seeds)),
                   cell([r["accuracy"] for r in last])]
            row += [cell([r["group_accuracies"][g] for r in last]) for g in groups]
            row += [f"{up:.1f}", f"{seconds:.1f}"]
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def difference_table(runs):
    lines = ["| base method | Hetero* (%) | InCo* (%) | InCo* - Hetero* (points) | seeds InCo* ahead |",
             "|---|---:|---:|---:|---:|"]
    for base in BASES:
        hetero, inco = runs.get("hetero" + base, {}), runs.get("inco" + base, {})
        seeds = sorted(set(hetero) & set(inco))
        if not seeds:
            continue
        h = [hetero[s][-1]["accuracy"] for s in seeds]
        i = [inco[s][-1]["accuracy"] for s in seeds]
        gaps = [b - a for a, b in zip(h, i)]
        lines.append(f"| {DISPLAY[base]} | {cell(h)} | {cell(i)} | {cell(gaps)} | "
                     f"{sum(g > 0 for g in gaps)} of {len(seeds)} |")
    return "\n".join(lines)


def trajectory_table(runs):
    """InCo* - Hetero* (points, mean ± std over paired seeds) at every evaluated round, when the
    runs were scored more than once (--eval_every); None otherwise."""
    rows, rounds = [], set()
    for base in BASES:
        hetero, inco = runs.get("hetero" + base, {}), runs.get("inco" + base, {})
        seeds = sorted(set(hetero) & set(inco))
        if not seeds:
            continue
        scored = [{r["round"]: r["accuracy"] for r in records if r.get("accuracy") is not None}
                  for records in [hetero[s] for s in seeds] + [inco[s] for s in seeds]]
        common = sorted(set.intersection(*(set(x) for x in scored)))
        rounds.update(common)
        cells = {r: cell([i[r] - h[r] for h, i in zip(scored[:len(seeds)], scored[len(seeds):])]) for r in common}
        rows.append((DISPLAY[base], cells))
    if len(rounds) < 2:
        return None
    rounds = sorted(rounds)
    lines = ["| base method | " + " | ".join(f"round {r}" for r in rounds) + " |", "|---|" + "---:|" * len(rounds)]
    lines += [f"| {name} | " + " | ".join(cells.get(r, "n/a") for r in rounds) + " |" for name, cells in rows]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", help="the sweep's --out folder (settings below it)")
    args = parser.parse_args(argv)
    settings = sorted(d for d in os.listdir(args.root) if os.path.isdir(os.path.join(args.root, "runs"))
                      or os.path.isdir(os.path.join(args.root, d, "runs")))
    if not settings:
        print(f"error: no setting folders with runs/ under {args.root}", file=sys.stderr)
        return 2
    for setting in settings:
        runs = final_records(os.path.join(args.root, setting))
        if not runs:
            continue
        print(f"### {setting}\n\n{setting_table(runs)}\n\n{difference_table(runs)}\n")
        trajectory = trajectory_table(runs)
        if trajectory:
            print(f"InCo* - Hetero* (points) at every evaluated round:\n\n{trajectory}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
