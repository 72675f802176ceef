"""HyperFL (hyperfl.py): the reference's target CNN and hypernetwork sizes, the functional forward
against loading the generated weights and the reference's hand-made chain rule, the two-phase
round (which parameters each phase trains, with which optimiser, clipping phi and v separately),
hypernetwork-only upload and averaging, the two evaluation series (HyperFL and its FedAvg
baseline), the hypernetwork-aware attacker against autograd and against a real upload, the
--partition hyperfl data setting (counts by hand, per-client test splits), and short runs:
above chance, bytes, resume = uninterrupted."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import cvdataset
from conftest import (algorithm_args, assert_resume_equals_uninterrupted, assert_same_tensors,
                      interrupt_after, random_client_side, records_of)
from engine import ClientContext, ServerContext, main, payload_bytes, weighted_average
from engine.data import load_federated_data
from engine.executors import run_client
from hyperfl import (FedAvgTrained, GroupClippedSGD, HyperFL, HyperFLClient, HyperNetwork, extractor_shapes,
                     recover_extractor_gradient)
from models import BaseHeadSplit, build_model, count_parameters, register_model

torch.set_num_threads(1)


class TinyBase(nn.Module):
    """conv(1->4,5) pool4, fc 144->16 leaky ReLU: 2,424 extractor parameters (a 321,016-float hypernetwork)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 5)
        self.fc = nn.Linear(144, 16)

    def forward(self, x):
        return F.leaky_relu(self.fc(F.max_pool2d(self.conv(x), 4).flatten(1)))


register_model("hyperfl-test-tiny", lambda num_classes: BaseHeadSplit(TinyBase(), 16, num_classes), (1, 28, 28))
TINY_HYPERNETWORK = 129 * 2_424 + 65 * 128


def hypernetwork_size(model, embed_dim=64, hidden_dim=128):
    return count_parameters(HyperNetwork(extractor_shapes(model), embed_dim, hidden_dim, device="meta"))


# ----------------------------------------------------------------------------- models

def test_the_target_cnn_and_hypernetwork_sizes_are_the_references():
    model = build_model("hyperfl-cnn", 10, (1, 28, 28))
    assert count_parameters(model) == 117_066 and model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    assert extractor_shapes(model) == {"base.conv1.weight": (16, 1, 5, 5), "base.conv1.bias": (16,),
                                       "base.conv2.weight": (32, 16, 5, 5), "base.conv2.bias": (32,),
                                       "base.fc1.weight": (128, 800), "base.fc1.bias": (128,)}
    assert hypernetwork_size(model) == 14_943_424                       # spec section 3 (FMNIST)
    assert hypernetwork_size(build_model("simplecnn-mnist", 10)) == 5_629_624
    assert hypernetwork_size(build_model("hyperfl-test-tiny", 10)) == TINY_HYPERNETWORK


def tiny_client(seed=0, embed_dim=3, hidden_dim=5):
    torch.manual_seed(seed)
    target = build_model("hyperfl-test-tiny", 10)
    client = HyperFLClient(target, HyperNetwork(extractor_shapes(target), embed_dim, hidden_dim), embed_dim)
    with torch.no_grad():
        client.embedding.normal_()
    return client


def test_functional_forward_is_the_loaded_model_and_its_gradients_the_references_chain_rule():
    client = tiny_client()
    x, y = torch.randn(6, 1, 28, 28), torch.arange(6)
    loss = F.cross_entropy(client(x), y)
    loss.backward()
    # the reference: load the generated weights into the net, autograd.grad to them, then a
    # vector-Jacobian product through the hypernetwork into phi and into v
    loaded = build_model("hyperfl-test-tiny", 10)
    generated = client.extractor()
    loaded.load_state_dict({**{k: v.detach() for k, v in generated.items()},
                            **{k: v for k, v in client.target.state_dict().items() if k.startswith("head.")}})
    reference_loss = F.cross_entropy(loaded(x), y)
    assert torch.equal(loss, reference_loss)
    to_theta = torch.autograd.grad(reference_loss, [loaded.get_parameter(k) for k in generated])
    phi = list(client.hypernetwork.parameters())
    expected = torch.autograd.grad(list(generated.values()), phi + [client.embedding], grad_outputs=to_theta)
    for found, wanted in zip([p.grad for p in phi] + [client.embedding.grad], expected):
        torch.testing.assert_close(found, wanted, rtol=1e-5, atol=1e-7)


