"""FedProto, FedTGP, FedGH and Local (algorithms/heterogeneous/) against hand values: per-class
prototype means and their aggregation (unweighted as the reference, or by class counts as the
paper), the prototype regulariser, nearest-prototype prediction, FedTGP's adaptive margin and one
step of its generator, FedGH's server-trained head; what each client sends (prototypes: a few
hundred bytes to a few kilobytes, where the models are hundreds of kilobytes; Local: nothing);
one short --eval local run of each over light4 ending above chance; a FedTGP run interrupted and
resumed that equals the uninterrupted one."""
import dataclasses
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import cvdataset
import models
from conftest import (assert_resume_equals_uninterrupted, assert_same_tensors, interrupt_after,
                      random_client_side, records_of)
from algorithms.heterogeneous.common import (ClassMeans, NearestPrototype, aggregate_prototypes, class_prototypes,
                                             model_prototypes, prototype_regulariser, prototype_table)
from algorithms.heterogeneous.fedgh import FedGH
from algorithms.heterogeneous.fedproto import FedProto
from algorithms.heterogeneous.fedtgp import FedTGP, PrototypeGenerator, adaptive_margin, train_generator
from algorithms.heterogeneous.local import Local
from engine import ClientContext, ClientResult, ServerContext, main, payload_bytes
from engine.executors import run_client

torch.set_num_threads(1)

D = 84                            # light4's feature size
LIGHT_LENET_FLOATS = 44_426


def make_algorithm(cls, *flags, sizes=(20, 12), client_models="light4"):
    """(algorithm, data): `cls` over random Fashion-MNIST-shaped images, one client per size,
    labels 0..9 in turn (every client holds every class)."""
    return random_client_side(cls, "--client_models", client_models, *flags, sizes=sizes)


def server_context(round_index=0):
    return ServerContext(round_index, torch.Generator().manual_seed(0), torch.device("cpu"))


def result(client_id, **upload):
    return ClientResult(client_id, 10, upload, {}, {}, [])


def identity_model(dim, num_classes):
    """features(x) = x (x of shape [B, dim]), head Linear(dim -> num_classes) with zero weights."""
    model = models.BaseHeadSplit(nn.Flatten(), dim, num_classes)
    with torch.no_grad():
        model.head.weight.zero_(), model.head.bias.zero_()
    return model


def t(*rows):
    """A float32 matrix of the given rows."""
    return torch.tensor(rows, dtype=torch.float32)


def v(*values):
    """A float32 vector."""
    return torch.tensor(values, dtype=torch.float32)


# ----------------------------------------------------------------------------- prototypes and their mean

def test_class_means_and_their_aggregation_unweighted_or_by_class_counts():
    z, y = t([1, 2], [3, 4], [5, 6], [7, 8], [0, 1]), torch.tensor([0, 1, 0, 1, 3])
    assert_same_tensors({0: v(3, 4), 1: v(5, 6), 3: v(0, 1)}, class_prototypes(z, y, 4))
    means = ClassMeans(4)                            # accumulated over batches: the same means
    means.add(z[:2], y[:2]), means.add(z[2:], y[2:])
    assert_same_tensors(class_prototypes(z, y, 4), means.means())
    assert ClassMeans(4).means() == {}

    a, b = {0: v(0, 0), 1: v(2, 2)}, {0: v(4, 0), 2: v(1, 1)}
    # reference: (1/|K_c|) sum over the clients holding c
    assert_same_tensors({0: v(2, 0), 1: v(2, 2), 2: v(1, 1)}, aggregate_prototypes([a, b]))
    # paper: weighted by |D_k,c| (client a holds 1 sample of class 0, client b 3)
    counts = torch.tensor([[1, 5, 0], [3, 0, 2]])
    assert_same_tensors({0: v(3, 0), 1: v(2, 2), 2: v(1, 1)}, aggregate_prototypes([a, b], counts))


