"""Ditto (Li, Hu, Beirami and Smith 2021, "Ditto: Fair and Robust Federated Learning Through
Personalization", ICML): FedAvg for a global model w, plus a personal model v_k per client trained
on its own data with a proximal pull towards w:  min_v F_k(v) + (mu / 2) ||v - w||^2.

A client's round, with w^t the global model it has just received:

    personal pass  plocal_steps SGD steps, per batch
                       v <- v - lr (grad CE(v) + mu (v - w^t))
                   (the gradient of CE(v) + (mu / 2) ||v - w^t||^2: personal_loss below; with
                   --momentum 0 --reg 0, as --scenario pfllib sets, exactly PFLlib's
                   PerturbedGradientDescent step)
    global pass    local_steps(ctx) SGD steps on CE from w^t (FedAvg's local update)
    upload         the global pass's whole model; server: sample-weighted FedAvg

v starts as the run's initial model and is never reset to w: it lives in the client's state
(state["personal"], checkpointed). The personal pass comes first and uses the w^t just received
(PFLlib issue #57: deliberate).

Reported (--eval local, every client after the download, before training): two series, the
personal model v ("personal", the headline accuracy) and the global model w^t ("global", recorded
as accuracy_global). --eval global scores w.

Flags:
  --ditto_mu 0.0       mu, the proximal weight (the paper's lambda). Default: PFLlib main.py `-mu`
                       0.0, which makes the personal pass plain local training; the paper tunes
                       lambda per device on validation data (from {0.1, 1, 2}, or {0.05, 0.1, 0.2}
                       under strong attacks, its Appendix); the value behind PFLlib's leaderboard
                       was not found.
  --plocal_epochs 1    epochs of the personal pass, counted as FedRep counts them (fedrep.py:
                       passes with --epochs E, else plocal_epochs * num_local_iterations steps);
                       PFLlib main.py `-pls/--plocal_epochs` (default 1).

Source: PFLlib clients/clientditto.py, servers/serverditto.py, optimizers/fedoptimizer.py
(spec/pfl-htfl.md section 2).

Reference differences:
- PFLlib appends the global and the personal accuracies to one list, two entries a round, so its
  reported best is the best of both. Fixed: two series, the personal one the headline.
- The proximal step is written as a loss term; its gradient is the same, so the step is PFLlib's
  under plain SGD. Under momentum or weight decay (this suite's defaults) they act on the whole
  gradient, proximal part included. The logged personal loss is CE + (mu / 2) ||v - w||^2 (PFLlib
  logs 0.5 mu ||v - w|| unsquared; logging only).
- Optimisers are made afresh every round (PFLlib keeps them; plain SGD has no state).
"""
import sys

import torch.nn.functional as F

from algorithms.personalised.fedrep import PFLLIB_MAIN, plocal_steps
from engine import Algorithm, ClientResult, Flag, clone_weights, main
from utils import UsageError


class Ditto(Algorithm):
    name = "ditto"
    flags = (
        Flag("ditto_mu", float, 0.0, "Ditto: weight mu of the proximal pull of the personal model towards "
             "the global one (the paper's lambda)", "PFLlib system/main.py (-mu, default 0.0)"),
        Flag("plocal_epochs", int, 1, "Ditto: epochs of the personal pass", PFLLIB_MAIN),
    )

    @classmethod
    def check_args(cls, args):
        if args.ditto_mu < 0:
            raise UsageError(f"--ditto_mu must be >= 0 (got {args.ditto_mu})")
        if args.plocal_epochs < 1:
            raise UsageError(f"--plocal_epochs must be >= 1 (got {args.plocal_epochs})")

    def personal_weights(self, ctx):
        """v: the client's personal model, the run's initial model before its first round."""
        return ctx.state.get("personal", self.setting.initial_weights[ctx.architecture])

    def personal_loss(self, model, x, y, ctx):
        """CE(v(x), y) + (mu / 2) ||v - w^t||^2 over all parameters (w^t: ctx.global_model)."""
        proximal = sum((v - w).pow(2).sum() for v, w in zip(model.parameters(), ctx.global_model.parameters()))
        return F.cross_entropy(model(x), y) + self.args.ditto_mu / 2 * proximal

    def client_update(self, ctx):
        """The personal pass from v towards w^t, then FedAvg's pass from w^t; upload w."""
        model = self.client_model(ctx)              # w^t, and ctx.global_model a frozen copy of it
        personal = self.model("personal", ctx.architecture)
        personal.load_state_dict(self.personal_weights(ctx))
        personal_metrics = self.train(ctx, personal, personal.parameters(), plocal_steps(self, ctx),
                                      loss=self.personal_loss)
        ctx.state["personal"] = clone_weights(personal.state_dict())
        metrics = self.train(ctx, model, model.parameters(), self.local_steps(ctx))
        metrics.update(personal_train_loss=personal_metrics["train_loss"], personal_steps=personal_metrics["steps"])
        upload = self.upload(ctx, model)
        self.finish_client(ctx, model)
        return ClientResult(ctx.client_id, ctx.data.num_samples, upload, ctx.state, metrics, ctx.log_lines)

    def evaluation_model(self, ctx):
        """Two series: the personal model v (headline) and the global model w^t just received."""
        return {"personal": self.frozen_model("evaluation", ctx.architecture, self.personal_weights(ctx)),
                "global": self.frozen_model("evaluation_global", ctx.architecture, ctx.download["weights"])}


if __name__ == "__main__":
    sys.exit(main(Ditto))
