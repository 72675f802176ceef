"""Nothing lost: a run killed with SIGKILL and resumed equals the uninterrupted run; bad
checkpoints are refused with one line; a diverging loss stops with the checkpoint kept."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT, run_script
import federation

TINY = ["--n_parties", "4", "--num_local_iterations", "8", "--comm_round", "4", "--beta", "0.5",
        "--batch_size", "32"]

# algorithm script -> extra flags (each algorithm with persistent client or server state)
ALGORITHMS = {
    "fedavg.py": ["--server_momentum", "0.9"],
    "moon.py": ["--mu", "0.5"],
    "fedhug.py": ["--start_round", "1", "--g_steps", "3", "--synthesis_batch_size", "16"],
    "scaffold.py": [],
}


def metrics_without_time(run_dir):
    records = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    for record in records:
        record.pop("seconds")
    return records


def kill_after_rounds(command, run_dir, rounds):
    """Start `command`, SIGKILL it once `rounds` rounds are checkpointed."""
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = os.path.join(run_dir, "metrics.jsonl")
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
        if os.path.exists(metrics) and sum(1 for _ in open(metrics)) >= rounds:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    return process.returncode


@pytest.mark.parametrize("script", list(ALGORITHMS))
def test_killed_and_resumed_run_equals_uninterrupted(tmp_path, script):
    flags = TINY + ALGORITHMS[script]
    whole = run_script(script, *flags, logdir=tmp_path, name="whole")
    assert whole.returncode == 0, whole.stderr

    command = [sys.executable, os.path.join(ROOT, script), *flags, "--threads", "1",
               "--logdir", str(tmp_path), "--log_file_name", "killed"]
    assert kill_after_rounds(command, tmp_path / "killed", 2) == -signal.SIGKILL
    resumed = run_script(script, "--resume", tmp_path / "killed", "--threads", "1")
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stderr

    whole_dir, killed_dir = tmp_path / "whole", tmp_path / "killed"
    assert (killed_dir / "log.txt").read_text() == (whole_dir / "log.txt").read_text()
    assert resumed.stdout == whole.stdout          # the resumed stdout replays the whole log
    assert metrics_without_time(killed_dir) == metrics_without_time(whole_dir)
    a = torch.load(whole_dir / "checkpoint.pt", weights_only=True)
    b = torch.load(killed_dir / "checkpoint.pt", weights_only=True)
    assert a["round"] == b["round"] == 3
    for key in a["global_weights"]:
        assert torch.equal(a["global_weights"][key], b["global_weights"][key]), key
    for state_a, state_b in zip(a["client_states"], b["client_states"]):
        assert state_a.keys() == state_b.keys()
        for key in state_a.get("last_model", {}):
            assert torch.equal(state_a["last_model"][key], state_b["last_model"][key])


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("finished")
    result = run_script("fedavg.py", "--n_parties", "3", "--num_local_iterations", "2",
                        "--comm_round", "2", logdir=folder)
    assert result.returncode == 0, result.stderr
    return folder / "run"


def test_truncated_checkpoint_is_refused(finished_run, tmp_path):
    data = (finished_run / "checkpoint.pt").read_bytes()
    broken = tmp_path / "checkpoint.pt"
    broken.write_bytes(data[: len(data) // 2])
    result = run_script("fedavg.py", "--resume", broken)
    assert result.returncode == 2 and "corrupt or truncated" in result.stderr
    assert "Traceback" not in result.stderr


def test_mismatched_checkpoint_names_what_differs(finished_run):
    other_beta = run_script("fedavg.py", "--resume", finished_run, "--beta", "0.3")
    assert other_beta.returncode == 2
    assert "beta: 0.5 in the checkpoint, 0.3 here" in other_beta.stderr
    other_algorithm = run_script("moon.py", "--resume", finished_run)
    assert other_algorithm.returncode == 2 and "is a fedavg run" in other_algorithm.stderr


def test_warm_start_from_another_partition_is_refused(finished_run, tmp_path):
    result = run_script("fedavg.py", "--load_path", finished_run, "--n_parties", "4", logdir=tmp_path)
    assert result.returncode == 2 and "n_parties: 3 in the checkpoint, 4 here" in result.stderr


class DivergesInRound1(federation.FedAvg):
    """FedAvg whose loss turns NaN in round 1 (stands in for a too-large learning rate)."""
    name = "fedavg"

    def local_loss(self, model, x, y, ctx):
        loss = super().local_loss(model, x, y, ctx)
        return loss * float("nan") if ctx.round == 1 else loss


def test_nan_loss_stops_naming_round_and_client_and_keeps_the_checkpoint(tmp_path, capsys):
    argv = ["--n_parties", "3", "--num_local_iterations", "2", "--comm_round", "3", "--threads", "1",
            "--logdir", str(tmp_path), "--log_file_name", "nan"]
    assert federation.main(DivergesInRound1, argv) == 3
    error = capsys.readouterr().err
    assert "round 1, client 0" in error and "last good checkpoint" in error
    checkpoint = torch.load(tmp_path / "nan" / "checkpoint.pt", weights_only=True)
    assert checkpoint["round"] == 0
    assert all(torch.isfinite(v).all() for v in checkpoint["global_weights"].values())