@pytest.mark.parametrize("weighting, expected", [("uniform", [2.0, 0.0]), ("class_counts", [3.0, 0.0])])
def test_fedproto_server_replaces_the_global_prototypes_by_the_mean_of_the_uploads(weighting, expected):
    algorithm, _ = make_algorithm(FedProto, "--proto_weighting", weighting)
    algorithm.setting.class_counts = torch.tensor([[1, 5] + [0] * 8, [3, 0] + [0] * 8])
    state = algorithm.init_server(None)
    assert state == {"weights": {}, "prototypes": {}} and algorithm.download(state, 0) == {}    # nothing before round 0
    state["prototypes"] = {7: torch.ones(2)}         # last round's: classes nobody uploads now drop out
    uploads = [result(0, prototypes={0: v(0, 0), 1: v(2, 2)}), result(1, prototypes={0: v(4, 0)})]
    state = algorithm.server_update(state, uploads, server_context())
    assert_same_tensors({0: torch.tensor(expected), 1: v(2, 2)}, state["prototypes"])
    assert payload_bytes(algorithm.download(state, 1)) == 2 * 2 * 4


def test_regulariser_pulls_only_samples_whose_class_has_a_global_prototype():
    z = t([1, 1], [2, 0]).requires_grad_()
    table, present = prototype_table({0: v(0, 1)}, 3, 2)
    loss = prototype_regulariser(z, torch.tensor([0, 2]), table, present)
    # T = [[0, 1], z_1 detached]: ((1 - 0)^2 + 0 + 0 + 0) / (B * D = 4)
    assert loss.item() == pytest.approx(0.25)
    loss.backward()
    assert torch.allclose(z.grad, t([0.5, 0.0], [0.0, 0.0]))      # 2 (z - T) / 4, nothing for class 2


def test_fedproto_loss_is_ce_plus_lambda_mse_and_uploads_the_means_of_the_features_seen():
    algorithm, _ = make_algorithm(FedProto, "--proto_lambda", 2)
    model = identity_model(2, 3)                      # logits 0: CE = ln 3
    ctx = SimpleNamespace(download={"prototypes": {0: v(0, 1)}})
    algorithm.prepare_client(ctx, model)
    first = algorithm.local_loss(model, t([1, 1], [2, 0]), torch.tensor([0, 2]), ctx)
    assert first.item() == pytest.approx(math.log(3) + 2 * 0.25, rel=1e-6)
    algorithm.local_loss(model, t([3, 3]), torch.tensor([0]), ctx)
    sent = algorithm.upload(ctx, model)
    assert_same_tensors({"prototypes": {0: v(2, 2), 2: v(2, 0)}}, sent)
    assert payload_bytes(sent) == 2 * 2 * 4
    fresh = SimpleNamespace(download={})              # before the first prototypes: CE alone
    algorithm.prepare_client(fresh, model)
    assert algorithm.local_loss(model, t([1, 1]), torch.tensor([0]), fresh).item() == pytest.approx(math.log(3))


def test_nearest_prototype_predicts_the_class_of_the_closest_prototype_and_nothing_without_one():
    predictor = NearestPrototype(identity_model(2, 3), {0: v(0, 0), 2: v(3, 3)}, 3)
    scores = predictor(t([1, 1], [2, 2.5]))
    # -MSE: x_0 to P_0 (1 + 1) / 2, to P_2 (4 + 4) / 2; x_1 to P_0 (4 + 6.25) / 2, to P_2 (1 + 0.25) / 2
    assert torch.allclose(scores[:, [0, 2]], t([-1.0, -4.0], [-5.125, -0.625]))
    assert torch.isinf(scores[:, 1]).all() and scores.argmax(1).tolist() == [0, 2]
    nothing = NearestPrototype(identity_model(2, 3), {}, 3)(t([1, 1], [0, 0]))
    assert nothing.argmax(1).tolist() == [3, 3]                 # no class: 0 correct (round 0)


# ----------------------------------------------------------------------------- FedTGP

