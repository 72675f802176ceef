"""Round time of FedAvg's clients run four ways, Ray's overhead, and 1,000 clients' state in memory.

    serial, 2 threads   engine.executors.SerialExecutor, torch.set_num_threads(2)     (the reference)
    serial, 1 thread    the same with one thread
    2 workers           engine.parallel.ProcessExecutor: 2 local processes, 1 thread each
    Ray, 2 CPUs         engine.parallel.RayExecutor on a local Ray with 2 CPUs (skipped without Ray)

A round is every client once (--iterations local steps, batch 64, Fashion-MNIST); the time is
the median over --rounds after one unmeasured warm-up round, printed with its ratio to the
2-thread serial round (>1 is faster). The aim is 2 one-thread workers >= 1.3x the 2-thread
serial process. Ray's overhead: the round trip of an empty actor call, and (Ray round -
worker round) / clients. Memory: RSS growth and bytes of 1,000 (--memory_clients) clients'
`local_model` states (what MOON and FedHUG keep per client), the pickled size of one task, and
the size of a checkpoint holding them (engine.checkpoint.save_checkpoint).

    python bench/bench_parallel.py                                  # 10 and 100 clients: minutes
    python bench/bench_parallel.py --clients 10 --iterations 5 --rounds 1     # a quick check
    python bench/bench_parallel.py --tiny --no_ray                  # seconds: a smoke test
Run it on an otherwise idle machine: other processes make the thread comparisons meaningless.
"""
import argparse
import os
import pickle
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from engine import payload_bytes  # noqa: E402
from engine import parallel  # noqa: E402
from engine.checkpoint import save_checkpoint  # noqa: E402
from engine.executors import SerialExecutor, build_client_side  # noqa: E402
from engine.loop import algorithm_parser  # noqa: E402
from fedavg import FedAvg  # noqa: E402
from models import build_model  # noqa: E402
from utils import parse_args  # noqa: E402

TINY = {"clients": [2], "iterations": 2, "rounds": 1, "memory_clients": 10}


def rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def setup(clients, iterations):
    """(args, initial weights {architecture: state dict}, algorithm, data) as engine.loop.Run
    makes them: the partition, then the initial weights."""
    args = parse_args(algorithm_parser(FedAvg), ["--n_parties", str(clients), "--num_local_iterations",
                                                 str(iterations), "--threads", "1", "--device", "cpu"])
    cpu = torch.device("cpu")
    algorithm, data = build_client_side(FedAvg, args, None, cpu)
    return args, algorithm.setting.initial_weights, algorithm, data


def round_seconds(executor, algorithm, clients, rounds):
    """Median seconds of a round of all `clients` (after one warm-up round), each downloading the
    initial global model with an empty state."""
    server_state = algorithm.init_server(algorithm.setting.initial_weights[algorithm.args.model])
    tasks = [(k, algorithm.download(server_state, k), {}) for k in range(clients)]
    executor.run_clients(tasks, 0)
    times = []
    for r in range(1, rounds + 1):
        started = time.perf_counter()
        executor.run_clients(tasks, r)
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
    args, weights, algorithm, data = setup(clients, iterations)
    build = (FedAvg, args, weights)      # what engine.parallel.make_executor hands its executors
    print(f"\n{clients} clients x {iterations} iterations a round, median of {rounds} round(s)")
    rows = []
    for threads in (2, 1):
        torch.set_num_threads(threads)
        rows.append((f"serial, {threads} thread{'s' if threads > 1 else ''}",
                     round_seconds(SerialExecutor(algorithm, data), algorithm, clients, rounds), None))
    torch.set_num_threads(1)

    started = time.perf_counter()
    executor = parallel.ProcessExecutor(build, 2)
    startup = time.perf_counter() - started
    rows.append(("2 workers x 1 thread", round_seconds(executor, algorithm, clients, rounds), startup))
    executor.close()

    overhead = None
    if with_ray:
        started = time.perf_counter()
        executor = parallel.RayExecutor(build, 2, None)
        startup = time.perf_counter() - started
        rows.append(("Ray, 2 CPUs", round_seconds(executor, algorithm, clients, rounds), startup))
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


def bench_memory(count):
    """RSS growth and bytes of `count` clients' local_model states (MOON's and FedHUG's client state)."""
    args = parse_args(algorithm_parser(FedAvg), ["--threads", "1"])
    model = build_model(args.model, 10, (1, 28, 28))
    before = rss_bytes()
    states = [{"local_model": {k: v.detach().clone().add_(i) for k, v in model.state_dict().items()}}
              for i in range(count)]
    growth = rss_bytes() - before
    tensor_bytes = sum(payload_bytes(s["local_model"]) for s in states)
    task = ({"weights": model.state_dict()}, states[0], 0, 0)   # (download, state, client, round), as sent to a worker
    per_task = len(parallel.dumps(task))
    pickle_ms = {}
    for name, dumps in (("pickle.dumps", lambda obj: pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)),
                        ("parallel.dumps", parallel.dumps)):
        started = time.perf_counter()
        for _ in range(100):
            pickle.loads(dumps(task))
        pickle_ms[name] = (time.perf_counter() - started) / 100 * 1e3
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "checkpoint.pt")
        save_checkpoint(path, vars(args), 0, {"weights": model.state_dict()}, states, 0.0, 0, 0)
        checkpoint_bytes = os.path.getsize(path)
    print(f"{count} clients' local_model state ({args.model}): tensors {tensor_bytes / 2**20:.1f} MiB, "
          f"RSS growth {growth / 2**20:.1f} MiB, in a checkpoint {checkpoint_bytes / 2**20:.1f} MiB")
    print(f"  one task to a worker (global weights + a client's state): {per_task / 2**10:.0f} KiB; "
          "pickled and unpickled in " + ", ".join(f"{ms:.2f} ms ({name})" for name, ms in pickle_ms.items()))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, nargs="+", default=[10, 100])
    p.add_argument("--iterations", type=int, default=100)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--no_ray", action="store_true", help="leave Ray out")
    p.add_argument("--memory_clients", type=int, default=1000, help="clients whose state the memory part holds")
    p.add_argument("--tiny", action="store_true",
                   help="smoke-test defaults: --clients 2 --iterations 2 --rounds 1 --memory_clients 10 "
                        "(flags given explicitly still win; Ray still runs unless --no_ray)")
    if p.parse_known_args(argv)[0].tiny:
        p.set_defaults(**TINY)
    a = p.parse_args(argv)
    with_ray = not a.no_ray
    if with_ray:
        try:
            import ray  # noqa: F401
        except ImportError:
            print("Ray is not installed (pip install -r requirements-ray.txt): its rows are left out")
            with_ray = False
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}")
    bench_memory(a.memory_clients)       # first, while freed memory cannot hide the growth
    for clients in a.clients:
        bench_clients(clients, a.iterations, a.rounds, with_ray)


if __name__ == "__main__":
    main()
