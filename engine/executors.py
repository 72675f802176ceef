"""Where a round's clients run: in this process (SerialExecutor), on local worker processes or
on Ray actors (engine/parallel.py). All of them run a client through `run_client`, on an
algorithm instance and data built by `build_client_side`, so the results are bit for bit the
same wherever a client runs.
"""
import dataclasses
import sys

import torch
from tqdm import tqdm

from engine.algorithm import ClientContext, ClientResult, Setting, clone_weights
from engine.data import load_federated_data
from engine.evaluation import client_evaluation
from models import build_model, client_architectures
from utils import derived_seed


def make_setting(args, data, device, initial_weights):
    return Setting(args=args, num_classes=data.num_classes, image_shape=data.dataset.image_shape,
                   device=device, client_models=client_architectures(args.client_models, args.model, args.n_parties,
                                                                        args.client_assignment),
                   num_samples=[client.num_samples for client in data.clients],
                   class_counts=torch.tensor(data.class_counts, dtype=torch.long),
                   initial_weights=initial_weights,
                   held_out={"validation": None if data.validation_images is None
                             else (data.validation_images, data.validation_labels),
                             "test": (data.test_images, data.test_labels),
                             "mean": data.dataset.mean, "std": data.dataset.std})


def initial_weights(args, architectures, num_classes, image_shape, device):
    """Every architecture's initial weights: --model first, right after the partition (so every
    algorithm starts from the same global model for a seed), then the others in client order."""
    weights = {}
    for architecture in [args.model] + list(architectures):
        if architecture not in weights:
            weights[architecture] = clone_weights(build_model(architecture, num_classes, image_shape)
                                                  .to(device).state_dict())
    return weights


def build_client_side(algorithm_class, args, weights, device, dataset=None):
    """The clients' data and an algorithm instance, as the driver builds them and every worker
    does once. `weights` are the initial weights per architecture; None draws them right after
    the partition (what the driver does). Returns (algorithm, data)."""
    data = load_federated_data(args, device, dataset)
    setting = make_setting(args, data, device, weights)
    if weights is None:
        setting.initial_weights = initial_weights(args, setting.client_models, data.num_classes,
                                                  data.dataset.image_shape, device)
    return algorithm_class(setting), data


def run_client(algorithm, data, download, state, client_id, round_index, train=True, evaluate=False):
    """One client's round: its context (with the generator seeded by (init_seed, round, client)),
    algorithm.receive, then with `evaluate` (--eval local) its reported model scored on its
    test split (an evaluation generator of its own), then with `train` (a sampled client)
    algorithm.client_update; an unsampled client uploads nothing."""
    generator = torch.Generator().manual_seed(derived_seed(algorithm.args.init_seed, round_index, client_id))
    ctx = ClientContext(client_id, round_index, download, dict(state), data.clients[client_id], generator,
                        algorithm.architecture(client_id))
    algorithm.receive(ctx)
    evaluation = {}
    if evaluate:
        evaluation_generator = torch.Generator().manual_seed(
            derived_seed(algorithm.args.init_seed, round_index, client_id, "evaluation"))
        evaluation = client_evaluation(algorithm, dataclasses.replace(ctx, generator=evaluation_generator,
                                                                      state=dict(ctx.state), log_lines=[]))
    if train:
        result = algorithm.client_update(ctx)
    else:
        result = ClientResult(client_id, ctx.data.num_samples, {}, ctx.state, {}, ctx.log_lines)
    result.evaluation = evaluation
    return result


class SerialExecutor:
    """Runs the sampled clients one after another in this process."""

    def __init__(self, algorithm, data):
        self.algorithm, self.data = algorithm, data

    def run_clients(self, tasks, round_index, progress=False):
        """tasks: [(client_id, download, state[, train[, evaluate]])] -> [ClientResult] in the same order."""
        return [run_client(self.algorithm, self.data, download, state, client_id, round_index, *flags)
                for client_id, download, state, *flags in tqdm(tasks, desc=f"round {round_index} clients",
                                                               leave=False, disable=not progress, file=sys.stderr)]

    def close(self):
        pass


def make_executor(algorithm_class, algorithm, data, args, initial_weights):
    """Serial by default; --workers N or --backend ray: engine/parallel.py, whose workers each
    call build_client_side once."""
    if args.workers == 1 and args.backend == "local":
        return SerialExecutor(algorithm, data)
    from engine import parallel
    return parallel.make_executor(algorithm_class, args, initial_weights)
