"""FedTGP (Zhang, Liu, Hua and Cao, "FedTGP: Trainable Global Prototypes with Adaptive-Margin-
Enhanced Contrastive Learning for Data and Model Heterogeneity in Federated Learning", AAAI 2024):
FedProto's client side, but the global prototypes come from a generator the server trains on the
uploaded client prototypes to separate the classes by an adaptive margin.

Client k (f_k, h_k personal, z = f_k(x)), with P^_c the downloaded global prototypes:

    client    local_steps(ctx) SGD steps on CE(h_k(z), y) + lambda * MSE(z, P^_y) (no regulariser
              before the first download; afterwards every class has a prototype)
    upload    {c: P_k,c}: the class means of f_k over the client's whole training split, in eval
              mode, taken after training (see Reference differences)
Server, each round, with the generator TGP: Embedding(C, D) -> Linear(D, D) ReLU -> Linear(D, D)
(persistent; P^_c = TGP(c)):

    Q_c     = mean of the uploaded P_k,c (unweighted)
    gap_c   = min_{c' != c} ||Q_c - Q_c'||_2 over the uploaded classes; a class without one
              (not uploaded, or the only class) gets min_c gap_c
    delta   = min(max_c gap_c, tau)                                     (the adaptive margin)
    train   for S epochs, shuffled batches of B of the uploaded pairs (P_i, y_i), a fresh
            SGD(lr = --lr, no momentum):
              d_i,c = sqrt(||P_i||^2 - 2 P_i . P^_c + ||P^_c||^2)
              loss  = CE over c of -(d_i,c + delta * [c = y_i])
    then    P^_c = TGP(c) for every class c, sent to every client

    reported  --eval local: own f_k with the nearest P^_c (argmin MSE), 0 before the first
              download; series accuracy_own_head: h_k(f_k(x))

Flags (sources: HtFLlib system/main.py and total.sh; FedTGP's run_me.sh):
  --proto_lambda 10        lambda; total.sh and FedTGP's scripts -lam 10 (main.py default 1.0;
                           the paper's 0.1 is for a Euclidean distance, the code uses MSE:
                           FedTGP issue #3, HtFLlib issues #2 and #12)
  --tgp_margin 100         tau, the margin's upper bound (-mart/--margin_threthold 100)
  --tgp_server_epochs 100  S (-se 100 in total.sh and HtFLlib's main.py; FedTGP main.py 1000)
  --tgp_stale_prototypes   upload the prototypes of the model as it was before this round's
                           training, as the reference code does (default off: after training)
The generator's learning rate is --lr (the reference uses the clients' learning rate) and its
batch size --batch_size. HtFLlib's protocol: --eval local --lr 0.01 --batch_size 10 --epochs 1
--drop_last --momentum 0 --reg 0 --no_augment (or --scenario pfllib --lr 0.01).

Source: TsingZ0/FedTGP and HtFLlib clients/clienttgp.py, servers/servertgp.py (identical files;
spec/pfl-htfl.md section 3).

Reference differences:
- Stale prototypes: clienttgp.py's collect_protos reloads the model saved at the end of the
  previous round (the trained model is saved after it), so its uploads are one round old (round 0:
  the initial model's). The paper's algorithm uploads the trained model's prototypes; that is the
  default here, --tgp_stale_prototypes reproduces the code.
- d_i,c: the squared distance is clamped at 1e-12 before the square root (the reference takes the
  square root unclamped: a rounding error below 0 gives NaN, and 0 an infinite gradient).
- Client prototypes are taken over the whole training split (the reference's train loader drops
  the last partial batch).
- The generator is initialised from a generator seeded by (--init_seed, "fedtgp") (PyTorch's
  default initialisation: Embedding N(0, 1), Linear U(+-1/sqrt(fan_in))); the shuffles of its
  training come from the round's server generator.
"""
import sys

import torch
import torch.nn.functional as F
from torch import nn

from algorithms.heterogeneous.common import (PrototypeMethod, aggregate_prototypes, built_without_drawing,
                                             model_prototypes, train_on_prototypes)
from algorithms.personalised.common import seeded_reset_
from engine import Flag, clone_weights, main
from utils import UsageError, derived_seed

HTFLLIB = "HtFLlib system/main.py and total.sh"


class PrototypeGenerator(nn.Module):
    """TGP: class c -> P^_c = fc(ReLU(middle(embedding(c)))), hidden size D (servertgp.py's
    Trainable_prototypes with server_hidden_dim = feature_dim)."""

    def __init__(self, num_classes, dim):
        super().__init__()
        self.embedings = nn.Embedding(num_classes, dim)
        self.middle = nn.Sequential(nn.Sequential(nn.Linear(dim, dim), nn.ReLU()))
        self.fc = nn.Linear(dim, dim)

    def forward(self, classes):
        return self.fc(self.middle(self.embedings(classes)))


