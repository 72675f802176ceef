"""The inversion core of synthesis.py term by term against hand values (4-way total variation,
L2 prior, Jensen-Shannon competition, feature-statistic prior, each term of inversion_loss alone),
the jitter and the valid box, invert's lowest-loss step (cloned, with jitter and clamping), and
FedHUG's bit identity: synthesize and synthesis_loss equal the code before the core existed."""
import math
from contextlib import nullcontext

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import synthesis
from models import build_model

torch.set_num_threads(1)


# ----------------------------------------------------------------------------- single terms

def test_total_variation_4way_by_hand():
    x = torch.tensor([[[[0.0, 1.0], [3.0, 5.0]]]])
    # horizontal (-1, -2): sqrt 5; vertical (-3, -4): 5; diagonal 3 - 1 = 2; anti-diagonal 0 - 5: 5
    assert synthesis.total_variation_4way(x).item() == pytest.approx(math.sqrt(5) + 5 + 2 + 5, rel=1e-6)
    assert synthesis.total_variation_4way(torch.full((2, 3, 4, 4), 7.0)).item() == 0.0


def test_l2_prior_is_the_norm_of_the_whole_batch():
    assert synthesis.l2_prior(torch.tensor([[[[3.0]]], [[[4.0]]]])).item() == pytest.approx(5.0)


def test_js_competition_by_hand_with_and_without_clamping():
    student, teacher = torch.tensor([[0.0, 0.0]]), torch.tensor([[math.log(3.0), 0.0]])
    p, q, m = (0.5, 0.5), (0.75, 0.25), (0.625, 0.375)
    kl = lambda a, b: sum(ai * math.log(ai / bi) for ai, bi in zip(a, b))     # noqa: E731
    expected = 1 - 0.5 * (kl(m, p) + kl(m, q))
    assert synthesis.js_competition(student, teacher, 1.0).item() == pytest.approx(expected, rel=1e-6)
    # the temperature divides the logits
    assert synthesis.js_competition(2 * student, 2 * teacher, 2.0).item() == pytest.approx(expected, rel=1e-6)
    # agreement: JS' = 0, the term is 1 (its largest)
    assert synthesis.js_competition(teacher, teacher, 3.0).item() == pytest.approx(1.0)
    # a one-hot teacher: Q = (1, 0) clamped to (0.99, 0.01), M = (0.75, 0.25), P = (0.5, 0.5)
    clamped = 1 - 0.5 * (kl((0.75, 0.25), (0.5, 0.5)) + kl((0.75, 0.25), (0.99, 0.01)))
    one_hot = synthesis.js_competition(student, torch.tensor([[100.0, 0.0]]), 1.0)
    assert one_hot.item() == pytest.approx(clamped, rel=1e-5)
    # JS' is averaged over the batch (batchmean): two equal rows give the one-row value
    assert synthesis.js_competition(student.repeat(2, 1), teacher.repeat(2, 1), 1.0).item() == pytest.approx(
        expected, rel=1e-6)


def test_each_term_of_inversion_loss_alone_adds_its_weight_times_its_value():
    teacher = torch.tensor([[0.0, 0.0]])                     # CE to class 0: ln 2
    student = torch.tensor([[math.log(3.0), 0.0]])           # p = (0.75, 0.25)
    targets = torch.tensor([0])
    x = torch.tensor([[[[0.0, 1.0], [3.0, 5.0]]]])
    entropy = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    values = {"prior": 2.0, "entropy": -entropy, "margin": 0.5,
              "competition": synthesis.js_competition(student, teacher, 3.0).item(),
              "total_variation": math.sqrt(5) + 12, "l2": math.sqrt(35)}
    for term, value in values.items():
        terms = synthesis.InversionTerms(cross_entropy=2.0, **{term: 0.3})
        loss = synthesis.inversion_loss(terms, teacher, student, targets, x, torch.tensor(2.0))
        assert loss.item() == pytest.approx(2.0 * math.log(2) + 0.3 * value, rel=1e-6), term
    all_on = synthesis.InversionTerms(cross_entropy=2.0, **{term: 0.3 for term in values})
    total = synthesis.inversion_loss(all_on, teacher, student, targets, x, torch.tensor(2.0))
    assert total.item() == pytest.approx(2.0 * math.log(2) + 0.3 * sum(values.values()), rel=1e-6)
    # switched-off terms are not computed: no student, no inputs, no prior needed
    plain = synthesis.inversion_loss(synthesis.InversionTerms(), teacher, None, targets)
    assert plain.item() == pytest.approx(math.log(2), rel=1e-6)
    assert not synthesis.InversionTerms(prior=1, total_variation=1, l2=1).needs_student
    assert synthesis.InversionTerms(competition=1).needs_student


