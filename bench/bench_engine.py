"""One FedAvg round (10 clients x 100 iterations, batch 64, Fashion-MNIST) three ways, in one process:

  reference-style  per-client DataLoader over per-sample PIL RandomCrop/Flip/ToTensor/Normalize,
                   one nn.Module (deepcopy) per client, PyTorch's max pooling and
                   convolutions, sequential (as the published code does);
  engine           this suite's round: engine.executors.SerialExecutor running every client through
                   run_client (FedAvg's client_update: in-memory uint8 data, augmentation on whole
                   batches, the C code of kernels.py for the convolutions, ReLU + max pooling and
                   the augmentation), then FedAvg.server_update;
  engine, no C kernels  the same with PyTorch computing what the C code does (kernels.disabled():
                   the same numbers; what the C kernels save);
  floor            bare forward/backward/step of the same batches, already in memory.

Prints medians over --repeats and ratios against the reference-style round, for each thread
count in --threads.

    python bench/bench_engine.py [--threads 1 2] [--repeats 3]
    python bench/bench_engine.py --tiny          # 2 clients x 2 iterations, 1 thread, 1 repeat: a smoke test
"""
import argparse
import copy
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from engine import ServerContext  # noqa: E402
from engine.executors import SerialExecutor, build_client_side  # noqa: E402
from engine.loop import algorithm_parser  # noqa: E402
from fedavg import FedAvg  # noqa: E402
import kernels  # noqa: E402
from models import plain_pooling  # noqa: E402
from utils import parse_args  # noqa: E402

TINY = {"threads": [1], "repeats": 1, "n_parties": 2, "iterations": 2}


class PILDataset(torch.utils.data.Dataset):
    """Per-sample PIL pipeline, as torchvision datasets do."""

    def __init__(self, images, labels, transform):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.transform(Image.fromarray(self.images[i, 0].numpy(), mode="L")), int(self.labels[i])


def reference_round(data, global_model, iterations, batch_size):
    mean, std = data.dataset.mean, data.dataset.std
    transform = transforms.Compose([transforms.RandomCrop(28, padding=4), transforms.RandomHorizontalFlip(),
                                    transforms.ToTensor(), transforms.Normalize(mean, std)])
    states, sizes = [], []
    for client in data.clients:
        model = copy.deepcopy(global_model)
        model.train()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-5)
        loader = torch.utils.data.DataLoader(PILDataset(client.images, client.labels, transform),
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
        sizes.append(client.num_samples)
    total = sum(sizes)
    return {k: sum(s[k] * (n / total) for s, n in zip(states, sizes)) for k in states[0]}


def engine_round(algorithm, executor, server_state, round_index):
    """A round as engine.loop.Run runs it (without evaluation, logs and observers)."""
    clients = range(algorithm.args.n_parties)
    tasks = [(k, algorithm.download(server_state, k), {}) for k in clients]
    results = executor.run_clients(tasks, round_index)
    server = ServerContext(round_index, torch.Generator().manual_seed(round_index), algorithm.device)
    return algorithm.server_update(dict(server_state), results, server)


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


def parse_options(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--n_parties", type=int, default=10)
    p.add_argument("--iterations", type=int, default=100)
    p.add_argument("--tiny", action="store_true",
                   help="smoke-test defaults: --threads 1 --repeats 1 --n_parties 2 --iterations 2 "
                        "(flags given explicitly still win)")
    if p.parse_known_args(argv)[0].tiny:
        p.set_defaults(**TINY)
    return p.parse_args(argv)


def main(argv=None):
    options = parse_options(argv)
    cpu = torch.device("cpu")
    args = parse_args(algorithm_parser(FedAvg), ["--n_parties", str(options.n_parties), "--beta", "0.5",
                                                 "--num_local_iterations", str(options.iterations),
                                                 "--device", "cpu"])
    algorithm, data = build_client_side(FedAvg, args, None, cpu)    # as engine.loop.Run builds them
    weights = algorithm.setting.initial_weights
    executor = SerialExecutor(algorithm, data)
    server_state = algorithm.init_server(weights[args.model])
    global_model = algorithm.new_model()
    global_model.load_state_dict(server_state["weights"])
    generator = torch.Generator().manual_seed(0)
    batches = []
    for client in data.clients:
        stream = client.stream(generator)
        batches += [stream.next() for _ in range(options.iterations)]

    print(f"one FedAvg round: {args.n_parties} clients x {options.iterations} iterations x batch "
          f"{args.batch_size}, Fashion-MNIST, medians of {options.repeats}")
    print(f"{'threads':>7} {'variant':<29} {'seconds':>8} {'vs reference':>13} {'vs floor':>9}")
    for threads in options.threads:
        torch.set_num_threads(threads)
        engine_round(algorithm, executor, server_state, 0)          # warm-up
        with plain_pooling(), kernels.disabled():     # the published code: nn.MaxPool2d, oneDNN's convs
            reference = timed(lambda: reference_round(data, global_model, options.iterations, args.batch_size),
                              options.repeats)
        engine = timed(lambda: engine_round(algorithm, executor, server_state, 0), options.repeats)
        with kernels.disabled():
            engine_without_c = timed(lambda: engine_round(algorithm, executor, server_state, 0), options.repeats)
        floor = timed(lambda: floor_round(copy.deepcopy(global_model), batches), options.repeats)
        for name, seconds in [("reference-style", reference), ("engine", engine),
                              ("engine, no C kernels", engine_without_c), ("floor", floor)]:
            print(f"{threads:>7} {name:<29} {seconds:8.2f} {reference / seconds:12.2f}x {seconds / floor:8.2f}x")


if __name__ == "__main__":
    main()
