"""FedGen (Zhu, Hong and Zhou 2021, "Data-Free Knowledge Distillation for Heterogeneous Federated
Learning", ICML): the server learns a conditional generator G(y) of feature vectors that the
clients' heads classify as y; clients train their heads on G's features as well as on their own
data, which carries the other clients' class knowledge to them without any data leaving a client.

Generator (server state): input [eps, onehot(y)], eps ~ U[0, 1)^noise_dim;
    Linear(noise_dim + C -> hidden) BatchNorm1d ReLU -> Linear(hidden -> D)
(names fc1.0, fc1.1, fc), in train mode everywhere (BatchNorm on batch statistics).
Label sampler: yhat ~ p, p_c = (training samples of class c over all clients) / (all training
samples), known to all at setup (Setting.class_counts): the reference's uniform draw from the
pooled list of every client's labels (`qualified_labels`). Batches of B = --batch_size labels.

Two forms, as the spec distinguishes them:

FedGen (name "fedgen"; HtFLlib's heterogeneous variant). Clients keep their own base (any
architecture, one feature size D and one head shape [C, D] for all) and share the head.
    download  the global head phi and G, to every receiving client; the client's model is
              (its own base, phi)
    client    local_steps(ctx) steps of  CE(h(f(x)), y) + CE(h(G(yhat)), yhat)  over all its
              parameters (yhat a fresh draw of B labels a step; G is not trained by clients)
    upload    its head phi_k ([C, D] + [C]: 3,400 bytes at D = 84)
    server    first --gen_server_epochs steps of Adam(--gen_lr, betas 0.9/0.999, made afresh each
              round) on G:  loss = CE(sum_k w_k h_k(G(yhat)), yhat),  w_k = n_k / sum_j n_j over the
              uploaders, the uploaded heads h_k fixed; then phi = sum_k w_k phi_k
    reported  the client's own base with the global head (--eval local)
The round-0 global head is client 0's initial head (HtFLlib's clients[0].model.head).

FedGenPFLlib (name "fedgen-pfllib"; PFLlib's homogeneous form, one architecture for all).
    download  the whole global model and G; client as above on the global model; upload the whole
              model; server: the generator steps against every uploader's head (the same loss) with
              ONE Adam kept across rounds (its state in the server state), then sample-weighted
              FedAvg; reported: the global model (--eval local, or --eval global).

Flags (HtFLlib system/main.py defaults; the PFLlib form's --gen_server_epochs default is PFLlib's):
  --gen_noise_dim 512        noise size (-nd 512; HtFLlib total.sh -nd 32)
  --gen_hidden_dim 512       hidden width (-hd 512; total.sh -hd 512)
  --gen_lr 0.005             the generator's Adam learning rate (-glr 0.005; total.sh -glr 0.1)
  --gen_server_epochs 100    generator steps a round (-se 100; total.sh -se 100); fedgen-pfllib:
                             1000 (PFLlib main.py -se 1000)
HtFLlib trains the clients at lr 0.01 (pass --lr 0.01).

Sources: HtFLlib system/flcore/clients/clientgen.py, servers/servergen.py; PFLlib
clients/clientgen.py, servers/servergen.py; official zhuangdizhu/FedGen (spec/pfl-htfl.md
section 3, "FedGen").

Reference differences:
- HtFLlib never saves the trained generator (train_generator trains a copy loaded from the initial
  file and drops it; every version since 50ae2f4, 2023-08-18), so its clients always use the initial
  random G and the server's training has no effect. Fixed: the trained G is kept and sent.
  `--gen_server_epochs 0` gives the reference's behaviour (G stays the initial one).
- Both forms keep only PFLlib's CE terms; the official FedGen's label-weighted server loss,
  diversity loss, alpha/beta decay, ensemble loss and round-1 start are not in the reference code
  either (spec). The noise is uniform, as in all three codes (PFLlib's comment says Gaussian).
- Labels are drawn with torch.multinomial from p (the same distribution as the reference's
  np.random.choice over the pooled label list); labels and noise come from the client's or the
  server's generator.
- The client computes G(yhat) without gradients: G is not stepped by clients, so the model's
  updates are the reference's (whose backward also fills G's unused gradients).
- G's BatchNorm running statistics are kept and sent with G, but never used (G is always in
  train mode, as in the reference).
- PFLlib's `-lf` (head-only sharing in the homogeneous form) is not offered: the heterogeneous
  form shares the head.
- The head is exchanged as {"weight", "bias"} of the head's Linear, so architectures whose heads
  have different names (simplecnn-mnist's classifier.fc, the HtFL sets' head) share it.
"""
import sys

import torch
import torch.nn.functional as F
from torch import nn

from algorithms.heterogeneous.common import head_keys
from algorithms.personalised.common import seeded_reset_
from engine import Algorithm, Flag, clone_weights, main, split_head, weighted_average
from utils import UsageError, derived_seed

HTFLLIB = "HtFLlib system/main.py"


# ============================================================================ generator and labels