def test_group_clipped_sgd_clips_each_group_alone_then_adds_weight_decay():
    a, b = torch.zeros(2, requires_grad=True), torch.ones(2, requires_grad=True)
    a.grad, b.grad = torch.tensor([3.0, 4.0]), torch.tensor([0.6, 0.8])      # norms 5 and 1
    GroupClippedSGD([{"params": [a]}, {"params": [b]}], 0.5, lr=1.0, momentum=0.5, weight_decay=0.1).step()
    assert torch.allclose(a.detach(), torch.tensor([-0.3, -0.4]))             # clipped to 0.5, wd * 0
    assert torch.allclose(b.detach(), 1 - (torch.tensor([0.3, 0.4]) + 0.1))  # clipped to 0.5, + wd * 1


# ----------------------------------------------------------------------------- a client's round

FLAGS = ["--model", "hyperfl-test-tiny", "--eval", "local", "--lr", 0.05, "--momentum", 0.5, "--reg", 5e-4]


def test_a_round_trains_the_classifier_alone_then_phi_and_v_and_uploads_phi_only(monkeypatch):
    algorithm, data = random_client_side(HyperFL, *FLAGS, "--epochs", 2)      # clients of 20 and 12, batch 8
    calls = []
    real_train = HyperFL.train

    def spy(self, ctx, model, parameters, steps, loss=None, optimizer=None):
        before = {k: v.detach().clone() for k, v in model.named_parameters()}
        metrics = real_train(self, ctx, model, parameters, steps, loss, optimizer)
        after = dict(model.named_parameters())
        calls.append((steps, optimizer, {k for k in before if not torch.equal(before[k], after[k])}))
        return metrics
    monkeypatch.setattr(HyperFL, "train", spy)
    server_state = algorithm.init_server(algorithm.setting.initial_weights["hyperfl-test-tiny"])
    download = algorithm.download(server_state, 0)
    result = run_client(algorithm, data, download, {}, 0, 0)

    (classifier_steps, first, changed_first), (steps, second, changed_second) = calls
    assert classifier_steps == 3 and steps == 2 * 3 == result.metrics["steps"]      # 1 and 2 passes of ceil(20 / 8)
    assert changed_first == {"target.head.weight", "target.head.bias"}
    assert type(first) is torch.optim.SGD
    assert (first.defaults["lr"], first.defaults["momentum"], first.defaults["weight_decay"]) == (0.1, 0.5, 5e-4)
    phi = {"hypernetwork." + k for k in download["hypernetwork"]}
    assert changed_second == phi | {"embedding"}                               # the classifier is frozen
    assert isinstance(second, GroupClippedSGD) and second.max_norm == 50.0
    assert (second.defaults["lr"], second.defaults["momentum"], second.defaults["weight_decay"]) == (0.05, 0.5, 5e-4)
    assert [len(g["params"]) for g in second.param_groups] == [len(download["hypernetwork"]), 1]

    assert set(result.upload) == {"hypernetwork"}
    assert payload_bytes(result.upload) == 4 * TINY_HYPERNETWORK
    assert set(result.state) == {"embedding", "classifier", "trained_extractor"}
    assert set(result.state["classifier"]) == {"head.weight", "head.bias"}
    client = algorithm.client_model(ClientContext(0, 1, {"hypernetwork": result.upload["hypernetwork"]},
                                                  result.state, data.clients[0], None, "hyperfl-test-tiny"))
    assert_same_tensors(result.state["trained_extractor"], {k: v.detach() for k, v in client.extractor().items()})


