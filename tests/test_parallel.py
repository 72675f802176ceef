"""Clients in worker processes and on Ray give exactly the serial run; sweep.py's grid and layout.

Tiny runs (4 clients, 2 rounds, 5 local iterations); the serial run of each algorithm is made
once and compared bit for bit (log.txt, global weights, server and client states). Runs with
--workers go through `federation.main` in this process (no torch import per run); the Ray run
and the sweep are real subprocesses."""
import argparse
import importlib.util
import os
import pickle
import sys
import time

import pytest
import torch

from conftest import ROOT, run_script
import cvdataset
import federation
import parallel
import sweep
from utils import UsageError, build_parser, parse_args

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
        return federation.FedAvg
    import moon
    return moon.MOON


def run(name, logdir, *extra):
    """One tiny run through the entry point in this process; returns its run directory."""
    script, flags = ALGORITHMS[name]
    argv = [*flags, *TINY, "--threads", "1", "--logdir", str(logdir), "--log_file_name", name, *extra]
    assert federation.main(algorithm_class(name), argv) == 0
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


def assert_same_tensors(expected, found, where):
    """Equal structure and bit-identical tensors."""
    if isinstance(expected, torch.Tensor):
        assert isinstance(found, torch.Tensor) and expected.dtype == found.dtype, where
        assert torch.equal(expected, found), f"{where}: max difference {(expected - found).abs().max()}"
    elif isinstance(expected, dict):
        assert set(expected) == set(found), where
        for key in expected:
            assert_same_tensors(expected[key], found[key], f"{where}.{key}")
    elif isinstance(expected, (list, tuple)):
        assert len(expected) == len(found), where
        for i, (e, f) in enumerate(zip(expected, found)):
            assert_same_tensors(e, f, f"{where}[{i}]")
    else:
        assert expected == found, where


def assert_same_run(serial_dir, other_dir):
    with open(os.path.join(serial_dir, "log.txt")) as f:
        serial_log = f.read()
    with open(os.path.join(other_dir, "log.txt")) as f:
        assert f.read() == serial_log
    assert ">> Round 1 | Current Acc:" in serial_log
    serial = torch.load(os.path.join(serial_dir, "checkpoint.pt"), weights_only=True)
    other = torch.load(os.path.join(other_dir, "checkpoint.pt"), weights_only=True)
    for key in ("global_weights", "server_state", "client_states", "best_acc"):
        assert_same_tensors(serial[key], other[key], key)
    assert all("last_model" in state for state in serial["client_states"])


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

class CrashingFedAvg(federation.FedAvg):
    """Client 1's process dies in the middle of its update, as if killed."""

    def client_update(self, global_weights, client_state, client_id, round_index, message=None):
        if client_id == 1:
            os._exit(7)
        return super().client_update(global_weights, client_state, client_id, round_index, message)


@pytest.fixture(scope="module")
def tiny_setup():
    """(args, data, client_indices, initial_weights) of a tiny run, for executors made by hand."""
    args = parse_args(build_parser("test"), [*TINY, "--threads", "1"])
    data = cvdataset.load_dataset(args.dataset, args.datadir)
    indices = cvdataset.partition_data(data.train_labels.numpy(), args.partition, args.n_parties,
                                       args.beta, data.num_classes, args.skew_class)
    weights = federation.clone_weights(federation.FedAvg(args, data, indices, "cpu").new_model().state_dict())
    return args, data, indices, weights


def test_worker_errors_reach_the_driver(tiny_setup):
    """A diverging client raises TrainingDiverged for the first failing client in sampled order
    (the serial run's error); a dead worker raises WorkerDied promptly instead of hanging."""
    args, data, indices, weights = tiny_setup
    clients = [(k, {}) for k in range(4)]
    diverging = argparse.Namespace(**dict(vars(args), lr=1e6))
    with pytest.raises(federation.TrainingDiverged, match=r"round 0, client 0\b.*nan"):
        serial = federation.FedAvg(diverging, data, indices, "cpu")
        serial.client_update(weights, {}, 0, 0)            # the serial run fails at client 0
    executor = parallel.ProcessExecutor((federation.FedAvg, diverging, indices, weights), 2)
    with pytest.raises(federation.TrainingDiverged, match=r"round 0, client 0\b.*nan") as failure:
        executor.run_clients(weights, {}, clients, 0)
    assert isinstance(failure.value.__cause__, parallel.WorkerTraceback)    # the worker's traceback
    assert "in client_update" in str(failure.value.__cause__)
    assert executor.workers == []      # the pool is shut down with the failed round

    executor = parallel.ProcessExecutor((CrashingFedAvg, args, indices, weights), 2)
    started = time.time()
    with pytest.raises(parallel.WorkerDied, match=r"died while running client 1 \(exit code 7"):
        executor.run_clients(weights, {}, clients, 0)
    assert time.time() - started < 60


class UnbuildableFedAvg(federation.FedAvg):
    def __init__(self, *args):
        raise UsageError("this algorithm cannot be built")


def test_a_worker_that_cannot_start_reports_why(tiny_setup):
    args, data, indices, weights = tiny_setup
    with pytest.raises(UsageError, match=r"this algorithm cannot be built"):
        parallel.ProcessExecutor((UnbuildableFedAvg, args, indices, weights), 2)


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
    monkeypatch.setitem(sweep.ALGORITHMS, "ghost", ["ghost.py"])
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
