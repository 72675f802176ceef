"""The gradient-inversion privacy harness: how much of a client's training batch can the server
rebuild from what the client uploads? (issue 16; spec/datafree-hetero-privacy.md section 4)

Attacks
  Inverting Gradients (Geiping et al., NeurIPS 2020; JonasGeiping/invertinggradients
  @1157b61, inversefed/reconstruction_algorithms.py, reconstruct_image.py): B unknown images x,
  drawn N(0, 1) in model space, and the labels (inferred, below) are fitted so that the
  gradient they give points where the target does:
      cost(x) = 1 - <g(x), g*> / (||g(x)|| ||g*||)  + tv * TV(x)
  with the inner product and norms summed over all attacked parameter tensors together
  (cost_fn 'sim', indices 'def', equal weights) and TV(x) = mean |horizontal differences| +
  mean |vertical differences|. Adam (lr 0.1) on x, MultiStepLR gamma 0.1 at iterations
  n // 2.667, n // 1.6, n // 1.142 (3/8, 5/8, 7/8); "signed" steps on sign(dcost/dx); after
  every step x is projected into the box of valid images [(0 - mean)/std, (1 - mean)/std]
  ([-1, 1] for Fashion-MNIST). Restarts: the trial with the lowest final cost (without TV) wins.
  Two named presets (--privacy_preset), the reference's two entry points:
      preset   iterations  tv     signed  lr   restarts  source
      library  4,800       0.1    no      0.1  1         inversefed DEFAULT_CONFIG
      cli      24,000      1e-4   yes     0.1  1         reconstruct_image.py "ours" (--tv, --signed)
  --privacy_iterations and --privacy_restarts override the preset's numbers (the spec's proposal:
  24,000 iterations and 4 restarts on a GPU, a smoke budget such as 500 iterations on the CPU).
  DLG (Zhu et al., NeurIPS 2019; mit-han-lab/dlg main.py): dummy x and dummy label logits, both
  N(0, 1); cost = sum over tensors of ||g(x, softmax(logits)) - g*||^2, the dummy loss being
  soft-label CE; L-BFGS with PyTorch's defaults (lr 1, up to 20 evaluations a step), 300 steps.
  iDLG (Zhao et al. 2020; PatrickZH/Improved-Deep-Leakage-from-Gradients iDLG.py): DLG with
  the label fixed first (below) and only x optimised.

Labels (what IG and iDLG are given; DLG recovers its own)
  B = 1, iDLG's rule: label = argmin_c sum_j dL/dW[c, j] of the last linear layer (exact when
  that layer's input is non-negative, as after SimpleCNN's ReLU).
  B > 1, the bias-sign rule (derived): dL/db_c = mean_i (p_ic - y_ic) < 0 marks class c present;
  the B labels are the present classes, most negative first, and when fewer than B are present
  the remaining slots go one at a time to the class with the largest -dL/db_c / (count + 1).
  An upload without the last layer (a personal head): the labels are optimised with x
  (softmax of dummy logits, as IG does when it is given no labels).
  Scores: label accuracy = multiset overlap / B (B = 1: right or wrong), set precision and recall.

Modes
  probe (A, the comparable worst case): at a chosen round, for a chosen (sampled) client, the
  algorithm's own receive + client_update runs on a fresh instance of the algorithm, from the
  round's download and the client's state before the round, for ONE step on ONE batch of B
  real training images without augmentation (ClientContext.override_batch / override_steps;
  B images drawn from the client's training set), every random draw from the attack's own
  generator. Its upload is turned back into the gradient the attacker inverts:
      plain SGD step 1 (no momentum history):  g = (w_global - w_1) / lr - wd * w_global
  exactly; with Adam the first step reveals only (g + wd w) / (|g + wd w| + eps) ~ its sign,
  which is inverted as it is (target "adam_step"). Per algorithm:
      algorithm                     probe target                    the attacker's model of it
      FedAvg, FedAvgM, FedNova      CE gradient                     exact
      FedProx                       CE gradient (prox term 0 at w_global)  exact
      SCAFFOLD                      CE gradient + (c - c_i)         c (download) and c_i (the sum of
                                                                    the client's past delta c_i) known:
                                                                    (c - c_i) subtracted, exact
      MOON                          CE + mu * contrastive gradient  CE only: mismatch (previous model
                                                                    private)
      FedHUG (round >= start_round) real_w CE + syn_w KD gradient   CE only: mismatch (synthetic batch
                                                                    and weights private)
      a partial upload (FedPer, LG-FedAvg, ...)   the uploaded entries only; the attacker's model
                                    holds the download over the architecture's initial weights
  realistic (B): the actual upload (tau local steps, momentum, weight decay, augmented and
  reshuffled batches). The attacker simulates the client's SGD (its lr, momentum, weight decay,
  tau steps; dummy batches of --batch_size taken in turn from the B dummy images; SCAFFOLD's
  correction w -= lr (c - c_i) after each step) differentiably and matches the simulated update
  w_global - w_tau with the real one, with the same costs (FedProx's and MOON's extra terms are
  not simulated). Augmentation, and the other images the client trained on, cannot be
  simulated: expected to fail, reported anyway. Reconstructions are scored
  against their nearest (lowest MSE) training images of the client; label "accuracy" is the
  fraction of inferred labels the client holds, recall the fraction of its classes found.
  Only SGD is simulated (--optimizer adam: realistic mode is refused).

Metrics, on [0, 1] images (x01 = clamp(x * std + mean, 0, 1): x * 0.5 + 0.5 for Fashion-MNIST)
  PSNR per image = 10 log10(1 / MSE), capped at PSNR_CAP dB (MSE 0) and flagged; mean and max.
  SSIM per image (Wang et al. 2004): Gaussian window 11, sigma 1.5, K1 0.01, K2 0.03, data
  range 1.0, averaged over the valid region only (18 x 18 for 28 x 28), computed with
  torchmetrics (tests/test_privacy.py checks it against scikit-image with
  gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1.0).
  Batches (probe): reconstructions paired with the originals by the Hungarian assignment on MSE
  (scipy.optimize.linear_sum_assignment) before scoring.

Seeds: every attack draws from its own generators, seeded by (init_seed, round, client,
"attack", ...) (utils.derived_seed), never from the run's; the probe runs with torch's, numpy's
and Python's global RNG states restored after it, on its own algorithm instance, from copies
of the client's state: the run computes the same with or without the harness
(tests/test_privacy.py).

Flags (utils.build_parser, group "privacy harness"; run-control flags, outside the checkpoint's
fingerprint): --privacy_rounds R,... (empty: off), --privacy_clients (0), --privacy_batch_sizes
(1; the spec's B in {1, 4, 8}), --privacy_attacks (ig; also dlg, idlg), --privacy_modes (probe;
also realistic), --privacy_preset (cli), --privacy_iterations / --privacy_restarts (0: the
preset's), --privacy_dlg_iterations (300, DLG's).

Output: the run directory's privacy.jsonl, one record per (round, client, mode, B, attack):
algorithm, upload kinds, target, PSNR mean/max, SSIM mean, label accuracy/precision/recall,
psnr_noise / ssim_noise (uniform noise scored the same way: the floor, which nearest-neighbour
scoring lifts in realistic mode), the attack's final cost, iterations, seconds;
privacy/round<r>_client<k>_<mode>_B<B>_<attack>.pt holds the originals and the paired
reconstructions (uint8). Then

    python privacy.py log/ [-o OUTDIR]      # privacy_table.md / .csv and privacy.png

writes the privacy table (algorithm x mode x B x attack: PSNR, SSIM, label accuracy, mean ±
std over the attacked clients, rounds and seeds) and the picture of originals beside
reconstructions, a row per algorithm.

An algorithm whose upload is not its model (HyperFL's hypernetwork) may define
`privacy_surface(self, model, download, result, state_before, mode)` returning an
AttackSurface or a list of them (attacker variants, each a row of the table); the attacks take
any differentiable gradient_fn(x, labels) and target, and fit the surface's `unknown`
parameters (what the attacker does not know of the client's model) with the images.

Reference differences
  - IG is given inferred labels, not the true ones its scripts pass; with no last layer in the
    upload its label logits are one per image, not one vector for the batch.
  - IG's and DLG's originals are stored images; ours are the client's real training images,
    unaugmented, in the suite's normalisation. DLG's images lie in [0, 1] unnormalised and its
    LeNet is sigmoid with weights uniform in [-0.5, 0.5]; ours attack the run's own model.
  - PFLlib's dlg.py flaws are avoided (spec section 4): the target is a recovered gradient (or a
    simulated update), not global - local weights after a whole round; nothing of the client's
    outputs is handed to the attacker; PSNR is on [0, 1] images without the /3; batches are
    scored after the Hungarian pairing, not in the order the attack returns them.
  - DLG / L-BFGS steps that turn NaN stop the attack at the last finite images ("diverged").
  - Parameters the upload leaves unchanged (frozen in that step) are not attacked: the
    attacker sees they did not move.
  - torchmetrics averages SSIM over the whole reflect-padded map by default; we average its
    map over the valid region, as Wang et al. and scikit-image do.
"""
import argparse
import contextlib
import csv
import io
import json
import math
import os
import random
import statistics
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import functional_call