def test_fedtgp_margin_is_the_largest_class_gap_capped_by_tau():
    uploads = [{0: v(0, 0), 1: v(1, 3)}, {0: v(2, 0), 2: v(5, 0)}]
    # Q_0 = (1, 0), Q_1 = (1, 3), Q_2 = (5, 0): |Q_0 Q_1| = 3, |Q_0 Q_2| = 4, |Q_1 Q_2| = 5;
    # gaps 3, 3, 4; class 3 uploaded by nobody gets min gap 3; margin = min(max gap 4, tau)
    margin, gap = adaptive_margin(uploads, 4, 100.0)
    assert margin == pytest.approx(4.0) and torch.allclose(gap, torch.tensor([3.0, 3.0, 4.0, 3.0], dtype=gap.dtype))
    assert adaptive_margin(uploads, 4, 3.5)[0] == pytest.approx(3.5)
    assert adaptive_margin([{1: v(1, 1)}], 4, 7.0)[0] == pytest.approx(7.0)     # one class: tau


def test_fedtgp_generator_step_follows_the_margin_loss_by_hand():
    generator = PrototypeGenerator(2, 2)
    with torch.no_grad():              # P^_c = fc(relu(middle(e_c))) = e_c: P^_0 = (1, 0), P^_1 = (0, 1)
        generator.embedings.weight.copy_(torch.eye(2))
        generator.middle[0][0].weight.copy_(torch.eye(2)), generator.middle[0][0].bias.zero_()
        generator.fc.weight.copy_(torch.eye(2)), generator.fc.bias.zero_()
    prototypes, labels, margin, lr = t([2, 0], [0, 3]), torch.tensor([0, 1]), 1.0, 0.1
    # d = [[1, sqrt 5], [sqrt 10, 2]]; scores s = -(d + margin onehot(y))
    d = [[1.0, math.sqrt(5)], [math.sqrt(10), 2.0]]
    s = [[-(d[0][0] + margin), -d[0][1]], [-d[1][0], -(d[1][1] + margin)]]
    p = [[math.exp(v) / sum(math.exp(u) for u in row) for v in row] for row in s]
    loss = -(math.log(p[0][0]) + math.log(p[1][1])) / 2
    # dL/dP^_c = sum_i (p_ic - [c = y_i]) / N * -(P^_c - P_i) / d_ic; the fc bias moves by -lr sum_c dL/dP^_c
    centres, points = [[1.0, 0.0], [0.0, 1.0]], [[2.0, 0.0], [0.0, 3.0]]
    grad = [0.0, 0.0]
    for i in range(2):
        for c in range(2):
            coefficient = (p[i][c] - (c == labels[i].item())) / 2 / d[i][c]
            for j in range(2):
                grad[j] -= coefficient * (centres[c][j] - points[i][j])
    last = train_generator(generator, prototypes, labels, margin, 1, 2, lr, torch.Generator().manual_seed(0))
    assert last == pytest.approx(loss, rel=1e-6)
    assert torch.allclose(generator.fc.bias, torch.tensor([-lr * grad[0], -lr * grad[1]]), atol=1e-7)


def test_fedtgp_clients_upload_class_means_and_the_server_sends_a_generated_prototype_per_class():
    algorithm, data = make_algorithm(FedTGP, "--tgp_server_epochs", 3)
    state = algorithm.init_server(None)
    assert set(state) == {"weights", "prototypes", "generator"} and algorithm.download(state, 0) == {}
    assert sum(v.numel() for v in state["generator"].values()) == 10 * D + 2 * (D * D + D)
    results = [run_client(algorithm, data, algorithm.download(state, k), {}, k, 0) for k in range(2)]
    for k, sent in enumerate(results):
        assert set(sent.upload) == {"prototypes"} and sorted(sent.upload["prototypes"]) == list(range(10))
        assert payload_bytes(sent.upload) == 10 * D * 4              # 3,360 bytes
        model = algorithm.frozen_model("check", algorithm.architecture(k), sent.state["local_model"])
        assert_same_tensors(model_prototypes(model, data.clients[k], 10), sent.upload["prototypes"])
    assert payload_bytes(results[0].upload) < 0.02 * 4 * LIGHT_LENET_FLOATS      # vs. client 0's weights
    server = server_context()
    state = algorithm.server_update(state, results, server)
    assert server.log_lines[0].startswith("FedTGP server: 20 client prototypes, margin ")
    generator = PrototypeGenerator(10, D)
    generator.load_state_dict(state["generator"])
    with torch.no_grad():
        generated = generator(torch.arange(10))
    assert_same_tensors({c: generated[c] for c in range(10)}, state["prototypes"])
    assert payload_bytes(algorithm.download(state, 0)) == 10 * D * 4


