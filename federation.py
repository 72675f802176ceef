"""The federated engine: one loop shared by every algorithm.

    for each round r:
        sampled = seeded draw of int(n_parties * sample_fraction) clients
        for each sampled client k:                       # a pure function, see below
            result_k = algorithm.client_update(global_weights, client_state_k, k, r)
        global_weights = algorithm.server_update(global_weights, results)
        evaluate, log ">> Round r | Current Acc: ..., Best Acc: ...", checkpoint

A client's update depends only on (global weights, that client's state, its data, a seed
derived from (init_seed, round, client)), so results do not depend on the order clients run
in, and a resumed run repeats exactly what the uninterrupted run would have done.

An algorithm is a subclass of `FedAvg` overriding only what differs: `local_loss` (FedProx,
MOON), `prepare_client` / `client_state_after` (per-client state), `server_update` (FedAvgM,
SCAFFOLD, FedNova). Entry scripts call `main(AlgorithmClass)`.
"""
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from tqdm import tqdm

import cvdataset
from models import build_model, count_parameters
from utils import (UsageError, atomic_torch_save, build_parser, choose_device, config_fingerprint,
                   derived_seed, parse_args, set_threads, setup_seed, RunLog, warn)

CHECKPOINT_FORMAT = 1


class TrainingDiverged(Exception):
    """A local loss became NaN or infinite."""


@dataclass
class ClientContext:
    """What one client's local update sees. `state` is the client's own persistent state
    (a dict of tensors and numbers) and may be updated in place by the algorithm."""
    client_id: int
    round: int
    state: dict
    global_weights: dict
    global_model: torch.nn.Module          # frozen, eval mode, holds global_weights
    stream: cvdataset.BatchStream           # the client's shuffled, augmented batches
    generator: torch.Generator              # every random draw of this update comes from here
    num_samples: int
    class_counts: torch.Tensor
    message: dict = field(default_factory=dict)  # what the server broadcast besides the weights
    previous_weights: dict = None   # the client's last trained model (initial global weights before its first round)
    step: int = 0
    log_lines: list = field(default_factory=list)

    def log(self, line):
        """A log line, printed by the engine after this client in sampled order."""
        self.log_lines.append(line)


@dataclass
class ClientResult:
    client_id: int
    num_samples: int
    weights: dict          # the trained local model's state dict
    state: dict            # the client's new persistent state
    upload: dict           # every tensor sent to the server (counts towards bytes uploaded)
    metrics: dict
    log_lines: list


def clone_weights(weights):
    return {k: v.detach().clone() for k, v in weights.items()}


def weighted_average(states, weights):
    """sum_k w_k * state_k / sum_k w_k for every entry; integer entries are rounded back."""
    total = float(sum(weights))
    out = {}
    for key in states[0]:
        acc = sum(s[key].double() * (w / total) for s, w in zip(states, weights))
        out[key] = acc.to(states[0][key].dtype) if states[0][key].is_floating_point() else \
            acc.round().to(states[0][key].dtype)
    return out


def tensor_bytes(tensors):
    return sum(t.numel() * t.element_size() for t in tensors.values())


