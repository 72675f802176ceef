"""The clients' data, loaded in one place: the driver, every local worker and every Ray actor
call `load_federated_data(args, device)` and get the same partition bit for bit.

Evaluation protocols (--eval) decide what is split how:
  global, groups  the official training set is partitioned over the clients; scores are taken
                  on the whole official test set (SPEC section 1).
  local           PFLlib's protocol (spec/pfl-htfl.md section 1.1): the official training and
                  test sets are concatenated (train first), that pool is partitioned, then each
                  client's share is split, clients in order 0..K-1, with the numpy global RNG
                  continuing after the partition:
                      perm = np.random.permutation(n_k); n_train = floor(train_ratio * n_k)
                      test = perm[:n_k - n_train],  train = perm[n_k - n_train:]
                  so each client's test part follows its own label skew. There is no global test set.

--partition pfllib is PFLlib's generator (generate_FashionMNIST.py noniid - dir) bit for bit:
the merged pool, numpy seeded with 1 (whatever --init_seed: the data are one fixed file there),
NIID-Bench's Dirichlet loop with a minimum of floor(min(10 / (1 - train_ratio), N / K / 2))
samples a client (40 for 70,000 samples and 20 clients; 10 is the generator's batch size) and
no final per-client shuffle, then the split above continuing that RNG. --init_seed still
seeds the models and training.

--partition hyperfl is HyperFL's setting (cvdataset.partition_hyperfl): the official training
set is partitioned (600 images a client), and under --eval local each client's test split is
built the same way from the official test set (600 images each, continuing the numpy RNG;
images repeat across clients when they ask for more than a class holds), as the reference's
per-client test loaders are; --train_ratio plays no part. Under --eval global the clients
hold their training part and the whole official test set scores the global model.

A validation hold-out, only for an algorithm that declares a `validation_size` flag (FedF2DG's
model selection) and sets it above 0: that many samples of the official training set, drawn
without replacement by numpy's default_rng seeded with derived_seed(init_seed, "validation")
(not the global RNG, so every later draw is unchanged), are kept out of every client before the
partition (which then partitions the rest, in their original order); they are the server's
validation set (validation_split, FederatedData.validation_images). Every other run's data is
untouched.
"""
import contextlib
import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import torch

import cvdataset
from utils import UsageError, derived_seed, setup_seed



@dataclass
class ClientData:
    """One client's data on the training device: uint8 images, int64 labels, and (--eval local)
    its own test split."""
    images: torch.Tensor
    labels: torch.Tensor
    class_counts: torch.Tensor
    mean: tuple
    std: tuple
    batch_size: int
    test_images: torch.Tensor = None
    test_labels: torch.Tensor = None
    augment: bool = True        # --no_augment: False
    drop_last: bool = False     # --drop_last: every batch is a full one

    @property
    def num_samples(self):
        return len(self.labels)

    def stream(self, generator, augment=True, batch_size=None):
        """Endless shuffled batches (x normalised, augmented unless augment=False or --no_augment;
        y); with --drop_last a pass skips its last partial batch."""
        return cvdataset.BatchStream(self.images, self.labels, batch_size or self.batch_size, generator,
                                     self.mean, self.std, augment=augment and self.augment,
                                     drop_last=self.drop_last)


@dataclass
class FederatedData:
    dataset: cvdataset.Dataset
    client_indices: list           # indices into the pool the clients were partitioned from
    class_counts: list             # [clients][classes], training parts
    clients: list                  # ClientData per client
    test_images: torch.Tensor      # the global test set (None for --eval local)
    test_labels: torch.Tensor
    validation_images: torch.Tensor = None   # the validation hold-out (validation_size > 0), else None
    validation_labels: torch.Tensor = None

    @property
    def num_classes(self):
        return self.dataset.num_classes


PFLLIB_DATA_SEED = 1          # random.seed(1); np.random.seed(1) in PFLlib's dataset generators
PFLLIB_GENERATOR_BATCH = 10   # the generators' batch_size constant, which sets the minimum client size


@contextlib.contextmanager
def numpy_seeded(seed):
    """numpy's global RNG seeded with `seed` inside the block, restored after it."""
    saved = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(saved)


def split_train_test(n, train_ratio):
    """(train positions, test positions) of one client's n samples, drawn from numpy's global RNG."""
    perm = np.random.permutation(n)
    n_test = n - math.floor(train_ratio * n)
    return perm[n_test:], perm[:n_test]


