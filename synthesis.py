"""Model inversion for FedHUG (SPEC section 6) and FedF2DG (spec datafree-hetero-privacy.md
section 1), one function per formula.

FedHUG's planning:
    drift                 how far a client's last local model is from the global model
    synthesis_budget      how many samples it synthesises, scaled by its drift
    per_class_entropy     where its last local model is uncertain, per class, in [0, 1]
    class_distribution    which classes to synthesise: scarce and uncertain ones
    synthesis_targets     the label of every sample to synthesise
    loss_weights          how much the local loss trusts real vs synthetic data

The one inversion core both use (no generator network: random inputs optimised directly):
    invert                x ~ N(0, 1), Adam on `inversion_loss` for `steps` steps, optional jitter
                          and clamping to the valid pixel box; returns the lowest-loss step, cloned
    inversion_loss        a sum of optional terms, each weighted by InversionTerms (0 = off), in
                          this order:
        cross_entropy     + w * CE(teacher(x), y)                        (both methods)
        prior             + w * statistic prior: BNStatisticLoss (DeepInversion's BN statistics)
                            or FeatureStatisticLoss (measured statistics of chosen layers)
        entropy           - w * mean H(softmax(student(x)))               (FedHUG)
        margin            + w * mean(p_top1 - p_top2 of the student)      (FedHUG)
        competition       + w * (1 - clamp(JS', 0, 1)), js_competition    (FedF2DG, ADI)
        total_variation   + w * total_variation_4way(x)                   (FedF2DG)
        l2                + w * ||x||_2                                    (FedF2DG)
    synthesize / synthesis_loss   FedHUG's settings of the core (betas (0.5, 0.9), no jitter,
                          no clamp), kept with their published-code signatures: FedHUG's outputs
                          are bit for bit those of the code before the core existed (tested).

Everything here is a pure function of its arguments; every random draw comes from the
`generator` passed in.
"""
import math
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

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


class StatisticLoss:
    """A feature-statistic prior over chosen modules of a model: forward hooks record, for every
    forward pass, sum over the modules of
        ||mean_batch - mean||_2 + ||var_batch - var||_2
    with the batch mean and (biased) variance per channel (dims 0, 2, 3) of the tensor each
    module observes (`observed`) and the reference statistics `reference(module)`. Use as a
    context manager (it removes its hooks)."""

    def __init__(self, modules):
        self.terms = []
        self.hooks = [module.register_forward_hook(self.record) for module in modules]

    def observed(self, inputs, output):
        raise NotImplementedError

    def reference(self, module):
        raise NotImplementedError

    def record(self, module, inputs, output):
        x = self.observed(inputs, output).float()
        mean = x.mean(dim=(0, 2, 3))
        var = x.var(dim=(0, 2, 3), unbiased=False)
        reference_mean, reference_var = self.reference(module)
        self.terms.append(torch.linalg.vector_norm(mean - reference_mean)
                          + torch.linalg.vector_norm(var - reference_var))

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


class BNStatisticLoss(StatisticLoss):
    """DeepInversion's feature-statistic loss (Yin et al. 2020) over a model's BatchNorm2d
    layers: after a forward pass, sum over layers of
        ||mean_batch - running_mean||_2 + ||var_batch - running_var||_2,
    with the batch mean and (biased) variance of each layer's input per channel.
    Zero for a model without batch norm. Use as a context manager (it removes its hooks)."""

    def __init__(self, model):
        super().__init__([m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)])

    def observed(self, inputs, output):
        return inputs[0]

    def reference(self, module):
        return module.running_mean, module.running_var


class FeatureStatisticLoss(StatisticLoss):
    """The BN formula for a model without batch norm (spec section 1, option (b)): the outputs of
    the named modules (feature_layers: every Conv2d, i.e. SimpleCNN's conv1 and conv2 before
    their ReLU) matched to statistics measured on real data, {name: {"mean", "var"}} as
    feature_statistics returns them."""

    def __init__(self, model, statistics):
        modules = dict(model.named_modules())
        missing = [name for name in statistics if name not in modules]
        if missing:
            raise ValueError(f"the model has no module {missing[0]} to match feature statistics at")
        self.statistics = {modules[name]: (s["mean"], s["var"]) for name, s in statistics.items()}
        super().__init__(list(self.statistics))

    def observed(self, inputs, output):
        return output

    def reference(self, module):
        return self.statistics[module]


def feature_layers(model):
    """The modules whose outputs the feature-statistic prior matches: every Conv2d, by name
    (their outputs come before any activation)."""
    return [name for name, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)]