def test_fedtgp_stale_prototypes_are_those_of_the_model_before_training():
    algorithm, data = make_algorithm(FedTGP, "--tgp_stale_prototypes")
    sent = run_client(algorithm, data, {}, {}, 1, 0)
    initial = algorithm.frozen_model("check", "light-mlp", algorithm.setting.initial_weights["light-mlp"])
    assert_same_tensors(model_prototypes(initial, data.clients[1], 10), sent.upload["prototypes"])


# ----------------------------------------------------------------------------- FedGH

def test_fedgh_server_trains_its_head_on_the_prototypes_by_hand():
    algorithm, _ = make_algorithm(FedGH, "--gh_server_lr", 1.0, "--gh_server_epochs", 1, "--batch_size", 8)
    state = {"weights": {}, "head": {"weight": torch.zeros(10, 2), "bias": torch.zeros(10)}}
    uploads = [result(0, prototypes={0: v(1, 0)}), result(1, prototypes={1: v(0, 1)})]
    state = algorithm.server_update(state, uploads, server_context())
    # logits 0: softmax 1/10; dL/dW = mean_i (p_i - onehot(y_i)) P_i^T, dL/db = mean_i (p_i - onehot(y_i))
    weight = torch.zeros(10, 2)
    weight[:, 0] -= 0.1 / 2
    weight[:, 1] -= 0.1 / 2
    weight[0, 0] += 1 / 2
    weight[1, 1] += 1 / 2
    bias = torch.full((10,), -0.1)
    bias[:2] += 1 / 2
    assert torch.allclose(state["head"]["weight"], weight, atol=1e-7)
    assert torch.allclose(state["head"]["bias"], bias, atol=1e-7)


def test_fedgh_client_trains_its_base_under_the_global_head_and_uploads_the_trained_prototypes():
    algorithm, data = make_algorithm(FedGH)
    state = algorithm.init_server(None)
    initial = algorithm.setting.initial_weights
    assert_same_tensors({"weight": initial["light-lenet"]["head.weight"], "bias": initial["light-lenet"]["head.bias"]},
                        state["head"])                                    # client 0's initial head
    head = {"weight": torch.full((10, D), 0.01), "bias": torch.zeros(10)}
    state["head"] = head
    download = algorithm.download(state, 1)
    assert payload_bytes(download) == 4 * (10 * D + 10)
    composed = algorithm.compose_weights("light-mlp", download, {})
    assert torch.equal(composed["head.weight"], head["weight"])
    assert torch.equal(composed["base.mlp1.weight"], initial["light-mlp"]["base.mlp1.weight"])
    sent = run_client(algorithm, data, download, {}, 1, 0)
    trained = sent.state["local_model"]
    assert not torch.equal(trained["base.mlp1.weight"], initial["light-mlp"]["base.mlp1.weight"])
    model = algorithm.frozen_model("check", "light-mlp", trained)
    assert set(sent.upload) == {"prototypes"} and payload_bytes(sent.upload) == 10 * D * 4
    assert_same_tensors(model_prototypes(model, data.clients[1], 10), sent.upload["prototypes"])
    # reported: its own trained base with the (next) global head
    ctx = ClientContext(1, 1, download, sent.state, data.clients[1], torch.Generator(), "light-mlp")
    reported = algorithm.evaluation_model(ctx).state_dict()
    assert torch.equal(reported["head.weight"], head["weight"])
    assert torch.equal(reported["base.mlp1.weight"], trained["base.mlp1.weight"])


# ----------------------------------------------------------------------------- short real runs