def adaptive_margin(uploads, num_classes, tau):
    """delta = min(max_c gap_c, tau): gap_c = the distance from class c's mean uploaded prototype
    Q_c to the nearest other class's, min_c gap_c for classes without one."""
    means = aggregate_prototypes(uploads)
    gap = torch.full((num_classes,), 1e9, dtype=torch.float64)
    classes = list(means)
    for i, c1 in enumerate(classes):
        for c2 in classes[i + 1:]:
            distance = torch.linalg.vector_norm((means[c1] - means[c2]).double())
            gap[c1], gap[c2] = min(gap[c1], distance), min(gap[c2], distance)
    gap[gap > 1e8] = gap.min()
    return min(gap.max().item(), tau), gap


def margin_loss(generated, prototypes, labels, margin):
    """CE over classes of -(d + margin * onehot(y)), d = the Euclidean distances from each uploaded
    prototype to every generated one."""
    squared = ((prototypes ** 2).sum(1, keepdim=True) - 2 * prototypes @ generated.T
               + (generated ** 2).sum(1, keepdim=True).T)
    distance = squared.clamp_min(1e-12).sqrt()
    return F.cross_entropy(-(distance + margin * F.one_hot(labels, generated.shape[0])), labels)


def train_generator(generator, prototypes, labels, margin, epochs, batch_size, lr, rng):
    """S epochs of shuffled batches over the uploaded (prototype, class) pairs, a fresh plain SGD;
    returns the last batch's loss."""
    classes = torch.arange(generator.embedings.num_embeddings, device=prototypes.device)
    generator.train()
    return train_on_prototypes(generator, prototypes, labels,
                               lambda batch, targets: margin_loss(generator(classes), batch, targets, margin),
                               epochs, batch_size, lr, rng)


class FedTGP(PrototypeMethod):
    name = "fedtgp"
    display = "FedTGP"
    flags = (Flag("tgp_margin", float, 100.0, "FedTGP: tau, upper bound of the adaptive margin",
                  f"{HTFLLIB} (-mart/--margin_threthold 100)"),
             Flag("tgp_server_epochs", int, 100, "FedTGP: S, epochs of the server's generator training a round",
                  f"{HTFLLIB} (-se 100; FedTGP main.py 1000)"),
             Flag("tgp_stale_prototypes", bool, False, "FedTGP: upload the prototypes of the model from before "
                  "this round's training (the reference code's behaviour)", "this suite (off: the paper's order)"))

    @classmethod
    def check_args(cls, args):
        super().check_args(args)
        if not args.tgp_margin >= 0:
            raise UsageError(f"--tgp_margin must be >= 0 (got {args.tgp_margin})")
        if args.tgp_server_epochs < 0:
            raise UsageError(f"--tgp_server_epochs must be >= 0 (got {args.tgp_server_epochs})")

    def new_generator(self, dim):
        return built_without_drawing(lambda: PrototypeGenerator(self.num_classes, dim)).to(self.device)

    def init_server(self, initial_weights):
        state = super().init_server(initial_weights)
        generator = self.new_generator(self.dim)
        seeded_reset_(generator, torch.Generator().manual_seed(derived_seed(self.args.init_seed, "fedtgp")))
        state["generator"] = clone_weights(generator.state_dict())
        return state

    def prepare_client(self, ctx, model):
        super().prepare_client(ctx, model)
        if self.args.tgp_stale_prototypes:
            ctx.stale_prototypes = model_prototypes(model, ctx.data, self.num_classes)

    def upload(self, ctx, model):
        """The class means of the client's features over its training split."""
        if self.args.tgp_stale_prototypes:
            return {"prototypes": ctx.stale_prototypes}
        return {"prototypes": model_prototypes(model, ctx.data, self.num_classes)}

    def server_update(self, server_state, results, server):
        uploads = [r.upload["prototypes"] for r in results]
        pairs = [(p, c) for upload in uploads for c, p in upload.items()]
        if not pairs:
            return server_state
        margin, _ = adaptive_margin(uploads, self.num_classes, self.args.tgp_margin)
        prototypes = torch.stack([p for p, _ in pairs]).to(self.device)
        labels = torch.tensor([c for _, c in pairs], device=self.device)
        generator = self.new_generator(prototypes.shape[1])
        generator.load_state_dict(server_state["generator"])
        loss = train_generator(generator, prototypes, labels, margin, self.args.tgp_server_epochs,
                               self.args.batch_size, self.args.lr, server.generator)
        generator.eval()
        with torch.no_grad():
            generated = generator(torch.arange(self.num_classes, device=self.device))
        server_state["generator"] = clone_weights(generator.state_dict())
        server_state["prototypes"] = {c: generated[c].clone() for c in range(self.num_classes)}
        server.log(f"FedTGP server: {len(pairs)} client prototypes, margin {margin:.4f}, last batch loss {loss:.4f}")
        return server_state


if __name__ == "__main__":
    sys.exit(main(FedTGP))
