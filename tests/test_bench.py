"""The benchmarks in bench/ still run against the engine: each at its --tiny setting (seconds),
as a subprocess, must exit 0 and print its ratio lines. Nothing here asserts a speed."""
import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT

NUMBER = r"\d+\.\d+"
RATIO = rf"{NUMBER}x"

# script, its tiny command line, the lines (regexes, matched against whole lines of stdout) it must print
BENCHMARKS = {
    "engine": ("bench/bench_engine.py", ["--tiny"], [
        rf"\s*1 reference-style\s+{NUMBER}\s+1\.00x\s+{RATIO}",
        rf"\s*1 engine\s+{NUMBER}\s+{RATIO}\s+{RATIO}",
        rf"\s*1 floor\s+{NUMBER}\s+{RATIO}\s+1\.00x",
    ]),
    "fedhug": ("bench/bench_fedhug.py", ["--tiny"], [
        rf"FedHUG round: 2 clients, 2 synthesis steps, budget 16 \(\d+ samples synthesised\).*",
        rf"reference-style\s+{NUMBER}\s+{NUMBER}\s+{NUMBER}\s+1\.00x\s+{NUMBER}",
        rf"this\s+{NUMBER}\s+{NUMBER}\s+{NUMBER}\s+{RATIO}\s+{NUMBER}",
        rf"this, bf16 \(other numbers\)\s+{NUMBER}\s+{NUMBER}\s+{NUMBER}\s+{RATIO}\s+{NUMBER}",
        rf"this, bf16, no C kernels\s+{NUMBER}\s+{NUMBER}\s+{NUMBER}\s+{RATIO}\s+{NUMBER}",
        r"client 0's bf16 synthetic inputs, with vs without the C code: max \|difference\| 0\.00e\+00",
        rf"synthesis floor at the matmul rate: {NUMBER} s; this implementation: {NUMBER} s \(.*% of the floor's rate\)",
        r"client 0's synthetic inputs, reference-style vs this: max \|difference\| .*",
        r"one teacher pass over 2 clients' inputs: identical to each alone: (True|False) .* -> .*",
    ]),
    "kernels": ("bench/bench_kernels.py", ["--tiny"], [
        r"batch 8 \(bfloat16 rows: 8\), 1 thread\(s\), medians of 1 interleaved repeats of 1 calls",
        *(rf"{re.escape(name)}\s+{NUMBER}\s+{NUMBER}\s+{RATIO}" for name in (
            "conv1 forward", "conv2 input grad", "relu+pool after conv1", "relu+pool after conv2, bfloat16",
            "augmentation of 8 images")),
    ]),
    "parallel": ("bench/bench_parallel.py", ["--tiny", "--no_ray"], [
        rf"10 clients' local_model state \(.*\): tensors {NUMBER} MiB, RSS growth -?{NUMBER} MiB, "
        rf"in a checkpoint {NUMBER} MiB",
        rf"\s+one task to a worker .*: \d+ KiB; pickled and unpickled in .*\(parallel\.dumps\)",
        r"2 clients x 2 iterations a round, median of 1 round\(s\)",
        rf"\s+serial, 2 threads\s+{NUMBER} s a round\s+1\.00x",
        rf"\s+serial, 1 thread\s+{NUMBER} s a round\s+{RATIO}",
        rf"\s+2 workers x 1 thread\s+{NUMBER} s a round\s+{RATIO}\s+\(start-up {NUMBER} s\)",
        rf"\s+aim: 2 one-thread workers >= 1\.3x the 2-thread serial process: {RATIO}, (met|NOT met)",
    ]),
}


@pytest.mark.parametrize("name", list(BENCHMARKS))
def test_benchmark_runs_at_its_tiny_setting(name):
    script, flags, expected = BENCHMARKS[name]
    completed = subprocess.run([sys.executable, os.path.join(ROOT, script), *flags], cwd=ROOT,
                               capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, (f"{script} {' '.join(flags)} exited {completed.returncode}\n"
                                       f"stdout:\n{completed.stdout}\nstderr:\n{completed.stderr[-4000:]}")
    lines = completed.stdout.splitlines()
    missing = [pattern for pattern in expected if not any(re.fullmatch(pattern, line) for line in lines)]
    assert not missing, f"{script} {' '.join(flags)} printed no line matching {missing}; stdout:\n{completed.stdout}"
