"""FedALA and Per-FedAvg (algorithms/personalised/fedala.py, perfedavg.py): their distinctive
steps against hand-computed values, and one tiny whole run of each under --eval local."""
import copy
import json

import torch
import torch.nn.functional as F

from algorithms.personalised.fedala import (FedALA, ala_converged, ala_slice, ala_weight_step,
                                            higher_and_lower)
from algorithms.personalised.perfedavg import PerFedAvg, first_order_meta_loss, split_meta_batch
from conftest import algorithm_args, synthetic_client_side
from engine.algorithm import ClientContext, clone_weights


def synthetic(algorithm_class, *flags, sizes=(12, 12)):
    """(algorithm, data) over random Fashion-MNIST-shaped images; client k holds sizes[k] samples."""
    generator = torch.Generator().manual_seed(5)
    total = sum(sizes)
    images = torch.randint(0, 256, (total, 1, 28, 28), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, 10, (total,), generator=generator)
    bounds = torch.tensor((0,) + tuple(sizes)).cumsum(0).tolist()
    indices = [list(range(a, b)) for a, b in zip(bounds, bounds[1:])]
    args = algorithm_args(algorithm_class, "--n_parties", len(sizes), *flags)
    return synthetic_client_side(algorithm_class, args, images, labels, indices)


def context(algorithm, data, k, download, state, seed=0, round_=1):
    return ClientContext(k, round_, download, state, data.clients[k], torch.Generator().manual_seed(seed),
                         algorithm.architecture(k))


def perturbed(weights, scale, seed):
    generator = torch.Generator().manual_seed(seed)
    return {k: v + scale * torch.randn(v.shape, generator=generator) for k, v in weights.items()}


# ============================================================================ FedALA

def test_ala_weight_step_updates_element_wise_and_clips_to_unit_interval():
    weights = torch.tensor([1.0, 0.5, 0.2, 0.0, 0.3])
    grad_hat = torch.tensor([0.5, -1.0, 2.0, -3.0, 1.0])
    delta = torch.tensor([1.0, 1.0, 0.1, 1.0, 1.0])
    # W - eta * g * (Theta - theta) = [0.5, 1.5, 0.0, 3.0, -0.7] -> clipped to [0, 1]
    assert torch.allclose(ala_weight_step(weights, grad_hat, delta, 1.0), torch.tensor([0.5, 1.0, 0.0, 1.0, 0.0]))
    # eta 0.5: [0.75, 1.0, 0.1, 1.0, 0.0]
    assert torch.allclose(ala_weight_step(weights, grad_hat, delta, 0.5), torch.tensor([0.75, 1.0, 0.1, 1.0, 0.0]))


def test_ala_convergence_rule_needs_more_than_n_losses_and_a_small_std():
    flat = [1.0] * 10
    assert not ala_converged(flat, 10, 0.1)                 # 10 recorded: not more than 10
    assert ala_converged([5.0] + flat, 10, 0.1)             # 11: the last 10 have std 0
    alternating = [0.0, 0.3] * 6                            # population std of the last 10: 0.15
    assert not ala_converged(alternating, 10, 0.1)
    assert ala_converged(alternating, 10, 0.16)
    assert not ala_converged([0.0, 0.5] * 6, 10, 0.25)      # std exactly 0.25: not below


def test_higher_tensors_count_parameter_tensors_and_zero_means_all():
    names = ["a.weight", "a.bias", "fc.weight", "fc.bias"]
    assert higher_and_lower(names, 2) == (["fc.weight", "fc.bias"], ["a.weight", "a.bias"])
    assert higher_and_lower(names, 0) == (names, [])
    assert higher_and_lower(names, 9) == (names, [])


def test_ala_slice_is_floor_of_the_percentage_at_a_uniform_offset():
    generator = torch.Generator().manual_seed(0)
    draws = [ala_slice(10, 80, generator) for _ in range(200)]
    assert {length for _, length in draws} == {8}
    assert {offset for offset, _ in draws} == {0, 1, 2}
    assert ala_slice(7, 80, generator)[1] == 5              # floor(5.6)
    assert ala_slice(1, 80, generator) == (0, 1)            # at least one sample


