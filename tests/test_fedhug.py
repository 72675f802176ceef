"""FedHUG (fedhug.py): FedAvg before --start_round, the per-client synthesis plan, the local
loss, --double_gen, flag checks, and short real runs on Fashion-MNIST including a warm start."""
import re
import types

import pytest
import torch
import torch.nn.functional as F

import cvdataset
import synthesis
from conftest import run_script
from cvdataset import ShuffledBatches
from fedhug import Distillation, FedHUG
from federation import FedAvg, clone_weights, load_checkpoint
from models import build_model
from utils import build_parser, parse_args


def tiny_setup(*flags):
    """Two clients of random 28x28 images (no real data needed) and the FedHUG flags."""
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (60, 1, 28, 28), dtype=torch.uint8, generator=g)
    labels = torch.cat([torch.randint(0, 3, (30,), generator=g), torch.randint(0, 10, (30,), generator=g)])
    data = cvdataset.Dataset("fashionmnist", images, labels, images[:10], labels[:10], 10, (0.5,), (0.5,))
    args = parse_args(build_parser("test"), ["--n_parties", "2", "--start_round", "1", "--g_steps", "3",
                                             "--synthesis_batch_size", "12", "--num_local_iterations", "4",
                                             "--batch_size", "8", *flags])
    return args, data, [list(range(30)), list(range(30, 60))]


def make(algorithm_class, args, data, parts, initial_weights):
    torch.manual_seed(1)
    algorithm = algorithm_class(args, data, parts, torch.device("cpu"))
    algorithm.initial_weights = initial_weights
    return algorithm


def weights_of_seed(seed, data):
    torch.manual_seed(seed)
    return clone_weights(build_model("simplecnn-mnist", 10, data.image_shape).state_dict())


def test_rounds_before_start_round_are_exactly_fedavg():
    args, data, parts = tiny_setup()
    w0 = weights_of_seed(0, data)
    fedavg = make(FedAvg, args, data, parts, w0).client_update(w0, {}, 1, round_index=0)
    fedhug = make(FedHUG, args, data, parts, w0).client_update(w0, {}, 1, round_index=0)
    assert all(torch.equal(fedavg.weights[k], fedhug.weights[k]) for k in w0)
    assert fedhug.log_lines == []


def parse_client_line(line):
    m = re.search(r"drift ([\d.]+), budget (\d+) \((\d+) synthesised\), weights real ([\d.]+) syn ([\d.]+)", line)
    return float(m[1]), int(m[2]), int(m[3]), float(m[4]), float(m[5])


def test_synthesis_plan_uses_last_model_or_initial_weights():
    args, data, parts = tiny_setup()
    w0, w_global, w_last = (weights_of_seed(s, data) for s in (0, 1, 2))
    algorithm = make(FedHUG, args, data, parts, w0)
    counts = torch.bincount(data.train_labels[30:], minlength=10)
    real_w, syn_w = synthesis.loss_weights(counts)

    # a client that never trained compares the run's initial model with the global model
    never = algorithm.client_update(w0, {}, 1, round_index=1)
    assert len(never.log_lines) == 1
    drift, budget, synthesised, real, syn = parse_client_line(never.log_lines[0])
    assert (drift, budget) == (0.0, 12)               # global == initial: no drift, base budget
    assert real == pytest.approx(real_w, abs=1e-3) and syn == pytest.approx(syn_w, abs=1e-3)
    assert 12 - 10 <= synthesised <= 12

    # a client with a last model compares that model with the global model
    trained = algorithm.client_update(w_global, {"last_model": w_last}, 1, round_index=1)
    drift, budget, *_ = parse_client_line(trained.log_lines[0])
    expected = synthesis.drift(w_last, w_global)
    assert drift == pytest.approx(expected, abs=1e-4) and expected > 0.1
    assert budget == synthesis.synthesis_budget(expected, 12, 1.0, 0.5, 2.0, 10)
    assert all(torch.equal(trained.state["last_model"][k], trained.weights[k]) for k in w0)