import cvdataset
from engine.algorithm import ClientContext
from engine.observers import Observer
from engine.rundir import atomic_write_lines
from utils import UsageError, derived_seed, parse_rounds

PSNR_CAP = 100.0          # dB for a perfect reconstruction (MSE 0), flagged "psnr_capped"
SSIM_WINDOW_SIGMA = 1.5   # Wang et al.: Gaussian window of 11 (radius int(3.5 sigma + 0.5) = 5)
SSIM_K1, SSIM_K2 = 0.01, 0.03

IG_PRESETS = {
    "library": dict(lr=0.1, iterations=4800, tv=0.1, signed=False, boxed=True, restarts=1),
    "cli": dict(lr=0.1, iterations=24000, tv=1e-4, signed=True, boxed=True, restarts=1),
}
ATTACKS = ("ig", "dlg", "idlg")
MODES = ("probe", "realistic")

# What the probe's upload holds besides the CE gradient, where the attacker cannot remove it.
TARGET_NOTES = {
    "moon": "target includes mu * the contrastive gradient (the client's previous model is private)",
    "fedhug": "from --start_round the target includes syn_w * the KD gradient on a private synthetic batch",
}


# ============================================================================ metrics

def to_unit_range(x, mean, std):
    """Model-space images -> [0, 1]: clamp(x * std + mean, 0, 1), per channel."""
    mean_t = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x * std_t + mean_t).clamp(0, 1)


def psnr(images, references, cap=PSNR_CAP):
    """Per-image PSNR (dB) of [0, 1] images [B, C, H, W]: 10 log10(1 / MSE), at most `cap`.
    Returns (psnr [B] float64, capped [B] bool)."""
    mse = (images.double() - references.double()).pow(2).flatten(1).mean(1)
    capped = mse <= 10 ** (-cap / 10)
    values = torch.where(capped, torch.full_like(mse, cap), 10 * torch.log10(1 / mse.clamp_min(1e-300)))
    return values, capped


def ssim(images, references):
    """Per-image SSIM [B] of [0, 1] images (Wang et al.: Gaussian window 11, sigma 1.5, K1 0.01,
    K2 0.03, data range 1.0), the SSIM map of torchmetrics averaged over the valid region."""
    from torchmetrics.functional.image import structural_similarity_index_measure
    _, full = structural_similarity_index_measure(
        images.double(), references.double(), gaussian_kernel=True, sigma=SSIM_WINDOW_SIGMA, kernel_size=11,
        data_range=1.0, k1=SSIM_K1, k2=SSIM_K2, reduction="none", return_full_image=True)
    pad = int(3.5 * SSIM_WINDOW_SIGMA + 0.5)
    return full[..., pad:-pad, pad:-pad].flatten(1).mean(1)


def pairwise_mse(images, references):
    """[len(images), len(references)] mean squared errors."""
    return torch.cdist(images.double().flatten(1), references.double().flatten(1)).pow(2) / images[0].numel()


