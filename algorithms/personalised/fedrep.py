"""FedRep (Collins, Hassani, Mokhtari and Shakkottai 2021, "Exploiting Shared Representations for
Personalized Federated Learning", ICML): FedPer's split (shared base, personal head), but each
client first fits its head to the new global base, then trains the base under its head.

With theta the downloaded global base and phi_k client k's head, a client's round is:

    head phase  plocal_steps (--plocal_epochs epochs, below) SGD steps on CE(h_phi(f_theta(x)), y)
                over phi only (theta frozen)
    base phase  local_steps(ctx) SGD steps on CE(h_phi(f_theta(x)), y) over theta only (phi frozen)

each phase with its own optimiser (--optimizer, --lr, --momentum, --reg). Download, upload (the
base only), server (sample-weighted average of the bases) and the reported model (global base +
own head) are FedPer's.

Flags:
  --plocal_epochs 1   head epochs before the base epochs; PFLlib main.py `-pls/--plocal_epochs`
                      (default 1). The paper trains the head for several epochs per base epoch
                      (spec: the count used for PFLlib's leaderboard was not found).

Epochs in steps (this suite's decision): the head phase counts its epochs as local_steps counts
--epochs. With --epochs E, one epoch is a pass over the client's data (batches_per_epoch:
ceil(n_k / B), or floor(n_k / B) with --drop_last), so the head phase is plocal_epochs passes, as in
PFLlib. Without --epochs the round's --num_local_iterations steps stand for one epoch, so the head
phase is plocal_epochs * num_local_iterations steps.

Source: PFLlib clients/clientrep.py, servers/serverrep.py (spec/pfl-htfl.md section 2).

Reference differences: FedPer's (see fedper.py). The two optimisers are made afresh every round
(PFLlib keeps them per client; plain SGD, its default, has no state, so the steps are the same).
The round's train_loss is the mean over both phases' steps; head_train_loss is the head phase's.
"""
import sys
from contextlib import contextmanager

from algorithms.personalised.fedper import FedPer
from engine import ClientResult, Flag, main
from utils import UsageError

PFLLIB_MAIN = "PFLlib system/main.py (-pls/--plocal_epochs, default 1)"


def plocal_steps(algorithm, ctx):
    """--plocal_epochs as optimiser steps, counted as local_steps counts --epochs (see above)."""
    if algorithm.args.epochs:
        return algorithm.args.plocal_epochs * algorithm.batches_per_epoch(ctx.data.num_samples)
    return algorithm.args.plocal_epochs * algorithm.args.num_local_iterations


@contextmanager
def trainable_only(model, parameters):
    """Only `parameters` need gradients inside the block (the others are not trained in this phase)."""
    chosen = {id(p) for p in parameters}
    for p in model.parameters():
        p.requires_grad_(id(p) in chosen)
    try:
        yield
    finally:
        model.requires_grad_(True)


class FedRep(FedPer):
    name = "fedrep"
    flags = (Flag("plocal_epochs", int, 1, "FedRep: epochs of head-only training before the base epochs",
                  PFLLIB_MAIN),)

    @classmethod
    def check_args(cls, args):
        if args.plocal_epochs < 1:
            raise UsageError(f"--plocal_epochs must be >= 1 (got {args.plocal_epochs})")

    def client_update(self, ctx):
        """Head phase, then base phase; upload the base, keep the head."""
        model = self.client_model(ctx)
        self.prepare_client(ctx, model)
        prefix = self.head_prefix(ctx.architecture)
        head = [p for name, p in model.named_parameters() if name.startswith(prefix)]
        base = [p for name, p in model.named_parameters() if not name.startswith(prefix)]
        with trainable_only(model, head):
            head_metrics = self.train(ctx, model, head, plocal_steps(self, ctx))
        with trainable_only(model, base):
            base_metrics = self.train(ctx, model, base, self.local_steps(ctx))
        steps = head_metrics["steps"] + base_metrics["steps"]
        metrics = {"train_loss": (head_metrics["train_loss"] * head_metrics["steps"]
                                  + base_metrics["train_loss"] * base_metrics["steps"]) / steps,
                   "steps": steps, "head_train_loss": head_metrics["train_loss"],
                   "head_steps": head_metrics["steps"]}
        upload = self.upload(ctx, model)
        self.finish_client(ctx, model)
        return ClientResult(ctx.client_id, ctx.data.num_samples, upload, ctx.state, metrics, ctx.log_lines)


if __name__ == "__main__":
    sys.exit(main(FedRep))
