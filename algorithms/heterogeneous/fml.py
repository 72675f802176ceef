"""FML (Shen, Zhang, Jia, Zhang, Huang, Zhou, Kuang, Wu and Wu 2020, "Federated Mutual Learning",
arXiv:2006.16765): every client trains its own personal model M_k (any architecture, never shared)
together with a shared "meme" model m (one architecture for all) by deep mutual learning on the
same batches; the memes are averaged like FedAvg's models.

A client's round, m^t the meme just received, on every batch (x, y):

    L_M = alpha * CE(M(x), y) + (1 - alpha) * KL_t(softmax(m(x)) || softmax(M(x)))
    L_m = beta  * CE(m(x), y) + (1 - beta)  * KL_t(softmax(M(x)) || softmax(m(x)))

with the other network's softmax a fixed (detached) target, so M steps on the gradient of L_M and
m on that of L_m: one backward of L_M + L_m, each network's gradient clipped to norm 10 on its own,
then one SGD step of both (--optimizer/--lr/--momentum/--reg; plain SGD at --lr as the reference
under --scenario pfllib --momentum 0 --reg 0). KL_t(p || q) = sum p (log p - log q) averaged over
all B * C elements (torch KLDivLoss's default reduction, as the reference; not batchmean).

    upload    m_k (the meme's weights)
    server    m <- (1 / K') sum_k m_k, unweighted over the K' uploaders
    download  m to every receiving client (it replaces the client's meme)
    reported  the personal model M_k (--eval local)

The meme's architecture is client 0's (HtFLlib's BaseHeadSplit(args, 0), i.e. models[0] of the
group); its initial weights are the run's initial weights of that architecture. Each M_k starts as
the run's initial weights of its own architecture and lives in the client's state
(state["local_model"]). KL needs logits only, so any --client_models set works.

Flags:
  --fml_alpha 0.5   alpha, CE share of the personal model's loss
  --fml_beta 0.5    beta, CE share of the meme's loss
                    Both from HtFLlib system/total.sh (`-al 0.5 -bt 0.5`, the script behind its
                    published comparison). HtFLlib main.py's defaults (1.0, 1.0) switch both KL
                    terms off (two independent networks); PFLlib main.py's (1.0, 0.0) make the meme
                    pure distillation. Chosen knowingly: the script's values, so `fml` is mutual
                    learning by default.

HtFLlib trains at lr 0.01 (pass --lr 0.01).

Sources: HtFLlib system/flcore/clients/clientfml.py, servers/serverfml.py; PFLlib the same
(spec/pfl-htfl.md section 3, "FML").

Reference differences:
- The KL targets are detached (the deep-mutual-learning rule of the paper: each network learns
  from the other's current prediction). The reference back-propagates both losses without
  detaching, so each network's gradient is that of L_M + L_m, the other network's KL term
  included (gradients cross between the networks). Not reproduced.
- The server averages the meme's whole state dict (parameters and buffers); the reference averages
  parameters only and leaves the server's buffers at their initial values. The suite's models have
  no buffers, so the two agree on them.
- One optimiser steps both networks (the reference has one per network with the same settings:
  the same updates).
"""
import sys

import torch
import torch.nn.functional as F
from torch import nn

from engine import Algorithm, ClientResult, Flag, clone_weights, main, weighted_average
from utils import UsageError

GRAD_CLIP = 10.0      # the reference's clip_grad_norm_(..., 10) on each network ("prevent divergency")
WEIGHT_SOURCE = ("HtFLlib system/total.sh (-al 0.5 -bt 0.5); HtFLlib main.py 1.0/1.0 turns the KL terms off, "
                 "PFLlib main.py 1.0/0.0")


class Networks(nn.Module):
    """Networks trained together on the same batches (FML's M and m; FedKD's mentor, mentee and
    W_h): one module for Algorithm.train, each member's gradient clipped on its own."""

    def __init__(self, **networks):
        super().__init__()
        for name, network in networks.items():
            self.add_module(name, network)

    def clip_each(self, max_norm=GRAD_CLIP):
        for network in self.children():
            torch.nn.utils.clip_grad_norm_(network.parameters(), max_norm)


def mutual_kl(student_logits, teacher_logits):
    """KL_t(softmax(teacher) || softmax(student)) with the teacher's softmax detached (a fixed
    target): sum p (log p - log q) averaged over all B * C elements (KLDivLoss's default mean)."""
    target = F.softmax(teacher_logits.detach(), dim=1)
    return F.kl_div(F.log_softmax(student_logits, dim=1), target, reduction="sum") / target.numel()


class FML(Algorithm):
    name = "fml"
    flags = (
        Flag("fml_alpha", float, 0.5, "FML: share of CE in the personal model's loss (the rest: KL to the "
             "meme)", WEIGHT_SOURCE),
        Flag("fml_beta", float, 0.5, "FML: share of CE in the meme's loss (the rest: KL to the personal "
             "model)", WEIGHT_SOURCE),
    )
    evaluations = ("local",)    # every client reports its personal model
    keeps_local_model = True    # state["local_model"]: the personal model M_k, never uploaded

    @classmethod
    def check_args(cls, args):
        for flag in ("fml_alpha", "fml_beta"):
            if not 0 <= getattr(args, flag) <= 1:
                raise UsageError(f"--{flag} must be in [0, 1] (got {getattr(args, flag)})")

    def meme_architecture(self):
        """The shared model's architecture: client 0's (HtFLlib's models[0])."""
        return self.architecture(0)

    # ------------------------------------------------------------------ server
    def initialise_server(self, server_state, contexts, server):
        server.log(f"fml reports each client's personal model on its own test split; the shared meme is "
                   f"{self.meme_architecture()} (client 0's architecture)")
        return server_state

    def init_server(self, initial_weights):
        """The global meme: the run's initial weights of its architecture."""
        return {"weights": clone_weights(self.setting.initial_weights[self.meme_architecture()])}

    def download(self, server_state, client_id):
        return {"meme": server_state["weights"]}

    def server_update(self, server_state, results, server):
        """m: the unweighted mean of the uploaded memes."""
        server_state["weights"] = weighted_average([r.upload["meme"] for r in results], [1] * len(results))
        return server_state

    # ------------------------------------------------------------------ client
    def mutual_loss(self, networks, x, y, ctx):
        """L_M + L_m (targets detached: each network gets the gradient of its own loss)."""
        personal_logits, meme_logits = networks.personal(x), networks.meme(x)
        alpha, beta = self.args.fml_alpha, self.args.fml_beta
        personal_loss = alpha * F.cross_entropy(personal_logits, y) + (1 - alpha) * mutual_kl(personal_logits,
                                                                                              meme_logits)
        meme_loss = beta * F.cross_entropy(meme_logits, y) + (1 - beta) * mutual_kl(meme_logits, personal_logits)
        return personal_loss + meme_loss

    def before_optimizer_step(self, networks, ctx):
        networks.clip_each()

    def client_update(self, ctx):
        """Mutual learning of M_k (kept) and the received meme (uploaded)."""
        personal = self.client_model(ctx)
        meme = self.model("meme", self.meme_architecture())
        meme.load_state_dict(ctx.download["meme"])
        networks = Networks(personal=personal, meme=meme)
        metrics = self.train(ctx, networks, networks.parameters(), self.local_steps(ctx), loss=self.mutual_loss)
        upload = {"meme": clone_weights(meme.state_dict())}
        self.finish_client(ctx, personal)
        return ClientResult(ctx.client_id, ctx.data.num_samples, upload, ctx.state, metrics, ctx.log_lines)


if __name__ == "__main__":
    sys.exit(main(FML))
