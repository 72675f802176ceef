"""The engine's capabilities, each exercised by a tiny algorithm (tests/tiny_algorithms.py):
partial and weight-free uploads, server-side training, two architectures in one run, the
evaluation protocols against hand counts, bytes per upload and download, observers, resume of
server and personal state, small checkpoints, and the registry."""
import json
import math
import os
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import cvdataset
import tiny_algorithms
from conftest import ROOT, run_script
from engine import Observer, main, registry, weighted_average
from engine.evaluation import client_evaluation, evaluate_global, evaluate_groups, summarise_local
from engine.data import load_federated_data
from engine.loop import algorithm_parser
from fedavg import FedAvg
from scaffold import SCAFFOLD
from utils import parse_args, setup_seed

TINY = ["--n_parties", "4", "--num_local_iterations", "3", "--batch_size", "16", "--beta", "0.5",
        "--threads", "1"]
MODEL_BYTES = 44426 * 4      # simplecnn-mnist, float32


class Recorder(Observer):
    """Keeps every download and upload it is shown."""

    def __init__(self):
        self.downloads, self.uploads = [], []

    def on_download(self, round_index, client_id, download, server_state):
        self.downloads.append((round_index, client_id, download))

    def on_upload(self, round_index, client_id, download, result):
        self.uploads.append((round_index, client_id, result))


def run_in_process(algorithm_class, tmp_path, *flags, name="run", observers=()):
    argv = [*TINY, *map(str, flags), "--logdir", str(tmp_path), "--log_file_name", name]
    assert main(algorithm_class, argv, observers=observers) == 0
    run_dir = tmp_path / name
    records = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    return records, torch.load(run_dir / "checkpoint.pt", weights_only=True)


# ----------------------------------------------------------------------------- uploads of any shape

def test_partial_upload_shares_only_the_base_and_clients_keep_their_heads(tmp_path):
    recorder = Recorder()
    records, ckpt = run_in_process(tiny_algorithms.PartialUpload, tmp_path, "--comm_round", "2",
                                   "--eval", "local", observers=[recorder])
    assert all(set(d["weights"]) == {"base.conv1.weight", "base.conv1.bias", "base.conv2.weight", "base.conv2.bias",
                                     "base.fc1.weight", "base.fc1.bias", "base.fc2.weight", "base.fc2.bias"}
               for _, _, d in recorder.downloads)
    uploads = [result for round_index, _, result in recorder.uploads if round_index == 1]
    assert all(set(r.upload["weights"]) == set(recorder.downloads[0][2]["weights"]) for r in uploads)
    # the server's base is the sample-weighted average of the last round's uploads
    expected = weighted_average([r.upload["weights"] for r in uploads], [r.num_samples for r in uploads])
    for key, value in expected.items():
        assert torch.equal(ckpt["server_state"]["weights"][key], value)
    # each client keeps its own head, and only its head
    heads = [ckpt["client_states"][k]["local_model"] for k in range(4)]
    assert all(set(head) == {"classifier.fc.weight", "classifier.fc.bias"} for head in heads)
    assert not torch.equal(heads[0]["classifier.fc.weight"], heads[1]["classifier.fc.weight"])
    base_bytes = MODEL_BYTES - (84 * 10 + 10) * 4
    assert records[0]["bytes_uploaded_per_client"] == [base_bytes + 8] * 4
    assert records[0]["bytes_downloaded_per_client"] == [base_bytes] * 4
    assert records[0]["evaluation"] == "local" and len(records[0]["client_accuracies"]) == 4