def hungarian_pairing(images, references):
    """order such that images[order[i]] is paired with references[i], minimising the summed MSE."""
    from scipy.optimize import linear_sum_assignment
    rows, cols = linear_sum_assignment(pairwise_mse(images, references).cpu().numpy())
    order = torch.empty(len(references), dtype=torch.long)
    order[torch.as_tensor(cols)] = torch.as_tensor(rows)
    return order


def nearest_neighbours(images, pool):
    """For each image, the index of its lowest-MSE image in `pool` (||b||^2 - 2 a.b, the same
    argmin as ||a - b||^2)."""
    a, b = images.flatten(1).float(), pool.flatten(1).float()
    return (b.pow(2).sum(1)[None, :] - 2 * a @ b.T).argmin(1)


def image_scores(reconstructions, originals):
    """PSNR mean/max (capped, flagged) and SSIM mean of paired [0, 1] batches."""
    values, capped = psnr(reconstructions, originals)
    return {"psnr_mean": values.mean().item(), "psnr_max": values.max().item(), "psnr_capped": bool(capped.any()),
            "ssim_mean": ssim(reconstructions, originals).mean().item()}


# ============================================================================ labels

def last_layer_names(model):
    """(weight name, bias name or None) of the model's last linear layer (in its classifier)."""
    head = getattr(model, "classifier", model)
    linear = [m for m in head.modules() if isinstance(m, torch.nn.Linear)][-1]
    names = {id(p): n for n, p in model.named_parameters()}
    return names[id(linear.weight)], (names[id(linear.bias)] if linear.bias is not None else None)


def idlg_label(weight_gradient):
    """iDLG: the class whose row of dL/dW (last layer) sums lowest."""
    return int(weight_gradient.sum(1).argmin())


def labels_from_bias(bias_gradient, count):
    """The bias-sign rule: classes with dL/db_c < 0, most negative first; fewer than `count`
    present: extra slots to the largest -dL/db_c / (count_c + 1) in turn."""
    order = torch.argsort(bias_gradient).tolist()
    present = [c for c in order if bias_gradient[c] < 0] or order[:1]
    if len(present) >= count:
        return torch.tensor(sorted(present[:count]))
    counts = {c: 1 for c in present}
    for _ in range(count - len(present)):
        c = max(present, key=lambda c: -bias_gradient[c].item() / (counts[c] + 1))
        counts[c] += 1
    return torch.tensor(sorted(c for c, n in counts.items() for _ in range(n)))


def infer_labels(surface, count):
    """Labels from the target's last-layer entries: iDLG's rule for one image, the bias-sign
    rule for more (row sums of the weight gradient where there is no bias); None without them."""
    if surface.last_weight is None:
        return None
    if count == 1:
        return torch.tensor([idlg_label(surface.last_weight)])
    signal = surface.last_bias if surface.last_bias is not None else surface.last_weight.sum(1)
    return labels_from_bias(signal, count)


def label_scores(inferred, truth, multiset=True):
    """accuracy (multiset overlap / len(inferred); with multiset=False the fraction of inferred
    labels in `truth`), and precision and recall of the label sets."""
    inferred, truth = [int(c) for c in inferred], [int(c) for c in truth]
    if multiset:
        overlap = sum(min(inferred.count(c), truth.count(c)) for c in set(inferred))
        accuracy = overlap / len(inferred)
    else:
        accuracy = sum(c in truth for c in inferred) / len(inferred)
    found, held = set(inferred), set(truth)
    return {"label_accuracy": accuracy, "label_precision": len(found & held) / len(found),
            "label_recall": len(found & held) / len(held)}


# ============================================================================ what is attacked

@dataclass
class AttackSurface:
    """What an attack inverts: gradient_fn(x, labels) -> [tensors], differentiable in x (labels:
    class indices or per-image probabilities), to be matched with `target` (same shapes); the
    target's last-layer entries for label inference (or None); and what the target is.
    unknown: parameters of the client's model the attacker does not know, as {name: its
    starting guess}; each trial fits copies of them with the images (plain Adam, not signed),
    and gradient_fn then takes them: gradient_fn(x, labels, unknown). variant: which attacker
    this is when an algorithm offers several (a row of its own in the table)."""
    gradient_fn: object
    target: list
    last_weight: torch.Tensor = None
    last_bias: torch.Tensor = None
    kind: str = "gradient"
    note: str = ""
    unknown: dict = None
    variant: str = ""

    def fresh_unknowns(self):
        """Trainable copies of the starting guesses ({} when the attacker knows the whole model)."""
        return {k: v.detach().clone().requires_grad_(True) for k, v in (self.unknown or {}).items()}

    def gradients(self, x, labels, unknown):
        return self.gradient_fn(x, labels, unknown) if self.unknown else self.gradient_fn(x, labels)


def has_batch_norm(model):
    return any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())


def model_gradient_fn(model, weights, names):
    """gradient_fn(x, labels[, unknown]) = d CE(model(x), labels) / d weights[names] (create_graph,
    so the cost can be differentiated in x; `unknown` entries replace those of `weights`). Eval mode, as IG; a model with BatchNorm runs in train
    mode on copies of its running statistics (IG issue #6), as the client trained."""
    params = {n: weights[n].detach().clone().requires_grad_(True) for n in names}
    fixed = {k: v.detach() for k, v in weights.items() if k not in params}
    train_mode = has_batch_norm(model)
    model.train(train_mode)

    def gradient_fn(x, labels, unknown=None):
        others = {k: v.clone() for k, v in fixed.items()} if train_mode else fixed
        loss = F.cross_entropy(functional_call(model, {**others, **(unknown or {}), **params}, (x,)), labels)
        return torch.autograd.grad(loss, [params[n] for n in names], create_graph=True)
    return gradient_fn