def test_phase_two_clips_the_hypernetwork_and_the_embedding_separately():
    """One step, no weight decay: each of phi and v moves by exactly lr * clip."""
    algorithm, data = random_client_side(HyperFL, *FLAGS, "--reg", 0, "--lr", 0.5, "--hypernet_clip", 1e-3,
                                         "--num_local_iterations", 1)
    download = algorithm.download(algorithm.init_server(algorithm.setting.initial_weights["hyperfl-test-tiny"]), 0)
    result = run_client(algorithm, data, download, {}, 0, 0)
    phi_step = torch.cat([(result.upload["hypernetwork"][k] - value).flatten()
                          for k, value in download["hypernetwork"].items()])
    v_step = result.state["embedding"] - algorithm.initial_embedding
    assert phi_step.norm().item() == pytest.approx(0.5 * 1e-3, rel=1e-3)
    assert v_step.norm().item() == pytest.approx(0.5 * 1e-3, rel=1e-3)


def test_the_server_averages_phi_by_samples_and_keeps_nothing_else():
    algorithm, data = random_client_side(HyperFL, *FLAGS)
    server_state = algorithm.init_server(algorithm.setting.initial_weights["hyperfl-test-tiny"])
    results = [run_client(algorithm, data, algorithm.download(server_state, k), {}, k, 0) for k in range(2)]
    new_state = algorithm.server_update(server_state, results, ServerContext(0, torch.Generator(), torch.device("cpu")))
    assert set(new_state) == {"hypernetwork"}
    assert_same_tensors(weighted_average([r.upload["hypernetwork"] for r in results], [20, 12]),
                        new_state["hypernetwork"])
    assert HyperFL.broadcast_to_all and algorithm.download(new_state, 1)["hypernetwork"] is new_state["hypernetwork"]


# ----------------------------------------------------------------------------- evaluation series

def test_hyperfl_reports_the_trained_model_and_the_downloaded_one():
    algorithm, data = random_client_side(HyperFL, *FLAGS)
    initial = algorithm.init_server(algorithm.setting.initial_weights["hyperfl-test-tiny"])
    fresh = ClientContext(0, 0, algorithm.download(initial, 0), {}, data.clients[0], None, "hyperfl-test-tiny")
    series = algorithm.evaluation_model(fresh)
    assert series["trained"] is series["downloaded"]                 # before any training: the initial model
    results = [run_client(algorithm, data, algorithm.download(initial, k), {}, k, 0) for k in range(2)]
    averaged = algorithm.server_update(initial, results, None)
    state = results[1].state
    series = algorithm.evaluation_model(ClientContext(1, 1, algorithm.download(averaged, 1), state, data.clients[1],
                                                      None, "hyperfl-test-tiny"))
    assert_same_tensors({**state["trained_extractor"], **state["classifier"]}, series["trained"].state_dict())
    regenerated = algorithm.client_model(ClientContext(1, 1, {"hypernetwork": averaged["hypernetwork"]}, state,
                                                       data.clients[1], None, "hyperfl-test-tiny")).extractor()
    downloaded = series["downloaded"].state_dict()
    assert all(torch.equal(downloaded[k], v) for k, v in regenerated.items())
    assert not torch.equal(downloaded["base.fc.weight"], state["trained_extractor"]["base.fc.weight"])
    assert torch.equal(downloaded["head.weight"], state["classifier"]["head.weight"])


