"""Test accuracy against round, one curve per algorithm: the mean over seeds as a line and
the min-max range over seeds as a shaded band; one panel per setting; the last 10 rounds (the
window of the table's stability columns) shaded grey.

    python plot_curves.py log/fashionmnist_noniid_beta0.1 -o curves.png
    python plot_curves.py log/ -o all_settings.png

Reads the same paths as tables.py (folders of *.log files, log files, run directories) and
groups runs the same way (algorithm = file name without _seed<s>, setting = folder).
"""
import argparse
import itertools
import sys

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the Agg backend)
from matplotlib.ticker import MaxNLocator  # noqa: E402
import numpy as np  # noqa: E402

import tables  # noqa: E402


def mean_and_band(runs):
    """Rounds and, per round, mean / min / max accuracy in percent over the runs that logged it."""
    by_round = {}
    for run in runs:
        for round_index, accuracy in zip(run.rounds, run.accuracies):
            by_round.setdefault(round_index, []).append(100.0 * accuracy)
    rounds = sorted(by_round)
    values = [by_round[r] for r in rounds]
    return (np.array(rounds), np.array([np.mean(v) for v in values]),
            np.array([min(v) for v in values]), np.array([max(v) for v in values]))


def plot(comparison, title=None):
    """A figure with one panel per setting and one curve per algorithm."""
    settings = comparison.settings
    columns = min(len(settings), 3)
    rows = -(-len(settings) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(5.5 * columns, 4.0 * rows), squeeze=False)
    for ax in axes.flat[len(settings):]:
        ax.set_visible(False)
    colors = plt.get_cmap("tab10").colors   # one colour per algorithm in every panel
    for ax, setting in zip(axes.flat, settings):
        for algorithm, color in zip(comparison.algorithms, itertools.cycle(colors)):
            runs = comparison.cells.get((setting, algorithm))
            if not runs:
                continue
            rounds, mean, low, high = mean_and_band(runs)
            label = tables.display_name(algorithm) + (f" ({len(runs)} seeds)" if len(runs) > 1 else "")
            ax.plot(rounds, mean, label=label, color=color, linewidth=1.5)
            if len(runs) > 1:
                ax.fill_between(rounds, low, high, color=color, alpha=0.2, linewidth=0)
        last = max((run.rounds[-1] for (s, _), runs in comparison.cells.items() if s == setting for run in runs))
        window_start = max(0, last - tables.LAST_ROUNDS + 1)
        ax.axvspan(window_start - 0.5, last + 0.5, color="0.85", alpha=0.5, linewidth=0, zorder=0,
                   label=f"last {tables.LAST_ROUNDS} rounds (table's stability columns)")
        ax.set_title(setting)
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small", loc="lower right")
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    return figure


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Accuracy-vs-round curves (mean over seeds, min-max band) from federated-learning logs.")
    parser.add_argument("paths", nargs="+", metavar="PATH",
                        help="folders of *.log files, .log files or run directories (as for tables.py)")
    parser.add_argument("-o", "--output", default="curves.png", help="picture to write (default: curves.png)")
    parser.add_argument("--group_by", choices=("folder", "path"), default="folder",
                        help="how a log's setting (panel) is named, as in tables.py")
    parser.add_argument("--title", help="a title above the panels")
    args = parser.parse_args(argv)
    try:
        comparison = tables.Comparison(tables.collect_runs(args.paths, args.group_by))
    except tables.NoLogs as e:
        print(f"error: nothing to plot: {e}", file=sys.stderr)
        return 2
    figure = plot(comparison, args.title)
    try:
        figure.savefig(args.output, dpi=120)
    except OSError as e:
        print(f"error: cannot write {args.output}: {e.strerror}", file=sys.stderr)
        return 2
    print(f"curves: {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
