"""Clients in worker processes and on Ray give exactly the serial run; sweep.py's grid and layout.

Tiny runs (4 clients, 2 rounds, 5 local iterations); the serial run of each algorithm is made
once and compared bit for bit (log.txt, global weights, server and client states). Runs with
--workers go through `engine.main` in this process (no torch import per run); the Ray run
and the sweep are real subprocesses."""
import argparse
import importlib.util
import json
import os
import pickle
import sys
import time

import pytest
import torch

import engine
import sweep
from conftest import ROOT, algorithm_args, assert_same_tensors, run_script
from engine import TrainingDiverged, parallel, registry
from engine.executors import build_client_side, run_client
from engine.loop import initial_weights
from fedavg import FedAvg
from models import client_architectures
from utils import UsageError

TINY = ["--n_parties", "4", "--comm_round", "2", "--num_local_iterations", "5"]
# name -> (script, flags); MOON is the algorithm whose training reads its client state
ALGORITHMS = {"fedavg": ("fedavg.py", []),
              "fedavgm": ("fedavg.py", ["--server_momentum", "0.9"]),
              "moon": ("moon.py", ["--mu", "1.0"])}


def algorithm_class(name):
    """The class the algorithm's script runs (skips the test while the script does not exist)."""
    script = ALGORITHMS[name][0]
    if not os.path.isfile(os.path.join(ROOT, script)):
        pytest.skip(f"{script} does not exist yet: {name} is not covered")
    if script == "fedavg.py":
        return FedAvg
    import moon
    return moon.MOON


def run(name, logdir, *extra):
    """One tiny run through the entry point in this process; returns its run directory."""
    script, flags = ALGORITHMS[name]
    argv = [*flags, *TINY, "--threads", "1", "--logdir", str(logdir), "--log_file_name", name, *extra]
    assert engine.main(algorithm_class(name), argv) == 0
    return os.path.join(logdir, name)


def run_subprocess(name, logdir, *extra):
    script, flags = ALGORITHMS[name]
    done = run_script(script, *flags, *TINY, *extra, logdir=logdir, name=name)
    assert done.returncode == 0, done.stderr
    return os.path.join(logdir, name)


@pytest.fixture(scope="module")
def serial_run(tmp_path_factory):
    """serial_run(name) -> the run directory of the algorithm's serial run (made once)."""
    made = {}

    def get(name):
        if name not in made:
            made[name] = run(name, tmp_path_factory.mktemp("serial"))
        return made[name]
    return get


def metrics_without_time(run_dir):
    records = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    for record in records:
        record.pop("seconds")
    return records


def assert_same_run(serial_dir, other_dir):
    with open(os.path.join(serial_dir, "log.txt")) as f:
        serial_log = f.read()
    with open(os.path.join(other_dir, "log.txt")) as f:
        assert f.read() == serial_log
    assert ">> Round 1 | Current Acc:" in serial_log
    assert metrics_without_time(other_dir) == metrics_without_time(serial_dir)
    serial = torch.load(os.path.join(serial_dir, "checkpoint.pt"), weights_only=True)
    other = torch.load(os.path.join(other_dir, "checkpoint.pt"), weights_only=True)
    for key in ("round", "server_state", "client_states", "best_acc", "log_lines", "metrics_records"):
        assert_same_tensors(serial[key], other[key], key)
    # the states compared are those each algorithm keeps: MOON every client's last local model
    if serial["config"]["algorithm"] == "moon":
        assert sorted(serial["client_states"]) == [0, 1, 2, 3]
        assert all("local_model" in state for state in serial["client_states"].values())
    else:
        assert serial["client_states"] == {}
    if serial["config"]["server_momentum"] > 0:
        assert "velocity" in serial["server_state"]


@pytest.mark.parametrize("name", list(ALGORITHMS))
def test_two_workers_give_the_serial_run(name, serial_run, tmp_path):
    assert_same_run(serial_run(name), run(name, tmp_path, "--workers", "2"))


def test_ray_gives_the_serial_run(serial_run, tmp_path):
    if importlib.util.find_spec("ray") is None:
        pytest.skip("Ray is not installed (pip install -r requirements-ray.txt): the Ray backend is not tested")
    name = "moon" if os.path.isfile(os.path.join(ROOT, "moon.py")) else "fedavgm"
    # the command line starts a local Ray with 2 CPUs (ray.init(num_cpus=2)) and shuts it down
    assert_same_run(serial_run(name), run_subprocess(name, tmp_path, "--backend", "ray", "--workers", "2"))


