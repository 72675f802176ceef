"""Round time of FedAvg's clients run four ways, Ray's overhead, and 1,000 clients' state in memory.

    serial, 2 threads   federation.SerialExecutor, torch.set_num_threads(2)     (the reference)
    serial, 1 thread    the same with one thread
    2 workers           parallel.ProcessExecutor: 2 local processes, 1 thread each
    Ray, 2 CPUs         parallel.RayExecutor on a local Ray with 2 CPUs (skipped without Ray)

A round is every client once (--iterations local steps, batch 64, Fashion-MNIST); the time is
the median over --rounds after one unmeasured warm-up round, printed with its ratio to the
2-thread serial round (>1 is faster). The aim is 2 one-thread workers >= 1.3x the 2-thread
serial process. Ray's overhead: the round trip of an empty actor call, and (Ray round -
worker round) / clients. Memory: RSS growth and bytes of 1,000 clients' `last_model` state
dicts (what MOON and FedHUG keep per client), their pickled size per task, their checkpoint size.

    python bench/bench_parallel.py                                  # 10 and 100 clients: minutes
    python bench/bench_parallel.py --clients 10 --iterations 5 --rounds 1     # a quick check
Run it on an otherwise idle machine: other processes make the thread comparisons meaningless.
"""
import argparse
import io
import os
import pickle
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import cvdataset  # noqa: E402
import federation  # noqa: E402
import parallel  # noqa: E402
from utils import build_parser, parse_args, setup_seed  # noqa: E402


def rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def setup(clients, iterations):
    """(args, data, client_indices, initial_weights) as federation.Run makes them."""
    args = parse_args(build_parser("bench"), ["--n_parties", str(clients), "--num_local_iterations",
                                              str(iterations), "--threads", "1"])
    setup_seed(args.init_seed)
    data = cvdataset.load_dataset(args.dataset, args.datadir)
    indices = cvdataset.partition_data(data.train_labels.numpy(), args.partition, args.n_parties,
                                       args.beta, data.num_classes, args.skew_class)
    algorithm = federation.FedAvg(args, data, indices, torch.device("cpu"))
    weights = federation.clone_weights(algorithm.new_model().state_dict())
    algorithm.initial_weights = weights
    return args, data, indices, weights, algorithm


def round_seconds(executor, weights, clients, rounds):
    """Median seconds of a round of all `clients` (after one warm-up round)."""
    sampled = [(k, {}) for k in range(clients)]
    executor.run_clients(weights, {}, sampled, 0)
    times = []
    for r in range(1, rounds + 1):
        started = time.perf_counter()
        executor.run_clients(weights, {}, sampled, r)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def ray_round_trip(executor, calls=200):
    """Seconds of one empty actor call (ray.get of actor.ready), median of `calls`."""
    actor = executor.actors[0]
    times = []
    for _ in range(calls):
        started = time.perf_counter()
        executor.ray.get(actor.ready.remote())
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def bench_clients(clients, iterations, rounds, with_ray):
    args, data, indices, weights, algorithm = setup(clients, iterations)
    build = (federation.FedAvg, args, indices, weights)
    print(f"\n{clients} clients x {iterations} iterations a round, median of {rounds} round(s)")
    rows = []
    for threads in (2, 1):
        torch.set_num_threads(threads)
        rows.append((f"serial, {threads} thread{'s' if threads > 1 else ''}",
                     round_seconds(federation.SerialExecutor(algorithm), weights, clients, rounds), None))
    torch.set_num_threads(1)

    started = time.perf_counter()
    executor = parallel.ProcessExecutor(build, 2)
    startup = time.perf_counter() - started
    rows.append(("2 workers x 1 thread", round_seconds(executor, weights, clients, rounds), startup))
    executor.close()

    overhead = None
    if with_ray:
        started = time.perf_counter()
        executor = parallel.RayExecutor(build, 2, None)
        startup = time.perf_counter() - started
        rows.append(("Ray, 2 CPUs", round_seconds(executor, weights, clients, rounds), startup))
        overhead = ray_round_trip(executor)
        executor.close()

    reference = rows[0][1]
    for name, seconds, startup in rows:
        note = f"   (start-up {startup:.1f} s)" if startup is not None else ""
        print(f"  {name:22} {seconds:8.3f} s a round   {reference / seconds:5.2f}x{note}")
    workers = rows[2][1]
    verdict = "met" if reference / workers >= 1.3 else "NOT met"
    print(f"  aim: 2 one-thread workers >= 1.3x the 2-thread serial process: {reference / workers:.2f}x, {verdict}")
    if with_ray:
        print(f"  Ray: empty actor call round trip {overhead * 1e3:.2f} ms; "
              f"(Ray round - worker round) / client = {(rows[3][1] - workers) / clients * 1e3:+.1f} ms")


def bench_memory(count=1000):
    """RSS growth and bytes of `count` clients' last_model state dicts."""
    args = parse_args(build_parser("bench"), ["--threads", "1"])
    model = federation.build_model(args.model, 10, (1, 28, 28))
    before = rss_bytes()
    states = [{"last_model": {k: v.detach().clone().add_(i) for k, v in model.state_dict().items()}}
              for i in range(count)]
    growth = rss_bytes() - before
    tensor_bytes = sum(federation.tensor_bytes(s["last_model"]) for s in states)
    task = (model.state_dict(), states[0], 0, 0, {})
    per_task = len(parallel.dumps(task))
    pickle_ms = {}
    for name, dumps in (("pickle.dumps", lambda obj: pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)),
                        ("parallel.dumps", parallel.dumps)):
        started = time.perf_counter()
        for _ in range(100):
            pickle.loads(dumps(task))
        pickle_ms[name] = (time.perf_counter() - started) / 100 * 1e3
    buffer = io.BytesIO()
    torch.save({"client_states": states}, buffer)
    print(f"{count} clients' last_model state ({args.model}): tensors {tensor_bytes / 2**20:.1f} MiB, "
          f"RSS growth {growth / 2**20:.1f} MiB, in a checkpoint {buffer.tell() / 2**20:.1f} MiB")
    print(f"  one task to a worker (global weights + a client's state): {per_task / 2**10:.0f} KiB; "
          "pickled and unpickled in " + ", ".join(f"{ms:.2f} ms ({name})" for name, ms in pickle_ms.items()))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, nargs="+", default=[10, 100])
    p.add_argument("--iterations", type=int, default=100)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--no_ray", action="store_true", help="leave Ray out")
    a = p.parse_args()
    try:
        import ray  # noqa: F401
        with_ray = not a.no_ray
    except ImportError:
        print("Ray is not installed (pip install -r requirements-ray.txt): its rows are left out")
        with_ray = False
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}")
    bench_memory()       # first, while freed memory cannot hide the growth
    for clients in a.clients:
        bench_clients(clients, a.iterations, a.rounds, with_ray)


if __name__ == "__main__":
    main()
