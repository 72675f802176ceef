"""FedPer, FedRep, LG-FedAvg and Ditto (algorithms/personalised/): which tensors leave a client
(bytes counted = the shared part only), FedRep's head-then-base schedule, Ditto's proximal
personal step against hand-computed values, its round order and its two evaluation series, and a
short --eval local run of each on Fashion-MNIST that ends above chance."""
import json
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from conftest import random_client_side
from algorithms.personalised.ditto import Ditto
from algorithms.personalised.fedper import FedPer
from algorithms.personalised.fedrep import FedRep
from algorithms.personalised.lgfedavg import LGFedAvg
from engine import ClientContext, ServerContext, clone_weights, main, payload_bytes, weighted_average
from engine.executors import run_client

torch.set_num_threads(1)

# floats in the base and in the head of each model (spec/pfl-htfl.md section 0)
MODEL_SIZES = {"simplecnn-mnist": (43_576, 850), "fedavgcnn": (576_896, 5_130)}


def make_algorithm(cls, *flags, sizes=(20, 12)):
    """(algorithm, data): `cls` over random Fashion-MNIST-shaped images, one client per size."""
    return random_client_side(cls, *flags, sizes=sizes)


def initial_of(algorithm):
    return algorithm.setting.initial_weights[algorithm.args.model]


def differs(a, b, keys):
    return any(not torch.equal(a[k], b[k]) for k in keys)


# ----------------------------------------------------------------------------- what leaves a client

@pytest.mark.parametrize("model", list(MODEL_SIZES))
@pytest.mark.parametrize("cls", [FedPer, FedRep, LGFedAvg])
def test_only_the_shared_part_is_downloaded_uploaded_and_averaged(cls, model):
    algorithm, data = make_algorithm(cls, "--model", model)
    initial = initial_of(algorithm)
    prefix = algorithm.head_prefix(model)
    head_keys = {k for k in initial if k.startswith(prefix)}
    base_keys = set(initial) - head_keys
    base_floats, head_floats = MODEL_SIZES[model]
    shared_keys, personal_keys, shared_floats = ((head_keys, base_keys, head_floats) if cls is LGFedAvg
                                                 else (base_keys, head_keys, base_floats))
    server_state = algorithm.init_server(initial)
    download = algorithm.download(server_state, 0)
    assert set(download["weights"]) == shared_keys
    assert payload_bytes(download) == 4 * shared_floats

    results = [run_client(algorithm, data, download, {}, k, 0) for k in range(2)]
    for result in results:
        assert set(result.upload) == {"weights"} and set(result.upload["weights"]) == shared_keys
        assert payload_bytes(result.upload) == 4 * shared_floats      # float32, the shared part only
        assert set(result.state) == {cls.personal_part}
        assert set(result.state[cls.personal_part]) == personal_keys
        assert differs(result.upload["weights"], initial, shared_keys)                   # both parts trained
        assert differs(result.state[cls.personal_part], initial, personal_keys)

    # the server averages the shared part by sample counts; the personal part is never touched
    server = ServerContext(0, torch.Generator().manual_seed(0), torch.device("cpu"))
    new_state = algorithm.server_update(server_state, results, server)
    expected = weighted_average([r.upload["weights"] for r in results], [20, 12])
    assert all(torch.equal(new_state["weights"][k], expected[k]) for k in shared_keys)
    assert all(torch.equal(new_state["weights"][k], initial[k]) for k in personal_keys)

    # next round, sampled or not: the new global shared part with the client's own personal part
    new_download = algorithm.download(new_state, 1)
    composed = algorithm.compose_weights(model, new_download, results[1].state)
    assert all(torch.equal(composed[k], expected[k]) for k in shared_keys)
    assert all(torch.equal(composed[k], results[1].state[cls.personal_part][k]) for k in personal_keys)
    ctx = ClientContext(1, 1, new_download, results[1].state, data.clients[1], torch.Generator(), model)
    reported = algorithm.evaluation_model(ctx).state_dict()
    assert all(torch.equal(reported[k], composed[k]) for k in composed)


# ----------------------------------------------------------------------------- FedRep's schedule

class RecordingFedRep(FedRep):
    """FedRep noting, after every optimiser step, which parts of the model moved."""

    def prepare_client(self, ctx, model):
        self.moved, self.last = [], clone_weights(model.state_dict())

    def after_optimizer_step(self, model, ctx):
        now, prefix = clone_weights(model.state_dict()), self.head_prefix(ctx.architecture)
        self.moved.append("+".join(sorted({"head" if k.startswith(prefix) else "base"
                                           for k in now if not torch.equal(now[k], self.last[k])})))
        self.last = now


