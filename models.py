"""The suite's models. Every one has `features(x)` (the representation z), a head module (logits
= head(z)) named by the class attribute `head_name`, and `classifier`, that head under one name for
every model.

    SimpleCNN (SPEC section 3): `base` gives the 84-d representation, `classifier.fc` the
        logits. State-dict names (base.conv1, base.conv2, base.fc1, base.fc2, classifier.fc)
        match the published code so checkpoints load across tools.
    FedAvgCNN: PFLlib's "4-layer CNN" (spec/pfl-htfl.md section 0), 512-d representation,
        582,026 parameters for 1x28x28; names as PFLlib's BaseHeadSplit (base.conv1.0, ...,
        head.weight), so its base/head methods split it where PFLlib does.

Model-heterogeneous sets (--client_models GROUP: client k gets the group's names[k mod M]). Every
member is a BaseHeadSplit: `base` ends at the group's feature size D, `head` = Linear(D -> C) (the
same shape [C, D] for all members; state-dict names base.* and head.weight/head.bias, so
Algorithm.head_prefix gives "head." for each), `features(x)` = base(x) (after a ReLU).

    hcnns8 (D = 512): HtFLlib's 8 CNNs for 28x28 grayscale ("HCNNs8", FedTGP main.py; spec
        pfl-htfl.md section 4), in its order. `CNN(num_cov, hidden_dims)` under BaseHeadSplit:
        conv(1->32,5) ReLU pool2 [then conv(32->64,5) ReLU pool2], flatten (4608 or 1024),
        Linear/ReLU through hidden_dims + [512]; names base.conv.<i>.0.*, base.fc1.<j>.*, head.*.
          hcnn-c1            num_cov 1, hidden []            2,365,770 parameters
          hcnn-c2            num_cov 2, hidden []              582,026 (FedAvgCNN's layers)
          hcnn-c1-512        num_cov 1, hidden [512]         2,628,426
          hcnn-c2-512        num_cov 2, hidden [512]           844,682
          hcnn-c1-1024       num_cov 1, hidden [1024]        5,250,378
          hcnn-c2-1024       num_cov 2, hidden [1024]        1,631,626
          hcnn-c1-1024-512   num_cov 1, hidden [1024, 512]   5,513,034
          hcnn-c2-1024-512   num_cov 2, hidden [1024, 512]   1,894,282
        (totals with the Linear(512 -> 10) head; 9-19 ms a step of 16 on one CPU thread).
    light4 (D = 84, SimpleCNN's representation size): four different SimpleCNN-sized extractors
        for 1x28x28 that train quickly on a few CPU cores (0.3-2.7 ms a step of 16 on one thread,
        SimpleCNN 1.8 ms); each member's base layers have names of their own (light-lenet's are
        SimpleCNN's: base.conv1, base.conv2, base.fc1, base.fc2), so the head is all they share
        by name (FedAvg over light4 averages the head alone):
          light-lenet   SimpleCNN-mnist's layers: conv(1->6,5) ReLU pool2, conv(6->16,5) ReLU
                        pool2, fc 256->120 ReLU, fc 120->84 ReLU        44,426 parameters
          light-mlp     fc 784->56 ReLU, fc 56->84 ReLU                 49,598
          light-conv1   conv(1->10,5) ReLU pool4, fc 360->84 ReLU       31,434
          light-conv3   conv3x3(1->8) ReLU pool2, conv3x3(8->16) ReLU pool2, conv3x3(16->16)
                        ReLU pool2, fc 144->84 ReLU                     16,598
        HtFLlib's names in hcnns8 are kept: there same-named entries can differ in shape
        (base.fc1.1.weight is [512, 4608] in hcnn-c1, [512, 1024] in hcnn-c2).

Every model's first convolution (on one-channel images) and SimpleCNN's second are
kernels.FastConv2d: an nn.Conv2d with the same parameters and numbers, computed faster on CPUs
(kernels.py). A ReLU followed by 2x2 max pooling is one ReLUMaxPool2x2 in SimpleCNN, FedAvgCNN and
HtFLlib's CNNs (no parameters: the state-dict names are unchanged).
"""
import contextlib

