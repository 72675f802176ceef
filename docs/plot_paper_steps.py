"""Draws docs/fedhug-ablations/paper-steps.png from the main-setting table of docs/fedhug-ablations.md:
final and last-10 accuracy (mean ± std over seeds) against FedHUG's synthesis steps, 0 = FedAvg.

    python docs/plot_paper_steps.py

That table gathers rows from several runs of docs/fedhug_ablations.py (each writes its own
steps.png for the rows it ran), so this plot is drawn from the table's text, not from run folders.
"""
import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from fedhug_ablations import draw_steps  # noqa: E402

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
    path = os.path.join(HERE, "fedhug-ablations", "paper-steps.png")
    draw_steps(rows, path, log_beyond=25)
    print(f"{path}: steps {sorted(rows)}")


if __name__ == "__main__":
    main()