def test_fedavg_baseline_reports_its_last_local_model_and_the_global_one():
    algorithm, data = random_client_side(FedAvgTrained, *FLAGS)
    initial = algorithm.init_server(algorithm.setting.initial_weights["hyperfl-test-tiny"])
    results = [run_client(algorithm, data, algorithm.download(initial, k), {}, k, 0) for k in range(2)]
    averaged = algorithm.server_update(initial, results, None)
    series = algorithm.evaluation_model(ClientContext(0, 1, algorithm.download(averaged, 0), results[0].state,
                                                      data.clients[0], None, "hyperfl-test-tiny"))
    assert_same_tensors(results[0].upload["weights"], series["trained"].state_dict())
    assert_same_tensors(averaged["weights"], series["downloaded"].state_dict())


# ----------------------------------------------------------------------------- the attacker

@pytest.mark.parametrize("clip_scale", [1.0, 0.5])       # the clip scales the gradient and nothing else
def test_the_attacker_recovers_gradient_hidden_extractor_and_embedding_of_one_step(clip_scale):
    client = tiny_client(seed=1)
    shapes = client.hypernetwork.shapes
    downloaded = {k: v.detach().clone() for k, v in client.hypernetwork.state_dict().items()}
    v0 = client.embedding.detach().clone()
    x, y = torch.randn(4, 1, 28, 28), torch.tensor([1, 3, 3, 7])
    theta = client.extractor()
    h = client.hypernetwork.mlp(client.embedding).detach()
    loss = F.cross_entropy(client(x, theta), y)
    to_theta = torch.autograd.grad(loss, list(theta.values()), retain_graph=True)
    loss.backward()
    phi = list(client.hypernetwork.parameters())
    norm = torch.cat([p.grad.flatten() for p in phi]).norm().item()
    optimizer = GroupClippedSGD([{"params": phi}, {"params": [client.embedding]}], clip_scale * norm,
                                lr=0.05, momentum=0.5, weight_decay=5e-4)
    optimizer.step()
    recovered = recover_extractor_gradient({"hypernetwork": downloaded}, client.hypernetwork.state_dict(),
                                           0.05, 5e-4, shapes)
    for (name, wanted), found in zip(zip(shapes, to_theta), recovered["gradient"].values()):
        torch.testing.assert_close(found.float(), clip_scale * wanted, rtol=2e-3, atol=1e-6)
    torch.testing.assert_close(recovered["hidden"].float(), h, rtol=2e-3, atol=1e-5)
    torch.testing.assert_close(recovered["embedding"].float(), v0, rtol=2e-3, atol=1e-4)
    for name, value in recovered["extractor"].items():
        torch.testing.assert_close(value.float(), theta[name].detach(), rtol=2e-3, atol=1e-5)


def test_the_attacker_reads_the_private_embedding_and_extractor_from_a_real_one_step_upload():
    algorithm, data = random_client_side(HyperFL, "--model", "simplecnn-mnist", "--eval", "local",
                                         "--num_local_iterations", 1, "--lr", 0.02, "--momentum", 0.5, "--reg", 5e-4)
    download = algorithm.download(algorithm.init_server(algorithm.setting.initial_weights["simplecnn-mnist"]), 0)
    result = run_client(algorithm, data, download, {}, 0, 0)
    recovered = recover_extractor_gradient(download, result.upload, 0.02, 5e-4, algorithm.shapes)
    torch.testing.assert_close(recovered["embedding"].float(), algorithm.initial_embedding, rtol=1e-2, atol=1e-2)
    client = algorithm.client_model(ClientContext(0, 0, download, {}, data.clients[0], None, "simplecnn-mnist"))
    with torch.no_grad():
        truth = client.extractor()           # H(v0; downloaded phi): the extractor of the step
    for name, value in recovered["extractor"].items():
        torch.testing.assert_close(value.float(), truth[name], rtol=1e-2, atol=1e-3)


# ----------------------------------------------------------------------------- the data setting

