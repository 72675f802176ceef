"""GPFL (Zhang, Hua, Wang, Shen, Xue, Guan and Xu, "GPFL: Simultaneously Learning Global and
Personalized Feature Information for Personalized Federated Learning", ICCV 2023): a conditional
valve (CoV) turns every feature into a global and a personalised version, steered by a generic
and a personalised conditional input taken from a global category embedding (GCE).

Shared modules (D = the head's input size, C classes):
    phi       the feature extractor, z = phi(x)
    GCE       an embedding table E in R^{C x D}; its loss on features f with labels y is the
              angle-level CE over *unscaled* cosines: CE([cos(f, E_c)]_c, y)
    CoV       gamma(c) = LN(ReLU(A_g c + a_g)), beta(c) = LN(ReLU(A_b c + a_b)) (A in R^{D x D}),
              CoV(z, c) = ReLU(z * (1 + gamma(c)) + beta(c))
Per client k: its head h_k Linear(D -> C) (never uploaded), its label distribution pi_k and two
conditional inputs (D-vectors, not trained), both zero until the first aggregation:
    g   = (1/C) sum_c E_c          p_k = sum_c pi_{k,c} E_c
computed at every download from the client's *current* GCE (its locally trained copy if it trained
last round, else the last global one) before the new global GCE replaces it; E^frozen = the newly
received global GCE.

Local objective, per batch (one optimiser step of three optimisers after one backward: (phi, h_k)
with --optimizer/--lr/--momentum/--reg, GCE and CoV each plain SGD at --lr with weight decay mu):
    f_P = CoV(z, p_k),  f_G = CoV(z, g)
    L = CE(h_k(f_P), y) + L_GCE(f_G, y) + lambda * || f_G - E^frozen[y] ||_F
(the last norm: plain Frobenius norm of the B x D batch matrix, not squared, not averaged).
Upload: phi, GCE, CoV (59,032 floats on simplecnn-mnist: 43,576 + 840 + 14,616). Server: sample-
weighted averages of each, broadcast to every client. Reported model (--eval local):
h_k(CoV(phi(x), p_k)) with the global phi and CoV.

Flags: --gpfl_lambda (0.01) lambda and --gpfl_mu (0.1) mu. Source: TsingZ0/GPFL system/run_me.sh,
"-lam 0.01 -mu 0.1 for 4-layer CNN and 3-layer MLP" (PFLlib's shared --lamda 1.0 / --mu 0.0 are
wrong for GPFL; ResNet-18 and fastText use 0.0001 / 0.0, HAR-CNN 0.01 / 1.0).

Sources: TsingZ0/GPFL @ed7a7fe system/flcore/clients/clientgp.py, servers/servergp.py, run_me.sh;
PFLlib clientgpfl.py, servergpfl.py (spec/pfl-advanced.md section 3).

Reference differences:
- pi_k is counted over the samples GPFL's unshuffled drop_last train loader visits: with --drop_last
  the first floor(n_k / B) * B training samples in stored order (PFLlib's stored order under
  --partition pfllib), otherwise all of them. (PFLlib's loader shuffles, so there the count covers a
  random subset of that size.)
- Training batches are shuffled, as in PFLlib; GPFL's own repository does not shuffle.
- The initial GCE (N(0, 1)) and CoV (PyTorch's default init) are drawn from a generator seeded by
  (--init_seed, "gpfl", ...), the same for the server and every client (the reference deep-copies
  one set made under torch.manual_seed(0)). Every personal head starts as the run's initial head.
- The GCE and CoV optimisers are plain SGD (weight decay mu), as in the reference, whatever
  --momentum says; (phi, h_k) follow the run's optimiser flags (plain SGD under --scenario pfllib).
- GPFL's own repository drops the last incomplete test batch; like PFLlib, every test sample is
  scored here.
- Each client keeps its current GCE (C x D floats) in its state, the reference's client-side copy,
  so that `receive` can compute g and p_k from the pre-overwrite GCE.
- --eval global (phi with the run's initial head and no CoV) is not GPFL's reported model: refused.
- One architecture for every client: --client_models is refused.
"""
import sys

import torch
import torch.nn.functional as F
from torch import nn

from algorithms.personalised.common import (Optimizers, feature_dim, head_module, prefixed, refuse_client_models,
                                            seeded_reset_, unprefixed)
