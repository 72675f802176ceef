"""Sampled clients in parallel: local worker processes (--workers N) or Ray actors (--backend ray).

A client's update is a pure function of (its download, its state, its data, a seed derived
from (init_seed, round, client)), so it can run anywhere. Each worker builds its data and its
algorithm instance once (engine.executors.build_client_side, on the CPU, one torch thread); a
task then carries only (download, client_state, client_id, round[, train[, evaluate]]) and returns the
ClientResult. The per-client state stays with the driver. Results come back in sampled order
and are bit-for-bit those of the serial run (the serial default is one torch thread too).

    python fedavg.py --workers 2 ...                        # 2 local processes, 1 thread each
    python fedavg.py --backend ray ...                      # local Ray, one actor per CPU
    python fedavg.py --backend ray --ray_address auto ...   # an existing Ray cluster

A failure in a worker reaches the driver as the same exception (TrainingDiverged, UsageError,
...); a worker that dies (killed, out of memory, a crash in native code) raises WorkerDied.
"""
import io
import multiprocessing
import os
import pickle
import sys
import traceback
from multiprocessing.connection import wait

import torch
from tqdm import tqdm

import cvdataset
from engine.executors import build_client_side, run_client
from utils import UsageError

# Workers are forked from a clean server process that has imported the engine (and torch)
# once: no copy of a driver whose torch threads may run ("fork" can hang then), and no
# import of torch per worker ("spawn"). Start of 2 workers measured here: spawn 5.9 s,
# forkserver 3.1 s, fork 1.0 s.
START_METHOD = "forkserver"
PRELOAD = ["engine.executors"]


class WorkerDied(RuntimeError):
    """A worker process or Ray actor ended without returning its client's result."""


def make_executor(algorithm_class, args, initial_weights):
    """The executor the round loop hands the sampled clients to (see engine.executors.make_executor)."""
    if any(w.device.type != "cpu" for weights in initial_weights.values() for w in weights.values()):
        raise UsageError("--workers N and --backend ray run the clients on CPUs; add --device cpu "
                         "(or keep the GPU with --workers 1)")
    build = (algorithm_class, args, initial_weights)
    if args.backend == "ray":
        return RayExecutor(build, args.workers, args.ray_address)
    return ProcessExecutor(build, min(args.workers, args.n_parties))


def build_worker(algorithm_class, args, initial_weights, dataset=None):
    """What a worker does once: one torch thread, then the clients' data and the algorithm
    instance on the CPU, as the driver builds them. Returns (algorithm, data)."""
    torch.set_num_threads(1)
    return build_client_side(algorithm_class, args, initial_weights, torch.device("cpu"), dataset)


def run_in_order(clients, workers, submit, first_done, fetch, bar):
    """Give each client to the next idle worker and return the results in sampled order.

    submit(worker, client) starts a client and returns a handle; first_done(handles) waits
    for one to finish; fetch(handle, worker) returns its result or raises its error. After a
    client fails no new client starts, the running ones finish, and the error of the earliest
    failed client in sampled order is raised: the one the serial run raises (clients start in
    sampled order, so every earlier client has run)."""
    results, errors = [None] * len(clients), {}
    waiting, idle, running = list(enumerate(clients)), list(workers), {}
    while running or (waiting and not errors):
        while waiting and idle and not errors:
            worker = idle.pop(0)
            position, client = waiting.pop(0)
            running[submit(worker, client)] = (position, worker)
        handle = first_done(list(running))
        position, worker = running.pop(handle)
        try:
            results[position] = fetch(handle, worker)
        except Exception as error:
            errors[position] = error
        idle.append(worker)
        bar.update()
    if errors:
        raise errors[min(errors)]
    return results


def progress_bar(clients, round_index, progress):
    return tqdm(total=len(clients), desc=f"round {round_index} clients", leave=False,
                disable=not progress, file=sys.stderr)


NUMPY_DTYPES = {torch.float16, torch.float32, torch.float64, torch.uint8, torch.int8, torch.int16,
                torch.int32, torch.int64, torch.bool}


class TensorPickler(pickle.Pickler):
    """Pickles contiguous CPU tensors as numpy arrays (exact, and ~15x faster than torch's own
    tensor pickling for a state dict of this model); every other object as usual."""

    def reducer_override(self, obj):
        if (type(obj) is torch.Tensor and obj.device.type == "cpu" and obj.dtype in NUMPY_DTYPES
                and obj.is_contiguous() and not obj.requires_grad):
            return torch.from_numpy, (obj.numpy(),)
        return NotImplemented


