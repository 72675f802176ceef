"""FedHUG's formulas (synthesis.py) against hand-computed values, the DeepInversion BN loss,
the best-step pairing of synthesize, and synthesis on real Fashion-MNIST models."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import cvdataset
import synthesis
from models import build_model

# ----------------------------------------------------------------------------- drift and budget


def test_drift_of_known_tensors_ignores_integer_entries():
    local = {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor([2.0]), "n": torch.tensor(1000)}
    global_ = {"w": torch.tensor([1.0, 0.0]), "b": torch.tensor([0.0]), "n": torch.tensor(0)}
    # difference (0, 2, 2): sqrt(8); global (1, 0, 0): 1
    assert synthesis.drift(local, global_) == pytest.approx(math.sqrt(8) / (1 + 1e-12), rel=1e-12)
    assert synthesis.drift(global_, global_) == 0.0


@pytest.mark.parametrize("drift,base,alpha,classes,expected", [
    (0.3, 256, 1.0, 10, 333),      # 256 * 1.3 = 332.8 -> floor(333.3)
    (0.0, 256, 1.0, 10, 256),
    (5.0, 256, 1.0, 10, 512),      # scale clamped at 2.0
    (0.9, 256, -1.0, 10, 128),     # 1 - 0.9 = 0.1 clamped at 0.5
    (0.5, 3, 1.0, 1, 5),           # 3 * 1.5 = 4.5, rounds half up to 5
    (0.0, 10, -1.0, 100, 100),     # floor(10 * 0.5 + 0.5) = 5 < C = 100
])
def test_synthesis_budget(drift, base, alpha, classes, expected):
    assert synthesis.synthesis_budget(drift, base, alpha, 0.5, 2.0, classes) == expected


# ----------------------------------------------------------------------------- class distribution


def test_class_distribution_targets_and_loss_weights():
    counts = torch.tensor([10, 4, 0])
    entropy = torch.tensor([0.0, 1.0, 0.5])
    # scarcity (0, 6, 10), max + 1 = 11: raw = (0 -> 1e-6, 6 + 11, 10 + 5.5)
    raw = torch.tensor([1e-6, 17.0, 15.5], dtype=torch.float64)
    d = synthesis.class_distribution(counts, entropy, beta_u=1.0)
    assert torch.allclose(d, raw / raw.sum(), rtol=1e-12, atol=0)
    assert d.sum().item() == pytest.approx(1.0)
    # beta_u = 0: scarcity alone
    assert torch.allclose(synthesis.class_distribution(counts, entropy, 0.0),
                          torch.tensor([1e-6, 6, 10], dtype=torch.float64) / (16 + 1e-6))
    # floor(7 * (0.5, 0.3, 0.2)) = (3, 2, 1)
    targets = synthesis.synthesis_targets(torch.tensor([0.5, 0.3, 0.2]), 7)
    assert targets.tolist() == [0, 0, 0, 1, 1, 2]
    # missing = 0 + 6 + 10 = 16, N = 14: syn = 16 / 30
    real_w, syn_w = synthesis.loss_weights(counts)
    assert syn_w == pytest.approx(16 / 30) and real_w == pytest.approx(14 / 30)
    assert synthesis.loss_weights(torch.tensor([5, 5])) == (1.0, 0.0)


class LogitsAreInputs(nn.Module):
    """A 'model' whose logits are its inputs in eval mode and garbage in train mode."""

    def forward(self, x):
        return x if not self.training else torch.zeros_like(x)


def test_per_class_entropy_by_hand_in_eval_mode():
    model = LogitsAreInputs().train()
    big = -1e4                                    # exp(-1e4) is exactly 0 in float32
    batches = [(torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, big]]), torch.tensor([0, 0])),
               (torch.tensor([[0.0, big, big]]), torch.tensor([1]))]
    # class 0: (ln 3 + ln 2) / 2, class 1: 0 (one-hot), class 2: unseen -> ln 3
    e = synthesis.per_class_entropy(model, batches, 3)
    expected = torch.tensor([(math.log(3) + math.log(2)) / 2 / math.log(3), 0.0, 1.0], dtype=torch.float64)
    assert torch.allclose(e, expected, atol=1e-6)
    assert model.training                          # the flag is restored


def test_per_class_entropy_all_equal_gives_zeros_not_nan():
    e = synthesis.per_class_entropy(LogitsAreInputs(), [], 4)   # every class unseen: all log C
    assert e.tolist() == [0.0, 0.0, 0.0, 0.0]
    uniform = [(torch.zeros(4, 2), torch.tensor([0, 1, 0, 1]))]
    assert synthesis.per_class_entropy(LogitsAreInputs(), uniform, 2).tolist() == [0.0, 0.0]


def test_synthesis_loss_by_hand():
    teacher = torch.tensor([[0.0, 0.0]])                 # CE with target 0: ln 2
    student = torch.tensor([[math.log(3.0), 0.0]])        # p = (0.75, 0.25)
    entropy = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    loss = synthesis.synthesis_loss(teacher, student, torch.tensor([0]), torch.tensor(2.0),
                                    bn_weight=0.5, oh_weight=2.0, entropy_weight=0.3, boundary_lambda=0.1)
    assert loss.item() == pytest.approx(0.5 * 2.0 + 2.0 * math.log(2) - 0.3 * entropy + 0.1 * 0.5, rel=1e-6)


# ----------------------------------------------------------------------------- BN statistic loss


def bn_cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.Conv2d(4, 3, 3), nn.BatchNorm2d(3), nn.ReLU(),
                         nn.Flatten(), nn.Linear(3 * 4 * 4, 5)).eval()


def input_of(model, layer, x):
    seen = []
    hook = layer.register_forward_hook(lambda m, inputs, out: seen.append(inputs[0]))
    with torch.no_grad():
        model(x)
    hook.remove()
    return seen[0]


def test_bn_statistic_loss_zero_at_matching_statistics_positive_otherwise():
    model = bn_cnn()
    x = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 + 1
    for layer in (model[1], model[4]):               # running stats := this batch's stats, layer by layer
        f = input_of(model, layer, x)
        layer.running_mean.copy_(f.mean(dim=(0, 2, 3)))
        layer.running_var.copy_(f.var(dim=(0, 2, 3), unbiased=False))
    with synthesis.BNStatisticLoss(model) as bn:
        model(x)
        assert bn.loss().item() == pytest.approx(0.0, abs=1e-5)
        # shift the input: layer 1's mean moves by 3 * sum(conv weights) per channel, and more
        x2 = (x + 3.0).requires_grad_(True)
        model(x2)
        loss = bn.loss()
        assert loss.item() > 0.1
        loss.backward()
        assert x2.grad is not None and x2.grad.abs().sum() > 0
    # hand value: the last BN's running stats moved by (1, 0, 0) and (0, 2, 0) -> 1 + 2
    model[4].running_mean.add_(torch.tensor([1.0, 0.0, 0.0]))
    model[4].running_var.add_(torch.tensor([0.0, 2.0, 0.0]))
    with synthesis.BNStatisticLoss(model) as bn:
        model(x)
        assert bn.loss().item() == pytest.approx(1.0 + 2.0, abs=1e-4)
    assert not model[1]._forward_hooks               # hooks removed


def test_bn_statistic_loss_is_zero_without_batch_norm():
    model = build_model("simplecnn-mnist", 10)
    with synthesis.BNStatisticLoss(model) as bn:
        model(torch.randn(2, 1, 28, 28))
        assert bn.loss().item() == 0.0


# ----------------------------------------------------------------------------- synthesize


def reference_trajectory(teacher, student, targets, x0, steps, lr, weights):
    """The inputs and loss of every step, written out separately from synthesis.synthesize."""
    x = x0.clone().requires_grad_(True)
    opt = torch.optim.Adam([x], lr=lr, betas=(0.5, 0.9), eps=1e-8)
    inputs, losses = [], []
    for _ in range(steps):
        t, s = teacher(x), student(x)
        p = F.softmax(s, 1)
        top = p.topk(2, 1).values
        loss = (weights["oh"] * F.cross_entropy(t, targets)
                - weights["ent"] * (-(p * torch.log(p + 1e-12)).sum(1)).mean()
                + weights["bd"] * (top[:, 0] - top[:, 1]).mean())
        inputs.append(x.detach().clone())
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return inputs, losses


def test_synthesize_keeps_the_best_step_inputs_with_their_own_teacher_logits():
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    student = nn.Sequential(nn.Flatten(), nn.Linear(12, 3)).train()
    targets = torch.tensor([0, 1, 2, 2])
    steps, lr = 12, 3.0                          # a large lr: the loss overshoots, the best step is early
    weights = {"oh": 1.0, "ent": 0.3, "bd": 0.1}
    x, logits = synthesis.synthesize(teacher, student, targets, (3, 2, 2), torch.Generator().manual_seed(5),
                                     steps, lr, 0.0, weights["oh"], weights["ent"], weights["bd"])
    x0 = torch.randn((4, 3, 2, 2), generator=torch.Generator().manual_seed(5))
    # frozen during synthesis, restored afterwards; no parameter received a gradient
    assert student.training and all(p.requires_grad for p in student.parameters())
    assert all(p.grad is None for p in list(teacher.parameters()) + list(student.parameters()))
    inputs, losses = reference_trajectory(teacher, student, targets, x0, steps, lr, weights)
    best = min(range(steps), key=losses.__getitem__)
    assert 0 < best < steps - 1                  # the test is about a best step that is not the last
    assert torch.allclose(x, inputs[best], atol=1e-5)
    assert torch.equal(logits, teacher(x).detach())   # logits belong to the returned inputs


@pytest.fixture(scope="module")
def fashion_models():
    """A teacher trained on all of Fashion-MNIST's classes and a 'local' student trained only
    on classes 0-4, a few hundred SGD steps each."""
    torch.set_num_threads(1)
    data = cvdataset.load_dataset("fashionmnist")
    generator = torch.Generator().manual_seed(0)

    def train(images, labels, steps):
        torch.manual_seed(0)
        model = build_model("simplecnn-mnist", 10)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        stream = cvdataset.BatchStream(images, labels, 64, generator, data.mean, data.std, augment=False)
        for _ in range(steps):
            x, y = stream.next()
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
        return model.eval()

    local = data.train_labels < 5
    return train(data.train_images, data.train_labels, 250), train(data.train_images[local],
                                                                  data.train_labels[local], 100)


def test_synthesis_on_fashion_mnist_models_reaches_hard_valid_samples(fashion_models):
    teacher, student = fashion_models
    targets = torch.arange(10).repeat_interleave(5)

    def invert(entropy_weight, boundary_lambda):
        x, logits = synthesis.synthesize(teacher, student, targets, (1, 28, 28), torch.Generator().manual_seed(1),
                                         60, 0.05, 0.0, 1.0, entropy_weight, boundary_lambda)
        with torch.no_grad():
            s = student(x)
        return ((logits.argmax(1) == targets).float().mean().item(),
                synthesis.softmax_entropy(s).mean().item(), synthesis.top1_top2_margin(s).mean().item())

    agree, entropy, margin = invert(0.3, 0.1)
    plain_agree, plain_entropy, plain_margin = invert(0.0, 0.0)
    assert agree > 0.8 and plain_agree > 0.8        # chance is 0.1
    assert entropy > plain_entropy + 0.2
    assert margin < plain_margin - 0.05


def test_bf16_synthesis_runs_and_still_inverts(fashion_models):
    teacher, student = fashion_models
    targets = torch.arange(10).repeat_interleave(2)
    x, logits = synthesis.synthesize(teacher, student, targets, (1, 28, 28), torch.Generator().manual_seed(1),
                                     30, 0.05, 0.0, 1.0, 0.3, 0.1, bf16=True)
    assert x.dtype == torch.float32 and logits.dtype == torch.float32 and torch.isfinite(logits).all()
    assert (teacher(x).argmax(1) == targets).float().mean() > 0.5