def simulated_update_fn(model, weights, names, steps, lr, momentum, weight_decay, batch_size, correction=None):
    """gradient_fn(x, labels) = w_global - w_tau after `steps` differentiable SGD steps (PyTorch's
    SGD: d = g + wd w; buf = d at step 0, else momentum buf + d; w -= lr buf; then w -= the
    `correction` of SCAFFOLD, if any) on the dummy images, batches of `batch_size` taken from
    them in turn."""
    correction = correction or {}
    start = {n: weights[n].detach() for n in names}
    fixed = {k: v.detach() for k, v in weights.items() if k not in start}
    train_mode = has_batch_norm(model)
    model.train(train_mode)

    def update_fn(x, labels):
        current = {n: w.clone().requires_grad_(True) for n, w in start.items()}
        buffers = {k: v.clone() for k, v in fixed.items()} if train_mode else fixed
        velocity = {}
        chunks = math.ceil(len(x) / batch_size)
        for step in range(steps):
            part = slice((step % chunks) * batch_size, (step % chunks + 1) * batch_size)
            loss = F.cross_entropy(functional_call(model, {**buffers, **current}, (x[part],)), labels[part])
            grads = torch.autograd.grad(loss, [current[n] for n in names], create_graph=True)
            for n, g in zip(names, grads):
                d = g + weight_decay * current[n] if weight_decay else g
                velocity[n] = d if step == 0 or not momentum else momentum * velocity[n] + d
                current[n] = current[n] - lr * velocity[n]
                if n in correction:
                    current[n] = current[n] - correction[n]
        return [start[n] - current[n] for n in names]
    return update_fn


def upload_surface(algorithm, model, download, result, state_before, mode):
    """The AttackSurface of a weight upload (see the module docstring's table), or a string
    saying why there is none."""
    if hasattr(algorithm, "privacy_surface"):
        return algorithm.privacy_surface(model, download, result, state_before, mode)
    args = algorithm.args
    sent, received = result.upload.get("weights", {}), download.get("weights", {})
    names = [n for n, _ in model.named_parameters()      # what the client sent and trained (changed)
             if n in sent and n in received and not torch.equal(sent[n], received[n])]
    if not names:
        return "the upload holds no trained model weights the download had"
    if mode == "realistic" and args.optimizer != "sgd":
        return f"realistic mode simulates SGD; this run uses --optimizer {args.optimizer}"
    steps = result.metrics.get("steps", 1)
    update = {n: received[n].double() - sent[n].double() for n in names}
    correction = {}             # SCAFFOLD: w <- w - lr (c - c_i) after every step; c and c_i are known
    if "control" in download and "control_delta" in result.upload:
        own = state_before.get("control", {})
        correction = {n: args.lr * (c - own.get(n, torch.zeros_like(c))) for n, c in download["control"].items()
                      if n in update}
    weights = algorithm.compose_weights(algorithm.architecture(result.client_id), download, {})
    if mode == "probe":         # (w_global - w_1) / lr = g + wd w_global (+ c - c_i)
        target = {n: (update[n] - correction.get(n, 0)) / args.lr
                  - (args.reg * received[n].double() if args.optimizer == "sgd" else 0) for n in names}
        kind = "gradient" if args.optimizer == "sgd" else "adam_step"
        gradient_fn = model_gradient_fn(model, weights, names)
    else:
        target, kind = update, f"update ({steps} steps)"
        gradient_fn = simulated_update_fn(model, weights, names, steps, args.lr, args.momentum, args.reg,
                                          args.batch_size, correction)
    dtype = sent[names[0]].dtype
    weight_name, bias_name = last_layer_names(model)
    return AttackSurface(gradient_fn, [target[n].to(dtype) for n in names],
                         target[weight_name].float() if weight_name in target else None,
                         target[bias_name].float() if bias_name in target else None,
                         kind, TARGET_NOTES.get(algorithm.name, ""))


# ============================================================================ attacks

@dataclass
class AttackResult:
    images: torch.Tensor      # model space, detached
    labels: torch.Tensor      # the labels used or recovered
    loss: float               # the final cost
    iterations: int
    seconds: float
    diverged: bool = False


def cosine_cost(trial, target):
    """1 - <trial, target> / (||trial|| ||target||), all tensors as one vector (IG's 'sim')."""
    dot = sum((a * b).sum() for a, b in zip(trial, target))
    trial_norm = sum(a.pow(2).sum() for a in trial).sqrt()
    target_norm = sum(b.pow(2).sum() for b in target).sqrt()
    return 1 - dot / trial_norm / target_norm


def total_variation(x):
    """IG's anisotropic TV: mean |x[..., j+1] - x[..., j]| + mean |x[..., i+1, :] - x[..., i, :]|."""
    return (x[:, :, :, :-1] - x[:, :, :, 1:]).abs().mean() + (x[:, :, :-1, :] - x[:, :, 1:, :]).abs().mean()


