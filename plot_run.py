"""Pictures of one run's inside, from its run directory:

    synthetic.png     FedHUG: the synthetic samples of one client and round, a row per class
                      (artifacts/round<r>_client<k>.pt, saved at --start_round and the last round);
                      FedF2DG: the server's pseudo images of one round (artifacts/round<r>_server.pt,
                      saved at the distillation round and the last round)
    drift_budget.png  FedHUG: every client's drift and synthesis budget per round
                      (metrics.jsonl's client_metrics)

    python plot_run.py log/fashionmnist_noniid_beta0.1/runs/fedhug_seed0
    python plot_run.py RUN_DIR --round 50 --client 3

(The partition heatmap, partition.svg, is written by every run itself.)
"""
import argparse
import json
import os
import re
import sys

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the Agg backend)
import torch  # noqa: E402

ARTIFACT = re.compile(r"^round(\d+)_(?:client(\d+)|server)\.pt$")
SERVER = -1          # the "client" of the server's artifacts


def synthetic_grid(artifact, title):
    """Rows = classes, columns = that class's samples, each image min-max scaled on its own (an
    inverted input is not in the data's range)."""
    inputs, targets = artifact["inputs"].float(), artifact["targets"]
    classes = sorted(set(targets.tolist()))
    columns = max(int((targets == c).sum()) for c in classes)
    figure, axes = plt.subplots(len(classes), columns, figsize=(max(6.0, 1.1 * columns), 1.1 * len(classes)),
                             squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for row, c in enumerate(classes):
        for column, image in enumerate(inputs[targets == c]):
            image = image.permute(1, 2, 0)
            image = (image - image.min()) / (image.max() - image.min() + 1e-12)
            axes[row, column].imshow(image.squeeze(-1) if image.shape[-1] == 1 else image, cmap="gray")
        axes[row, 0].text(-4, inputs.shape[-2] / 2, str(c), ha="right", va="center")
    figure.suptitle(title)
    figure.tight_layout()
    return figure


def drift_budget_plot(records, title):
    """Two panels: each client's drift and budget against the round."""
    series = {}
    for record in records:
        for client, values in (record.get("client_metrics") or {}).items():
            for key in ("drift", "budget"):
                if key in values:
                    series.setdefault(key, {}).setdefault(int(client), []).append((record["round"], values[key]))
    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, label in zip(axes, ("drift", "budget"), ("drift ||net - global|| / ||global||",
                                                          "synthesis budget (samples)")):
        for client, points in sorted(series.get(key, {}).items()):
            rounds, values = zip(*points)
            ax.plot(rounds, values, marker=".", linewidth=1, label=f"client {client}")
        ax.set_xlabel("round")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize="x-small", ncol=2)
    figure.suptitle(title)
    figure.tight_layout()
    return figure


DIAGNOSTICS = (("student_entropy", "student's entropy on them"), ("student_margin", "student's top-1/top-2 margin"),
               ("teacher_agreement", "teacher predicts the target"))


def diagnostics_plot(records, title):
    """Three panels (FedHUG's synthesis diagnostics): per round, the mean over clients of the
    student's entropy and margin on the synthetic samples and the teacher's agreement with their
    targets; beside them the same on plain inversion (--plain_inversion_samples), when recorded."""
    figure, axes = plt.subplots(1, 3, figsize=(14, 4))
    for ax, (key, label) in zip(axes, DIAGNOSTICS):
        for prefix, name in (("", "FedHUG's inversion"), ("plain_", "plain inversion")):
            points = [(r["round"], sum(v[prefix + key] for v in clients) / len(clients)) for r in records
                      if (clients := [v for v in (r.get("client_metrics") or {}).values() if prefix + key in v])]
            if points:
                ax.plot(*zip(*points), marker=".", linewidth=1, label=name)
        ax.set_xlabel("round")
        ax.set_ylabel(f"{label} (mean over clients)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    figure.suptitle(title)
    figure.tight_layout()
    return figure


def owner(client):
    return "the server" if client == SERVER else f"client {client}"


def main(argv=None):
    parser = argparse.ArgumentParser(description="Pictures of one run's inside (FedHUG's synthetic samples, "
                                     "drift and budget) from its run directory.")
    parser.add_argument("run_dir")
    parser.add_argument("--round", type=int, help="the round of the synthetic samples (default: the last saved)")
    parser.add_argument("--client", type=int, help="the client of the synthetic samples (default: the lowest)")
    args = parser.parse_args(argv)
    metrics = os.path.join(args.run_dir, "metrics.jsonl")
    if not os.path.isfile(metrics):
        print(f"error: {args.run_dir} is not a run directory (no metrics.jsonl)", file=sys.stderr)
        return 2
    with open(metrics) as f:
        records = [json.loads(line) for line in f if line.strip()]
    name = os.path.basename(os.path.normpath(args.run_dir))
    written = []
    folder = os.path.join(args.run_dir, "artifacts")
    saved = sorted((int(m[1]), int(m[2]) if m[2] else SERVER, m[0])
                   for m in map(ARTIFACT.match, sorted(os.listdir(folder))) if m) if os.path.isdir(folder) else []
    chosen = [s for s in saved if (args.round is None or s[0] == args.round)
              and (args.client is None or s[1] == args.client)]
    if (args.round is not None or args.client is not None) and not chosen:
        print(f"error: no synthetic samples saved for round {args.round}, client {args.client} in {folder} "
              f"(saved: {', '.join(f'round {r} {owner(k)}' for r, k, _ in saved) or 'none'})", file=sys.stderr)
        return 2
    if chosen:
        last_round = max(r for r, _, _ in chosen)
        round_index, client, file = min(s for s in chosen if s[0] == last_round)
        artifact = torch.load(os.path.join(folder, file), weights_only=True)["synthetic"]
        figure = synthetic_grid(artifact, f"{name}: synthetic samples of {owner(client)}, round {round_index}")
        written.append(os.path.join(args.run_dir, "synthetic.png"))
        figure.savefig(written[-1], dpi=100)
    if any(r.get("client_metrics") for r in records):
        figure = drift_budget_plot(records, f"{name}: drift and synthesis budget per client")
        written.append(os.path.join(args.run_dir, "drift_budget.png"))
        figure.savefig(written[-1], dpi=100)
    if any("student_entropy" in v for r in records for v in (r.get("client_metrics") or {}).values()):
        figure = diagnostics_plot(records, f"{name}: what synthesis makes (mean over clients)")
        written.append(os.path.join(args.run_dir, "synthesis_diagnostics.png"))
        figure.savefig(written[-1], dpi=100)
    print(f"plot_run: {', '.join(written) if written else 'nothing to draw for ' + name}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