@pytest.fixture
def small_fashion_mnist(monkeypatch):
    """Fashion-MNIST cut to its first 5,000 training and 1,000 test images (the runs stay short:
    FedTGP and FedGH pass over every client's training split each round)."""
    real = cvdataset.load_dataset
    cache = {}

    def load(name, datadir="./data/"):
        if name not in cache:
            full = real(name, datadir)
            cache[name] = dataclasses.replace(full, train_images=full.train_images[:5000],
                                              train_labels=full.train_labels[:5000],
                                              test_images=full.test_images[:1000], test_labels=full.test_labels[:1000])
        return cache[name]
    monkeypatch.setattr(cvdataset, "load_dataset", load)


RUN = ["--n_parties", 4, "--client_models", "light4", "--beta", 0.5, "--num_local_iterations", 25,
       "--batch_size", 16, "--lr", 0.03, "--comm_round", 3, "--threads", 1, "--eval", "local"]


def run(cls, tmp_path, *flags, name=None, observers=()):
    name = name or cls.name
    status = main(cls, [*map(str, RUN), *map(str, flags), "--logdir", str(tmp_path), "--log_file_name", name],
                  observers=observers)
    return status, tmp_path / name



@pytest.mark.parametrize("cls, flags", [(FedProto, ["--proto_lambda", 1]), (FedTGP, []),
                                        (FedGH, []), (Local, [])])
def test_short_runs_end_above_chance_and_send_what_each_method_shares(cls, flags, tmp_path, small_fashion_mnist):
    status, run_dir = run(cls, tmp_path, *flags)
    assert status == 0
    records = records_of(run_dir)
    assert [r["round"] for r in records] == [0, 1, 2, 3] and records[-1]["evaluation_only"]
    assert records[-1]["accuracy"] > 0.25
    states = torch.load(run_dir / "checkpoint.pt", weights_only=True)["client_states"]
    assert all(set(state) == {"local_model"} for state in states.values())       # whole personal models
    for record in records[:-1]:
        kinds = dict(record["bytes_uploaded_by_kind"])
        assert kinds.pop("num_samples") == 4 * 8
        if cls is Local:
            assert kinds == {} and record["bytes_downloaded"] == 0
            continue
        assert set(kinds) == {"prototypes"}
        # D floats for each class a client sent: at most 10 * 84 * 4 = 3,360 bytes, vs 177,704 for light-lenet
        assert all(8 + D * 4 <= b <= 8 + 10 * D * 4 for b in record["bytes_uploaded_per_client"])
        assert kinds["prototypes"] % (D * 4) == 0
    if cls is FedGH:
        assert all(r["bytes_downloaded_per_client"] == [4 * (10 * D + 10)] * 4 for r in records)
    elif cls is not Local:
        assert records[0]["accuracy"] == 0.0 and records[0]["bytes_downloaded"] == 0    # no prototypes yet
        assert "accuracy_own_head" in records[-1]
    if cls is FedTGP:
        assert all(r["bytes_downloaded_per_client"] == [10 * D * 4] * 4 for r in records[1:])


def test_prototype_methods_refuse_client_models_of_different_feature_sizes(tmp_path, small_fashion_mnist, capsys):
    assert main(FedProto, ["--client_models", "simplecnn-mnist,fedavgcnn", "--eval", "local", "--threads", "1",
                           "--logdir", str(tmp_path)]) == 2
    assert "differ (simplecnn-mnist 84, fedavgcnn 512)" in capsys.readouterr().err



def test_fedtgp_resumed_run_equals_the_uninterrupted_one(tmp_path, small_fashion_mnist):
    flags = ["--tgp_server_epochs", 5, "--num_local_iterations", 5, "--sample_fraction", 0.75]
    status, whole = run(FedTGP, tmp_path, *flags, name="whole")
    assert status == 0
    status, interrupted = run(FedTGP, tmp_path, *flags, name="interrupted", observers=[interrupt_after(1)])
    assert status == 130
    assert torch.load(interrupted / "checkpoint.pt", weights_only=True)["round"] == 0
    assert_resume_equals_uninterrupted(FedTGP, whole, interrupted, {"weights", "prototypes", "generator"})
