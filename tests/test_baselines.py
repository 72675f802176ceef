"""FedProx, MOON, SCAFFOLD and FedNova: their formulas against hand-computed values, and each
entry script reaching well above chance on a short real Fashion-MNIST run."""
import json
import math
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import cvdataset  # noqa: E402
from federation import ClientResult, FedAvg, clone_weights, main, tensor_bytes  # noqa: E402
from fednova import FedNova, normalising_factor  # noqa: E402
from fedprox import FedProx  # noqa: E402
from moon import MOON  # noqa: E402
from scaffold import CONTROL_DELTA, SCAFFOLD  # noqa: E402
from utils import build_parser, parse_args  # noqa: E402

torch.set_num_threads(1)


def make_algorithm(cls, *flags, client_sizes=(8, 8), blank_images=False):
    """An algorithm over a small synthetic Fashion-MNIST-shaped dataset, one client per size.
    Blank (all-zero) images stay blank under crop and flip, so every batch is x = -1."""
    args = parse_args(build_parser("test"), ["--threads", "1", "--n_parties", str(len(client_sizes)), *flags])
    n = sum(client_sizes)
    generator = torch.Generator().manual_seed(0)
    images = (torch.zeros((n, 1, 28, 28), dtype=torch.uint8) if blank_images else
              torch.randint(0, 256, (n, 1, 28, 28), generator=generator, dtype=torch.uint8))
    labels = torch.arange(n) % 10
    data = cvdataset.Dataset("fashionmnist", images, labels, images[:4], labels[:4], 10, (0.5,), (0.5,))
    starts = [sum(client_sizes[:k]) for k in range(len(client_sizes))]
    indices = [torch.arange(s, s + size) for s, size in zip(starts, client_sizes)]
    torch.manual_seed(0)
    return cls(args, data, indices, torch.device("cpu"))


def random_like_parameters(model, generator, scale):
    return {name: scale * torch.randn(p.shape, generator=generator) for name, p in model.named_parameters()}


# ============================================================================ FedProx

def test_fedprox_proximal_term_value_and_gradient():
    algorithm = make_algorithm(FedProx, "--mu", "0.3")
    model, global_model = algorithm.new_model(), algorithm.new_model()   # two different inits
    global_model.requires_grad_(False)
    x = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 3, 5, 9])
    proximal = algorithm.local_loss(model, x, y, SimpleNamespace(global_model=global_model)) \
        - F.cross_entropy(model(x), y)
    proximal.backward()
    pairs = [(p.detach(), g) for p, g in zip(model.parameters(), global_model.parameters())]
    expected_value = 0.15 * sum(float(((p - g) ** 2).sum()) for p, g in pairs)
    assert expected_value > 1.0
    assert proximal.item() == pytest.approx(expected_value, rel=1e-4)
    for p, g in zip(model.parameters(), global_model.parameters()):
        torch.testing.assert_close(p.grad, 0.3 * (p.detach() - g), atol=1e-6, rtol=1e-4)


# ============================================================================ MOON

class FixedOutputs(torch.nn.Module):
    """Stands in for a model: fixed representation z and fixed logits, whatever the input."""

    def __init__(self, z, logits=None):
        super().__init__()
        self.z, self.logits = torch.tensor(z), None if logits is None else torch.tensor(logits)

    def features(self, x):
        return self.z

    def classifier(self, z):
        return self.logits


def test_moon_loss_matches_hand_computation():
    algorithm = make_algorithm(MOON, "--mu", "0.7", "--temperature", "0.5")
    z = [[1.0, 2.0], [3.0, -1.0]]
    z_global = [[2.0, 1.0], [1.0, 1.0]]
    z_previous = [[-1.0, 2.0], [0.0, 1.0]]
    logits = [[0.5, -0.2, 0.1], [0.0, 1.0, -1.0]]
    labels = [0, 2]
    algorithm.previous_model = FixedOutputs(z_previous)
    loss = algorithm.local_loss(FixedOutputs(z, logits), torch.zeros(2, 1, 28, 28), torch.tensor(labels),
                                SimpleNamespace(global_model=FixedOutputs(z_global)))

    def cosine(a, b):
        return sum(p * q for p, q in zip(a, b)) / math.sqrt(sum(p * p for p in a) * sum(q * q for q in b))

    cross_entropy = contrastive = 0.0
    for i in range(2):
        cross_entropy -= math.log(math.exp(logits[i][labels[i]]) / sum(math.exp(v) for v in logits[i])) / 2
        positive = math.exp(cosine(z[i], z_global[i]) / 0.5)
        negative = math.exp(cosine(z[i], z_previous[i]) / 0.5)
        contrastive -= math.log(positive / (positive + negative)) / 2
    assert loss.item() == pytest.approx(cross_entropy + 0.7 * contrastive, rel=1e-6)


