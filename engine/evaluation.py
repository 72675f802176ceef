"""Evaluation protocols (--eval), each named in the log, every metrics record and the tables.

    global  top-1 accuracy of the global model (--model, holding algorithm.global_weights) on
            the global test set (SPEC section 4).
    local   PFLlib's (spec/pfl-htfl.md sections 1.3-1.4): every client receives the round's
            download, runs algorithm.receive, and scores its reported model
            (algorithm.evaluation_model) on its own test split before it trains, in the same
            process as its update (engine/executors.py: run_client); accuracy = sum_k correct_k
            / sum_k n_k^test over ALL clients (a micro average); the per-client accuracies and
            their np.std are recorded. Round r's number is taken at the start of round r
            (round 0: the untrained model); after the last round one evaluation-only round R
            scores what the R aggregations produced, as PFLlib's loop i = 0..R does.
    groups  each architecture in --client_models builds its model from the global weights
            (the entries it has) and is scored on the global test set; accuracy = unweighted
            mean over groups (InCo), every group's accuracy recorded.
"""
import numpy as np
import torch

import cvdataset
from utils import UsageError


@torch.no_grad()
def count_correct(model, images, labels, mean, std, batch_size=250):
    """Correct top-1 predictions of `model` on uint8 images (normalised here), 250 at a time: on one
    CPU thread batches of 250 score 1.2x (SimpleCNN) to 2x (fedavgcnn, inco-cnn) faster than 2000."""
    model.eval()
    correct = 0
    for start in range(0, len(labels), batch_size):
        x = cvdataset.normalise(images[start:start + batch_size], mean, std)
        correct += (model(x).argmax(1) == labels[start:start + batch_size]).sum().item()
    return correct


def evaluate_global(algorithm, server_state, data):
    model = algorithm.frozen_model("evaluation", algorithm.args.model, algorithm.global_weights(server_state))
    mean, std = data.dataset.mean, data.dataset.std
    return {"accuracy": count_correct(model, data.test_images, data.test_labels, mean, std) / len(data.test_labels)}


def client_evaluation(algorithm, ctx):
    """{series: (correct, tested)} of client ctx.client_id's reported model(s) on its test split."""
    models = algorithm.evaluation_model(ctx)
    client = ctx.data
    return {series: (count_correct(model, client.test_images, client.test_labels, client.mean, client.std),
                     len(client.test_labels))
            for series, model in (models.items() if isinstance(models, dict) else [("", models)])}


def summarise_local(evaluations):
    """The scores of one round from every client's client_evaluation (in client order): the
    first series is the headline accuracy, each other one is recorded as accuracy_<series>."""
    scores = {}
    for position, series in enumerate(evaluations[0]):
        counts = [evaluation[series] for evaluation in evaluations]
        suffix = "" if position == 0 else f"_{series}"
        per_client = [correct / tested for correct, tested in counts]
        scores.update({f"accuracy{suffix}": sum(c for c, _ in counts) / sum(n for _, n in counts),
                       f"client_accuracies{suffix}": per_client,
                       f"client_accuracy_mean{suffix}": float(np.mean(per_client)),   # unweighted (HyperFL's)
                       f"client_accuracy_std{suffix}": float(np.std(per_client))})
    return scores


def evaluate_groups(algorithm, server_state, data):
    weights = algorithm.global_weights(server_state)
    groups = {}
    for architecture in dict.fromkeys(algorithm.setting.client_models):
        keys = algorithm.model("evaluation", architecture).state_dict().keys()
        missing = [key for key in keys if key not in weights]
        if missing:
            raise UsageError(f"--eval groups: the global model has no {missing[0]} for {architecture}; "
                             "make --model the largest architecture (it must hold every group's entries)")
        group_weights = {key: weights[key] for key in keys}
        model = algorithm.frozen_model("evaluation", architecture, group_weights)
        groups[architecture] = count_correct(model, data.test_images, data.test_labels,
                                             data.dataset.mean, data.dataset.std) / len(data.test_labels)
    return {"accuracy": float(np.mean(list(groups.values()))), "group_accuracies": groups}


def evaluate(protocol, algorithm, server_state, data):
    """{"accuracy": the headline number, ...details} under `protocol` (global or groups; local
    is taken by the clients: client_evaluation, summarise_local)."""
    if protocol == "groups":
        return evaluate_groups(algorithm, server_state, data)
    return evaluate_global(algorithm, server_state, data)