import torch
from torch import nn

from kernels import FastConv2d, relu_max_pool_2x2, window_origin
from utils import UsageError


# ============================================================================ 2x2 max pooling
# PyTorch's CPU max_pool2d is a third of a SimpleCNN training step on this project's CPUs (its
# forward writes an int64 index per output with a scalar loop: ~1.1 ms for a batch of 64 after
# conv1). MaxPool2x2 computes the same outputs and the same gradients, bit for bit, in ~0.2 ms:
# the four corners of every window are split into four contiguous tensors (one copy) and combined
# with vectorised maximum. For backward it records which corner won, with PyTorch's rule (the
# first maximum in scan order a b / c d wins: b beats a only if b > a, the lower pair beats the
# upper only if its maximum is strictly greater), and hands the flat indices to PyTorch's own
# max_pool2d backward kernel. Two edge cases differ from max_pool2d: the sign of a zero output
# where -0 ties +0 (torch.maximum's, which varies with the tensor's size), and in a window with
# NaNs the NaN's bits and which NaN gets the gradient (max_pool2d: the last). The relu + pooling
# in C (ReLUMaxPool2x2) follows max_pool2d there too. Odd sizes, other devices and non-4-d inputs
# use F.max_pool2d.

class _MaxPool2x2(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        n, c, h, w = x.shape
        upper_left, upper_right, lower_left, lower_right = (
            x.view(n, c, h // 2, 2, w // 2, 2).permute(3, 5, 0, 1, 2, 4).reshape(4, n, c, h // 2, w // 2))
        upper, lower = torch.maximum(upper_left, upper_right), torch.maximum(lower_left, lower_right)
        out = torch.maximum(upper, lower)
        if ctx.needs_input_grad[0]:
            lower_wins = lower > upper
            right_wins = (lower_wins & (lower_right > lower_left)) | (~lower_wins & (upper_right > upper_left))
            index = right_wins.long().add_(lower_wins.long(), alpha=w).add_(window_origin(h, w))
            ctx.save_for_backward(x, index)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, index = ctx.saved_tensors
        return torch.ops.aten.max_pool2d_with_indices_backward(grad_out, x, [2, 2], [2, 2], [0, 0], [1, 1], False,
                                                                index)


def max_pool_2x2(x):
    """F.max_pool2d(x, 2), bit for bit but for signed zeros and NaNs, faster on CPU (see above)."""
    if x.dim() != 4 or x.device.type != "cpu" or x.shape[2] % 2 or x.shape[3] % 2 or not x.is_contiguous():
        return nn.functional.max_pool2d(x, 2)
    return _MaxPool2x2.apply(x)


class MaxPool2x2(nn.Module):
    """nn.MaxPool2d(2) (kernel 2, stride 2), same numbers, computed by max_pool_2x2."""

    def forward(self, x):
        return pooling(x)


pooling = max_pool_2x2       # what MaxPool2x2 runs; plain_pooling() swaps in PyTorch's own


class ReLUMaxPool2x2(nn.Module):
    """nn.ReLU() then nn.MaxPool2d(2), same outputs and gradients; on CPUs one pass of C
    (kernels.relu_max_pool_2x2: 3-4x faster than the relu and MaxPool2x2 above, forward and
    backward), elsewhere and within plain_pooling() torch.relu then `pooling`."""

    def forward(self, x):
        out = relu_max_pool_2x2(x) if pooling is max_pool_2x2 else None
        return pooling(torch.relu(x)) if out is None else out


@contextlib.contextmanager
def plain_pooling():
    """Within it, every MaxPool2x2 runs F.max_pool2d (same numbers): for benchmarks of code as
    published, which pools with nn.MaxPool2d."""
    global pooling
    saved, pooling = pooling, lambda x: nn.functional.max_pool2d(x, 2)
    try:
        yield
    finally:
        pooling = saved


class SimpleCNNBase(nn.Module):
    """conv(c->6,5) ReLU pool2, conv(6->16,5) ReLU pool2, flatten, fc(d->120) ReLU, fc(120->84) ReLU."""

    def __init__(self, in_channels, flat_dim):
        super().__init__()
        self.conv1 = FastConv2d(in_channels, 6, 5)   # nn.Conv2d: the same numbers, faster on CPUs
        self.conv2 = FastConv2d(6, 16, 5)     # its backward too (kernels.py)
        self.relu_pool = ReLUMaxPool2x2()
        self.fc1 = nn.Linear(flat_dim, 120)
        self.fc2 = nn.Linear(120, 84)

    def forward(self, x):
        x = self.relu_pool(self.conv1(x))
        x = self.relu_pool(self.conv2(x))
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


class BaseHeadSplit(nn.Module):
    """HtFLlib's BaseHeadSplit: logits = head(base(x)), base(x) in R^D, head = Linear(D -> C).
    State-dict names: base.* and head.weight / head.bias (as FedAvgCNN)."""
    head_name = "head"

    def __init__(self, base, feature_dim, num_classes):
        super().__init__()
        self.num_classes = num_classes
        self.feature_dim = feature_dim
        self.base = base
        self.head = nn.Linear(feature_dim, num_classes)

    @property
    def classifier(self):
        return self.head

    def features(self, x):
        return self.base(x)

    def forward(self, x):
        return self.head(self.base(x))


class FedAvgCNN(BaseHeadSplit):
    """PFLlib's FedAvgCNN as BaseHeadSplit holds it: base = conv(c->32,5) ReLU pool2,
    conv(32->64,5) ReLU pool2, flatten, fc1(flat->512) ReLU; head = Linear(512 -> classes)."""

    def __init__(self, in_channels, flat_dim, num_classes, dim=512):
        base = nn.Sequential()
        base.add_module("conv1", nn.Sequential(FastConv2d(in_channels, 32, 5), ReLUMaxPool2x2()))
        base.add_module("conv2", nn.Sequential(nn.Conv2d(32, 64, 5), ReLUMaxPool2x2()))
        base.add_module("flatten", nn.Flatten())
        base.add_module("fc1", nn.Sequential(nn.Linear(flat_dim, dim), nn.ReLU()))
        super().__init__(base, dim, num_classes)


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


def client_architectures(spec, default, n_parties, assignment="modulo"):
    """--client_models: a group name or A,B,... -> the architecture of every client.
    --client_assignment modulo: client k gets entry k mod M (HtFLlib); blocks: the clients in M
    consecutive blocks, client k gets entry floor(k M / N) (InCo's groups of N/M clients)."""
    if not spec:
        return [default] * n_parties
    names = MODEL_GROUPS.get(spec) or [name.strip() for name in spec.split(",") if name.strip()]
    if not names:
        raise UsageError(f"--client_models '{spec}' names no model; give A,B,... or a group name")
    if assignment == "blocks":
        return [names[k * len(names) // n_parties] for k in range(n_parties)]
    return [names[k % len(names)] for k in range(n_parties)]


def resolve_models(args):
    """Default --model for the dataset; check --model and --client_models exist and fit the data."""
    shape = DATASET_SHAPES[args.dataset]
    if args.model is None:
        args.model = next(name for name, (_, s) in MODELS.items() if s == shape)
    names = [args.model] + client_architectures(args.client_models, args.model, args.n_parties, args.client_assignment)
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


# ============================================================================ heterogeneous sets
# Model-heterogeneous FL (algorithms/heterogeneous/): client k gets names[k mod M] of a group;
# every member has a `base` ending at the same feature size D and a head Linear(D -> C) named
# `head`, so features, prototypes and heads are interchangeable across members.

class HtFLCNNBase(nn.Module):
    """HtFLlib's `CNN(num_cov, hidden_dims, in_features=1)` without its classifier: `conv` =
    conv(c->32,5) ReLU maxpool2 [, conv(32->64,5) ReLU maxpool2 when num_cov = 2]; `fc1` =
    Flatten, then Linear/ReLU through hidden_dims + [D]. Names base.conv.<i>.0.*, base.fc1.<j>.*
    as in HtFLlib (its `fc`, replaced by BaseHeadSplit with AdaptiveAvgPool1d(D), is the identity
    on D-d features and holds no parameters, so it is left out)."""

    def __init__(self, num_cov, hidden_dims, in_channels=1, image_size=28, feature_dim=512):
        super().__init__()
        channels, side, blocks = in_channels, image_size, []
        for out_channels in (32, 64)[:num_cov]:
            conv = nn.Conv2d if blocks else FastConv2d       # the first: faster on CPUs
            blocks.append(nn.Sequential(conv(channels, out_channels, 5), ReLUMaxPool2x2()))
            channels, side = out_channels, (side - 4) // 2
        self.conv = nn.Sequential(*blocks)
        layers, width = [nn.Flatten()], channels * side * side
        for dim in list(hidden_dims) + [feature_dim]:
            layers += [nn.Linear(width, dim), nn.ReLU()]
            width = dim
        self.fc1 = nn.Sequential(*layers)

    def forward(self, x):
        return self.fc1(self.conv(x))


def htfl_cnn(num_cov, hidden_dims, num_classes, feature_dim=512):
    return BaseHeadSplit(HtFLCNNBase(num_cov, hidden_dims, feature_dim=feature_dim), feature_dim, num_classes)


def light_base(kind, feature_dim=84):
    """A SimpleCNN-sized extractor for 1x28x28 ending at `feature_dim` (ReLU features). Its layers
    have names no other light4 member uses (light-lenet's are SimpleCNN's: conv1, conv2, fc1, fc2),
    so same-named entries across the group are the head alone."""
    relu = nn.ReLU
    layers = {
        "lenet": [("conv1", FastConv2d(1, 6, 5)), ("relu1", relu()), ("pool1", MaxPool2x2()),
                  ("conv2", nn.Conv2d(6, 16, 5)), ("relu2", relu()), ("pool2", MaxPool2x2()), ("flatten", nn.Flatten()),
                  ("fc1", nn.Linear(256, 120)), ("relu3", relu()), ("fc2", nn.Linear(120, feature_dim))],
        "mlp": [("flatten", nn.Flatten()), ("mlp1", nn.Linear(784, 56)), ("relu1", relu()),
                ("mlp2", nn.Linear(56, feature_dim))],
        "conv1": [("wide_conv", FastConv2d(1, 10, 5)), ("relu1", relu()), ("pool1", nn.MaxPool2d(4)),
                  ("flatten", nn.Flatten()), ("wide_fc", nn.Linear(360, feature_dim))],
        "conv3": [("small_conv1", nn.Conv2d(1, 8, 3, padding=1)), ("relu1", relu()), ("pool1", MaxPool2x2()),
                  ("small_conv2", nn.Conv2d(8, 16, 3, padding=1)), ("relu2", relu()), ("pool2", MaxPool2x2()),
                  ("small_conv3", nn.Conv2d(16, 16, 3, padding=1)), ("relu3", relu()), ("pool3", MaxPool2x2()),
                  ("flatten", nn.Flatten()), ("small_fc", nn.Linear(144, feature_dim))],
    }[kind]
    base = nn.Sequential()
    for name, layer in layers + [("relu_out", relu())]:
        base.add_module(name, layer)
    return base


# HtFLlib's HCNNs8 (FedTGP main.py), in its order: (num_cov, hidden_dims) of client k mod 8
HCNNS8 = {"hcnn-c1": (1, []), "hcnn-c2": (2, []), "hcnn-c1-512": (1, [512]), "hcnn-c2-512": (2, [512]),
          "hcnn-c1-1024": (1, [1024]), "hcnn-c2-1024": (2, [1024]),
          "hcnn-c1-1024-512": (1, [1024, 512]), "hcnn-c2-1024-512": (2, [1024, 512])}
for _name, (_num_cov, _hidden) in HCNNS8.items():
    register_model(_name, lambda num_classes, c=_num_cov, h=_hidden: htfl_cnn(c, h, num_classes), (1, 28, 28))
LIGHT4 = ("light-lenet", "light-mlp", "light-conv1", "light-conv3")
for _name in LIGHT4:
    register_model(_name, lambda num_classes, kind=_name[len("light-"):]: BaseHeadSplit(light_base(kind), 84,
                                                                                         num_classes), (1, 28, 28))
MODEL_GROUPS["hcnns8"] = list(HCNNS8)
MODEL_GROUPS["light4"] = list(LIGHT4)


# ============================================================================ InCo's nested depth families
# InCo aggregation (Chan et al., ICLR 2024; algorithms/inco/; spec datafree-hetero-privacy.md section 2):
# clients train sub-models of different depths of one server model. Every member of a family is a
# name-prefix subset of the deepest one (a client of fewer blocks has the first blocks of each stage,
# under the same names and shapes), so the server averages each entry over the clients that own it and
# a group's model is the server model's entries it has. Each stage repeats same-shaped 3x3 convolutions
# (`<stage>.<J>.conv1/conv2`), the pairs InCo mixes. Client k of N gets member floor(k*5/N)
# (--client_assignment blocks, InCo's five consecutive groups); --model is the deepest member.
#
#     inco5 (spec section 2, derived there for 28x28 grayscale; no BatchNorm, like SimpleCNN):
#         stem conv(1->32, 3x3, pad 1) ReLU, max-pool 2 (14x14); stage1: blocks of conv(32->32) ReLU
#         conv(32->32) + input, ReLU; max-pool 2 (7x7); stage2: block 0 conv(32->64) ReLU conv(64->64)
#         + downsample(1x1 conv 32->64 of the input), ReLU, blocks J >= 1 conv(64->64) ReLU conv(64->64)
#         + input, ReLU; global average pool; fc(64 -> classes). Names stem.*, stage1.J.conv1.*,
#         stage2.0.downsample.*, fc.* (head_name "fc"). (blocks in stage1, stage2) and parameters:
#           inco-cnn-1-1  (1, 1)   77,002        inco-cnn-2-3  (2, 3)  243,210
#           inco-cnn-1-2  (1, 2)  150,858        inco-cnn-3-3  (3, 3)  261,706  (the server model)
#           inco-cnn-2-2  (2, 2)  169,354
#     inco-resnets (the reference's stage splitting, InCo resnet_hetavg_new.py): torchvision's ResNet with
#         BasicBlocks (widths 64/128/256/512, 7x7 stride-2 stem without bias, BN, 3x3 stride-2 max pool,
#         torchvision's initialisation) and a 1-channel stem; names as torchvision's (conv1, bn1,
#         layerS.J.conv1/bn1/conv2/bn2/downsample.0/1, fc). Blocks per stage and parameters (10 classes):
#           resnet10-stage  [1,1,1,1]   4,904,650     resnet22-stage  [2,2,3,3]  17,076,682
#           resnet14-stage  [1,1,2,2]  10,805,962     resnet26-stage  [3,3,3,3]  17,446,090  (server)
#           resnet18-stage  [2,2,2,2]  11,175,370
#         (the same tensors, names and function as torchvision's ResNet with conv1 made 1-channel).
#         The reference resizes Fashion-MNIST to 32x32 (ToTensor, Resize(32), no normalisation); here the
#         28x28 images go in as they are (feature maps 14, 7, 7, 4, 2, 1 instead of 16, 8, 8, 4, 2, 1; the
#         same parameters) and are normalised as for every model of the suite. BasicBlock is written out
#         (ResidualBlock) rather than imported: importing torchvision.models costs ~3.6 s a process.

class ResidualBlock(nn.Module):
    """out = ReLU(conv2(ReLU(conv1(x))) + skip(x)), skip = x, or `downsample`(x) when the stride or the
    channels change. batch_norm=True: torchvision's BasicBlock (bias-free convs, bn1 after conv1, bn2
    after conv2, downsample = Sequential(1x1 conv, BN)); False: convs with bias, no BN, downsample = one
    1x1 conv (inco5)."""

    def __init__(self, in_channels, channels, stride=1, batch_norm=False):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, 1, bias=not batch_norm)
        self.bn1 = nn.BatchNorm2d(channels) if batch_norm else nn.Identity()
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=not batch_norm)
        self.bn2 = nn.BatchNorm2d(channels) if batch_norm else nn.Identity()
        self.downsample = None
        if stride != 1 or in_channels != channels:
            shortcut = nn.Conv2d(in_channels, channels, 1, stride, bias=not batch_norm)
            self.downsample = nn.Sequential(shortcut, nn.BatchNorm2d(channels)) if batch_norm else shortcut

    def forward(self, x):
        out = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return torch.relu(out + (x if self.downsample is None else self.downsample(x)))


class NestedDepthCNN(nn.Module):
    """inco5's member with `blocks` = (blocks in stage1, blocks in stage2); features(x) = the 64-d
    global average of stage2's output, logits = fc(features)."""
    head_name = "fc"

    def __init__(self, blocks, num_classes, in_channels=1):
        super().__init__()
        self.stem = nn.Conv2d(in_channels, 32, 3, padding=1)
        self.stage1 = nn.Sequential(*[ResidualBlock(32, 32) for _ in range(blocks[0])])
        self.stage2 = nn.Sequential(*[ResidualBlock(32 if j == 0 else 64, 64) for j in range(blocks[1])])
        self.fc = nn.Linear(64, num_classes)

    @property
    def classifier(self):
        return self.fc

    def features(self, x):
        x = pooling(torch.relu(self.stem(x)))
        x = self.stage2(pooling(self.stage1(x)))
        return x.mean((2, 3))

    def forward(self, x):
        return self.fc(self.features(x))


class StageResNet(nn.Module):
    """torchvision's ResNet over BasicBlocks with `blocks` per stage (layer1..layer4, widths 64..512);
    features(x) = the 512-d global average of layer4's output, logits = fc(features)."""
    head_name = "fc"

    def __init__(self, blocks, num_classes, in_channels=1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        channels = 64
        for stage, (width, count) in enumerate(zip((64, 128, 256, 512), blocks), start=1):
            stride = 1 if stage == 1 else 2
            layer = [ResidualBlock(channels if j == 0 else width, width, stride if j == 0 else 1, batch_norm=True)
                     for j in range(count)]
            self.add_module(f"layer{stage}", nn.Sequential(*layer))
            channels = width
        self.fc = nn.Linear(512, num_classes)
        for module in self.modules():           # torchvision ResNet's initialisation
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.constant_(module.weight, 1)
                nn.init.constant_(module.bias, 0)

    @property
    def classifier(self):
        return self.fc

    def features(self, x):
        x = self.maxpool(torch.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return x.mean((2, 3))

    def forward(self, x):
        return self.fc(self.features(x))


INCO5 = {"inco-cnn-1-1": (1, 1), "inco-cnn-1-2": (1, 2), "inco-cnn-2-2": (2, 2), "inco-cnn-2-3": (2, 3),
         "inco-cnn-3-3": (3, 3)}
INCO_RESNETS = {"resnet10-stage": (1, 1, 1, 1), "resnet14-stage": (1, 1, 2, 2), "resnet18-stage": (2, 2, 2, 2),
                "resnet22-stage": (2, 2, 3, 3), "resnet26-stage": (3, 3, 3, 3)}
for _name, _blocks in INCO5.items():
    register_model(_name, lambda num_classes, b=_blocks: NestedDepthCNN(b, num_classes), (1, 28, 28))
for _name, _blocks in INCO_RESNETS.items():
    register_model(_name, lambda num_classes, b=_blocks: StageResNet(b, num_classes), (1, 28, 28))
MODEL_GROUPS["inco5"] = list(INCO5)
MODEL_GROUPS["inco-resnets"] = list(INCO_RESNETS)


# ============================================================================ HyperFL's target CNN
# HyperFL (Guo et al., AAAI 2025; hyperfl.py) generates a client's feature extractor with a
# hypernetwork. Its target model for Fashion-MNIST (Pengxin-Guo/HyperFL cnn/models/cnn.py,
# CNN_FMNIST), held as a BaseHeadSplit so the suite's algorithms split it where HyperFL does:
#   base = conv(1->16,5) leaky ReLU pool2, conv(16->32,5,pad 1) leaky ReLU pool2, flatten (800),
#          fc1 800->128 leaky ReLU                                  115,776 parameters
#   head = Linear(128 -> classes) (the reference's fc2)               1,290
#                                                            total 117,066
# Names base.conv1.*, base.conv2.*, base.fc1.*, head.*.

class HyperFLCNNBase(nn.Module):
    def __init__(self, in_channels=1, image_size=28, feature_dim=128):
        super().__init__()
        self.conv1 = FastConv2d(in_channels, 16, 5)
        self.conv2 = nn.Conv2d(16, 32, 5, padding=1)
        self.pool = MaxPool2x2()
        side = ((image_size - 4) // 2 - 2) // 2           # 28 -> 24 -> 12 -> 10 -> 5
        self.fc1 = nn.Linear(32 * side * side, feature_dim)

    def forward(self, x):
        x = self.pool(nn.functional.leaky_relu(self.conv1(x)))
        x = self.pool(nn.functional.leaky_relu(self.conv2(x)))
        return nn.functional.leaky_relu(self.fc1(x.flatten(1)))


register_model("hyperfl-cnn", lambda num_classes: BaseHeadSplit(HyperFLCNNBase(), 128, num_classes), (1, 28, 28))


# ============================================================================ SimpleCNN with batch norm
# FedF2DG's BN prior (spec datafree-hetero-privacy.md section 1, "BatchNorm", option (a)) needs
# BatchNorm2d layers whose running statistics stand for the clients' data. simplecnn-mnist-bn is
# simplecnn-mnist with BatchNorm2d after conv1 and conv2, before their ReLU:
#   conv(1->6,5) BN(6) ReLU pool2, conv(6->16,5) BN(16) ReLU pool2, fc 256->120 ReLU, fc 120->84 ReLU,
#   classifier.fc 84->C                               44,470 parameters (simplecnn-mnist's 44,426 + 44)
# Names as SimpleCNN's plus base.bn1.*, base.bn2.* (weight, bias, running_mean, running_var,
# num_batches_tracked); the running statistics are averaged like weights (engine weighted_average,
# num_batches_tracked rounded). Use it for every algorithm of a table that FedF2DG's BN prior is in.

class SimpleCNNBNBase(SimpleCNNBase):
    """SimpleCNNBase with BatchNorm2d after each convolution, before its ReLU."""

    def __init__(self, in_channels, flat_dim):
        super().__init__(in_channels, flat_dim)
        self.bn1 = nn.BatchNorm2d(6)
        self.bn2 = nn.BatchNorm2d(16)

    def forward(self, x):
        x = self.relu_pool(self.bn1(self.conv1(x)))
        x = self.relu_pool(self.bn2(self.conv2(x)))
        x = x.reshape(x.shape[0], -1)
        return torch.relu(self.fc2(torch.relu(self.fc1(x))))


class SimpleCNNBN(SimpleCNN):
    """SimpleCNN over SimpleCNNBNBase."""

    def __init__(self, in_channels, image_size, num_classes):
        nn.Module.__init__(self)
        side = ((image_size - 4) // 2 - 4) // 2
        self.input_shape = (in_channels, image_size, image_size)
        self.num_classes = num_classes
        self.base = SimpleCNNBNBase(in_channels, 16 * side * side)
        self.classifier = Classifier(num_classes)


register_model("simplecnn-mnist-bn", lambda num_classes: SimpleCNNBN(1, 28, num_classes), (1, 28, 28))