@pytest.mark.parametrize("flags, head_steps, base_steps", [
    (["--plocal_epochs", 2, "--num_local_iterations", 3], 6, 3),   # iterations: plocal_epochs x iterations
    (["--plocal_epochs", 2, "--epochs", 1], 6, 3),                  # 20 samples, batch 8: ceil = 3 a pass
    (["--epochs", 2, "--drop_last"], 2, 4),                         # floor(20 / 8) = 2 a pass
])
def test_fedrep_trains_the_head_alone_then_the_base_alone(flags, head_steps, base_steps):
    algorithm, data = make_algorithm(RecordingFedRep, *flags)
    download = algorithm.download(algorithm.init_server(initial_of(algorithm)), 0)
    result = run_client(algorithm, data, download, {}, 0, 0)
    assert algorithm.moved == ["head"] * head_steps + ["base"] * base_steps
    assert result.metrics["steps"] == head_steps + base_steps and result.metrics["head_steps"] == head_steps
    assert all(p.requires_grad for p in algorithm.model("local").parameters())     # unfrozen afterwards


def test_fedrep_and_ditto_refuse_a_personal_pass_of_no_epochs(tmp_path, capsys):
    for cls in (FedRep, Ditto):
        assert main(cls, ["--plocal_epochs", "0", "--eval", "local", "--logdir", str(tmp_path)]) == 2
        assert "--plocal_epochs must be >= 1" in capsys.readouterr().err
    assert main(Ditto, ["--ditto_mu", "-1", "--logdir", str(tmp_path)]) == 2


# ----------------------------------------------------------------------------- Ditto

class OneBatch:
    def __init__(self, x, y):
        self.x, self.y = x, y

    def next(self):
        return self.x, self.y


@pytest.mark.parametrize("mu, weight, bias", [
    # v = 0: softmax 1/2 for both classes, grad CE = [[-1/4]*3, [1/4]*3] and bias 0; the proximal
    # gradient mu (v - w) with w = ones, b_w = (1, -1); v' = v - lr (grad CE + mu (v - w)), lr 0.1
    (0.5, [[0.075] * 3, [0.025] * 3], [0.05, -0.05]),
    (0.0, [[0.025] * 3, [-0.025] * 3], [0.0, 0.0]),
])
def test_ditto_personal_step_is_the_proximal_step_computed_by_hand(mu, weight, bias):
    algorithm, _ = make_algorithm(Ditto, "--ditto_mu", mu, "--lr", 0.1, "--momentum", 0, "--reg", 0)
    personal, global_model = nn.Linear(3, 2), nn.Linear(3, 2)
    with torch.no_grad():
        personal.weight.zero_(), personal.bias.zero_()
        global_model.weight.fill_(1.0), global_model.bias.copy_(torch.tensor([1.0, -1.0]))
    x, y = torch.tensor([[1.0, 2.0, 0.0], [0.0, 1.0, -1.0]]), torch.tensor([0, 1])
    ctx = SimpleNamespace(client_id=0, round=0, step=0, generator=None, global_model=global_model,
                          data=SimpleNamespace(stream=lambda *a, **k: OneBatch(x, y)), override_batch=None)
    metrics = algorithm.train(ctx, personal, personal.parameters(), 1, loss=algorithm.personal_loss)
    assert torch.allclose(personal.weight, torch.tensor(weight), atol=1e-7)
    assert torch.allclose(personal.bias, torch.tensor(bias), atol=1e-7)
    # logged loss: CE = ln 2, plus mu / 2 * ||v - w||^2 = mu / 2 * (6 + 2)
    assert metrics["train_loss"] == pytest.approx(torch.log(torch.tensor(2.0)).item() + mu / 2 * 8, rel=1e-6)


class RecordingDitto(Ditto):
    """Ditto noting every training pass: which model, its steps, its start and ctx.global_model."""

    def train(self, ctx, model, parameters, steps, loss=None, optimizer=None):
        which = "personal" if model is self.model("personal", ctx.architecture) else "global"
        self.passes.append((which, steps, clone_weights(model.state_dict()),
                            clone_weights(ctx.global_model.state_dict())))
        return super().train(ctx, model, parameters, steps, loss, optimizer)


