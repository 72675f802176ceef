"""Nothing lost: a run killed with SIGKILL and resumed equals the uninterrupted run; bad
checkpoints are refused with one line; a diverging loss stops with the checkpoint kept."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import engine
from conftest import ROOT, assert_same_tensors, run_script
from engine.jobs import PAUSE_FILE, PAUSED_EXIT
from fedavg import FedAvg

TINY = ["--n_parties", "4", "--num_local_iterations", "8", "--comm_round", "4", "--beta", "0.5",
        "--batch_size", "32"]

# algorithm script -> extra flags (each algorithm with persistent client or server state)
ALGORITHMS = {
    "fedavg.py": ["--server_momentum", "0.9"],
    "moon.py": ["--mu", "0.5"],
    "fedhug.py": ["--start_round", "1", "--g_steps", "3", "--synthesis_batch_size", "16"],
    "scaffold.py": [],
    # killed after the distillation round (round 1): the resumed run crosses into the Rcompete rounds
    "fedf2dg.py": ["--pretrain_rounds", "1", "--iters_mi", "4", "--inversion_batch_size", "8", "--num_batch", "1",
                   "--kd_epochs", "1", "--validation_size", "200"],
}
# algorithm script -> (keys of its server state, keys of every client's state) in a checkpoint
STATE_KEYS = {
    "fedavg.py": ({"weights", "velocity"}, None),      # FedAvgM keeps no client state
    "moon.py": ({"weights"}, {"local_model"}),
    "fedhug.py": ({"weights"}, {"local_model"}),
    "scaffold.py": ({"weights", "control"}, {"control"}),
    "fedf2dg.py": ({"weights", "control", "next_round", "client_models", "feature_statistics", "best", "teachers",
                    "teacher_statistics", "student_losses", "class_counts"}, {"control"}),
}


def one_error(result, message):
    """Exit status 2, one `error:` line holding `message`, no traceback."""
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    return (result.returncode == 2 and len(errors) == 1 and message in errors[0]
            and "Traceback" not in result.stderr)


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
    assert a["format"] == b["format"] == 2
    assert a["round"] == b["round"] == 3
    server_keys, client_keys = STATE_KEYS[script]
    assert set(a["server_state"]) == server_keys
    if client_keys is None:
        assert a["client_states"] == {}
    else:
        assert sorted(a["client_states"]) == [0, 1, 2, 3]
        assert all(set(state) == client_keys for state in a["client_states"].values())
    for key in ("server_state", "client_states", "best_acc", "log_lines", "metrics_records"):
        assert_same_tensors(a[key], b[key], key)
    assert a["log_lines"] == len((whole_dir / "log.txt").read_text().splitlines()) - 1   # all but the Final line
    assert a["metrics_records"] == 4


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
    assert one_error(result, "corrupt or truncated"), result.stderr
    missing = run_script("fedavg.py", "--resume", tmp_path / "nothing_here")
    assert one_error(missing, "no checkpoint at"), missing.stderr


def test_old_format_checkpoint_is_refused(finished_run, tmp_path):
    """A checkpoint written before the engine's reshaping (no format, flat global_weights, a
    list of client states) is refused for --resume and --load_path, with what to do instead."""
    new = torch.load(finished_run / "checkpoint.pt", weights_only=True)
    old_dir = tmp_path / "old"
    old_dir.mkdir()
    torch.save({"config": new["config"], "round": new["round"], "global_weights": new["server_state"]["weights"],
                "server_state": {}, "client_states": [{} for _ in range(3)], "best_acc": new["best_acc"],
                "log_lines": [], "metrics": []}, old_dir / "checkpoint.pt")
    for flag in ("--resume", "--load_path"):
        result = run_script("fedavg.py", flag, old_dir, "--n_parties", "3", logdir=tmp_path, name="again")
        assert one_error(result, "checkpoint format None"), (flag, result.stderr)
        assert "cannot be resumed" in result.stderr and "--load_path" in result.stderr


def test_warm_start_from_a_bare_global_model(finished_run, tmp_path):
    """--load_path also takes a state dict (an old run's global_model.pt)."""
    weights = torch.load(finished_run / "checkpoint.pt", weights_only=True)["server_state"]["weights"]
    torch.save(weights, tmp_path / "global_model.pt")
    result = run_script("fedavg.py", "--load_path", tmp_path / "global_model.pt", "--n_parties", "3",
                        "--num_local_iterations", "2", "--comm_round", "1", logdir=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "warm start: global model from global_model.pt" in result.stdout


def test_resume_with_an_incomplete_run_directory_is_refused(finished_run, tmp_path):
    """The checkpoint counts the log lines and metrics records; a run directory holding fewer
    (log.txt cut short) cannot be resumed."""
    copy = tmp_path / "copy"
    shutil.copytree(finished_run, copy)
    lines = (copy / "log.txt").read_text().splitlines()
    (copy / "log.txt").write_text("\n".join(lines[:3]) + "\n")
    result = run_script("fedavg.py", "--resume", copy, "--comm_round", "3")
    assert one_error(result, "the run directory is incomplete"), result.stderr


def test_mismatched_checkpoint_names_what_differs(finished_run):
    other_beta = run_script("fedavg.py", "--resume", finished_run, "--beta", "0.3")
    assert other_beta.returncode == 2
    assert "beta: 0.5 in the checkpoint, 0.3 here" in other_beta.stderr
    other_algorithm = run_script("moon.py", "--resume", finished_run)
    assert one_error(other_algorithm, "is a fedavg run"), other_algorithm.stderr


def test_warm_start_from_another_partition_is_refused(finished_run, tmp_path):
    result = run_script("fedavg.py", "--load_path", finished_run, "--n_parties", "4", logdir=tmp_path)
    assert one_error(result, "n_parties: 3 in the checkpoint, 4 here"), result.stderr


class DivergesInRound1(FedAvg):
    """FedAvg whose loss turns NaN in round 1 (stands in for a too-large learning rate)."""
    name = "fedavg"

    def local_loss(self, model, x, y, ctx):
        loss = super().local_loss(model, x, y, ctx)
        return loss * float("nan") if ctx.round == 1 else loss


def test_nan_loss_stops_naming_round_and_client_and_keeps_the_checkpoint(tmp_path, capsys):
    argv = ["--n_parties", "3", "--num_local_iterations", "2", "--comm_round", "3", "--threads", "1",
            "--logdir", str(tmp_path), "--log_file_name", "nan"]
    assert engine.main(DivergesInRound1, argv) == 3
    error = capsys.readouterr().err
    assert "round 1, client 0" in error and "last good checkpoint" in error
    checkpoint = torch.load(tmp_path / "nan" / "checkpoint.pt", weights_only=True)
    assert checkpoint["round"] == 0 and checkpoint["metrics_records"] == 1
    assert all(torch.isfinite(v).all() for v in checkpoint["server_state"]["weights"].values())


@pytest.mark.parametrize("script", ["fedavg.py", "fedhug.py"])
def test_a_paused_run_continued_with_two_workers_equals_the_uninterrupted_one(tmp_path, script):
    """run.sh's scheduler widens a run by a file PAUSE_FILE in its run directory: the run stops
    after the round in progress with exit PAUSED_EXIT and its checkpoint, removes the file, and
    --resume with --workers 2 ends exactly as the serial run that never stopped (--no_replay:
    printing only the lines after the kept ones, as run.sh's log of it holds those already)."""
    flags = TINY + ALGORITHMS[script]
    whole = run_script(script, *flags, logdir=tmp_path, name="whole")
    assert whole.returncode == 0, whole.stderr

    paused_dir = tmp_path / "paused"
    paused_dir.mkdir()
    (paused_dir / PAUSE_FILE).touch()              # asked before round 0 ends: it stops after round 0
    paused = run_script(script, *flags, logdir=tmp_path, name="paused")
    assert paused.returncode == PAUSED_EXIT, paused.stderr
    assert "paused after round 0; continue with --resume" in paused.stderr
    assert not (paused_dir / PAUSE_FILE).exists()
    assert torch.load(paused_dir / "checkpoint.pt", weights_only=True)["round"] == 0
    assert len(metrics_without_time(paused_dir)) == 1

    kept = len((paused_dir / "log.txt").read_text().splitlines())
    continued = run_script(script, "--resume", paused_dir, "--workers", "2", "--no_replay")
    assert continued.returncode == 0, continued.stderr
    assert continued.stdout.splitlines() == whole.stdout.splitlines()[kept:]
    assert (paused_dir / "log.txt").read_text() == (tmp_path / "whole" / "log.txt").read_text()
    assert metrics_without_time(paused_dir) == metrics_without_time(tmp_path / "whole")


def test_a_pause_file_left_at_the_last_round_does_not_stop_the_run(tmp_path):
    """The last round has nothing to continue: the run ends as usual, its final line written."""
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / PAUSE_FILE).touch()
    result = run_script("fedavg.py", "--n_parties", "2", "--num_local_iterations", "2", "--comm_round", "1",
                        logdir=tmp_path)
    assert result.returncode == 0, result.stderr
    assert ">> Final Acc" in (tmp_path / "run" / "log.txt").read_text()
