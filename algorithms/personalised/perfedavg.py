"""Per-FedAvg (Fallah, Mokhtari and Ozdaglar, "Personalized Federated Learning with Theoretical
Guarantees: A Model-Agnostic Meta-Learning Approach", NeurIPS 2020), in PFLlib's first-order
(FO-MAML) form: FedAvg whose clients take meta-steps, so that the global model is a good start
for one step of personal fine-tuning, and whose reported accuracy is after that one step.

Client (PFLlib clientperavg.py `train`, spec/pfl-advanced.md section 1): every meta-step draws
2B samples and splits them into halves D and D' (B = --batch_size), then

    theta' = theta - alpha * grad CE(theta; D)          inner step (plain SGD, alpha = --lr)
    g      = grad CE(theta'; D')                        the gradient AT theta'
    theta  = theta - beta * g                           outer step from the restored theta, beta = alpha

(first order: the Hessian term of the MAML gradient is dropped). Here theta' is built
functionally with its inner gradient detached, so d CE(theta'; D') / d theta = g exactly and one
step of the engine's loop (`train`, plain SGD with lr beta) is one meta-step (`meta_loss`).
Upload: the whole model; server: sample-weighted FedAvg; download: the whole model.

Engine mapping of PFLlib's "train() twice per round" (serverperavg.py; intentional, PFLlib
issues #59, #67, #132, #237): the meta-batches come from the client's stream with batch 2B that
drops each pass's last partial 2B batch (PFLlib's loader: drop_last=True); a round is
  * with --epochs E: 2 E floor(n / 2B) meta-steps (at least 2 E), exactly the two train() calls
    of E epochs each;
  * otherwise: --num_local_iterations meta-steps (spec: K meta-steps, each on 2B fresh samples),
so a round consumes about twice the data FedAvg's round does, with as many updates.

Evaluation (`evaluate_one_step`): every client starts from the downloaded global model, takes ONE
plain SGD step (lr alpha) on one batch of B of its training samples (its evaluation generator's
shuffle; augmented exactly as its training batches are: not under --no_augment / --scenario
pfllib), and is scored on its test split; nothing is kept. (--eval global scores the global
model itself on the global test set.)

Flags: none of its own. alpha = beta = --lr (PFLlib sets beta to the learning rate; its `-bt`
is ignored, issue #106); batch --batch_size.

Reference differences (decided knowingly):
  * The meta-steps and the evaluation step are plain SGD as PFLlib's PerAvgOptimizer: --momentum,
    --reg and --optimizer do not apply to Per-FedAvg.
  * A client with fewer than 2B training samples meta-steps on all of them each step, split at
    ceil(m/2) (with one sample, D' = D); PFLlib's drop_last loader gives it no step at all.
  * The logged train loss is the mean of CE(theta'; D') over the meta-steps (PFLlib logs a loss
    from a routine that itself trains; log only).
  * Learning-rate decay (PFLlib's -ld, off by default) is not offered.
"""
import dataclasses
import sys

import torch
import torch.nn.functional as F
from torch.func import functional_call

from engine import Algorithm, ClientResult, main


def split_meta_batch(x, y, batch_size):
    """(D, D') halves of one meta-batch of up to 2B samples: the first B and the rest; a smaller
    batch of m < 2B splits at ceil(m/2), and one sample serves as both halves."""
    m = len(y)
    first = batch_size if m == 2 * batch_size else (m + 1) // 2
    if m == 1:
        return (x, y), (x, y)
    return (x[:first], y[:first]), (x[first:], y[first:])


def first_order_meta_loss(model, inner, outer, alpha):
    """CE(theta'; D') with theta' = theta - alpha * grad CE(theta; D), the inner gradient detached:
    its gradient with respect to theta is grad CE(theta'; D'), the FO-MAML meta-gradient."""
    parameters = dict(model.named_parameters())
    inner_loss = F.cross_entropy(model(inner[0]), inner[1])
    grads = torch.autograd.grad(inner_loss, list(parameters.values()), allow_unused=True)
    adapted = {name: p if g is None else p - alpha * g
               for (name, p), g in zip(parameters.items(), grads)}
    return F.cross_entropy(functional_call(model, adapted, (outer[0],)), outer[1])


class PerFedAvg(Algorithm):
    name = "perfedavg"

    def local_steps(self, ctx):
        """Meta-steps a round: 2 E floor(n / 2B) (at least 2 E) with --epochs E, else --num_local_iterations."""
        if self.args.epochs:
            return 2 * self.args.epochs * max(1, ctx.data.num_samples // (2 * self.args.batch_size))
        return self.args.num_local_iterations

    def meta_loss(self, model, x, y, ctx):
        inner, outer = split_meta_batch(x, y, self.args.batch_size)
        return first_order_meta_loss(model, inner, outer, self.args.lr)

    def client_update(self, ctx):
        """local_steps meta-steps on batches of 2B (drop_last), each one step of plain SGD (lr beta = alpha)."""
        model = self.client_model(ctx)
        model.requires_grad_(True)
        meta_data = dataclasses.replace(ctx.data, batch_size=2 * self.args.batch_size, drop_last=True)
        meta_ctx = dataclasses.replace(ctx, data=meta_data)
        outer_step = torch.optim.SGD(model.parameters(), lr=self.args.lr)      # beta = alpha
        metrics = self.train(meta_ctx, model, model.parameters(), self.local_steps(ctx),
                             loss=self.meta_loss, optimizer=outer_step)
        upload = self.upload(ctx, model)
        self.finish_client(ctx, model)
        return ClientResult(ctx.client_id, ctx.data.num_samples, upload, ctx.state, metrics, ctx.log_lines)

    def evaluation_model(self, ctx):
        """The downloaded global model after one plain SGD step (lr alpha) on one batch of B of
        the client's training samples, drawn with the evaluation generator."""
        model = self.model("one_step", ctx.architecture)
        model.requires_grad_(True)
        model.load_state_dict(ctx.download["weights"])
        model.train()
        x, y = ctx.data.stream(ctx.generator).next()
        with torch.enable_grad():
            loss = F.cross_entropy(model(x), y)
            grads = torch.autograd.grad(loss, list(model.parameters()))
        with torch.no_grad():
            for parameter, grad in zip(model.parameters(), grads):
                parameter.sub_(self.args.lr * grad)
        model.requires_grad_(False)
        return model.eval()


if __name__ == "__main__":
    sys.exit(main(PerFedAvg))
