"""The federated engine, FedAvg and FedAvgM, configs and bad input (SPEC sections 4-5)."""
import argparse
import json
import os
import re
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, run_script, run_scripts
from engine import ClientResult, ServerContext, sample_clients, weighted_average
from fedavg import FedAvg

ROUND_LINE = re.compile(r">> Round (\d+) \| Current Acc: ([0-9.]+), Best Acc: ([0-9.]+)$")
SMALL = ["--n_parties", "5", "--num_local_iterations", "20", "--comm_round", "2", "--beta", "0.5"]


def round_accuracies(stdout):
    return [float(m.group(2)) for m in map(ROUND_LINE.match, stdout.splitlines()) if m]


def trace(run_dir):
    """(accuracy, train loss) per round from a run's metrics.jsonl: the loss tells runs apart
    even while the accuracy still sits at chance."""
    return [(r["accuracy"], r["train_loss"]) for r in map(json.loads, open(os.path.join(run_dir, "metrics.jsonl")))]


# ----------------------------------------------------------------------------- units

def test_weighted_average_weights_by_sample_counts():
    a = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(2)}
    b = {"w": torch.tensor([4.0, 8.0]), "n": torch.tensor(5)}
    out = weighted_average([a, b], [1, 3])
    assert torch.allclose(out["w"], torch.tensor([3.25, 6.5]))
    assert out["n"].dtype == torch.int64 and out["n"].item() == 4     # 0.25*2 + 0.75*5 = 4.25


def test_server_momentum_follows_hsu_et_al():
    """delta = w - w_avg; v = b v + delta; w = w - lr v, over two rounds."""
    args = argparse.Namespace(server_momentum=0.9, server_lr=1.0)
    algorithm = FedAvg.__new__(FedAvg)
    algorithm.args = args
    server = ServerContext(0, torch.Generator().manual_seed(0), torch.device("cpu"))

    def result(value):
        return ClientResult(0, 1, {"weights": {"w": torch.tensor([value])}}, {}, {}, [])
    state = {"weights": {"w": torch.tensor([1.0])}}
    state = algorithm.server_update(state, [result(0.5)], server)          # v = 0.5, w = 0.5
    assert state["weights"]["w"].item() == pytest.approx(0.5)
    assert state["velocity"]["w"].item() == pytest.approx(0.5)
    state = algorithm.server_update(state, [result(0.25)], server)         # v = 0.45 + 0.25 = 0.7
    assert state["velocity"]["w"].item() == pytest.approx(0.7)
    assert state["weights"]["w"].item() == pytest.approx(0.5 - 0.7)
    args.server_momentum = 0.0                                             # plain FedAvg: the average
    plain = algorithm.server_update({"weights": state["weights"]}, [result(0.3)], server)
    assert plain["weights"]["w"].item() == pytest.approx(0.3) and "velocity" not in plain


def test_client_sampling_is_seeded_and_sized():
    chosen = sample_clients(0, 3, 100, 0.1)
    assert len(chosen) == 10 == len(set(chosen)) and chosen == sample_clients(0, 3, 100, 0.1)
    assert chosen != sample_clients(0, 4, 100, 0.1) and chosen != sample_clients(1, 3, 100, 0.1)
    assert sample_clients(0, 0, 7, 1.0) == list(range(7))


# ----------------------------------------------------------------------------- real runs