def test_moon_previous_model_is_the_clients_last_trained_model():
    algorithm = make_algorithm(MOON, "--mu", "1", "--num_local_iterations", "2")
    initial = clone_weights(algorithm.new_model().state_dict())
    algorithm.initial_weights = initial          # what the engine sets at the start of a run

    def previous_weights():
        return algorithm.previous_model.state_dict()

    def same(a, b):
        return all(torch.equal(a[k], b[k]) for k in a)

    first = algorithm.client_update(initial, {}, 0, 0)
    assert same(previous_weights(), initial)
    later_global = {k: v + 0.01 for k, v in initial.items()}
    second = algorithm.client_update(later_global, first.state, 0, 1)
    assert same(previous_weights(), first.weights)
    assert not same(first.weights, initial) and not same(first.weights, later_global)
    # a client first sampled in round 1 contrasts with the initial model, not the current one
    algorithm.client_update(later_global, {}, 1, 1)
    assert same(previous_weights(), initial)
    # and the previous model changes the training: same round and seed, other previous model
    other = algorithm.client_update(later_global, {"last_model": initial}, 0, 1)
    assert other.metrics["train_loss"] != second.metrics["train_loss"]


# ============================================================================ SCAFFOLD

def corrected_sgd(algorithm, global_weights, client_id, correction, steps, lr, momentum):
    """SCAFFOLD's local training written out by hand on a blank-image client (x = -1 every
    step, the whole client set as one batch): w <- w - lr * v, v = momentum * v + g + (c - c_i)."""
    model = algorithm.new_model()
    model.load_state_dict(global_weights)
    x = -torch.ones(len(algorithm.client_labels[client_id]), 1, 28, 28)
    y = algorithm.client_labels[client_id]
    velocity = {}
    for _ in range(steps):
        grads = dict(zip([n for n, _ in model.named_parameters()],
                         torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))))
        with torch.no_grad():
            for name, p in model.named_parameters():
                d = grads[name] + correction[name]
                velocity[name] = d if name not in velocity else momentum * velocity[name] + d
                p.sub_(lr * velocity[name])
    return dict(model.named_parameters()), grads


def test_scaffold_one_plain_step_sets_client_control_to_the_gradient():
    """K = 1, no momentum: c_i+ = c_i - c + (w - (w - lr (g + c - c_i))) / lr = g."""
    algorithm = make_algorithm(SCAFFOLD, "--num_local_iterations", "1", "--momentum", "0", "--reg", "0",
                               "--lr", "0.1", blank_images=True)
    initial = clone_weights(algorithm.new_model().state_dict())
    generator = torch.Generator().manual_seed(2)
    server_control = random_like_parameters(algorithm.local_model, generator, 0.1)
    client_control = random_like_parameters(algorithm.local_model, generator, 0.1)
    result = algorithm.client_update(initial, {"control": client_control}, 0, 0, {"control": server_control})
    _, gradient_at_global = corrected_sgd(algorithm, initial, 0, {n: 0 * c for n, c in server_control.items()},
                                          1, 0.1, 0.0)
    for name, g in gradient_at_global.items():
        torch.testing.assert_close(result.state["control"][name], g, atol=1e-5, rtol=1e-4)