def test_prototype_upload_without_weights(tmp_path):
    recorder = Recorder()
    records, ckpt = run_in_process(tiny_algorithms.Prototypes, tmp_path, "--comm_round", "3",
                                   "--num_local_iterations", "30", "--eval", "local", observers=[recorder])
    assert "weights" not in ckpt["server_state"]
    last = [result for round_index, _, result in recorder.uploads if round_index == 2]
    assert all(set(r.upload) == {"prototypes"} for r in last)
    # the server's prototype of class c is the unweighted mean over the clients that sent one
    for c, prototype in ckpt["server_state"]["prototypes"].items():
        sent = [r.upload["prototypes"][c] for r in last if c in r.upload["prototypes"]]
        assert torch.allclose(prototype, torch.stack(sent).mean(0))
    # bytes: 84 floats a class a client, plus the sample count
    first = [result for round_index, _, result in recorder.uploads if round_index == 0]
    assert records[0]["bytes_uploaded_per_client"] == [84 * 4 * len(r.upload["prototypes"]) + 8 for r in first]
    assert records[0]["bytes_downloaded"] == 0              # nothing to download before round 0
    assert records[-1]["accuracy"] > 0.3                     # nearest prototype on local tests; chance ~0.1


# ----------------------------------------------------------------------------- two architectures

def test_two_architectures_in_one_run_average_only_what_they_share(tmp_path):
    recorder = Recorder()
    records, ckpt = run_in_process(FedAvg, tmp_path, "--comm_round", "1", "--model", "tiny-b",
                                   "--client_models", "tiny-a,tiny-b", "--eval", "groups", observers=[recorder])
    results = [result for _, _, result in recorder.uploads]
    assert [sorted(r.upload["weights"]) == sorted(results[0].upload["weights"]) for r in results] == \
        [True, False, True, False]                           # clients 0, 2 are tiny-a; 1, 3 tiny-b
    assert "base.fc2.weight" not in results[0].upload["weights"]
    weights = ckpt["server_state"]["weights"]
    deep = [r for r in results if "base.fc2.weight" in r.upload["weights"]]
    fc2 = sum(r.upload["weights"]["base.fc2.weight"].double() * r.num_samples for r in deep) / \
        sum(r.num_samples for r in deep)
    fc1 = sum(r.upload["weights"]["base.fc1.weight"].double() * r.num_samples for r in results) / \
        sum(r.num_samples for r in results)
    assert torch.allclose(weights["base.fc2.weight"], fc2.float(), atol=1e-7)
    assert torch.allclose(weights["base.fc1.weight"], fc1.float(), atol=1e-7)
    groups = records[0]["group_accuracies"]
    assert set(groups) == {"tiny-a", "tiny-b"}
    assert records[0]["accuracy"] == pytest.approx((groups["tiny-a"] + groups["tiny-b"]) / 2)


# ----------------------------------------------------------------------------- evaluation protocols

class Constant(torch.nn.Module):
    """Predicts class `c` for every input."""

    def __init__(self, c):
        super().__init__()
        self.c = c

    def forward(self, x):
        return torch.nn.functional.one_hot(torch.full((len(x),), self.c), 3).float()


def fixture_images(n):
    return torch.zeros(n, 1, 2, 2, dtype=torch.uint8)


def test_evaluation_protocols_against_hand_counts():
    # local: client 0 predicts 0 on labels [0, 0, 1] (2/3), client 1 predicts 1 on [1, 1, 1, 0] (3/4)
    tests = [torch.tensor([0, 0, 1]), torch.tensor([1, 1, 1, 0])]
    clients = [SimpleNamespace(test_images=fixture_images(len(y)), test_labels=y, mean=(0.5,), std=(0.5,))
               for y in tests]
    algorithm = SimpleNamespace(evaluation_model=lambda ctx: Constant(ctx.client_id))
    local = summarise_local([client_evaluation(algorithm, SimpleNamespace(client_id=k, data=client))
                             for k, client in enumerate(clients)])
    assert local["accuracy"] == pytest.approx(5 / 7)                   # micro: total correct / total tests
    assert local["client_accuracies"] == pytest.approx([2 / 3, 3 / 4])
    assert local["client_accuracy_std"] == pytest.approx(np.std([2 / 3, 3 / 4]))
    # global: labels [2, 2, 0, 1, 2] under a model predicting 2: 3/5
    data = SimpleNamespace(test_images=fixture_images(5), test_labels=torch.tensor([2, 2, 0, 1, 2]),
                           dataset=SimpleNamespace(mean=(0.5,), std=(0.5,)))
    predictors = {"a": Constant(2), "b": Constant(0)}
    algorithm = SimpleNamespace(args=SimpleNamespace(model="a"), global_weights=lambda state: {},
                                frozen_model=lambda role, architecture, weights: predictors[architecture],
                                model=lambda role, architecture: predictors[architecture],
                                setting=SimpleNamespace(client_models=["a", "b", "a"]))
    assert evaluate_global(algorithm, {}, data)["accuracy"] == pytest.approx(3 / 5)
    # groups: a scores 3/5, b scores 1/5; the unweighted mean over groups is 2/5
    groups = evaluate_groups(algorithm, {}, data)
    assert groups["group_accuracies"] == pytest.approx({"a": 3 / 5, "b": 1 / 5})
    assert groups["accuracy"] == pytest.approx(2 / 5)


