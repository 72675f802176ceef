"""Data loading, augmentation, partitions and models (SPEC sections 1-3)."""
import gzip
import json
import os
import pickle
import random

import numpy as np
import pytest
import torch

import cvdataset
from conftest import algorithm_args, run_script
from models import build_model, count_parameters
from utils import UsageError, setup_seed

# ----------------------------------------------------------------------------- partitions


def reference_dirichlet(labels, n_parties, beta, num_classes):
    """SPEC section 2 step by step, written independently of cvdataset (arrays, not lists)."""
    n = len(labels)
    while True:
        clients = [np.array([], dtype=np.int64) for _ in range(n_parties)]
        for k in range(num_classes):
            idx_k = np.flatnonzero(labels == k)
            np.random.shuffle(idx_k)
            p = np.random.dirichlet(np.full(n_parties, beta))
            lengths_before = np.array([len(c) for c in clients])
            p = np.where(lengths_before < n / n_parties, p, 0.0)
            p = p / p.sum()
            cuts = (np.cumsum(p) * len(idx_k)).astype(int)[:-1]
            clients = [np.concatenate([c, piece]) for c, piece in zip(clients, np.split(idx_k, cuts))]
        if min(len(c) for c in clients) >= 10:
            break
    out = []
    for c in clients:
        as_list = c.tolist()
        np.random.shuffle(as_list)
        out.append(as_list)
    return out


@pytest.mark.parametrize("seed,beta,n_parties", [(0, 0.1, 10), (1, 0.5, 7), (3, 0.05, 20)])
def test_dirichlet_matches_the_spec_step_by_step(seed, beta, n_parties):
    labels = np.random.RandomState(123).randint(0, 10, size=3000)
    np.random.seed(seed)
    expected = reference_dirichlet(labels, n_parties, beta, 10)
    np.random.seed(seed)
    parts = cvdataset.partition_data(labels, "noniid", n_parties, beta, 10)
    assert parts == expected
    flat = sorted(i for p in parts for i in p)
    assert flat == list(range(len(labels)))          # every sample exactly once
    assert min(len(p) for p in parts) >= 10


def test_small_beta_skews_labels_more_than_large_beta():
    labels = np.repeat(np.arange(10), 500)
    def mean_classes_held(beta):
        np.random.seed(0)
        counts = cvdataset.class_counts(labels, cvdataset.partition_data(labels, "noniid", 10, beta, 10), 10)
        return np.mean([(np.array(row) > 25).sum() for row in counts])
    assert mean_classes_held(0.1) < 4 < 9 < mean_classes_held(100.0)


def test_iid_partition_is_a_permutation_split_evenly():
    np.random.seed(5)
    parts = cvdataset.partition_data(np.zeros(103, dtype=int), "homo", 10, 0.5, 10)
    np.random.seed(5)
    permutation = np.random.permutation(103)
    assert [len(p) for p in parts] == [11, 11, 11] + [10] * 7
    assert sum(parts, []) == permutation.tolist()


def test_skew_partition_gives_known_class_counts():
    labels = np.repeat(np.arange(10), 100)          # 100 samples per class, in class order
    random.seed(0)
    parts = cvdataset.partition_data(labels, "noniid-skew-2", 10, 0.5, 10)
    counts = cvdataset.class_counts(labels, parts, 10)
    # 5 groups of 2 classes, 2 clients a group, 50 samples of each class per client
    for client, row in enumerate(counts):
        group = client % 5
        expected = [50 if c in (2 * group, 2 * group + 1) else 0 for c in range(10)]
        assert row == expected, client
    # client 0 holds the first halves, client 5 the second halves, of classes 0 and 1
    assert sorted(parts[0]) == list(range(0, 50)) + list(range(100, 150))
    assert sorted(parts[5]) == list(range(50, 100)) + list(range(150, 200))


def test_skew_partition_rejects_counts_that_do_not_divide():
    labels = np.repeat(np.arange(10), 100)
    with pytest.raises(UsageError, match="multiple of 5"):
        cvdataset.partition_data(labels, "noniid-skew-2", 7, 0.5, 10)
    with pytest.raises(UsageError, match="do not split"):
        cvdataset.partition_data(labels, "noniid-skew-3", 10, 0.5, 10)


def test_partition_cli_prints_json_matching_the_library():
    result = run_script("cvdataset.py", "--dataset", "fashionmnist", "--partition", "noniid",
                        "--beta", "0.1", "--n_parties", "10", "--init_seed", "0", "--json")
    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout)
    setup_seed(0)
    data = cvdataset.load_dataset("fashionmnist")
    labels = data.train_labels.numpy()
    parts = cvdataset.partition_data(labels, "noniid", 10, 0.1, 10)
    assert printed["client_sizes"] == [len(p) for p in parts]
    assert printed["class_counts"] == cvdataset.class_counts(labels, parts, 10)
    assert sum(printed["client_sizes"]) == 60000
    table = run_script("cvdataset.py", "--beta", "0.1")
    assert table.returncode == 0 and "client" in table.stdout.splitlines()[0]


