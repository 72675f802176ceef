"""FedHUG's ablations (issue 18): which of its parts matter, and how many synthesis steps it needs.

    python docs/fedhug_ablations.py                       # 3 seeds at the paper's setting (hours on 2 cores)
    python docs/fedhug_ablations.py --tiny                # the whole pipeline in a minute (CI)
    python docs/fedhug_ablations.py --variants full bf16  # only some variants (FedAvg always runs)

Per seed, one FedAvg run of --rounds rounds keeps its checkpoint after round --start_round - 1
(with every client's last model); every FedHUG variant continues from that checkpoint, so all
variants share their first --start_round rounds exactly (FedHUG is FedAvg before it), and the
FedAvg run's own later rounds are the "no synthesis" row. Variants (flags of fedhug.py):

    full             the published defaults (--g_steps as given)
    no-entropy       --ua_entropy_weight 0    (no push towards the student's uncertainty)
    no-margin        --ua_boundary_lambda 0   (no push towards its decision boundaries)
    plain            both terms 0: plain inversion of the teacher (the baseline FedHUG's
                                               entropy/margin guidance claims to beat)
    fixed-budget     --ua_budget_alpha 0      (every client --synthesis_batch_size samples, whatever its drift)
    bf16             --synthesis_bf16         (full with bf16 autocast in synthesis: does it stay within
                                               the fp32 runs' seed spread?)
    no-synthesis     FedAvg
    steps-G          full with --g_steps G, for every G of --steps (accuracy against synthesis steps)

Writes OUT/runs/<variant>_seed<s>/ (run directories), and into --docs: table.md (per variant, mean
± sample std over seeds of the final-round accuracy, the mean and the std of the last 10 rounds,
seconds a round from --start_round on) and steps.png (final and last-10 accuracy against synthesis steps, 0 =
FedAvg). A finished run is re-read, not re-run; an unfinished one starts over; a finished FedAvg
run without its checkpoint (runs kept as metrics only) is run again when a variant still needs it.
"""
import argparse
import os
import shutil
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from tables import mean_std, read_run_dir  # noqa: E402

VARIANTS = {"full": [], "no-entropy": ["--ua_entropy_weight", "0"], "no-margin": ["--ua_boundary_lambda", "0"],
            "plain": ["--ua_entropy_weight", "0", "--ua_boundary_lambda", "0"],
            "fixed-budget": ["--ua_budget_alpha", "0"], "bf16": ["--synthesis_bf16"]}
LABELS = {"full": "FedHUG (full)", "no-entropy": "no entropy term", "no-margin": "no margin term",
          "plain": "plain inversion (neither term)",
          "fixed-budget": "fixed budget (no drift scaling)", "bf16": "FedHUG (full), bf16 synthesis",
          "no-synthesis": "no synthesis (FedAvg)"}
TINY = dict(seeds=[0], rounds=2, iters=1, start_round=1, g_steps=1, steps=[2], budget=10, n_parties=2)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--rounds", type=int, default=70)
    p.add_argument("--iters", type=int, default=100, help="local iterations a round")
    p.add_argument("--start_round", type=int, default=50)
    p.add_argument("--g_steps", type=int, default=50, help="the full variant's synthesis steps (the main job's)")
    p.add_argument("--steps", type=int, nargs="*", default=[25, 100, 200], help="further --g_steps to run")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS),
                   help="which FedHUG variants to run (default: all; FedAvg always runs)")
    p.add_argument("--budget", type=int, default=256, help="--synthesis_batch_size")
    p.add_argument("--n_parties", type=int, default=10)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--jobs", type=int, default=2, help="runs at a time (one CPU thread each)")
    p.add_argument("--out", default=os.path.join(ROOT, "log", "fedhug-ablations"))
    p.add_argument("--docs", default=None, help="where table.md and steps.png go (default: OUT)")
    p.add_argument("--tiny", action="store_true", help="a minute-long run of the whole pipeline")
    args = p.parse_args(argv)
    if args.tiny:
        for key, value in TINY.items():
            setattr(args, key, value)
    if not 0 < args.start_round < args.rounds:
        p.error(f"--start_round must be in 1..{args.rounds - 1} (got {args.start_round})")
    args.docs = args.docs or args.out
    return args


def finished(args, name):
    """Whether OUT/runs/<name> holds a run whose metrics reach the last round."""
    run_dir = os.path.join(args.out, "runs", name)
    curve = read_run_dir(run_dir, "") if os.path.isfile(os.path.join(run_dir, "metrics.jsonl")) else None
    return curve is not None and bool(curve.rounds) and curve.rounds[-1] == args.rounds - 1


def snapshot_path(args, seed):
    """FedAvg's checkpoint after round start_round - 1, which every FedHUG variant continues from."""
    return os.path.join(args.out, "runs", f"no-synthesis_seed{seed}", f"checkpoint_round{args.start_round - 1}.pt")


def run(args, script, name, seed, flags, needs=None):
    """One run into OUT/runs/<name>; skipped when it has finished before (and the file `needs`,
    if given, exists: a FedAvg run kept without its checkpoint is run again for it)."""
    run_dir = os.path.join(args.out, "runs", name)
    if finished(args, name) and (needs is None or os.path.isfile(needs)):
        return name, "finished before"
    shutil.rmtree(run_dir, ignore_errors=True)
    command = [sys.executable, os.path.join(ROOT, script), "--dataset", "fashionmnist", "--partition", "noniid",
               "--beta", str(args.beta), "--n_parties", str(args.n_parties), "--sample_fraction", "1.0",
               "--num_local_iterations", str(args.iters), "--comm_round", str(args.rounds), "--init_seed", str(seed),
               "--threads", "1", "--logdir", os.path.join(args.out, "runs"), "--log_file_name", name, *flags]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"error: {name} failed: {result.stderr.strip().splitlines()[-1:]}")
    return name, "done"


