"""FedHUG's building blocks (SPEC section 6), one function per formula.

    drift                 how far a client's last local model is from the global model
    synthesis_budget      how many samples it synthesises, scaled by its drift
    per_class_entropy     where its last local model is uncertain, per class, in [0, 1]
    class_distribution    which classes to synthesise: scarce and uncertain ones
    synthesis_targets     the label of every sample to synthesise
    loss_weights          how much the local loss trusts real vs synthetic data
    BNStatisticLoss       DeepInversion's batch-norm statistic loss
    synthesize            model inversion: optimise random inputs against teacher and student

Everything here is a pure function of its arguments; every random draw comes from the
`generator` passed in.
"""
import math
from contextlib import contextmanager, nullcontext

import torch
import torch.nn.functional as F

EPS = 1e-12


def drift(local_weights, global_weights):
    """||net - global||_2 / (||global||_2 + 1e-12), both norms over all floating-point
    state-dict entries taken together as one vector."""
    difference_sq, global_sq = 0.0, 0.0
    for key, g in global_weights.items():
        if not g.is_floating_point():
            continue
        g = g.detach().double()
        difference_sq += (local_weights[key].detach().double() - g).pow(2).sum().item()
        global_sq += g.pow(2).sum().item()
    return math.sqrt(difference_sq) / (math.sqrt(global_sq) + EPS)


def synthesis_budget(drift, base, alpha, min_scale, max_scale, num_classes):
    """scale = clamp(1 + alpha * drift, min_scale, max_scale);
    budget = max(C, floor(base * scale + 0.5))."""
    scale = min(max(1.0 + alpha * drift, min_scale), max_scale)
    return max(num_classes, math.floor(base * scale + 0.5))


def softmax_entropy(logits):
    """Per-sample H = -sum_c p_c log(p_c + 1e-12), p = softmax(logits)."""
    p = F.softmax(logits.float(), dim=1)
    return -(p * torch.log(p + EPS)).sum(dim=1)


@torch.no_grad()
def per_class_entropy(model, batches, num_classes):
    """e_c in [0, 1]: the model's (eval mode) mean entropy H on the samples of true class c,
    log C for classes not seen in `batches`, then min-max normalised over the classes
    (all zeros when every class has the same mean entropy)."""
    entropy_sum = torch.zeros(num_classes, dtype=torch.float64)
    count = torch.zeros(num_classes, dtype=torch.float64)
    with frozen_eval(model):
        for x, y in batches:
            h = softmax_entropy(model(x)).double().cpu()
            entropy_sum.index_add_(0, y.cpu(), h)
            count.index_add_(0, y.cpu(), torch.ones_like(h))
    mean = entropy_sum / count.clamp(min=1)
    mean[count == 0] = math.log(num_classes)
    spread = mean.max() - mean.min()
    if spread <= 0:
        return torch.zeros(num_classes, dtype=torch.float64)
    return (mean - mean.min()) / spread


def class_distribution(class_counts, entropy, beta_u):
    """scarcity_c = n_max - n_c; raw_c = scarcity_c + beta_u * e_c * (max(scarcity) + 1);
    clip at 1e-6; d = raw / sum(raw)."""
    counts = torch.as_tensor(class_counts, dtype=torch.float64)
    scarcity = counts.max() - counts
    raw = scarcity + beta_u * torch.as_tensor(entropy, dtype=torch.float64) * (scarcity.max() + 1)
    raw = raw.clamp(min=1e-6)
    return raw / raw.sum()


def synthesis_targets(distribution, budget):
    """Class c repeated floor(budget * d_c) times, classes in order."""
    repeats = torch.floor(budget * torch.as_tensor(distribution, dtype=torch.float64)).long()
    return torch.repeat_interleave(torch.arange(len(repeats)), repeats)


def loss_weights(class_counts):
    """syn_w = sum_c(n_max - n_c) / (N_k + sum_c(n_max - n_c)), real_w = 1 - syn_w.
    Returns (real_w, syn_w)."""
    counts = torch.as_tensor(class_counts, dtype=torch.float64)
    missing = (counts.max() - counts).sum().item()
    syn_w = missing / (counts.sum().item() + missing)
    return 1.0 - syn_w, syn_w


