"""Shared plumbing: command-line flags, YAML configs, seeding, devices, atomic saves.

Every entry script accepts the flags `build_parser` builds: those all algorithms share, then
the algorithm's own (engine.Flag, declared on its class). Bad input raises `UsageError`, which
the entry point turns into one line on stderr and exit status 2.
"""
import argparse
import hashlib
import importlib.util
import json
import math
import os
import random
import sys
import tempfile
import warnings

import numpy as np
import torch


class UsageError(Exception):
    """Bad input from the user: printed as one line, exit status 2, no traceback."""


# ----------------------------------------------------------------------------- flags

DATASETS = ("fashionmnist", "cifar10", "cifar100")
OPTIMIZERS = ("sgd", "adam", "amsgrad")
DEFAULT_DATADIR = "./data/"
FLOAT32_MAX = 3.4028234663852886e+38     # torch.finfo(torch.float32).max: float flags end up in tensors

# --scenario NAME: a reference protocol's settings, as flag defaults (the command line and
# --config override each one; a resumed run keeps its own).
SCENARIOS = {
    # PFLlib's benchmark (spec/pfl-htfl.md section 1): FMNIST train+test merged, Dir(0.1) over 20
    # clients by its generator (seed 1), 75/25 per-client splits, the 4-layer CNN, batch 10,
    # lr 0.005, plain SGD, 1 epoch (drop_last, no augmentation), every client each round,
    # 2000 rounds, every client evaluated after download and before training.
    "pfllib": dict(dataset="fashionmnist", model="fedavgcnn", partition="pfllib", beta=0.1, n_parties=20,
                   eval="local", train_ratio=0.75, batch_size=10, lr=0.005, momentum=0.0, reg=0.0,
                   optimizer="sgd", epochs=1, drop_last=True, no_augment=True, sample_fraction=1.0,
                   comm_round=2000),
    # InCo's (spec/datafree-hetero-privacy.md section 2; InCo-Aggregation main.py/train.py and its
    # README command): the five nested depths in consecutive client blocks, the deepest as the
    # server model, Dir(0.5) over 100 clients, 10 % sampled a round, Adam lr 0.001 without weight
    # decay, 5 epochs of batch 64 (drop_last), no augmentation, 500 rounds, every group model on
    # the global test set (mean over groups).
    "inco": dict(dataset="fashionmnist", model="inco-cnn-3-3", client_models="inco5", client_assignment="blocks",
                 eval="groups", optimizer="adam", lr=0.001, reg=0.0, epochs=5, batch_size=64, drop_last=True,
                 no_augment=True, partition="noniid", beta=0.5, n_parties=100, sample_fraction=0.1,
                 comm_round=500),
    # HyperFL's (spec section 3; Pengxin-Guo/HyperFL cnn/options.py): its target CNN, 600 training
    # and 600 test images a client with 80 % from three classes (--partition hyperfl), 20 clients,
    # all every round, 5 epochs of batch 50, SGD lr 0.02 momentum 0.5 weight decay 5e-4, no
    # augmentation, 200 rounds, each client on its own test split.
    # FedF2DG's (spec section 1; GTML-LAB/FedF2DG federated_learning_stage.sh, Rcompete.sh): SCAFFOLD
    # pre-training of 10 clients on Dir(0.05), all every round, 5 epochs of batch 64, SGD lr 0.01
    # momentum 0.9 weight decay 1e-5; 80 pre-training rounds + 1 distillation + 10 Rcompete rounds.
    "fedf2dg": dict(dataset="fashionmnist", partition="noniid", beta=0.05, n_parties=10, epochs=5, batch_size=64,
                    lr=0.01, momentum=0.9, reg=1e-5, optimizer="sgd", sample_fraction=1.0, comm_round=91),
    "hyperfl": dict(dataset="fashionmnist", model="hyperfl-cnn", partition="hyperfl", n_parties=20, eval="local",
                    batch_size=50, lr=0.02, momentum=0.5, reg=5e-4, optimizer="sgd", epochs=5, no_augment=True,
                    sample_fraction=1.0, comm_round=200),
}

# Flags that steer how a run is executed but not what it computes: they may differ between
# a run and its resume, and they are left out of the checkpoint fingerprint.
RUN_CONTROL_FLAGS = {"gpu", "device", "threads", "resume", "checkpoint_every", "config", "datadir",
                     "logdir", "log_file_name", "save_model", "comm_round", "workers", "no_replay",
                     "backend", "ray_address", "load_path", "keep_client_models", "snapshot_rounds",
                     "tensorboard", "privacy_rounds", "privacy_clients", "privacy_batch_sizes", "privacy_attacks",
                     "privacy_modes", "privacy_preset", "privacy_iterations", "privacy_restarts",
                     "privacy_dlg_iterations"}


