"""The tables and pictures of docs/fedf2dg-results.md from the runs of docs/fedf2dg/runs.sh:

    python docs/fedf2dg/tables.py log/fedf2dg [--pictures docs/fedf2dg [--pictures_of SETTING]]

The folder holds one sweep per variant: features/ and bn/ (FedF2DG with the feature-statistics
prior on SimpleCNN and with the BatchNorm prior on SimpleCNN-BN) and baselines/ (FedAvg, SCAFFOLD,
FedHUG), each with <setting>/runs/<algorithm>_seed<s>/{metrics.jsonl,log.txt}.

Per setting (Dir(beta)) and method, mean ± sample std (ddof 1) over seeds, in percent of the test set:
    end of pre-training   the global model of the last pre-training round (R1 - 1; the same round
                          of the baselines)
    selected pre-trained  FedF2DG: the pre-training round's global model chosen on the validation
                          hold-out (the student of the distillation), scored on the test set
    after distillation    round R1
    final                 the last round (after the Rcompete rounds)
    best round            the highest of any round, selected on the test set (optimistic; for
                          comparison with FedF2DG's validation-selected pre-trained model)
and the seconds each stage took (sum of its rounds' seconds), MB uploaded by kind over the run.
--pictures writes the per-class grids of FedF2DG's pseudo images (distillation round) and FedHUG's
synthetic samples (client 0, first synthesis round) of the first seed of every setting.
"""
import argparse
import json
import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))
from tables import mean_std  # noqa: E402

RUN_NAME = re.compile(r"^(?P<algorithm>.+)_seed(?P<seed>\d+)$")
STUDENT = re.compile(r"fedf2dg round (\d+): stage distil, .*student pre-training round (\d+),")
# (sweep folder, algorithm, display name) in table order
METHODS = (("baselines", "fedavg", "FedAvg"), ("baselines", "scaffold", "SCAFFOLD"), ("baselines", "fedhug", "FedHUG"),
           ("features", "fedf2dg", "FedF2DG, feature prior (SimpleCNN)"),
           ("bn", "fedf2dg", "FedF2DG, BN prior (SimpleCNN-BN)"))


def read_runs(folder):
    """{setting: {display name: {seed: {"records": [...], "selected": round or None, "dir": path}}}}"""
    found = {}
    for variant, algorithm, display in METHODS:
        root = os.path.join(folder, variant)
        for setting in sorted(os.listdir(root)) if os.path.isdir(root) else ():
            runs_dir = os.path.join(root, setting, "runs")
            for name in sorted(os.listdir(runs_dir)) if os.path.isdir(runs_dir) else ():
                match = RUN_NAME.match(name)
                run_dir = os.path.join(runs_dir, name)
                metrics = os.path.join(run_dir, "metrics.jsonl")
                if not match or match["algorithm"] != algorithm or not os.path.isfile(metrics):
                    continue
                with open(metrics) as f:
                    records = [json.loads(line) for line in f if line.strip()]
                with open(os.path.join(run_dir, "log.txt")) as f:
                    log = f.read()
                if not records or ">> Final" not in log:
                    continue                                    # unfinished
                students = STUDENT.findall(log)
                found.setdefault(setting, {}).setdefault(display, {})[int(match["seed"])] = {
                    "records": records, "selected": int(students[0][1]) if students else None,
                    "distil_round": int(students[0][0]) if students else None, "dir": run_dir}
    return found


def cell(values, scale=100.0, digits=2):
    values = [scale * v for v in values if v is not None]
    return mean_std(values, digits) if values else "-"


def pretrain_rounds(setting_runs):
    """R1: FedF2DG's distillation round (the same for every run of the grid)."""
    rounds = {run["distil_round"] for seeds in setting_runs.values() for run in seeds.values()
              if run["distil_round"] is not None}
    if len(rounds) != 1:
        raise SystemExit(f"error: expected one FedF2DG distillation round in the grid, found {sorted(rounds)}")
    return rounds.pop()


