"""The model-heterogeneous sets of models.py: HtFLlib's HCNNs8 ("hcnns8", spec/pfl-htfl.md section
4: parameter counts, shapes, names, the k mod 8 assignment) and the light set ("light4": four
SimpleCNN-sized extractors with one feature size and head shape); and LG-FedAvg over a
heterogeneous set (only the common head travels and is averaged, each client keeps its own base)."""
import json

import pytest
import torch

import models
from conftest import algorithm_args, synthetic_client_side
from algorithms.personalised.lgfedavg import LGFedAvg
from engine import ServerContext, main, payload_bytes, weighted_average
from engine.executors import run_client

torch.set_num_threads(1)

# spec/pfl-htfl.md section 4: (base parameters, total with the Linear(512 -> 10) head), in HCNNs8's order
HCNNS8_COUNTS = {"hcnn-c1": (2_360_640, 2_365_770), "hcnn-c2": (576_896, 582_026),
                 "hcnn-c1-512": (2_623_296, 2_628_426), "hcnn-c2-512": (839_552, 844_682),
                 "hcnn-c1-1024": (5_245_248, 5_250_378), "hcnn-c2-1024": (1_626_496, 1_631_626),
                 "hcnn-c1-1024-512": (5_507_904, 5_513_034), "hcnn-c2-1024-512": (1_889_152, 1_894_282)}
LIGHT4_COUNTS = {"light-lenet": 44_426, "light-mlp": 49_598, "light-conv1": 31_434, "light-conv3": 16_598}


def base_and_total(model):
    prefix = models.head_prefix(model)
    base = sum(p.numel() for name, p in model.named_parameters() if not name.startswith(prefix))
    return base, models.count_parameters(model)


@pytest.mark.parametrize("group, feature_dim", [("hcnns8", 512), ("light4", 84)])
def test_every_member_has_a_base_of_the_group_feature_size_and_a_head_c_by_d(group, feature_dim):
    x = torch.randn(3, 1, 28, 28)
    for name in models.MODEL_GROUPS[group]:
        model = models.build_model(name, 10, (1, 28, 28))
        assert models.head_prefix(model) == "head." and model.classifier is model.head
        assert {k.split(".")[0] for k in model.state_dict()} == {"base", "head"}
        assert [(k, tuple(v.shape)) for k, v in model.state_dict().items() if k.startswith("head.")] == [
            ("head.weight", (10, feature_dim)), ("head.bias", (10,))]
        z = model.features(x)
        assert z.shape == (3, feature_dim) and (z >= 0).all()             # ReLU features
        assert torch.equal(model(x), model.head(z))


def test_hcnns8_members_have_htfllib_parameter_counts_and_names():
    assert models.MODEL_GROUPS["hcnns8"] == list(HCNNS8_COUNTS)            # HtFLlib's order
    for name, counts in HCNNS8_COUNTS.items():
        model = models.build_model(name, 10)
        assert base_and_total(model) == counts, name
    keys = list(models.build_model("hcnn-c2-1024-512", 10).state_dict())
    assert keys == ["base.conv.0.0.weight", "base.conv.0.0.bias", "base.conv.1.0.weight", "base.conv.1.0.bias",
                    "base.fc1.1.weight", "base.fc1.1.bias", "base.fc1.3.weight", "base.fc1.3.bias",
                    "base.fc1.5.weight", "base.fc1.5.bias", "head.weight", "head.bias"]
    shapes = {k: tuple(v.shape) for k, v in models.build_model("hcnn-c1-1024", 10).state_dict().items()}
    assert shapes["base.conv.0.0.weight"] == (32, 1, 5, 5) and shapes["base.fc1.1.weight"] == (1024, 4608)
    assert shapes["base.fc1.3.weight"] == (512, 1024)
    # hcnn-c2 is FedAvgCNN's network: same tensors in the same order, the same function
    hcnn, fedavgcnn = models.build_model("hcnn-c2", 10), models.build_model("fedavgcnn", 10)
    hcnn.load_state_dict(dict(zip(hcnn.state_dict(), fedavgcnn.state_dict().values())))
    x = torch.randn(2, 1, 28, 28)
    assert torch.allclose(hcnn(x), fedavgcnn(x))


def test_client_k_gets_member_k_mod_m():
    for group in ("hcnns8", "light4"):
        names = models.MODEL_GROUPS[group]
        assert models.client_architectures(group, "simplecnn-mnist", 20) == [names[k % len(names)] for k in range(20)]
    # 20 clients over HCNNs8: architectures 0-3 serve three clients each, 4-7 two (spec section 4)
    counts = [models.client_architectures("hcnns8", None, 20).count(n) for n in models.MODEL_GROUPS["hcnns8"]]
    assert counts == [3, 3, 3, 3, 2, 2, 2, 2]
    args = algorithm_args(LGFedAvg, "--client_models", "light4", "--n_parties", 5)     # resolve_models accepts it
    assert args.client_models == "light4"


def test_blocks_assignment_gives_consecutive_clients_one_model():
    # InCo's groups: 20 clients, 5 models -> clients 0-3 model 0, 4-7 model 1, ...; 7 clients over 3 -> 3/2/2 split by floor(kM/N)
    assert models.client_architectures("a,b,c,d,e", None, 20, "blocks") == [n for n in "abcde" for _ in range(4)]
    assert models.client_architectures("a,b,c", None, 7, "blocks") == list("aaabbcc")
    with pytest.raises(SystemExit):
        algorithm_args(LGFedAvg, "--client_models", "light4", "--client_assignment", "random")