@torch.no_grad()
def feature_statistics(model, batches, layers=None):
    """Per-channel mean and biased variance of the outputs of `layers` (default feature_layers)
    of `model` in eval mode over all samples and positions of `batches` ((x, y) pairs),
    accumulated in float64: {name: {"mean": float32 [channels], "var": float32 [channels]}}."""
    layers = feature_layers(model) if layers is None else layers
    modules = dict(model.named_modules())
    sums = {}

    def accumulate(name, output):
        y = output.detach().double().transpose(0, 1).reshape(output.shape[1], -1)
        s = sums.setdefault(name, [0.0, 0.0, 0])
        s[0], s[1], s[2] = s[0] + y.sum(1), s[1] + y.pow(2).sum(1), s[2] + y.shape[1]

    hooks = [modules[name].register_forward_hook(lambda m, i, o, name=name: accumulate(name, o)) for name in layers]
    try:
        with frozen_eval(model):
            for x, _ in batches:
                model(x)
    finally:
        for hook in hooks:
            hook.remove()
    statistics = {}
    for name in layers:
        total, total_sq, count = sums[name]
        mean = total / count
        statistics[name] = {"mean": mean.float(), "var": (total_sq / count - mean.pow(2)).clamp(min=0).float()}
    return statistics


def top1_top2_margin(logits):
    """Per-sample p_top1 - p_top2 of softmax(logits)."""
    top2 = F.softmax(logits.float(), dim=1).topk(2, dim=1).values
    return top2[:, 0] - top2[:, 1]


def js_competition(student_logits, teacher_logits, temperature):
    """Adaptive DeepInversion's competition term as FedF2DG implements it
    (deepinversion.get_images): P = softmax(student/T), Q = softmax(teacher/T), M = (P + Q) / 2,
    each clamped to [0.01, 0.99] (not renormalised); JS' = 0.5 KL(M || P) + 0.5 KL(M || Q), each
    KL summed over classes and averaged over the batch; returns 1 - clamp(JS', 0, 1) (low where
    student and teacher disagree)."""
    p = F.softmax(student_logits.float() / temperature, dim=1)
    q = F.softmax(teacher_logits.float() / temperature, dim=1)
    m = (0.5 * (p + q)).clamp(0.01, 0.99)
    p, q = p.clamp(0.01, 0.99), q.clamp(0.01, 0.99)
    js = 0.5 * F.kl_div(torch.log(p), m, reduction="batchmean") + 0.5 * F.kl_div(torch.log(q), m, reduction="batchmean")
    return 1.0 - js.clamp(0.0, 1.0)


def total_variation_4way(x):
    """||dh||_2 + ||dv||_2 + ||d1||_2 + ||d2||_2: Frobenius norms (not squared, not averaged) of
    the batch's horizontal, vertical and both diagonal neighbour differences (FedF2DG's TV)."""
    differences = (x[:, :, :, :-1] - x[:, :, :, 1:], x[:, :, :-1, :] - x[:, :, 1:, :],
                   x[:, :, 1:, :-1] - x[:, :, :-1, 1:], x[:, :, :-1, :-1] - x[:, :, 1:, 1:])
    return sum(torch.linalg.vector_norm(d) for d in differences)


def l2_prior(x):
    """||x||_2 of the whole batch (Frobenius norm)."""
    return torch.linalg.vector_norm(x)


def jitter_offsets(generator, limit):
    """(o1, o2), each uniform in {-limit, ..., limit}, drawn from `generator` (one pair a step)."""
    return tuple(torch.randint(-limit, limit + 1, (2,), generator=generator).tolist())


def jitter(x, offsets):
    """x rolled circularly by offsets (o1, o2) along height and width."""
    return torch.roll(x, shifts=offsets, dims=(2, 3))


def valid_box(mean, std, device=None):
    """(low, high) of valid images in model space, per channel, shaped (1, C, 1, 1):
    low = (0 - mean) / std, high = (1 - mean) / std ([-1, 1] for Fashion-MNIST's 0.5 / 0.5)."""
    mean = torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    std = torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    return (0 - mean) / std, (1 - mean) / std


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


# ============================================================================ the inversion core

@dataclass(frozen=True)
class InversionTerms:
    """The weight of every term of inversion_loss; 0 switches a term off (it is not computed)."""
    cross_entropy: float = 1.0       # teacher CE to the targets
    prior: float = 0.0               # BN or feature statistic prior (the `prior` passed to invert)
    entropy: float = 0.0             # minus the student's mean entropy
    margin: float = 0.0              # the student's mean top-1/top-2 margin
    competition: float = 0.0         # Jensen-Shannon competition, 1 - clamp(JS', 0, 1)
    competition_temperature: float = 3.0
    total_variation: float = 0.0     # 4-way TV of the (jittered) inputs
    l2: float = 0.0                  # ||x||_2 of the (jittered) inputs

    @property
    def needs_student(self):
        return bool(self.entropy or self.margin or self.competition)


def inversion_loss(terms, teacher_logits, student_logits, targets, inputs=None, prior_loss=None):
    """The sum of the terms `terms` switches on, in the module docstring's order."""
    loss = terms.cross_entropy * F.cross_entropy(teacher_logits.float(), targets)
    if terms.prior:
        loss = loss + terms.prior * prior_loss
    if terms.entropy:
        loss = loss - terms.entropy * softmax_entropy(student_logits).mean()
    if terms.margin:
        loss = loss + terms.margin * top1_top2_margin(student_logits).mean()
    if terms.competition:
        loss = loss + terms.competition * js_competition(student_logits, teacher_logits,
                                                         terms.competition_temperature)
    if terms.total_variation:
        loss = loss + terms.total_variation * total_variation_4way(inputs)
    if terms.l2:
        loss = loss + terms.l2 * l2_prior(inputs)
    return loss


