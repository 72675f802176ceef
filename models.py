"""SimpleCNN (SPEC section 3): `base` gives the 84-d representation, `classifier.fc` the logits.

State-dict names (base.conv1, base.conv2, base.fc1, base.fc2, classifier.fc) match the
published code so checkpoints load across tools.
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


MODEL_INPUTS = {"simplecnn": (3, 32), "simplecnn-mnist": (1, 28)}


def build_model(name, num_classes, image_shape=None):
    """`simplecnn` (3x32x32) or `simplecnn-mnist` (1x28x28); a clear error if the data does not fit."""
    if name not in MODEL_INPUTS:
        raise UsageError(f"unknown model '{name}'; choose one of {', '.join(MODEL_INPUTS)}")
    channels, size = MODEL_INPUTS[name]
    if image_shape is not None and tuple(image_shape) != (channels, size, size):
        raise UsageError(f"model {name} takes {channels}x{size}x{size} inputs but the data is "
                         f"{'x'.join(map(str, image_shape))}")
    return SimpleCNN(channels, size, num_classes)


def count_parameters(model):
    return sum(p.numel() for p in model.parameters())