def test_light4_members_are_simplecnn_sized_and_share_only_the_head_by_name():
    assert models.MODEL_GROUPS["light4"] == list(LIGHT4_COUNTS)
    states = {}
    for name, total in LIGHT4_COUNTS.items():
        model = models.build_model(name, 10)
        assert models.count_parameters(model) == total
        states[name] = model.state_dict()
    # no base entry name is used by two members, so by name they share the head alone
    base_names = [k for state in states.values() for k in state if k.startswith("base.")]
    assert len(base_names) == len(set(base_names))
    average = weighted_average(list(states.values()), [1, 2, 3, 4])
    expected_head = sum(w * s["head.weight"] for w, s in zip([1, 2, 3, 4], states.values())) / 10
    assert torch.allclose(average["head.weight"], expected_head)
    for name, state in states.items():       # an entry owned by one client is that client's
        assert all(torch.equal(average[k], v) for k, v in state.items() if k.startswith("base."))
    # light-lenet is SimpleCNN-mnist's network under BaseHeadSplit names
    lenet, simple = models.build_model("light-lenet", 10), models.build_model("simplecnn-mnist", 10)
    lenet.load_state_dict(dict(zip(lenet.state_dict(), simple.state_dict().values())))
    x = torch.randn(2, 1, 28, 28)
    assert torch.allclose(lenet.features(x), simple.features(x)) and torch.allclose(lenet(x), simple(x))


# ----------------------------------------------------------------------------- LG-FedAvg over light4

def test_lgfedavg_over_light4_shares_and_averages_only_the_common_head():
    sizes = (20, 12, 16, 8)
    args = algorithm_args(LGFedAvg, "--client_models", "light4", "--model", "light-lenet", "--n_parties", 4,
                          "--batch_size", 8, "--num_local_iterations", 2)
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (sum(sizes), 1, 28, 28), generator=generator, dtype=torch.uint8)
    labels = torch.arange(sum(sizes)) % 10
    starts = [sum(sizes[:k]) for k in range(4)]
    algorithm, data = synthetic_client_side(LGFedAvg, args, images, labels,
                                            [torch.arange(s, s + n) for s, n in zip(starts, sizes)])
    assert algorithm.setting.client_models == list(LIGHT4_COUNTS)
    server_state = algorithm.init_server(algorithm.setting.initial_weights["light-lenet"])
    download = algorithm.download(server_state, 1)
    assert set(download["weights"]) == {"head.weight", "head.bias"} and payload_bytes(download) == 4 * 850
    results = [run_client(algorithm, data, algorithm.download(server_state, k), {}, k, 0) for k in range(4)]
    for k, result in enumerate(results):
        architecture = algorithm.architecture(k)
        assert set(result.upload["weights"]) == {"head.weight", "head.bias"}
        assert payload_bytes(result.upload) == 4 * 850
        own_base = {key for key in algorithm.setting.initial_weights[architecture] if key.startswith("base.")}
        assert set(result.state["base"]) == own_base
    server = ServerContext(0, torch.Generator().manual_seed(0), torch.device("cpu"))
    new_state = algorithm.server_update(server_state, results, server)
    expected = sum(n * r.upload["weights"]["head.weight"].double() for n, r in zip(sizes, results)) / sum(sizes)
    assert torch.allclose(new_state["weights"]["head.weight"].double(), expected)
    # every architecture composes the new global head with its own base
    for k, result in enumerate(results):
        composed = algorithm.compose_weights(algorithm.architecture(k), algorithm.download(new_state, k), result.state)
        assert torch.equal(composed["head.weight"], new_state["weights"]["head.weight"])
        assert all(torch.equal(composed[key], value) for key, value in result.state["base"].items())


def test_lgfedavg_runs_over_light4_above_chance(tmp_path):
    argv = ["--client_models", "light4", "--model", "light-lenet", "--n_parties", 4, "--train_ratio", 0.95,
            "--num_local_iterations", 25, "--comm_round", 2, "--batch_size", 16, "--lr", 0.03, "--threads", 1,
            "--eval", "local", "--logdir", tmp_path, "--log_file_name", "lg"]
    assert main(LGFedAvg, list(map(str, argv))) == 0
    records = [json.loads(line) for line in open(tmp_path / "lg" / "metrics.jsonl")]
    assert records[-1]["accuracy"] > 0.25
    assert all(r["bytes_uploaded_by_kind"]["weights"] == 4 * 4 * 850 for r in records[:-1])


def test_lgfedavg_refuses_a_server_head_no_client_shares(tmp_path, capsys):
    # simplecnn-mnist's head is classifier.fc.*, light4's is head.*: nothing would be averaged
    argv = ["--client_models", "light4", "--model", "simplecnn-mnist", "--n_parties", 4, "--num_local_iterations", 1,
            "--comm_round", 1, "--batch_size", 8, "--threads", 1, "--eval", "local", "--logdir", tmp_path]
    assert main(LGFedAvg, list(map(str, argv))) == 2
    assert "head has no entry in common with that of --model simplecnn-mnist: nothing would be shared" \
        in capsys.readouterr().err
