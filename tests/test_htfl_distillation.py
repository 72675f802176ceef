"""FedDistill, FML, FedKD and FedGen (algorithms/heterogeneous/): FedDistill's per-class logit
targets and means, FedGen's generator loss and label sampler, FML's and FedKD's mutual
distillation with detached targets (no gradient crosses between the networks), FedKD's SVD
factorisation, reconstruction and energy rank, the bytes of every upload kind, one short
--eval local run of each over a heterogeneous model set (light4) ending above chance, and a FedGen
run interrupted and resumed that equals the uninterrupted one."""
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import (assert_resume_equals_uninterrupted, assert_same_tensors, interrupt_after,
                      random_client_side, records_of)
from algorithms.heterogeneous.feddistill import FedDistill, distillation_targets, soft_cross_entropy
from algorithms.heterogeneous.fedgen import (FedGen, FedGenPFLlib, Generator, generator_loss, label_distribution,
                                             sample_labels)
from algorithms.heterogeneous.fedkd import FedKD, compress, energy_rank, reconstruct
from algorithms.heterogeneous.fml import FML, Networks, mutual_kl
from engine import ClientResult, ServerContext, main, payload_bytes, weighted_average
from engine.executors import run_client

torch.set_num_threads(1)

LIGHT_LENET_FLOATS = 44_426       # client 0's architecture in light4: FML's meme, FedKD's mentee
HEAD_FLOATS = 10 * 84 + 10        # a light4 head, [10, 84] + [10]


def make_algorithm(cls, *flags, sizes=(20, 12)):
    """(algorithm, data): `cls` over random Fashion-MNIST-shaped images, one client per size."""
    return random_client_side(cls, *flags, sizes=sizes)


def server_context(round_index=0):
    return ServerContext(round_index, torch.Generator().manual_seed(0), torch.device("cpu"))


def upload(client_id, num_samples, **payload):
    return ClientResult(client_id, num_samples, payload, {}, {}, [])


# ----------------------------------------------------------------------------- FedDistill

def test_fd_targets_are_the_softmax_of_the_global_logits_of_each_samples_class():
    logits = torch.zeros(2, 3, requires_grad=True)               # o = 0: softmax uniform
    labels = torch.tensor([0, 2])                                  # class 2 has no global logits
    global_logits = {0: torch.tensor([math.log(4.0), 0.0, 0.0]), 1: torch.tensor([5.0, 5.0, 5.0])}
    targets = distillation_targets(logits, labels, global_logits)
    assert torch.allclose(targets, torch.tensor([[2 / 3, 1 / 6, 1 / 6], [1 / 3, 1 / 3, 1 / 3]]))
    loss = soft_cross_entropy(logits, targets)                     # -q . log(1/3) = ln 3 in both rows
    assert loss.item() == pytest.approx(math.log(3.0), rel=1e-6)
    loss.backward()
    # d/do_i = (softmax(o_i) - q_i) / B: the absent class's row (its own softmax) has no gradient
    assert torch.allclose(logits.grad, torch.tensor([[-1 / 6, 1 / 12, 1 / 12], [0.0, 0.0, 0.0]]), atol=1e-7)


def test_fd_local_loss_adds_lambda_times_the_soft_ce_and_uploads_per_class_mean_logits():
    algorithm, _ = make_algorithm(FedDistill, "--fd_lambda", 0.5)
    identity = nn.Identity()                                       # the batch is the logits themselves
    ctx = SimpleNamespace(download={"logits": {0: torch.tensor([math.log(4.0), 0.0, 0.0] + [-50.0] * 7)}})
    algorithm.prepare_client(ctx, identity)
    first, second = torch.zeros(2, 10), torch.tensor([[1.0] * 10, [3.0] + [0.0] * 9, [2.0] * 10])
    loss = algorithm.local_loss(identity, first, torch.tensor([0, 3]), ctx)
    algorithm.local_loss(identity, second, torch.tensor([3, 0, 3]), ctx)
    # CE = ln 10 for both rows; soft CE: row 0 against softmax(global_0) (~[2/3, 1/6, 1/6, 0...]) = ln 10,
    # row 1 (class 3 absent) against its own uniform softmax = ln 10
    assert loss.item() == pytest.approx(1.5 * math.log(10.0), rel=1e-5)
    sent = algorithm.upload(ctx, identity)
    assert set(sent) == {"logits"} and sorted(sent["logits"]) == [0, 3]      # the classes seen, in order
    assert torch.allclose(sent["logits"][0], (torch.zeros(10) + second[1]) / 2)
    assert torch.allclose(sent["logits"][3], (torch.zeros(10) + second[0] + second[2]) / 3)
    assert payload_bytes(sent) == 2 * 10 * 4                                  # 80 bytes