from engine import Algorithm, ClientResult, Flag, clone_weights, main, split_head, weighted_average
from utils import UsageError, derived_seed

SOURCE = "TsingZ0/GPFL system/run_me.sh (-lam 0.01 -mu 0.1 for the 4-layer CNN); PFLlib's shared flags differ"


class ConditionalValve(nn.Module):
    """CoV(z, c) = ReLU(z * (1 + gamma(c)) + beta(c)), gamma/beta = LayerNorm(ReLU(Linear(D -> D)))."""

    def __init__(self, dim):
        super().__init__()
        self.gamma = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.LayerNorm(dim))
        self.beta = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.LayerNorm(dim))

    def forward(self, z, condition):
        return torch.relu(z * (1 + self.gamma(condition)) + self.beta(condition))


class CategoryEmbedding(nn.Module):
    """GCE: the embedding table E (C x D)."""

    def __init__(self, num_classes, dim):
        super().__init__()
        self.embedding = nn.Embedding(num_classes, dim)


def gce_loss(features, embeddings, labels):
    """Angle-level CE over unscaled cosines: CE([cos(f_b, E_c)]_c, y_b), mean over the batch."""
    return F.cross_entropy(F.normalize(features, dim=1) @ F.normalize(embeddings, dim=1).T, labels)


def magnitude_term(features, embeddings, labels):
    """|| f - E[y] ||_F over the whole batch matrix (not squared, not averaged)."""
    return torch.norm(features - embeddings[labels].detach(), 2)


def conditional_inputs(embeddings, label_distribution):
    """(g, p): the mean of the class embeddings and their mix by the client's label distribution."""
    embeddings = embeddings.detach()
    return embeddings.mean(0), label_distribution.to(embeddings) @ embeddings


class GPFLModel(nn.Module):
    """The reported model: h_k(CoV(phi(x), p_k))."""

    def __init__(self, model, valve, personal_input):
        super().__init__()
        self.model, self.valve, self.personal_input = model, valve, personal_input

    def forward(self, x):
        return head_module(self.model)(self.valve(self.model.features(x), self.personal_input))


