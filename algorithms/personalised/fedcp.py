"""FedCP (Zhang, Hua, Wang, Shen, Guan and Xu, "FedCP: Separating Feature Information for
Personalized Federated Learning via Conditional Policy", KDD 2023): a conditional policy network
(CPN) splits every feature vector, element by element, into a personal part read by the client's
own head and a global part read by the global head.

Client k holds, with z = phi_k(x) in R^D (D = the head's input size, C classes):
    phi_k     the feature extractor, overwritten by the global one at every download, trained
    h_k^p     its personal head Linear(D -> C), trained, never uploaded
    h^g       the global head, frozen during local training
    phi^g     a frozen copy of the received global feature extractor (only for the MMD term)
    CPN       Linear(D -> 2D) -> LayerNorm(2D) -> ReLU, reshaped to (B, 2, D), then a soft Gumbel-
              softmax over the pair axis (tau = 1, hard = False): (r, s), r + s = 1 per element
    v_k       its context, Uniform[0, 1)^D at first; after every round it took part in, the column
              sum of its personal head's weight, v_k = sum_c W_k^p[c, :] (a multi-layer head: the
              column sums of the product of its weight matrices)

    (r, s) = CPN(z * v_k / ||v_k||_2)                 Gumbel noise also at evaluation (seeded)
    logits = h_k^p(z * r) + h^g(z * s)
    loss   = CE(logits, y) + lambda * MMD^2(z, phi^g(x))
    MMD^2  = mean_{a,b} [k(z_a, z_b) + k(z'_a, z'_b) - 2 k(z_a, z'_b)],
             k(u, v) = sum_{sigma in {10, 15, 20, 50}} exp(-||u - v||^2 / (2 sigma))

Round: every client is evaluated on its ensemble, then each sampled client trains phi_k, h_k^p and
the CPN (one optimiser: --optimizer/--lr/--momentum/--reg; plain SGD under --scenario pfllib) and
sets its global head to 1/2 h_k^p + 1/2 h^g; it uploads phi_k, that mixed head and its CPN (59,042
floats on simplecnn-mnist: 43,576 + 850 + 14,616); the server averages each, weighted by sample
counts. Download: phi to every client; h^g and the CPN only to the clients that uploaded in the
round before (they also recompute v_k from their personal head then); the others keep theirs.
Reported model (--eval local): global phi, the client's last received h^g and CPN, its own h_k^p
and v_k.

Flags: --fedcp_lambda (5.0): lambda, the MMD weight. Source: TsingZ0/FedCP system/run_me.sh runs
`-lam 5` (FedCP's main.py defaults to 0.0, PFLlib's shared `--lamda` to 1.0).

Sources: TsingZ0/FedCP @7110e97 system/flcore/clients/clientcp.py, servers/servercp.py, run_me.sh;
PFLlib clientcp.py, servercp.py (spec/pfl-advanced.md section 2).

Reference differences:
- Gumbel noise (training and evaluation) and the initial context v_k come from the engine's seeded
  generators (evaluation: its own per (round, client) generator), not from torch's global RNG; so
  the stochastic evaluation is repeatable.
- The initial CPN is drawn with PyTorch's default Linear initialisation from a generator seeded by
  (--init_seed, "fedcp", "cpn"), the same for the server and every client (the reference deep-copies
  one CPN made after torch.manual_seed(0)). Personal and global heads start as the run's initial head.
- FedCP's own repository drops the last incomplete test batch (drop_last on the test loader) and does
  not shuffle the training batches; like PFLlib, every test sample is scored and batches are shuffled.
- A client that did not upload in the last round keeps its stale h^g and CPN, as in the reference;
  the download therefore carries h^g and the CPN to the last round's uploaders only (bytes as the
  reference). A client that trained drops its copies of h^g and the CPN (the reference overwrites
  its h^g with the mixed head, then with the global one): an uploader always receives both with its
  next download, so under full participation the checkpoint holds no per-client CPN (2 D^2 + 5 D
  floats a client: 527,360 for FedAvgCNN).
- --eval global (phi with the averaged mixed head and no CPN) is not FedCP's reported model: refused.
- One architecture for every client (the CPN and the heads are sized by one D): --client_models
  is refused.

Helpers shared with gpfl.py and feddbe.py (Optimizers, seeded_reset_, prefixed, unprefixed,
feature_dim, head_module) live here.
"""
import copy
import sys

import torch
import torch.nn.functional as F
from torch import nn

from algorithms.personalised.common import (feature_dim, head_module, prefixed, refuse_client_models,
                                            seeded_reset_, unprefixed)
from engine import Algorithm, ClientResult, Flag, clone_weights, main, split_head, weighted_average
from utils import UsageError, derived_seed

RBF_BANDWIDTHS = (10.0, 15.0, 20.0, 50.0)
MIX = 0.5           # uploaded global head = MIX * personal + (1 - MIX) * global (hard-coded in the reference)
GUMBEL_TAU = 1.0    # hard-coded in the reference, with hard = False