def test_fd_server_averages_each_class_over_the_uploaders_holding_it_unweighted():
    algorithm, _ = make_algorithm(FedDistill)
    state = algorithm.init_server(None)
    assert algorithm.download(state, 0) == {}                                # nothing before the first uploads
    a, b, c = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 5.0]), torch.tensor([0.0, 1.0])
    state = algorithm.server_update(state, [upload(0, 1000, logits={0: a, 1: b}), upload(1, 1, logits={1: c})],
                                    server_context())
    assert sorted(state["logits"]) == [0, 1]
    assert torch.equal(state["logits"][0], a) and torch.allclose(state["logits"][1], torch.tensor([1.5, 3.0]))
    assert algorithm.download(state, 1) == {"logits": state["logits"]}
    # the next round holds only that round's uploads
    state = algorithm.server_update(state, [upload(1, 1, logits={1: c})], server_context(1))
    assert list(state["logits"]) == [1]


# ----------------------------------------------------------------------------- FedGen

def test_label_sampler_draws_the_pooled_label_frequencies_of_all_clients():
    counts = torch.tensor([[3, 1, 0], [1, 1, 0]])
    p = label_distribution(counts)
    assert torch.allclose(p, torch.tensor([4 / 6, 2 / 6, 0.0], dtype=torch.float64))
    draws = sample_labels(p, 6000, torch.Generator().manual_seed(1))
    frequencies = torch.bincount(draws, minlength=3) / 6000
    assert frequencies[2] == 0 and abs(frequencies[0] - 2 / 3) < 0.03
    assert torch.equal(draws, sample_labels(p, 6000, torch.Generator().manual_seed(1)))   # seeded
    algorithm, data = make_algorithm(FedGen, "--client_models", "light4", sizes=(20, 12, 7))
    pooled = sum(client.class_counts for client in data.clients)
    assert torch.allclose(algorithm.labels, pooled.double() / pooled.sum())


def test_generator_loss_is_ce_of_the_share_weighted_head_logits():
    features = torch.tensor([[1.0, 0.0]])
    fixed = lambda labels, generator: features                     # noqa: E731 (a generator with a known output)
    heads = [{"weight": torch.eye(2), "bias": torch.zeros(2)},
             {"weight": torch.zeros(2, 2), "bias": torch.tensor([0.0, 2.0])}]
    # logits = 0.75 [1, 0] + 0.25 [0, 2] = [0.75, 0.5]; CE for label 1 = ln(1 + e^0.25)
    loss = generator_loss(fixed, heads, [0.75, 0.25], torch.tensor([1]), None)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(0.25)), rel=1e-6)
    assert generator_loss(fixed, heads, [0.5, 0.5], torch.tensor([0]), None).item() == pytest.approx(
        math.log(1 + math.exp(0.5)), rel=1e-6)                     # [0.5, 1.0], label 0


def test_generator_takes_uniform_noise_and_a_one_hot_label_from_the_given_generator():
    generator = Generator(noise_dim=5, num_classes=3, hidden_dim=7, feature_dim=4)
    assert generator.fc1[0].in_features == 5 + 3 and generator.fc.out_features == 4
    seen = []
    generator.fc1[0].register_forward_hook(lambda module, inputs, output: seen.append(inputs[0]))
    out = generator(torch.tensor([2, 0]), torch.Generator().manual_seed(3))
    assert out.shape == (2, 4)
    noise, one_hot = seen[0][:, :5], seen[0][:, 5:]
    assert torch.equal(noise, torch.rand(2, 5, generator=torch.Generator().manual_seed(3)))    # U[0, 1)
    assert torch.equal(one_hot, torch.tensor([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]]))


