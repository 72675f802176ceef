"""Shared test helpers: the repository root on sys.path, one torch thread, a CLI runner."""
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
torch.set_num_threads(1)


def run_script(script, *args, logdir=None, name="run", timeout=600, env=None):
    """Run `python <script> args...` in the repository root with one thread; returns the
    CompletedProcess (stdout, stderr, returncode)."""
    command = [sys.executable, os.path.join(ROOT, script), *map(str, args)]
    if script != "cvdataset.py":
        command += ["--threads", "1"]
    if logdir is not None:
        command += ["--logdir", str(logdir), "--log_file_name", name]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, **(env or {})))


def random_client_side(algorithm_class, *flags, sizes=(20, 12), labels=None):
    """(algorithm, data): `algorithm_class` (batch 8, 2 local iterations, `flags`) over random
    Fashion-MNIST-shaped images drawn from seed 0, one client per entry of `sizes` holding the
    next that many images; labels 0..9 in turn unless given."""
    import torch
    args = algorithm_args(algorithm_class, "--n_parties", len(sizes), "--batch_size", 8,
                          "--num_local_iterations", 2, *flags)
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (sum(sizes), 1, 28, 28), generator=generator, dtype=torch.uint8)
    labels = torch.arange(sum(sizes)) % 10 if labels is None else labels
    starts = [sum(sizes[:k]) for k in range(len(sizes))]
    return synthetic_client_side(algorithm_class, args, images, labels,
                                 [torch.arange(s, s + n) for s, n in zip(starts, sizes)])


def run_scripts(calls, logdir, jobs=2):
    """Several run_script calls at once (`jobs` one-thread processes: this machine's 2 cores);
    calls = {name: (script, [args])}; returns {name: CompletedProcess}."""
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = {name: pool.submit(run_script, script, *args, logdir=logdir, name=name)
                   for name, (script, args) in calls.items()}
        return {name: future.result() for name, future in futures.items()}


@pytest.fixture
def cli():
    return run_script


def algorithm_args(algorithm_class, *flags):
    """The flags of `algorithm_class`'s script (its own flags included), parsed with one thread."""
    from engine.loop import algorithm_parser
    from utils import parse_args
    return parse_args(algorithm_parser(algorithm_class), ["--threads", "1", *map(str, flags)])


def synthetic_client_side(algorithm_class, args, images, labels, client_indices, initial=None):
    """(algorithm, data) as engine.executors.build_client_side returns them, but over given
    Fashion-MNIST-shaped uint8 images and labels, client k holding the samples client_indices[k]
    (no dataset files, no partition draw). `initial` is the run's initial global model
    (algorithm.setting.initial_weights[args.model]); default a fresh --model after torch.manual_seed(0)."""
    import cvdataset
    from engine.data import ClientData, FederatedData
    from engine.executors import make_setting
    from engine.loop import initial_weights

    cpu = torch.device("cpu")
    dataset = cvdataset.Dataset("fashionmnist", images, labels, images[:10], labels[:10], 10, (0.5,), (0.5,))
    clients = []
    for idx in client_indices:
        idx = torch.as_tensor(idx)
        clients.append(ClientData(images[idx], labels[idx], torch.bincount(labels[idx], minlength=10),
                                  dataset.mean, dataset.std, args.batch_size))
    data = FederatedData(dataset, list(client_indices), [c.class_counts.tolist() for c in clients], clients,
                         dataset.test_images, dataset.test_labels)
    setting = make_setting(args, data, cpu, None)
    if initial is None:
        torch.manual_seed(0)
        setting.initial_weights = initial_weights(args, setting.client_models, 10, dataset.image_shape, cpu)
    else:
        setting.initial_weights = {args.model: initial}
    return algorithm_class(setting), data


def assert_same_tensors(expected, found, where="value"):
    """Equal structure (dict keys, list lengths) and bit-identical tensors of the same dtype."""
    if isinstance(expected, torch.Tensor):
        assert isinstance(found, torch.Tensor) and expected.dtype == found.dtype, where
        assert torch.equal(expected, found), f"{where}: max difference {(expected - found).abs().max()}"
    elif isinstance(expected, dict):
        assert set(expected) == set(found), where
        for key in expected:
            assert_same_tensors(expected[key], found[key], f"{where}.{key}")
    elif isinstance(expected, (list, tuple)):
        assert len(expected) == len(found), where
        for i, (e, f) in enumerate(zip(expected, found)):
            assert_same_tensors(e, f, f"{where}[{i}]")
    else:
        assert expected == found, where


def records_of(run_dir):
    """A run directory's metrics.jsonl records."""
    import json
    return [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]


def interrupt_after(round_index):
    """An observer pressing Ctrl-C as round `round_index` ends (before its checkpoint)."""
    from engine import Observer

    class InterruptAfter(Observer):
        def end_round(self, index):
            if index == round_index:
                raise KeyboardInterrupt
            return {}

    return InterruptAfter()


def assert_resume_equals_uninterrupted(algorithm_class, whole, interrupted, server_keys):
    """Resume the run `interrupted` (stopped by interrupt_after) to its end; then its records (but
    the seconds), its log and its checkpoint's server and client states equal the
    uninterrupted run `whole`'s, and the server state holds exactly `server_keys`."""
    from engine import main
    assert main(algorithm_class, ["--resume", str(interrupted), "--threads", "1"]) == 0
    strip = [[{k: v for k, v in r.items() if k != "seconds"} for r in records_of(d)] for d in (whole, interrupted)]
    assert strip[0] == strip[1]
    assert (whole / "log.txt").read_text() == (interrupted / "log.txt").read_text()
    a = torch.load(whole / "checkpoint.pt", weights_only=True)
    b = torch.load(interrupted / "checkpoint.pt", weights_only=True)
    assert set(a["server_state"]) == set(server_keys)
    assert_same_tensors(a["server_state"], b["server_state"])
    assert_same_tensors(a["client_states"], b["client_states"])