# ----------------------------------------------------------------------------- the clients' data

@pytest.fixture(scope="module")
def fashion():
    return cvdataset.load_dataset("fashionmnist")


def test_federated_data_is_the_seeded_partition(fashion):
    """engine.data.load_federated_data (what the driver and every worker call) gives each
    client exactly the samples of the seeded partition (SPEC sections 2 and 4), the same every time."""
    from engine.data import load_federated_data
    from fedavg import FedAvg
    args = algorithm_args(FedAvg, "--n_parties", "4", "--beta", "0.3", "--init_seed", "2")
    data = load_federated_data(args, torch.device("cpu"), fashion)
    setup_seed(2)
    labels = fashion.train_labels.numpy()
    parts = cvdataset.partition_data(labels, "noniid", 4, 0.3, 10)
    assert data.client_indices == parts and data.class_counts == cvdataset.class_counts(labels, parts, 10)
    for k, client in enumerate(data.clients):
        idx = torch.as_tensor(parts[k])
        assert torch.equal(client.images, fashion.train_images[idx]) and client.images.dtype == torch.uint8
        assert torch.equal(client.labels, fashion.train_labels[idx])
        assert client.num_samples == len(parts[k]) and client.class_counts.tolist() == data.class_counts[k]
        assert client.test_images is None
    assert torch.equal(data.test_labels, fashion.test_labels)           # the global test set
    again = load_federated_data(args, torch.device("cpu"), fashion)
    assert all(torch.equal(a.images, b.images) for a, b in zip(data.clients, again.clients))
    x, y = data.clients[0].stream(torch.Generator().manual_seed(0)).next()
    assert x.shape == (64, 1, 28, 28) and x.dtype == torch.float32 and y.shape == (64,)


def test_eval_local_splits_each_client_of_the_pooled_data(fashion):
    """--eval local (PFLlib): train and test sets pooled, partitioned, then every client's share
    split train_ratio : rest, disjointly; no global test set."""
    from engine.data import load_federated_data
    from fedavg import FedAvg
    args = algorithm_args(FedAvg, "--n_parties", "4", "--eval", "local", "--train_ratio", "0.75")
    data = load_federated_data(args, torch.device("cpu"), fashion)
    assert data.test_images is None and data.test_labels is None
    setup_seed(0)
    pool = torch.cat([fashion.train_labels, fashion.test_labels]).numpy()
    parts = cvdataset.partition_data(pool, "noniid", 4, 0.5, 10)
    for k, client in enumerate(data.clients):
        n = len(parts[k])
        assert client.num_samples == int(0.75 * n) and len(client.test_labels) == n - int(0.75 * n)
        train = set(np.asarray(data.client_indices[k]).tolist())
        assert len(train) == client.num_samples and train < set(parts[k])
        held_out = sorted(set(parts[k]) - train)
        pooled_labels = torch.as_tensor(pool)
        assert sorted(client.test_labels.tolist()) == sorted(pooled_labels[held_out].tolist())
    assert sum(c.num_samples + len(c.test_labels) for c in data.clients) == 70000


# ----------------------------------------------------------------------------- data files

