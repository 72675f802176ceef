"""Tiny algorithms and models that exercise the engine's capabilities in tests (each a few lines,
as a real algorithm file would be). Run one as a script for subprocess tests:

    python tests/tiny_algorithms.py ServerTrained --n_parties 3 ...
"""
import os
import sys

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine import Algorithm, Flag, clone_weights, main  # noqa: E402
from models import register_model  # noqa: E402


# ----------------------------------------------------------------------------- two architectures

class TinyNet(nn.Module):
    """flatten -> base.fc1 (784 -> 16) [-> base.fc2 (16 -> 16)] -> classifier.fc (16 -> C)."""

    def __init__(self, num_classes, deep):
        super().__init__()
        self.base = nn.Sequential()
        self.base.add_module("fc1", nn.Linear(784, 16))
        if deep:
            self.base.add_module("fc2", nn.Linear(16, 16))
        self.classifier = nn.Sequential()
        self.classifier.add_module("fc", nn.Linear(16, num_classes))

    def features(self, x):
        z = x.reshape(len(x), -1)
        for layer in self.base:
            z = torch.relu(layer(z))
        return z

    def forward(self, x):
        return self.classifier(self.features(x))


register_model("tiny-a", lambda num_classes: TinyNet(num_classes, deep=False), (1, 28, 28))
register_model("tiny-b", lambda num_classes: TinyNet(num_classes, deep=True), (1, 28, 28))


def only(weights, prefix):
    return {k: v for k, v in weights.items() if k.startswith(prefix)}


# ----------------------------------------------------------------------------- a partial upload

class PartialUpload(Algorithm):
    """FedPer-shaped: the base is shared (downloaded, uploaded, averaged); every client keeps its
    own head (`classifier.`) in its state."""
    name = "partial"
    keeps_local_model = True

    def download(self, server_state, client_id):
        return {"weights": only(server_state["weights"], "base.")}

    def upload(self, ctx, model):
        return {"weights": only(clone_weights(model.state_dict()), "base.")}

    def finish_client(self, ctx, model):
        ctx.state["local_model"] = only(clone_weights(model.state_dict()), "classifier.")


class Broadcast(PartialUpload):
    """PartialUpload whose download reaches every client each round (broadcast_to_all): every
    client records the round it last received; --eval local reports two series, the personal
    model and the run's initial model."""
    name = "broadcast"
    broadcast_to_all = True

    def receive(self, ctx):
        ctx.state["received"] = torch.tensor(ctx.round)

    def evaluation_model(self, ctx):
        return {"personal": super().evaluation_model(ctx),
                "initial": self.frozen_model("initial", ctx.architecture, self.setting.initial_weights[ctx.architecture])}


# ----------------------------------------------------------------------------- no weights at all

class NearestPrototype(nn.Module):
    """Scores = -||z - P_c||^2 for classes with a prototype, -inf for the others."""

    def __init__(self, model, prototypes, num_classes):
        super().__init__()
        self.model, self.num_classes = model, num_classes
        self.prototypes = prototypes

    def forward(self, x):
        z = self.model.features(x)
        scores = torch.full((len(x), self.num_classes), -float("inf"))
        for c, p in self.prototypes.items():
            scores[:, int(c)] = -(z - p).pow(2).sum(1)
        return scores


class Prototypes(Algorithm):
    """FedProto-shaped: clients keep their whole model and upload per-class mean features;
    the server averages them per class, unweighted; nothing else travels."""
    name = "prototypes"
    keeps_local_model = True
    flags = (Flag("lam", float, 1.0, "weight of the prototype term", "FedProto's default"),)

    def init_server(self, initial_weights):
        return {"prototypes": {}}

    def download(self, server_state, client_id):
        return {"prototypes": server_state["prototypes"]}

    def local_loss(self, model, x, y, ctx):
        z = model.features(x)
        loss = F.cross_entropy(model.classifier(z), y)
        prototypes = ctx.download["prototypes"]
        if prototypes:
            target = torch.stack([prototypes.get(str(int(c)), z_i.detach()) for c, z_i in zip(y, z)])
            loss = loss + self.args.lam * F.mse_loss(z, target)
        return loss

    def upload(self, ctx, model):
        x, y = ctx.data.stream(ctx.generator, augment=False, batch_size=ctx.data.num_samples).next()
        with torch.no_grad():
            z = model.features(x)
        return {"prototypes": {str(c): z[y == c].mean(0) for c in y.unique().tolist()}}

    def server_update(self, server_state, results, server):
        classes = sorted({c for r in results for c in r.upload["prototypes"]}, key=int)
        server_state["prototypes"] = {c: torch.stack([r.upload["prototypes"][c] for r in results
                                                      if c in r.upload["prototypes"]]).mean(0) for c in classes}
        return server_state

    def evaluation_model(self, ctx):
        model = super().evaluation_model(ctx)
        return NearestPrototype(model, ctx.download["prototypes"], self.num_classes)


# ----------------------------------------------------------------------------- server-side training

class ServerTrained(PartialUpload):
    """PartialUpload plus a server-side module trained every round with its own Adam and the
    server's generator: a linear map fitted to the averaged fc2 bias from random inputs.
    Its weights and the optimiser's state live in server_state (so they are checkpointed)."""
    name = "server-trained"

    def init_server(self, initial_weights):
        server_state = super().init_server(initial_weights)
        module = nn.Linear(4, 84)
        server_state["module"] = clone_weights(module.state_dict())
        server_state["optimizer"] = torch.optim.Adam(module.parameters(), lr=0.05).state_dict()
        return server_state

    def server_update(self, server_state, results, server):
        server_state = super().server_update(server_state, results, server)
        module = nn.Linear(4, 84)
        module.load_state_dict(server_state["module"])
        optimizer = torch.optim.Adam(module.parameters(), lr=0.05)
        optimizer.load_state_dict(server_state["optimizer"])
        target = server_state["weights"]["base.fc2.bias"]
        for _ in range(3):
            x = torch.randn(8, 4, generator=server.generator)
            loss = (module(x) - target).pow(2).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        server.log(f"server loss {loss.item():.6f}")
        server_state["module"] = clone_weights(module.state_dict())
        server_state["optimizer"] = optimizer.state_dict()
        return server_state


if __name__ == "__main__":
    import tiny_algorithms     # the classes by this module's name, so worker processes can unpickle them
    sys.exit(main(getattr(tiny_algorithms, sys.argv[1]), sys.argv[2:]))