def inverting_gradients(surface, labels, shape, count, generator, *, lr=0.1, iterations=24000, tv=1e-4,
                        signed=True, boxed=True, restarts=1, bounds=(-1.0, 1.0), num_classes=10):
    """Inverting Gradients (module docstring): `count` images of `shape` fitted to
    surface.target; labels None: per-image label logits are optimised with x. Every draw comes
    from `generator` (CPU). Returns the AttackResult of the lowest-cost restart."""
    started = time.perf_counter()
    device = surface.target[0].device
    low, high = bounds
    best = None
    for _ in range(restarts):
        x = torch.randn((count, *shape), generator=generator).to(device).requires_grad_(True)
        logits = None if labels is not None else \
            torch.randn((count, num_classes), generator=generator).to(device).requires_grad_(True)
        unknown = surface.fresh_unknowns()
        optimizer = torch.optim.Adam([x] + ([logits] if logits is not None else []) + list(unknown.values()), lr=lr)
        milestones = [int(iterations // 2.667), int(iterations // 1.6), int(iterations // 1.142)]
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=0.1)
        trial_labels = labels
        for _ in range(iterations):
            optimizer.zero_grad()
            if logits is not None:
                trial_labels = logits.softmax(1)
            cost = cosine_cost(surface.gradients(x, trial_labels, unknown), surface.target)
            if not torch.isfinite(cost):
                break
            (cost + tv * total_variation(x) if tv > 0 else cost).backward()
            if signed:
                x.grad.sign_()
            optimizer.step()
            scheduler.step()
            if boxed:
                with torch.no_grad():
                    x.clamp_(low, high)
        if logits is not None:
            trial_labels = logits.detach().softmax(1)
        score = cosine_cost(surface.gradients(x, trial_labels, unknown), surface.target).item()
        if best is None or (math.isfinite(score) and not score >= best[0]):
            final_labels = trial_labels if logits is None else trial_labels.argmax(1)
            best = (score, x.detach(), final_labels.detach().cpu())
    return AttackResult(best[1], best[2], best[0], iterations, time.perf_counter() - started,
                        diverged=not math.isfinite(best[0]))


def dlg(surface, shape, count, generator, *, iterations=300, labels=None, num_classes=10):
    """DLG (labels None: dummy label logits optimised too) or, with labels, iDLG's attack:
    L-BFGS (lr 1, PyTorch's defaults) on the squared L2 gradient distance."""
    started = time.perf_counter()
    device = surface.target[0].device
    x = torch.randn((count, *shape), generator=generator).to(device).requires_grad_(True)
    logits = None if labels is not None else \
        torch.randn((count, num_classes), generator=generator).to(device).requires_grad_(True)
    unknown = surface.fresh_unknowns()
    optimizer = torch.optim.LBFGS([x] + ([logits] if logits is not None else []) + list(unknown.values()), lr=1)

    def closure():
        optimizer.zero_grad()
        trial = surface.gradients(x, labels if logits is None else logits.softmax(1), unknown)
        distance = sum((a - b).pow(2).sum() for a, b in zip(trial, surface.target))
        distance.backward()
        return distance

    kept, loss, diverged, done = x.detach().clone(), math.nan, False, 0
    for done in range(1, iterations + 1):
        value = optimizer.step(closure)
        if not (torch.isfinite(value) and torch.isfinite(x).all()):
            diverged = True
            break
        kept, loss = x.detach().clone(), value.item()
    if not diverged:
        loss = closure().item()          # the cost at the images returned (step() gives the one before)
    recovered = labels if logits is None else logits.detach().argmax(1).cpu()
    return AttackResult(kept, recovered, loss, done, time.perf_counter() - started, diverged)


def run_attack(name, surface, shape, count, generator, settings, num_classes, bounds):
    """One named attack ('ig', 'dlg', 'idlg') on a surface; returns (AttackResult, the labels
    inferred before the attack or None)."""
    if name == "dlg":
        return dlg(surface, shape, count, generator, iterations=settings["dlg_iterations"],
                   num_classes=num_classes), None
    labels = infer_labels(surface, count)
    device = surface.target[0].device
    given = labels.to(device) if labels is not None else None
    if name == "idlg":
        result = dlg(surface, shape, count, generator, iterations=settings["dlg_iterations"], labels=given,
                     num_classes=num_classes)
    else:
        ig = {k: settings[k] for k in ("lr", "iterations", "tv", "signed", "boxed", "restarts")}
        result = inverting_gradients(surface, given, shape, count, generator, bounds=bounds,
                                     num_classes=num_classes, **ig)
    result.labels = result.labels.cpu()
    return result, labels


# ============================================================================ the probe

def attack_generator(init_seed, round_index, client_id, *labels):
    """A generator of the attack's own stream (init_seed, round, client, "attack", ...)."""
    return torch.Generator().manual_seed(derived_seed(init_seed, round_index, client_id, "attack", *labels))


@contextlib.contextmanager
def global_rng_untouched(device):
    """torch's (CPU, and the CUDA device's), numpy's and Python's global RNG states are those
    of before the block after it."""
    numpy_state, python_state = np.random.get_state(), random.getstate()
    devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        np.random.set_state(numpy_state)
        random.setstate(python_state)


def clone_state(obj):
    """A copy of a client state: tensors cloned, dicts and lists copied, the rest shared."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: clone_state(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(clone_state(v) for v in obj)
    return obj


def probe_batch(client_data, count, generator):
    """`count` of the client's training images drawn with `generator`, normalised, unaugmented:
    (x, y)."""
    chosen = torch.randperm(client_data.num_samples, generator=generator)[:count].to(client_data.labels.device)
    return (cvdataset.normalise(client_data.images[chosen], client_data.mean, client_data.std),
            client_data.labels[chosen])


def probe_update(algorithm, client_id, round_index, download, state_before, client_data, batch, generator):
    """The algorithm's own receive + client_update for one step on `batch`, from copies of the
    client's state before the round; every draw from `generator`. Returns the ClientResult."""
    ctx = ClientContext(client_id, round_index, download, clone_state(state_before), client_data, generator,
                        algorithm.architecture(client_id), override_batch=batch, override_steps=1)
    algorithm.receive(ctx)
    return algorithm.client_update(ctx)


# ============================================================================ the observer

def parse_list(text, flag, convert=str, choices=None):
    """'a,b' -> [a, b] (converted, duplicates dropped, order kept); one UsageError line otherwise."""
    items = [part.strip() for part in str(text).split(",") if part.strip()]
    try:
        values = list(dict.fromkeys(convert(item) for item in items))
    except ValueError:
        raise UsageError(f"--{flag} '{text}' is not a comma-separated list of {convert.__name__}s")
    if not values:
        raise UsageError(f"--{flag} is empty")
    bad = [v for v in values if choices is not None and v not in choices]
    if bad:
        raise UsageError(f"--{flag}: unknown '{bad[0]}'; choose from {', '.join(choices)}")
    return values


class PrivacyObserver(Observer):
    """Attacks the uploads of chosen (round, client) pairs (module docstring) and writes
    privacy.jsonl in the run directory; each attacked round's metrics record gets "privacy",
    a short summary of its attacks."""

    def __init__(self, rounds, clients, batch_sizes=(1,), attacks=("ig",), modes=("probe",), preset="cli",
                 iterations=0, restarts=0, dlg_iterations=300):
        self.rounds, self.clients = set(rounds), set(clients)
        self.batch_sizes, self.attacks, self.modes = list(batch_sizes), list(attacks), list(modes)
        self.preset = preset
        self.settings = dict(IG_PRESETS[preset], dlg_iterations=dlg_iterations)
        if iterations:
            self.settings["iterations"] = iterations
        if restarts:
            self.settings["restarts"] = restarts
        self.run = None
        self.states_before, self.summary = {}, []
        self.attacker, self.models = None, {}

    @classmethod
    def from_args(cls, args):
        """The observer the --privacy_* flags ask for; bad values raise UsageError."""
        try:
            rounds = parse_rounds(args.privacy_rounds)
        except ValueError:
            raise UsageError(f"--privacy_rounds '{args.privacy_rounds}' is not a list of rounds (e.g. 0 or 5,49)")
        late = [r for r in rounds if r >= args.comm_round]
        if late:
            raise UsageError(f"--privacy_rounds {late[0]} is not a round of this run (--comm_round {args.comm_round})")
        clients = parse_list(args.privacy_clients, "privacy_clients", int)
        if any(not 0 <= k < args.n_parties for k in clients):
            raise UsageError(f"--privacy_clients must lie in 0..{args.n_parties - 1} (got {args.privacy_clients})")
        batch_sizes = parse_list(args.privacy_batch_sizes, "privacy_batch_sizes", int)
        if any(b < 1 for b in batch_sizes):
            raise UsageError(f"--privacy_batch_sizes must be positive (got {args.privacy_batch_sizes})")
        attacks = parse_list(args.privacy_attacks, "privacy_attacks", choices=ATTACKS)
        modes = parse_list(args.privacy_modes, "privacy_modes", choices=MODES)
        if args.privacy_preset not in IG_PRESETS:
            raise UsageError(f"unknown --privacy_preset '{args.privacy_preset}'; choose {' or '.join(IG_PRESETS)}")
        for flag in ("privacy_iterations", "privacy_restarts"):
            if getattr(args, flag) < 0:
                raise UsageError(f"--{flag} must be >= 0 (0: the preset's; got {getattr(args, flag)})")
        if args.privacy_dlg_iterations < 1:
            raise UsageError(f"--privacy_dlg_iterations must be positive (got {args.privacy_dlg_iterations})")
        if "realistic" in modes and args.optimizer != "sgd":
            raise UsageError(f"--privacy_modes realistic simulates SGD; this run uses --optimizer {args.optimizer}")
        return cls(rounds, clients, batch_sizes, attacks, modes, args.privacy_preset, args.privacy_iterations,
                   args.privacy_restarts, args.privacy_dlg_iterations)

    # ------------------------------------------------------------------ engine hooks
    def attach(self, run):
        """The run (its algorithm class and setting, data, client states, directory); on resume,
        privacy.jsonl is cut back to the rounds before the one the run continues at."""
        self.run = run
        self.path = run.dir.file("privacy.jsonl")
        if os.path.exists(self.path):
            with open(self.path) as f:
                kept = [line.rstrip("\n") for line in f if line.strip()
                        and json.loads(line)["round"] < run.start_round]
            atomic_write_lines(self.path, kept)

    def targeted(self, round_index, client_id):
        return self.run is not None and round_index in self.rounds and client_id in self.clients

    def on_download(self, round_index, client_id, download, server_state):
        """Keep a copy of the client's state before the round (SCAFFOLD's c_i, MOON's previous model)."""
        if self.targeted(round_index, client_id):
            self.states_before[client_id] = clone_state(self.run.client_states[client_id])

    def on_upload(self, round_index, client_id, download, result):
        if not self.targeted(round_index, client_id):
            return
        with global_rng_untouched(self.run.device):
            for mode in self.modes:
                for count in self.batch_sizes:
                    for record in self.attack_client(round_index, client_id, download, result, mode, count):
                        self.write(record)

    def end_round(self, round_index):
        summary, self.summary, self.states_before = self.summary, [], {}
        return {"privacy": summary} if summary else {}

    # ------------------------------------------------------------------ attacks
    def attacker_parts(self, architecture):
        """A fresh instance of the run's algorithm (its own models and attributes, so the probe
        leaves the run's instance alone) and the attacker's model of `architecture`."""
        if self.attacker is None:
            self.attacker = self.run.algorithm_class(self.run.algorithm.setting)
        if architecture not in self.models:
            self.models[architecture] = self.attacker.new_model(architecture)
        return self.attacker, self.models[architecture]

    def attack_client(self, round_index, client_id, download, result, mode, count):
        """The records of every attack on one (round, client, mode, B)."""
        run, args = self.run, self.run.args
        data = run.data.clients[client_id]
        algorithm, model = self.attacker_parts(run.algorithm.architecture(client_id))
        state_before = self.states_before.get(client_id, {})
        base = {"algorithm": run.algorithm_class.name, "run": os.path.basename(os.path.normpath(run.dir.path)),
                "seed": args.init_seed, "round": round_index, "client": client_id, "mode": mode, "batch_size": count}
        if count > data.num_samples:
            return [dict(base, skipped=f"the client holds {data.num_samples} images, fewer than B")]
        if mode == "probe":
            batch = probe_batch(data, count, attack_generator(args.init_seed, round_index, client_id, "batch", count))
            attacked = probe_update(algorithm, client_id, round_index, download, state_before, data, batch,
                                    attack_generator(args.init_seed, round_index, client_id, "probe", count))
        else:
            batch, attacked = None, result
        surfaces = upload_surface(algorithm, model, download, attacked, state_before, mode)
        base.update(upload_kinds=sorted(attacked.upload), steps=attacked.metrics.get("steps"))
        if isinstance(surfaces, str):
            return [dict(base, skipped=surfaces)]
        records = []
        for surface in surfaces if isinstance(surfaces, list) else [surfaces]:
            described = dict(base, target=surface.kind, **({"target_note": surface.note} if surface.note else {}),
                             **({"variant": surface.variant} if surface.variant else {}))
            for name in self.attacks:
                generator = attack_generator(args.init_seed, round_index, client_id, mode, count, name)
                outcome, inferred = run_attack(name, surface, tuple(data.images.shape[1:]), count, generator,
                                               self.settings, algorithm.num_classes, self.box(data))
                records.append(self.score(described, name, outcome, inferred, data, batch))
        return records

    def box(self, data):
        """The valid-image box in model space: [(0 - mean) / std, (1 - mean) / std], per channel."""
        mean = torch.tensor(data.mean, device=self.run.device).view(1, -1, 1, 1)
        std = torch.tensor(data.std, device=self.run.device).view(1, -1, 1, 1)
        return (0 - mean) / std, (1 - mean) / std

    def score(self, base, name, outcome, inferred, data, batch):
        """The record of one attack: image and label scores; its images saved for the picture."""
        reconstructions = to_unit_range(outcome.images.float(), data.mean, data.std).nan_to_num(0.0)
        noise = torch.rand(reconstructions.shape, generator=attack_generator(
            self.run.args.init_seed, base["round"], base["client"], "noise", base["batch_size"])).to(self.run.device)
        if batch is not None:       # probe: Hungarian pairing with the batch
            originals = to_unit_range(batch[0], data.mean, data.std)
            reconstructions = reconstructions[hungarian_pairing(reconstructions, originals).to(reconstructions.device)]
            noise, noise_originals = noise[hungarian_pairing(noise, originals).to(noise.device)], originals
            labels = label_scores(outcome.labels.tolist(), batch[1].tolist())
            truth = {"labels_true": sorted(batch[1].tolist())}
        else:                       # realistic: each reconstruction against its nearest training image
            pool = data.images.float() / 255
            originals = pool[nearest_neighbours(reconstructions, pool).to(pool.device)]
            noise_originals = pool[nearest_neighbours(noise, pool).to(pool.device)]
            classes = torch.nonzero(data.class_counts > 0).flatten().tolist()
            labels = label_scores(outcome.labels.tolist(), classes, multiset=False)
            truth = {"client_classes": classes}
        images = image_scores(reconstructions, originals)
        floor = image_scores(noise, noise_originals)        # uniform noise scored the same way: the floor
        images.update(psnr_noise=floor["psnr_mean"], ssim_noise=floor["ssim_mean"])
        variant = f"_{base['variant']}" if base.get("variant") else ""
        picture = os.path.join("privacy", f"round{base['round']}_client{base['client']}_{base['mode']}"
                                          f"_B{base['batch_size']}_{name}{variant}.pt")
        os.makedirs(self.run.dir.file("privacy"), exist_ok=True)
        as_bytes = lambda x: (x * 255).round().to(torch.uint8).cpu()     # noqa: E731
        torch.save({"originals": as_bytes(originals), "reconstructions": as_bytes(reconstructions)},
                   self.run.dir.file(picture))
        settings = ({"preset": self.preset, **{k: self.settings[k] for k in ("tv", "signed", "restarts")}}
                    if name == "ig" else {})
        record = dict(base, attack=name, **settings, labels_inferred=sorted(outcome.labels.tolist()), **truth,
                      **({"labels_given": sorted(inferred.tolist())} if inferred is not None else {}),
                      **labels, **images, attack_loss=outcome.loss if math.isfinite(outcome.loss) else None,
                      iterations=outcome.iterations,
                      diverged=outcome.diverged, seconds=round(outcome.seconds, 3), images=picture)
        self.summary.append({k: record[k] for k in ("client", "mode", "batch_size", "attack", "psnr_mean",
                                                     "ssim_mean", "label_accuracy")})
        return record

    def write(self, record):
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


# ============================================================================ table and picture

def read_privacy_records(paths):
    """Every record of every privacy.jsonl under `paths` (files or folders, searched recursively),
    with "run_dir" added."""
    files = []
    for path in paths:
        if os.path.isfile(path):
            files.append(path)
        elif os.path.isdir(path):
            files += sorted(os.path.join(folder, "privacy.jsonl") for folder, _, names in os.walk(path)
                            if "privacy.jsonl" in names)
        else:
            raise UsageError(f"{path} does not exist")
    records = []
    for file in files:
        with open(file) as f:
            records += [dict(json.loads(line), run_dir=os.path.dirname(os.path.abspath(file)))
                        for line in f if line.strip()]
    if not records:
        raise UsageError(f"no privacy.jsonl records under {', '.join(paths)} (run with --privacy_rounds)")
    return records


def algorithm_label(record):
    """The registry name run.sh gives the run directory (fedavgm_seed0 -> fedavgm), else the
    class's; an attacker variant in brackets (hyperfl [oracle-classifier])."""
    from tables import ALGORITHM_NAMES, split_name
    name = split_name(record["run"])[0]
    name = name if name in ALGORITHM_NAMES else record["algorithm"]
    return f"{name} [{record['variant']}]" if record.get("variant") else name


def labels_in_order(labels):
    """Registry order of the algorithms, each algorithm's attacker variants after it."""
    from tables import algorithm_order
    bases = algorithm_order({label.partition(" [")[0] for label in labels})
    return sorted(labels, key=lambda label: (bases.index(label.partition(" [")[0]), label))


def display_label(label):
    """hyperfl [oracle-classifier] -> HyperFL [oracle-classifier]."""
    from tables import display_name
    name, bracket, variant = label.partition(" [")
    return display_name(name) + bracket + variant


def mean_std(values):
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def summarise_records(records):
    """One row per (algorithm, mode, B, attack), in registry order: attacks, mean ± std of PSNR
    mean and SSIM mean over them, the highest PSNR, mean label accuracy."""
    groups = {}
    for record in records:
        if "skipped" not in record:
            key = (algorithm_label(record), record["mode"], record["batch_size"], record["attack"])
            groups.setdefault(key, []).append(record)
    order = {name: i for i, name in enumerate(labels_in_order({key[0] for key in groups}))}
    rows = []
    for key in sorted(groups, key=lambda k: (order[k[0]], MODES.index(k[1]), k[2], ATTACKS.index(k[3]))):
        group = groups[key]
        psnr_mean, psnr_std = mean_std([r["psnr_mean"] for r in group])
        ssim_mean, ssim_std = mean_std([r["ssim_mean"] for r in group])
        label_mean, _ = mean_std([r["label_accuracy"] for r in group])
        rows.append(dict(zip(("algorithm", "mode", "batch_size", "attack"), key), attacks=len(group),
                         psnr_mean=psnr_mean, psnr_std=psnr_std,
                         psnr_max=max((r["psnr_max"] for r in group if r["psnr_max"] is not None), default=None),
                         ssim_mean=ssim_mean, ssim_std=ssim_std, label_accuracy=label_mean,
                         psnr_noise=mean_std([r.get("psnr_noise") for r in group])[0],
                         diverged=sum(r["diverged"] for r in group),
                         target=", ".join(sorted({r["target"] for r in group}))))
    return rows


def number(value, decimals, spread=None):
    if value is None:
        return "n/a"
    return f"{value:.{decimals}f}" + (f" ± {spread:.{decimals}f}" if spread is not None else "")


def to_markdown(rows):
    lines = ["PSNR / SSIM by algorithm: gradient inversion of client uploads (mean ± std over the attacked "
             "clients, rounds and seeds; PSNR on [0, 1] images, SSIM over the valid region; probe: one step "
             "on B real images, realistic: the actual upload, scored against nearest training images; noise "
             "PSNR: uniform noise scored the same way, the floor)", "",
             "| algorithm | mode | B | attack | attacks | PSNR (dB) | best PSNR (dB) | SSIM | label acc. (%) "
             "| noise PSNR (dB) | target |",
             "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        attack = r["attack"].upper() if r["attack"] != "ig" else "IG"
        diverged = f" ({r['diverged']} diverged)" if r["diverged"] else ""
        lines.append(f"| {display_label(r['algorithm'])} | {r['mode']} | {r['batch_size']} | {attack} | "
                     f"{r['attacks']}{diverged} | {number(r['psnr_mean'], 2, r['psnr_std'])} | "
                     f"{number(r['psnr_max'], 2)} | {number(r['ssim_mean'], 3, r['ssim_std'])} | "
                     f"{number(None if r['label_accuracy'] is None else 100 * r['label_accuracy'], 1)} | "
                     f"{number(r['psnr_noise'], 2)} | {r['target']} |")
    return "\n".join(lines) + "\n"


def to_csv(rows):
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: ("" if v is None else v) for k, v in row.items()} for row in rows)
    return out.getvalue()