def test_ray_missing_is_a_usage_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)     # `import ray` raises ImportError
    with pytest.raises(UsageError, match=r"--backend ray needs Ray: pip install -r requirements-ray.txt"):
        parallel.RayExecutor(None, 2, None)


def test_tasks_travel_exactly():
    """parallel.dumps (numpy buffers for plain contiguous tensors, torch's pickling for the
    rest) gives back the same values, dtypes and strides."""
    tensors = {"float": torch.randn(3, 4), "long": torch.arange(5), "scalar": torch.tensor(2.5),
               "bool": torch.tensor([True, False]), "bfloat16": torch.randn(5).bfloat16(),
               "transposed": torch.randn(3, 4).t(),
               "channels_last": torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last)}
    back = pickle.loads(parallel.dumps({"weights": tensors, "round": 3}))
    assert back["round"] == 3
    for key, tensor in tensors.items():
        copy = back["weights"][key]
        assert copy.dtype == tensor.dtype and copy.stride() == tensor.stride(), key
        assert torch.equal(copy, tensor), key
    back["weights"]["float"] += 1          # a writable copy, not a view of the original
    assert not torch.equal(back["weights"]["float"], tensors["float"])


# ---------------------------------------------------------------- failures inside workers

class CrashingFedAvg(FedAvg):
    """Client 1's process dies in the middle of its update, as if killed."""

    def client_update(self, ctx):
        if ctx.client_id == 1:
            os._exit(7)
        return super().client_update(ctx)


@pytest.fixture(scope="module")
def tiny_setup():
    """(args, initial_weights {architecture: state dict}) of a tiny FedAvg run, for executors made by hand."""
    args = algorithm_args(FedAvg, *TINY)
    architectures = client_architectures(args.client_models, args.model, args.n_parties)
    weights = initial_weights(args, architectures, 10, (1, 28, 28), torch.device("cpu"))
    return args, weights


def tasks_of(args, weights):
    """Every client's task of round 0: (client_id, download, state)."""
    return [(k, {"weights": weights[args.model]}, {}) for k in range(args.n_parties)]


def test_worker_errors_reach_the_driver(tiny_setup):
    """A diverging client raises TrainingDiverged for the first failing client in sampled order
    (the serial run's error); a dead worker raises WorkerDied promptly instead of hanging."""
    args, weights = tiny_setup
    diverging = argparse.Namespace(**dict(vars(args), lr=1e6))
    tasks = tasks_of(args, weights)
    algorithm, data = build_client_side(FedAvg, diverging, weights, torch.device("cpu"))
    with pytest.raises(TrainingDiverged, match=r"round 0, client 0\b.*nan"):
        run_client(algorithm, data, tasks[0][1], {}, 0, 0)     # the serial run fails at client 0
    executor = parallel.ProcessExecutor((FedAvg, diverging, weights), 2)
    with pytest.raises(TrainingDiverged, match=r"round 0, client 0\b.*nan") as failure:
        executor.run_clients(tasks, 0)
    assert isinstance(failure.value.__cause__, parallel.WorkerTraceback)    # the worker's traceback
    assert "in client_update" in str(failure.value.__cause__)
    assert executor.workers == []      # the pool is shut down with the failed round

    executor = parallel.ProcessExecutor((CrashingFedAvg, args, weights), 2)
    started = time.time()
    with pytest.raises(parallel.WorkerDied, match=r"died while running client 1 \(exit code 7"):
        executor.run_clients(tasks, 0)
    assert time.time() - started < 60


def test_workers_return_the_serial_results(tiny_setup):
    """Worker processes return exactly run_client's results in this process, in task order."""
    args, weights = tiny_setup
    tasks = tasks_of(args, weights)[::-1]          # any order of clients comes back in that order
    algorithm, data = build_client_side(FedAvg, args, weights, torch.device("cpu"))
    serial = [run_client(algorithm, data, download, state, k, 0) for k, download, state in tasks]
    executor = parallel.ProcessExecutor((FedAvg, args, weights), 2)
    try:
        parallel_results = executor.run_clients(tasks, 0)
    finally:
        executor.close()
    assert [r.client_id for r in parallel_results] == [3, 2, 1, 0]
    for expected, found in zip(serial, parallel_results):
        assert (found.client_id, found.num_samples, found.metrics, found.log_lines) == \
            (expected.client_id, expected.num_samples, expected.metrics, expected.log_lines)
        assert_same_tensors(expected.upload, found.upload, f"client {expected.client_id} upload")
        assert_same_tensors(expected.state, found.state, f"client {expected.client_id} state")


