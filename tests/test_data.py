"""Data loading, augmentation, partitions and models (SPEC sections 1-3)."""
import gzip
import json
import math
import os
import pickle
import random
import re
import time

import numpy as np
import pytest
import torch

import cvdataset
import kernels
from conftest import algorithm_args, run_script
from models import build_model, count_parameters
from utils import UsageError, setup_seed

# ----------------------------------------------------------------------------- partitions


@pytest.fixture(scope="module")
def fashion():
    return cvdataset.load_dataset("fashionmnist")


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



def unbounded_dirichlet(labels, n_parties, beta, num_classes, min_require_size=10, give_up=10000):
    """The partition loop as it was before MAX_PARTITION_ATTEMPTS (NIID-Bench's, redrawing
    forever), verbatim but for counting: returns (index lists, attempts made, each attempt's
    smallest client); the index lists are None if `give_up` attempts did not suffice."""
    n = labels.shape[0]
    min_size = 0
    attempts, smallest = 0, []
    while min_size < min_require_size:
        if attempts == give_up:
            return None, attempts, smallest
        attempts += 1
        idx_batch = [[] for _ in range(n_parties)]
        for k in range(num_classes):
            idx_k = np.where(labels == k)[0]
            np.random.shuffle(idx_k)
            proportions = np.random.dirichlet(np.repeat(beta, n_parties))
            proportions = np.array([p * (len(idx_j) < n / n_parties)
                                    for p, idx_j in zip(proportions, idx_batch)])
            proportions = proportions / proportions.sum()
            cuts = (np.cumsum(proportions) * len(idx_k)).astype(int)[:-1]
            idx_batch = [idx_j + idx.tolist() for idx_j, idx in zip(idx_batch, np.split(idx_k, cuts))]
            min_size = min(len(idx_j) for idx_j in idx_batch)
        smallest.append(min_size)
    for j in range(n_parties):
        np.random.shuffle(idx_batch[j])
    return idx_batch, attempts, smallest


@pytest.mark.parametrize("seed,beta,n_parties,min_require_size",
                         [(1, 0.05, 20, 10), (5, 0.05, 20, 10), (4, 0.1, 40, 10), (5, 0.1, 40, 10),
                          (0, 0.5, 10, 250), (2, 1e6, 7, 10), (3, 0.3, 1, 10)])
def test_bounded_dirichlet_gives_the_unbounded_partition(seed, beta, n_parties, min_require_size):
    """A partition the old unbounded loop found (after up to ~50 redraws here) is unchanged, and
    the same random numbers are used up (the next draw from the global RNG agrees)."""
    labels = np.random.RandomState(123).randint(0, 10, size=3000)
    np.random.seed(seed)
    expected, attempts, _ = unbounded_dirichlet(labels, n_parties, beta, 10, min_require_size)
    next_draw = np.random.random()
    assert expected is not None and attempts <= cvdataset.MAX_PARTITION_ATTEMPTS
    np.random.seed(seed)
    assert cvdataset.partition_data(labels, "noniid", n_parties, beta, 10,
                                     min_require_size=min_require_size) == expected
    assert np.random.random() == next_draw


def test_the_attempts_bound_is_exact(monkeypatch):
    labels = np.random.RandomState(123).randint(0, 10, size=3000)
    np.random.seed(4)
    expected, attempts, _ = unbounded_dirichlet(labels, 40, 0.1, 10)
    assert attempts > 20                                 # this seed needs many redraws
    monkeypatch.setattr(cvdataset, "MAX_PARTITION_ATTEMPTS", attempts)
    np.random.seed(4)
    assert cvdataset.partition_dirichlet(labels, 40, 0.1, 10) == expected
    monkeypatch.setattr(cvdataset, "MAX_PARTITION_ATTEMPTS", attempts - 1)
    np.random.seed(4)
    with pytest.raises(UsageError, match=f"in {attempts - 1} Dirichlet draws"):
        cvdataset.partition_dirichlet(labels, 40, 0.1, 10)


def assert_partition_advice(message, min_require_size, best=None):
    """One line naming the smallest client size reached, the minimum asked for and the fixes."""
    assert "\n" not in message
    reached = re.search(r"the smallest client never reached --min_require_size (\d+) samples \(at best (\d+)\)",
                        message)
    assert reached, message
    assert int(reached.group(1)) == min_require_size and int(reached.group(2)) < min_require_size
    if best is not None:
        assert int(reached.group(2)) == best
    assert "use a larger --beta, fewer --n_parties or a lower --min_require_size" in message


def test_the_error_reports_the_best_attempts_smallest_client(monkeypatch):
    labels = np.random.RandomState(123).randint(0, 10, size=3000)
    np.random.seed(0)                                    # 5 clients of about 600: 590 each is too many
    found, _, smallest = unbounded_dirichlet(labels, 5, 0.5, 10, min_require_size=590, give_up=4)
    assert found is None and len(smallest) == 4 and max(smallest) > 0
    monkeypatch.setattr(cvdataset, "MAX_PARTITION_ATTEMPTS", 4)
    np.random.seed(0)
    with pytest.raises(UsageError) as error:
        cvdataset.partition_data(labels, "noniid", 5, 0.5, 10, min_require_size=590)
    assert_partition_advice(str(error.value), 590, best=max(smallest))