class FedAvg:
    """FedAvg (McMahan et al. 2017) with optional server momentum (FedAvgM, Hsu et al. 2019).

    Client: SGD on CE from the global weights for `num_local_iterations` steps.
    Server: w_avg = sum_k (n_k / n) w_k; with momentum b > 0:
        delta = w_global - w_avg;  v = b v + delta;  w_global = w_global - server_lr * v.
    """
    name = "fedavg"

    def __init__(self, args, data, client_indices, device):
        self.args, self.data, self.device = args, data, device
        self.num_classes = data.num_classes
        self.client_images = [data.train_images[idx].to(device) for idx in client_indices]
        self.client_labels = [data.train_labels[idx].to(device) for idx in client_indices]
        self.client_class_counts = [torch.bincount(y.cpu(), minlength=self.num_classes)
                                    for y in self.client_labels]
        self.local_model = self.new_model()
        self.global_model = self.new_model()
        self.global_model.requires_grad_(False)
        self.initial_weights = None   # the run's initial global weights, set by the engine

    @classmethod
    def check_args(cls, args):
        """Algorithm-specific flag checks; raise UsageError."""

    # ------------------------------------------------------------------ helpers
    def new_model(self):
        return build_model(self.args.model, self.num_classes, self.data.image_shape).to(self.device)

    def make_optimizer(self, params):
        a = self.args
        if a.optimizer == "sgd":
            return torch.optim.SGD(params, lr=a.lr, momentum=a.momentum, weight_decay=a.reg)
        return torch.optim.Adam(params, lr=a.lr, weight_decay=a.reg, amsgrad=a.optimizer == "amsgrad")

    def initial_server_state(self, global_weights):
        return {}

    def server_message(self, server_state):
        """What the server broadcasts to clients besides the global weights (e.g. SCAFFOLD's c)."""
        return {}

    # ------------------------------------------------------------------ client side
    def prepare_client(self, ctx, model):
        """Hook before local training (e.g. FedHUG's synthesis, MOON's previous model)."""

    def local_loss(self, model, x, y, ctx):
        """The loss of one local step: CE(model(x), y)."""
        return F.cross_entropy(model(x), y)

    def before_optimizer_step(self, model, ctx):
        """Hook between backward and the optimiser step (e.g. SCAFFOLD's gradient correction)."""

    def client_state_after(self, ctx, model):
        """The client's persistent state after training; by default its last local model."""
        ctx.state["last_model"] = clone_weights(model.state_dict())
        return ctx.state

    def upload(self, ctx, model):
        """What the client sends: its model weights (the state-dict entries of the upload are
        the weights the server averages)."""
        return clone_weights(model.state_dict())

    def client_update(self, global_weights, client_state, client_id, round_index, message=None):
        """One client's round: a pure function of its inputs and the derived seed."""
        generator = torch.Generator().manual_seed(derived_seed(self.args.init_seed, round_index, client_id))
        self.global_model.load_state_dict(global_weights)
        self.global_model.eval()
        model = self.local_model
        model.load_state_dict(global_weights)
        stream = cvdataset.BatchStream(self.client_images[client_id], self.client_labels[client_id],
                                       self.args.batch_size, generator, self.data.mean, self.data.std)
        ctx = ClientContext(client_id, round_index, dict(client_state), global_weights,
                            self.global_model, stream, generator,
                            len(self.client_labels[client_id]), self.client_class_counts[client_id],
                            message or {})
        ctx.previous_weights = client_state.get("last_model", self.initial_weights)
        self.prepare_client(ctx, model)
        model.train()
        optimizer = self.make_optimizer(model.parameters())
        loss_sum = torch.zeros((), device=self.device)
        for step in range(self.args.num_local_iterations):
            ctx.step = step
            x, y = stream.next()
            loss = self.local_loss(model, x, y, ctx)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.before_optimizer_step(model, ctx)
            optimizer.step()
            loss_sum += loss.detach()          # summed on the device: no sync per step on a GPU
        mean_loss = loss_sum.item() / self.args.num_local_iterations
        if not math.isfinite(mean_loss):
            raise TrainingDiverged(f"round {round_index}, client {client_id}: the local loss became "
                                   f"{mean_loss}")
        upload = self.upload(ctx, model)
        state = self.client_state_after(ctx, model)
        metrics = {"train_loss": mean_loss,
                   "steps": self.args.num_local_iterations}
        weights = {k: upload[k] for k in model.state_dict()}     # the uploaded copies, not cloned again
        return ClientResult(client_id, ctx.num_samples, weights, state, upload, metrics, ctx.log_lines)

    # ------------------------------------------------------------------ server side
    def server_update(self, global_weights, results, server_state):
        """Sample-weighted average, then server momentum when --server_momentum > 0."""
        averaged = weighted_average([r.weights for r in results], [r.num_samples for r in results])
        b = self.args.server_momentum
        if b == 0:
            return averaged
        velocity = server_state.setdefault("velocity", {})
        new_weights = {}
        for key, w in global_weights.items():
            if not w.is_floating_point():
                new_weights[key] = averaged[key]
                continue
            delta = w - averaged[key]
            velocity[key] = b * velocity[key] + delta if key in velocity else delta.clone()
            new_weights[key] = w - self.args.server_lr * velocity[key]
        return new_weights


# ============================================================================ the run

def sample_clients(init_seed, round_index, n_parties, sample_fraction):
    """int(n_parties * sample_fraction) distinct clients, in increasing order, from a seeded RNG."""
    count = int(n_parties * sample_fraction)
    if count >= n_parties:
        return list(range(n_parties))
    rng = np.random.default_rng(derived_seed(init_seed, round_index, "sample"))
    return sorted(rng.choice(n_parties, size=count, replace=False).tolist())