def test_local_protocol_splits_each_clients_share_as_pfllib():
    """Train + test pooled, partitioned, then per client: perm = np.random.permutation(n),
    test = perm[:n - floor(0.75 n)], train = the rest, with the RNG continuing after the partition."""
    args = parse_args(algorithm_parser(FedAvg), ["--n_parties", "5", "--beta", "0.1", "--eval", "local"])
    data = load_federated_data(args, torch.device("cpu"))
    assert data.test_images is None                                # no global test set
    pool = torch.cat([data.dataset.train_labels, data.dataset.test_labels]).numpy()
    setup_seed(0)
    parts = cvdataset.partition_data(pool, "noniid", 5, 0.1, 10)
    total = 0
    for part, client in zip(parts, data.clients):
        perm = np.random.permutation(len(part))
        n_test = len(part) - math.floor(0.75 * len(part))
        assert client.num_samples == len(part) - n_test and len(client.test_labels) == n_test
        assert client.test_labels.tolist() == pool[np.asarray(part)[perm[:n_test]]].tolist()
        assert client.labels.tolist() == pool[np.asarray(part)[perm[n_test:]]].tolist()
        total += len(part)
    assert total == 70000


# ----------------------------------------------------------------------------- bytes and observers

def test_bytes_are_counted_per_client_direction_and_kind(tmp_path):
    records, _ = run_in_process(SCAFFOLD, tmp_path, "--comm_round", "1")
    record = records[0]              # SimpleCNN has no buffers: c and delta c_i are model-sized
    assert record["bytes_uploaded_per_client"] == [2 * MODEL_BYTES + 8] * 4      # weights, delta c_i, n_k
    assert record["bytes_downloaded_per_client"] == [2 * MODEL_BYTES] * 4         # weights, c
    assert record["bytes_uploaded_by_kind"] == {"weights": 4 * MODEL_BYTES, "control_delta": 4 * MODEL_BYTES,
                                                "num_samples": 32}
    assert record["bytes_uploaded"] == sum(record["bytes_uploaded_per_client"])
    assert record["bytes_downloaded"] == 4 * 2 * MODEL_BYTES


@pytest.mark.parametrize("workers", [1, 2])
def test_an_observer_sees_every_download_and_upload(tmp_path, workers):
    recorder = Recorder()
    records, _ = run_in_process(FedAvg, tmp_path, "--comm_round", "2", "--sample_fraction", "0.5",
                                "--workers", workers, observers=[recorder])
    sampled = [(r["round"], k) for r in records for k in r["clients"]]
    assert [(r, k) for r, k, _ in recorder.downloads] == sampled
    assert [(r, k) for r, k, _ in recorder.uploads] == sampled
    assert all(result.client_id == k and "weights" in result.upload for _, k, result in recorder.uploads)


def test_observed_uploads_are_identical_serially_and_on_workers(tmp_path):
    uploads = {}
    for workers in (1, 2):
        recorder = Recorder()
        run_in_process(FedAvg, tmp_path, "--comm_round", "1", "--workers", workers, name=f"w{workers}",
                       observers=[recorder])
        uploads[workers] = [result.upload["weights"] for _, _, result in recorder.uploads]
    for serial, parallel in zip(uploads[1], uploads[2]):
        assert all(torch.equal(serial[key], parallel[key]) for key in serial)