def dumps(obj):
    """The bytes a task or a result travels as (read back with pickle.loads)."""
    buffer = io.BytesIO()
    TensorPickler(buffer, protocol=pickle.HIGHEST_PROTOCOL).dump(obj)
    return buffer.getvalue()


# ============================================================================ local processes

def worker_main(connection, build):
    """A worker process: build the algorithm, say "ready", then answer tasks until told to stop.
    Replies are pickled (kind, payload) with kind "ready", "result" or "error"."""
    try:
        algorithm, data = build_worker(*build)
    except BaseException as error:
        send_error(connection, error)
        return
    connection.send_bytes(pickle.dumps(("ready", None)))
    while True:
        try:
            task = connection.recv_bytes()
        except (EOFError, KeyboardInterrupt):
            return
        if not task:       # the driver's stop message
            return
        try:
            result = run_client(algorithm, data, *pickle.loads(task))
        except BaseException as error:
            send_error(connection, error)
            continue
        connection.send_bytes(dumps(("result", result)))


class WorkerTraceback(Exception):
    """The worker's traceback, attached as the cause of an exception re-raised in the driver."""


def send_error(connection, error):
    """Send the exception itself (so the driver raises the same type) and its traceback text."""
    text = "".join(traceback.format_exception(error))
    try:
        reply = pickle.dumps(("error", (error, text)))
    except Exception:      # an exception that cannot be pickled: its type and message
        reply = pickle.dumps(("error", (RuntimeError(f"{type(error).__name__}: {error}"), text)))
    connection.send_bytes(reply)


class Worker:
    """One worker process and the driver's end of its pipe."""

    def __init__(self, context, build):
        self.connection, child_end = context.Pipe()
        self.process = context.Process(target=worker_main, args=(child_end, build), daemon=True)
        self.process.start()
        child_end.close()
        self.client_id = None     # the client it is running, while busy

    def receive(self):
        """The worker's next reply; raises the worker's exception, or WorkerDied."""
        try:
            kind, payload = pickle.loads(self.connection.recv_bytes())
        except (EOFError, OSError):
            self.process.join(1)
            doing = "starting" if self.client_id is None else f"running client {self.client_id}"
            raise WorkerDied(f"worker process {self.process.pid} died while {doing} (exit code "
                             f"{self.process.exitcode}: killed, out of memory or a crash in native "
                             "code); rerun with --workers 1 to see the error here, then --resume")
        if kind == "error":
            error, text = payload
            raise error from WorkerTraceback(f"in worker process {self.process.pid}:\n{text}")
        return payload


class ProcessExecutor:
    """`count` local worker processes (one torch thread each) running the sampled clients,
    each client given to the next idle worker."""

    def __init__(self, build, count):
        context = multiprocessing.get_context(START_METHOD)
        if START_METHOD == "forkserver":
            context.set_forkserver_preload(PRELOAD)
        self.workers = [Worker(context, build) for _ in range(count)]
        try:
            for worker in self.workers:   # a failed start (e.g. missing data) is reported here
                worker.receive()
        except BaseException:
            self.close()
            raise

    def run_clients(self, tasks, round_index, progress=False):
        """tasks: [(client_id, download, state[, train[, evaluate]])] -> [ClientResult] in the same order."""
        def submit(worker, task):
            client_id, download, state, *flags = task
            worker.connection.send_bytes(dumps((download, state, client_id, round_index, *flags)))
            worker.client_id = client_id
            return worker.connection

        def fetch(connection, worker):
            result = worker.receive()
            worker.client_id = None
            return result

        bar = progress_bar(tasks, round_index, progress)
        try:
            return run_in_order(tasks, self.workers, submit, lambda handles: wait(handles)[0], fetch, bar)
        except BaseException:
            self.close()      # the run ends here; a worker may be dead or still busy
            raise
        finally:
            bar.close()

    def close(self):
        for worker in self.workers:
            if worker.process.is_alive() and worker.client_id is None:
                try:
                    worker.connection.send_bytes(b"")
                except OSError:
                    pass
            worker.process.join(5 if worker.client_id is None else 0)
            if worker.process.is_alive():
                worker.process.terminate()
                worker.process.join()
            worker.connection.close()
        self.workers = []