def test_hyperfl_partition_gives_the_references_counts_and_wraps_around_a_class():
    labels = np.repeat(np.arange(10), 700)
    np.random.seed(0)
    parts = cvdataset.partition_data(labels, "hyperfl", 7, 0.5, 10)
    counts = np.array(cvdataset.class_counts(labels, parts, 10))
    for k, row in enumerate(counts):
        expected = np.full(10, 12)
        expected[[(2 * (k % 5) + i) % 10 for i in range(3)]] += 160          # 120 evenly, 480 over three classes
        assert row.tolist() == expected.tolist() and len(set(parts[k])) == 600
    # class 2 is asked for 172 by clients 0, 1 and 5 and 12 by clients 2-4 and 6 (564 of 700), then for
    # 160 more by client 6: it starts again from its first image, client 0's 12 + 148
    shared = set(parts[6]) & set(parts[0])
    assert len(shared) == 160 and set(labels[list(shared)]) == {2}
    assert len(set(np.concatenate(parts).tolist())) == 7 * 600 - 160
    np.random.seed(0)
    assert cvdataset.partition_data(labels, "hyperfl", 7, 0.5, 10) == parts            # seeded
    np.random.seed(1)
    other = cvdataset.partition_data(labels, "hyperfl", 7, 0.5, 10)
    assert other != parts and cvdataset.class_counts(labels, other, 10) == counts.tolist()
    with pytest.raises(cvdataset.UsageError, match="even number of classes"):
        cvdataset.partition_data(np.repeat(np.arange(5), 10), "hyperfl", 2, 0.5, 5)


def test_eval_local_gives_each_client_600_training_and_600_test_images_of_its_skew():
    dataset = cvdataset.load_dataset("fashionmnist")
    args = algorithm_args(HyperFL, "--partition", "hyperfl", "--eval", "local", "--n_parties", 20)
    data = load_federated_data(args, torch.device("cpu"), dataset)
    test_images = []
    for k, client in enumerate(data.clients):
        assert client.num_samples == 600 and len(client.test_labels) == 600
        for labels in (client.labels, client.test_labels):
            counts = torch.bincount(labels, minlength=10)
            assert sorted(counts.tolist()) == [12] * 7 + [172] * 3
            assert set(torch.nonzero(counts == 172).flatten().tolist()) == {(2 * (k % 5) + i) % 10 for i in range(3)}
        assert all(int(i) < 60_000 for i in data.client_indices[k])                   # from the training set
        test_images.append(client.test_images)
    # 20 x 600 > 10,000 test images: classes 0, 2, 4, 6 and 8 (1,520 asked of 1,000) repeat across clients
    assert len(torch.unique(torch.cat(test_images).flatten(1), dim=0)) < 12_000
    match = (dataset.test_images.flatten(1) == data.clients[0].test_images[0].flatten()).all(1)
    assert match.any() and dataset.test_labels[match][0] == data.clients[0].test_labels[0]
    args = algorithm_args(HyperFL, "--partition", "hyperfl", "--n_parties", 20)       # --eval global
    data_global = load_federated_data(args, torch.device("cpu"), dataset)
    assert data_global.clients[3].test_labels is None and len(data_global.test_labels) == 10_000
    assert [list(i) for i in data_global.client_indices] == [list(i) for i in data.client_indices]


# ----------------------------------------------------------------------------- short runs

RUN = ["--partition", "hyperfl", "--n_parties", 3, "--epochs", 1, "--batch_size", 50, "--no_augment",
       "--comm_round", 3, "--threads", 1, *FLAGS]


def run(cls, tmp_path, name, *flags, observers=()):
    status = main(cls, [*map(str, RUN), *map(str, flags), "--logdir", str(tmp_path), "--log_file_name", name],
                  observers=observers)
    return status, tmp_path / name




