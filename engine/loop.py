"""The round loop, and `main`, the entry point of every algorithm script.

    server_state = algorithm.initialise_server(...)               once, before round 0
    for each round r:
        sampled  = seeded draw of int(n_parties * sample_fraction) clients
        download = algorithm.download(server_state, k)            for each receiving k: the sampled
                                                                  ones (all: broadcast_to_all, --eval local)
        results  = each receiving client's receive, --eval local scoring, and (sampled)
                   client_update                                  (serial, workers or Ray)
        server_state = algorithm.server_update(server_state, results, server context)
        evaluate (--eval global, groups), log ">> Round r | Current Acc: ..., Best Acc: ...",
        metrics, checkpoint
        a file PAUSE_FILE in the run directory: checkpoint, remove it, exit PAUSED_EXIT (not after
        the last round); --resume continues (run.sh's scheduler restarts a run this way with
        more --workers when cores free up: the numbers are those of any --workers)
    --eval local: one evaluation-only round R after the last (PFLlib's loop i = 0..R)

Observers (engine/observers.py) see every download and upload; the communication counter is
always one of them.
"""
import json
import os
import shutil
import sys
import time

import numpy as np
import torch

import cvdataset
from engine import registry
from engine.algorithm import ClientContext, ServerContext, TrainingDiverged, clone_weights
from engine.checkpoint import check_same, client_states_from, load_checkpoint, save_checkpoint
from engine.evaluation import evaluate, summarise_local
from engine.executors import build_client_side, initial_weights, make_executor  # noqa: F401 (initial_weights re-exported)
from engine.jobs import PAUSE_FILE, PAUSED_EXIT
from engine.observers import CommunicationCounter
from engine.progress import RunBar
from engine.registry import EVAL_PROTOCOLS
from engine.rundir import RunDirectory, read_first_lines
from models import count_parameters
from utils import (UsageError, build_parser, choose_device, config_fingerprint, derived_seed, parse_args,
                   set_threads, warn)


class RunPaused(Exception):
    """The run stopped after a round, checkpointed, because PAUSE_FILE appeared."""


def sample_clients(init_seed, round_index, n_parties, sample_fraction):
    """int(n_parties * sample_fraction) distinct clients, in increasing order, from a seeded RNG."""
    count = int(n_parties * sample_fraction)
    if count >= n_parties:
        return list(range(n_parties))
    rng = np.random.default_rng(derived_seed(init_seed, round_index, "sample"))
    return sorted(rng.choice(n_parties, size=count, replace=False).tolist())