# ============================================================================ FedCP's pieces

def mmd_rbf(x, y, bandwidths=RBF_BANDWIDTHS):
    """The biased RBF MMD^2 of two batches (B x D): mean over all pairs of k(x, x') + k(y, y') -
    2 k(x, y'), k(u, v) = sum_sigma exp(-||u - v||^2 / (2 sigma)); distances as the reference
    computes them (||u||^2 + ||v||^2 - 2 u.v)."""
    xx, yy, xy = x @ x.T, y @ y.T, x @ y.T
    nx, ny = xx.diag(), yy.diag()
    dxx = nx[:, None] + nx[None, :] - 2 * xx
    dyy = ny[:, None] + ny[None, :] - 2 * yy
    dxy = nx[:, None] + ny[None, :] - 2 * xy

    def kernel(d):
        return sum(torch.exp(-0.5 * d / sigma) for sigma in bandwidths)

    return (kernel(dxx) + kernel(dyy) - 2 * kernel(dxy)).mean()


def gumbel_split(scores, generator, tau=GUMBEL_TAU):
    """(r, s) from scores (B, 2, D): softmax over the pair axis of (scores + Gumbel noise) / tau,
    the noise -log(Exp(1)) drawn on the CPU from `generator` (torch's gumbel_softmax, hard=False)."""
    exponential = torch.empty(scores.shape, dtype=scores.dtype).exponential_(generator=generator)
    policy = torch.softmax((scores - exponential.log().to(scores.device)) / tau, dim=1)
    return policy[:, 0], policy[:, 1]


def policy_context(head_weights):
    """v = column sums of the head's weight (for several Linear layers, of the product of their
    weight matrices, last first), shape (1, D)."""
    matrices = [w for name, w in head_weights.items() if name.endswith("weight") and w.dim() == 2]
    product = matrices[-1]
    for matrix in reversed(matrices[:-1]):
        product = product @ matrix
    return product.detach().sum(0, keepdim=True)


def mix_heads(personal, global_, mix=MIX):
    """The head a client uploads: mix * h^p + (1 - mix) * h^g, entry by entry."""
    return {k: mix * personal[k].detach() + (1 - mix) * global_[k].detach() for k in personal}


class ConditionalPolicyNetwork(nn.Module):
    """CPN: Linear(D -> 2D) -> LayerNorm(2D) -> ReLU, as scores (B, 2, D) (names as the reference's fc.0/fc.1)."""

    def __init__(self, dim):
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(dim, 2 * dim), nn.LayerNorm(2 * dim), nn.ReLU())

    def forward(self, x):
        return self.fc(x).view(len(x), 2, -1)


class FedCPEnsemble(nn.Module):
    """logits = h^p(z * r) + h^g(z * s), (r, s) = Gumbel split of CPN(z * v / ||v||), z = phi(x)."""

    def __init__(self, model, global_head, cpn, context, generator):
        super().__init__()
        self.model, self.global_head, self.cpn = model, global_head, cpn
        self.context, self.generator = context, generator

    def forward(self, x, return_features=False):
        z = self.model.features(x)
        personal, shared = gumbel_split(self.cpn(z * F.normalize(self.context, p=2, dim=1)), self.generator)
        logits = head_module(self.model)(z * personal) + self.global_head(z * shared)
        return (logits, z) if return_features else logits


# ============================================================================ the algorithm