def write_idx(path, array):
    array = np.asarray(array, dtype=np.uint8)
    header = bytes([0, 0, 8, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(header + array.tobytes())


def test_fashion_mnist_from_flat_idx_files_in_datadir(tmp_path):
    rng = np.random.RandomState(0)
    images, labels = rng.randint(0, 256, (30, 28, 28)), rng.randint(0, 10, 30)
    write_idx(str(tmp_path / "train-images-idx3-ubyte"), images)
    write_idx(str(tmp_path / "train-labels-idx1-ubyte.gz"), labels)
    write_idx(str(tmp_path / "t10k-images-idx3-ubyte"), images[:5])
    write_idx(str(tmp_path / "t10k-labels-idx1-ubyte"), labels[:5])
    data = cvdataset.load_dataset("fashionmnist", str(tmp_path))
    assert data.train_images.shape == (30, 1, 28, 28) and data.train_images.dtype == torch.uint8
    assert torch.equal(data.train_images[:, 0], torch.from_numpy(images.astype(np.uint8)))
    assert data.train_labels.tolist() == labels.tolist()


def test_truncated_idx_file_is_a_clear_error(tmp_path):
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for stem, shape in [("train-images-idx3-ubyte", (20, 28, 28)), ("train-labels-idx1-ubyte", (20,)),
                        ("t10k-images-idx3-ubyte", (5, 28, 28)), ("t10k-labels-idx1-ubyte", (5,))]:
        write_idx(str(raw / stem), np.zeros(shape))
    with open(raw / "train-images-idx3-ubyte", "r+b") as f:
        f.truncate(100)
    with pytest.raises(UsageError, match="truncated"):
        cvdataset.load_dataset("fashionmnist", str(tmp_path))


def write_cifar(folder, name, per_batch=4):
    rng = np.random.RandomState(1)
    folder.mkdir(parents=True)
    label_key = b"labels" if name == "cifar10" else b"fine_labels"
    files = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"] if name == "cifar10" else ["train", "test"]
    written = {}
    for f in files:
        batch = {b"data": rng.randint(0, 256, (per_batch, 3072)).astype(np.uint8),
                 label_key: rng.randint(0, 10 if name == "cifar10" else 100, per_batch).tolist()}
        with open(folder / f, "wb") as out:
            pickle.dump(batch, out)
        written[f] = batch
    return written


@pytest.mark.parametrize("name,sub", [("cifar10", "cifar-10-batches-py"), ("cifar100", "cifar-100-python")])
def test_cifar_loaders_read_torchvision_pickles(tmp_path, name, sub):
    written = write_cifar(tmp_path / sub, name)
    data = cvdataset.load_dataset(name, str(tmp_path))
    first = "data_batch_1" if name == "cifar10" else "train"
    key = b"labels" if name == "cifar10" else b"fine_labels"
    assert data.train_images.shape == ((20 if name == "cifar10" else 4), 3, 32, 32)
    assert data.num_classes == (10 if name == "cifar10" else 100)
    # pixel (channel 1, row 2, col 3) of the first image is byte 1*1024 + 2*32 + 3 of its row
    assert data.train_images[0, 1, 2, 3].item() == written[first][b"data"][0, 1024 + 64 + 3]
    assert data.train_labels[:4].tolist() == written[first][key]
    assert data.test_images.shape[0] == 4


def test_missing_data_names_every_place_looked(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDSUITE_NO_DOWNLOAD", "1")
    with pytest.raises(UsageError) as error:
        cvdataset.load_dataset("cifar10", str(tmp_path))
    assert "cifar-10-batches-py" in str(error.value) and "\n" not in str(error.value)


# ----------------------------------------------------------------------------- augmentation

def test_batch_augmentation_equals_pad_crop_flip_per_sample():
    images = torch.randint(0, 256, (16, 3, 8, 8), dtype=torch.uint8)
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.6, 0.7)
    out = cvdataset.augment_batch(images, mean, std, torch.Generator().manual_seed(7), padding=2)
    replay = torch.Generator().manual_seed(7)
    offsets = torch.randint(0, 5, (2, 16), generator=replay)
    flips = torch.rand(16, generator=replay) < 0.5
    for i in range(16):
        padded = torch.nn.functional.pad(images[i].float() / 255, (2, 2, 2, 2))
        crop = padded[:, offsets[0, i]:offsets[0, i] + 8, offsets[1, i]:offsets[1, i] + 8]
        if flips[i]:
            crop = crop.flip(-1)
        expected = (crop - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
        assert torch.allclose(out[i], expected, atol=1e-6)


def test_batch_stream_visits_every_sample_once_per_pass():
    labels = torch.arange(10)
    stream = cvdataset.BatchStream(torch.zeros(10, 1, 4, 4, dtype=torch.uint8), labels, 4,
                                   torch.Generator().manual_seed(0), (0.5,), (0.5,))
    sizes, seen = [], []
    for _ in range(3):
        _, y = stream.next()
        sizes.append(len(y))
        seen += y.tolist()
    assert sizes == [4, 4, 2] and sorted(seen) == list(range(10))


# ----------------------------------------------------------------------------- models

@pytest.mark.parametrize("name,classes,expected", [("simplecnn", 10, 62006), ("simplecnn", 100, 69656),
                                                    ("simplecnn-mnist", 10, 44426)])
def test_parameter_counts(name, classes, expected):
    model = build_model(name, classes)
    assert count_parameters(model) == expected
    assert [k.rsplit(".", 1)[0] for k in model.state_dict()][::2] == \
        ["base.conv1", "base.conv2", "base.fc1", "base.fc2", "classifier.fc"]
    channels, size = (1, 28) if name == "simplecnn-mnist" else (3, 32)
    assert model(torch.zeros(2, channels, size, size)).shape == (2, classes)
    assert model.features(torch.zeros(2, channels, size, size)).shape == (2, 84)


def test_model_that_does_not_fit_the_data_is_a_clear_error():
    with pytest.raises(UsageError, match="takes 3x32x32"):
        build_model("simplecnn", 10, (1, 28, 28))