# ----------------------------------------------------------------------------- resume and checkpoints

def tiny_script(tmp_path, name, *flags, background=False):
    command = [sys.executable, os.path.join(ROOT, "tests", "tiny_algorithms.py"), "ServerTrained", *TINY,
               "--comm_round", "4", "--sample_fraction", "0.5", "--eval", "local",
               "--logdir", str(tmp_path), *map(str, flags)]
    if name:
        command += ["--log_file_name", name]
    if background:
        return subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)


def compared_lines(stdout):
    return [line for line in stdout.splitlines() if line.startswith((">>", "server loss"))]


def test_server_and_personal_state_resume_identically_after_kill(tmp_path):
    straight = tiny_script(tmp_path, "straight")
    assert straight.returncode == 0, straight.stderr
    process = tiny_script(tmp_path, "killed", background=True)
    log = tmp_path / "killed" / "log.txt"
    deadline = time.time() + 300
    while not (log.exists() and ">> Round 1 " in log.read_text()):
        assert time.time() < deadline and process.poll() is None, "the run ended before round 1"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    resumed = tiny_script(tmp_path, None, "--resume", tmp_path / "killed")
    assert resumed.returncode == 0, resumed.stderr
    assert len([line for line in compared_lines(straight.stdout) if line.startswith("server loss")]) == 4
    assert compared_lines(resumed.stdout) == compared_lines(straight.stdout)
    a = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "killed" / "checkpoint.pt", weights_only=True)
    assert all(torch.equal(a["server_state"]["module"][k], b["server_state"]["module"][k]) for k in a["server_state"]["module"])
    assert a["server_state"]["optimizer"]["state"][0]["step"] == 4 * 3        # 3 Adam steps a round
    assert sorted(a["client_states"]) == sorted(b["client_states"])
    for k, state in a["client_states"].items():
        assert all(torch.equal(v, b["client_states"][k]["local_model"][key])
                   for key, v in state["local_model"].items())
    metrics = [open(tmp_path / name / "metrics.jsonl").read().splitlines() for name in ("straight", "killed")]
    strip = [[{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in m] for m in metrics]
    assert strip[0] == strip[1]
    workers = tiny_script(tmp_path, "workers", "--workers", "2")
    assert compared_lines(workers.stdout) == compared_lines(straight.stdout)


def test_fedavg_checkpoint_of_100_clients_holds_the_global_model_and_little_else(tmp_path):
    result = run_script("fedavg.py", "--n_parties", "100", "--num_local_iterations", "1", "--comm_round", "1",
                        "--batch_size", "8", logdir=tmp_path)
    assert result.returncode == 0, result.stderr
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert ckpt["client_states"] == {}
    assert set(ckpt["server_state"]) == {"weights"}
    assert os.path.getsize(tmp_path / "run" / "checkpoint.pt") < MODEL_BYTES + 20_000


# ----------------------------------------------------------------------------- the registry

def test_the_registry_knows_every_algorithm_its_script_and_flags():
    for name, entry in registry.ALGORITHMS.items():
        algorithm = entry.load()
        assert os.path.isfile(os.path.join(ROOT, entry.script)), entry.script
        flag_names = {flag.name for flag in algorithm.all_flags()}
        assert set(entry.presets) <= flag_names, f"{name}: presets that are not flags of {algorithm.__name__}"
        assert all(flag.help for flag in algorithm.all_flags())
    run_sh = open(os.path.join(ROOT, "run.sh")).read()
    default = run_sh.split('DEFAULT_ALGORITHMS="')[1].split('"')[0].split()
    assert set(default) <= set(registry.ALGORITHMS)
    # FedProx's mu and MOON's mu are different flags with their own defaults
    assert {f.name: f.default for f in registry.get("fedprox").load().all_flags()}["mu"] == 0.01
    assert {f.name: f.default for f in registry.get("moon").load().all_flags()}["mu"] == 0.1


def test_a_flag_of_another_algorithm_is_refused_in_one_line(tmp_path):
    result = run_script("fedhug.py", "--mu", "0.1", logdir=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == \
        "error: --mu is not a flag of fedhug (it is a flag of fedprox, moon, heteroprox, incoprox, heteromoon, incomoon); see --help"
    assert not (tmp_path / "run").exists()


def test_main_py_runs_a_registry_variant_as_its_script_does(tmp_path):
    flags = ["--n_parties", "3", "--num_local_iterations", "2", "--comm_round", "1"]
    by_name = run_script("main.py", "--algorithm", "fedavgm", *flags, logdir=tmp_path, name="by_name")
    by_script = run_script("fedavg.py", "--server_momentum", "0.9", *flags, logdir=tmp_path, name="by_script")
    assert by_name.returncode == 0 and by_script.returncode == 0, by_name.stderr + by_script.stderr
    assert [json.loads(line)["train_loss"] for line in open(tmp_path / "by_name" / "metrics.jsonl")] == \
        [json.loads(line)["train_loss"] for line in open(tmp_path / "by_script" / "metrics.jsonl")]
    assert "server_momentum: 0.9" in open(tmp_path / "by_name" / "config.yaml").read()
    unknown = run_script("main.py", "--algorithm", "fedsgd", logdir=tmp_path, name="unknown")
    assert unknown.returncode == 2 and "unknown algorithm 'fedsgd'" in unknown.stderr


def test_tables_name_the_evaluation_protocol(tmp_path):
    import tables
    for protocol in ("global", "local"):
        folder = tmp_path / "setting" / "runs" / f"fedavg_seed{0 if protocol == 'global' else 1}"
        folder.mkdir(parents=True)
        (folder / "metrics.jsonl").write_text(json.dumps({"round": 0, "evaluation": protocol, "accuracy": 0.5}) + "\n")
    runs = tables.collect_runs([str(p) for p in sorted((tmp_path / "setting" / "runs").iterdir())])
    text = tables.to_markdown(tables.Comparison(runs))
    assert "| algorithm | setting | setting [local] |" in text
    assert "global: the global model on the global test set" in text and "local: each client's own model" in text


def test_a_bad_warm_start_writes_nothing(tmp_path):
    (tmp_path / "notes.pt").write_text("not a checkpoint")
    result = run_script("fedavg.py", "--load_path", tmp_path / "notes.pt", logdir=tmp_path, name="warm")
    assert result.returncode == 2 and "cannot be read" in result.stderr
    assert not (tmp_path / "warm").exists()


@pytest.mark.parametrize("workers", [1, 2])
def test_broadcast_reaches_every_client_and_local_evaluation_reports_two_series(tmp_path, workers):
    recorder = Recorder()
    records, ckpt = run_in_process(tiny_algorithms.Broadcast, tmp_path, "--comm_round", "2", "--sample_fraction",
                                   "0.5", "--num_local_iterations", "30", "--eval", "local", "--workers", workers,
                                   observers=[recorder])
    assert [r["round"] for r in records] == [0, 1, 2] and records[-1]["evaluation_only"]
    for record in records:
        round_downloads = [k for r, k, _ in recorder.downloads if r == record["round"]]
        round_uploads = [k for r, k, _ in recorder.uploads if r == record["round"]]
        trained = 0 if record.get("evaluation_only") else 2
        assert round_downloads == [0, 1, 2, 3] and round_uploads == record["clients"] and len(round_uploads) == trained
        assert len(record["bytes_downloaded_per_client"]) == 4
        assert len(record["bytes_uploaded_per_client"]) == trained
    for k in range(4):       # every client, sampled or not, ran `receive` with round 1's download
        assert ckpt["client_states"][k]["received"].item() == 1
    last = records[-1]
    assert set(last) >= {"accuracy", "accuracy_initial", "client_accuracies_initial"}
    assert last["accuracy"] != last["accuracy_initial"]