# ----------------------------------------------------------------------------- feature statistics

def conv_model():
    """conv 1x1 (1 -> 2): channel 0 = x, channel 1 = 2x + 1; then a linear head."""
    model = nn.Sequential(nn.Conv2d(1, 2, 1), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 2 * 2, 3))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([1.0, 2.0]).view(2, 1, 1, 1))
        model[0].bias.copy_(torch.tensor([0.0, 1.0]))
    return model


def test_feature_statistics_over_batches_and_the_prior_by_hand():
    model = conv_model().train()
    x = torch.arange(16, dtype=torch.float32).view(4, 1, 2, 2)        # values 0..15: mean 7.5, var 21.25
    stats = synthesis.feature_statistics(model, [(x[:1], None), (x[1:], None)])
    assert synthesis.feature_layers(model) == ["0"] and model.training     # eval inside, restored
    assert torch.allclose(stats["0"]["mean"], torch.tensor([7.5, 16.0]))
    assert torch.allclose(stats["0"]["var"], torch.tensor([21.25, 85.0]))
    zero = {"0": {"mean": torch.zeros(2), "var": torch.zeros(2)}}
    with synthesis.FeatureStatisticLoss(model, zero) as prior:
        model(x)
        # ||(7.5, 16)|| + ||(21.25, 85)||
        assert prior.loss().item() == pytest.approx(math.hypot(7.5, 16) + math.hypot(21.25, 85), rel=1e-6)
        model(x)
        model(x)
        assert prior.loss().item() == pytest.approx(2 * (math.hypot(7.5, 16) + math.hypot(21.25, 85)), rel=1e-6)
        with synthesis.FeatureStatisticLoss(model, stats) as matched:
            model(x)
            assert matched.loss().item() == pytest.approx(0.0, abs=1e-4)
    assert not model[0]._forward_hooks
    assert synthesis.feature_layers(build_model("simplecnn-mnist", 10)) == ["base.conv1", "base.conv2"]


# ----------------------------------------------------------------------------- jitter and box

def test_jitter_offsets_cover_the_range_from_the_generator_and_roll_by_hand():
    draws = [synthesis.jitter_offsets(torch.Generator().manual_seed(3), 2) for _ in range(2)]
    assert draws[0] == draws[1]                                       # a function of the generator
    generator = torch.Generator().manual_seed(0)
    seen = {o for _ in range(200) for o in synthesis.jitter_offsets(generator, 2)}
    assert seen == {-2, -1, 0, 1, 2}
    x = torch.arange(9.0).view(1, 1, 3, 3)
    assert synthesis.jitter(x, (1, 0))[0, 0].tolist() == [[6, 7, 8], [0, 1, 2], [3, 4, 5]]
    assert synthesis.jitter(x, (0, -1))[0, 0].tolist() == [[1, 2, 0], [4, 5, 3], [7, 8, 6]]


def test_valid_box_per_channel():
    low, high = synthesis.valid_box((0.5,), (0.5,))
    assert low.flatten().tolist() == [-1.0] and high.flatten().tolist() == [1.0]
    low, high = synthesis.valid_box((0.2, 0.5), (0.4, 0.25))
    assert low.shape == (1, 2, 1, 1)
    assert torch.allclose(low.flatten(), torch.tensor([-0.5, -2.0])) and torch.allclose(high.flatten(),
                                                                                         torch.tensor([2.0, 2.0]))


# ----------------------------------------------------------------------------- invert

def linear(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 3))