def test_ala_one_pass_matches_hand_computation_and_keeps_lower_tensors_global():
    algorithm, data = synthetic(FedALA, "--batch_size", "16", "--rand_percent", "100", "--ala_eta", "0.7",
                                sizes=(12, 12))
    initial = algorithm.setting.initial_weights[algorithm.args.model]
    global_weights = perturbed(initial, 0.05, 1)
    local = perturbed(initial, 0.05, 2)
    names = [n for n, _ in algorithm.new_model().named_parameters()]
    higher = names[-2:]
    old_weights = {n: torch.full_like(local[n], 0.6) for n in higher}
    state = {"local_model": local, "ala_weights": clone_weights(old_weights), "ala_start_phase": False}
    ctx = context(algorithm, data, 0, {"weights": global_weights}, state)
    algorithm.receive(ctx)

    # by hand: one batch (B = 16 >= 12 samples, offset 0): theta_hat = theta + (Theta - theta) * W,
    # L = CE(theta_hat; all 12 samples), W <- clip(W - eta * dL/dtheta_hat * (Theta - theta), 0, 1)
    model = algorithm.new_model()
    mixed = {**global_weights, **{n: local[n] + (global_weights[n] - local[n]) * old_weights[n] for n in higher}}
    model.load_state_dict(mixed)
    client = data.clients[0]
    x = ((client.images.float() / 255) - 0.5) / 0.5
    loss = F.cross_entropy(model(x), client.labels)
    loss.backward()
    grads = dict(model.named_parameters())
    for n in higher:
        delta = global_weights[n] - local[n]
        expected_w = (old_weights[n] - 0.7 * grads[n].grad * delta).clamp(0, 1)
        assert torch.allclose(state["ala_weights"][n], expected_w, atol=1e-6)
        assert torch.allclose(state["local_model"][n], local[n] + delta * expected_w, atol=1e-6)
        assert not torch.equal(expected_w, old_weights[n])
    for n in names[:-2]:
        assert torch.equal(state["local_model"][n], global_weights[n])
    assert state["ala_start_phase"] is False
    evaluated = algorithm.evaluation_model(ctx)
    for n, v in evaluated.state_dict().items():
        assert torch.equal(v, state["local_model"][n])


def test_ala_is_skipped_while_the_first_tensors_agree_and_starts_with_ones():
    algorithm, data = synthetic(FedALA, "--batch_size", "8")
    initial = algorithm.setting.initial_weights[algorithm.args.model]
    state = {}
    algorithm.receive(context(algorithm, data, 0, {"weights": initial}, state, round_=0))
    assert set(state) == {"local_model"}                    # round 0: nothing learnt, flag untouched
    for n, v in initial.items():
        assert torch.equal(state["local_model"][n], v)
    # the first ALA that runs: W starts at ones, so the first batch sees the global head
    algorithm.receive(context(algorithm, data, 0, {"weights": perturbed(initial, 0.05, 3)}, state))
    assert state["ala_start_phase"] is False
    assert all(0 <= w.min() and w.max() <= 1 for w in state["ala_weights"].values())


def test_first_ala_repeats_passes_until_converged_or_bounded():
    algorithm, data = synthetic(FedALA, "--batch_size", "8", "--ala_threshold", "1e9")
    initial = algorithm.setting.initial_weights[algorithm.args.model]
    download = {"weights": perturbed(initial, 0.05, 4)}
    ctx = context(algorithm, data, 0, download, {"local_model": initial})
    algorithm.receive(ctx)
    assert "ALA converged after 11 passes" in ctx.log_lines[0]   # more than 10 losses, std < 1e9
    ctx = context(algorithm, data, 1, download, ctx.state)       # a later round: one pass, no log
    algorithm.receive(ctx)
    assert ctx.log_lines == []

    algorithm, data = synthetic(FedALA, "--batch_size", "8", "--ala_threshold", "0",
                                "--ala_max_start_passes", "13")
    ctx = context(algorithm, data, 0, download, {"local_model": initial})
    algorithm.receive(ctx)
    assert "stopped at --ala_max_start_passes 13" in ctx.log_lines[0]


# ============================================================================ Per-FedAvg

def test_meta_batch_splits_into_halves():
    x, y = torch.arange(8.0).view(8, 1), torch.arange(8)
    (xd, yd), (xo, yo) = split_meta_batch(x, y, 4)
    assert yd.tolist() == [0, 1, 2, 3] and yo.tolist() == [4, 5, 6, 7]
    (_, yd), (_, yo) = split_meta_batch(x[:5], y[:5], 4)   # a client of 5 < 2B samples
    assert yd.tolist() == [0, 1, 2] and yo.tolist() == [3, 4]
    (_, yd), (_, yo) = split_meta_batch(x[:1], y[:1], 4)
    assert yd.tolist() == yo.tolist() == [0]


def test_first_order_meta_gradient_is_the_gradient_at_the_inner_step():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    inner = (torch.randn(4, 3), torch.tensor([0, 1, 1, 0]))
    outer = (torch.randn(4, 3), torch.tensor([1, 1, 0, 0]))
    alpha = 0.3
    first_order_meta_loss(model, inner, outer, alpha).backward()
    # by hand: theta' = theta - alpha grad CE(theta; D) for W and b, then grad CE(theta'; D')
    w, b = model.weight.detach().clone().requires_grad_(), model.bias.detach().clone().requires_grad_()
    gw, gb = torch.autograd.grad(F.cross_entropy(inner[0] @ w.T + b, inner[1]), (w, b))
    w2 = (w - alpha * gw).detach().requires_grad_()
    b2 = (b - alpha * gb).detach().requires_grad_()
    hw, hb = torch.autograd.grad(F.cross_entropy(outer[0] @ w2.T + b2, outer[1]), (w2, b2))
    assert torch.allclose(model.weight.grad, hw, atol=1e-7) and torch.allclose(model.bias.grad, hb, atol=1e-7)
    assert not torch.allclose(hw, gw)