class FedCP(Algorithm):
    name = "fedcp"
    evaluations = ("local",)
    broadcast_to_all = True      # phi goes to every client each round (PFLlib's send_models)
    flags = (Flag("fedcp_lambda", float, 5.0, "lambda: weight of the MMD^2 between local and global features",
                  "TsingZ0/FedCP system/run_me.sh (-lam 5); FedCP main.py 0.0, PFLlib --lamda 1.0"),)

    def __init__(self, setting):
        super().__init__(setting)
        self._extra_modules, self._initial_cpn = {}, None

    @classmethod
    def check_args(cls, args):
        if not args.fedcp_lambda >= 0:
            raise UsageError(f"--fedcp_lambda must be >= 0 (got {args.fedcp_lambda})")
        refuse_client_models(args, "FedCP")

    # ------------------------------------------------------------------ modules
    def dim(self):
        return feature_dim(self.model("local"))

    def module(self, role, kind):
        """A kept instance of an extra module: "cpn" or "global_head"."""
        if (role, kind) not in self._extra_modules:
            if kind == "cpn":
                made = ConditionalPolicyNetwork(self.dim())
            else:
                made = copy.deepcopy(head_module(self.model("local")))
            self._extra_modules[(role, kind)] = made.to(self.device)
        return self._extra_modules[(role, kind)]

    def initial_cpn(self):
        """The run's initial CPN as named tensors "cpn.*" (the same on the server and every client)."""
        if self._initial_cpn is None:
            generator = torch.Generator().manual_seed(derived_seed(self.args.init_seed, "fedcp", "cpn"))
            cpn = seeded_reset_(ConditionalPolicyNetwork(self.dim()), generator)
            self._initial_cpn = prefixed({k: v.to(self.device) for k, v in cpn.state_dict().items()}, "cpn.")
        return clone_weights(self._initial_cpn)

    def ensemble(self, role, model, state, generator):
        """The client's ensemble around `model` (phi and h^p), with its h^g, CPN and context from `state`."""
        global_head = self.module(role, "global_head")
        global_head.load_state_dict(unprefixed(state["global_head"], self.head_prefix()))
        global_head.requires_grad_(False)
        cpn = self.module(role, "cpn")
        cpn.load_state_dict(unprefixed(state["cpn"], "cpn."))
        return FedCPEnsemble(model, global_head, cpn, state["context"], generator)

    # ------------------------------------------------------------------ server
    def init_server(self, initial_weights):
        """weights = phi and h^g (the initial model), the initial CPN, and who uploaded last (nobody)."""
        return {"weights": clone_weights(initial_weights), "cpn": self.initial_cpn(), "uploaders": []}

    def download(self, server_state, client_id):
        """phi to every client; h^g and the CPN to the clients that uploaded in the last round."""
        base, head = split_head(server_state["weights"], self.head_prefix())
        download = {"weights": base}
        if client_id in server_state["uploaders"]:
            download.update(global_head=head, cpn=server_state["cpn"])
        return download

    def server_update(self, server_state, results, server):
        """Sample-weighted averages of phi, the mixed heads (-> h^g) and the CPNs."""
        server_state = super().server_update(server_state, results, server)
        server_state["cpn"] = weighted_average([r.upload["cpn"] for r in results], [r.num_samples for r in results])
        server_state["uploaders"] = [r.client_id for r in results]
        return server_state

    # ------------------------------------------------------------------ client
    def receive(self, ctx):
        """First download: the client's initial heads, CPN and random context. A client that uploaded
        last round gets h^g and the CPN: its context becomes the column sum of its personal head first."""
        state = ctx.state
        if "personal_head" not in state:
            _, head = split_head(self.setting.initial_weights[ctx.architecture], self.head_prefix())
            state.update(personal_head=clone_weights(head), global_head=clone_weights(head), cpn=self.initial_cpn(),
                         context=torch.rand(1, self.dim(), generator=ctx.generator).to(self.device))
        if "global_head" in ctx.download:
            state["context"] = policy_context(state["personal_head"])
            state["global_head"] = clone_weights(ctx.download["global_head"])
            state["cpn"] = clone_weights(ctx.download["cpn"])

    def compose_weights(self, architecture, download, state):
        """The downloaded phi with the client's personal head."""
        weights = super().compose_weights(architecture, download, state)
        weights.update(state.get("personal_head", {}))
        return weights

    def fedcp_loss(self, ensemble, x, y, ctx):
        """CE(h^p(z r) + h^g(z s), y) + lambda * MMD^2(z, phi^g(x))."""
        logits, z = ensemble(x, return_features=True)
        with torch.no_grad():
            z_global = ctx.global_model.features(x)
        return F.cross_entropy(logits, y) + self.args.fedcp_lambda * mmd_rbf(z, z_global)

    def client_update(self, ctx):
        """Train phi, h^p and the CPN (h^g, phi^g frozen); upload phi, the mixed head and the CPN."""
        model = self.client_model(ctx)
        ctx.global_model = self.frozen_model("global", ctx.architecture,
                                             self.compose_weights(ctx.architecture, ctx.download, ctx.state))
        ensemble = self.ensemble("training", model, ctx.state, ctx.generator)
        parameters = [*model.parameters(), *ensemble.cpn.parameters()]
        metrics = self.train(ctx, ensemble, parameters, self.local_steps(ctx), loss=self.fedcp_loss)
        base, personal_head = split_head(clone_weights(model.state_dict()), self.head_prefix(ctx.architecture))
        upload = {"weights": {**base, **mix_heads(personal_head, ctx.state["global_head"])},
                  "cpn": prefixed(ensemble.cpn.state_dict(), "cpn.")}
        # an uploader always receives h^g and the CPN with its next download: keep only the personal part
        ctx.state["personal_head"] = personal_head
        del ctx.state["global_head"], ctx.state["cpn"]
        return ClientResult(ctx.client_id, ctx.data.num_samples, upload, ctx.state, metrics, ctx.log_lines)

    # ------------------------------------------------------------------ evaluation
    def evaluation_model(self, ctx):
        """Global phi, the client's h^g, CPN, h^p and context; Gumbel noise from the evaluation generator."""
        model = self.frozen_model("evaluation", ctx.architecture,
                                  self.compose_weights(ctx.architecture, ctx.download, ctx.state))
        ensemble = self.ensemble("evaluation", model, ctx.state, ctx.generator)
        return ensemble.requires_grad_(False).eval()


if __name__ == "__main__":
    sys.exit(main(FedCP))
