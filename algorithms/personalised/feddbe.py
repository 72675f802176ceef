"""FedDBE (Zhang, Hua, Wang, Shen, Guan and Xu, "Eliminating Domain Bias for Federated Learning in
Representation Space", NeurIPS 2023): FedAvg with a personalised representation bias memory (PRBM)
added to every client's features and a mean regulariser (MR) pulling the running mean of its
features towards a consensus mean fixed once before training.

With z = phi(x) in R^D and h the head (both shared, averaged as in FedAvg):
    PRBM      zbar_k^p in R^D per client: trainable, starts at 0, its own plain SGD at --lr, never
              uploaded
    running   r_k in R^D, reset to 0 at the start of every local training; per step
              r_k <- (1 - m) r_k + m * mean_batch(z)  (the gradient flows through the current
              batch term only; no bias correction)
    loss      CE(h(z + zbar_k^p), y) + kappa * mean_d [ 1/2 (r_{k,d} - zbar^g_d)^2 ]
    consensus zbar^g = sum_k (n_k / n) r_k over ALL clients, computed ONCE before round 0 from one
              local training of plain CE (no PRBM, no MR) per client from the initial model; the
              models trained there are discarded
Both optimisers (the model's: --optimizer/--lr/--momentum/--reg, plain SGD under --scenario
pfllib; the PRBM's) step after one backward. Upload: the whole model; server: FedAvg; download: the
whole model to every client, and zbar^g once (in the first round's download).
Reported model (--eval local): logits = h(phi(x) + zbar_k^p) with the global phi and h.

Flags: --dbe_momentum (1.0): m; --dbe_kappa (50.0): kappa. Source: TsingZ0/DBE system/run_me.sh
(FMNIST Dir 0.1) runs `-mo 1 -klw 50`; PFLlib's defaults (--momentum 0.1, --kl_weight 0.0) switch
the regulariser off.

Sources: TsingZ0/DBE @193f435 system/flcore/clients/clientDBE.py, servers/serverDBE.py, run_me.sh;
PFLlib clientdbe.py, serverdbe.py (spec/pfl-advanced.md section 4).

Reference differences:
- The initialisation training is a round's local training, local_steps(ctx) steps (one epoch under
  --scenario pfllib, as the reference's client.train() with 1 local epoch), with the run's optimiser,
  drawing batches from the engine's initialisation generator of each client; zbar^g is averaged in
  float64 (weighted_average).
- zbar^g reaches each client once, in the first download every client gets (broadcast_to_all), and
  stays in its state. A run whose initialisation was skipped (a --load_path warm start past round 0)
  has no zbar^g: its clients then train as the reference does before zbar^g exists (plain CE on
  h(z), no PRBM, no MR).
- The reference's num_batches_tracked counter is never used; it is left out.
- The PRBM optimiser is plain SGD at --lr, as in the reference, whatever --momentum says.
- One architecture for every client (zbar^g is one D-vector): --client_models is refused.
"""
import sys

import torch
import torch.nn.functional as F
from torch import nn

from algorithms.personalised.common import Optimizers, feature_dim, head_module, refuse_client_models
from engine import Algorithm, ClientResult, Flag, main, weighted_average
from utils import UsageError

SOURCE = "TsingZ0/DBE system/run_me.sh (-mo 1 -klw 50); PFLlib's --momentum 0.1, --kl_weight 0.0"


class RunningMean:
    """r <- (1 - m) r + m * mean_batch(z); `update` returns r with the gradient of the current
    batch term and keeps a detached copy for the next step (the reference's detach_running)."""

    def __init__(self, dim, momentum, device=None):
        self.value = torch.zeros(dim, device=device)
        self.momentum = momentum

    def update(self, features):
        current = (1 - self.momentum) * self.value + self.momentum * features.mean(0)
        self.value = current.detach()
        return current


def mean_regulariser(running_mean, global_mean):
    """mean_d [1/2 (r_d - zbar^g_d)^2]."""
    return (0.5 * (running_mean - global_mean) ** 2).mean()


class DBEModel(nn.Module):
    """The reported model: h(phi(x) + zbar_k^p)."""

    def __init__(self, model, bias):
        super().__init__()
        self.model, self.bias = model, bias

    def forward(self, x):
        return head_module(self.model)(self.model.features(x) + self.bias)


