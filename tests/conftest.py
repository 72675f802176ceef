"""Shared test helpers: the repository root on sys.path, one torch thread, a CLI runner."""
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
torch.set_num_threads(1)


def run_script(script, *args, logdir=None, name="run", timeout=600, env=None):
    """Run `python <script> args...` in the repository root with one thread; returns the
    CompletedProcess (stdout, stderr, returncode)."""
    command = [sys.executable, os.path.join(ROOT, script), *map(str, args)]
    if script != "cvdataset.py":
        command += ["--threads", "1"]
    if logdir is not None:
        command += ["--logdir", str(logdir), "--log_file_name", name]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, **(env or {})))


@pytest.fixture
def cli():
    return run_script
