"""Pieces the personalised methods with extra modules share (FedCP, GPFL, FedDBE): several
optimisers stepped as one, seeded initialisation, named-tensor prefixes, the model's head and
feature size."""
import math

import torch
from torch import nn

from utils import UsageError


class Optimizers:
    """Several optimisers stepped as one (zero_grad, step), after one backward: the reference's
    separate optimisers for the model and for extra modules (GPFL's GCE and CoV, FedDBE's PRBM)."""

    def __init__(self, *optimizers):
        self.optimizers = optimizers

    def zero_grad(self, set_to_none=True):
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=set_to_none)

    def step(self):
        for optimizer in self.optimizers:
            optimizer.step()


def seeded_reset_(module, generator):
    """PyTorch's default initialisation of every Linear (weight and bias ~ U(-1/sqrt(fan_in),
    1/sqrt(fan_in))), LayerNorm (1, 0) and Embedding (N(0, 1)) in `module`, drawn from `generator`
    instead of the global RNG. Returns the module."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.Linear):
                bound = 1 / math.sqrt(m.in_features)
                m.weight.uniform_(-bound, bound, generator=generator)
                if m.bias is not None:
                    m.bias.uniform_(-bound, bound, generator=generator)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                m.weight.normal_(0.0, 1.0, generator=generator)
    return module


def prefixed(weights, prefix):
    """{prefix + name: tensor}, detached copies (a module's state dict as named tensors to send)."""
    return {prefix + k: v.detach().clone() for k, v in weights.items()}


def unprefixed(weights, prefix):
    """The entries under `prefix`, with the prefix removed (to load into the module)."""
    return {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}


def head_module(model):
    """The model's head module (logits = head(features(x)))."""
    return model.classifier


def feature_dim(model):
    """D: the input size of the head's first Linear."""
    return next(m for m in head_module(model).modules() if isinstance(m, nn.Linear)).in_features


def refuse_client_models(args, name):
    if getattr(args, "client_models", None):
        raise UsageError(f"{name} needs one architecture for every client (its extra modules are sized by one "
                         f"feature dimension); drop --client_models")