def test_fedgen_server_trains_the_generator_on_the_uploaded_heads_then_averages_them():
    algorithm, _ = make_algorithm(FedGen, "--client_models", "light4", "--gen_noise_dim", 8, "--gen_hidden_dim",
                                  16, "--gen_server_epochs", 40, "--gen_lr", 0.01)
    state = algorithm.init_server(None)
    initial = {k: v.clone() for k, v in state["generator"].items()}
    assert torch.equal(state["head"]["weight"], algorithm.setting.initial_weights["light-lenet"]["head.weight"])
    generator = torch.Generator().manual_seed(5)
    heads = [{"weight": torch.randn(10, 84, generator=generator), "bias": torch.randn(10, generator=generator)}
             for _ in range(2)]
    results = [upload(0, 30, head=heads[0]), upload(1, 10, head=heads[1])]
    server = server_context()
    state = algorithm.server_update(state, results, server)
    assert_same_tensors(weighted_average(heads, [30, 10]), state["head"])
    assert server.log_lines and server.log_lines[0].startswith("generator loss:")

    def loss_of(weights):          # the server loss of a generator on one fixed draw
        model = algorithm.generator_model()
        model.load_state_dict(weights)
        labels = sample_labels(algorithm.labels, 64, torch.Generator().manual_seed(9))
        return generator_loss(model, heads, [0.75, 0.25], labels, torch.Generator().manual_seed(9)).item()

    assert loss_of(state["generator"]) < loss_of(initial)
    # --gen_server_epochs 0: the generator stays the initial one (HtFLlib's behaviour)
    algorithm.args.gen_server_epochs = 0
    kept = algorithm.server_update(algorithm.init_server(None), results, server_context())
    assert_same_tensors(initial, kept["generator"])


def test_fedgen_client_keeps_its_base_uploads_its_head_and_learns_from_the_received_generator():
    algorithm, data = make_algorithm(FedGen, "--client_models", "light4", "--gen_noise_dim", 8, "--gen_hidden_dim", 16)
    state = algorithm.init_server(None)
    download = algorithm.download(state, 1)
    result = run_client(algorithm, data, download, {}, 1, 0)                # client 1: light-mlp
    assert set(result.upload) == {"head"} and set(result.upload["head"]) == {"weight", "bias"}
    assert payload_bytes(result.upload) == 4 * HEAD_FLOATS                  # 3,400 bytes
    base_keys = {k for k in algorithm.setting.initial_weights["light-mlp"] if not k.startswith("head.")}
    assert set(result.state) == {"base"} and set(result.state["base"]) == base_keys
    other = dict(download, generator={k: v * 2 if v.is_floating_point() else v
                                      for k, v in download["generator"].items()})
    assert not torch.equal(run_client(algorithm, data, other, {}, 1, 0).upload["head"]["weight"],
                           result.upload["head"]["weight"])
    # reported: the client's own base with the downloaded global head
    ctx = SimpleNamespace(architecture="light-mlp", download=download, state=result.state)
    reported = algorithm.evaluation_model(ctx).state_dict()
    assert torch.equal(reported["head.weight"], state["head"]["weight"])
    assert all(torch.equal(reported[k], result.state["base"][k]) for k in base_keys)


def test_fedgen_refuses_heads_of_different_shapes_and_the_pfllib_form_refuses_mixed_models(tmp_path, capsys):
    assert main(FedGen, ["--client_models", "simplecnn-mnist,fedavgcnn", "--eval", "local",
                         "--logdir", str(tmp_path)]) == 2
    assert "same head shape" in capsys.readouterr().err
    assert main(FedGenPFLlib, ["--client_models", "light4", "--eval", "local", "--logdir", str(tmp_path)]) == 2
    assert "homogeneous" in capsys.readouterr().err