def test_fedavg_learns_and_logs_in_the_published_format(tmp_path):
    result = run_script("fedavg.py", "--n_parties", "5", "--num_local_iterations", "60",
                        "--comm_round", "4", "--beta", "0.5", "--save_model", logdir=tmp_path)
    assert result.returncode == 0, result.stderr
    accuracies = round_accuracies(result.stdout)
    assert len(accuracies) == 4 and accuracies[-1] > 0.35           # chance is 0.1
    run_dir = tmp_path / "run"
    records = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    assert [r["round"] for r in records] == [0, 1, 2, 3]
    assert records[-1]["accuracy"] == pytest.approx(accuracies[-1], abs=1e-5)
    model_bytes = 44426 * 4
    assert records[0]["bytes_uploaded"] == 5 * (model_bytes + 8)       # the weights and the sample count
    assert records[0]["bytes_downloaded"] == 5 * model_bytes
    assert records[0]["bytes_uploaded_per_client"] == [model_bytes + 8] * 5
    assert records[0]["bytes_downloaded_per_client"] == [model_bytes] * 5
    assert records[0]["bytes_uploaded_by_kind"] == {"weights": 5 * model_bytes, "num_samples": 5 * 8}
    assert records[0]["bytes_downloaded_by_kind"] == {"weights": 5 * model_bytes}
    assert records[0]["evaluation"] == "global" and records[0]["clients"] == [0, 1, 2, 3, 4]
    assert set(records[0]) >= {"train_loss", "seconds", "best_accuracy"}
    assert "beta: 0.5" in open(run_dir / "config.yaml").read()
    assert open(run_dir / "log.txt").read() == result.stdout
    weights = torch.load(run_dir / "global_model.pt")
    assert sum(v.numel() for v in weights.values()) == 44426
    assert result.stderr.count("warning") <= 1                       # the CPU fall-back line only


def test_same_seed_same_log_and_fedavgm_differs(tmp_path):
    runs = run_scripts({"a": ("fedavg.py", SMALL), "b": ("fedavg.py", SMALL),
                        "m": ("fedavg.py", [*SMALL, "--server_momentum", "0.9"]),
                        "s": ("fedavg.py", [*SMALL, "--init_seed", "1"]),
                        "n": ("main.py", ["--algorithm", "fedavgm", *SMALL])}, tmp_path)
    first, second, momentum, by_name = runs["a"], runs["b"], runs["m"], runs["n"]
    assert first.returncode == second.returncode == momentum.returncode == runs["s"].returncode == 0
    assert first.stdout == second.stdout
    assert trace(tmp_path / "a") == trace(tmp_path / "b")
    assert trace(tmp_path / "m") != trace(tmp_path / "a")
    assert trace(tmp_path / "s") != trace(tmp_path / "a")
    # the registry's fedavgm (main.py --algorithm) is fedavg.py --server_momentum 0.9
    assert by_name.returncode == 0, by_name.stderr
    assert by_name.stdout == momentum.stdout and trace(tmp_path / "n") == trace(tmp_path / "m")


def test_eval_every_skips_evaluations_but_not_training(tmp_path):
    """--eval_every 2 over 5 rounds evaluates rounds 1, 3 and the last (4) with the accuracies of
    --eval_every 1, and trains the others identically (same losses and bytes, accuracy None);
    --eval local keeps its evaluation-only round."""
    few = ["--n_parties", "4", "--num_local_iterations", "3", "--comm_round", "5", "--beta", "0.5"]
    local = ["--algorithm", "local", "--partition", "pfllib", "--eval", "local", *few]
    runs = run_scripts({"every": ("fedavg.py", few), "second": ("fedavg.py", [*few, "--eval_every", "2"]),
                        "local": ("main.py", local), "local2": ("main.py", [*local, "--eval_every", "2"])}, tmp_path)
    assert all(r.returncode == 0 for r in runs.values()), [r.stderr for r in runs.values()]
    for full, sparse, rounds in (("every", "second", 5), ("local", "local2", 6)):
        every, second = trace(tmp_path / full), trace(tmp_path / sparse)
        assert len(every) == len(second) == rounds
        evaluated = [r for r in range(rounds) if r % 2 == 1 or r >= 4]
        assert [a for a, _ in second] == [every[r][0] if r in evaluated else None for r in range(rounds)]
        assert [loss for _, loss in second] == [loss for _, loss in every]
        assert "Round 0 | trained, not evaluated (--eval_every 2)" in runs[sparse].stdout
        logged = re.findall(r"Round (\d+) \| Current Acc: ([\d.]+)", runs[sparse].stdout)
        assert logged == [(str(r), f"{every[r][0]:.5f}") for r in evaluated]
    from tables import read_run_dir
    curve = read_run_dir(str(tmp_path / "second"), "s")
    assert curve.rounds == [1, 3, 4]
    bad = run_script("fedavg.py", *few, "--eval_every", "0", logdir=tmp_path, name="bad")
    assert bad.returncode != 0 and "--eval_every must be a positive integer (got 0)" in bad.stderr


