"""One FedAvg round (10 clients x 100 iterations, batch 64, Fashion-MNIST) three ways, in one process:

  reference-style  per-client DataLoader over per-sample PIL RandomCrop/Flip/ToTensor/Normalize,
                   one nn.Module (deepcopy) per client, sequential (as the published code does);
  engine           this suite's FedAvg.client_update + server_update (in-memory uint8 data,
                   augmentation on whole batches);
  floor            bare forward/backward/step of the same batches, already in memory.

Prints medians over --repeats and ratios against the reference-style round, for each thread
count in --threads. Usage: python bench/bench_engine.py [--threads 1 2] [--repeats 3]
"""
import argparse
import copy
import os
import statistics
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import cvdataset  # noqa: E402
from federation import FedAvg  # noqa: E402
from utils import build_parser, parse_args, setup_seed  # noqa: E402


class PILDataset(torch.utils.data.Dataset):
    """Per-sample PIL pipeline, as torchvision datasets do."""

    def __init__(self, images, labels, transform):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.transform(Image.fromarray(self.images[i, 0].numpy(), mode="L")), int(self.labels[i])


def reference_round(algorithm, data, parts, global_model, iterations, batch_size):
    transform = transforms.Compose([transforms.RandomCrop(28, padding=4), transforms.RandomHorizontalFlip(),
                                    transforms.ToTensor(), transforms.Normalize(data.mean, data.std)])
    states, sizes = [], []
    for idx in parts:
        model = copy.deepcopy(global_model)
        model.train()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-5)
        loader = torch.utils.data.DataLoader(PILDataset(data.train_images[idx], data.train_labels[idx], transform),
                                             batch_size=batch_size, shuffle=True)
        batches = iter(loader)
        for _ in range(iterations):
            try:
                x, y = next(batches)
            except StopIteration:
                batches = iter(loader)
                x, y = next(batches)
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        states.append(model.state_dict())
        sizes.append(len(idx))
    total = sum(sizes)
    return {k: sum(s[k] * (n / total) for s, n in zip(states, sizes)) for k in states[0]}


def engine_round(algorithm, global_weights, n_parties, round_index):
    results = [algorithm.client_update(global_weights, {}, k, round_index) for k in range(n_parties)]
    return algorithm.server_update(global_weights, results, {})


def floor_round(model, batches):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-5)
    for x, y in batches:
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def timed(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--n_parties", type=int, default=10)
    p.add_argument("--iterations", type=int, default=100)
    options = p.parse_args()

    args = parse_args(build_parser("bench"), ["--n_parties", str(options.n_parties), "--beta", "0.5",
                                              "--num_local_iterations", str(options.iterations)])
    setup_seed(0)
    data = cvdataset.load_dataset("fashionmnist")
    parts = cvdataset.partition_data(data.train_labels.numpy(), "noniid", args.n_parties, 0.5, 10)
    algorithm = FedAvg(args, data, parts, torch.device("cpu"))
    global_model = algorithm.new_model()
    global_weights = copy.deepcopy(global_model.state_dict())
    algorithm.initial_weights = global_weights
    generator = torch.Generator().manual_seed(0)
    batches = []
    for idx in parts:
        stream = cvdataset.BatchStream(data.train_images[idx], data.train_labels[idx], args.batch_size,
                                       generator, data.mean, data.std)
        batches += [stream.next() for _ in range(options.iterations)]

    print(f"one FedAvg round: {args.n_parties} clients x {options.iterations} iterations x batch "
          f"{args.batch_size}, Fashion-MNIST, medians of {options.repeats}")
    print(f"{'threads':>7} {'variant':<16} {'seconds':>8} {'vs reference':>13} {'vs floor':>9}")
    for threads in options.threads:
        torch.set_num_threads(threads)
        engine_round(algorithm, global_weights, args.n_parties, 0)          # warm-up
        reference = timed(lambda: reference_round(algorithm, data, parts, global_model,
                                                  options.iterations, args.batch_size), options.repeats)
        engine = timed(lambda: engine_round(algorithm, global_weights, args.n_parties, 0), options.repeats)
        floor = timed(lambda: floor_round(copy.deepcopy(global_model), batches), options.repeats)
        for name, seconds in [("reference-style", reference), ("engine", engine), ("floor", floor)]:
            print(f"{threads:>7} {name:<16} {seconds:8.2f} {reference / seconds:12.2f}x {seconds / floor:8.2f}x")


if __name__ == "__main__":
    main()