class GPFL(Algorithm):
    name = "gpfl"
    evaluations = ("local",)
    broadcast_to_all = True      # phi, GCE and CoV go to every client each round
    flags = (Flag("gpfl_lambda", float, 0.01, "lambda: weight of ||f_G - E[y]||_F", SOURCE),
             Flag("gpfl_mu", float, 0.1, "mu: weight decay of the GCE and CoV optimisers", SOURCE))

    def __init__(self, setting):
        super().__init__(setting)
        self._extra_modules = {}

    @classmethod
    def check_args(cls, args):
        for flag in ("gpfl_lambda", "gpfl_mu"):
            if not getattr(args, flag) >= 0:
                raise UsageError(f"--{flag} must be >= 0 (got {getattr(args, flag)})")
        refuse_client_models(args, "GPFL")

    # ------------------------------------------------------------------ modules
    def dim(self):
        return feature_dim(self.model("local"))

    def module(self, role, kind, weights):
        """A kept GCE ("gce") or CoV ("cov") instance for `role`, loaded with the named tensors `weights`."""
        if (role, kind) not in self._extra_modules:
            made = CategoryEmbedding(self.num_classes, self.dim()) if kind == "gce" else ConditionalValve(self.dim())
            self._extra_modules[(role, kind)] = made.to(self.device)
        module = self._extra_modules[(role, kind)]
        module.load_state_dict(unprefixed(weights, kind + "."))
        return module

    def label_distribution(self, data):
        """pi_k over the samples an unshuffled drop_last loader visits (all samples without --drop_last)."""
        labels = data.labels
        visited = len(labels) // self.args.batch_size * self.args.batch_size
        if self.args.drop_last and visited > 0:
            labels = labels[:visited]
        counts = torch.bincount(labels, minlength=self.num_classes).double()
        return (counts / counts.sum()).float()

    # ------------------------------------------------------------------ server
    def init_server(self, initial_weights):
        """The initial model (its base is the shared phi), GCE and CoV."""
        generator = torch.Generator().manual_seed(derived_seed(self.args.init_seed, "gpfl", "gce", "cov"))
        state = {"weights": clone_weights(initial_weights)}
        for kind, module in (("gce", CategoryEmbedding(self.num_classes, self.dim())),
                             ("cov", ConditionalValve(self.dim()))):
            seeded_reset_(module, generator)
            state[kind] = prefixed({k: v.to(self.device) for k, v in module.state_dict().items()}, kind + ".")
        return state

    def download(self, server_state, client_id):
        """phi, GCE and CoV (never a head)."""
        base, _ = split_head(server_state["weights"], self.head_prefix())
        return {"weights": base, "gce": server_state["gce"], "cov": server_state["cov"]}

    def server_update(self, server_state, results, server):
        """Sample-weighted averages of phi, the GCEs and the CoVs."""
        server_state = super().server_update(server_state, results, server)
        for kind in ("gce", "cov"):
            server_state[kind] = weighted_average([r.upload[kind] for r in results], [r.num_samples for r in results])
        return server_state

    # ------------------------------------------------------------------ client
    def receive(self, ctx):
        """g and p_k from the client's current GCE (zero before its first one: no aggregation yet),
        then the received global GCE replaces it."""
        state = ctx.state
        if "personal_head" not in state:
            _, head = split_head(self.setting.initial_weights[ctx.architecture], self.head_prefix())
            state["personal_head"] = clone_weights(head)
        if "gce" in state:
            generic, personal = conditional_inputs(state["gce"]["gce.embedding.weight"],
                                                   self.label_distribution(ctx.data))
        else:
            generic = personal = torch.zeros(self.dim(), device=self.device)
        state.update(generic_input=generic, personal_input=personal, gce=clone_weights(ctx.download["gce"]))

    def compose_weights(self, architecture, download, state):
        """The downloaded phi with the client's own head."""
        weights = super().compose_weights(architecture, download, state)
        weights.update(state.get("personal_head", {}))
        return weights

    def optimizer(self, model, gce, valve):
        """(phi, h_k) with the run's optimiser; GCE and CoV plain SGD at --lr, weight decay mu."""
        return Optimizers(self.make_optimizer(model.parameters()),
                          torch.optim.SGD(gce.parameters(), lr=self.args.lr, weight_decay=self.args.gpfl_mu),
                          torch.optim.SGD(valve.parameters(), lr=self.args.lr, weight_decay=self.args.gpfl_mu))

    def client_update(self, ctx):
        """One phase over phi, h_k, GCE and CoV; upload phi, GCE and CoV; keep h_k and the trained GCE."""
        model = self.client_model(ctx)
        gce = self.module("training", "gce", ctx.download["gce"])
        valve = self.module("training", "cov", ctx.download["cov"])
        frozen_embeddings = ctx.download["gce"]["gce.embedding.weight"].detach()
        generic, personal = ctx.state["generic_input"], ctx.state["personal_input"]
        lam = self.args.gpfl_lambda

        def gpfl_loss(model, x, y, ctx):
            z = model.features(x)
            f_personal, f_generic = valve(z, personal), valve(z, generic)
            return (F.cross_entropy(head_module(model)(f_personal), y)
                    + gce_loss(f_generic, gce.embedding.weight, y)
                    + lam * magnitude_term(f_generic, frozen_embeddings, y))

        gce.train(), valve.train()
        metrics = self.train(ctx, model, None, self.local_steps(ctx), loss=gpfl_loss,
                             optimizer=self.optimizer(model, gce, valve))
        base, head = split_head(clone_weights(model.state_dict()), self.head_prefix(ctx.architecture))
        upload = {"weights": base, "gce": prefixed(gce.state_dict(), "gce."),
                  "cov": prefixed(valve.state_dict(), "cov.")}
        ctx.state.update(personal_head=head, gce=clone_weights(upload["gce"]))
        return ClientResult(ctx.client_id, ctx.data.num_samples, upload, ctx.state, metrics, ctx.log_lines)

    # ------------------------------------------------------------------ evaluation
    def evaluation_model(self, ctx):
        """h_k(CoV(phi(x), p_k)) with the downloaded phi and CoV."""
        model = self.frozen_model("evaluation", ctx.architecture,
                                  self.compose_weights(ctx.architecture, ctx.download, ctx.state))
        valve = self.module("evaluation", "cov", ctx.download["cov"])
        return GPFLModel(model, valve, ctx.state["personal_input"]).requires_grad_(False).eval()


if __name__ == "__main__":
    sys.exit(main(GPFL))