def draw_reconstructions(records, path, mode="probe", batch_size=None, attack="ig", columns=8):
    """privacy.png: a row per algorithm, each image as a pair (original, reconstruction), from the
    first attacked round and client of the first run with a (mode, B, attack) record (B: the
    smallest attacked); the row's label gives that attack's PSNR and SSIM."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    chosen = [r for r in records if "skipped" not in r and r["mode"] == mode and r["attack"] == attack]
    if batch_size is None and chosen:
        batch_size = min(r["batch_size"] for r in chosen)
    chosen = [r for r in chosen if r["batch_size"] == batch_size]
    if not chosen:
        return None
    first = {}
    for r in sorted(chosen, key=lambda r: (r["run"], r["round"], r["client"])):
        first.setdefault(algorithm_label(r), r)
    names = labels_in_order(set(first))
    shown = min(batch_size, columns)
    figure, axes = plt.subplots(len(names), 2 * shown, figsize=(1.0 * 2 * shown + 1.4, 1.15 * len(names) + 0.7),
                                squeeze=False)
    for row, name in enumerate(names):
        record = first[name]
        images = torch.load(os.path.join(record["run_dir"], record["images"]), weights_only=True)
        for column in range(2 * shown):
            key = ("originals", "reconstructions")[column % 2]
            axis = axes[row][column]
            axis.imshow((images[key][column // 2].float() / 255).permute(1, 2, 0).squeeze(-1).numpy(), cmap="gray",
                        vmin=0, vmax=1)
            axis.set_xticks([])
            axis.set_yticks([])
            if row == 0:
                axis.set_title(("original", "rebuilt")[column % 2], fontsize=7)
        axes[row][0].set_ylabel(f"{display_label(name).replace(' [', chr(10) + '[')}\nPSNR {number(record['psnr_mean'], 1)} dB\n"
                                f"SSIM {number(record['ssim_mean'], 2)}", fontsize=7)
    figure.suptitle(f"{'IG' if attack == 'ig' else attack.upper()}, {mode}, B = {batch_size}", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def main(argv=None):
    """python privacy.py PATH... [-o OUTDIR]: the privacy table and picture from privacy.jsonl files."""
    parser = argparse.ArgumentParser(description="The privacy table (algorithm x mode x B x attack: PSNR, SSIM, "
                                     "label accuracy) and the picture of originals and reconstructions, from the "
                                     "privacy.jsonl files that runs with --privacy_rounds write.")
    parser.add_argument("paths", nargs="+", help="run directories, folders of them, or privacy.jsonl files")
    parser.add_argument("-o", "--output", default=None, help="folder for privacy_table.md, privacy_table.csv and "
                        "privacy.png (default: the first path if a folder, else the current folder)")
    parser.add_argument("--picture_mode", default="probe", choices=MODES)
    parser.add_argument("--picture_batch_size", type=int, default=None, help="default: the smallest attacked")
    parser.add_argument("--picture_attack", default="ig", choices=ATTACKS)
    args = parser.parse_args(argv)
    try:
        records = read_privacy_records(args.paths)
        output = args.output or (args.paths[0] if os.path.isdir(args.paths[0]) else ".")
        os.makedirs(output, exist_ok=True)
        rows = summarise_records(records)
        if not rows:
            raise UsageError("every privacy record there is a skipped attack: nothing to tabulate")
        markdown = to_markdown(rows)
        with open(os.path.join(output, "privacy_table.md"), "w") as f:
            f.write(markdown)
        with open(os.path.join(output, "privacy_table.csv"), "w") as f:
            f.write(to_csv(rows))
        picture = draw_reconstructions(records, os.path.join(output, "privacy.png"), args.picture_mode,
                                       args.picture_batch_size, args.picture_attack)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(markdown, end="")
    print(f"wrote {os.path.join(output, 'privacy_table.md')}, privacy_table.csv"
          + (", privacy.png" if picture else " (no record for the picture)"), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
