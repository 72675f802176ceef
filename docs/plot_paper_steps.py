"""Draws docs/fedhug-ablations/paper-steps.png from the main-setting table of docs/fedhug-ablations.md:
final and last-10 accuracy (mean ± std over seeds) against FedHUG's synthesis steps, 0 = FedAvg.

    python docs/plot_paper_steps.py

That table gathers rows from several runs of docs/fedhug_ablations.py (each appends its own
steps.png for the rows it ran), so this plot is drawn from the table's text, not from run folders.
"""
import os
import re

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
NUMBER = r"(\d+\.\d+) ± (\d+\.\d+)"
# | FedHUG | 500 (the paper's) | 77.15 ± 0.50 | 77.44 ± 0.63 | ... and | no synthesis (FedAvg) | 0 | ...
ROW = re.compile(rf"^\| (?:FedHUG|no synthesis \(FedAvg\)) \| (\d+)[^|]* \| {NUMBER} \| {NUMBER} \|")


def steps_rows(markdown):
    """{steps: ((final mean, std), (last-10 mean, std))} of the first table (the main setting)."""
    section = markdown.split("## A first, shortened run")[0]
    rows = {}
    for line in section.splitlines():
        match = ROW.match(line)
        if match:
            steps, final, final_std, last, last_std = match.groups()
            rows[int(steps)] = ((float(final), float(final_std)), (float(last), float(last_std)))
    return rows


def main():
    with open(os.path.join(HERE, "fedhug-ablations.md")) as f:
        rows = steps_rows(f.read())
    steps = sorted(rows)
    figure, ax = plt.subplots(figsize=(6, 4))
    for index, label in ((0, "final round"), (1, "mean of the last 10 rounds")):
        ax.errorbar(steps, [rows[g][index][0] for g in steps], yerr=[rows[g][index][1] for g in steps],
                    marker="o", capsize=3, label=label)
    ax.set_xscale("symlog", linthresh=25)
    ax.set_xticks(steps)
    ax.set_xticklabels([str(g) for g in steps])
    ax.set_xlabel("synthesis steps (--g_steps; 0 = FedAvg)")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend()
    figure.tight_layout()
    path = os.path.join(HERE, "fedhug-ablations", "paper-steps.png")
    figure.savefig(path, dpi=100)
    print(f"{path}: steps {steps}")


if __name__ == "__main__":
    main()
