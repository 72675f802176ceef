"""InCo aggregation (Chan et al., "Internal Cross-layer Gradients for Extending Homogeneity
to Heterogeneity in Federated Learning", ICLR 2024): HeteroAvg (heteroavg.py), with the averaged
update of every deep convolution corrected by the update of a same-shaped shallow one before it is
applied. InCoAvg, InCoProx, InCoScaffold, InCoNova, InCoMOON: the Hetero* classes with this step
(InCo* = InCoAvg over Hetero*). [InCo]: ChanYunHin/InCo-Aggregation @b767140.

Pairs ([InCo] utils.aggregate_IN_gradients): in every stage, the target layers are the convolution
weights of blocks J >= 1, `<stage>.<J>.conv1.weight` and `<stage>.<J>.conv2.weight` (BN and
downsample excluded), and their reference ("shallow") layer is `<stage>.0.conv2.weight`, of the
same shape [O, I, kh, kw] (stage = stage1/2 for inco5, layer1..4 for inco-resnets). With u the
averaged update (HeteroAvg's mean, or HeteroNova's normalised one), for every channel pair (o, i),
G = u_target[o, i] and G0 = u_reference[o, i] (kh x kw slices; all read before any is changed):

    n = ||G||_F,  n0 = ||G0||_F,  a = <G0, G0>_F,  b = |<G0, G>_F|
    theta = clamp(b / (a + 1e-7), 0, theta_max)
    G'    = clamp((G / (n + 1e-7) + theta * G0 / (n0 + 1e-7)) * (n + n0) / 2, -clip, clip)

The reference layer and every other entry keep their averaged update; the 1e-7 terms guard zero
norms (G = 0 gives G' = 0; G0 = 0 gives theta = 0 and G' = G / 2 up to 1e-7). A target whose block
no sampled client owns has no update and is left alone. Tensors other than 4-d conv weights are
taken whole (the reference's ViT rule: one norm and one product over the vector); the families
here only pair conv weights. SCAFFOLD's control variates are not corrected (the step is on the
weights' update only).

Flags:
    --inco_theta_max 5.0   upper clamp of theta ([InCo] main.py --clamp_max, default 5)
    --inco_clip 0.1        element clamp of the corrected update ([InCo] utils.aggregate_IN_gradients,
                           hard-coded 0.1)

Reference differences:
- The reference reshapes the norms with a hard-coded 3 x 3 kernel; here the kernel dims are the
  tensor's, so the step fits any kh x kw.
- It finds pairs by string slicing of ResNet names (layer_name[:6], '.1.' in the name); here by the
  pattern <stage>.<J>.conv{1,2}.weight with J >= 1 and a same-shaped <stage>.0.conv2.weight, so both
  families (and any with that naming) are covered; a --model with no pair is refused.
- Otherwise as HeteroAvg (heteroavg.py: evaluation on the whole test set, Fashion-MNIST partitioned
  itself, seeded runs).
"""
import re

import torch

from algorithms.inco.heteroavg import HeteroAvg, HeteroMOON, HeteroNova, HeteroProx, HeteroScaffold
from engine import Flag
from utils import UsageError

INCO_REPO = "ChanYunHin/InCo-Aggregation @b767140"
TARGET = re.compile(r"^(?P<stage>.+)\.(?P<block>\d+)\.conv[12]\.weight$")


def inco_pairs(entries):
    """{target: reference} over the names of `entries` (name -> tensor): <stage>.<J>.conv{1,2}.weight
    with J >= 1 -> <stage>.0.conv2.weight, where that reference is present with the same shape."""
    pairs = {}
    for name, value in entries.items():
        match = TARGET.match(name)
        if match is None or int(match["block"]) == 0:
            continue
        reference = f"{match['stage']}.0.conv2.weight"
        if reference in entries and entries[reference].shape == value.shape:
            pairs[name] = reference
    return pairs


def inco_correction(target, reference, theta_max=5.0, clip=0.1, eps=1e-7):
    """G' for every channel pair (the formula above) of a target update and its reference update
    (same shape; [O, I, kh, kw] slice-wise, any other rank as one whole tensor)."""
    dims = tuple(range(2, target.dim())) if target.dim() > 2 else tuple(range(target.dim()))
    norm = torch.linalg.vector_norm(target, dim=dims, keepdim=True)
    reference_norm = torch.linalg.vector_norm(reference, dim=dims, keepdim=True)
    a = (reference * reference).sum(dims, keepdim=True)
    b = (reference * target).sum(dims, keepdim=True).abs()
    theta = (b / (a + eps)).clamp(0, theta_max)
    corrected = (target / (norm + eps) + theta * reference / (reference_norm + eps)) * ((norm + reference_norm) / 2)
    return corrected.clamp(-clip, clip)


def inco_step(update, theta_max=5.0, clip=0.1):
    """The averaged update {name: u} with every target present (and its reference) replaced by its
    correction; computed from the update as given (a new dict; the tensors are not changed)."""
    corrected = dict(update)
    for target, reference in inco_pairs(update).items():
        corrected[target] = inco_correction(update[target], update[reference], theta_max, clip)
    return corrected


class InCoAvg(HeteroAvg):
    """HeteroAvg with the InCo step on the averaged update; InCo* = InCoAvg over Hetero*."""
    name = "incoavg"
    flags = (Flag("inco_theta_max", float, 5.0, "InCo: upper clamp of theta = |<G0, G>| / <G0, G0>",
                  f"{INCO_REPO} fed_experiments/InCo/main.py --clamp_max"),
             Flag("inco_clip", float, 0.1, "InCo: every element of a corrected update clamped to [-clip, clip]",
                  f"{INCO_REPO} fed_experiments/InCo/utils.py aggregate_IN_gradients"))

    @classmethod
    def check_args(cls, args):
        super().check_args(args)
        if not args.inco_theta_max >= 0:
            raise UsageError(f"--inco_theta_max must be >= 0 (got {args.inco_theta_max})")
        if not args.inco_clip > 0:
            raise UsageError(f"--inco_clip must be > 0 (got {args.inco_clip})")

    def init_server(self, initial_weights):
        """The base server state; --model must have layers for InCo to pair."""
        server_state = super().init_server(initial_weights)
        self.pairs = inco_pairs(initial_weights)
        if not self.pairs:
            raise UsageError(f"{self.name}: --model {self.args.model} has no <stage>.<J>.conv1/conv2.weight "
                             "(J >= 1) of the shape of <stage>.0.conv2.weight for InCo to correct; use "
                             "--model inco-cnn-3-3 --client_models inco5 (or resnet26-stage with inco-resnets)")
        return server_state

    def initialise_server(self, server_state, contexts, server):
        """Logs which layers InCo corrects (once, before round 0)."""
        by_reference = {}
        for target, reference in self.pairs.items():
            by_reference.setdefault(reference, []).append(target)
        for reference, targets in by_reference.items():
            server.log(f"InCo: {', '.join(targets)} corrected with {reference}")
        return super().initialise_server(server_state, contexts, server)

    def correct_update(self, update):
        return inco_step(update, self.args.inco_theta_max, self.args.inco_clip)


class InCoProx(InCoAvg, HeteroProx):
    name = "incoprox"


class InCoScaffold(InCoAvg, HeteroScaffold):
    name = "incoscaffold"


class InCoNova(InCoAvg, HeteroNova):
    name = "inconova"


class InCoMOON(InCoAvg, HeteroMOON):
    name = "incomoon"