def test_yaml_config_sets_defaults_and_flags_override(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("n_parties: 4\nbeta: 0.3\ncomm_round: 1\nnum_local_iterations: 2\n")
    result = run_script("fedavg.py", "--config", config, "--beta", "0.7", logdir=tmp_path)
    assert result.returncode == 0, result.stderr
    resolved = open(tmp_path / "run" / "config.yaml").read()
    assert "n_parties: 4" in resolved and "beta: 0.7" in resolved
    assert len(round_accuracies(result.stdout)) == 1


# ----------------------------------------------------------------------------- bad input

BAD_INPUTS = [
    (["--dataset", "mnist"], "unknown --dataset 'mnist'"),
    (["--model", "resnet"], "unknown --model 'resnet'"),
    (["--dataset", "fashionmnist", "--model", "simplecnn"], "does not fit --dataset fashionmnist"),
    (["--partition", "dirichlet"], "unknown --partition 'dirichlet'"),
    (["--optimizer", "rmsprop"], "unknown --optimizer 'rmsprop'"),
    (["--beta", "0"], "--beta must be > 0"),
    (["--beta", "-1"], "--beta must be > 0"),
    (["--n_parties", "0"], "--n_parties must be at least 1"),
    (["--n_parties", "7000"], "--n_parties 7000 x --min_require_size 10 exceeds"),
    (["--min_require_size", "1000000000"], "use fewer clients or a lower --min_require_size"),
    (["--partition", "noniid-skew-2", "--n_parties", "7"], "not a multiple of 5"),
    (["--sample_fraction", "0"], "--sample_fraction must be in (0, 1]"),
    (["--sample_fraction", "1.5"], "--sample_fraction must be in (0, 1]"),
    (["--num_local_iterations", "0"], "--num_local_iterations must be a positive integer"),
    (["--comm_round", "-2"], "--comm_round must be a positive integer"),
    (["--batch_size", "0"], "--batch_size must be a positive integer"),
    (["--lr", "0"], "--lr must be > 0"),
    (["--datadir", "/no/such/folder"], "--datadir /no/such/folder does not exist"),
    (["--device", "cuda:0"], "CUDA is not available"),
    (["--device", "meta"], "runs on cpu or cuda[:N] only"),
    (["--gpu", "abc"], "--gpu 'abc' is not a GPU index"),
    (["--lr", "1e39"], "--lr 1e+39 is beyond float32's range"),
    (["--eval", "personal"], "unknown --eval 'personal'"),
    (["--train_ratio", "1"], "--train_ratio must be in (0, 1)"),
    (["--client_models", "simplecnn-mnist,resnet"], "unknown --client_models 'resnet'"),
    (["--mu", "0.1"], "--mu is not a flag of fedavg (it is a flag of fedprox, moon, heteroprox, incoprox, heteromoon, incomoon)"),
    (["--g_steps", "3"], "--g_steps is not a flag of fedavg (it is a flag of fedhug)"),
]


# fedavg.py's entry point (engine.loop.main, what `python fedavg.py ...` returns as its exit
# status) on every bad input in turn, in one process: one torch import for all of them. The first
# case also runs as its own process (the exit status the shell sees).
BAD_INPUT_DRIVER = """
import contextlib, io, json, sys, traceback
from engine.loop import main
from fedavg import FedAvg
results = []
for argv in json.load(sys.stdin):
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
        try:
            status = main(FedAvg, argv)
        except BaseException:
            traceback.print_exc()
            status = None
    results.append([status, stderr.getvalue()])
json.dump(results, sys.stdout)
"""


@pytest.fixture(scope="module")
def bad_input_results(tmp_path_factory):
    logdir = tmp_path_factory.mktemp("bad-input")
    argvs = [["--comm_round", "1", *flags, "--threads", "1", "--logdir", str(logdir / str(i)),
              "--log_file_name", "run"] for i, (flags, _) in enumerate(BAD_INPUTS)]
    driver = subprocess.run([sys.executable, "-c", BAD_INPUT_DRIVER], cwd=ROOT, input=json.dumps(argvs),
                            capture_output=True, text=True, timeout=600)
    assert driver.returncode == 0, driver.stderr[-3000:]
    return json.loads(driver.stdout)


def assert_one_clear_line(status, stderr, message):
    """Exit status 2, no traceback, exactly one "error:" line, and it says `message`."""
    assert status == 2, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], stderr
    assert "Traceback" not in stderr