def build_parser(description, algorithm_flags=()):
    """The flags every algorithm shares (those of the published code, SPEC section 6, and this
    suite's run controls), then `algorithm_flags` (engine.Flag) of the algorithm being run."""
    p = argparse.ArgumentParser(description=description,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    # --- data and partition
    a("--dataset", default="fashionmnist", help=f"one of {', '.join(DATASETS)}")
    a("--datadir", default=DEFAULT_DATADIR, help="where to look for the data first")
    a("--scenario", default="none", help="a reference protocol's settings as defaults: none, or pfllib "
      "(PFLlib's FMNIST benchmark: merged Dir(0.1) partition of 20 clients, FedAvgCNN, batch 10, lr 0.005, "
      "plain SGD, 1 epoch, --eval local), inco (InCo's nested depths, Dir(0.5), 100 clients, Adam, --eval groups) "
      "hyperfl (HyperFL's CNN and 600-image clients, --eval local) or fedf2dg (FedF2DG's pre-training: Dir(0.05), "
      "10 clients, 5 epochs of SGD lr 0.01 momentum 0.9, 91 rounds); other flags override each setting")
    a("--partition", default="noniid",
      help="iid (alias homo), noniid (Dirichlet label skew), noniid-skew-K (K classes a client), "
           "pfllib (PFLlib's Dirichlet generator, seed 1, with --eval local), hyperfl (600 training and 600 "
           "test images a client, 80 %% from three classes)")
    a("--beta", type=float, default=0.5, help="Dirichlet concentration for --partition noniid")
    a("--skew_class", type=int, default=2, help="K for --partition noniid-skew")
    a("--min_require_size", type=int, default=10,
      help="--partition noniid: redraw until every client has at least this many samples (NIID-Bench's 10)")
    a("--n_parties", type=int, default=10, help="number of clients")
    a("--init_seed", type=int, default=0, help="seeds torch, numpy, random and the partition")
    # --- model and local training
    a("--model", default=None, help="the global model's architecture, e.g. simplecnn, simplecnn-mnist "
      "(default: the one that fits --dataset; models.py lists them all)")
    a("--num_local_iterations", type=int, default=100, help="local SGD steps a round (unless --epochs)")
    a("--epochs", type=int, default=0,
      help="local epochs a round: each client runs E passes over its own data, so clients with more data "
           "take more steps (NIID-Bench); 0: --num_local_iterations steps")
    a("--batch_size", type=int, default=64)
    a("--drop_last", action="store_true", help="skip each pass's last partial batch (PyTorch's drop_last; "
      "with --epochs E a client takes E * floor(n / batch_size) steps)")
    a("--no_augment", action="store_true", help="no random crop and flip of training images")
    a("--lr", type=float, default=0.01, help="client learning rate")
    a("--reg", type=float, default=1e-5, help="weight decay")
    a("--optimizer", default="sgd", help=f"one of {', '.join(OPTIMIZERS)}")
    a("--momentum", type=float, default=0.9, help="client SGD momentum")
    # --- federation and evaluation
    a("--comm_round", type=int, default=70, help="communication rounds")
    a("--sample_fraction", type=float, default=1.0, help="fraction of clients sampled a round")
    a("--eval", default="global", help="evaluation protocol: global (the global model on the global test "
      "set), local (each client's model on its own test split, PFLlib), groups (mean over model groups)")
    a("--eval_every", type=int, default=1,
      help="evaluate every N rounds (rounds N-1, 2N-1, ...) and always the last; the rounds between train "
           "and log their bytes and seconds with no accuracy (for models whose evaluation costs more than a round)")
    a("--train_ratio", type=float, default=0.75, help="--eval local: each client's share kept for training")
    a("--client_models", default=None,
      help="architectures of the clients: a group name or A,B,...; client k gets entry k mod M "
           "(default: every client uses --model)")
    a("--client_assignment", default="modulo", choices=("modulo", "blocks"),
      help="how --client_models' M entries go to the N clients: modulo (client k gets entry k mod M, "
           "HtFLlib) or blocks (M consecutive blocks of clients, InCo)")
    # --- run control
    a("--gpu", default="0", help="CUDA device index; falls back to the CPU when CUDA is absent")
    a("--device", default=None, help="explicit device (cpu, cuda, cuda:1); overrides --gpu")
    a("--threads", type=int, default=None, help="torch CPU threads (default: see README)")
    a("--logdir", default="./logs/", help="parent folder of run directories")
    a("--log_file_name", default=None, help="run directory name under --logdir")
    a("--save_model", action="store_true", help="save the final global model in the run directory")
    a("--load_path", default=None, help="warm start from a checkpoint (global model, client models, round)")
    a("--resume", default=None, help="continue a run from its run directory or checkpoint file")
    a("--no_replay", action="store_true", help="with --resume: do not print the log lines the run kept "
      "(run.sh's scheduler, whose log of the run holds them already)")
    a("--checkpoint_every", type=int, default=1, help="write the checkpoint every N rounds (0: never)")
    a("--keep_client_models", action="store_true",
      help="keep every client's last uploaded model in the checkpoint, to warm-start algorithms that "
           "use them (FedHUG, MOON) with --load_path")
    a("--snapshot_rounds", default="", help="comma-separated rounds after which a copy of the checkpoint "
      "is kept as checkpoint_round<r>.pt (run.sh keeps FedAvg's round start_round-1 to warm-start FedHUG)")
    a("--tensorboard", action="store_true", help="also write each round's scalars for TensorBoard into "
      "<run directory>/tensorboard (needs the tensorboard package)")
    a("--workers", type=int, default=1, help="local worker processes running the sampled clients")
    a("--backend", default="local", help="local (in this machine's processes) or ray")
    a("--ray_address", default=None, help="Ray cluster address (default: start a local one)")
    a("--config", default=None, help="YAML file of flag defaults; command-line flags override it")
    privacy = p.add_argument_group("privacy harness", "gradient-inversion attacks on chosen clients' uploads "
                                   "(privacy.py); they never change what the run computes")
    privacy.add_argument("--privacy_rounds", default="", help="comma-separated rounds to attack (empty: no harness)")
    privacy.add_argument("--privacy_clients", default="0", help="comma-separated clients to attack (when sampled)")
    privacy.add_argument("--privacy_batch_sizes", default="1", help="images B a probe batch holds (spec: 1,4,8)")
    privacy.add_argument("--privacy_attacks", default="ig", help="ig (Inverting Gradients), dlg, idlg")
    privacy.add_argument("--privacy_modes", default="probe", help="probe (one step on B images, no augmentation) "
                         "and/or realistic (the actual upload)")
    privacy.add_argument("--privacy_preset", default="cli", help="Inverting Gradients settings: cli "
                         "(reconstruct_image.py: tv 1e-4, signed, 24,000 iterations) or library (DEFAULT_CONFIG)")
    privacy.add_argument("--privacy_iterations", type=int, default=0, help="Inverting Gradients iterations "
                         "(0: the preset's)")
    privacy.add_argument("--privacy_restarts", type=int, default=0, help="Inverting Gradients restarts (0: the preset's)")
    privacy.add_argument("--privacy_dlg_iterations", type=int, default=300, help="DLG / iDLG L-BFGS steps (DLG's 300)")
    group = p.add_argument_group("algorithm flags")
    for flag in algorithm_flags:
        source = f" [default from {flag.source}]" if flag.source else ""
        if flag.type is bool:
            group.add_argument(f"--{flag.name}", action="store_true", help=flag.help + source)
        else:
            group.add_argument(f"--{flag.name}", type=flag.type, default=flag.default, help=flag.help + source)
    return p


def parse_args(parser, argv=None, checkpoint_config=None):
    """Parse flags with the precedence: command line > --config YAML > checkpoint > --scenario >
    defaults."""
    pre, _ = parser.parse_known_args(argv)
    defaults = {}
    config = load_yaml_config(parser, pre.config) if pre.config else {}
    scenario = pre.scenario if pre.scenario != parser.get_default("scenario") else config.get("scenario", "none")
    if scenario not in ("none", *SCENARIOS):
        raise UsageError(f"unknown --scenario '{scenario}'; choose none or {', '.join(SCENARIOS)}")
    defaults.update(SCENARIOS.get(scenario, {}))
    if checkpoint_config:
        known = {act.dest for act in parser._actions}
        defaults.update({k: v for k, v in checkpoint_config.items() if k in known})
    defaults.update(config)
    parser.set_defaults(**defaults)
    args = parser.parse_args(argv)
    validate_args(args)
    return args


def load_yaml_config(parser, path):
    """Read a YAML mapping of flag names to values, checking names and types."""
    import yaml
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except OSError as e:
        raise UsageError(f"cannot read --config {path}: {e.strerror}")
    except yaml.YAMLError as e:
        raise UsageError(f"--config {path} is not valid YAML: {str(e).splitlines()[0]}")
    except ValueError as e:      # not UTF-8, or an integer of more digits than Python converts
        raise UsageError(f"--config {path} cannot be read as YAML text ({type(e).__name__}: "
                         f"{str(e).splitlines()[0]})")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(f"--config {path} must hold a mapping of flag names to values")
    actions = {act.dest: act for act in parser._actions if act.dest != "help"}
    out = {}
    for key, value in data.items():
        if key not in actions:
            raise UsageError(f"--config {path}: unknown key '{key}' (keys are the flag names, e.g. 'beta')")
        if key in ("config", "resume"):
            raise UsageError(f"--config {path}: '{key}' cannot be set in a config file; "
                             f"give --{key} on the command line")
        action = actions[key]
        expected = bool if isinstance(action, argparse._StoreTrueAction) else (action.type or str)
        ok = isinstance(value, expected) or (expected is float and isinstance(value, int)
                                              and not isinstance(value, bool))
        if value is not None and (not ok or (expected is int and isinstance(value, bool))):
            raise UsageError(f"--config {path}: key '{key}' must be {expected.__name__}, "
                             f"got {type(value).__name__} {value!r}")
        if value is None and action.default is not None:
            raise UsageError(f"--config {path}: key '{key}' has no value; give one or drop the key")
        try:
            out[key] = float(value) if expected is float and value is not None else value
        except OverflowError:
            raise UsageError(f"--config {path}: key '{key}' is too large a number ({str(value)[:20]}...)")
    return out


def validate_args(args):
    """Check flags that argparse cannot, raising one UsageError naming the flag and the fix."""
    for name, value in vars(args).items():
        if isinstance(value, float) and not math.isfinite(value):
            raise UsageError(f"--{name} must be a finite number (got {value})")
        if isinstance(value, float) and abs(value) > FLOAT32_MAX:
            raise UsageError(f"--{name} {value} is beyond float32's range (|x| <= {FLOAT32_MAX:.4g}), "
                             "which the tensors it ends up in hold")
    if args.dataset not in DATASETS:
        raise UsageError(f"unknown --dataset '{args.dataset}'; choose one of {', '.join(DATASETS)}")
    from models import resolve_models
    resolve_models(args)
    if args.optimizer not in OPTIMIZERS:
        raise UsageError(f"unknown --optimizer '{args.optimizer}'; choose one of {', '.join(OPTIMIZERS)}")
    if not (args.beta > 0):
        raise UsageError(f"--beta must be > 0 (got {args.beta})")
    if args.n_parties < 1:
        raise UsageError(f"--n_parties must be at least 1 (got {args.n_parties})")
    if not (0 < args.sample_fraction <= 1):
        raise UsageError(f"--sample_fraction must be in (0, 1] (got {args.sample_fraction})")
    if int(args.n_parties * args.sample_fraction) < 1:
        raise UsageError(f"--sample_fraction {args.sample_fraction} x --n_parties {args.n_parties} "
                         "samples no client; raise either")
    for flag in ("num_local_iterations", "comm_round", "batch_size", "eval_every"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag} must be a positive integer (got {getattr(args, flag)})")
    if not (args.lr > 0):
        raise UsageError(f"--lr must be > 0 (got {args.lr})")
    from engine.registry import EVAL_PROTOCOLS
    if args.eval not in EVAL_PROTOCOLS:
        raise UsageError(f"unknown --eval '{args.eval}'; choose one of {', '.join(EVAL_PROTOCOLS)}")
    if not (0 < args.train_ratio < 1):
        raise UsageError(f"--train_ratio must be in (0, 1) (got {args.train_ratio})")
    if args.partition == "pfllib" and args.eval != "local":
        raise UsageError("--partition pfllib splits every client's share into train and test: use it with "
                         "--eval local")
    if args.epochs < 0:
        raise UsageError(f"--epochs must be >= 0 (got {args.epochs}; 0 means --num_local_iterations steps)")
    if args.min_require_size < 0:
        raise UsageError(f"--min_require_size must be >= 0 (got {args.min_require_size})")
    if args.checkpoint_every < 0:
        raise UsageError(f"--checkpoint_every must be >= 0 (got {args.checkpoint_every})")
    try:
        args.snapshot_rounds = parse_rounds(args.snapshot_rounds)
    except ValueError:
        raise UsageError(f"--snapshot_rounds '{args.snapshot_rounds}' is not a list of rounds (e.g. 49 or 9,49)")
    if args.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise UsageError("--tensorboard needs the tensorboard package: pip install tensorboard (or leave the "
                         "flag out)")
    if args.workers < 1:
        raise UsageError(f"--workers must be at least 1 (got {args.workers})")
    if args.backend not in ("local", "ray"):
        raise UsageError(f"unknown --backend '{args.backend}'; choose local or ray")
    if args.threads is not None and not 1 <= args.threads <= 1024:
        raise UsageError(f"--threads must be between 1 and 1024 (got {args.threads})")
    if not 0 <= args.init_seed < 2 ** 32:
        raise UsageError(f"--init_seed must be between 0 and 2**32 - 1 (numpy's seed range; got {args.init_seed})")
    if args.reg < 0:
        raise UsageError(f"--reg (weight decay) must be >= 0 (got {args.reg})")
    if args.momentum < 0:
        raise UsageError(f"--momentum must be >= 0 (got {args.momentum})")
    if args.datadir != DEFAULT_DATADIR and not os.path.isdir(args.datadir):
        raise UsageError(f"--datadir {args.datadir} does not exist; point it at a folder holding the data")


def parse_rounds(text):
    """'9, 49' -> [9, 49] (sorted, no duplicates); a list stays a list; ValueError on anything else."""
    if isinstance(text, (list, tuple)):
        rounds = [int(r) for r in text]
    else:
        rounds = [int(part) for part in str(text or "").split(",") if part.strip()]
    if any(r < 0 for r in rounds):
        raise ValueError("negative round")
    return sorted(set(rounds))


def config_fingerprint(config):
    """The part of a run's configuration that decides what it computes (not how it is run)."""
    return {k: v for k, v in sorted(config.items()) if k not in RUN_CONTROL_FLAGS}


# ----------------------------------------------------------------------------- seeding

def setup_seed(seed):
    """Seed torch, numpy's legacy global RNG and Python's `random` (SPEC section 4)."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def derived_seed(*parts):
    """A 63-bit seed that depends only on `parts`, e.g. (init_seed, round, client)."""
    digest = hashlib.sha256(json.dumps(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


# ----------------------------------------------------------------------------- devices

def choose_device(args):
    """--device wins (cpu or cuda[:N]); else --gpu N picks cuda:N, falling back to the CPU
    with one warning."""
    if args.device:
        try:
            device = torch.device(args.device)
        except RuntimeError:
            raise UsageError(f"--device '{args.device}' is not a device name (use cpu or cuda[:N])")
        if device.type not in ("cpu", "cuda"):
            raise UsageError(f"--device {args.device}: this suite runs on cpu or cuda[:N] only")
        if device.type == "cuda" and not torch.cuda.is_available():
            raise UsageError(f"--device {args.device} asked for CUDA, but CUDA is not available here")
        if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
            raise UsageError(f"--device {args.device}: there are {torch.cuda.device_count()} CUDA devices here")
        return device
    gpu = str(args.gpu).split(",")[0].strip()
    if not (gpu.isascii() and gpu.isdigit()):
        raise UsageError(f"--gpu '{args.gpu}' is not a GPU index (e.g. --gpu 0)")
    if torch.cuda.is_available():
        if int(gpu) >= torch.cuda.device_count():
            raise UsageError(f"--gpu {gpu}: there are {torch.cuda.device_count()} CUDA devices here")
        return torch.device(f"cuda:{int(gpu)}")
    print(f"warning: --gpu {args.gpu}: CUDA is not available, running on the CPU", file=sys.stderr)
    return torch.device("cpu")


def set_threads(threads):
    """Set torch's CPU thread count; one thread is the default (see README, 'Threads')."""
    torch.set_num_threads(threads or 1)


# ----------------------------------------------------------------------------- files

def atomic_torch_save(obj, path):
    """torch.save to a temporary file in the same folder, then rename: a kill mid-write
    leaves the previous file intact."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".pt")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def warn(message):
    """One warning line on stderr, kept out of the tee'd log."""
    print(f"warning: {message}", file=sys.stderr, flush=True)


warnings.filterwarnings("ignore", message=".*TypedStorage.*")
