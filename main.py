"""Run any algorithm of the suite by name.

    python main.py --algorithm fedavgm --dataset fashionmnist --partition noniid --beta 0.1
    python main.py --list                      # every algorithm, its script and its own flags
    python main.py --algorithm moon --help     # the flags of one algorithm

The per-algorithm scripts (fedavg.py, fedhug.py, ...) are the same entry point with the
algorithm fixed, so the seed's command lines run verbatim.
"""
import sys

from engine import main, registry


def run(argv):
    if "--list" in argv:
        print(registry.describe())
        return 0
    names = [a.split("=", 1)[1] for a in argv if a.startswith("--algorithm=")]
    if "--algorithm" in argv:
        position = argv.index("--algorithm")
        names = argv[position + 1: position + 2]
        argv = argv[:position] + argv[position + 2:]
    argv = [a for a in argv if not a.startswith("--algorithm=")]
    if not names:
        print("usage: python main.py --algorithm NAME [flags]   (python main.py --list shows the names)",
              file=sys.stderr)
        return 0 if "--help" in argv or "-h" in argv else 2
    return main(names[0], argv)


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