def accuracy_table(setting_runs):
    r1 = pretrain_rounds(setting_runs)
    lines = [f"| method | seeds | end of pre-training (round {r1 - 1}) | selected pre-trained model | "
             f"after distillation (round {r1}) | final (round {{last}}) | best round, selected on the test set |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    last = set()
    for _, _, display in METHODS:
        seeds = setting_runs.get(display)
        if not seeds:
            continue
        by_round = [{r["round"]: r["accuracy"] for r in run["records"]} for run in seeds.values()]
        last.add(max(by_round[0]))
        selected = [run["records"][run["selected"]]["accuracy"] if run["selected"] is not None else None
                    for run in seeds.values()]
        selected_text = cell(selected)
        if selected_text != "-":
            rounds = sorted({run["selected"] for run in seeds.values()})
            selected_text += f" (rounds {', '.join(map(str, rounds))})"
        lines.append(f"| {display} | {len(seeds)} | {cell([a.get(r1 - 1) for a in by_round])} | {selected_text} | "
                     f"{cell([a.get(r1) for a in by_round])} | {cell([a[max(a)] for a in by_round])} | "
                     f"{cell([max(a.values()) for a in by_round])} |")
    lines[0] = lines[0].replace("{last}", ", ".join(map(str, sorted(last))))
    return "\n".join(lines)


def stage_of(record, r1):
    return record.get("stage") or ("pretrain" if record["round"] < r1 else "after pre-training")


def cost_table(setting_runs):
    """Seconds per stage (the sum of the stage's rounds, mean over seeds) and MB uploaded by kind."""
    r1 = pretrain_rounds(setting_runs)
    lines = ["| method | pre-training rounds (s) | distillation round (s) | Rcompete / later rounds (s) | whole run (s) "
             "| MB uploaded (by kind) |", "|---|---:|---:|---:|---:|---|"]
    for _, _, display in METHODS:
        seeds = setting_runs.get(display)
        if not seeds:
            continue
        totals, kinds = {"pretrain": [], "distil": [], "later": [], "all": []}, {}
        for run in seeds.values():
            spent = {"pretrain": 0.0, "distil": 0.0, "later": 0.0}
            for record in run["records"]:
                part = "pretrain" if record["round"] < r1 else "distil" if record["round"] == r1 else "later"
                spent[part] += record["seconds"]
                for kind, count in (record.get("bytes_uploaded_by_kind") or {}).items():
                    kinds[kind] = kinds.get(kind, 0) + count / len(seeds)
            for part, value in spent.items():
                totals[part].append(value)
            totals["all"].append(sum(spent.values()))
        by_kind = ", ".join(f"{kind} {value / 1e6:.3g}" for kind, value in sorted(kinds.items(), key=lambda kv: -kv[1]))
        lines.append(f"| {display} | " + " | ".join(cell(totals[p], scale=1.0, digits=0)
                                                   for p in ("pretrain", "distil", "later", "all")) + f" | {by_kind} |")
    return "\n".join(lines)


def pictures(found, out, only=None):
    """Per setting: FedF2DG's pseudo images of the distillation round (both priors) and FedHUG's
    synthetic samples of client 0 in its first synthesis round, seed 0 (or the lowest)."""
    import torch
    import plot_run
    written = []
    for setting, setting_runs in found.items():
        if only and setting != only:
            continue
        for display, short in (("FedF2DG, feature prior (SimpleCNN)", "fedf2dg_features"),
                               ("FedF2DG, BN prior (SimpleCNN-BN)", "fedf2dg_bn"), ("FedHUG", "fedhug")):
            seeds = setting_runs.get(display)
            if not seeds:
                continue
            seed = min(seeds)
            folder = os.path.join(seeds[seed]["dir"], "artifacts")
            files = sorted(os.listdir(folder), key=lambda n: int(re.match(r"round(\d+)", n)[1])) if os.path.isdir(folder) else []
            files = [f for f in files if f.endswith("_server.pt" if short != "fedhug" else "_client0.pt")]
            if not files:
                continue
            artifact = torch.load(os.path.join(folder, files[0]), weights_only=True)["synthetic"]
            round_index = re.match(r"round(\d+)", files[0])[1]
            source = "the server's pseudo images" if short != "fedhug" else "client 0's synthetic samples"
            figure = plot_run.synthetic_grid(artifact, f"{display}\n{setting}, seed {seed}: {source}, round {round_index}")
            written.append(os.path.join(out, f"{short}_{setting}.png"))
            figure.savefig(written[-1], dpi=60)
    return written


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folder")
    parser.add_argument("--pictures", metavar="DIR", help="also write the pseudo-image grids here")
    parser.add_argument("--pictures_of", metavar="SETTING", help="only this setting's grids (e.g. "
                        "fashionmnist_noniid_beta0.05; default: every setting)")
    args = parser.parse_args(argv)
    found = read_runs(args.folder)
    if not found:
        print(f"error: no finished runs under {args.folder} (expected features/, bn/, baselines/ from "
              "docs/fedf2dg/runs.sh)", file=sys.stderr)
        return 2
    for setting, setting_runs in found.items():
        print(f"### {setting}\n\nTest accuracy (%):\n\n{accuracy_table(setting_runs)}\n\n"
              f"Seconds per stage and uploads:\n\n{cost_table(setting_runs)}\n")
    if args.pictures:
        os.makedirs(args.pictures, exist_ok=True)
        print("pictures: " + ", ".join(pictures(found, args.pictures, args.pictures_of)), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