@torch.no_grad()
def evaluate(model, images, labels, mean, std, batch_size=2000):
    """Top-1 accuracy on a whole test set."""
    model.eval()
    correct = 0
    for start in range(0, len(labels), batch_size):
        x = cvdataset.normalise(images[start:start + batch_size], mean, std)
        correct += (model(x).argmax(1) == labels[start:start + batch_size]).sum().item()
    return correct / len(labels)


def load_checkpoint(path):
    """Read a checkpoint file or the checkpoint of a run directory; one clear error if unusable."""
    if os.path.isdir(path):
        path = os.path.join(path, "checkpoint.pt")
    if not os.path.isfile(path):
        raise UsageError(f"no checkpoint at {path} (the run wrote none yet, or the path is wrong)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UsageError(f"checkpoint {path} is corrupt or truncated ({type(e).__name__}); "
                         "use an intact checkpoint")
    if not isinstance(ckpt, dict):
        raise UsageError(f"{path} is not a checkpoint of this suite")
    ckpt["path"] = path
    return ckpt


def check_same(what, expected, found, path):
    diffs = [f"{k}: {found.get(k)!r} in the checkpoint, {expected.get(k)!r} here"
             for k in sorted(set(expected) | set(found)) if expected.get(k) != found.get(k)]
    if diffs:
        raise UsageError(f"checkpoint {path} does not match this {what}: " + "; ".join(diffs))


class SerialExecutor:
    """Runs the sampled clients one after another in this process."""

    def __init__(self, algorithm):
        self.algorithm = algorithm

    def run_clients(self, global_weights, message, clients, round_index, progress=False):
        """clients: [(client_id, client_state)] -> [ClientResult] in the same order."""
        return [self.algorithm.client_update(global_weights, state, client_id, round_index, message)
                for client_id, state in tqdm(clients, desc=f"round {round_index} clients", leave=False,
                                             disable=not progress, file=sys.stderr)]

    def close(self):
        pass


def make_executor(algorithm_class, algorithm, args, client_indices):
    """Serial by default; --workers N or --backend ray hand clients to parallel.py, whose
    workers each build their own `algorithm_class(args, data, client_indices, cpu)` once and
    set its `initial_weights` to `algorithm.initial_weights`."""
    if args.workers == 1 and args.backend == "local":
        return SerialExecutor(algorithm)
    import parallel
    return parallel.make_executor(algorithm_class, args, client_indices, algorithm.initial_weights)


