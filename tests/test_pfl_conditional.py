"""FedCP, GPFL and FedDBE (algorithms/personalised/): FedCP's MMD^2, Gumbel policy split, context and
head mixing against hand values and through a client's round; GPFL's conditional inputs (zero before
the first aggregation, then from the pre-overwrite GCE), its GCE loss and unsquared magnitude term;
FedDBE's running mean, mean regulariser, one-off consensus mean and PRBM evaluation; the tensors that
leave a client (bytes counted = the shared part only); and a short --eval local run of each on
Fashion-MNIST that ends above chance."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import algorithm_args, random_client_side
from algorithms.personalised.fedcp import FedCP, gumbel_split, mix_heads, mmd_rbf, policy_context
from algorithms.personalised.feddbe import FedDBE, RunningMean, mean_regulariser
from algorithms.personalised.gpfl import GPFL, conditional_inputs, gce_loss, magnitude_term
from engine import ClientContext, ServerContext, clone_weights, main, payload_bytes, split_head
from utils import UsageError

torch.set_num_threads(1)

BASE, HEAD = 43_576, 850            # simplecnn-mnist: floats in phi and in the head
CPN, GCE, COV = 14_616, 840, 14_616  # D = 84, C = 10: Linear(84->168)+LayerNorm(168); 10x84; 2 x (84x84+84+2x84)


def make_algorithm(cls, *flags, sizes=(20, 12), labels=None):
    """(algorithm, data): `cls` over random Fashion-MNIST-shaped images, one client per size."""
    return random_client_side(cls, *flags, sizes=sizes, labels=labels)


def context(algorithm, data, client_id, download, state=None, round_index=0, seed=0):
    return ClientContext(client_id, round_index, download, {} if state is None else state, data.clients[client_id],
                         torch.Generator().manual_seed(seed), algorithm.args.model)


def initial_of(algorithm):
    return algorithm.setting.initial_weights[algorithm.args.model]


def server():
    return ServerContext(0, torch.Generator().manual_seed(0), torch.device("cpu"))


def floats(tensors):
    return payload_bytes(tensors) // 4


# ============================================================================ FedCP

def test_mmd_rbf_against_a_hand_value():
    x, y = torch.tensor([[0.0], [2.0]]), torch.tensor([[0.0], [0.0]])
    # squared distances: within x {0, 4}, within y {0}, across {0, 0, 4, 4}; k(0) = 4 kernels of 1
    k4 = sum(math.exp(-4 / (2 * sigma)) for sigma in (10, 15, 20, 50))
    expected = (2 * 4 + 2 * k4) / 4 + 4 - 2 * (2 * 4 + 2 * k4) / 4          # = 2 - k4 / 2
    assert mmd_rbf(x, y).item() == pytest.approx(expected, abs=1e-6)
    assert mmd_rbf(x, y).item() == pytest.approx(0.2202345, abs=1e-6)
    z = torch.randn(5, 3, generator=torch.Generator().manual_seed(1))
    assert mmd_rbf(z, z).item() == pytest.approx(0.0, abs=1e-6)


def test_gumbel_policy_split_sums_to_one_and_is_the_seeded_soft_gumbel_softmax():
    scores = torch.randn(3, 2, 4, generator=torch.Generator().manual_seed(2))
    r, s = gumbel_split(scores, torch.Generator().manual_seed(7))
    assert torch.allclose(r + s, torch.ones(3, 4)) and (r > 0).all() and (s > 0).all()
    noise = -torch.empty(3, 2, 4).exponential_(generator=torch.Generator().manual_seed(7)).log()
    expected_r = torch.sigmoid((scores[:, 0] + noise[:, 0]) - (scores[:, 1] + noise[:, 1]))   # tau = 1
    assert torch.allclose(r, expected_r, atol=1e-6)
    again, _ = gumbel_split(scores, torch.Generator().manual_seed(7))
    other, _ = gumbel_split(scores, torch.Generator().manual_seed(8))
    assert torch.equal(r, again) and not torch.equal(r, other)


def test_context_is_the_column_sum_of_the_personal_head_and_the_upload_mixes_heads_half_half():
    assert torch.equal(policy_context({"h.weight": torch.tensor([[1.0, 2.0], [3.0, 4.0]]), "h.bias": torch.ones(2)}),
                       torch.tensor([[4.0, 6.0]]))
    w1, w2 = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]]), torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 1.0]])
    # two layers: column sums of W2 @ W1 = [[1, 2], [1, 3]] -> [2, 5]
    assert torch.equal(policy_context({"a.weight": w1, "b.weight": w2}), torch.tensor([[2.0, 5.0]]))
    mixed = mix_heads({"h.weight": torch.tensor([[2.0, 0.0]]), "h.bias": torch.tensor([1.0])},
                      {"h.weight": torch.tensor([[0.0, 4.0]]), "h.bias": torch.tensor([3.0])})
    assert torch.equal(mixed["h.weight"], torch.tensor([[1.0, 2.0]]))
    assert torch.equal(mixed["h.bias"], torch.tensor([2.0]))


def test_fedcp_round_policy_split_head_mixing_and_what_leaves_the_client():
    algorithm, data = make_algorithm(FedCP)
    initial = initial_of(algorithm)
    prefix = algorithm.head_prefix()
    base_keys = set(split_head(initial, prefix)[0])
    head_keys = set(initial) - base_keys
    server_state = algorithm.init_server(initial)

    download = algorithm.download(server_state, 0)
    assert set(download) == {"weights"} and set(download["weights"]) == base_keys     # round 0: phi only
    ctx = context(algorithm, data, 0, download)
    algorithm.receive(ctx)
    state = ctx.state
    assert set(state) == {"personal_head", "global_head", "cpn", "context"}
    assert state["context"].shape == (1, 84) and ((0 <= state["context"]) & (state["context"] < 1)).all()
    assert all(torch.equal(state["cpn"][k], server_state["cpn"][k]) for k in server_state["cpn"])

    # the reported ensemble: h^p(z r) + h^g(z s), Gumbel noise from the evaluation generator
    x = torch.randn(5, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    def evaluate(seed):
        evaluation_ctx = context(algorithm, data, 0, download, dict(state), seed=seed)
        with torch.no_grad():
            return algorithm.evaluation_model(evaluation_ctx)(x)
    assert torch.equal(evaluate(11), evaluate(11)) and not torch.equal(evaluate(11), evaluate(12))
    model = algorithm.new_model()
    model.load_state_dict(initial)
    with torch.no_grad():
        z = model.features(x)
        scores = algorithm.module("check", "cpn").requires_grad_(False)
        scores.load_state_dict({k[4:]: v for k, v in state["cpn"].items()})
        r, s = gumbel_split(scores(z * F.normalize(state["context"], dim=1)), torch.Generator().manual_seed(11))
        expected = model.classifier(z * r) + model.classifier(z * s)     # both heads are the initial one
    assert torch.allclose(evaluate(11), expected, atol=1e-5)

    global_head_before = clone_weights(state["global_head"])
    result = algorithm.client_update(ctx)
    assert set(result.state) == {"personal_head", "context"}          # h^g and the CPN come with the next download
    upload = result.upload
    assert set(upload) == {"weights", "cpn"} and set(upload["weights"]) == base_keys | head_keys
    assert set(upload["cpn"]) == {"cpn.fc.0.weight", "cpn.fc.0.bias", "cpn.fc.1.weight", "cpn.fc.1.bias"}
    assert floats(upload) == BASE + HEAD + CPN == 59_042
    personal = result.state["personal_head"]
    assert any(not torch.equal(personal[k], initial[k]) for k in head_keys)                # h^p trained
    for k in head_keys:                                                                  # 1/2 h^p + 1/2 h^g
        assert torch.allclose(upload["weights"][k], 0.5 * personal[k] + 0.5 * global_head_before[k])
    assert any(not torch.equal(upload["cpn"][k], server_state["cpn"][k]) for k in upload["cpn"])  # CPN trained

    # the server averages; h^g and the CPN go back to the uploader only, which recomputes its context
    server_state = algorithm.server_update(server_state, [result], server())
    assert set(algorithm.download(server_state, 1)) == {"weights"}
    download = algorithm.download(server_state, 0)
    assert set(download) == {"weights", "global_head", "cpn"} and set(download["global_head"]) == head_keys
    assert floats(download) == BASE + HEAD + CPN
    ctx = context(algorithm, data, 0, download, result.state, round_index=1)
    algorithm.receive(ctx)
    assert torch.allclose(ctx.state["context"], personal[prefix + "fc.weight"].sum(0, keepdim=True))
    assert all(torch.equal(ctx.state["global_head"][k], upload["weights"][k]) for k in head_keys)


def test_fedcp_frozen_parts_do_not_move_and_lambda_weights_the_mmd():
    algorithm, data = make_algorithm(FedCP, "--fedcp_lambda", "2.5")
    server_state = algorithm.init_server(initial_of(algorithm))
    ctx = context(algorithm, data, 0, algorithm.download(server_state, 0))
    algorithm.receive(ctx)
    model = algorithm.client_model(ctx)
    ctx.global_model = algorithm.frozen_model("global", ctx.architecture, clone_weights(model.state_dict()))
    ensemble = algorithm.ensemble("training", model, ctx.state, torch.Generator().manual_seed(0))
    assert not any(p.requires_grad for p in ensemble.global_head.parameters())
    x, y = torch.randn(4, 1, 28, 28), torch.tensor([0, 1, 2, 3])
    with torch.no_grad():
        model.base.fc2.bias += 0.5          # phi_k away from phi^g: the MMD term is positive
    ensemble.generator = torch.Generator().manual_seed(0)
    logits, z = ensemble(x, return_features=True)
    expected = F.cross_entropy(logits, y) + 2.5 * mmd_rbf(z, ctx.global_model.features(x))
    assert mmd_rbf(z, ctx.global_model.features(x)).item() > 0
    ensemble.generator = torch.Generator().manual_seed(0)
    assert algorithm.fedcp_loss(ensemble, x, y, ctx).item() == pytest.approx(expected.item(), rel=1e-5)


# ============================================================================ GPFL

def test_gpfl_conditional_inputs_from_a_hand_gce_and_label_distribution():
    embeddings = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]])
    generic, personal = conditional_inputs(embeddings, torch.tensor([0.5, 0.5, 0.0]))
    assert torch.allclose(generic, torch.tensor([4 / 3, 5 / 3]))
    assert torch.allclose(personal, torch.tensor([0.5, 1.0]))


def test_gpfl_losses_are_unscaled_cosine_ce_and_an_unsquared_batch_frobenius_norm():
    embeddings = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # cosines [1, 0], no scale: CE = log(1 + e^-1)
    assert gce_loss(torch.tensor([[5.0, 0.0]]), embeddings, torch.tensor([0])).item() == pytest.approx(
        math.log(1 + math.exp(-1)), rel=1e-6)
    features = torch.tensor([[4.0, 0.0], [0.0, 5.0]])
    # f - E[y] = [[3, 0], [0, 4]]: the norm 5, not 25 (squared) nor a mean
    assert magnitude_term(features, embeddings, torch.tensor([0, 1])).item() == pytest.approx(5.0)


def test_gpfl_conditional_inputs_are_zero_first_then_come_from_the_pre_overwrite_gce():
    labels = torch.tensor([0] * 6 + [1] * 2 + [2] * 3 + list(range(10)) * 2)          # client 0: 11 samples
    algorithm, data = make_algorithm(GPFL, "--drop_last", sizes=(11, 20), labels=labels)
    server_state = algorithm.init_server(initial_of(algorithm))
    download = algorithm.download(server_state, 0)
    ctx = context(algorithm, data, 0, download)
    algorithm.receive(ctx)          # round 0: nothing aggregated yet
    assert not ctx.state["generic_input"].any() and not ctx.state["personal_input"].any()
    assert torch.equal(ctx.state["gce"]["gce.embedding.weight"], server_state["gce"]["gce.embedding.weight"])

    old = torch.arange(840, dtype=torch.float32).reshape(10, 84) / 100      # the client's trained GCE
    new = {"gce.embedding.weight": torch.ones(10, 84)}                       # the next global GCE
    state = dict(ctx.state, gce={"gce.embedding.weight": old})
    ctx = context(algorithm, data, 0, dict(download, gce=new), state, round_index=1)
    algorithm.receive(ctx)
    # drop_last with batch 8 over 11 samples: the first 8 count (6 of class 0, 2 of class 1)
    pi = torch.tensor([6, 2, 0, 0, 0, 0, 0, 0, 0, 0]) / 8
    assert torch.allclose(ctx.state["generic_input"], old.mean(0))
    assert torch.allclose(ctx.state["personal_input"], pi @ old)
    assert torch.equal(ctx.state["gce"]["gce.embedding.weight"], new["gce.embedding.weight"])


def test_gpfl_round_uploads_phi_gce_and_cov_only_with_weight_decay_mu_on_them():
    algorithm, data = make_algorithm(GPFL, "--gpfl_mu", "0.3", "--reg", "0")
    initial = initial_of(algorithm)
    head_keys = set(split_head(initial, algorithm.head_prefix())[1])
    server_state = algorithm.init_server(initial)
    download = algorithm.download(server_state, 0)
    assert floats(download) == BASE + GCE + COV == 59_032 and not head_keys & set(download["weights"])
    ctx = context(algorithm, data, 0, download)
    algorithm.receive(ctx)
    result = algorithm.client_update(ctx)
    assert set(result.upload) == {"weights", "gce", "cov"} and not head_keys & set(result.upload["weights"])
    assert floats(result.upload) == 59_032
    assert set(result.state["personal_head"]) == head_keys
    assert torch.equal(result.state["gce"]["gce.embedding.weight"], result.upload["gce"]["gce.embedding.weight"])
    model, gce, cov = algorithm.new_model(), algorithm.module("x", "gce", download["gce"]), \
        algorithm.module("x", "cov", download["cov"])
    optimizers = algorithm.optimizer(model, gce, cov).optimizers
    assert [group["weight_decay"] for opt in optimizers for group in opt.param_groups] == [0.0, 0.3, 0.3]
    # the reported model: h_k(CoV(phi(x), p_k))
    x = torch.randn(3, 1, 28, 28)
    reported = algorithm.evaluation_model(context(algorithm, data, 0, download, result.state))
    model.load_state_dict({**initial, **result.state["personal_head"]})
    with torch.no_grad():
        expected = model.classifier(cov(model.features(x), result.state["personal_input"]))
        assert torch.allclose(reported(x), expected)


# ============================================================================ FedDBE

def test_dbe_running_mean_and_mean_regulariser_on_tiny_tensors():
    running = RunningMean(2, 0.5)
    features = torch.tensor([[1.0, 4.0], [3.0, 4.0]], requires_grad=True)
    first = running.update(features)                        # 0.5 * 0 + 0.5 * [2, 4]
    assert torch.allclose(first, torch.tensor([1.0, 2.0]))
    assert mean_regulariser(first, torch.zeros(2)).item() == pytest.approx(0.5 * (1 + 4) / 2)
    second = running.update(torch.zeros(2, 2, requires_grad=True))
    assert torch.allclose(second, torch.tensor([0.5, 1.0]))
    assert second.grad_fn is not None and not running.value.requires_grad
    second.sum().backward()                                 # the gradient reaches the current batch only
    assert features.grad is None
    assert torch.allclose(RunningMean(2, 1.0).update(features), torch.tensor([2.0, 4.0]))   # m = 1: the batch mean


def test_dbe_consensus_mean_is_computed_once_from_a_plain_epoch_on_every_client():
    algorithm, data = make_algorithm(FedDBE, "--num_local_iterations", 1, sizes=(20, 12, 9))
    initial = initial_of(algorithm)
    server_state = algorithm.init_server(initial)
    contexts = [context(algorithm, data, k, algorithm.download(server_state, k), seed=k) for k in range(3)]
    server_state = algorithm.initialise_server(server_state, contexts, server())
    # m = 1 and one step: r_k = mean of phi_0 over the client's first batch (drawn before the step)
    model = algorithm.new_model()
    model.load_state_dict(initial)
    means = []
    for k in range(3):
        x, _ = data.clients[k].stream(torch.Generator().manual_seed(k)).next()
        with torch.no_grad():
            means.append(model.features(x).mean(0))
    expected = (20 * means[0] + 12 * means[1] + 9 * means[2]) / 41
    assert torch.allclose(server_state["global_mean"], expected, atol=1e-6)
    assert all(torch.equal(server_state["weights"][k], initial[k]) for k in initial)     # those models are dropped
    first, later = algorithm.download(server_state, 0), None
    assert torch.equal(first["global_mean"], server_state["global_mean"])
    ctx = context(algorithm, data, 0, first)
    algorithm.receive(ctx)
    result = algorithm.client_update(ctx)
    assert set(result.upload) == {"weights"} and floats(result.upload) == BASE + HEAD     # the whole model only
    assert result.state["bias"].abs().sum() > 0                                          # the PRBM trained
    server_state = algorithm.server_update(server_state, [result], server())
    later = algorithm.download(server_state, 1)
    assert set(later) == {"weights"}                                                     # zbar^g is sent once
    assert torch.equal(result.state["global_mean"], server_state["global_mean"])


def test_dbe_loss_and_reported_model_add_the_prbm():
    algorithm, data = make_algorithm(FedDBE, "--dbe_kappa", 3.0)
    initial = initial_of(algorithm)
    bias = torch.linspace(-1, 1, 84)
    download = {"weights": initial}
    state = {"bias": bias, "global_mean": torch.full((84,), 0.2)}
    x = torch.randn(4, 1, 28, 28)
    model = algorithm.new_model()
    model.load_state_dict(initial)
    with torch.no_grad():
        reported = algorithm.evaluation_model(context(algorithm, data, 0, download, state))(x)
        assert torch.allclose(reported, model.classifier(model.features(x) + bias))
    # one step by hand: loss = CE(h(z + b), y) + kappa * mean(1/2 (mean_batch z - zbar^g)^2) with m = 1
    ctx = context(algorithm, data, 0, download, dict(state))
    seen = []
    original = algorithm.train

    def spy(ctx, model, parameters, steps, loss=None, optimizer=None):
        x, y = ctx.data.stream(torch.Generator().manual_seed(99)).next()
        z = model.features(x)
        expected = F.cross_entropy(model.classifier(z + bias), y) + 3.0 * (0.5 * (z.mean(0) - 0.2) ** 2).mean()
        seen.append((loss(model, x, y, ctx).item(), expected.item()))
        return original(ctx, model, parameters, steps, loss, optimizer)

    algorithm.train = spy
    algorithm.client_update(ctx)
    assert seen and seen[0][0] == pytest.approx(seen[0][1], rel=1e-5)


# ============================================================================ flags

@pytest.mark.parametrize("cls, flag, value", [(FedCP, "--fedcp_lambda", "-1"), (GPFL, "--gpfl_mu", "-0.1"),
                                              (GPFL, "--gpfl_lambda", "-1"), (FedDBE, "--dbe_momentum", "1.5"),
                                              (FedDBE, "--dbe_kappa", "-2")])
def test_bad_flag_values_are_refused(cls, flag, value):
    with pytest.raises(UsageError, match=flag):
        cls.check_args(algorithm_args(cls, flag, value))


def test_defaults_are_the_reference_scripts():
    fedcp, gpfl, dbe = algorithm_args(FedCP), algorithm_args(GPFL), algorithm_args(FedDBE)
    assert fedcp.fedcp_lambda == 5.0
    assert (gpfl.gpfl_lambda, gpfl.gpfl_mu) == (0.01, 0.1)
    assert (dbe.dbe_momentum, dbe.dbe_kappa) == (1.0, 50.0)


# ============================================================================ short real runs

# Dir(0.1) over 3 clients: skewed enough for personal parts to pay off within a few rounds; plain SGD
# (PFLlib's optimiser) at lr 0.1 gets SimpleCNN off its initial plateau within these few steps; a
# 90/10 train/test split of each client's share keeps the every-round evaluation of all clients short
RUN = ["--n_parties", 3, "--beta", 0.1, "--train_ratio", 0.9, "--num_local_iterations", 15, "--batch_size", 16,
       "--momentum", 0, "--lr", 0.1, "--comm_round", 3, "--threads", 1, "--eval", "local"]


def run(cls, tmp_path, *flags):
    name = cls.name
    assert main(cls, [*map(str, RUN), *map(str, flags), "--logdir", str(tmp_path), "--log_file_name", name]) == 0
    records = [json.loads(line) for line in open(tmp_path / name / "metrics.jsonl")]
    return records, torch.load(tmp_path / name / "checkpoint.pt", weights_only=True)


def test_fedcp_runs_above_chance_and_sends_h_g_and_cpn_only_to_last_rounds_uploaders(tmp_path):
    records, checkpoint = run(FedCP, tmp_path, "--sample_fraction", 0.67)
    assert records[-1]["accuracy"] > 0.2
    assert records[0]["bytes_downloaded_per_client"] == [4 * BASE] * 3
    for record in records[:3]:
        assert record["bytes_uploaded_per_client"] == [4 * (BASE + HEAD + CPN) + 8] * 2
    for previous, record in zip(records, records[1:]):
        sizes = sorted(record["bytes_downloaded_per_client"])
        assert sizes == sorted([4 * BASE] + [4 * (BASE + HEAD + CPN)] * len(previous["clients"]))
    # after the last training round: its uploaders keep only their personal part, the other its stale h^g and CPN
    for k, state in checkpoint["client_states"].items():
        trained = int(k) in records[2]["clients"]
        assert set(state) == ({"personal_head", "context"} if trained else
                              {"personal_head", "context", "global_head", "cpn"})


def test_gpfl_runs_above_chance_and_uploads_no_head(tmp_path):
    records, checkpoint = run(GPFL, tmp_path)
    assert records[-1]["accuracy"] > 0.2
    for record in records[:3]:
        assert record["bytes_uploaded_per_client"] == [4 * (BASE + GCE + COV) + 8] * 3
        assert record["bytes_downloaded_per_client"] == [4 * (BASE + GCE + COV)] * 3
    assert all(set(s) == {"personal_head", "gce", "generic_input", "personal_input"}
               for s in checkpoint["client_states"].values())


def test_feddbe_runs_above_chance_and_sends_the_consensus_mean_once(tmp_path):
    records, checkpoint = run(FedDBE, tmp_path)
    assert records[-1]["accuracy"] > 0.2
    assert records[0]["bytes_downloaded_per_client"] == [4 * (BASE + HEAD + 84)] * 3
    assert all(r["bytes_downloaded_per_client"] == [4 * (BASE + HEAD)] * 3 for r in records[1:])
    assert all(r["bytes_uploaded_per_client"] == [4 * (BASE + HEAD) + 8] * 3 for r in records[:3])
    assert all(set(s) == {"bias", "global_mean"} for s in checkpoint["client_states"].values())