# ----------------------------------------------------------------------------- FML and FedKD

class TinyNet(nn.Module):
    """features = relu(Linear(4 -> 3)), head = Linear(3 -> 2), seeded."""
    head_name = "head"

    def __init__(self, seed):
        super().__init__()
        self.base, self.head = nn.Linear(4, 3), nn.Linear(3, 2)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=generator))

    @property
    def classifier(self):
        return self.head

    def features(self, x):
        return torch.relu(self.base(x))

    def forward(self, x):
        return self.head(self.features(x))


BATCH = (torch.tensor([[1.0, -2.0, 0.5, 3.0], [0.0, 1.0, -1.0, 2.0], [2.0, 0.0, 1.0, -1.0]]), torch.tensor([0, 1, 1]))


def gradients(module):
    return {name: p.grad.clone() if p.grad is not None else torch.zeros_like(p)
            for name, p in module.named_parameters()}


def assert_close(found, expected):
    assert set(found) == set(expected)
    assert all(torch.allclose(found[k], expected[k], atol=1e-6) for k in expected), \
        {k: (found[k] - expected[k]).abs().max().item() for k in expected}


def test_mutual_kl_is_kl_of_the_detached_teacher_averaged_over_all_elements():
    student = torch.tensor([[math.log(3.0), 0.0]], requires_grad=True)       # softmax [3/4, 1/4]
    teacher = torch.zeros(1, 2, requires_grad=True)                           # softmax [1/2, 1/2]
    loss = mutual_kl(student, teacher)
    # KL(p || q) = 1/2 ln(2/3) + 1/2 ln 2 = 1/2 ln(4/3), averaged over B * C = 2 elements
    assert loss.item() == pytest.approx(0.25 * math.log(4 / 3), rel=1e-6)
    loss.backward()
    assert teacher.grad is None and student.grad is not None


@pytest.mark.parametrize("alpha, beta", [(0.5, 0.5), (0.2, 0.9)])
def test_fml_each_network_gets_the_gradient_of_its_own_loss_only(alpha, beta):
    algorithm, _ = make_algorithm(FML, "--fml_alpha", alpha, "--fml_beta", beta)
    x, y = BATCH
    networks = Networks(personal=TinyNet(1), meme=TinyNet(2))
    algorithm.mutual_loss(networks, x, y, None).backward()
    personal, meme = TinyNet(1), TinyNet(2)
    # L_M with the meme's softmax a constant; L_m with the personal model's softmax a constant
    (alpha * F.cross_entropy(personal(x), y) + (1 - alpha) * mutual_kl(personal(x), meme(x).detach())).backward()
    assert all(p.grad is None for p in meme.parameters())                    # nothing reaches the meme
    expected = gradients(personal)
    (beta * F.cross_entropy(meme(x), y) + (1 - beta) * mutual_kl(meme(x), personal(x).detach())).backward()
    assert_close(gradients(networks.personal), expected)
    assert_close(gradients(networks.meme), gradients(meme))


def test_fml_loss_of_two_equal_networks_is_the_ce_shares():
    algorithm, _ = make_algorithm(FML, "--fml_alpha", 0.3, "--fml_beta", 0.6)
    x, y = BATCH
    ce = F.cross_entropy(TinyNet(1)(x), y).item()
    loss = algorithm.mutual_loss(Networks(personal=TinyNet(1), meme=TinyNet(1)), x, y, None)
    assert loss.item() == pytest.approx((0.3 + 0.6) * ce, rel=1e-6)          # KL(p || p) = 0


