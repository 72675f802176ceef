"""FedDistill / FD (Jeong, Oh, Kim, Bennis and Kim 2018, "Communication-Efficient On-Device
Machine Learning: Federated Distillation and Augmentation under Non-IID Private Data", NeurIPS
2018 workshop on Machine Learning on the Phone and other Consumer Devices, arXiv:1811.11479):
clients keep their own models, of any architecture, and share per-class mean logits instead of
weights; each client distils the global per-class logits into its own model.

With o = model_k(x) in R^C the client's logits:

    upload    {c: l_k,c}, l_k,c = mean of o.detach() over every training sample of class c the
              client saw during the round's local training (the model moves during it), for the
              classes it saw: C floats a class, hundreds of bytes in all
    server    lbar_c = (1 / |K_c|) sum_{k in K_c} l_k,c, unweighted over the uploaders K_c that hold
              c (this round's uploads only); download {c: lbar_c} to every receiving client
    client    per batch  CE(o, y) + lambda * (-1/B) sum_i sum_j q_ij log softmax(o_i)_j
              q_i = softmax(lbar_{y_i}) when class y_i has a global logit vector, else
              softmax(o_i.detach()) (zero gradient, its value still counted in the mean); no
              distillation term before the first download holding logits
    reported  the client's own model, argmax of its logits (--eval local)

Every client's model lives in its state (state["local_model"]); nothing else is kept between
rounds except the server's last global logits. The logits have C entries whatever the
architecture, so any --client_models set works (different feature sizes included).

Flags:
  --fd_lambda 1.0   lambda, weight of the distillation term. HtFLlib (and PFLlib) system/main.py
                    `-lam/--lamda` (default 1.0); HtFLlib system/total.sh runs FD with `-lam 1`.

HtFLlib trains at lr 0.01 (pass --lr 0.01; `--scenario pfllib` sets PFLlib's 0.005).

Sources: HtFLlib system/flcore/clients/clientfd.py, servers/serverfd.py; PFLlib the same
(spec/pfl-htfl.md section 3, "FedDistill / FD").

Reference differences:
- The distillation target is the softmax of the global logits (the soft-target CE of PFLlib
  83e2182 / HtFLlib bf60d9a, 2024-04-22, until 2025-11-28). The newest reference commits (PFLlib
  d832e76, HtFLlib ca3e29a, 2025-11-29) pass the raw logits as the "probability" target, which is
  not a distribution and gives the absent-class rows a non-zero gradient: treated as a regression
  and not reproduced. Before 2023-12 (PFLlib 2b077c1) / 2024-03 (HtFLlib cae12a2) the term was
  MSE(lbar_y, o); not reproduced either.
- Per-class means are taken as float64 sums and counts (common.ClassMeans; the reference keeps
  every logit vector and averages them in float32 at the end), the server's mean in float64
  (common.aggregate_prototypes): the same means up to float rounding.
"""
import sys

import torch.nn.functional as F

from algorithms.heterogeneous.common import ClassMeans, aggregate_prototypes
from engine import Algorithm, Flag, main
from utils import UsageError

LAMBDA_SOURCE = "HtFLlib system/main.py (-lam, default 1.0); HtFLlib system/total.sh runs FD with -lam 1"


def distillation_targets(logits, labels, global_logits):
    """q: softmax(lbar_{y_i}) for the samples whose class has global logits, softmax(o_i.detach())
    for the others. `global_logits` is {class: vector}."""
    targets = logits.detach().clone()
    for c, vector in global_logits.items():
        targets[labels == c] = vector.to(targets.dtype)
    return F.softmax(targets, dim=1)


def soft_cross_entropy(logits, targets):
    """(-1/B) sum_i sum_j q_ij log softmax(o_i)_j: cross-entropy against probability targets."""
    return -(targets * F.log_softmax(logits, dim=1)).sum(1).mean()


class FedDistill(Algorithm):
    name = "feddistill"
    flags = (Flag("fd_lambda", float, 1.0, "FedDistill: weight of the distillation term (soft-target CE "
                  "against the softmax of the global per-class logits)", LAMBDA_SOURCE),)
    evaluations = ("local",)    # every client reports its own model
    keeps_local_model = True    # state["local_model"]: the client's own model, never uploaded

    @classmethod
    def check_args(cls, args):
        if args.fd_lambda < 0:
            raise UsageError(f"--fd_lambda must be >= 0 (got {args.fd_lambda})")

    # ------------------------------------------------------------------ server
    def initialise_server(self, server_state, contexts, server):
        server.log("feddistill reports each client's own model (argmax of its logits) on its own test split")
        return server_state

    def init_server(self, initial_weights):
        """No global model; the global per-class logits, none before the first uploads."""
        return {"weights": {}, "logits": {}}

    def download(self, server_state, client_id):
        """{"logits": {c: lbar_c}} once there are any, else nothing."""
        return {"logits": server_state["logits"]} if server_state["logits"] else {}

    def server_update(self, server_state, results, server):
        """lbar_c: the unweighted mean over this round's uploaders holding class c."""
        server_state["logits"] = aggregate_prototypes([r.upload["logits"] for r in results])
        return server_state

    # ------------------------------------------------------------------ client
    def prepare_client(self, ctx, model):
        """Start the round's per-class logit means."""
        ctx.class_logits = ClassMeans(self.num_classes)

    def local_loss(self, model, x, y, ctx):
        """CE(o, y) + lambda * soft-CE(o, q) (once global logits exist); records o.detach() by class."""
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        global_logits = ctx.download.get("logits")
        if global_logits:
            targets = distillation_targets(logits, y, global_logits)
            loss = loss + self.args.fd_lambda * soft_cross_entropy(logits, targets)
        ctx.class_logits.add(logits, y)
        return loss

    def upload(self, ctx, model):
        """{"logits": {c: mean logits of class c}} for the classes seen in training."""
        return {"logits": ctx.class_logits.means()}


if __name__ == "__main__":
    sys.exit(main(FedDistill))