class UnbuildableFedAvg(FedAvg):
    def __init__(self, *args):
        raise UsageError("this algorithm cannot be built")


def test_a_worker_that_cannot_start_reports_why(tiny_setup):
    args, weights = tiny_setup
    with pytest.raises(UsageError, match=r"this algorithm cannot be built"):
        parallel.ProcessExecutor((UnbuildableFedAvg, args, weights), 2)


# ---------------------------------------------------------------- sweep.py

def test_sweep_dry_run_prints_the_grid(capsys):
    assert sweep.main(["--algorithms", "fedavg", "fedavgm", "--seeds", "0", "1", "--betas", "0.1", "0.5",
                       "--out", "/tmp/sweep-layout", "--dry_run", "--", "--comm_round", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 8
    expected = set()
    for beta in ("0.1", "0.5"):
        for algorithm in ("fedavg", "fedavgm"):
            for seed in ("0", "1"):
                expected.add(f"/tmp/sweep-layout/fashionmnist_noniid_beta{beta}/{algorithm}_seed{seed}.log")
    assert {line.rsplit(" | tee ", 1)[1] for line in lines} == expected
    first = lines[0].split(" | tee ")[0].split()
    assert first[:3] == ["python", "-u", "fedavg.py"] and first[-2:] == ["--comm_round", "3"]
    assert first[first.index("--beta") + 1] == "0.1" and first[first.index("--init_seed") + 1] == "0"
    assert first[first.index("--logdir") + 1] == "/tmp/sweep-layout/fashionmnist_noniid_beta0.1/runs"
    assert first[first.index("--log_file_name") + 1] == "fedavg_seed0"
    assert sum("--server_momentum 0.9" in line for line in lines) == 4


def test_sweep_rejects_bad_grids(monkeypatch, capsys):
    """An algorithm whose script is missing; a grid flag after --."""
    monkeypatch.setitem(registry.ALGORITHMS, "ghost",
                        registry.Entry("ghost", "Ghost", "fedavg", "FedAvg", "ghost.py", "baselines"))
    assert sweep.main(["--algorithms", "ghost", "--out", "/tmp/x", "--dry_run"]) == 2
    assert "ghost.py does not exist" in capsys.readouterr().err
    assert sweep.main(["--algorithms", "fedavg", "--out", "/tmp/x", "--dry_run", "--", "--init", "3"]) == 2
    assert "use sweep.py --seeds" in capsys.readouterr().err


def test_tiny_sweep_writes_the_table_layout(tmp_path):
    command = ["sweep.py", "--algorithms", "fedavg", "--seeds", "0", "1", "--betas", "0.5", "--jobs", "2",
               "--out", str(tmp_path), "--", "--comm_round", "1", "--num_local_iterations", "2",
               "--n_parties", "4"]
    done = run_script(*command)
    assert done.returncode == 0, done.stdout + done.stderr
    setting = tmp_path / "fashionmnist_noniid_beta0.5"
    assert sorted(p.name for p in setting.iterdir()) == ["fedavg_seed0.log", "fedavg_seed1.log", "runs"]
    logs = [(setting / f"fedavg_seed{s}.log").read_text() for s in (0, 1)]
    for seed, log in enumerate(logs):
        assert ">> Round 0 | Current Acc:" in log and ">> Final Acc:" in log
        assert log == (setting / "runs" / f"fedavg_seed{seed}" / "log.txt").read_text()
        assert (setting / "runs" / f"fedavg_seed{seed}" / "checkpoint.pt").is_file()
    assert logs[0].splitlines()[0] != logs[1].splitlines()[0]       # the seeds differ
    again = run_script(*command)                                      # finished runs are skipped
    skipped = [line for line in again.stdout.splitlines() if line.startswith("skip ")]
    assert again.returncode == 0 and len(skipped) == 2, again.stdout