def test_fml_client_uploads_the_meme_keeps_its_personal_model_and_the_server_averages_unweighted():
    algorithm, data = make_algorithm(FML, "--client_models", "light4")
    state = algorithm.init_server(None)
    meme_keys = set(algorithm.setting.initial_weights["light-lenet"])
    assert set(state["weights"]) == meme_keys                                # client 0's architecture
    result = run_client(algorithm, data, algorithm.download(state, 1), {}, 1, 0)   # client 1: light-mlp
    assert set(result.upload) == {"meme"} and set(result.upload["meme"]) == meme_keys
    assert payload_bytes(result.upload) == 4 * LIGHT_LENET_FLOATS
    assert set(result.state) == {"local_model"}
    assert set(result.state["local_model"]) == set(algorithm.setting.initial_weights["light-mlp"])
    a = {k: torch.ones_like(v) for k, v in state["weights"].items()}
    b = {k: 3 * torch.ones_like(v) for k, v in state["weights"].items()}
    averaged = algorithm.server_update(state, [upload(0, 100, meme=a), upload(1, 1, meme=b)], server_context())
    assert all(torch.equal(v, 2 * torch.ones_like(v)) for v in averaged["weights"].values())


def fedkd_networks(mentor_seed, mentee_seed, hidden_map):
    linear = nn.Linear(3, 3, bias=False)
    with torch.no_grad():
        linear.weight.copy_(hidden_map)
    return Networks(mentor=TinyNet(mentor_seed), mentee=TinyNet(mentee_seed), hidden_map=linear)


def test_fedkd_each_network_gets_the_gradient_of_its_own_loss_only():
    algorithm, _ = make_algorithm(FedKD)
    x, y = BATCH
    hidden_map = torch.randn(3, 3, generator=torch.Generator().manual_seed(7))
    networks = fedkd_networks(1, 2, hidden_map)
    algorithm.distillation_loss(networks, x, y, None).backward()
    mentor_only, mentee_side = fedkd_networks(1, 2, hidden_map), fedkd_networks(1, 2, hidden_map)

    def parts(n):
        z_M, z_m = n.mentor.features(x), n.mentee.features(x)
        o_M, o_m = n.mentor.head(z_M), n.mentee.head(z_m)
        t, s = F.cross_entropy(o_M, y), F.cross_entropy(o_m, y)
        return z_M, z_m, o_M, o_m, t, s, (t + s).item()                    # the scale as a number

    z_M, z_m, o_M, o_m, t, s, scale = parts(mentor_only)
    (t + (mutual_kl(o_M, o_m.detach()) + F.mse_loss(z_M, mentor_only.hidden_map(z_m).detach())) / scale).backward()
    assert all(p.grad is None for p in [*mentor_only.mentee.parameters(), *mentor_only.hidden_map.parameters()])
    z_M, z_m, o_M, o_m, t, s, scale = parts(mentee_side)
    (s + (mutual_kl(o_m, o_M.detach()) + F.mse_loss(z_M.detach(), mentee_side.hidden_map(z_m))) / scale).backward()
    assert all(p.grad is None for p in mentee_side.mentor.parameters())
    assert_close(gradients(networks.mentor), gradients(mentor_only.mentor))
    assert_close(gradients(networks.mentee), gradients(mentee_side.mentee))
    assert_close(gradients(networks.hidden_map), gradients(mentee_side.hidden_map))


def test_fedkd_loss_of_two_equal_networks_and_an_identity_map_is_twice_the_ce():
    algorithm, _ = make_algorithm(FedKD)
    x, y = BATCH
    loss = algorithm.distillation_loss(fedkd_networks(1, 1, torch.eye(3)), x, y, None)
    assert loss.item() == pytest.approx(2 * F.cross_entropy(TinyNet(1)(x), y).item(), rel=1e-6)


# ----------------------------------------------------------------------------- FedKD's compression

@pytest.mark.parametrize("energy, rank", [(0.5, 1), (0.6, 1), (0.7, 2), (0.95, 3), (0.99, 4), (1.0, 4)])
def test_energy_rank_is_the_smallest_rank_keeping_more_than_the_share(energy, rank):
    # sigma^2 = 9, 4, 1, 0.25 (total 14.25); the first r keep 9, 13, 14, 14.25
    assert energy_rank(torch.tensor([3.0, 2.0, 1.0, 0.5]), energy) == rank


