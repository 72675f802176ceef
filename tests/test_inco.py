"""InCo aggregation and HeteroAvg (algorithms/inco/; spec datafree-hetero-privacy.md section 2): the
nested depth families of models.py (parameter counts, every member a name-prefix subset of the server
model, InCo's layer pairs), the InCo step against hand values and a transcription of the reference's
trace formulation, HeteroAvg's per-entry owner averaging, what each Hetero* combination sends and how
its server combines it, short runs above chance under --eval groups, and a resumed InCoScaffold run
equal to the uninterrupted one."""
import dataclasses
import math

import pytest
import torch
from torch import nn

import cvdataset
import models
from algorithms.inco.heteroavg import (HeteroAvg, HeteroMOON, HeteroNova, HeteroProx, HeteroScaffold, apply_update,
                                       average_update)
from algorithms.inco.inco import (InCoAvg, InCoMOON, InCoNova, InCoProx, InCoScaffold, inco_correction, inco_pairs,
                                  inco_step)
from conftest import (algorithm_args, assert_resume_equals_uninterrupted, assert_same_tensors,
                      interrupt_after, records_of, synthetic_client_side)
from engine import ServerContext, main, payload_bytes
from engine.executors import run_client

torch.set_num_threads(1)

INCO5_COUNTS = {"inco-cnn-1-1": 77_002, "inco-cnn-1-2": 150_858, "inco-cnn-2-2": 169_354,
                "inco-cnn-2-3": 243_210, "inco-cnn-3-3": 261_706}          # spec section 2
RESNET_COUNTS = {"resnet10-stage": 4_904_650, "resnet14-stage": 10_805_962, "resnet18-stage": 11_175_370,
                 "resnet22-stage": 17_076_682, "resnet26-stage": 17_446_090}   # torchvision's, 1-channel stem
ALL_CLASSES = [HeteroAvg, HeteroProx, HeteroScaffold, HeteroNova, HeteroMOON,
               InCoAvg, InCoProx, InCoScaffold, InCoNova, InCoMOON]


# ----------------------------------------------------------------------------- the families

@pytest.mark.parametrize("group, counts, server", [("inco5", INCO5_COUNTS, "inco-cnn-3-3"),
                                                   ("inco-resnets", RESNET_COUNTS, "resnet26-stage")])
def test_each_group_model_is_a_name_prefix_subset_of_the_server_model(group, counts, server):
    assert models.MODEL_GROUPS[group] == list(counts)                    # shallow to deep; the server last
    built = {name: models.build_model(name, 10, (1, 28, 28)) for name in counts}
    server_entries = built[server].state_dict()
    x = torch.randn(2, 1, 28, 28)
    for name, model in built.items():
        assert models.count_parameters(model) == counts[name], name
        entries = model.state_dict()
        assert all(key in server_entries and server_entries[key].shape == value.shape
                   for key, value in entries.items()), name
        assert models.head_prefix(model) == "fc." and model.classifier is model.fc
        model.eval()
        assert torch.equal(model(x), model.fc(model.features(x)))
    # a member is the first blocks of each stage: stage1.2.* only in the members with 3 stage1 blocks
    if group == "inco5":
        assert [any(k.startswith("stage1.2.") for k in built[n].state_dict()) for n in counts] == [False] * 4 + [True]
        assert "stage2.0.downsample.weight" in built["inco-cnn-1-1"].state_dict()
    # blocks: 10 clients in InCo's five consecutive groups of two
    assert models.client_architectures(group, None, 10, "blocks") == [n for n in counts for _ in range(2)]


def test_inco_pairs_each_deep_conv_with_its_stage_first_conv2():
    pairs = inco_pairs(models.build_model("inco-cnn-3-3", 10).state_dict())
    assert pairs == {f"stage{s}.{j}.conv{c}.weight": f"stage{s}.0.conv2.weight"
                     for s in (1, 2) for j in (1, 2) for c in (1, 2)}
    resnet_pairs = inco_pairs(models.build_model("resnet14-stage", 10).state_dict())
    assert resnet_pairs == {f"layer{s}.1.conv{c}.weight": f"layer{s}.0.conv2.weight" for s in (3, 4) for c in (1, 2)}
    assert inco_pairs(models.build_model("inco-cnn-1-1", 10).state_dict()) == {}      # one block a stage: nothing


