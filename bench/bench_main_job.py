"""The main job, timed: `bash run.sh` (the seed's table at its setting) from start to table.

    python bench/bench_main_job.py                       # bash run.sh's default profile: 23 min on a 2-core Zen 3
    python bench/bench_main_job.py -- --seeds "0 1 2"    # anything after -- goes to run.sh
    python bench/bench_main_job.py --tiny                # seconds: the same pipeline, tiny (CI)

Runs run.sh into a fresh --logroot (a temporary folder unless given), measures its wall-clock
time, and prints per run the rounds it computed (a warm-started FedHUG computes only its own),
their seconds and seconds a round (from metrics.jsonl), then the whole job against the goal of
30 minutes on this project's 2-core machine. Run it on an otherwise idle machine.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOAL_MINUTES = 30
TINY = {"ROUNDS": "3", "ITERS": "2", "START_ROUND": "2", "G_STEPS": "2", "BUDGET": "16", "N_PARTIES": "3",
        "BETA": "0.5", "ALGORITHMS": "fedavg fedhug"}


def run_summaries(logroot):
    """(setting, run name, rounds computed, their seconds) of every run directory under logroot."""
    rows = []
    for setting in sorted(os.listdir(logroot)):
        runs = os.path.join(logroot, setting, "runs")
        for name in sorted(os.listdir(runs)) if os.path.isdir(runs) else []:
            with open(os.path.join(runs, name, "metrics.jsonl")) as f:
                records = [json.loads(line) for line in f if line.strip()]
            own = [r for r in records if "warm_start_from" not in r]
            rows.append((setting, name, len(own), sum(r["seconds"] for r in own)))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a tiny run of the same pipeline (seconds)")
    parser.add_argument("--logroot", help="where run.sh writes (default: a temporary folder)")
    parser.add_argument("run_sh_args", nargs="*", help="after --: options for run.sh")
    args = parser.parse_args(argv)
    logroot = args.logroot or tempfile.mkdtemp(prefix="main-job-")
    env = dict(os.environ, **(TINY if args.tiny else {}))
    command = ["bash", os.path.join(ROOT, "run.sh"), "--logroot", logroot, "--fresh", *args.run_sh_args]
    print(f"main job: {' '.join(command[1:])}" + (" (tiny: " + ", ".join(f"{k}={v}" for k, v in TINY.items())
                                                   + ")" if args.tiny else ""), flush=True)
    started = time.perf_counter()
    completed = subprocess.run(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    wall = time.perf_counter() - started
    if completed.returncode != 0:
        print(completed.stdout[-4000:])
        print(f"main job: run.sh exited {completed.returncode}")
        return 1
    print(f"{'run':32} {'rounds':>6} {'seconds':>9} {'s/round':>8}")
    for setting, name, rounds, seconds in run_summaries(logroot):
        print(f"{name:32} {rounds:>6} {seconds:>9.1f} {seconds / max(rounds, 1):>8.2f}")
    minutes, rest = divmod(wall, 60)
    verdict = ("a tiny setting, no goal" if args.tiny else
               f"goal {GOAL_MINUTES} min on the 2-core machine: {'met' if wall < GOAL_MINUTES * 60 else 'NOT met'}")
    print(f"main job: wall-clock {int(minutes)} min {rest:.0f} s ({wall:.1f} s); {verdict}")
    print(f"main job: outputs in {logroot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