def test_hyperfl_runs_above_chance_sends_only_phi_and_resumes_as_if_uninterrupted(tmp_path):
    status, whole = run(HyperFL, tmp_path, "whole")
    assert status == 0
    records = records_of(whole)
    assert [r["round"] for r in records] == [0, 1, 2, 3] and records[-1]["evaluation_only"]
    assert records[0]["accuracy"] == records[0]["accuracy_downloaded"]          # round 0: the untrained model
    assert records[-1]["accuracy"] > 0.5 and records[-1]["accuracy"] != records[-1]["accuracy_downloaded"]
    assert all(r["bytes_downloaded_per_client"] == [4 * TINY_HYPERNETWORK] * 3 for r in records)
    assert all(r["bytes_uploaded_by_kind"] == {"hypernetwork": 3 * 4 * TINY_HYPERNETWORK, "num_samples": 24}
               for r in records[:-1])
    assert all(set(r["client_metrics"]["0"]) == {"classifier_loss"} for r in records[:-1])

    status, interrupted = run(HyperFL, tmp_path, "interrupted", observers=[interrupt_after(1)])
    assert status == 130
    assert_resume_equals_uninterrupted(HyperFL, whole, interrupted, {"hypernetwork"})


def test_fedavg_baseline_runs_and_scores_its_trained_models(tmp_path):
    status, run_dir = run(FedAvgTrained, tmp_path, "fedavg")
    assert status == 0
    records = records_of(run_dir)
    assert records[0]["accuracy"] == records[0]["accuracy_downloaded"]
    assert records[-1]["accuracy"] > 0.5 and records[-1]["accuracy"] != records[-1]["accuracy_downloaded"]


def test_hyperfl_runs_on_the_suites_dirichlet_setting(tmp_path):
    status, run_dir = run(HyperFL, tmp_path, "dirichlet", "--partition", "noniid", "--beta", 0.1, "--epochs", 0,
                          "--num_local_iterations", 2, "--comm_round", 1)
    assert status == 0
    records = records_of(run_dir)
    assert records[0]["bytes_uploaded_per_client"] == [4 * TINY_HYPERNETWORK + 8] * 3
    assert len(records[1]["client_accuracies"]) == 3 and records[1]["evaluation_only"]


def test_bad_flags_end_in_one_line(tmp_path, capsys):
    for flags, message in ((["--eval", "global"], "run it with --eval local"),
                           (["--client_models", "simplecnn-mnist,fedavgcnn"], "drop --client_models"),
                           (["--optimizer", "adam"], "drop --optimizer adam"),
                           (["--hypernet_clip", 0], "--hypernet_clip must be > 0"),
                           (["--hypernet_hidden_dim", 100_000], "needs a hypernetwork of 248,902,424 parameters")):
        assert main(HyperFL, [*map(str, RUN), *map(str, flags), "--logdir", str(tmp_path)]) == 2
        assert message in capsys.readouterr().err


def test_the_privacy_probe_attacks_hyperfl_through_its_recovered_extractor_gradient(tmp_path):
    # the harness (privacy.py) calls HyperFL.privacy_surface: target = the extractor gradient read
    # from one step's phi delta; two attackers: the classifier fitted from the initial head, and
    # the client's classifier handed over (an oracle, labelled)
    status, run_dir = run(HyperFL, tmp_path, "attacked", "--comm_round", 2, "--privacy_rounds", 1,
                          "--privacy_attacks", "ig", "--privacy_preset", "library", "--privacy_iterations", 20)
    assert status == 0
    records = [json.loads(line) for line in open(run_dir / "privacy.jsonl")]
    assert [r["variant"] for r in records] == ["initial-classifier", "oracle-classifier"]
    assert all(r["target"] == "extractor_gradient" for r in records) and "oracle" in records[1]["target_note"]
    assert all(np.isfinite(r["psnr_mean"]) for r in records)
    import privacy
    assert privacy.algorithm_label({**records[1], "run": "attacked"}) == "hyperfl [oracle-classifier]"
    assert privacy.display_label("hyperfl [oracle-classifier]") == "HyperFL [oracle-classifier]"
    assert privacy.labels_in_order({"hyperfl [b]", "fedavg", "hyperfl [a]", "moon"}) == \
        ["fedavg", "moon", "hyperfl [a]", "hyperfl [b]"]