# ----------------------------------------------------------------------------- the InCo step

def hand_correction(g, g0, theta_max=5.0, clip=0.1, eps=1e-7):
    """The spec's formula for one channel pair, in plain Python floats."""
    n, n0 = math.sqrt(sum(v * v for v in g)), math.sqrt(sum(v * v for v in g0))
    theta = min(max(abs(sum(a * b for a, b in zip(g0, g))) / (sum(v * v for v in g0) + eps), 0.0), theta_max)
    return [min(max((a / (n + eps) + theta * b / (n0 + eps)) * (n + n0) / 2, -clip), clip) for a, b in zip(g, g0)]


def test_inco_correction_against_hand_values_per_channel_pair_with_both_clamps_and_zero_norms():
    # four (out, in) pairs of 2x2 kernels: no clamp; theta clamped at 5 and an element at +0.1;
    # theta clamped and an element at -0.1; a zero target with a zero reference
    g = torch.tensor([[0.03, 0.04, 0.0, 0.0], [0.06, 0.08, 0.0, 0.0],
                      [0.06, 0.08, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]).reshape(2, 2, 2, 2)
    g0 = torch.tensor([[0.02, 0.0, 0.0, 0.0], [0.01, 0.0, 0.0, 0.0],
                       [-0.01, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]).reshape(2, 2, 2, 2)
    corrected = inco_correction(g, g0).reshape(4, 4)
    for pair in range(4):
        expected = hand_correction(g.reshape(4, 4)[pair].tolist(), g0.reshape(4, 4)[pair].tolist())
        assert torch.allclose(corrected[pair], torch.tensor(expected), atol=1e-6), pair
    # the values by hand: theta = 1.5 (0.0006 / 0.0004): ([0.6, 0.8] + 1.5 [1, 0]) * (0.05 + 0.02) / 2
    assert torch.allclose(corrected[0, :2], torch.tensor([0.0735, 0.028]), atol=1e-4)
    # theta = 6 -> 5: ([0.6, 0.8] + 5 [1, 0]) * 0.055 = [0.308, 0.044] -> [0.1, 0.044]; with -G0: [-0.242] -> -0.1
    assert torch.allclose(corrected[1, :2], torch.tensor([0.1, 0.044]), atol=1e-6)
    assert torch.allclose(corrected[2, :2], torch.tensor([-0.1, 0.044]), atol=1e-6)
    assert torch.equal(corrected[3], torch.zeros(4))
    # zero reference: theta = 0 and G' = G / (n + eps) * n / 2 ~ G / 2; zero target: G' = 0
    target = torch.tensor([0.02, -0.04, 0.0, 0.01]).reshape(1, 1, 2, 2)
    assert torch.allclose(inco_correction(target, torch.zeros_like(target)), target / 2, atol=1e-7)
    assert torch.equal(inco_correction(torch.zeros_like(target), target), torch.zeros_like(target))
    # the flags: a lower theta clamp, a wider element clamp
    assert torch.allclose(inco_correction(g, g0, theta_max=1.0, clip=1.0).reshape(4, 4)[1],
                          torch.tensor(hand_correction([0.06, 0.08, 0, 0], [0.01, 0, 0, 0], 1.0, 1.0)), atol=1e-6)


def reference_trace_form(g, g0, theta_max=5.0):
    """InCo's aggregate_IN_gradients restated (matrix norms, traces of G0^T G), for any kernel size."""
    kh, kw = g.shape[2:]
    norm = torch.linalg.matrix_norm(g)[..., None, None].expand(-1, -1, kh, kw)
    norm0 = torch.linalg.matrix_norm(g0)[..., None, None].expand(-1, -1, kh, kw)
    g0_t = g0.transpose(-2, -1)
    a = torch.matmul(g0_t, g0).diagonal(dim1=-1, dim2=-2).sum(-1)[..., None, None].expand(-1, -1, kh, kw)
    b = torch.matmul(g0_t, g).diagonal(dim1=-1, dim2=-2).sum(-1)[..., None, None].expand(-1, -1, kh, kw).abs()
    theta = torch.clamp(b / (a + 1e-7), min=0, max=theta_max)
    return torch.clamp((g / (norm + 1e-7) + theta * g0 / (norm0 + 1e-7)) * ((norm + norm0) / 2), -0.1, 0.1)


@pytest.mark.parametrize("kernel", [3, 5])
def test_inco_correction_equals_the_reference_trace_formulation(kernel):
    generator = torch.Generator().manual_seed(0)
    g = torch.randn(6, 4, kernel, kernel, generator=generator) * 0.02
    g0 = torch.randn(6, 4, kernel, kernel, generator=generator) * 0.02
    assert torch.allclose(inco_correction(g, g0), reference_trace_form(g, g0), atol=1e-6)


def test_inco_step_corrects_only_targets_present_from_the_uncorrected_update():
    server = models.build_model("inco-cnn-3-3", 10).state_dict()
    generator = torch.Generator().manual_seed(1)
    # the update of a round in which nobody with stage1 block 2 was sampled
    update = {k: torch.randn(v.shape, generator=generator) * 0.01 for k, v in server.items()
              if not k.startswith("stage1.2.")}
    corrected = inco_step(update)
    assert set(corrected) == set(update)
    changed = {k for k in update if not torch.equal(update[k], corrected[k])}
    assert changed == {"stage1.1.conv1.weight", "stage1.1.conv2.weight"} | {
        f"stage2.{j}.conv{c}.weight" for j in (1, 2) for c in (1, 2)}
    assert torch.allclose(corrected["stage2.2.conv1.weight"],
                          inco_correction(update["stage2.2.conv1.weight"], update["stage2.0.conv2.weight"]))
    assert all(torch.equal(update[k], v) for k, v in corrected.items() if k not in changed)   # reference as averaged


# ----------------------------------------------------------------------------- HeteroAvg's server

def test_heteroavg_averages_each_entry_over_its_owners_unweighted():
    w = {"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([0.0]), "untouched": torch.tensor([7.0]),
         "bn.running_var": torch.tensor([0.5, 0.5]), "bn.num_batches_tracked": torch.tensor(10)}
    uploads = [{"a": torch.tensor([2.0, 2.0]), "b": torch.tensor([3.0]), "bn.running_var": torch.tensor([0.0, 0.7]),
                "bn.num_batches_tracked": torch.tensor(15)},
               {"a": torch.tensor([4.0, 5.0]), "bn.running_var": torch.tensor([-0.4, 0.5]),
                "bn.num_batches_tracked": torch.tensor(16)}]
    update = average_update(w, uploads)
    assert set(update) == {"a", "b", "bn.running_var", "bn.num_batches_tracked"}
    assert torch.allclose(update["a"], torch.tensor([2.0, 1.5]))       # ((1, 0) + (3, 3)) / 2: no sample weights
    assert torch.allclose(update["b"], torch.tensor([3.0]))            # its one owner's delta
    new = apply_update(w, update)
    assert torch.allclose(new["a"], torch.tensor([3.0, 3.5])) and torch.equal(new["untouched"], w["untouched"])
    assert torch.allclose(new["bn.running_var"], torch.tensor([0.0, 0.6]))      # 0.5 - 0.7 clamped at 0
    tracked = new["bn.num_batches_tracked"]
    assert tracked.dtype == torch.int64 and tracked.item() == 15                 # 10 + int((5 + 6) / 2)
    assert torch.equal(w["a"], torch.tensor([1.0, 2.0]))                 # the old weights are not changed


def client_side(cls, *flags, n_parties=5):
    """`cls` over random Fashion-MNIST-shaped data, one client per inco5 member (blocks)."""
    args = algorithm_args(cls, "--model", "inco-cnn-3-3", "--client_models", "inco5", "--client_assignment",
                          "blocks", "--n_parties", n_parties, "--batch_size", 8, "--num_local_iterations", 2,
                          "--optimizer", "adam", "--lr", 0.001, "--reg", 0, *flags)
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (16 * n_parties, 1, 28, 28), generator=generator, dtype=torch.uint8)
    labels = torch.arange(16 * n_parties) % 10
    return synthetic_client_side(cls, args, images, labels, [torch.arange(16 * k, 16 * k + 16)
                                                             for k in range(n_parties)])


def one_round(algorithm, data, server_state, round_index=0, states=None):
    results = [run_client(algorithm, data, algorithm.download(server_state, k), (states or {}).get(k, {}), k,
                          round_index) for k in range(algorithm.args.n_parties)]
    return results, ServerContext(round_index, torch.Generator().manual_seed(0), torch.device("cpu"))


@pytest.mark.parametrize("cls", ALL_CLASSES)
def test_each_client_receives_and_sends_only_its_sub_model_and_the_server_updates_what_was_sent(cls):
    algorithm, data = client_side(cls)
    initial = algorithm.setting.initial_weights
    server_state = algorithm.init_server(initial["inco-cnn-3-3"])
    shallow = algorithm.download(server_state, 0)                  # client 0: inco-cnn-1-1
    assert set(shallow["weights"]) == set(initial["inco-cnn-1-1"])
    if cls in (HeteroScaffold, InCoScaffold):
        assert set(shallow) == {"weights", "control"}
        assert set(shallow["control"]) == {k for k, _ in algorithm.model("x", "inco-cnn-1-1").named_parameters()}
    results, server = one_round(algorithm, data, server_state)
    sizes = {name: models.count_parameters(models.build_model(name, 10)) * 4 for name in INCO5_COUNTS}
    for k, result in enumerate(results):
        architecture = algorithm.architecture(k)
        assert set(result.upload["weights"]) == set(initial[architecture])
        assert payload_bytes(result.upload["weights"]) == sizes[architecture]
    before = dict(server_state["weights"])
    # only clients 0 and 1 report: nobody sampled owns stage1.1 or stage2.2, which stay as they were
    server_state = algorithm.server_update(server_state, results[:2], server)
    after = server_state["weights"]
    assert set(after) == set(before)
    for key in before:
        owned = key in initial["inco-cnn-1-2"]                        # what clients 0 and 1 have
        assert torch.equal(after[key], before[key]) != owned, key
        assert torch.isfinite(after[key]).all()
    if cls in (HeteroAvg, HeteroProx, HeteroMOON, HeteroScaffold):      # no InCo: exactly the mean delta
        for key in ("stage2.1.conv1.weight", "fc.weight"):
            owners = [r.upload["weights"][key] for r in results[:2] if key in r.upload["weights"]]
            expected = before[key] + sum(w - before[key] for w in owners) / len(owners)
            assert torch.allclose(after[key], expected, atol=1e-7), key
    if cls.__name__.startswith("InCo"):
        step = after["stage2.1.conv1.weight"] - before["stage2.1.conv1.weight"]
        mean = results[1].upload["weights"]["stage2.1.conv1.weight"] - before["stage2.1.conv1.weight"]
        assert not torch.allclose(step, mean) and step.abs().max() <= 0.1 + 1e-6


def test_heteroscaffold_averages_control_variates_over_each_entry_owners():
    algorithm, data = client_side(HeteroScaffold, n_parties=10)        # two clients per member
    server_state = algorithm.init_server(algorithm.setting.initial_weights["inco-cnn-3-3"])
    results, server = one_round(algorithm, data, server_state)
    sampled = [results[0], results[9]]                                  # inco-cnn-1-1 and inco-cnn-3-3
    server_state = algorithm.server_update(server_state, sampled, server)
    control = server_state["control"]
    delta = lambda r, key: r.upload["control_delta"][key]               # noqa: E731
    # stem: every client owns it (N = 10); stage1.2: only the two inco-cnn-3-3 clients (N = 2)
    assert torch.allclose(control["stem.weight"], (delta(results[0], "stem.weight")
                                                   + delta(results[9], "stem.weight")) / 10)
    assert torch.allclose(control["stage1.2.conv1.weight"], delta(results[9], "stage1.2.conv1.weight") / 2)
    assert set(results[0].state["control"]) == set(results[0].upload["control_delta"])     # c_i over its own entries
    assert "stage1.2.conv1.weight" not in results[0].state["control"]


def test_heteronova_normalises_by_each_clients_steps_and_is_heteroavg_for_equal_steps():
    algorithm, data = client_side(HeteroNova)
    weights = algorithm.setting.initial_weights["inco-cnn-3-3"]
    server_state = algorithm.init_server(weights)
    results, server = one_round(algorithm, data, server_state)
    plain = HeteroAvg.averaged_update(algorithm, server_state, results)
    normalised = algorithm.averaged_update(server_state, results)
    for key in plain:                                                   # 2 steps each: the same update
        assert torch.allclose(plain[key], normalised[key], atol=1e-7), key
    # tau = 2 and 6 over stem.weight (owned by both): a = tau (Adam), p = 1/2:
    # u = (2 + 6)/2 * (d_0 / 2 + d_1 / 6) / 2
    two = [results[0], dataclasses.replace(results[4], metrics={**results[4].metrics, "steps": 6})]
    u = algorithm.averaged_update(server_state, two)["stem.weight"]
    d = [r.upload["weights"]["stem.weight"] - weights["stem.weight"] for r in two]
    assert torch.allclose(u, 4 * (d[0] / 2 + d[1] / 6) / 2, atol=1e-7)
    # buffers and entries only one owner has: stage1.2 from the deep client alone, / a_i * a_i
    assert torch.allclose(algorithm.averaged_update(server_state, two)["stage1.2.conv1.weight"],
                          two[1].upload["weights"]["stage1.2.conv1.weight"] - weights["stage1.2.conv1.weight"],
                          atol=1e-7)


def test_heteromoon_first_previous_model_is_the_initial_server_models_entries(monkeypatch):
    algorithm, data = client_side(HeteroMOON)
    server_state = algorithm.init_server(algorithm.setting.initial_weights["inco-cnn-3-3"])
    previous = {}
    prepare = HeteroMOON.prepare_client

    def recording(self, ctx, model):
        prepare(self, ctx, model)
        previous[ctx.round, ctx.client_id] = {k: v.clone() for k, v in self.previous_model.state_dict().items()}
    monkeypatch.setattr(HeteroMOON, "prepare_client", recording)
    results, _ = one_round(algorithm, data, server_state)
    one_round(algorithm, data, server_state, 1, {k: r.state for k, r in enumerate(results)})
    initial = algorithm.setting.initial_weights
    own_draw = initial["inco-cnn-2-2"]                                  # the member's own initialisation
    server_entries = {k: initial["inco-cnn-3-3"][k] for k in own_draw}
    assert not torch.equal(server_entries["stem.weight"], own_draw["stem.weight"])
    assert_same_tensors(server_entries, previous[0, 2])                 # round 0: the initial server model's
    assert_same_tensors(results[2].state["local_model"], previous[1, 2])    # then: what it trained last


# ----------------------------------------------------------------------------- short runs

class TinyNestedCNN(models.NestedDepthCNN):
    """inco5's layers and names at widths 8 and 16 (stem 1->8, stage1 8 ch, stage2 16 ch): the same
    nesting and InCo pairs, a sixteenth of the compute, so the runs below stay short."""

    def __init__(self, blocks, num_classes):
        nn.Module.__init__(self)
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.stage1 = nn.Sequential(*[models.ResidualBlock(8, 8) for _ in range(blocks[0])])
        self.stage2 = nn.Sequential(*[models.ResidualBlock(8 if j == 0 else 16, 16) for j in range(blocks[1])])
        self.fc = nn.Linear(16, num_classes)


TINY = {f"tiny-{name}": blocks for name, blocks in models.INCO5.items()}
for _name, _blocks in TINY.items():
    models.register_model(_name, lambda num_classes, b=_blocks: TinyNestedCNN(b, num_classes), (1, 28, 28))


SMALL_DATASETS = {}       # read once for all the tests of this file


@pytest.fixture
def small_fashion_mnist(monkeypatch):
    """Fashion-MNIST cut to its first 3,000 training and 500 test images."""
    real, cache = cvdataset.load_dataset, SMALL_DATASETS

    def load(name, datadir="./data/"):
        if name not in cache:
            full = real(name, datadir)
            cache[name] = dataclasses.replace(full, train_images=full.train_images[:3000],
                                              train_labels=full.train_labels[:3000],
                                              test_images=full.test_images[:500], test_labels=full.test_labels[:500])
        return cache[name]
    monkeypatch.setattr(cvdataset, "load_dataset", load)


RUN = ["--model", "tiny-inco-cnn-3-3", "--client_models", ",".join(TINY), "--client_assignment", "blocks",
       "--n_parties", 5, "--partition", "iid", "--eval", "groups", "--optimizer", "adam", "--lr", 0.003, "--reg", 0,
       "--batch_size", 32, "--epochs", 1, "--drop_last", "--no_augment", "--comm_round", 3, "--threads", 1,
       "--device", "cpu"]


def run(cls, tmp_path, *flags, name=None, observers=()):
    name = name or cls.name
    status = main(cls, [*map(str, RUN), *map(str, flags), "--logdir", str(tmp_path), "--log_file_name", name],
                  observers=observers)
    return status, tmp_path / name



@pytest.mark.parametrize("cls", [HeteroAvg, InCoAvg])
def test_short_runs_score_every_group_above_chance(cls, tmp_path, small_fashion_mnist):
    status, run_dir = run(cls, tmp_path)
    assert status == 0
    records = records_of(run_dir)
    last = records[-1]
    assert list(last["group_accuracies"]) == list(TINY)
    assert last["accuracy"] == pytest.approx(sum(last["group_accuracies"].values()) / 5)
    # chance is 0.1 (+-0.013 on 500 images); after 3 rounds of 18 steps: 0.34 (HeteroAvg), 0.28 (InCoAvg)
    assert last["accuracy"] > 0.2 and min(last["group_accuracies"].values()) > 0.15
    sizes = [models.count_parameters(models.build_model(name, 10)) * 4 for name in TINY]
    assert all(r["bytes_uploaded_per_client"] == [s + 8 for s in sizes] for r in records)   # + its sample count
    assert all(r["bytes_downloaded_per_client"] == sizes for r in records)
    log = (run_dir / "log.txt").read_text()
    assert ("InCo: stage1.1.conv1.weight" in log) == (cls is InCoAvg)



def test_incoscaffold_resumed_run_equals_the_uninterrupted_one(tmp_path, small_fashion_mnist):
    flags = ["--epochs", 0, "--num_local_iterations", 4, "--sample_fraction", 0.6]
    status, whole = run(InCoScaffold, tmp_path, *flags, name="whole")
    assert status == 0
    status, interrupted = run(InCoScaffold, tmp_path, *flags, name="interrupted", observers=[interrupt_after(1)])
    assert status == 130
    assert_resume_equals_uninterrupted(InCoScaffold, whole, interrupted, {"weights", "control"})


@pytest.mark.parametrize("cls, flags, message", [
    (InCoAvg, ["--model", "simplecnn-mnist", "--client_models", ""], "no <stage>.<J>.conv1/conv2.weight"),
    (HeteroAvg, ["--model", "tiny-inco-cnn-1-1"], "client model tiny-inco-cnn-1-2 is not part of --model"),
    (HeteroProx, ["--server_momentum", 0.9], "drop --server_momentum"),
    (InCoNova, ["--optimizer", "sgd", "--momentum", 1.0], "0 <= --momentum < 1"),
    (InCoAvg, ["--inco_clip", 0], "--inco_clip must be > 0"),
])
def test_bad_settings_are_refused_in_one_line(cls, flags, message, tmp_path, small_fashion_mnist, capsys):
    assert run(cls, tmp_path, *flags)[0] == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
