"""Datasets held in memory as uint8 tensors, batch augmentation, and the client partitioners.

Data is found in this order (SPEC section 1): --datadir in torchvision's layouts (or flat IDX
files for Fashion-MNIST); for Fashion-MNIST the Debian package `dataset-fashion-mnist`
(/usr/share/datasets/fashion-mnist/); a torchvision download when the machine is online.

Partitions (SPEC section 2) use numpy's legacy global RNG, seeded by the caller, and give the
same client index lists as the NIID-Bench lineage for the same seed. `hyperfl` is HyperFL's
setting (600 images a client, 80 % from three classes; partition_hyperfl).

Run as a script to inspect a partition without training:
    python cvdataset.py --dataset fashionmnist --partition noniid --beta 0.1 --n_parties 10 --json
"""
import gzip
import json
import math
import os
import pickle
import random
import re
import sys
import zlib
from dataclasses import dataclass

import numpy as np
import torch

import kernels
from utils import UsageError

DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
# Dirichlet partition: draws tried before giving up on --min_require_size (see partition_dirichlet)
MAX_PARTITION_ATTEMPTS = 1000

NORMALISATION = {
    "fashionmnist": ((0.5,), (0.5,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    "cifar100": ((0.50708, 0.48655, 0.44092), (0.26733, 0.25644, 0.27615)),
}
NUM_CLASSES = {"fashionmnist": 10, "cifar10": 10, "cifar100": 100}


@dataclass
class Dataset:
    """A whole dataset in memory: images uint8 (N, C, H, W), labels int64 (N,)."""
    name: str
    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    num_classes: int
    mean: tuple
    std: tuple

    @property
    def image_shape(self):
        return tuple(self.train_images.shape[1:])


# ----------------------------------------------------------------------------- file formats

def _why(error):
    """An exception as a short one-line reason."""
    kind = type(error).__name__
    if kind == "error":                         # zlib.error, struct.error, ...
        kind = f"{type(error).__module__}.error"
    text = " ".join(str(error).split())
    return f"{kind}: {text}" if text else kind


def read_idx(path):
    """Read an IDX file (optionally gzipped): magic 0x00000801 labels, 0x00000803 images."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        f = opener(path, "rb")
    except OSError as e:
        raise UsageError(f"cannot read {path}: {e.strerror or _why(e)}")
    try:
        with f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as e:       # gzip: truncated stream, bad CRC or header
        raise UsageError(f"{path} is corrupt or truncated ({_why(e)}); re-download it")
    if len(raw) < 4:
        raise UsageError(f"{path} is corrupt or truncated ({len(raw)} bytes, no IDX header); re-download it")
    if raw[0:2] != b"\x00\x00" or raw[2] != 0x08 or raw[3] not in (1, 3):
        raise UsageError(f"{path} is corrupt: not an IDX file (bad magic number); re-download it")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise UsageError(f"{path} is truncated or corrupt ({len(raw)} bytes, shorter than its "
                         f"{header}-byte header); re-download it")
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    expected = int(np.prod(dims))
    if len(raw) - header != expected:
        raise UsageError(f"{path} is truncated or corrupt ({len(raw) - header} bytes of data, "
                         f"{expected} expected); re-download it")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


FASHION_MNIST_STEMS = {"train_images": "train-images-idx3-ubyte", "train_labels": "train-labels-idx1-ubyte",
                       "test_images": "t10k-images-idx3-ubyte", "test_labels": "t10k-labels-idx1-ubyte"}


def find_fashion_mnist_files(folder):
    """The four IDX files in `folder`, gzipped or not, or None if any is missing."""
    found = {}
    for key, stem in FASHION_MNIST_STEMS.items():
        for name in (stem, stem + ".gz"):
            if os.path.isfile(os.path.join(folder, name)):
                found[key] = os.path.join(folder, name)
                break
        else:
            return None
    return found


def load_fashion_mnist_files(files):
    arrays = {k: read_idx(p) for k, p in files.items()}
    for key, array in arrays.items():
        wanted = 3 if key.endswith("images") else 1
        if array.ndim != wanted:
            raise UsageError(f"{files[key]} is corrupt: it holds a {array.ndim}-d array, not the "
                             f"{wanted}-d array of {key.replace('_', ' ')}; re-download it")
    for split in ("train", "test"):
        if arrays[f"{split}_images"].shape[0] != arrays[f"{split}_labels"].shape[0]:
            raise UsageError(f"{files[split + '_images']}: image and label counts differ; re-download the data")
        labels = arrays[f"{split}_labels"]
        if labels.size and labels.max() >= NUM_CLASSES["fashionmnist"]:
            raise UsageError(f"{files[split + '_labels']} is corrupt: label {labels.max()} is outside 0..9; "
                             "re-download it")
    return {k: torch.from_numpy(v.copy()) for k, v in arrays.items()}


def unpickle(path):
    """One CIFAR batch file (a pickled dict); a file that cannot be unpickled is corrupt."""
    try:
        f = open(path, "rb")
    except OSError as e:
        raise UsageError(f"cannot read CIFAR batch {path}: {e.strerror or _why(e)}")
    with f:
        try:
            batch = pickle.load(f, encoding="bytes")
        except Exception as e:      # a damaged pickle can fail in any way (EOFError, TypeError, ...)
            raise UsageError(f"CIFAR batch {path} is corrupt or truncated ({_why(e)}); re-download the data")
    if not isinstance(batch, dict):
        raise UsageError(f"CIFAR batch {path} is corrupt (it holds a {type(batch).__name__}, not a dict); "
                         "re-download the data")
    return batch


def cifar_arrays(paths, label_key, num_classes):
    """Read and concatenate torchvision-format CIFAR pickles: b'data' (N, 3072) uint8, labels list."""
    images, labels = [], []
    for path in paths:
        batch = unpickle(path)
        data = batch.get(b"data", batch.get("data"))
        label = batch.get(label_key, batch.get(label_key.decode()))
        if data is None or label is None:
            raise UsageError(f"CIFAR batch {path} is corrupt: it lacks 'data' or '{label_key.decode()}'; "
                             "re-download the data")
        try:
            data = np.asarray(data, dtype=np.uint8)
            label = np.asarray(label, dtype=np.int64)
        except (TypeError, ValueError, OverflowError) as e:
            raise UsageError(f"CIFAR batch {path} is corrupt ({_why(e)}); re-download the data")
        if data.size % 3072 or label.ndim != 1 or data.size // 3072 != label.size:
            raise UsageError(f"CIFAR batch {path} is corrupt: {data.size} bytes of image data (3072 an "
                             f"image) do not match its {label.size} labels; re-download the data")
        if label.size and (label.min() < 0 or label.max() >= num_classes):
            raise UsageError(f"CIFAR batch {path} is corrupt: labels outside 0..{num_classes - 1}; "
                             "re-download the data")
        images.append(data.reshape(-1, 3, 32, 32))
        labels.append(label)
    return torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels))


def cifar_files(name):
    """(train files, test files, label key) of torchvision's CIFAR folder."""
    if name == "cifar10":
        return [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], b"labels"
    return ["train"], ["test"], b"fine_labels"


def load_cifar_folder(name, folder):
    train, test, key = cifar_files(name)
    train_images, train_labels = cifar_arrays([os.path.join(folder, f) for f in train], key, NUM_CLASSES[name])
    test_images, test_labels = cifar_arrays([os.path.join(folder, f) for f in test], key, NUM_CLASSES[name])
    return dict(train_images=train_images, train_labels=train_labels,
                test_images=test_images, test_labels=test_labels)


# ----------------------------------------------------------------------------- finding data

def candidate_folders(name, datadir):
    """Where a dataset may lie, in the order of SPEC section 1."""
    if name == "fashionmnist":
        return [os.path.join(datadir, "FashionMNIST", "raw"), datadir, DEBIAN_FASHION_MNIST]
    sub = "cifar-10-batches-py" if name == "cifar10" else "cifar-100-python"
    return [os.path.join(datadir, sub)]


def data_files(name):
    """The names of the files a folder must hold for `name` (IDX files may also be gzipped)."""
    if name == "fashionmnist":
        return list(FASHION_MNIST_STEMS.values())
    train, test, _ = cifar_files(name)
    return train + test


def missing_files(name, folder):
    """The data files `folder` lacks."""
    suffixes = ("", ".gz") if name == "fashionmnist" else ("",)
    return [f for f in data_files(name) if not any(os.path.isfile(os.path.join(folder, f + s)) for s in suffixes)]


def try_download(name, datadir):
    """torchvision's download, for machines that are online; returns arrays or None."""
    try:
        import torchvision
        cls = {"fashionmnist": torchvision.datasets.FashionMNIST,
               "cifar10": torchvision.datasets.CIFAR10, "cifar100": torchvision.datasets.CIFAR100}[name]
        os.makedirs(datadir, exist_ok=True)
        cls(datadir, train=True, download=True)
        cls(datadir, train=False, download=True)
    except Exception:
        return None
    return find_arrays(name, datadir, allow_download=False)


def find_arrays(name, datadir, allow_download=True):
    """The arrays from the first folder holding every file; a file there that is corrupt is an
    error naming it (no fall-through to the next place)."""
    for folder in candidate_folders(name, datadir):
        if name == "fashionmnist":
            files = find_fashion_mnist_files(folder)
            if files:
                return load_fashion_mnist_files(files)
        elif not missing_files(name, folder):
            return load_cifar_folder(name, folder)
    if allow_download and os.environ.get("FEDSUITE_NO_DOWNLOAD") != "1":
        arrays = try_download(name, datadir)
        if arrays:
            return arrays
    places = []
    for folder in candidate_folders(name, datadir):
        lacking = missing_files(name, folder) if os.path.isdir(folder) else []
        partial = 0 < len(lacking) < len(data_files(name))
        places.append(f"{folder} (lacks {', '.join(lacking)})" if partial else folder)
    hint = ("install it with 'sudo apt-get install dataset-fashion-mnist' or put the IDX files in --datadir"
            if name == "fashionmnist" else
            f"put torchvision's {'cifar-10-batches-py' if name == 'cifar10' else 'cifar-100-python'} folder in --datadir")
    raise UsageError(f"{name} not found (looked in {', '.join(places)}; download failed or offline): {hint}")


def load_dataset(name, datadir="./data/"):
    """Load `name` into memory as uint8 tensors (see the module docstring for the search order)."""
    if name not in NUM_CLASSES:
        raise UsageError(f"unknown dataset '{name}'; choose one of {', '.join(NUM_CLASSES)}")
    arrays = find_arrays(name, datadir)
    images = {k: v if v.dim() == 4 else v.unsqueeze(1) for k, v in arrays.items() if "images" in k}
    labels = {k: v.long() for k, v in arrays.items() if "labels" in k}
    mean, std = NORMALISATION[name]
    data = Dataset(name, images["train_images"], labels["train_labels"], images["test_images"],
                   labels["test_labels"], NUM_CLASSES[name], mean, std)
    for split, split_labels in (("training", data.train_labels), ("test", data.test_labels)):
        bad = int(((split_labels < 0) | (split_labels >= data.num_classes)).sum())
        if bad:
            raise UsageError(f"{name}: {bad} {split} labels are outside 0..{data.num_classes - 1}; "
                             "the data is corrupt")
    return data


# ----------------------------------------------------------------------------- augmentation

def normalise(images_uint8, mean, std):
    """x = (pixel / 255 - mean) / std, per channel."""
    x = images_uint8.float().div_(255.0)
    mean_t = torch.tensor(mean, device=x.device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, device=x.device).view(1, -1, 1, 1)
    return x.sub_(mean_t).div_(std_t)


_normalisation_tables = {}


def normalisation_table(mean, std, channels):
    """normalise() of every pixel value 0..255, per channel: [channels, 256], computed by normalise
    itself, so that looking a pixel up gives the same number."""
    key = (tuple(mean), tuple(std), channels)
    if key not in _normalisation_tables:
        values = torch.arange(256, dtype=torch.uint8).view(1, 1, 1, 256).expand(1, channels, 1, 256).contiguous()
        _normalisation_tables[key] = normalise(values, mean, std).view(channels, 256).contiguous()
    return _normalisation_tables[key]


def augment_batch(images_uint8, mean, std, generator, padding=4, index=None):
    """Random crop with `padding` zero pixels then random horizontal flip, then normalise, of
    images_uint8[index] (default: all of them): torchvision's RandomCrop(size, padding=4) +
    RandomHorizontalFlip + Normalize, done on a whole batch at once. Randomness comes from the CPU
    `generator` only. On the CPU one pass of C does it (kernels.crop_flip_normalise, the same
    numbers); elsewhere PyTorch."""
    b = len(images_uint8) if index is None else len(index)
    c, h, w = images_uint8.shape[1:]
    device = images_uint8.device
    offsets = torch.randint(0, 2 * padding + 1, (2, b), generator=generator).to(device)
    flips = (torch.rand(b, generator=generator) < 0.5).to(device)
    if device.type == "cpu":
        chosen = torch.arange(b) if index is None else index
        out = kernels.crop_flip_normalise(images_uint8, chosen, offsets, flips, normalisation_table(mean, std, c),
                                          padding)
        if out is not None:
            return out
    if index is not None:
        images_uint8 = images_uint8[index]
    padded = torch.nn.functional.pad(images_uint8, (padding,) * 4)
    padded_width = w + 2 * padding
    rows = offsets[0].view(b, 1) + torch.arange(h, device=device).view(1, h)
    cols = offsets[1].view(b, 1) + torch.arange(w, device=device).view(1, w)
    cols = torch.where(flips.view(b, 1), cols.flip(1), cols)
    # one gather over the flattened padded image: pixel (i, j) of the crop is padded[rows_i, cols_j]
    source = (rows.view(b, h, 1) * padded_width + cols.view(b, 1, w)).view(b, 1, h * w)
    cropped = padded.reshape(b, c, -1).gather(2, source.expand(b, c, h * w)).view(b, c, h, w)
    return normalise(cropped, mean, std)


class ShuffledBatches:
    """Endless shuffled mini-batches of in-memory tensors (all of the same length), reshuffled
    with `generator` whenever exhausted; the last batch of a pass may be smaller (a
    DataLoader with drop_last=False), or with drop_last is skipped (unless it is the only one)."""

    def __init__(self, tensors, batch_size, generator, drop_last=False):
        self.tensors, self.batch_size, self.generator = tensors, batch_size, generator
        self.drop_last = drop_last
        self.order, self.position = None, 0

    def next_index(self):
        """The positions of the next batch's samples."""
        n = len(self.tensors[0])
        end_of_pass = n if not self.drop_last or n < self.batch_size else n - self.batch_size + 1
        if self.order is None or self.position >= end_of_pass:
            self.order = torch.randperm(n, generator=self.generator).to(self.tensors[0].device)
            self.position = 0
        index = self.order[self.position: self.position + self.batch_size]
        self.position += self.batch_size
        return index

    def next(self):
        index = self.next_index()
        return tuple(t[index] for t in self.tensors)


class BatchStream(ShuffledBatches):
    """One client's shuffled batches of uint8 images, augmented (or only normalised) as they
    are drawn, with their labels."""

    def __init__(self, images, labels, batch_size, generator, mean, std, augment=True, drop_last=False):
        super().__init__((images, labels), batch_size, generator, drop_last)
        self.mean, self.std, self.augment = mean, std, augment

    def next(self):
        images, labels = self.tensors
        index = self.next_index()
        if self.augment:
            return augment_batch(images, self.mean, self.std, self.generator, index=index), labels[index]
        return normalise(images[index], self.mean, self.std), labels[index]


# ----------------------------------------------------------------------------- partitions

def partition_iid(n_samples, n_parties):
    """np.random.permutation(N), then np.array_split into n parts."""
    return [part.tolist() for part in np.array_split(np.random.permutation(n_samples), n_parties)]


def _piece_sizes(length, cuts):
    """len() of each piece np.split(array of `length`, cuts) gives, without splitting."""
    if cuts.size == 0 or (cuts[0] >= 0 and cuts[-1] <= length and np.all(cuts[1:] >= cuts[:-1])):
        return np.diff(np.concatenate(([0], cuts, [length])))
    return np.array([len(piece) for piece in np.split(np.arange(length), cuts)])   # NaN draws


def partition_dirichlet(labels, n_parties, beta, num_classes, min_require_size=10, shuffle_clients=True):
    """Dirichlet label skew (NIID-Bench `noniid-labeldir`); see SPEC section 2.

    The whole draw is repeated until every client holds at least `min_require_size` samples, at
    most MAX_PARTITION_ATTEMPTS times (then UsageError). Each attempt makes the same RNG draws,
    in the same order, as the unbounded NIID-Bench loop; only the client sizes are tracked while
    drawing, and the index lists are built once, from the accepted attempt. PFLlib's generator
    (dataset/utils/dataset_utils.py) is the same loop without the final per-client shuffle
    (shuffle_clients=False: its lists stay class-ordered)."""
    if not 0 < beta < math.inf:
        raise UsageError(f"--beta must be a finite number > 0 (got {beta})")
    n = labels.shape[0]
    class_indices = [np.where(labels == k)[0] for k in range(num_classes)]
    best = 0
    with np.errstate(divide="ignore", invalid="ignore"):      # NaN proportions: see _piece_sizes
        for _ in range(MAX_PARTITION_ATTEMPTS):
            sizes = np.zeros(n_parties, dtype=np.int64)
            draws = []
            for k in range(num_classes):
                idx_k = class_indices[k].copy()
                np.random.shuffle(idx_k)
                proportions = np.random.dirichlet(np.repeat(beta, n_parties))
                proportions = proportions * (sizes < n / n_parties)
                proportions = proportions / proportions.sum()
                cuts = (np.cumsum(proportions) * len(idx_k)).astype(int)[:-1]
                sizes += _piece_sizes(len(idx_k), cuts)
                draws.append((idx_k, cuts))
            min_size = int(sizes.min())
            if min_size >= min_require_size:
                break
            best = max(best, min_size)
        else:
            raise UsageError(
                f"--partition noniid: in {MAX_PARTITION_ATTEMPTS} Dirichlet draws (--beta {beta}, --n_parties "
                f"{n_parties}) the smallest client never reached --min_require_size {min_require_size} samples "
                f"(at best {best}); use a larger --beta, fewer --n_parties or a lower --min_require_size")
    idx_batch = [[] for _ in range(n_parties)]
    for idx_k, cuts in draws:
        idx_batch = [idx_j + idx.tolist() for idx_j, idx in zip(idx_batch, np.split(idx_k, cuts))]
    if shuffle_clients:
        for j in range(n_parties):
            np.random.shuffle(idx_batch[j])
    return idx_batch


def partition_skew(labels, n_parties, num_classes, classes_per_client):
    """#C=K label skew: client i holds K classes, an equal slice of each (SPEC section 2)."""
    k = classes_per_client
    if k < 1 or num_classes % k != 0:
        raise UsageError(f"noniid-skew-{k}: {num_classes} classes do not split into groups of {k}; "
                         f"pick K dividing {num_classes}")
    groups = num_classes // k
    if n_parties % groups != 0:
        raise UsageError(f"noniid-skew-{k}: --n_parties {n_parties} is not a multiple of "
                         f"{groups} (classes / K); use a multiple of {groups}")
    clients_per_group = n_parties // groups
    class_indices = [np.where(labels == c)[0] for c in range(num_classes)]
    parts = []
    for i in range(n_parties):
        g = i // groups
        indices = []
        for j in range(k):
            cls = class_indices[k * (i % groups) + j]
            s = len(cls) // clients_per_group
            indices.extend(cls[s * g: s * (g + 1)].tolist())
        random.shuffle(indices)
        parts.append(indices)
    return parts


HYPERFL_LOCAL_SIZE = 600        # images a client, training and test alike (HyperFL's --local_size)
HYPERFL_SHARED_PERCENT = 20     # % of them spread evenly over all classes (its --noniid_s)


def hyperfl_class_groups(num_classes):
    """The three classes a client of HyperFL's partition draws most of its images from, by
    client id mod (classes / 2): [0,1,2], [2,3,4], [4,5,6], [6,7,8], [8,9,0] for 10 classes."""
    return [[(2 * group + i) % num_classes for i in range(3)] for group in range(num_classes // 2)]


def partition_hyperfl(labels, n_parties, num_classes, local_size=HYPERFL_LOCAL_SIZE,
                      shared_percent=HYPERFL_SHARED_PERCENT):
    """HyperFL's `mnist_noniid_s` (Pengxin-Guo/HyperFL cnn/data_loader.py; spec
    datafree-hetero-privacy.md section 3): client k gets `local_size` images, s = local_size *
    shared_percent / 100 of them evenly over all classes (s // C a class, the last class the
    rest) and the other local_size - s evenly over the classes hyperfl_class_groups(C)[k mod C/2]
    (a third each, the last the rest). Each class's images are handed out in one fixed order,
    client after client; a class that runs out starts again from its first image (so clients
    share images when they ask for more than a class holds: the test split of 20 clients).

    The order within a class is one np.random.permutation a class (the numpy global RNG, seeded
    by the caller from --init_seed like every partition). The reference draws nothing: it seeds
    numpy with 2022 and takes each class in the order of numpy's (unstable, implementation-
    defined) argsort of the labels. Given that order instead of the permutation, this returns the
    reference's index sets (checked on Fashion-MNIST, 20 clients, training and test sets)."""
    if num_classes % 2 or num_classes < 4:
        raise UsageError(f"--partition hyperfl draws each client's skew from overlapping class triples "
                         f"[0,1,2], [2,3,4], ...: it needs an even number of classes, at least 4 (got {num_classes})")
    class_order = [np.random.permutation(np.where(labels == c)[0]) for c in range(num_classes)]
    handed_out = [0] * num_classes

    def take(c, count):
        if handed_out[c] + count > len(class_order[c]):
            handed_out[c] = 0
        start = handed_out[c]
        handed_out[c] += count
        return class_order[c][start:start + count].tolist()

    def even_split(total, parts):
        return [total // parts] * (parts - 1) + [total - (parts - 1) * (total // parts)]

    shared = local_size * shared_percent // 100
    groups = hyperfl_class_groups(num_classes)
    parts = []
    for k in range(n_parties):
        indices = []
        for c, count in enumerate(even_split(shared, num_classes)):
            indices += take(c, count)
        group = groups[k % len(groups)]
        for c, count in zip(group, even_split(local_size - shared, len(group))):
            indices += take(c, count)
        parts.append(indices)
    return parts


def partition_data(labels, partition, n_parties, beta, num_classes, skew_class=2, min_require_size=10):
    """Client index lists for `partition`; labels is a numpy int array. Uses the global RNGs."""
    labels = np.asarray(labels)
    if n_parties > len(labels):
        raise UsageError(f"--n_parties {n_parties} exceeds the {len(labels)} training samples")
    if partition in ("iid", "homo"):
        parts = partition_iid(len(labels), n_parties)
    elif partition == "noniid":
        if n_parties * min_require_size > len(labels):
            raise UsageError(f"--n_parties {n_parties} x --min_require_size {min_require_size} exceeds the "
                             f"{len(labels)} training samples; use fewer clients or a lower --min_require_size")
        parts = partition_dirichlet(labels, n_parties, beta, num_classes, min_require_size)
    elif re.fullmatch(r"noniid-skew(-\d+)?", partition):
        k = int(partition.rsplit("-", 1)[1]) if partition.count("-") == 2 else skew_class
        parts = partition_skew(labels, n_parties, num_classes, k)
    elif partition == "hyperfl":
        parts = partition_hyperfl(labels, n_parties, num_classes)
    else:
        raise UsageError(f"unknown --partition '{partition}'; choose iid, noniid, noniid-skew-K, pfllib or hyperfl")
    if min(len(p) for p in parts) == 0:
        raise UsageError(f"--partition {partition} leaves a client with no data; use fewer clients")
    return parts


def class_counts(labels, parts, num_classes):
    """Matrix [client][class] of sample counts."""
    labels = np.asarray(labels)
    return [np.bincount(labels[p], minlength=num_classes).astype(int).tolist() for p in parts]


def format_class_counts(counts):
    """The class-count matrix as a readable table, one row a client."""
    num_classes = len(counts[0])
    width = max(5, len(str(max(max(r) for r in counts))) + 1)
    head = "client " + "".join(f"{c:>{width}}" for c in range(num_classes)) + f"{'total':>{width + 2}}"
    rows = [f"{i:>6} " + "".join(f"{v:>{width}}" for v in row) + f"{sum(row):>{width + 2}}"
            for i, row in enumerate(counts)]
    return "\n".join([head] + rows)


def class_counts_svg(counts, title=""):
    """The class-count matrix as an SVG heatmap (client rows x class columns, darker = more
    samples, each cell labelled with its count): written into every run directory as
    partition.svg, readable in a browser or a README without plotting packages."""
    counts = [[int(v) for v in row] for row in counts]
    cell, left, top = 34, 64, 48
    largest = max(1, max(max(row) for row in counts))
    width, height = left + cell * len(counts[0]) + 10, top + cell * len(counts) + 10
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'font-family="sans-serif" font-size="10">',
             f'<text x="{left}" y="14" font-size="12">{title} (samples per client and class)</text>',
             f'<text x="{left}" y="{top - 18}">class</text>',
             f'<text x="4" y="{top - 4}">client</text>']
    for c in range(len(counts[0])):
        parts.append(f'<text x="{left + c * cell + cell // 2}" y="{top - 4}" text-anchor="middle">{c}</text>')
    for k, row in enumerate(counts):
        y = top + k * cell
        parts.append(f'<text x="{left - 6}" y="{y + cell // 2 + 4}" text-anchor="end">{k}</text>')
        for c, value in enumerate(row):
            shade = value / largest               # white (0) to dark blue (the largest count)
            rgb = tuple(round(255 - shade * (255 - channel)) for channel in (8, 48, 107))
            ink = "white" if shade > 0.5 else "black"
            parts.append(f'<rect x="{left + c * cell}" y="{y}" width="{cell}" height="{cell}" '
                         f'fill="rgb{rgb}" stroke="#ddd"/>')
            parts.append(f'<text x="{left + c * cell + cell // 2}" y="{y + cell // 2 + 4}" text-anchor="middle" '
                         f'fill="{ink}">{value}</text>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def main(argv=None):
    import argparse
    from utils import setup_seed
    p = argparse.ArgumentParser(description="Print a client partition (no training).")
    p.add_argument("--dataset", default="fashionmnist")
    p.add_argument("--datadir", default="./data/")
    p.add_argument("--partition", default="noniid")
    p.add_argument("--beta", type=float, default=0.5)
    p.add_argument("--skew_class", type=int, default=2)
    p.add_argument("--min_require_size", type=int, default=10,
                   help="--partition noniid: redraw until every client has at least this many samples")
    p.add_argument("--n_parties", type=int, default=10)
    p.add_argument("--init_seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print {client_sizes, class_counts} as JSON")
    args = p.parse_args(argv)
    try:
        if not 0 < args.beta < math.inf:
            raise UsageError(f"--beta must be a finite number > 0 (got {args.beta})")
        if args.n_parties < 1:
            raise UsageError(f"--n_parties must be at least 1 (got {args.n_parties})")
        if args.min_require_size < 0:
            raise UsageError(f"--min_require_size must be >= 0 (got {args.min_require_size})")
        setup_seed(args.init_seed)
        data = load_dataset(args.dataset, args.datadir)
        parts = partition_data(data.train_labels.numpy(), args.partition, args.n_parties,
                               args.beta, data.num_classes, args.skew_class, args.min_require_size)
    except UsageError as e:
        print("error: " + " ".join(str(e).split()), file=sys.stderr)
        return 2
    counts = class_counts(data.train_labels.numpy(), parts, data.num_classes)
    if args.json:
        print(json.dumps({"client_sizes": [len(p) for p in parts], "class_counts": counts}))
    else:
        print(format_class_counts(counts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
