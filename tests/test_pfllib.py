"""PFLlib's scenario (--scenario pfllib) and the local protocol's timing (issue 12, spec
pfl-htfl.md sections 0-1): the partition against the one PFLlib's generator wrote, the model,
drop_last epochs, flag precedence, and evaluation after download and before training."""
import json
import math

import numpy as np
import pytest
import torch

import models
from conftest import algorithm_args, run_script
from engine import main
from engine.data import load_federated_data
from engine.executors import build_client_side
from fedavg import FedAvg

# Per-client class counts of the fmnist-0.1 partition in TsingZ0/DBE (dataset/fmnist-0.1/config.json,
# "Size of samples for labels in clients"), written by PFLlib's generate_FashionMNIST.py noniid - dir
# with seed 1: train + test merged, 20 clients, Dir(0.1). Reference data, as {class: count}.
PFLLIB_FMNIST_DIR01 = [
    {0: 67, 1: 1, 6: 2, 8: 5, 9: 7}, {1: 157, 3: 19, 6: 35, 7: 15, 9: 94}, {0: 14, 5: 29, 7: 318, 8: 514},
    {2: 2498, 3: 69, 4: 3, 6: 3, 9: 30}, {0: 1, 2: 680, 3: 662, 5: 2, 6: 8, 9: 102}, {0: 5473},
    {0: 298, 2: 20, 4: 9, 5: 4058}, {0: 285, 1: 23, 2: 7, 3: 2024, 5: 170, 6: 1952},
    {0: 5, 1: 236, 2: 429, 3: 381, 6: 4509}, {2: 11, 3: 2269, 4: 5, 5: 369, 7: 439, 8: 463},
    {0: 44, 1: 1324, 2: 8, 4: 1, 7: 940, 8: 3853}, {0: 268, 1: 1, 3: 221, 4: 6313},
    {0: 13, 1: 1, 2: 781, 3: 135, 5: 66, 6: 106, 7: 684, 9: 6765},
    {1: 1, 2: 148, 3: 6, 5: 244, 6: 220, 7: 4, 8: 2, 9: 1}, {0: 10, 2: 215, 3: 915, 7: 188},
    {0: 46, 1: 4, 2: 5, 3: 4, 6: 120, 8: 16}, {0: 1, 2: 322, 3: 21, 4: 191, 6: 6, 7: 249, 8: 2147},
    {0: 71, 1: 4761}, {0: 403, 3: 7, 4: 477, 5: 2, 6: 38, 7: 4163},
    {0: 1, 1: 491, 2: 1876, 3: 267, 4: 1, 5: 2060, 6: 1, 9: 1},
]


@pytest.fixture(scope="module")
def pfllib_data():
    args = algorithm_args(FedAvg, "--scenario", "pfllib", "--init_seed", "3")
    return args, load_federated_data(args, torch.device("cpu"))


def test_the_partition_is_pfllibs_file_client_for_client(pfllib_data):
    _, data = pfllib_data
    for k, (client, expected) in enumerate(zip(data.clients, PFLLIB_FMNIST_DIR01)):
        labels = torch.cat([client.labels, client.test_labels])
        counts = {c: n for c, n in enumerate(torch.bincount(labels, minlength=10).tolist()) if n}
        assert counts == expected, f"client {k}"
        n = len(labels)
        assert client.num_samples == math.floor(0.75 * n) and len(client.test_labels) == n - math.floor(0.75 * n)
    assert sum(c.num_samples + len(c.test_labels) for c in data.clients) == 70_000


def test_the_partition_ignores_init_seed_and_restores_numpys_rng(pfllib_data):
    from utils import setup_seed
    _, data = pfllib_data                       # --init_seed 3
    other = load_federated_data(algorithm_args(FedAvg, "--scenario", "pfllib"), torch.device("cpu"))
    assert all(torch.equal(a.labels, b.labels) and torch.equal(a.test_labels, b.test_labels)
               for a, b in zip(data.clients, other.clients))
    # numpy's stream after loading is where --init_seed put it: the seed-1 draws are fenced off
    setup_seed(0)
    first = np.random.rand()
    np.random.rand()
    assert np.random.rand() != first            # (a stream, not a constant)
    setup_seed(0)
    assert np.random.rand() == first
    load_federated_data(algorithm_args(FedAvg, "--scenario", "pfllib"), torch.device("cpu"))
    setup_seed(0)
    state_after_seeding = np.random.get_state()[1].copy()
    load_federated_data(algorithm_args(FedAvg, "--scenario", "pfllib"), torch.device("cpu"))
    assert np.array_equal(np.random.get_state()[1], state_after_seeding)


def test_scenario_settings_and_their_precedence(tmp_path):
    args = algorithm_args(FedAvg, "--scenario", "pfllib")
    assert (args.model, args.batch_size, args.lr, args.momentum, args.reg, args.epochs, args.n_parties, args.eval,
            args.drop_last, args.no_augment, args.comm_round) == ("fedavgcnn", 10, 0.005, 0.0, 0.0, 1, 20, "local",
                                                                 True, True, 2000)
    assert algorithm_args(FedAvg, "--scenario", "pfllib", "--lr", "0.01").lr == 0.01      # the command line wins
    config = tmp_path / "c.yaml"
    config.write_text("scenario: pfllib\nbatch_size: 32\n")
    args = algorithm_args(FedAvg, "--config", config)                                      # then the YAML file
    assert (args.partition, args.batch_size) == ("pfllib", 32)
    assert algorithm_args(FedAvg).partition == "noniid"                                   # no scenario: as before