def test_ditto_trains_the_personal_model_first_against_the_received_global_one():
    algorithm, data = make_algorithm(RecordingDitto, "--ditto_mu", 0.1, "--plocal_epochs", 2)
    algorithm.passes = []
    initial = initial_of(algorithm)
    received = {k: v + 0.01 for k, v in initial.items()}           # w^t
    personal = {k: v - 0.01 for k, v in initial.items()}           # v from earlier rounds
    result = run_client(algorithm, data, {"weights": received}, {"personal": personal}, 0, 3)
    (first, first_steps, first_start, first_anchor), (second, second_steps, second_start, _) = algorithm.passes
    assert (first, first_steps, second, second_steps) == ("personal", 4, "global", 2)
    assert all(torch.equal(first_start[k], personal[k]) for k in personal)      # from the kept v
    assert all(torch.equal(first_anchor[k], received[k]) for k in received)     # pulled towards w^t
    assert all(torch.equal(second_start[k], received[k]) for k in received)     # global pass from w^t
    assert set(result.state) == {"personal"} and set(result.upload) == {"weights"}
    assert differs(result.state["personal"], personal, personal)
    assert differs(result.upload["weights"], received, received)
    assert payload_bytes(result.upload) == 4 * sum(MODEL_SIZES["simplecnn-mnist"])
    assert result.metrics["personal_steps"] == 4 and result.metrics["steps"] == 2

    # reported: two series, the personal model first (the headline), then the global one
    ctx = ClientContext(0, 4, {"weights": received}, result.state, data.clients[0], torch.Generator(),
                        "simplecnn-mnist")
    series = algorithm.evaluation_model(ctx)
    assert list(series) == ["personal", "global"]
    assert all(torch.equal(series["personal"].state_dict()[k], result.state["personal"][k]) for k in personal)
    assert all(torch.equal(series["global"].state_dict()[k], received[k]) for k in received)
    # before its first round a client's personal model is the run's initial model
    fresh = ClientContext(1, 0, {"weights": received}, {}, data.clients[1], torch.Generator(), "simplecnn-mnist")
    assert all(torch.equal(algorithm.evaluation_model(fresh)["personal"].state_dict()[k], initial[k])
               for k in initial)


# ----------------------------------------------------------------------------- short real runs

RUN = ["--n_parties", 3, "--beta", 0.1, "--train_ratio", 0.9, "--num_local_iterations", 50, "--batch_size", 16,
       "--lr", 0.03, "--comm_round", 3, "--threads", 1, "--eval", "local"]


def run(cls, tmp_path, *flags):
    """A short --eval local run of `cls` in this process: (metrics records, checkpoint). Rounds 0-2
    are scored at their start, round 3 is the evaluation-only round after the last aggregation."""
    name = cls.name
    assert main(cls, [*map(str, RUN), *map(str, flags), "--logdir", str(tmp_path), "--log_file_name", name]) == 0
    records = [json.loads(line) for line in open(tmp_path / name / "metrics.jsonl")]
    assert [r["round"] for r in records] == [0, 1, 2, 3] and records[-1]["evaluation_only"]
    assert 0.05 < records[0]["accuracy"] < 0.2 < records[-1]["accuracy"]      # untrained, then above chance
    checkpoint = torch.load(tmp_path / name / "checkpoint.pt", weights_only=True)
    return records, checkpoint


@pytest.mark.parametrize("cls, shared_floats", [(FedPer, 43_576), (FedRep, 43_576), (LGFedAvg, 850)])
def test_split_methods_run_above_chance_and_count_only_the_shared_part(cls, shared_floats, tmp_path):
    records, checkpoint = run(cls, tmp_path, "--sample_fraction", 0.67)
    for record in records:
        # --eval local: every client receives the shared part each round (the evaluation-only one too)
        assert record["bytes_downloaded_per_client"] == [4 * shared_floats] * 3
    for record in records[:-1]:
        # the two sampled clients send back the shared part and their sample count, nothing else
        assert record["bytes_uploaded_per_client"] == [4 * shared_floats + 8] * 2
        assert record["bytes_uploaded_by_kind"] == {"weights": 2 * 4 * shared_floats, "num_samples": 16}
    assert records[-1]["bytes_uploaded"] == 0
    states = list(checkpoint["client_states"].values())
    assert all(set(state) <= {cls.personal_part} for state in states) and any(states)


def test_ditto_runs_above_chance_and_reports_personal_and_global_series(tmp_path):
    records, checkpoint = run(Ditto, tmp_path, "--ditto_mu", 0.1)
    assert all("accuracy_global" in record and len(record["client_accuracies_global"]) == 3 for record in records)
    assert records[0]["accuracy"] == records[0]["accuracy_global"]          # round 0: v = w = the initial model
    assert records[-1]["accuracy"] != records[-1]["accuracy_global"]
    assert all(record["bytes_uploaded_per_client"] == [4 * 44_426 + 8] * 3 for record in records[:-1])
    assert all(set(state) == {"personal"} for state in checkpoint["client_states"].values())