class Generator(nn.Module):
    """G(y) = fc(ReLU(BN(fc1([eps, onehot(y)])))), eps ~ U[0, 1)^noise_dim (FedGen's generator)."""

    def __init__(self, noise_dim, num_classes, hidden_dim, feature_dim):
        super().__init__()
        self.noise_dim, self.num_classes = noise_dim, num_classes
        self.fc1 = nn.Sequential(nn.Linear(noise_dim + num_classes, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.ReLU())
        self.fc = nn.Linear(hidden_dim, feature_dim)

    def forward(self, labels, generator):
        """Features for `labels`, the noise drawn from `generator` (a CPU torch.Generator)."""
        noise = torch.rand(len(labels), self.noise_dim, generator=generator).to(labels.device)
        return self.fc(self.fc1(torch.cat([noise, F.one_hot(labels, self.num_classes).to(noise.dtype)], dim=1)))


def label_distribution(class_counts):
    """p_c = samples of class c over all clients / all samples ([clients, classes] counts)."""
    totals = torch.as_tensor(class_counts).sum(0).double()
    return totals / totals.sum()


def sample_labels(distribution, count, generator):
    """`count` labels drawn with replacement from p."""
    return torch.multinomial(distribution, count, replacement=True, generator=generator)


def generator_loss(generator_model, heads, shares, labels, generator):
    """CE(sum_k w_k h_k(G(yhat)), yhat) with heads h_k = {"weight", "bias"} and shares w_k."""
    features = generator_model(labels, generator)
    logits = sum(share * F.linear(features, head["weight"], head["bias"]) for share, head in zip(shares, heads))
    return F.cross_entropy(logits, labels)


# ============================================================================ heterogeneous (HtFLlib)

class FedGen(Algorithm):
    name = "fedgen"
    flags = (
        Flag("gen_noise_dim", int, 512, "FedGen: size of the generator's uniform noise",
             f"{HTFLLIB} (-nd, default 512; total.sh -nd 32)"),
        Flag("gen_hidden_dim", int, 512, "FedGen: width of the generator's hidden layer",
             f"{HTFLLIB} (-hd, default 512; total.sh -hd 512)"),
        Flag("gen_lr", float, 0.005, "FedGen: learning rate of the generator's Adam on the server",
             f"{HTFLLIB} (-glr, default 0.005; total.sh -glr 0.1)"),
        Flag("gen_server_epochs", int, 100, "FedGen: generator steps on the server a round (0: the "
             "generator stays the initial one, HtFLlib's behaviour)",
             f"{HTFLLIB} (-se, default 100; total.sh -se 100)"),
    )
    evaluations = ("local",)        # every client reports its own base with the global head
    persistent_optimizer = False    # HtFLlib: a fresh Adam every round

    @classmethod
    def check_args(cls, args):
        for flag in ("gen_noise_dim", "gen_hidden_dim"):
            if getattr(args, flag) < 1:
                raise UsageError(f"--{flag} must be >= 1 (got {getattr(args, flag)})")
        if args.gen_lr <= 0:
            raise UsageError(f"--gen_lr must be > 0 (got {args.gen_lr})")
        if args.gen_server_epochs < 0:
            raise UsageError(f"--gen_server_epochs must be >= 0 (got {args.gen_server_epochs})")

    def __init__(self, setting):
        super().__init__(setting)
        shapes = {architecture: tuple(self.head_of(self.setting.initial_weights[architecture], architecture)
                                      ["weight"].shape) for architecture in dict.fromkeys(setting.client_models)}
        if len(set(shapes.values())) > 1:
            raise UsageError(f"{self.name} shares one head, so every client needs the same head shape; "
                             + ", ".join(f"{a} has [{c}, {d}]" for a, (c, d) in shapes.items()))
        self.feature_dim = next(iter(shapes.values()))[1]
        self.labels = label_distribution(setting.class_counts)      # on the CPU, as the generators
        self._generator = None

    # ------------------------------------------------------------------ pieces
    def head_keys(self, architecture):
        """{"weight": key, "bias": key}: the state-dict names of the architecture's head Linear."""
        return dict(zip(("weight", "bias"), head_keys(self.model("local", architecture))))

    def head_of(self, weights, architecture):
        """{"weight", "bias"} of the head in an architecture's state dict (copies)."""
        return {role: weights[key].detach().clone() for role, key in self.head_keys(architecture).items()}

    def generator_model(self):
        """The generator module (one instance, its weights loaded where it is used)."""
        if self._generator is None:
            a = self.args
            self._generator = Generator(a.gen_noise_dim, self.num_classes, a.gen_hidden_dim,
                                        self.feature_dim).to(self.device)
        return self._generator

    def initial_generator(self):
        """G's initial weights: PyTorch's initialisation, drawn from a seeded generator."""
        generator = seeded_reset_(self.generator_model(),
                                  torch.Generator().manual_seed(derived_seed(self.args.init_seed, "fedgen G")))
        generator.fc1[1].reset_parameters()
        generator.fc1[1].reset_running_stats()
        return clone_weights(generator.state_dict())

    def train_generator(self, server_state, heads, shares, server):
        """--gen_server_epochs Adam steps of generator_loss against the uploaded heads."""
        a = self.args
        generator = self.generator_model()
        generator.load_state_dict(server_state["generator"])
        generator.train()
        optimizer = torch.optim.Adam(generator.parameters(), lr=a.gen_lr, betas=(0.9, 0.999), eps=1e-8)
        if self.persistent_optimizer and "generator_optimizer" in server_state:
            optimizer.load_state_dict(server_state["generator_optimizer"])
        losses = []
        for _ in range(a.gen_server_epochs):
            labels = sample_labels(self.labels, a.batch_size, server.generator).to(self.device)
            loss = generator_loss(generator, heads, shares, labels, server.generator)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        if losses:
            server.log(f"generator loss: {losses[0]:.4f} -> {losses[-1]:.4f} ({len(losses)} Adam steps)")
        server_state["generator"] = clone_weights(generator.state_dict())
        if self.persistent_optimizer:
            server_state["generator_optimizer"] = optimizer.state_dict()

    @staticmethod
    def shares(results):
        """w_k = n_k / sum_j n_j over the uploaders."""
        total = sum(r.num_samples for r in results)
        return [r.num_samples / total for r in results]

    # ------------------------------------------------------------------ server
    def initialise_server(self, server_state, contexts, server):
        server.log(f"{self.name} reports " + ("the global model" if self.global_model_reported() else
                                              "each client's own base with the global head")
                   + (" on each client's own test split" if self.args.eval == "local" else ""))
        return server_state

    def global_model_reported(self):
        return False

    def init_server(self, initial_weights):
        """The global head (client 0's initial head) and the initial generator; no global model."""
        architecture = self.architecture(0)
        return {"weights": {}, "head": self.head_of(self.setting.initial_weights[architecture], architecture),
                "generator": self.initial_generator()}

    def download(self, server_state, client_id):
        return {"head": server_state["head"], "generator": server_state["generator"]}

    def server_update(self, server_state, results, server):
        """Train G against the uploaded heads, then average the heads by sample counts."""
        heads = [r.upload["head"] for r in results]
        self.train_generator(server_state, heads, self.shares(results), server)
        server_state["head"] = weighted_average(heads, [r.num_samples for r in results])
        return server_state

    # ------------------------------------------------------------------ client
    def compose_weights(self, architecture, download, state):
        """The initial weights, overwritten by the client's own base and the downloaded head."""
        weights = dict(self.setting.initial_weights[architecture])
        weights.update(state.get("base", {}))
        for role, key in self.head_keys(architecture).items():
            weights[key] = download["head"][role]
        return weights

    def prepare_client(self, ctx, model):
        """G with the downloaded weights, in train mode (BatchNorm on batch statistics)."""
        ctx.generator_model = self.generator_model()
        ctx.generator_model.load_state_dict(ctx.download["generator"])
        ctx.generator_model.train()

    def local_loss(self, model, x, y, ctx):
        """CE(h(f(x)), y) + CE(h(G(yhat)), yhat), yhat a fresh draw of B labels."""
        labels = sample_labels(self.labels, self.args.batch_size, ctx.generator).to(self.device)
        with torch.no_grad():
            features = ctx.generator_model(labels, ctx.generator)
        return F.cross_entropy(model(x), y) + F.cross_entropy(model.classifier(features), labels)

    def upload(self, ctx, model):
        """The head only."""
        return {"head": self.head_of(model.state_dict(), ctx.architecture)}

    def finish_client(self, ctx, model):
        """Keep the base."""
        ctx.state["base"], _ = split_head(clone_weights(model.state_dict()), self.head_prefix(ctx.architecture))


# ============================================================================ homogeneous (PFLlib)

class FedGenPFLlib(FedGen):
    name = "fedgen-pfllib"
    flags = (Flag("gen_server_epochs", int, 1000, "FedGen: generator steps on the server a round",
                  "PFLlib system/main.py (-se, default 1000)"),)
    evaluations = Algorithm.evaluations     # the global model: --eval global, local or groups
    persistent_optimizer = True             # PFLlib: one Adam for the whole run

    def __init__(self, setting):
        if set(setting.client_models) != {setting.args.model}:
            raise UsageError(f"{self.name} is FedGen's homogeneous form (every client runs --model); for "
                             "different client architectures use fedgen")
        super().__init__(setting)

    def global_model_reported(self):
        return True

    def init_server(self, initial_weights):
        """The global model and the initial generator."""
        return {"weights": clone_weights(initial_weights), "generator": self.initial_generator()}

    def download(self, server_state, client_id):
        return {"weights": server_state["weights"], "generator": server_state["generator"]}

    def server_update(self, server_state, results, server):
        """Train G against the uploaders' heads (the persistent Adam), then FedAvg."""
        heads = [self.head_of(r.upload["weights"], self.args.model) for r in results]
        self.train_generator(server_state, heads, self.shares(results), server)
        return Algorithm.server_update(self, server_state, results, server)

    compose_weights = Algorithm.compose_weights
    upload = Algorithm.upload
    finish_client = Algorithm.finish_client


if __name__ == "__main__":
    sys.exit(main(FedGen))