@pytest.mark.parametrize("beta,n_parties", [(0.001, 100), (0.01, 1000), (0.1, 1000)])
def test_hopeless_dirichlet_partitions_end_with_one_line(fashion, beta, n_parties):
    """These redrew forever before the bound; now each ends in a few seconds with the advice."""
    setup_seed(0)
    started = time.perf_counter()
    with pytest.raises(UsageError) as error:
        cvdataset.partition_data(fashion.train_labels.numpy(), "noniid", n_parties, beta, 10)
    assert time.perf_counter() - started < 60
    assert_partition_advice(str(error.value), 10)
    assert f"--beta {beta}, --n_parties {n_parties}" in str(error.value)


@pytest.mark.parametrize("beta", [math.inf, -math.inf, math.nan, 0.0, -0.5])
def test_dirichlet_refuses_a_beta_that_is_not_a_positive_finite_number(beta):
    with pytest.raises(UsageError, match="--beta must be a finite number > 0"):
        cvdataset.partition_data(np.repeat(np.arange(10), 10), "noniid", 2, beta, 10)


def test_huge_beta_gives_equal_shares_and_min_require_size_zero_draws_once():
    labels = np.repeat(np.arange(10), 100)
    np.random.seed(0)
    parts = cvdataset.partition_data(labels, "noniid", 10, 1e300, 10)
    sizes = [len(p) for p in parts]
    assert sum(sizes) == 1000 and min(sizes) >= 80               # nearly equal shares
    np.random.seed(0)
    parts = cvdataset.partition_data(labels, "noniid", 4, 0.5, 10, min_require_size=0)
    assert sorted(i for p in parts for i in p) == list(range(1000))


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



def one_error_line(result):
    """Exit status 2 and exactly one line on stderr, `error: ...`, no traceback; the line."""
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    return errors[0]


def test_partition_cli_reports_a_hopeless_partition_in_one_line_and_takes_min_require_size():
    hopeless = run_script("cvdataset.py", "--beta", "0.1", "--n_parties", "1000")
    assert len(hopeless.stderr.splitlines()) == 1
    assert_partition_advice(one_error_line(hopeless), 10)
    assert "--beta must be a finite number > 0 (got inf)" in one_error_line(run_script("cvdataset.py", "--beta", "inf"))
    result = run_script("cvdataset.py", "--beta", "0.5", "--n_parties", "10", "--min_require_size", "4500", "--json")
    assert result.returncode == 0, result.stderr
    setup_seed(0)
    labels = cvdataset.load_dataset("fashionmnist").train_labels.numpy()
    parts = cvdataset.partition_data(labels, "noniid", 10, 0.5, 10, min_require_size=4500)
    sizes = json.loads(result.stdout)["client_sizes"]
    assert sizes == [len(p) for p in parts] and min(sizes) >= 4500      # 16 draws with this seed


# ----------------------------------------------------------------------------- the clients' data

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



def assert_names_corrupt_file(message, path):
    """One line naming `path` and calling it corrupt (the word outside the path, which holds the
    test's name), not "not found"."""
    assert str(path) in message and "\n" not in message, message
    rest = message.replace(str(path), "")
    assert "corrupt" in rest and "not found" not in rest, message


def write_fashion(folder, gz=False):
    """The four Fashion-MNIST IDX files (gzipped if `gz`) of a tiny data set in `folder`."""
    folder.mkdir(parents=True)
    rng = np.random.RandomState(0)
    suffix = ".gz" if gz else ""
    for stem, shape in [("train-images-idx3-ubyte", (20, 28, 28)), ("train-labels-idx1-ubyte", (20,)),
                        ("t10k-images-idx3-ubyte", (5, 28, 28)), ("t10k-labels-idx1-ubyte", (5,))]:
        write_idx(str(folder / (stem + suffix)), rng.randint(0, 10 if len(shape) == 1 else 256, shape))


def truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])


def damage_idx(folder, how):
    """Damage one Fashion-MNIST file in `folder` as `how` says; returns its path."""
    if how == "truncated gzip":
        path = folder / "train-images-idx3-ubyte.gz"
        truncate(path)
    elif how == "gzip of a truncated IDX":
        path = folder / "t10k-labels-idx1-ubyte.gz"
        with gzip.open(path, "rb") as f:
            raw = f.read()
        with gzip.open(path, "wb") as f:
            f.write(raw[:10])
    elif how == "not gzip at all":
        path = folder / "train-labels-idx1-ubyte.gz"
        path.write_bytes(b"this is not a gzip file")
    elif how == "truncated header":
        path = folder / "t10k-images-idx3-ubyte"
        truncate(path, keep=0)
        path.write_bytes(bytes([0, 0, 8, 3, 0, 0]))
    else:                                        # labels file holding an images array
        path = folder / "train-labels-idx1-ubyte"
        write_idx(str(path), np.zeros((20, 28, 28)))
    return path


