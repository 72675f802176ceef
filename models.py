"""The suite's models. Every one has `features(x)` (the representation z), a head module (logits
= head(z)) named by the class attribute `head_name`, and `classifier`, that head under one name for
every model.

    SimpleCNN (SPEC section 3): `base` gives the 84-d representation, `classifier.fc` the
        logits. State-dict names (base.conv1, base.conv2, base.fc1, base.fc2, classifier.fc)
        match the published code so checkpoints load across tools.
    FedAvgCNN: PFLlib's "4-layer CNN" (spec/pfl-htfl.md section 0), 512-d representation,
        582,026 parameters for 1x28x28; names as PFLlib's BaseHeadSplit (base.conv1.0, ...,
        head.weight), so its base/head methods split it where PFLlib does.
"""
import torch
from torch import nn

from utils import UsageError


class SimpleCNNBase(nn.Module):
    """conv(c->6,5) ReLU pool2, conv(6->16,5) ReLU pool2, flatten, fc(d->120) ReLU, fc(120->84) ReLU."""

    def __init__(self, in_channels, flat_dim):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 6, 5)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.fc1 = nn.Linear(flat_dim, 120)
        self.fc2 = nn.Linear(120, 84)

    def forward(self, x):
        x = self.pool(torch.relu(self.conv1(x)))
        x = self.pool(torch.relu(self.conv2(x)))
        x = x.reshape(x.shape[0], -1)
        return torch.relu(self.fc2(torch.relu(self.fc1(x))))


class Classifier(nn.Module):
    def __init__(self, num_classes):
        super().__init__()
        self.fc = nn.Linear(84, num_classes)

    def forward(self, z):
        return self.fc(z)


class SimpleCNN(nn.Module):
    """logits = classifier(base(x)); `features(x)` is the 84-d representation MOON uses."""
    head_name = "classifier"

    def __init__(self, in_channels, image_size, num_classes):
        super().__init__()
        side = ((image_size - 4) // 2 - 4) // 2
        self.input_shape = (in_channels, image_size, image_size)
        self.num_classes = num_classes
        self.base = SimpleCNNBase(in_channels, 16 * side * side)
        self.classifier = Classifier(num_classes)

    def features(self, x):
        return self.base(x)

    def forward(self, x):
        return self.classifier(self.base(x))


class FedAvgCNN(nn.Module):
    """PFLlib's FedAvgCNN as BaseHeadSplit holds it: base = conv(c->32,5) ReLU pool2,
    conv(32->64,5) ReLU pool2, flatten, fc1(flat->512) ReLU; head = Linear(512 -> classes)."""
    head_name = "head"

    def __init__(self, in_channels, flat_dim, num_classes, dim=512):
        super().__init__()
        self.num_classes = num_classes
        self.base = nn.Sequential()
        self.base.add_module("conv1", nn.Sequential(nn.Conv2d(in_channels, 32, 5), nn.ReLU(), nn.MaxPool2d(2)))
        self.base.add_module("conv2", nn.Sequential(nn.Conv2d(32, 64, 5), nn.ReLU(), nn.MaxPool2d(2)))
        self.base.add_module("flatten", nn.Flatten())
        self.base.add_module("fc1", nn.Sequential(nn.Linear(flat_dim, dim), nn.ReLU()))
        self.head = nn.Linear(dim, num_classes)

    @property
    def classifier(self):
        return self.head

    def features(self, x):
        return self.base(x)

    def forward(self, x):
        return self.head(self.base(x))


# name -> (builder(num_classes), input shape). register_model adds one (a test's tiny model,
# a family's architectures); MODEL_GROUPS names lists of them for --client_models.
MODELS = {
    "simplecnn": (lambda num_classes: SimpleCNN(3, 32, num_classes), (3, 32, 32)),
    "simplecnn-mnist": (lambda num_classes: SimpleCNN(1, 28, num_classes), (1, 28, 28)),
    "fedavgcnn": (lambda num_classes: FedAvgCNN(1, 1024, num_classes), (1, 28, 28)),
    "fedavgcnn-cifar": (lambda num_classes: FedAvgCNN(3, 1600, num_classes), (3, 32, 32)),
}
MODEL_GROUPS = {}
DATASET_SHAPES = {"fashionmnist": (1, 28, 28), "cifar10": (3, 32, 32), "cifar100": (3, 32, 32)}


def register_model(name, builder, input_shape):
    """Make `name` buildable: builder(num_classes) -> nn.Module taking inputs of input_shape."""
    MODELS[name] = (builder, tuple(input_shape))


def build_model(name, num_classes, image_shape=None):
    """The architecture `name`; a clear error if it is unknown or the data does not fit."""
    if name not in MODELS:
        raise UsageError(f"unknown model '{name}'; choose one of {', '.join(MODELS)}")
    builder, shape = MODELS[name]
    if image_shape is not None and tuple(image_shape) != shape:
        raise UsageError(f"model {name} takes {'x'.join(map(str, shape))} inputs but the data is "
                         f"{'x'.join(map(str, image_shape))}")
    return builder(num_classes)


def client_architectures(spec, default, n_parties):
    """--client_models: a group name or A,B,... -> the architecture of every client (k mod M)."""
    if not spec:
        return [default] * n_parties
    names = MODEL_GROUPS.get(spec) or [name.strip() for name in spec.split(",") if name.strip()]
    if not names:
        raise UsageError(f"--client_models '{spec}' names no model; give A,B,... or a group name")
    return [names[k % len(names)] for k in range(n_parties)]


def resolve_models(args):
    """Default --model for the dataset; check --model and --client_models exist and fit the data."""
    shape = DATASET_SHAPES[args.dataset]
    if args.model is None:
        args.model = next(name for name, (_, s) in MODELS.items() if s == shape)
    names = [args.model] + client_architectures(args.client_models, args.model, args.n_parties)
    for flag, name in zip(["--model"] + ["--client_models"] * args.n_parties, names):
        if name not in MODELS:
            raise UsageError(f"unknown {flag} '{name}'; choose one of {', '.join(MODELS)}"
                             + (f" or a group: {', '.join(MODEL_GROUPS)}" if MODEL_GROUPS else ""))
        if MODELS[name][1] != shape:
            fitting = [n for n, (_, s) in MODELS.items() if s == shape]
            raise UsageError(f"{flag} {name} does not fit --dataset {args.dataset} "
                             f"(use one of {', '.join(fitting)})")


def head_prefix(model):
    """The state-dict prefix of a model's head ("classifier." for SimpleCNN, "head." for FedAvgCNN)."""
    return type(model).head_name + "."


def count_parameters(model):
    return sum(p.numel() for p in model.parameters())
