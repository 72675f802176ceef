"""Pieces the model-heterogeneous methods share: class-prototype means, prototype aggregation,
the prototype regulariser, the nearest-prototype predictor, the head's Linear and the run's
common feature size, and PrototypeMethod (the client side FedProto and FedTGP share).

Prototypes travel as {class index: tensor [D]} (only the classes a client holds; the dict keys are
names, not counted as bytes), e.g. an upload {"prototypes": {3: P_3, 7: P_7}} is counted as
bytes_uploaded_by_kind["prototypes"] = 2 * D * 4 bytes (float32).

    class prototype     P_k,c = mean of f_k(x) over client k's samples of class c
    aggregation         P_c = sum_k w_k,c P_k,c / sum_k w_k,c over the uploads holding c;
                        w = 1 (HtFLlib's proto_aggregation: unweighted) or given weights
                        (e.g. the paper's |D_k,c|: the class counts every party knows at setup)
    regulariser         MSE(z, T), T_i = P_{y_i} when the class has a global prototype, else
                        z_i.detach() (zero contribution but counted in the mean over B*D elements:
                        torch's MSELoss, as clientproto.py's loss_mse)
    nearest prototype   y_hat = argmin_c MSE(f(x), P_c) over the classes with a prototype
                        (clientproto.py / clienttgp.py test_metrics); before any prototype exists
                        a client has no prediction and scores 0 (the reference reports 0 correct)
"""
import torch
import torch.nn.functional as F
from torch import nn

import cvdataset
from engine import Algorithm, Flag
from utils import UsageError

HTFLLIB_TOTAL_SH = "HtFLlib system/total.sh (-lam 10 for FedProto and FedTGP; main.py's -lam default is 1.0)"


# ============================================================================ models

def head_linear(model):
    """The Linear(D -> C) of the model's head (model.classifier: the head itself, or SimpleCNN's
    Classifier holding it as .fc)."""
    linears = [m for m in model.classifier.modules() if isinstance(m, nn.Linear)]
    if len(linears) != 1:
        raise UsageError(f"{type(model).__name__}: its head is not one Linear layer; prototype and head "
                         "sharing need head = Linear(D -> C)")
    return linears[0]


def feature_dim(model):
    """D: the size of model.features(x), the input of its head."""
    return head_linear(model).in_features


def head_keys(model):
    """The state-dict keys of the head's Linear: ("head.weight", "head.bias") for BaseHeadSplit
    models and FedAvgCNN, ("classifier.fc.weight", "classifier.fc.bias") for SimpleCNN."""
    linear = head_linear(model)
    name = next(name for name, module in model.named_modules() if module is linear)
    return f"{name}.weight", f"{name}.bias"


def common_feature_dim(algorithm, method):
    """The feature size D every client's architecture shares (all of them end with a head
    Linear(D -> C)); one clear line when they differ."""
    dims = {architecture: feature_dim(algorithm.model("local", architecture))
            for architecture in dict.fromkeys(algorithm.setting.client_models)}
    if len(set(dims.values())) > 1:
        listed = ", ".join(f"{name} {dim}" for name, dim in dims.items())
        raise UsageError(f"{method} shares {'prototypes' if method != 'FedGH' else 'a head'} of one feature size, "
                         f"but the client models differ ({listed}); use a group with one feature size "
                         "(--client_models hcnns8 or light4)")
    return next(iter(dims.values()))


def built_without_drawing(builder):
    """builder()'s module, its (soon overwritten) default initialisation drawn without moving
    the global torch RNG."""
    with torch.random.fork_rng(devices=[]):
        return builder()


# ============================================================================ prototypes

class ClassMeans:
    """Running per-class sums and counts of feature vectors (float64), then their means."""

    def __init__(self, num_classes):
        self.num_classes = num_classes
        self.sums = None
        self.counts = torch.zeros(num_classes, dtype=torch.float64)

    def add(self, features, labels):
        features = features.detach()
        if self.sums is None:
            self.sums = torch.zeros(self.num_classes, features.shape[1], dtype=torch.float64, device=features.device)
            self.counts = self.counts.to(features.device)
            self.dtype = features.dtype
        self.sums.index_add_(0, labels, features.double())
        self.counts.index_add_(0, labels, torch.ones_like(labels, dtype=torch.float64))

    def means(self):
        """{class: mean feature} for every class seen, in class order."""
        if self.sums is None:
            return {}
        return {c: (self.sums[c] / self.counts[c]).to(self.dtype)
                for c in range(self.num_classes) if self.counts[c] > 0}


def class_prototypes(features, labels, num_classes):
    """{c: mean of features[labels == c]} for the classes present."""
    means = ClassMeans(num_classes)
    means.add(features, labels)
    return means.means()


@torch.no_grad()
def model_prototypes(model, data, num_classes, batch_size=1000):
    """Prototypes of a model over a client's whole training split (engine.data.ClientData), in
    eval mode, without augmentation, in stored order; the model's mode is restored."""
    was_training = model.training
    model.eval()
    means = ClassMeans(num_classes)
    for start in range(0, data.num_samples, batch_size):
        x = cvdataset.normalise(data.images[start:start + batch_size], data.mean, data.std)
        means.add(model.features(x), data.labels[start:start + batch_size])
    model.train(was_training)
    return means.means()