def to_device(obj, device):
    """Every tensor in nested dicts and lists moved to `device`."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, list):
        return [to_device(v, device) for v in obj]
    return obj


def read_warm_start(args):
    """Read and check --load_path before anything is written: a checkpoint of any algorithm on
    the same data and partition, or a bare state dict of a global model. Returns
    {"weights": the global model, "checkpoint": the checkpoint or None}."""
    path = args.load_path
    if os.path.isfile(path) and not path.endswith("checkpoint.pt"):
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise UsageError(f"--load_path {path} cannot be read ({type(e).__name__})")
        if isinstance(obj, dict) and "server_state" not in obj and "format" not in obj and "config" not in obj:
            return {"weights": obj, "checkpoint": None}
    ckpt = load_checkpoint(path)
    keys = ("dataset", "model", "partition", "beta", "n_parties", "init_seed", "skew_class", "min_require_size",
            "eval", "train_ratio")
    defaults = build_parser("defaults")     # a flag added after that run was made counts at its default
    check_same("run's data and partition", {k: getattr(args, k) for k in keys},
               {k: ckpt["config"].get(k, defaults.get_default(k)) for k in keys}, ckpt["path"])
    if "weights" not in ckpt["server_state"]:
        raise UsageError(f"--load_path {ckpt['path']}: that run has no global model to start from")
    return {"weights": ckpt["server_state"]["weights"], "checkpoint": ckpt, "history": read_history(ckpt)}


def read_history(ckpt):
    """The `>> Round` lines and metrics records of the run a checkpoint was taken from, up to
    that checkpoint (the first log_lines / metrics_records of its run directory), or None when
    its run directory is gone."""
    folder = os.path.dirname(os.path.abspath(ckpt["path"]))
    try:
        lines = read_first_lines(os.path.join(folder, "log.txt"), ckpt["log_lines"])
        records = [json.loads(line) for line in read_first_lines(os.path.join(folder, "metrics.jsonl"),
                                                                 ckpt["metrics_records"])]
    except (UsageError, ValueError):
        return None
    return {"run": os.path.basename(folder), "lines": [line for line in lines if line.startswith(">> Round ")],
            "records": records}


class Run:
    """One federated run: its directory, data, algorithm, state, executor and observers."""

    def __init__(self, algorithm_class, args, resume_checkpoint=None, observers=()):
        self.args = args
        self.algorithm_class = algorithm_class
        self.device = choose_device(args)
        set_threads(args.threads)
        warm = read_warm_start(args) if args.load_path and resume_checkpoint is None else None
        self.algorithm, self.data = build_client_side(algorithm_class, args, None, self.device)
        self.server_state = self.algorithm.init_server(self.algorithm.setting.initial_weights[args.model])
        self.client_states = [{} for _ in range(args.n_parties)]
        self.kept_models = {}      # --keep_client_models: every client's last uploaded weights
        self.start_round, self.best_acc, self.best_round = 0, 0.0, None
        self.counter = CommunicationCounter()
        self.observers = [self.counter, *observers]
        self.executor = None
        self.tensorboard = None    # --tensorboard: a SummaryWriter while the run runs
        if resume_checkpoint is not None:
            self.dir = RunDirectory(os.path.dirname(os.path.abspath(resume_checkpoint["path"])),
                                    resume_checkpoint["log_lines"], resume_checkpoint["metrics_records"],
                                    replay=not args.no_replay)
            print(f"resumed from {resume_checkpoint['path']} after round {resume_checkpoint['round']}",
                  file=sys.stderr)
            self.restore(resume_checkpoint)
            return
        if warm is not None:
            self.set_global_weights(warm["weights"], args.load_path)     # checked before anything is written
        self.dir = RunDirectory.create(args.logdir, args.log_file_name
                                       or RunDirectory.default_name(algorithm_class.name, args))
        self.dir.write_config(self.config())
        self.log_setup()
        if warm is not None:
            self.warm_start(warm)

    # ------------------------------------------------------------------ setup
    def config(self):
        return dict(vars(self.args), algorithm=self.algorithm_class.name)

    def log_setup(self):
        a = self.args
        model = self.algorithm.model("evaluation", a.model)
        self.dir.log("config: " + json.dumps(config_fingerprint(self.config()), sort_keys=True))
        self.dir.log(f"{self.algorithm_class.name}: {a.dataset}, {a.model} ({count_parameters(model):,} parameters), "
                     f"{a.n_parties} clients, partition {a.partition}"
                     + (f" beta {a.beta}" if a.partition == "noniid" else ""))
        if a.client_models:
            self.dir.log(f"client models: {', '.join(self.algorithm.setting.client_models)}")
        self.dir.log(f"evaluation: {a.eval} ({EVAL_PROTOCOLS[a.eval]})")
        self.dir.log("class counts per client:")
        self.dir.log(cvdataset.format_class_counts(self.data.class_counts))
        with open(self.dir.file("partition.svg"), "w") as f:
            f.write(cvdataset.class_counts_svg(self.data.class_counts, f"{a.dataset}, partition {a.partition}"
                                               + (f" beta {a.beta}" if a.partition == "noniid" else "")))

    def warm_start(self, warm):
        """--load_path (read by read_warm_start): the global model is set; now the round counter,
        the best accuracy and, for algorithms that use them (MOON, FedHUG), the clients' last
        local models when the checkpoint has them. The loaded global model also stands for the
        run's initial model."""
        ckpt = warm["checkpoint"]
        if ckpt is None:
            self.dir.log(f"warm start: global model from {os.path.basename(self.args.load_path)}")
            return
        if self.algorithm.keeps_local_model:
            saved = {**ckpt.get("client_models", {}),
                     **{k: s["local_model"] for k, s in ckpt["client_states"].items() if "local_model" in s}}
            for k, weights in saved.items():
                self.client_states[int(k)]["local_model"] = to_device(weights, self.device)
        self.start_round = ckpt["round"] + 1
        self.best_acc = ckpt["best_acc"]
        self.dir.log(f"warm start: {ckpt['config']['algorithm']} checkpoint after round {ckpt['round']}, "
                     f"continuing at round {self.start_round}")
        history = warm["history"]
        if history is None:
            self.dir.log("warm start: that run's log is gone, so rounds before the warm start are not shown")
            return
        self.dir.log(f"warm start: rounds 0-{ckpt['round']} below are those of run {history['run']}")
        for line in history["lines"]:
            self.dir.log(line)
        for record in history["records"]:
            self.dir.write_metrics({**record, "warm_start_from": history["run"]})
        self.best_round = next((r["round"] for r in history["records"] if r["accuracy"] == self.best_acc), None)

    def set_global_weights(self, weights, path):
        model = self.algorithm.model("evaluation", self.args.model)
        try:
            model.load_state_dict(weights)
        except RuntimeError as e:
            raise UsageError(f"{path} does not hold a {self.args.model} for {self.args.dataset}: "
                             f"{str(e).splitlines()[0]}")
        self.server_state["weights"] = clone_weights(model.state_dict())
        self.algorithm.setting.initial_weights[self.args.model] = clone_weights(model.state_dict())

    # ------------------------------------------------------------------ checkpoints
    def checkpoint(self, round_index):
        self.dir.flush()
        save_checkpoint(self.dir.file("checkpoint.pt"), self.config(), round_index, self.server_state,
                        self.client_states, self.best_acc, len(self.dir.lines), len(self.dir.records),
                        client_models=self.kept_models if self.args.keep_client_models else None)

    def restore(self, ckpt):
        """--resume: the states as checkpointed (loaded on the CPU, moved to this run's device)."""
        self.server_state = to_device(ckpt["server_state"], self.device)
        self.client_states = to_device(client_states_from(ckpt, self.args.n_parties), self.device)
        self.kept_models = to_device(ckpt.get("client_models", {}), self.device)
        self.start_round = ckpt["round"] + 1
        self.best_acc = ckpt["best_acc"]
        self.best_round = next((r["round"] for r in self.dir.records if r["accuracy"] == self.best_acc), None)
        self.dir.write_config(self.config())

    # ------------------------------------------------------------------ the loop
    def server_context(self, round_index):
        return ServerContext(round_index, torch.Generator().manual_seed(
            derived_seed(self.args.init_seed, round_index, "server")), self.device)

    def initialise(self):
        """algorithm.initialise_server, once before round 0, with every client's context."""
        a, algorithm = self.args, self.algorithm
        server = self.server_context(-1)
        contexts = [ClientContext(k, -1, algorithm.download(self.server_state, k), {}, self.data.clients[k],
                                  torch.Generator().manual_seed(derived_seed(a.init_seed, "initialise", k)),
                                  algorithm.architecture(k)) for k in range(a.n_parties)]
        self.server_state = algorithm.initialise_server(self.server_state, contexts, server)
        for line in server.log_lines:
            self.dir.log(line)

    def evaluates(self, round_index):
        """--eval_every N: rounds N-1, 2N-1, ... and the last training round are evaluated."""
        return (round_index + 1) % self.args.eval_every == 0 or round_index >= self.args.comm_round - 1

    def run_clients(self, round_index, sampled, show):
        """Download to the receiving clients and run them (see the module docstring); returns
        (downloads, the sampled clients' results, their --eval local scores or None)."""
        a, algorithm = self.args, self.algorithm
        local = a.eval == "local" and self.evaluates(round_index)
        receivers = range(a.n_parties) if algorithm.broadcast_to_all or a.eval == "local" else sampled
        downloads = {k: algorithm.download(self.server_state, k) for k in receivers}
        for k in receivers:
            for observer in self.observers:
                observer.on_download(round_index, k, downloads[k], self.server_state)
        is_sampled = set(sampled)
        tasks = [(k, downloads[k], self.client_states[k], k in is_sampled, local) for k in receivers]
        results, evaluations = [], []
        for result, (k, *_, train, _) in zip(self.executor.run_clients(tasks, round_index, progress=show), tasks):
            self.client_states[k] = result.state
            for line in result.log_lines:
                self.dir.log(line)
            if train:
                results.append(result)
            evaluations.append(result.evaluation)
        return downloads, results, summarise_local(evaluations) if local else None

    def log_accuracy(self, round_index, acc, note=""):
        if acc > self.best_acc or (self.best_round is None and acc >= self.best_acc):
            self.best_acc, self.best_round = acc, round_index
        self.dir.log(f">> Round {round_index} | Current Acc: {acc:.5f}, Best Acc: {self.best_acc:.5f}{note}")

    def run_round(self, round_index, show):
        a, algorithm = self.args, self.algorithm
        started = time.perf_counter()
        sampled = sample_clients(a.init_seed, round_index, a.n_parties, a.sample_fraction)
        server = self.server_context(round_index)
        downloads, results, local_scores = self.run_clients(round_index, sampled, show)
        for result in results:
            if result.artifacts:
                self.save_artifacts(round_index, f"client{result.client_id}", result.artifacts)
            if a.keep_client_models and "weights" in result.upload:
                self.kept_models[result.client_id] = result.upload["weights"]
            for observer in self.observers:
                observer.on_upload(round_index, result.client_id, downloads[result.client_id], result)
        self.server_state = algorithm.server_update(self.server_state, results, server)
        for line in server.log_lines:
            self.dir.log(line)
        if server.artifacts:
            self.save_artifacts(round_index, "server", server.artifacts)
        if not self.evaluates(round_index):
            scores = {"accuracy": None}
        else:
            scores = local_scores or evaluate(a.eval, algorithm, self.server_state, self.data)
        losses = [r.metrics["train_loss"] for r in results if "train_loss" in r.metrics]
        client_metrics = {str(r.client_id): extra for r in results
                          if (extra := {k: v for k, v in r.metrics.items() if k not in ("train_loss", "steps")})}
        self.record_round(round_index, scores, started, sampled, float(np.mean(losses)) if losses else None,
                          **server.metrics, **({"client_metrics": client_metrics} if client_metrics else {}))

    def save_artifacts(self, round_index, owner, artifacts):
        """Artifacts of a client (ClientResult.artifacts: FedHUG's synthetic samples, never sent to
        the server) or of the server (ServerContext.artifacts: FedF2DG's pseudo images), for the
        experimenter: artifacts/round<r>_<owner>.pt, owner client<k> or server."""
        os.makedirs(self.dir.file("artifacts"), exist_ok=True)
        torch.save(to_device(artifacts, "cpu"), self.dir.file(os.path.join("artifacts", f"round{round_index}_{owner}.pt")))

    def evaluation_round(self, show):
        """--eval local: round R = comm_round, every client evaluated, nobody trains."""
        started = time.perf_counter()
        _, _, scores = self.run_clients(self.args.comm_round, [], show)
        self.record_round(self.args.comm_round, scores, started, [], None, " (evaluation only)", evaluation_only=True)

    def record_round(self, round_index, scores, started, clients, train_loss, note="", **fields):
        """The round's log line and metrics record: its accuracy, the observers' figures and the
        protocol's details (`scores`), `fields` (e.g. evaluation_only) after the protocol's name."""
        acc = scores.pop("accuracy")
        if acc is None:
            self.dir.log(f">> Round {round_index} | trained, not evaluated (--eval_every {self.args.eval_every})")
        else:
            self.log_accuracy(round_index, acc, note)
        record = {"round": round_index, "evaluation": self.args.eval, **fields, "accuracy": acc,
                  "best_accuracy": self.best_acc, "train_loss": train_loss,
                  "seconds": round(time.perf_counter() - started, 4), "clients": clients}
        for observer in self.observers:
            record.update(observer.end_round(round_index))
        record.update(scores)
        self.dir.write_metrics(record)
        if self.tensorboard is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "round":
                    self.tensorboard.add_scalar(key, value, round_index)
            self.tensorboard.flush()

    def run(self):
        a = self.args
        show = sys.stderr.isatty()
        self.executor = make_executor(self.algorithm_class, self.algorithm, self.data, a,
                                      self.algorithm.setting.initial_weights)
        bar = None
        if a.tensorboard:
            from torch.utils.tensorboard import SummaryWriter     # checked to exist by utils.validate_args
            self.tensorboard = SummaryWriter(self.dir.file("tensorboard"))
        for observer in self.observers:
            if hasattr(observer, "attach"):      # observers that need the run itself (the privacy harness)
                observer.attach(self)
        try:
            if self.start_round == 0 and not self.dir.records:
                self.initialise()
            bar = RunBar(self.start_round, a.comm_round)
            self.dir.before_print = bar.clear
            for round_index in range(self.start_round, a.comm_round):
                self.run_round(round_index, show)
                bar.round_done(round_index)
                snapshot = round_index in a.snapshot_rounds
                due = a.checkpoint_every and ((round_index + 1) % a.checkpoint_every == 0
                                              or round_index == a.comm_round - 1)
                pause = round_index < a.comm_round - 1 and os.path.exists(self.dir.file(PAUSE_FILE))
                if snapshot or due or pause:  # one checkpoint a round at most
                    self.checkpoint(round_index)
                if snapshot:
                    shutil.copyfile(self.dir.file("checkpoint.pt"), self.dir.file(".snapshot.tmp"))
                    os.replace(self.dir.file(".snapshot.tmp"), self.dir.file(f"checkpoint_round{round_index}.pt"))
                if pause:
                    os.remove(self.dir.file(PAUSE_FILE))
                    raise RunPaused(f"paused after round {round_index}; continue with --resume {self.dir.path}")
            if a.eval == "local" and (not self.dir.records or self.dir.records[-1]["round"] < a.comm_round):
                self.evaluation_round(show)
            if self.dir.records:
                final = self.dir.records[-1]
                self.dir.log(f">> Final Acc: {final['accuracy']:.5f} (round {final['round']}), "
                             f"Best Acc: {self.best_acc:.5f} ("
                             + (f"round {self.best_round}" if self.best_round is not None else "from the warm start")
                             + ", selected on the test set)")
            if a.save_model:
                torch.save(self.algorithm.global_weights(self.server_state), self.dir.file("global_model.pt"))
        finally:
            if bar is not None:
                self.dir.before_print = None
                bar.close()
            if self.tensorboard is not None:
                self.tensorboard.close()
            self.executor.close()
            self.dir.close()
        return self.dir.records