@dataclass
class Inversion:
    """The lowest-loss step of an inversion."""
    inputs: torch.Tensor            # that step's inputs (before its jitter), cloned
    teacher_logits: torch.Tensor    # the teacher's logits at that step (float32; on the jittered view)
    loss: float
    step: int


def invert(teacher, student, targets, input_shape, generator, steps, lr, terms, betas=(0.9, 0.999), eps=1e-8,
           jitter_limit=0, box=None, prior=None, bf16=False):
    """Model inversion: x ~ N(0, 1) of shape (len(targets), *input_shape) drawn from `generator`,
    optimised directly by Adam(lr, betas, eps) for `steps` steps on inversion_loss(terms) with
    teacher and student frozen in eval mode (gradients flow to x only). Each step:
      jitter_limit > 0: the models see x rolled by offsets drawn from `generator` (jitter_offsets);
      prior: a StatisticLoss hooked on the teacher (entered here, so its hooks go at the end);
      box (low, high): after the step x is clamped to it (the initial draw too).
    Returns the Inversion of the lowest-loss step (first of equals): its inputs cloned, not the
    final iterate. `bf16` runs the forward passes under bfloat16 autocast (other numbers)."""
    device = targets.device
    x = torch.randn((len(targets), *input_shape), generator=generator).to(device).requires_grad_(True)
    if box is not None:
        clamp_(x, box)
    optimizer = torch.optim.Adam([x], lr=lr, betas=betas, eps=eps)
    best = None
    with frozen_eval(teacher, student), (prior if prior is not None else nullcontext()):
        for step in range(steps):
            view = jitter(x, jitter_offsets(generator, jitter_limit)) if jitter_limit else x
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                teacher_logits = teacher(view)
                student_logits = student(view) if terms.needs_student else None
            loss = inversion_loss(terms, teacher_logits, student_logits, targets, view,
                                  prior.loss() if prior is not None else None)
            value = loss.item()
            if best is None or value < best.loss:
                best = Inversion(x.detach().clone(), teacher_logits.detach().float().clone(), value, step)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if box is not None:
                clamp_(x, box)
    return best


def picture_samples(inputs, targets, num_classes, per_class=8):
    """Up to `per_class` inputs of every class (the first made), for a picture of what inversion
    makes (plot_run.py): {"inputs": float16 on the CPU, "targets": their classes}."""
    keep = torch.cat([torch.nonzero(targets == c).flatten()[:per_class] for c in range(num_classes)])
    return {"inputs": inputs[keep].detach().half().cpu(), "targets": targets[keep].cpu()}


def clamp_(x, box):
    """x clamped in place to box = (low, high), broadcast per channel."""
    with torch.no_grad():
        x.copy_(torch.maximum(torch.minimum(x, box[1]), box[0]))


# ============================================================================ FedHUG's settings

FEDHUG_BETAS = (0.5, 0.9)     # the published FedHUG code's Adam betas


def synthesis_loss(teacher_logits, student_logits, targets, bn_loss, bn_weight, oh_weight,
                   entropy_weight, boundary_lambda):
    """bn * L_bn + oh * CE(teacher(x), y) - entropy_weight * mean H(softmax(student(x)))
    + boundary_lambda * mean(p_top1 - p_top2 of the student): inversion_loss with FedHUG's terms."""
    terms = InversionTerms(cross_entropy=oh_weight, prior=bn_weight, entropy=entropy_weight, margin=boundary_lambda)
    return inversion_loss(terms, teacher_logits, student_logits, targets, prior_loss=bn_loss)


def synthesize(teacher, student, targets, input_shape, generator, steps, lr, bn_weight, oh_weight,
               entropy_weight, boundary_lambda, bf16=False):
    """FedHUG's model inversion: invert with Adam(lr, betas (0.5, 0.9), eps 1e-8), no jitter, no
    clamp, the terms of synthesis_loss (the BN prior on the teacher when bn_weight is set).
    Returns (inputs, teacher_logits) of the lowest-loss step: the inputs of that step and the
    teacher's logits on those same inputs. `bf16` runs the forward passes under bfloat16
    autocast: other numbers; faster only where the hardware has bf16 units (slower on CPUs
    without them)."""
    terms = InversionTerms(cross_entropy=oh_weight, prior=bn_weight, entropy=entropy_weight, margin=boundary_lambda)
    best = invert(teacher, student, targets, input_shape, generator, steps, lr, terms, betas=FEDHUG_BETAS,
                  prior=BNStatisticLoss(teacher) if bn_weight else None, bf16=bf16)
    return best.inputs, best.teacher_logits