def test_scaffold_control_variates_client_and_server():
    lr, momentum, steps = 0.1, 0.5, 2            # a = (2 - 0.5 * (1 - 0.25) / 0.5) / 0.5 = 2.5
    algorithm = make_algorithm(SCAFFOLD, "--num_local_iterations", str(steps), "--momentum", str(momentum),
                               "--reg", "0", "--lr", str(lr), client_sizes=(8, 8, 8), blank_images=True)
    initial = clone_weights(algorithm.new_model().state_dict())
    generator = torch.Generator().manual_seed(3)
    server_control = random_like_parameters(algorithm.local_model, generator, 0.1)
    client_control = random_like_parameters(algorithm.local_model, generator, 0.1)
    message = {"control": server_control}
    results = [algorithm.client_update(initial, {"control": client_control}, 0, 0, message),
               algorithm.client_update(initial, {}, 1, 0, message)]          # c_1 = 0: never trained

    zeros = {n: torch.zeros_like(c) for n, c in client_control.items()}
    for result, c_i in zip(results, [client_control, zeros]):
        correction = {n: server_control[n] - c_i[n] for n in c_i}
        local, _ = corrected_sgd(algorithm, initial, result.client_id, correction, steps, lr, momentum)
        for name in c_i:
            expected = c_i[name] - server_control[name] + (initial[name] - local[name]) / (2.5 * lr)
            torch.testing.assert_close(result.state["control"][name], expected, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(result.upload[CONTROL_DELTA + name], expected - c_i[name],
                                       atol=1e-5, rtol=1e-4)
        assert tensor_bytes(result.upload) == 2 * tensor_bytes(initial)   # weights and delta c_i

    server_state = {"control": server_control}
    new_weights = algorithm.server_update(initial, results, server_state)
    for name, c in server_control.items():      # 2 of 3 clients sampled: c + (2/3) * mean = c + sum / 3
        expected = c + (results[0].upload[CONTROL_DELTA + name] + results[1].upload[CONTROL_DELTA + name]) / 3
        torch.testing.assert_close(server_state["control"][name], expected)
    for name in initial:                         # equal sample counts: the plain mean of the models
        torch.testing.assert_close(new_weights[name], (results[0].weights[name] + results[1].weights[name]) / 2)


# ============================================================================ FedNova

def test_fednova_normalising_factor():
    assert normalising_factor(1, 0.9) == pytest.approx(1.0)
    assert normalising_factor(2, 0.5) == pytest.approx(2.5)            # (2 - 0.5 * (1 - 0.25) / 0.5) / 0.5
    assert normalising_factor(3, 0.5) == pytest.approx(4.25)           # (0.5 + 0.75 + 0.875) / 0.5
    assert normalising_factor(5, 0.0) == 5.0
    assert normalising_factor(100, 0.9) == pytest.approx(sum((1 - 0.9 ** k) / 0.1 for k in range(1, 101)))


def test_fednova_server_update_matches_hand_computation():
    """Client A: 30 samples, tau 3 (a = 4.25), w_A = w - 4.25 u; client B: 10 samples, tau 1
    (a = 1), w_B = w - v. So d_A = u, d_B = v, p = (0.75, 0.25), sum p a = 3.4375:
    w - 3.4375 (0.75 u + 0.25 v)."""
    algorithm = make_algorithm(FedNova, "--momentum", "0.5")
    initial = clone_weights(algorithm.new_model().state_dict())
    generator = torch.Generator().manual_seed(4)
    u = random_like_parameters(algorithm.local_model, generator, 0.01)
    v = random_like_parameters(algorithm.local_model, generator, 0.01)
    client_a = ClientResult(0, 30, {n: w - 4.25 * u[n] for n, w in initial.items()}, {}, {}, {"steps": 3}, [])
    client_b = ClientResult(1, 10, {n: w - v[n] for n, w in initial.items()}, {}, {}, {"steps": 1}, [])
    new_weights = algorithm.server_update(initial, [client_a, client_b], {})
    for name, w in initial.items():
        torch.testing.assert_close(new_weights[name], w - 3.4375 * (0.75 * u[name] + 0.25 * v[name]))


def test_fednova_equals_fedavg_with_equal_steps():
    algorithm = make_algorithm(FedNova, "--momentum", "0", "--num_local_iterations", "3", "--lr", "0.1",
                               client_sizes=(8, 16, 24))
    initial = clone_weights(algorithm.new_model().state_dict())
    results = [algorithm.client_update(initial, {}, k, 0) for k in range(3)]
    fednova = algorithm.server_update(initial, results, {})
    fedavg = FedAvg.server_update(algorithm, initial, results, {})
    assert max((fednova[k] - initial[k]).abs().max().item() for k in initial) > 1e-3   # it moved
    assert max((fednova[k] - fedavg[k]).abs().max().item() for k in initial) < 1e-6


def test_bad_flags_are_usage_errors(capsys):
    assert main(FedNova, ["--optimizer", "adam"]) == 2
    assert main(MOON, ["--temperature", "0"]) == 2
    assert main(FedProx, ["--mu", "-1"]) == 2
    assert capsys.readouterr().err.count("error: ") == 3


# ============================================================================ real runs

@pytest.mark.parametrize("script", ["fedprox.py", "moon.py", "scaffold.py", "fednova.py"])
def test_short_fashion_mnist_run_is_well_above_chance(script, tmp_path):
    """3 rounds x 4 clients x 30 iterations, Dir(0.5), lr 0.05. Measured final accuracies:
    FedProx 0.416, MOON 0.429, SCAFFOLD 0.430, FedNova 0.408 (= FedAvg's); chance is 0.1."""
    command = [sys.executable, "-u", script, "--mu", "0.1", "--dataset", "fashionmnist", "--gpu", "0",
               "--partition", "noniid", "--model", "simplecnn-mnist", "--n_parties", "4",
               "--sample_fraction", "1.0", "--num_local_iterations", "30", "--beta", "0.5",
               "--comm_round", "3", "--lr", "0.05", "--save_model", "--threads", "1",
               "--logdir", str(tmp_path), "--log_file_name", "run"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    with open(tmp_path / "run" / "metrics.jsonl") as f:
        history = [json.loads(line) for line in f]
    assert len(history) == 3
    assert history[-1]["accuracy"] > 0.3
    assert (tmp_path / "run" / "global_model.pt").is_file()
    model_bytes = 44426 * 4
    uploaded_per_client = 2 * model_bytes if script == "scaffold.py" else model_bytes
    assert all(record["bytes_uploaded"] == 4 * uploaded_per_client for record in history)