def aggregate_prototypes(uploads, weights=None):
    """{c: sum_k w_k,c P_k,c / sum_k w_k,c} over the uploads holding c, in class order.
    `uploads`: [{c: P_k,c}]; `weights`: None (w = 1: the unweighted mean) or, per upload,
    anything indexable by class (e.g. that client's row of Setting.class_counts)."""
    classes = sorted({c for upload in uploads for c in upload})
    out = {}
    for c in classes:
        owners = [(upload[c], 1.0 if weights is None else float(w[c]))
                  for upload, w in zip(uploads, [None] * len(uploads) if weights is None else weights)
                  if c in upload]
        total = sum(w for _, w in owners)
        if total <= 0:            # weights all zero: fall back to the unweighted mean
            owners, total = [(p, 1.0) for p, _ in owners], float(len(owners))
        out[c] = sum(p.double() * (w / total) for p, w in owners).to(owners[0][0].dtype)
    return out


def train_on_prototypes(module, prototypes, labels, batch_loss, epochs, batch_size, lr, rng):
    """The server's training over the uploaded (prototype, class) pairs (FedGH's head, FedTGP's
    generator): `epochs` passes of shuffled batches (order from `rng`), a fresh plain SGD on
    `module`'s parameters, loss = batch_loss(prototypes, labels) of the batch; returns the last
    batch's loss."""
    optimizer = torch.optim.SGD(module.parameters(), lr=lr)
    loss = torch.zeros(())
    for _ in range(epochs):
        order = torch.randperm(len(labels), generator=rng).to(prototypes.device)
        for start in range(0, len(labels), batch_size):
            batch = order[start:start + batch_size]
            loss = batch_loss(prototypes[batch], labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return loss.item()


def prototype_table(prototypes, num_classes, dim, device=None):
    """(P [C, D], present [C] bool): the prototypes as rows, zeros where a class has none."""
    table = torch.zeros(num_classes, dim, device=device)
    present = torch.zeros(num_classes, dtype=torch.bool, device=device)
    for c, p in prototypes.items():
        table[int(c)] = p.to(table)
        present[int(c)] = True
    return table, present


def prototype_regulariser(features, labels, table, present):
    """MSE(z, T) over all B*D elements, T_i = P_{y_i} where present[y_i], else z_i.detach()."""
    has = present[labels].unsqueeze(1)
    target = torch.where(has, table[labels], features.detach())
    return F.mse_loss(features, target)


class NearestPrototype(nn.Module):
    """A predictor: scores(x) = -MSE(f(x), P_c) for the classes with a prototype, -inf for the
    others, so argmax = the nearest prototype (first on ties, as the reference's argmin). With no
    prototype at all every sample goes to an extra column C (no class): 0 correct."""

    def __init__(self, model, prototypes, num_classes):
        super().__init__()
        self.model = model
        dim = feature_dim(model)
        table, present = prototype_table(prototypes, num_classes, dim, next(model.parameters()).device)
        self.register_buffer("table", table)
        self.register_buffer("present", present)

    def forward(self, x):
        z = self.model.features(x)
        if not self.present.any():
            abstain = torch.zeros(len(z), 1, device=z.device)
            return torch.cat([torch.full((len(z), len(self.present)), -torch.inf, device=z.device), abstain], 1)
        distances = ((z.unsqueeze(1) - self.table.unsqueeze(0)) ** 2).mean(2)
        return (-distances).masked_fill(~self.present, -torch.inf)


# ============================================================================ the shared client side

class PrototypeMethod(Algorithm):
    """FedProto's and FedTGP's client side: every client keeps its whole model (state
    "local_model"); the download holds global prototypes {c: P_c} (none before the first
    aggregation); the local loss is CE(h(z), y) + lambda * MSE(z, T) (the regulariser above,
    only once prototypes exist); the reported model is the client's own feature extractor with
    the nearest global prototype, plus its own head as the series own_head."""
    display = "a prototype method"
    evaluations = ("local",)
    keeps_local_model = True
    flags = (Flag("proto_lambda", float, 10.0, "FedProto/FedTGP: weight lambda of MSE(z, global prototype of y)",
                  HTFLLIB_TOTAL_SH),)

    @classmethod
    def check_args(cls, args):
        if not args.proto_lambda >= 0:
            raise UsageError(f"--proto_lambda must be >= 0 (got {args.proto_lambda})")

    def init_server(self, initial_weights):
        """No global model: the server holds the global prototypes only."""
        self.dim = common_feature_dim(self, self.display)      # D (set in the driver only)
        return {"weights": {}, "prototypes": {}}

    def initialise_server(self, server_state, contexts, server):
        server.log(f"{self.display} reports each client's own feature extractor with the nearest global prototype "
                   "(argmin MSE) on its own test split (0 before the first prototypes); accuracy_own_head: "
                   "the client's own model with its own head")
        return server_state

    def download(self, server_state, client_id):
        return {"prototypes": server_state["prototypes"]} if server_state["prototypes"] else {}

    def prepare_client(self, ctx, model):
        prototypes = ctx.download.get("prototypes", {})
        ctx.global_prototypes = (prototype_table(prototypes, self.num_classes, feature_dim(model), self.device)
                                 if prototypes else None)

    def local_loss(self, model, x, y, ctx):
        z = model.features(x)
        loss = F.cross_entropy(model.classifier(z), y)
        self.observe_features(z, y, ctx)
        if ctx.global_prototypes is not None:
            loss = loss + self.args.proto_lambda * prototype_regulariser(z, y, *ctx.global_prototypes)
        return loss

    def observe_features(self, features, labels, ctx):
        """Each training step's features (FedProto collects its prototypes here)."""

    def evaluation_model(self, ctx):
        own = super().evaluation_model(ctx)
        return {"nearest_prototype": NearestPrototype(own, ctx.download.get("prototypes", {}), self.num_classes),
                "own_head": own}