class Run:
    """Owns one federated run: data, partition, algorithm, state, logs and checkpoints."""

    def __init__(self, algorithm_class, args, resume_checkpoint=None):
        self.args = args
        self.algorithm_class = algorithm_class
        self.device = choose_device(args)
        set_threads(args.threads)
        self.run_dir = self.make_run_dir(resume_checkpoint)

        setup_seed(args.init_seed)
        data = cvdataset.load_dataset(args.dataset, args.datadir)
        labels = data.train_labels.numpy()
        self.client_indices = cvdataset.partition_data(labels, args.partition, args.n_parties,
                                                       args.beta, data.num_classes, args.skew_class)
        self.class_counts = cvdataset.class_counts(labels, self.client_indices, data.num_classes)
        self.data = data
        # the global model right after the partition: the same initial weights for every algorithm
        global_model = build_model(args.model, data.num_classes, data.image_shape).to(self.device)
        self.algorithm = algorithm_class(args, data, self.client_indices, self.device)
        self.global_weights = clone_weights(global_model.state_dict())
        self.algorithm.initial_weights = clone_weights(self.global_weights)
        self.eval_model = global_model
        self.test_images = data.test_images.to(self.device)
        self.test_labels = data.test_labels.to(self.device)
        self.server_state = self.algorithm.initial_server_state(self.global_weights)
        self.executor = make_executor(algorithm_class, self.algorithm, args, self.client_indices)
        self.client_states = [{} for _ in range(args.n_parties)]
        self.start_round, self.best_acc, self.history = 0, 0.0, []

        self.log = RunLog(os.path.join(self.run_dir, "log.txt"))
        if resume_checkpoint is not None:
            self.restore(resume_checkpoint)
        else:
            self.write_config()
            self.log_setup(global_model)
            if args.load_path:
                self.warm_start(args.load_path)
        self.metrics_file = open(os.path.join(self.run_dir, "metrics.jsonl"), "w")
        for record in self.history:
            self.metrics_file.write(json.dumps(record) + "\n")
        self.metrics_file.flush()

    # ------------------------------------------------------------------ setup
    def config(self):
        return dict(vars(self.args), algorithm=self.algorithm_class.name)

    def make_run_dir(self, resume_checkpoint):
        if resume_checkpoint is not None:
            return os.path.dirname(os.path.abspath(resume_checkpoint["path"]))
        a = self.args
        name = a.log_file_name or (f"{self.algorithm_class.name}_{a.dataset}_{a.partition}_beta{a.beta}"
                                   f"_seed{a.init_seed}_{time.strftime('%Y%m%d-%H%M%S')}")
        run_dir = os.path.join(a.logdir, name)
        if os.path.exists(os.path.join(run_dir, "checkpoint.pt")) or os.path.exists(os.path.join(run_dir, "log.txt")):
            raise UsageError(f"run directory {run_dir} already holds a run; continue it with "
                             f"--resume {run_dir} or choose another --log_file_name")
        try:
            os.makedirs(run_dir, exist_ok=True)
            probe = os.path.join(run_dir, ".write-test")
            open(probe, "w").close()
            os.unlink(probe)
        except OSError as e:
            raise UsageError(f"cannot write the run directory {run_dir}: {e.strerror}; "
                             "choose a writable --logdir")
        print(f"run directory: {run_dir}", file=sys.stderr)
        return run_dir

    def write_config(self):
        with open(os.path.join(self.run_dir, "config.yaml"), "w") as f:
            yaml.safe_dump(self.config(), f, sort_keys=True)

    def log_setup(self, global_model):
        a = self.args
        fingerprint = config_fingerprint(self.config())
        self.log("config: " + json.dumps(fingerprint, sort_keys=True))
        self.log(f"{self.algorithm_class.name}: {a.dataset}, {a.model} ({count_parameters(global_model):,} parameters), "
                 f"{a.n_parties} clients, partition {a.partition}"
                 + (f" beta {a.beta}" if a.partition == "noniid" else ""))
        self.log("class counts per client:")
        self.log(cvdataset.format_class_counts(self.class_counts))

    def warm_start(self, path):
        """--load_path: global model, client models and round counter from a checkpoint
        (any algorithm, same data and partition), or a bare state dict of a global model."""
        if os.path.isfile(path) and not path.endswith("checkpoint.pt"):
            try:
                obj = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as e:
                raise UsageError(f"--load_path {path} cannot be read ({type(e).__name__})")
            if isinstance(obj, dict) and "global_weights" not in obj:
                self.set_global_weights(obj, path)
                self.log(f"warm start: global model from {os.path.basename(path)}")
                return
        ckpt = load_checkpoint(path)
        keys = ("dataset", "model", "partition", "beta", "n_parties", "init_seed", "skew_class")
        check_same("run's data and partition", {k: getattr(self.args, k) for k in keys},
                   {k: ckpt["config"].get(k) for k in keys}, ckpt["path"])
        self.set_global_weights(ckpt["global_weights"], ckpt["path"])
        for state, saved in zip(self.client_states, ckpt["client_states"]):
            if "last_model" in saved:
                state["last_model"] = saved["last_model"]
        self.start_round = ckpt["round"] + 1
        self.best_acc = ckpt["best_acc"]
        self.log(f"warm start: {ckpt['config']['algorithm']} checkpoint after round {ckpt['round']}, "
                 f"continuing at round {self.start_round}")

    def set_global_weights(self, weights, path):
        try:
            self.eval_model.load_state_dict(weights)
        except RuntimeError as e:
            raise UsageError(f"{path} does not hold a {self.args.model} for {self.args.dataset}: "
                             f"{str(e).splitlines()[0]}")
        self.global_weights = clone_weights(self.eval_model.state_dict())

    # ------------------------------------------------------------------ checkpoints
    def checkpoint(self, round_index):
        atomic_torch_save({
            "format": CHECKPOINT_FORMAT, "config": self.config(), "round": round_index,
            "global_weights": self.global_weights, "server_state": self.server_state,
            "client_states": self.client_states, "best_acc": self.best_acc,
            "history": self.history, "log_lines": self.log.lines,
        }, os.path.join(self.run_dir, "checkpoint.pt"))

    def restore(self, ckpt):
        if ckpt.get("format") != CHECKPOINT_FORMAT:
            raise UsageError(f"{ckpt['path']} has checkpoint format {ckpt.get('format')!r}, "
                             f"this suite reads {CHECKPOINT_FORMAT}")
        self.set_global_weights(ckpt["global_weights"], ckpt["path"])
        self.server_state = ckpt["server_state"]
        self.client_states = ckpt["client_states"]
        self.start_round = ckpt["round"] + 1
        self.best_acc = ckpt["best_acc"]
        self.history = ckpt["history"]
        self.log.replay(ckpt["log_lines"])
        self.write_config()
        print(f"resumed from {ckpt['path']} after round {ckpt['round']}", file=sys.stderr)

    # ------------------------------------------------------------------ the loop
    def run(self):
        a = self.args
        show = sys.stderr.isatty()
        rounds = tqdm(range(self.start_round, a.comm_round), desc="rounds", disable=not show,
                      file=sys.stderr, initial=self.start_round, total=a.comm_round)
        for round_index in rounds:
            started = time.perf_counter()
            sampled = sample_clients(a.init_seed, round_index, a.n_parties, a.sample_fraction)
            message = self.algorithm.server_message(self.server_state)
            results = self.executor.run_clients(self.global_weights, message,
                                                [(k, self.client_states[k]) for k in sampled],
                                                round_index, progress=show)
            for result in results:
                self.client_states[result.client_id] = result.state
                for line in result.log_lines:
                    self.log(line)
            self.global_weights = self.algorithm.server_update(self.global_weights, results, self.server_state)
            self.eval_model.load_state_dict(self.global_weights)
            acc = evaluate(self.eval_model, self.test_images, self.test_labels, self.data.mean, self.data.std)
            self.best_acc = max(self.best_acc, acc)
            self.log(f">> Round {round_index} | Current Acc: {acc:.5f}, Best Acc: {self.best_acc:.5f}")
            record = {"round": round_index, "accuracy": acc, "best_accuracy": self.best_acc,
                      "train_loss": float(np.mean([r.metrics["train_loss"] for r in results])),
                      "seconds": round(time.perf_counter() - started, 4),
                      "bytes_uploaded": int(sum(tensor_bytes(r.upload) for r in results)),
                      "clients": sampled}
            self.history.append(record)
            self.metrics_file.write(json.dumps(record) + "\n")
            self.metrics_file.flush()
            last = round_index == a.comm_round - 1
            if a.checkpoint_every and ((round_index + 1) % a.checkpoint_every == 0 or last):
                self.checkpoint(round_index)
        if self.history:
            final = self.history[-1]
            self.log(f">> Final Acc: {final['accuracy']:.5f} (round {final['round']}), "
                     f"Best Acc: {self.best_acc:.5f} (selected on the test set)")
        if a.save_model:
            torch.save(self.global_weights, os.path.join(self.run_dir, "global_model.pt"))
        self.metrics_file.close()
        self.log.close()
        self.executor.close()
        return self.history


def main(algorithm_class, argv=None):
    """Entry point of every algorithm script: parse, run, and turn bad input into one line."""
    parser = build_parser(f"{algorithm_class.name}: federated learning on Non-IID data")
    try:
        pre, _ = parser.parse_known_args(argv)
        checkpoint = load_checkpoint(pre.resume) if pre.resume else None
        args = parse_args(parser, argv, checkpoint["config"] if checkpoint else None)
        algorithm_class.check_args(args)
        if checkpoint is not None:
            if checkpoint["config"].get("algorithm") != algorithm_class.name:
                raise UsageError(f"checkpoint {checkpoint['path']} is a {checkpoint['config'].get('algorithm')} "
                                 f"run; resume it with {checkpoint['config'].get('algorithm')}.py")
            check_same("run's configuration", config_fingerprint(dict(vars(args), algorithm=algorithm_class.name)),
                       config_fingerprint(checkpoint["config"]), checkpoint["path"])
        run = Run(algorithm_class, args, checkpoint)
        run.run()
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingDiverged as e:
        print(f"error: training diverged at {e}; the last good checkpoint is kept "
              "(lower --lr, then --resume)", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print("interrupted; the last complete checkpoint is kept (continue with --resume)", file=sys.stderr)
        return 130
    return 0