# ============================================================================ Ray

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # the repository root
SHIP_EXCLUDES = [".venv", ".git", "data", "logs", "log", "**/*.pt"]


def ray_is_running():
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


def start_ray(address, num_cpus):
    """Import Ray and connect it, unless already connected: to the cluster at `address`, with
    this folder shipped as the tasks' working directory, or to a new local Ray of `num_cpus`
    CPUs. Returns the ray module; a missing Ray or an unreachable cluster is a UsageError."""
    try:
        import ray
    except ImportError:
        raise UsageError("--backend ray needs Ray: pip install -r requirements-ray.txt")
    if ray.is_initialized():
        return ray
    if not address:
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False)   # never an existing cluster
        return ray
    try:
        ray.init(address=address, runtime_env={"working_dir": HERE, "excludes": SHIP_EXCLUDES})
    except (ConnectionError, ray.exceptions.AuthenticationError) as error:
        raise UsageError(f"cannot connect to the Ray cluster at {address} ({str(error).splitlines()[0]}); "
                         "check it with `ray status`; a cluster with token authentication (ray start's "
                         "default) also needs RAY_AUTH_MODE=token here")
    return ray


class ClientActor:
    """A Ray actor holding one algorithm instance (the dataset arrives once, through the object store)."""

    def __init__(self, build, dataset):
        try:
            (self.algorithm, self.data), self.error = build_worker(*build, dataset=dataset), None
        except Exception as error:
            self.algorithm, self.data, self.error = None, None, error

    def ready(self):
        if self.error is not None:
            raise self.error
        return os.getpid()

    def run_client(self, task):
        """A task and its result travel as `dumps` bytes, as with local workers (measured here: a
        round trip of a task and its result took 11 ms so, 32 ms as tensors in Ray's own pickling)."""
        return dumps(run_client(self.algorithm, self.data, *pickle.loads(task)))


class RayExecutor:
    """The sampled clients on Ray actors, one CPU each: `workers` actors (--workers N > 1),
    else one per CPU of the cluster; without --ray_address on a local Ray started here."""

    def __init__(self, build, workers, address):
        self.started_ray = not ray_is_running()
        ray = start_ray(address, workers if workers > 1 else os.cpu_count())
        self.ray = ray
        count = workers if workers > 1 else int(ray.cluster_resources().get("CPU", 1))
        args = build[1]
        data = ray.put(cvdataset.load_dataset(args.dataset, args.datadir))
        actor_class = ray.remote(num_cpus=1)(ClientActor)
        self.actors = [actor_class.remote(build, data) for _ in range(min(count, args.n_parties))]
        try:      # a failed start (e.g. missing data) is reported here, and Ray is shut down
            self.get([actor.ready.remote() for actor in self.actors])
        except BaseException:
            self.close()
            raise

    def get(self, references):
        """ray.get, turning a task's error back into the algorithm's own exception."""
        try:
            return self.ray.get(references)
        except self.ray.exceptions.RayTaskError as error:
            if not isinstance(error.cause, BaseException):
                raise
            raise error.cause from WorkerTraceback(str(error))
        except self.ray.exceptions.RayActorError as error:
            raise WorkerDied(f"a Ray actor died ({str(error).splitlines()[0]}); "
                             "rerun with --workers 1 to see the error here, then --resume")

    def run_clients(self, tasks, round_index, progress=False):
        """tasks: [(client_id, download, state[, train[, evaluate]])] -> [ClientResult] in the same order."""
        ray = self.ray

        def submit(actor, task):
            client_id, download, state, *flags = task
            return actor.run_client.remote(dumps((download, state, client_id, round_index, *flags)))

        def first_done(references):
            while True:       # short waits: Ctrl-C is seen between them, not inside ray.wait
                done, _ = ray.wait(references, num_returns=1, timeout=1.0)
                if done:
                    return done[0]

        bar = progress_bar(tasks, round_index, progress)
        try:
            return run_in_order(tasks, self.actors, submit, first_done,
                                lambda reference, actor: pickle.loads(self.get(reference)), bar)
        finally:
            bar.close()

    def close(self):
        for actor in self.actors:
            self.ray.kill(actor)
        self.actors = []
        if self.started_ray:
            self.ray.shutdown()