def test_local_loss_mixes_real_cross_entropy_and_distillation_by_hand():
    args, data, parts = tiny_setup("--T", "2")
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
    g = torch.Generator().manual_seed(3)
    syn_x, teacher = torch.randn(5, 4, generator=g), torch.randn(5, 3, generator=g)
    x, y = torch.randn(2, 4, generator=g), torch.tensor([0, 2])
    batches = ShuffledBatches((syn_x, teacher), 8, torch.Generator().manual_seed(0))
    ctx = types.SimpleNamespace(round=1, step=0, distillation=Distillation(None, 0.25, 0.75, batches))
    loss = make(FedHUG, args, data, parts, None).local_loss(model, x, y, ctx)
    with torch.no_grad():
        p_t = F.softmax(teacher / 2, 1)
        log_p_s = F.log_softmax(model(syn_x) / 2, 1)        # batch 8 > 5 samples: the whole set
        kl = (p_t * (p_t.log() - log_p_s)).sum() / 5
        ce = -F.log_softmax(model(x), 1)[[0, 1], y].mean()
    assert loss.item() == pytest.approx(0.25 * ce.item() + 0.75 * 4 * kl.item(), rel=1e-5)


def test_synthetic_batches_cover_the_set_and_reshuffle():
    inputs = torch.arange(10.0).view(10, 1)
    batches = ShuffledBatches((inputs, inputs * 2), 4, torch.Generator().manual_seed(0))
    first_pass = [batches.next() for _ in range(3)]
    assert [len(x) for x, _ in first_pass] == [4, 4, 2]
    assert sorted(torch.cat([x for x, _ in first_pass]).view(-1).tolist()) == list(range(10))
    assert all(torch.equal(t, x * 2) for x, t in first_pass)      # inputs keep their own logits
    assert len(batches.next()[0]) == 4                              # a new pass begins


def test_double_gen_resynthesises_halfway_with_the_training_model():
    args, data, parts = tiny_setup("--double_gen")
    w0 = weights_of_seed(0, data)
    algorithm = make(FedHUG, args, data, parts, w0)
    calls = []
    original = algorithm.synthesize

    def recording(ctx, targets, student):
        batches = original(ctx, targets, student)
        calls.append((ctx.step, student, student.training))
        return batches

    algorithm.synthesize = recording
    algorithm.client_update(w0, {"last_model": weights_of_seed(2, data)}, 0, round_index=1)
    assert [(step, student) for step, student, _ in calls] == [(0, algorithm.previous_model),
                                                                (2, algorithm.local_model)]
    assert calls[1][2]                                  # train mode restored after re-synthesis


def test_start_round_after_comm_round_is_a_usage_error(tmp_path):
    result = run_script("fedhug.py", "--start_round", "5", "--comm_round", "3", logdir=tmp_path)
    assert result.returncode == 2
    assert "--start_round 5 exceeds --comm_round 3" in result.stderr
    assert "Traceback" not in result.stderr


def accuracies(stdout):
    return [float(a) for a in re.findall(r">> Round \d+ \| Current Acc: ([\d.]+)", stdout)]


def test_fedavg_then_fedhug_warm_start_on_fashion_mnist(tmp_path):
    common = ["--n_parties", "4", "--beta", "0.5", "--num_local_iterations", "30", "--lr", "0.05"]
    fedavg = run_script("fedavg.py", *common, "--comm_round", "2", logdir=tmp_path, name="fedavg")
    assert fedavg.returncode == 0, fedavg.stderr
    ckpt = load_checkpoint(str(tmp_path / "fedavg"))

    fedhug = run_script("fedhug.py", *common, "--load_path", tmp_path / "fedavg", "--start_round", "2",
                        "--comm_round", "4", "--g_steps", "10", "--synthesis_batch_size", "32",
                        logdir=tmp_path, name="fedhug")
    assert fedhug.returncode == 0, fedhug.stderr
    out = fedhug.stdout
    assert "continuing at round 2" in out
    lines = [line for line in out.splitlines() if line.startswith("fedhug client")]
    assert len(lines) == 8                                   # 4 clients x rounds 2 and 3
    assert [int(re.search(r"client (\d+)", line)[1]) for line in lines] == [0, 1, 2, 3] * 2
    # round 2 compares each client's model carried in the FedAvg checkpoint with the global model
    for k, line in enumerate(lines[:4]):
        expected = synthesis.drift(ckpt["client_states"][k]["last_model"], ckpt["global_weights"])
        assert parse_client_line(line)[0] == pytest.approx(expected, abs=1e-4)
    acc = accuracies(out)
    assert len(acc) == 2 and acc[-1] > 0.3                   # chance is 0.1