def test_the_shipped_configs_parse_to_their_scenario():
    import os
    from conftest import ROOT
    args = algorithm_args(FedAvg, "--config", os.path.join(ROOT, "configs", "pfllib.yaml"))
    assert (args.partition, args.model, args.comm_round, args.eval) == ("pfllib", "fedavgcnn", 20, "local")
    args = algorithm_args(FedAvg, "--config", os.path.join(ROOT, "configs", "pfl-simplecnn.yaml"))
    assert (args.partition, args.model, args.n_parties, args.batch_size) == ("noniid", "simplecnn-mnist", 10, 10)


def test_fedavgcnn_is_pfllibs_four_layer_cnn():
    model = models.build_model("fedavgcnn", 10, (1, 28, 28))
    assert models.count_parameters(model) == 582_026
    assert models.head_prefix(model) == "head."
    base = [k for k in model.state_dict() if not k.startswith("head.")]
    assert sum(model.state_dict()[k].numel() for k in base) == 576_896
    assert model.features(torch.zeros(2, 1, 28, 28)).shape == (2, 512)
    assert models.head_prefix(models.build_model("simplecnn-mnist", 10)) == "classifier."


def test_drop_last_epochs_take_full_batches_only(pfllib_data):
    args, data = pfllib_data
    algorithm, _ = build_client_side(FedAvg, args, None, torch.device("cpu"), data.dataset)
    client = data.clients[0]                                  # 61 training samples at batch 10
    ctx = type("Ctx", (), {"data": client, "override_steps": None})
    assert algorithm.local_steps(ctx) == 6
    stream = client.stream(torch.Generator().manual_seed(0))
    seen = [stream.next()[1] for _ in range(12)]
    assert all(len(y) == 10 for y in seen)
    first_pass = torch.cat(seen[:6])
    assert len(set(first_pass.tolist())) <= 10 and len(first_pass) == 60   # 6 batches, one sample left out
    # without --drop_last the pass ends with the partial batch: 7 steps (ceil)
    args.drop_last = False
    assert algorithm.local_steps(ctx) == 7
    args.drop_last = True


def test_local_evaluation_is_taken_before_training_and_once_more_after_the_last_round(tmp_path):
    flags = ["--n_parties", "4", "--num_local_iterations", "3", "--batch_size", "16", "--beta", "0.5",
             "--comm_round", "2", "--eval", "local", "--threads", "1", "--logdir", str(tmp_path)]
    assert main(FedAvg, flags + ["--log_file_name", "run"]) == 0
    records = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert [r["round"] for r in records] == [0, 1, 2] and records[-1]["evaluation_only"]
    # round 0 scores the untrained initial model on every client's test split
    args = algorithm_args(FedAvg, *flags[:-2])
    algorithm, data = build_client_side(FedAvg, args, None, torch.device("cpu"))
    model = algorithm.frozen_model("evaluation", args.model, algorithm.setting.initial_weights[args.model])
    from engine.evaluation import count_correct
    correct = [count_correct(model, c.test_images, c.test_labels, c.mean, c.std) for c in data.clients]
    tested = [len(c.test_labels) for c in data.clients]
    assert records[0]["accuracy"] == pytest.approx(sum(correct) / sum(tested))
    assert records[0]["client_accuracies"] == pytest.approx([c / n for c, n in zip(correct, tested)])
    # the last line names the best round; the evaluation-only round trained nobody
    log = (tmp_path / "run" / "log.txt").read_text().splitlines()
    assert log[-2].endswith("(evaluation only)") and records[-1]["clients"] == []
    best = max(records, key=lambda r: r["accuracy"])
    assert f"(round {best['round']}, selected on the test set)" in log[-1]


def test_partition_pfllib_needs_the_local_protocol(tmp_path):
    result = run_script("fedavg.py", "--partition", "pfllib", "--comm_round", "1", logdir=tmp_path)
    assert result.returncode == 2 and "use it with --eval local" in result.stderr


def test_fedavg_ft_reports_the_finetuned_and_the_global_model(tmp_path):
    from algorithms.personalised.fedavg_ft import FedAvgFT
    flags = ["--n_parties", "3", "--num_local_iterations", "2", "--batch_size", "64", "--beta", "0.5",
             "--comm_round", "1", "--eval", "local", "--threads", "1", "--logdir", str(tmp_path)]
    assert main(FedAvgFT, flags + ["--log_file_name", "ft"]) == 0
    assert main(FedAvg, flags + ["--log_file_name", "avg"]) == 0
    ft = [json.loads(line) for line in open(tmp_path / "ft" / "metrics.jsonl")]
    avg = [json.loads(line) for line in open(tmp_path / "avg" / "metrics.jsonl")]
    # the federation is FedAvg's, draw for draw: the "global" series is FedAvg's accuracy
    assert [r["accuracy_global"] for r in ft] == [r["accuracy"] for r in avg]
    assert [r["train_loss"] for r in ft] == [r["train_loss"] for r in avg]
    # fine-tuning on a client's own (label-skewed) data changes what it predicts
    assert ft[-1]["accuracy"] != ft[-1]["accuracy_global"]
    result = run_script("main.py", "--algorithm", "fedavg-ft", "--comm_round", "1", logdir=tmp_path, name="g")
    assert result.returncode == 2 and "fedavg-ft ends with a model per client: run it with --eval local" in result.stderr