def test_a_flat_spectrum_keeps_every_singular_value_and_conv_slices_share_one_rank():
    assert energy_rank(torch.ones(4), 0.95) == 4        # the reference would keep r = 0 and send zeros
    # two slices: sigma^2 per index pooled = [9 + 1, 4 + 4, 1 + 4] = [10, 8, 5] (total 23)
    pooled = torch.tensor([[3.0, 2.0, 1.0], [1.0, 2.0, 2.0]])
    assert energy_rank(pooled, 0.75) == 2 and energy_rank(pooled, 0.8) == 3   # 18 > 17.25; 18 < 18.4


def test_compress_truncates_and_reconstructs_matrices_and_conv_kernels():
    diagonal = torch.diag(torch.tensor([3.0, 2.0, 1.0, 0.5]))
    packed = compress({"m": diagonal}, 0.95)
    assert packed["raw"] == {} and [packed["factors"]["m"][k].shape for k in "usv"] == [(4, 3), (3,), (3, 4)]
    assert torch.allclose(reconstruct(packed)["m"], torch.diag(torch.tensor([3.0, 2.0, 1.0, 0.0])), atol=1e-6)
    assert payload_bytes(packed) == 4 * 3 * (4 + 4 + 1)
    kernel = torch.randn(4, 2, 5, 5, generator=torch.Generator().manual_seed(0))
    full = compress({"conv": kernel}, 1.0)["factors"]["conv"]
    assert [full[k].shape for k in "usv"] == [(4, 2, 5, 5), (4, 2, 5), (4, 2, 5, 5)]      # one SVD a 5x5 slice
    assert torch.allclose(reconstruct({"factors": {"conv": full}})["conv"], kernel, atol=1e-5)
    truncated = compress({"conv": kernel}, 0.5)["factors"]["conv"]
    assert truncated["s"].shape[-1] < 5 and truncated["u"].shape == (4, 2, 5, truncated["s"].shape[-1])


def test_vectors_single_row_and_zero_tensors_travel_raw_under_their_own_kind():
    weights = {"bias": torch.tensor([1.0, 2.0, 3.0]), "row": torch.ones(1, 5), "zero": torch.zeros(3, 3),
               "three": torch.arange(12.0).reshape(3, 4)}
    packed = compress(weights, 0.95)
    assert set(packed["raw"]) == {"bias", "row", "zero"} and set(packed["factors"]) == {"three"}
    restored = reconstruct(packed)
    assert all(torch.equal(restored[k], weights[k]) for k in ("bias", "row", "zero"))    # a [3] bias stays itself
    assert packed["factors"]["three"]["s"].shape == (1,)           # 99.6 % of the energy in sigma_1
    assert torch.allclose(reconstruct(compress(weights, 1.0))["three"], weights["three"], atol=1e-4)


def test_fedkd_energy_grows_linearly_from_start_to_end_over_the_rounds():
    algorithm, _ = make_algorithm(FedKD, "--comm_round", 10)
    assert algorithm.energy(0) == pytest.approx(0.95) and algorithm.energy(5) == pytest.approx(0.965)
    assert algorithm.energy(9) == pytest.approx(0.977)


def test_fedkd_client_uploads_the_mentee_factors_and_the_server_recompresses_their_mean():
    algorithm, data = make_algorithm(FedKD, "--client_models", "light4", "--comm_round", 4)
    state = algorithm.init_server(None)
    assert algorithm.download(state, 0) == {}                              # round 0: the initial mentee
    results = [run_client(algorithm, data, {}, {}, k, 0) for k in range(2)]
    mentee = algorithm.setting.initial_weights["light-lenet"]
    for result in results:
        assert set(result.upload) == {"factors", "raw"}
        assert set(result.upload["raw"]) == {k for k, v in mentee.items() if v.dim() == 1}          # the biases
        assert set(result.upload["factors"]) == {k for k, v in mentee.items() if v.dim() > 1}
        assert payload_bytes(result.upload["raw"]) == 4 * (6 + 16 + 120 + 84 + 10)
        assert set(result.state) == {"local_model", "hidden_map"}
    assert result.state["hidden_map"]["weight"].shape == (84, 84)          # D_M x D_m
    assert set(result.state["local_model"]) == set(algorithm.setting.initial_weights["light-mlp"])
    server = server_context(2)
    state = algorithm.server_update(state, results, server)
    mean = weighted_average([reconstruct(r.upload) for r in results], [1, 1])
    assert_same_tensors(compress(mean, algorithm.energy(2)), algorithm.download(state, 3))
    assert {k: v.shape for k, v in reconstruct(state).items()} == {k: v.shape for k, v in mentee.items()}