@pytest.mark.parametrize("case", range(len(BAD_INPUTS)), ids=[" ".join(f) for f, _ in BAD_INPUTS])
def test_bad_input_is_one_clear_line(bad_input_results, case):
    assert_one_clear_line(*bad_input_results[case], BAD_INPUTS[case][1])


def test_bad_input_exits_2_from_the_shell(tmp_path):
    result = run_script("fedavg.py", "--comm_round", "1", *BAD_INPUTS[0][0], logdir=tmp_path)
    assert_one_clear_line(result.returncode, result.stderr, BAD_INPUTS[0][1])


def test_main_py_runs_registry_names_and_refuses_unknown_ones(tmp_path):
    listed = run_script("main.py", "--list")
    assert listed.returncode == 0 and "fedavgm" in listed.stdout and "--server_momentum" in listed.stdout
    unknown = run_script("main.py", "--algorithm", "fedfoo", "--comm_round", "1", logdir=tmp_path)
    assert unknown.returncode == 2 and "Traceback" not in unknown.stderr
    errors = [line for line in unknown.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "unknown algorithm 'fedfoo'" in errors[0], unknown.stderr


def test_broken_data_files_are_one_clear_line(tmp_path):
    raw = tmp_path / "data" / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte"):
        (raw / name).write_bytes(b"not an idx file")
    result = run_script("fedavg.py", "--datadir", tmp_path / "data", logdir=tmp_path)
    assert result.returncode == 2 and "bad magic number" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("content,message", [
    ("bogus_flag: 3\n", "unknown key 'bogus_flag'"),
    ("beta: high\n", "key 'beta' must be float"),
    ("n_parties: 2.5\n", "key 'n_parties' must be int"),
    ("[1, 2\n", "not valid YAML"),
    ("resume: logs/run\n", "'resume' cannot be set in a config file"),
])
def test_bad_yaml_config(tmp_path, content, message):
    config = tmp_path / "bad.yaml"
    config.write_text(content)
    result = run_script("fedavg.py", "--config", config, logdir=tmp_path)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr


def test_unwritable_output_and_existing_run_are_refused(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("keep me")
    result = run_script("fedavg.py", "--comm_round", "1", logdir=blocker)
    assert result.returncode == 2 and "cannot write the run directory" in result.stderr
    assert blocker.read_text() == "keep me"

    first = run_script("fedavg.py", "--n_parties", "3", "--num_local_iterations", "2", "--comm_round", "1",
                       logdir=tmp_path, name="kept")
    assert first.returncode == 0
    before = {p: p.read_bytes() for p in (tmp_path / "kept").iterdir()}
    again = run_script("fedavg.py", "--comm_round", "1", logdir=tmp_path, name="kept")
    assert again.returncode == 2 and "already holds a run" in again.stderr
    assert {p: p.read_bytes() for p in (tmp_path / "kept").iterdir()} == before


def test_every_algorithm_starts_from_the_same_initial_weights(tmp_path):
    """With their extra terms switched off, FedProx, MOON and FedHUG (before --start_round)
    are FedAvg: the same seed must then give the same log."""
    runs = run_scripts({script: (script, [*SMALL, *extra])
                        for script, extra in [("fedavg.py", []), ("fedprox.py", ["--mu", "0"]),
                                              ("moon.py", ["--mu", "0"]), ("fedhug.py", ["--start_round", "2"])]},
                       tmp_path)
    for script, result in runs.items():
        assert result.returncode == 0, (script, result.stderr)
    fedavg = trace(tmp_path / "fedavg.py")
    for script in ("fedprox.py", "moon.py", "fedhug.py"):
        assert trace(tmp_path / script) == fedavg, script