# ============================================================================ entry point

def algorithm_parser(algorithm_class, presets=None):
    parser = build_parser(f"{algorithm_class.name}: federated learning on Non-IID data",
                          algorithm_class.all_flags())
    if presets:
        parser.set_defaults(**presets)
    return parser


def main(algorithm_class, argv=None, observers=()):
    """Entry point of every algorithm script: parse, run, and turn bad input into one line.
    `algorithm_class` is a class or a registry name (main.py --algorithm fedavgm)."""
    try:
        presets = None
        if isinstance(algorithm_class, str):
            entry = registry.get(algorithm_class)
            algorithm_class, presets = entry.load(), entry.presets
        parser = algorithm_parser(algorithm_class, presets)
        argv = sys.argv[1:] if argv is None else list(argv)
        pre, unknown = parser.parse_known_args(argv)
        refuse_unknown_flags(algorithm_class, unknown)
        checkpoint = load_checkpoint(pre.resume) if pre.resume else None
        args = parse_args(parser, argv, checkpoint["config"] if checkpoint else None)
        if args.eval not in algorithm_class.evaluations:
            raise UsageError(f"{algorithm_class.name} ends with a model per client: run it with --eval "
                             f"{' or '.join(algorithm_class.evaluations)} (or --scenario pfllib)")
        algorithm_class.check_args(args)
        if args.privacy_rounds:
            from privacy import PrivacyObserver     # the gradient-inversion harness (privacy.py)
            observers = (*observers, PrivacyObserver.from_args(args))
        if checkpoint is not None:
            if checkpoint["config"].get("algorithm") != algorithm_class.name:
                found = checkpoint["config"].get("algorithm")
                raise UsageError(f"checkpoint {checkpoint['path']} is a {found} run; resume it with "
                                 f"python main.py --algorithm {found} --resume ...")
            saved = config_fingerprint(checkpoint["config"])
            here = {k: v for k, v in config_fingerprint(dict(vars(args), algorithm=algorithm_class.name)).items()
                    if k in saved or v != parser.get_default(k)}     # flags added since, at their defaults
            check_same("run's configuration", here, saved, checkpoint["path"])
        Run(algorithm_class, args, checkpoint, observers).run()
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingDiverged as e:
        print(f"error: training diverged at {e}; the last good checkpoint is kept "
              "(lower --lr, then --resume)", file=sys.stderr)
        return 3
    except RunPaused as e:
        print(e, file=sys.stderr)
        return PAUSED_EXIT
    except KeyboardInterrupt:
        print("interrupted; the last complete checkpoint is kept (continue with --resume)", file=sys.stderr)
        return 130
    return 0


def refuse_unknown_flags(algorithm_class, unknown):
    """One line naming a flag this algorithm does not have (and which algorithms do)."""
    flags = [word.split("=")[0] for word in unknown if word.startswith("--")]
    if not flags and not unknown:
        return
    if not flags:
        raise UsageError(f"unexpected argument '{unknown[0]}' (flags start with --; see --help)")
    name = flags[0][2:]
    owners = [entry.name for entry in registry.ALGORITHMS.values()
              if any(flag.name == name for flag in entry.load().all_flags())]
    hint = f" (it is a flag of {', '.join(dict.fromkeys(owners))})" if owners else ""
    raise UsageError(f"{flags[0]} is not a flag of {algorithm_class.name}{hint}; see --help")