# ----------------------------------------------------------------------------- short real runs

RUN = ["--n_parties", 4, "--client_models", "light4", "--beta", 0.1, "--train_ratio", 0.97,
       "--num_local_iterations", 5, "--batch_size", 16, "--lr", 0.03, "--comm_round", 3, "--threads", 1,
       "--eval", "local"]



def run(cls, tmp_path, *flags, name=None, observers=()):
    """A short --eval local run of `cls` in this process: (records, checkpoint). Rounds 0-2 are scored
    at their start, round 3 is the evaluation-only round after the last aggregation."""
    name = name or cls.name
    status = main(cls, [*map(str, RUN), *map(str, flags), "--logdir", str(tmp_path), "--log_file_name", name],
                  observers=observers)
    return status, tmp_path / name


def check_above_chance(records):
    assert [r["round"] for r in records] == [0, 1, 2, 3] and records[-1]["evaluation_only"]
    assert records[-1]["accuracy"] > 0.2 and records[-1]["accuracy"] > records[0]["accuracy"]


@pytest.mark.parametrize("cls, kinds, flags", [
    (FedDistill, None, []),
    (FML, {"meme": 4 * LIGHT_LENET_FLOATS}, []),
    (FedKD, None, []),
    (FedGenPFLlib, {"weights": 4 * 44_426}, ["--client_models", "simplecnn-mnist", "--beta", 0.5,
                                              "--num_local_iterations", 20, "--gen_server_epochs", 50]),
])
def test_short_runs_end_above_chance_and_send_what_each_method_shares(cls, kinds, flags, tmp_path):
    status, run_dir = run(cls, tmp_path, *flags)
    assert status == 0
    records = records_of(run_dir)
    check_above_chance(records)
    for record in records[:-1]:
        per_client = {kind: size // 4 for kind, size in record["bytes_uploaded_by_kind"].items()}
        assert per_client.pop("num_samples") == 8
        if kinds is not None:
            assert per_client == kinds
        elif cls is FedDistill:      # per-class logits: at most 10 classes of 10 floats, hundreds of bytes
            assert set(per_client) == {"logits"} and 40 <= per_client["logits"] <= 400
            assert max(record["bytes_uploaded_per_client"]) <= 400 + 8
        else:                         # FedKD: the mentee's factors, its biases raw
            assert set(per_client) == {"factors", "raw"} and per_client["raw"] == 4 * 236
    if cls is FedDistill:
        assert records[0]["bytes_downloaded"] == 0 and 0 < records[1]["bytes_downloaded_per_client"][0] <= 400



def test_fedgen_runs_above_chance_and_a_resumed_run_equals_the_uninterrupted_one(tmp_path):
    status, whole = run(FedGen, tmp_path, "--gen_noise_dim", 32, name="whole")     # total.sh's -nd 32
    assert status == 0
    records = records_of(whole)
    check_above_chance(records)
    for record in records[:-1]:       # the head up, head and generator down
        assert record["bytes_uploaded_by_kind"] == {"head": 4 * 4 * HEAD_FLOATS, "num_samples": 32}
        assert record["bytes_downloaded_by_kind"]["head"] == 4 * 4 * HEAD_FLOATS
    status, interrupted = run(FedGen, tmp_path, "--gen_noise_dim", 32, name="interrupted",
                              observers=[interrupt_after(1)])
    assert status == 130
    assert torch.load(interrupted / "checkpoint.pt", weights_only=True)["round"] == 0
    assert_resume_equals_uninterrupted(FedGen, whole, interrupted, {"weights", "head", "generator"})