class FedDBE(Algorithm):
    name = "feddbe"
    broadcast_to_all = True      # the whole model goes to every client each round (and zbar^g once)
    flags = (Flag("dbe_momentum", float, 1.0, "m: momentum of the running feature mean", SOURCE),
             Flag("dbe_kappa", float, 50.0, "kappa: weight of the mean regulariser", SOURCE))

    @classmethod
    def check_args(cls, args):
        if not 0 <= args.dbe_momentum <= 1:
            raise UsageError(f"--dbe_momentum must be in [0, 1] (got {args.dbe_momentum})")
        if not args.dbe_kappa >= 0:
            raise UsageError(f"--dbe_kappa must be >= 0 (got {args.dbe_kappa})")
        refuse_client_models(args, "FedDBE")

    def dim(self):
        return feature_dim(self.model("local"))

    # ------------------------------------------------------------------ server
    def init_server(self, initial_weights):
        state = super().init_server(initial_weights)
        state["rounds_aggregated"] = 0
        return state

    def initialise_server(self, server_state, contexts, server):
        """zbar^g: every client trains once with plain CE from the initial model, accumulating its
        running mean; the sample-weighted mean of those is kept, the trained models are dropped."""
        def plain_ce(model, x, y, ctx):
            z = model.features(x)
            running.update(z)
            return F.cross_entropy(head_module(model)(z), y)

        means = []
        for ctx in contexts:
            model = self.client_model(ctx)
            running = RunningMean(self.dim(), self.args.dbe_momentum, self.device)
            self.train(ctx, model, model.parameters(), self.local_steps(ctx), loss=plain_ce)
            means.append({"global_mean": running.value})
        server_state["global_mean"] = weighted_average(means, [ctx.data.num_samples for ctx in contexts])["global_mean"]
        server.log(f"FedDBE: consensus mean zbar^g from {len(contexts)} clients' initialisation training, "
                   f"||zbar^g|| = {server_state['global_mean'].norm().item():.4f}")
        return server_state

    def download(self, server_state, client_id):
        """The whole model; zbar^g too in the first round."""
        download = super().download(server_state, client_id)
        if server_state["rounds_aggregated"] == 0 and "global_mean" in server_state:
            download["global_mean"] = server_state["global_mean"]
        return download

    def server_update(self, server_state, results, server):
        server_state = super().server_update(server_state, results, server)
        server_state["rounds_aggregated"] += 1
        return server_state

    # ------------------------------------------------------------------ client
    def receive(self, ctx):
        """A PRBM of zeros at first; keep zbar^g when it comes."""
        ctx.state.setdefault("bias", torch.zeros(self.dim(), device=self.device))
        if "global_mean" in ctx.download:
            ctx.state["global_mean"] = ctx.download["global_mean"].detach().clone()

    def client_update(self, ctx):
        """Train the model and the PRBM on CE(h(z + PRBM)) + kappa * MR; upload the whole model."""
        model = self.client_model(ctx)
        bias = nn.Parameter(ctx.state["bias"].clone())
        running = RunningMean(self.dim(), self.args.dbe_momentum, self.device)
        global_mean = ctx.state.get("global_mean")
        kappa = self.args.dbe_kappa

        def dbe_loss(model, x, y, ctx):
            z = model.features(x)
            running_mean = running.update(z)
            if global_mean is None:         # no zbar^g (initialisation skipped): the reference's plain CE
                return F.cross_entropy(head_module(model)(z), y)
            return (F.cross_entropy(head_module(model)(z + bias), y)
                    + kappa * mean_regulariser(running_mean, global_mean))

        optimizer = Optimizers(self.make_optimizer(model.parameters()), torch.optim.SGD([bias], lr=self.args.lr))
        metrics = self.train(ctx, model, None, self.local_steps(ctx), loss=dbe_loss, optimizer=optimizer)
        upload = self.upload(ctx, model)
        ctx.state["bias"] = bias.detach().clone()
        return ClientResult(ctx.client_id, ctx.data.num_samples, upload, ctx.state, metrics, ctx.log_lines)

    # ------------------------------------------------------------------ evaluation
    def evaluation_model(self, ctx):
        """h(phi(x) + zbar_k^p) with the downloaded model."""
        model = self.frozen_model("evaluation", ctx.architecture,
                                  self.compose_weights(ctx.architecture, ctx.download, ctx.state))
        return DBEModel(model, ctx.state["bias"]).requires_grad_(False).eval()


if __name__ == "__main__":
    sys.exit(main(FedDBE))
