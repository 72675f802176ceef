"""FedGH (Yi, Wang, Liu, Shi and Yu, "FedGH: Heterogeneous Federated Learning with Generalized
Global Header", ACM Multimedia 2023): clients of any architectures (one feature size D) keep their
own feature extractors; the server trains one global head on the class prototypes they upload and
sends it to everyone.

With f_k client k's feature extractor (personal, kept across rounds) and h the global head
Linear(D -> C) (server state, persistent):

    download  h (C*D + C floats) to every client; it replaces the client's head
    client    local_steps(ctx) SGD steps on CE(h_k(f_k(x)), y) over f_k and its copy h_k of h,
              jointly; then, in eval mode over its whole training split, P_k,c = mean of f_k(x)
              over the samples of class c (the trained extractor)
    upload    {c: P_k,c} for the classes it holds (D floats a class); nothing else
    server    every uploaded (P_k,c, c) is one training pair (no averaging, no weights):
              E_s epochs of shuffled batches of B (--batch_size), CE(h(P), c), plain SGD(eta_s)
    reported  --eval local: the client's own f_k with the current global head h (after the
              download, before training)

The initial h is client 0's initial head (HtFLlib: all clients seed their models alike; here each
architecture has its initial weights, and client 0's architecture's head starts the server's).

Flags:
  --gh_server_lr 0.01      eta_s: HtFLlib main.py -slr (default 0.01) and total.sh -slr 0.01
                           (PFLlib's default is 1.0)
  --gh_server_epochs 1     E_s: HtFLlib total.sh -se 1 (HtFLlib main.py's shared -se default is
                           100; PFLlib hard-codes 1)
HtFLlib's protocol: --eval local --lr 0.01 --batch_size 10 --epochs 1 --drop_last --momentum 0
--reg 0 --no_augment (or --scenario pfllib --lr 0.01).

Source: HtFLlib clients/clientgh.py, servers/servergh.py; PFLlib the same files
(spec/pfl-advanced.md section 5).

Reference differences:
- As HtFLlib: the server's head is its own copy. PFLlib's server head *is* client 0's head object,
  so client 0's local training moves it before the server step (spec section 5, a bug).
- Client prototypes are taken over the whole training split (the reference's loader drops the
  last partial batch); the server's shuffles come from the round's server generator.
"""
import sys

import torch
import torch.nn.functional as F
from torch import nn

from algorithms.heterogeneous.common import (built_without_drawing, common_feature_dim, head_keys, model_prototypes,
                                              train_on_prototypes)
from engine import Algorithm, Flag, clone_weights, main
from utils import UsageError

HTFLLIB = "HtFLlib system/main.py (-slr) and total.sh (FedGH -slr 0.01 -se 1)"


def train_head(head, prototypes, labels, epochs, batch_size, lr, rng):
    """E_s epochs of shuffled batches of (prototype, class) pairs, CE, plain SGD; returns the
    last batch's loss."""
    return train_on_prototypes(head, prototypes, labels, lambda batch, classes: F.cross_entropy(head(batch), classes),
                               epochs, batch_size, lr, rng)


class FedGH(Algorithm):
    name = "fedgh"
    evaluations = ("local",)
    keeps_local_model = True
    flags = (Flag("gh_server_lr", float, 0.01, "FedGH: learning rate of the server's head training", HTFLLIB),
             Flag("gh_server_epochs", int, 1, "FedGH: epochs of the server's head training a round", HTFLLIB))

    @classmethod
    def check_args(cls, args):
        if not args.gh_server_lr > 0:
            raise UsageError(f"--gh_server_lr must be > 0 (got {args.gh_server_lr})")
        if args.gh_server_epochs < 0:
            raise UsageError(f"--gh_server_epochs must be >= 0 (got {args.gh_server_epochs})")

    def init_server(self, initial_weights):
        """The global head starts as client 0's initial head."""
        common_feature_dim(self, "FedGH")
        architecture = self.architecture(0)
        weight, bias = head_keys(self.model("local", architecture))
        initial = self.setting.initial_weights[architecture]
        return {"weights": {}, "head": {"weight": initial[weight].clone(), "bias": initial[bias].clone()}}

    def initialise_server(self, server_state, contexts, server):
        server.log("FedGH reports each client's own feature extractor with the current global head on its own "
                   "test split")
        return server_state

    def download(self, server_state, client_id):
        return {"head": server_state["head"]}

    def compose_weights(self, architecture, download, state):
        """The client's kept model with the downloaded global head in place of its own."""
        weights = super().compose_weights(architecture, download, state)
        if "head" in download:
            weight, bias = head_keys(self.model("local", architecture))
            weights[weight], weights[bias] = download["head"]["weight"], download["head"]["bias"]
        return weights

    def upload(self, ctx, model):
        """The trained extractor's class means over the client's training split."""
        return {"prototypes": model_prototypes(model, ctx.data, self.num_classes)}

    def server_update(self, server_state, results, server):
        pairs = [(p, c) for r in results for c, p in r.upload["prototypes"].items()]
        if not pairs:
            return server_state
        prototypes = torch.stack([p for p, _ in pairs]).to(self.device)
        labels = torch.tensor([c for _, c in pairs], device=self.device)
        head = built_without_drawing(lambda: nn.Linear(prototypes.shape[1], self.num_classes)).to(self.device)
        head.load_state_dict(server_state["head"])
        loss = train_head(head, prototypes, labels, self.args.gh_server_epochs, self.args.batch_size,
                          self.args.gh_server_lr, server.generator)
        server_state["head"] = clone_weights(head.state_dict())
        server.log(f"FedGH server: head trained on {len(pairs)} client prototypes, last batch loss {loss:.4f}")
        return server_state


if __name__ == "__main__":
    sys.exit(main(FedGH))