def fedhug_runs(args, seed):
    common = ["--start_round", str(args.start_round), "--synthesis_batch_size", str(args.budget),
              "--load_path", snapshot_path(args, seed)]
    runs = {f"{variant}_seed{seed}": [*common, "--g_steps", str(args.g_steps), *flags]
            for variant, flags in VARIANTS.items() if variant in args.variants}
    runs.update({f"steps-{g}_seed{seed}": [*common, "--g_steps", str(g)] for g in args.steps if g != args.g_steps})
    return runs


def cell(values, digits=2):
    return mean_std(values, digits) if values else "n/a"


def collect(args, variant):
    """(final, last-10 mean, last-10 std, seconds of a FedHUG round) per seed, in percent."""
    rows = []
    for seed in args.seeds:
        curve = read_run_dir(os.path.join(args.out, "runs", f"{variant}_seed{seed}"), "")
        own = [r["seconds"] for r in curve.records if r["round"] >= args.start_round and "warm_start_from" not in r]
        rows.append((100 * curve.final, 100 * curve.last_mean, 100 * curve.last_std,
                     statistics.fmean(own) if own else None))
    return rows


def write_table(args):
    variants = [v for v in VARIANTS if v in args.variants] + ["no-synthesis"]
    steps = sorted({args.g_steps, *args.steps})
    lines = [f"FedHUG ablations: Fashion-MNIST Dir({args.beta:g}), {args.n_parties} clients, {args.rounds} rounds of "
             f"{args.iters} local iterations, FedHUG from round {args.start_round} (budget {args.budget}), seeds "
             f"{', '.join(map(str, args.seeds))}; mean ± sample std over seeds, accuracy in %.", "",
             "| variant | synthesis steps | final | last-10 mean | last-10 std | s / round from the start round |",
             "|---|---:|---:|---:|---:|---:|"]
    points = {}
    for variant in variants + [f"steps-{g}" for g in steps if g != args.g_steps]:
        rows = collect(args, variant)
        g = 0 if variant == "no-synthesis" else int(variant.split("-")[1]) if variant.startswith("steps-") \
            else args.g_steps
        if variant in ("full", "no-synthesis") or variant.startswith("steps-"):
            points[g] = rows
        seconds = [r[3] for r in rows if r[3] is not None]
        lines.append(f"| {LABELS.get(variant, f'FedHUG, {g} steps')} | {g} | {cell([r[0] for r in rows])} | "
                     f"{cell([r[1] for r in rows])} | {cell([r[2] for r in rows])} | "
                     f"{cell(seconds, 1) if seconds else 'n/a'} |")
    lines += ["", "last-10: the last 10 rounds' accuracy (mean, and sample std: the round-to-round swing) of each "
              "run, then mean ± std over seeds; final: the last round's. No number here was used to choose another."]
    os.makedirs(args.docs, exist_ok=True)
    with open(os.path.join(args.docs, "table.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    plot_steps(points, os.path.join(args.docs, "steps.png"))


def plot_steps(points, path):
    """steps.png from {steps: per-seed rows of collect()}: mean ± std over seeds."""
    def mean_and_spread(values):
        return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0
    draw_steps({g: tuple(mean_and_spread([r[index] for r in rows]) for index in (0, 1)) for g, rows in points.items()},
               path)


def draw_steps(summary, path, log_beyond=None):
    """Final and last-10 accuracy against synthesis steps, with error bars: summary = {steps:
    ((final mean, std), (last-10 mean, std))}; log_beyond: a logarithmic steps axis beyond it."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    steps = sorted(summary)
    figure, ax = plt.subplots(figsize=(6, 4))
    for index, label in ((0, "final round"), (1, "mean of the last 10 rounds")):
        ax.errorbar(steps, [summary[g][index][0] for g in steps], yerr=[summary[g][index][1] for g in steps],
                    marker="o", capsize=3, label=label)
    if log_beyond:
        ax.set_xscale("symlog", linthresh=log_beyond)
        ax.set_xticks(steps)
        ax.set_xticklabels([str(g) for g in steps])
    ax.set_xlabel("synthesis steps (--g_steps; 0 = FedAvg)")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def main(argv=None):
    args = parse_args(argv)
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        # every FedAvg run first; a seed's FedHUG variants are queued as soon as its FedAvg run has
        # finished (behind the FedAvg runs still queued), so no core waits for a later seed
        fedavg = {}
        for s in args.seeds:
            pending = [name for name in fedhug_runs(args, s) if not finished(args, name)]
            fedavg[s] = pool.submit(run, args, "fedavg.py", f"no-synthesis_seed{s}", s,
                                    ["--keep_client_models", "--snapshot_rounds", str(args.start_round - 1)],
                                    needs=snapshot_path(args, s) if pending else None)
        fedhug = []
        for s in args.seeds:
            print(*fedavg[s].result(), flush=True)
            fedhug += [pool.submit(run, args, "fedhug.py", name, s, flags) for name, flags in fedhug_runs(args, s).items()]
        for future in fedhug:
            print(*future.result(), flush=True)
    write_table(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