def test_invert_keeps_the_lowest_loss_step_with_jitter_and_clamps_to_the_box():
    teacher, student = linear(0), linear(1)
    targets = torch.tensor([0, 1, 2, 2])
    terms = synthesis.InversionTerms(competition=2.0, total_variation=0.01, l2=0.01)
    steps, lr, box = 12, 1.5, (torch.tensor(-1.0), torch.tensor(1.0))
    best = synthesis.invert(teacher, student, targets, (3, 2, 2), torch.Generator().manual_seed(5), steps, lr,
                            terms, jitter_limit=1, box=box)
    # the same steps written out: the generator gives x0, then one offset pair a step
    generator = torch.Generator().manual_seed(5)
    x = torch.randn((4, 3, 2, 2), generator=generator).clamp(-1, 1).requires_grad_(True)
    optimizer = torch.optim.Adam([x], lr=lr, betas=(0.9, 0.999))
    inputs, losses = [], []
    for _ in range(steps):
        offsets = tuple(torch.randint(-1, 2, (2,), generator=generator).tolist())
        view = torch.roll(x, offsets, (2, 3))
        t, s = teacher(view), student(view)
        loss = (F.cross_entropy(t, targets) + 2.0 * synthesis.js_competition(s, t, 3.0)
                + 0.01 * synthesis.total_variation_4way(view) + 0.01 * view.norm())
        inputs.append(x.detach().clone())
        losses.append(loss.item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            x.clamp_(-1, 1)
    first_best = min(range(steps), key=losses.__getitem__)
    assert best.step == first_best and 0 < first_best < steps - 1       # not the final iterate
    assert torch.allclose(best.inputs, inputs[first_best], atol=1e-5)
    assert best.loss == pytest.approx(losses[first_best], rel=1e-5)
    assert not torch.equal(best.inputs, x.detach())
    assert best.inputs.min() >= -1 and best.inputs.max() <= 1


def test_invert_with_a_bn_prior_removes_its_hooks_and_leaves_the_models_as_they_were():
    torch.manual_seed(0)
    teacher = build_model("simplecnn-mnist-bn", 10).train()
    student = build_model("simplecnn-mnist", 10)
    prior = synthesis.BNStatisticLoss(teacher)
    best = synthesis.invert(teacher, student, torch.arange(4), (1, 28, 28), torch.Generator().manual_seed(0), 3,
                            0.1, synthesis.InversionTerms(prior=1.0, competition=1.0), prior=prior,
                            jitter_limit=2)
    assert best.inputs.shape == (4, 1, 28, 28) and teacher.training
    assert all(not m._forward_hooks for m in teacher.modules())
    assert all(p.requires_grad and p.grad is None for p in teacher.parameters())


# ----------------------------------------------------------------------------- FedHUG bit identity

def pre_refactor_synthesize(teacher, student, targets, input_shape, generator, steps, lr, bn_weight, oh_weight,
                            entropy_weight, boundary_lambda, bf16=False):
    """synthesis.synthesize as it was before the inversion core (commit 1c6e63e), verbatim but for names."""
    device = targets.device
    x = torch.randn((len(targets), *input_shape), generator=generator).to(device).requires_grad_(True)
    optimizer = torch.optim.Adam([x], lr=lr, betas=(0.5, 0.9), eps=1e-8)
    best_loss, best_inputs, best_logits = None, None, None
    bn_statistics = synthesis.BNStatisticLoss(teacher) if bn_weight else nullcontext()
    with synthesis.frozen_eval(teacher, student), bn_statistics:
        for _ in range(steps):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                teacher_logits = teacher(x)
                student_logits = student(x)
            loss = pre_refactor_loss(teacher_logits, student_logits, targets,
                                     bn_statistics.loss() if bn_weight else None,
                                     bn_weight, oh_weight, entropy_weight, boundary_lambda)
            value = loss.item()
            if best_loss is None or value < best_loss:
                best_loss = value
                best_inputs = x.detach().clone()
                best_logits = teacher_logits.detach().float().clone()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return best_inputs, best_logits


def pre_refactor_loss(teacher_logits, student_logits, targets, bn_loss, bn_weight, oh_weight, entropy_weight,
                      boundary_lambda):
    loss = oh_weight * F.cross_entropy(teacher_logits.float(), targets)
    if bn_weight:
        loss = loss + bn_weight * bn_loss
    if entropy_weight:
        loss = loss - entropy_weight * synthesis.softmax_entropy(student_logits).mean()
    if boundary_lambda:
        loss = loss + boundary_lambda * synthesis.top1_top2_margin(student_logits).mean()
    return loss


@pytest.mark.parametrize("teacher_model,weights", [
    ("simplecnn-mnist", (0.0, 1.0, 0.3, 0.1)),      # FedHUG's defaults (bn 0)
    ("simplecnn-mnist-bn", (0.5, 2.0, 0.3, 0.1)),   # the BN prior on
    ("simplecnn-mnist", (0.0, 1.0, 0.0, 0.0)),      # no student term: the student is not run
])
def test_fedhug_synthesis_is_bit_identical_to_the_code_before_the_core(teacher_model, weights):
    torch.manual_seed(0)
    teacher, student = build_model(teacher_model, 10), build_model("simplecnn-mnist", 10)
    targets = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 3, 3])
    runs = [f(teacher, student, targets, (1, 28, 28), torch.Generator().manual_seed(7), 6, 0.05, *weights)
            for f in (synthesis.synthesize, pre_refactor_synthesize)]
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    generator = torch.Generator().manual_seed(1)
    t, s = torch.randn(5, 10, generator=generator), torch.randn(5, 10, generator=generator)
    y = torch.tensor([1, 2, 3, 4, 5])
    assert torch.equal(synthesis.synthesis_loss(t, s, y, torch.tensor(0.7), *weights),
                       pre_refactor_loss(t, s, y, torch.tensor(0.7), *weights))