class BNStatisticLoss:
    """DeepInversion's feature-statistic loss (Yin et al. 2020) over a model's BatchNorm2d
    layers: after a forward pass, sum over layers of
        ||mean_batch - running_mean||_2 + ||var_batch - running_var||_2,
    with the batch mean and (biased) variance of each layer's input per channel.
    Zero for a model without batch norm. Use as a context manager (it removes its hooks)."""

    def __init__(self, model):
        self.terms = []
        self.hooks = [m.register_forward_hook(self.record) for m in model.modules()
                      if isinstance(m, torch.nn.BatchNorm2d)]

    def record(self, module, inputs, output):
        x = inputs[0].float()
        mean = x.mean(dim=(0, 2, 3))
        var = x.var(dim=(0, 2, 3), unbiased=False)
        self.terms.append(torch.linalg.vector_norm(mean - module.running_mean)
                          + torch.linalg.vector_norm(var - module.running_var))

    def loss(self):
        """The loss of the forward passes since the last call (then forgets them)."""
        total = sum(self.terms) if self.terms else torch.zeros(())
        self.terms = []
        return total

    def remove(self):
        for hook in self.hooks:
            hook.remove()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


def top1_top2_margin(logits):
    """Per-sample p_top1 - p_top2 of softmax(logits)."""
    top2 = F.softmax(logits.float(), dim=1).topk(2, dim=1).values
    return top2[:, 0] - top2[:, 1]


@contextmanager
def frozen_eval(*models):
    """The models in eval mode with requires_grad False on every parameter; each module's
    training flag and each parameter's requires_grad are restored afterwards."""
    training = [(m, m.training) for model in models for m in model.modules()]
    requires_grad = [(p, p.requires_grad) for model in models for p in model.parameters()]
    for model in models:
        model.eval()
        model.requires_grad_(False)
    try:
        yield
    finally:
        for m, flag in training:
            m.training = flag
        for p, flag in requires_grad:
            p.requires_grad_(flag)


def synthesis_loss(teacher_logits, student_logits, targets, bn_loss, bn_weight, oh_weight,
                   entropy_weight, boundary_lambda):
    """bn * L_bn + oh * CE(teacher(x), y) - entropy_weight * mean H(softmax(student(x)))
    + boundary_lambda * mean(p_top1 - p_top2 of the student)."""
    loss = oh_weight * F.cross_entropy(teacher_logits.float(), targets)
    if bn_weight:
        loss = loss + bn_weight * bn_loss
    if entropy_weight:
        loss = loss - entropy_weight * softmax_entropy(student_logits).mean()
    if boundary_lambda:
        loss = loss + boundary_lambda * top1_top2_margin(student_logits).mean()
    return loss


def synthesize(teacher, student, targets, input_shape, generator, steps, lr, bn_weight, oh_weight,
               entropy_weight, boundary_lambda, bf16=False):
    """Model inversion (no generator network): x ~ N(0, 1) of shape (len(targets), *input_shape)
    drawn from `generator`, optimised directly by Adam(lr, betas (0.5, 0.9), eps 1e-8) for
    `steps` steps on `synthesis_loss` with teacher and student frozen in eval mode (gradients
    flow to x only). Returns (inputs, teacher_logits) of the lowest-loss step: the inputs of
    that step and the teacher's logits on those same inputs. `bf16` runs the forward passes
    under bfloat16 autocast: other numbers; faster only where the hardware has bf16 units
    (slower on CPUs without them)."""
    device = targets.device
    x = torch.randn((len(targets), *input_shape), generator=generator).to(device).requires_grad_(True)
    optimizer = torch.optim.Adam([x], lr=lr, betas=(0.5, 0.9), eps=1e-8)
    best_loss, best_inputs, best_logits = None, None, None
    bn_statistics = BNStatisticLoss(teacher) if bn_weight else nullcontext()
    with frozen_eval(teacher, student), bn_statistics:
        for _ in range(steps):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                teacher_logits = teacher(x)
                student_logits = student(x)
            loss = synthesis_loss(teacher_logits, student_logits, targets,
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

