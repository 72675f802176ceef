"""Ctrl-C in the middle of FedHUG's synthesis: the run stops cleanly (exit 130, one line), the
last complete checkpoint is intact, and --resume continues as if nothing happened."""
import os
import signal
import subprocess
import sys
import time

import torch

from conftest import ROOT

FLAGS = ["--n_parties", "2", "--num_local_iterations", "2", "--batch_size", "16", "--comm_round", "3",
         "--start_round", "1", "--g_steps", "300", "--synthesis_batch_size", "16", "--threads", "1",
         "--device", "cpu"]


def fedhug(tmp_path, *flags, background=False):
    command = [sys.executable, os.path.join(ROOT, "fedhug.py"), *FLAGS, "--logdir", str(tmp_path), *map(str, flags)]
    if background:      # SIGINT handled as by default even when pytest itself runs in the background (ignored)
        return subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)


def round_lines(stdout):
    return [line for line in stdout.splitlines() if line.startswith((">> ", "fedhug client"))]


def test_ctrl_c_during_synthesis_keeps_the_checkpoint_and_resume_continues_identically(tmp_path):
    straight = fedhug(tmp_path, "--log_file_name", "straight")
    assert straight.returncode == 0, straight.stderr

    process = fedhug(tmp_path, "--log_file_name", "interrupted", background=True)
    log = tmp_path / "interrupted" / "log.txt"
    deadline = time.time() + 300
    while not (log.exists() and ">> Round 1 " in log.read_text()):      # round 1 synthesised; round 2 starts
        assert time.time() < deadline and process.poll() is None, "the run ended before round 1"
        time.sleep(0.02)
    time.sleep(0.3)                                                     # inside round 2's synthesis
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert stderr.strip().splitlines()[-1].startswith("interrupted; the last complete checkpoint is kept")
    assert "Traceback" not in stderr
    checkpoint = torch.load(tmp_path / "interrupted" / "checkpoint.pt", weights_only=True)
    assert checkpoint["round"] == 1                                     # the interrupted round 2 left no trace

    resumed = fedhug(tmp_path, "--resume", tmp_path / "interrupted")
    assert resumed.returncode == 0, resumed.stderr
    assert round_lines(resumed.stdout) == round_lines(straight.stdout)
    assert len([line for line in round_lines(straight.stdout) if line.startswith("fedhug client")]) == 4