def test_client_meta_step_is_pfllibs_save_step_grad_restore_step():
    algorithm, data = synthetic(PerFedAvg, "--batch_size", "4", "--num_local_iterations", "1", "--lr", "0.1",
                                "--momentum", "0.9", "--no_augment")
    initial = algorithm.setting.initial_weights[algorithm.args.model]
    ctx = context(algorithm, data, 0, {"weights": initial}, {})
    result = algorithm.client_update(ctx)
    assert result.metrics["steps"] == 1

    # PFLlib: one batch of 2B = 8 from the same shuffle, theta' by an SGD step on the first 4,
    # the gradient at theta' on the last 4, theta restored, then theta -= beta (= lr) * gradient
    x, y = data.clients[0].stream(torch.Generator().manual_seed(0), batch_size=8).next()
    model = algorithm.new_model()
    model.load_state_dict(initial)
    saved = copy.deepcopy(model.state_dict())
    F.cross_entropy(model(x[:4]), y[:4]).backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= 0.1 * p.grad
            p.grad = None
    F.cross_entropy(model(x[4:]), y[4:]).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    for n, v in result.upload["weights"].items():
        assert torch.allclose(v, saved[n] - 0.1 * grads[n], atol=1e-6), n    # plain SGD: no momentum


def test_perfedavg_steps_twice_the_epochs_of_meta_batches():
    algorithm, data = synthetic(PerFedAvg, "--batch_size", "4", "--epochs", "3", sizes=(21, 5))
    assert algorithm.local_steps(context(algorithm, data, 0, {}, {})) == 2 * 3 * (21 // 8)
    assert algorithm.local_steps(context(algorithm, data, 1, {}, {})) == 2 * 3


def test_evaluation_is_one_sgd_step_from_the_global_model_and_changes_nothing():
    algorithm, data = synthetic(PerFedAvg, "--batch_size", "4", "--lr", "0.2", "--no_augment")
    initial = algorithm.setting.initial_weights[algorithm.args.model]
    download = {"weights": clone_weights(initial)}
    state = {}
    evaluated = algorithm.evaluation_model(context(algorithm, data, 1, download, state, seed=7))
    assert state == {} and all(torch.equal(download["weights"][n], initial[n]) for n in initial)
    x, y = data.clients[1].stream(torch.Generator().manual_seed(7)).next()
    assert len(y) == 4
    model = algorithm.new_model()
    model.load_state_dict(initial)
    F.cross_entropy(model(x), y).backward()
    for n, p in model.named_parameters():
        assert torch.allclose(evaluated.state_dict()[n], p.detach() - 0.2 * p.grad, atol=1e-7), n
    assert not evaluated.training


# ============================================================================ tiny whole runs

MODEL_BYTES = 44426 * 4      # simplecnn-mnist, float32: both methods share the whole model
TINY = ["--n_parties", "4", "--batch_size", "16", "--beta", "0.5", "--threads", "1", "--eval", "local",
        "--train_ratio", "0.95"]


def run_in_process(algorithm_class, tmp_path, *flags):
    from engine import main
    assert main(algorithm_class, [*TINY, *map(str, flags), "--logdir", str(tmp_path), "--log_file_name", "run"]) == 0
    records = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    log = open(tmp_path / "run" / "log.txt").read()
    return records, torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True), log


def test_fedala_runs_ala_on_every_client_and_learns(tmp_path):
    records, ckpt, log = run_in_process(FedALA, tmp_path, "--comm_round", "3", "--sample_fraction", "0.5",
                                        "--num_local_iterations", "20", "--rand_percent", "2", "--lr", "0.05")
    assert [r["round"] for r in records] == [0, 1, 2, 3]
    assert records[-1]["accuracy"] > 0.2                    # own test splits; chance is about 0.1
    assert log.count("ALA converged") == 4                  # round 1: the first ALA of all 4 clients
    for k in range(4):                                      # sampled or not, every client adapted
        state = ckpt["client_states"][k]
        assert state["ala_start_phase"] is False
        assert set(state["ala_weights"]) == {"classifier.fc.weight", "classifier.fc.bias"}
    for record in records[:-1]:                             # the whole model goes both ways
        assert record["bytes_uploaded_per_client"] == [MODEL_BYTES + 8] * 2
        assert record["bytes_downloaded_per_client"] == [MODEL_BYTES] * 4


def test_perfedavg_runs_and_its_one_step_models_learn(tmp_path):
    records, _, _ = run_in_process(PerFedAvg, tmp_path, "--comm_round", "2", "--num_local_iterations", "30",
                                   "--lr", "0.1")
    assert records[-1]["accuracy"] > 0.2
    assert records[0]["bytes_uploaded_per_client"] == [MODEL_BYTES + 8] * 4
    assert records[0]["bytes_uploaded_by_kind"] == {"weights": 4 * MODEL_BYTES, "num_samples": 32}