@pytest.mark.parametrize("how,gz", [("truncated gzip", True), ("gzip of a truncated IDX", True),
                                    ("not gzip at all", True), ("truncated header", False),
                                    ("wrong array", False)])
def test_corrupt_idx_file_is_named(tmp_path, how, gz):
    raw = tmp_path / "FashionMNIST" / "raw"
    write_fashion(raw, gz)
    path = damage_idx(raw, how)
    with pytest.raises(UsageError) as error:
        cvdataset.load_dataset("fashionmnist", str(tmp_path))    # no falling back to the Debian copy
    assert_names_corrupt_file(str(error.value), path)


def damage_cifar(folder, name, how):
    """Damage one CIFAR batch file in `folder` as `how` says; returns its path."""
    path = folder / ("data_batch_3" if name == "cifar10" else "test")
    if how == "truncated":
        truncate(path)
    elif how == "empty":
        truncate(path, keep=0)
    elif how == "garbage":
        path.write_bytes(np.random.RandomState(0).randint(0, 256, 2000).astype(np.uint8).tobytes())
    elif how == "flipped byte":                  # the pickle names a module that does not exist
        path.write_bytes(path.read_bytes().replace(b"numpy", b"nuXpy", 1))
    elif how == "not a dict":
        with open(path, "wb") as f:
            pickle.dump([1, 2, 3], f)
    else:                                        # images and labels do not match
        with open(path, "wb") as f:
            pickle.dump({b"data": np.zeros((3, 3072), np.uint8), b"labels": [0, 1], b"fine_labels": [0, 1]}, f)
    return path


@pytest.mark.parametrize("how", ["truncated", "empty", "garbage", "flipped byte", "not a dict", "short"])
@pytest.mark.parametrize("name,sub", [("cifar10", "cifar-10-batches-py"), ("cifar100", "cifar-100-python")])
def test_corrupt_cifar_batch_is_named(tmp_path, monkeypatch, name, sub, how):
    monkeypatch.setenv("FEDSUITE_NO_DOWNLOAD", "1")
    write_cifar(tmp_path / sub, name)
    path = damage_cifar(tmp_path / sub, name, how)
    with pytest.raises(UsageError) as error:
        cvdataset.load_dataset(name, str(tmp_path))
    assert_names_corrupt_file(str(error.value), path)


@pytest.mark.parametrize("dataset", ["cifar10", "fashionmnist"])
def test_driver_names_a_truncated_data_file_in_one_line(tmp_path, dataset):
    """fedavg.py with a truncated file in --datadir: exit 2, one `error:` line naming the file
    as corrupt (not "not found"), no traceback."""
    datadir = tmp_path / "data"
    if dataset == "cifar10":
        write_cifar(datadir / "cifar-10-batches-py", "cifar10")
        path = damage_cifar(datadir / "cifar-10-batches-py", "cifar10", "truncated")
    else:
        write_fashion(datadir / "FashionMNIST" / "raw", gz=True)
        path = damage_idx(datadir / "FashionMNIST" / "raw", "truncated gzip")
    result = run_script("fedavg.py", "--dataset", dataset, "--datadir", datadir, "--comm_round", "1",
                        logdir=tmp_path / "logs", env={"FEDSUITE_NO_DOWNLOAD": "1"})
    assert_names_corrupt_file(one_error_line(result), path)


def test_missing_cifar_batch_is_not_found_naming_the_folder_and_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDSUITE_NO_DOWNLOAD", "1")
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar(folder, "cifar10")
    (folder / "data_batch_4").unlink()
    with pytest.raises(UsageError) as error:
        cvdataset.load_dataset("cifar10", str(tmp_path))
    message = str(error.value)
    assert message.startswith("cifar10 not found") and f"{folder} (lacks data_batch_4)" in message, message
    assert "\n" not in message


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


@pytest.mark.parametrize("channels, padding", [(1, 4), (3, 2)])
def test_augmentation_in_c_equals_pytorch_bit_for_bit(channels, padding):
    """kernels.crop_flip_normalise (a table lookup of normalise's own numbers) against the PyTorch
    code of augment_batch, on the samples an index picks (repeats included)."""
    images = torch.randint(0, 256, (40, channels, 12, 12), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    mean, std = (0.2860, 0.1, 0.9)[:channels], (0.3530, 0.7, 0.3)[:channels]
    index = torch.tensor([3, 39, 0, 3, 17, 8, 22, 5, 31, 11])
    fast = cvdataset.augment_batch(images, mean, std, torch.Generator().manual_seed(5), padding, index=index)
    with kernels.disabled():
        plain = cvdataset.augment_batch(images, mean, std, torch.Generator().manual_seed(5), padding, index=index)
        whole = cvdataset.augment_batch(images[index], mean, std, torch.Generator().manual_seed(5), padding)
    assert torch.equal(fast.view(torch.int32), plain.view(torch.int32)) and torch.equal(plain, whole)
    table = cvdataset.normalisation_table(mean, std, channels)
    assert torch.equal(table[:, 7], cvdataset.normalise(torch.full((1, channels, 1, 1), 7, dtype=torch.uint8),
                                                        mean, std).flatten())


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