def validation_split(dataset, size, init_seed):
    """(dataset without the hold-out, (validation images, labels)): `size` training samples drawn
    by default_rng(derived_seed(init_seed, "validation")) without replacement (in drawn order),
    the rest kept in their original order; size 0: (dataset, None)."""
    if not size:
        return dataset, None
    n = len(dataset.train_labels)
    if not 0 < size < n:
        raise UsageError(f"--validation_size {size} must be between 1 and {n - 1} (the training set's size - 1)")
    held = np.random.default_rng(derived_seed(init_seed, "validation")).choice(n, size=size, replace=False)
    kept = np.setdiff1d(np.arange(n), held)
    held, kept = torch.as_tensor(held, dtype=torch.long), torch.as_tensor(kept, dtype=torch.long)
    rest = dataclasses.replace(dataset, train_images=dataset.train_images[kept],
                               train_labels=dataset.train_labels[kept])
    return rest, (dataset.train_images[held], dataset.train_labels[held])


def load_federated_data(args, device, dataset=None):
    """Seed (SPEC section 4), load the dataset (unless given), hold out the validation set (only
    when args.validation_size > 0), partition the rest over the clients and put each client's
    data on `device`."""
    setup_seed(args.init_seed)
    if dataset is None:
        dataset = cvdataset.load_dataset(args.dataset, args.datadir)
    dataset, validation = validation_split(dataset, getattr(args, "validation_size", 0), args.init_seed)
    images, labels = dataset.train_images, dataset.train_labels
    if args.eval == "local":
        images = torch.cat([dataset.train_images, dataset.test_images])
        labels = torch.cat([dataset.train_labels, dataset.test_labels])
    with numpy_seeded(PFLLIB_DATA_SEED) if args.partition == "pfllib" else contextlib.nullcontext():
        if args.partition == "pfllib":
            least = math.floor(min(PFLLIB_GENERATOR_BATCH / (1 - args.train_ratio), len(labels) / args.n_parties / 2))
            client_indices = cvdataset.partition_dirichlet(labels.numpy(), args.n_parties, args.beta,
                                                           dataset.num_classes, least, shuffle_clients=False)
        else:       # hyperfl: the training part of the pool (its first len(train_labels) samples) alone
            partitioned = dataset.train_labels if args.partition == "hyperfl" else labels
            client_indices = cvdataset.partition_data(partitioned.numpy(), args.partition, args.n_parties, args.beta,
                                                      dataset.num_classes, args.skew_class, args.min_require_size)
        test_parts = [None] * len(client_indices)
        if args.eval == "local" and args.partition == "hyperfl":
            offset = len(dataset.train_labels)          # the test set's place in the pool
            test_parts = [np.asarray(part, dtype=np.int64) + offset for part in
                          cvdataset.partition_hyperfl(dataset.test_labels.numpy(), args.n_parties, dataset.num_classes)]
        elif args.eval == "local":
            splits = [split_train_test(len(idx), args.train_ratio) for idx in client_indices]
            test_parts = [np.asarray(idx)[test] for idx, (_, test) in zip(client_indices, splits)]
            client_indices = [np.asarray(idx)[train] for idx, (train, _) in zip(client_indices, splits)]
    if min(len(idx) for idx in client_indices) == 0:
        raise UsageError(f"--train_ratio {args.train_ratio} leaves a client with no training samples; "
                         "raise it or use fewer clients")
    counts = cvdataset.class_counts(labels.numpy(), client_indices, dataset.num_classes)
    clients = []
    for k, idx in enumerate(client_indices):
        idx = torch.as_tensor(np.asarray(idx, dtype=np.int64))
        client = ClientData(images[idx].to(device), labels[idx].to(device),
                            torch.as_tensor(counts[k], dtype=torch.long), dataset.mean, dataset.std,
                            args.batch_size, augment=not args.no_augment, drop_last=args.drop_last)
        if test_parts[k] is not None:
            test_idx = torch.as_tensor(np.asarray(test_parts[k], dtype=np.int64))
            client.test_images, client.test_labels = images[test_idx].to(device), labels[test_idx].to(device)
        clients.append(client)
    global_test = (None, None) if args.eval == "local" else (dataset.test_images.to(device),
                                                             dataset.test_labels.to(device))
    validation = (None, None) if validation is None else tuple(t.to(device) for t in validation)
    return FederatedData(dataset, client_indices, counts, clients, *global_test, *validation)
