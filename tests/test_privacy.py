"""The gradient-inversion privacy harness (privacy.py): metrics against hand values and
scikit-image, label rules, the gradient recovered from a probe's upload and the simulated
update of the realistic mode against the real ones, Inverting Gradients on one image of an
untrained SimpleCNN, a run with the harness equal to one without (serial and --workers 2),
the table and picture, and bad flags."""
import json
import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import cvdataset
import privacy
from conftest import random_client_side
from engine import main
from fedavg import FedAvg
from fedprox import FedProx
from scaffold import SCAFFOLD

TINY = ["--n_parties", 3, "--num_local_iterations", 2, "--batch_size", 8, "--comm_round", 2, "--beta", 0.5,
        "--threads", 1]
HARNESS = ["--privacy_rounds", 1, "--privacy_clients", "0,2", "--privacy_batch_sizes", "1,2",
           "--privacy_attacks", "ig,idlg", "--privacy_modes", "probe,realistic", "--privacy_iterations", 4,
           "--privacy_dlg_iterations", 1]


# ----------------------------------------------------------------------------- metrics

def test_psnr_against_hand_values():
    references = torch.zeros(2, 1, 12, 12)
    images = torch.stack([torch.full((1, 12, 12), 0.1), torch.full((1, 12, 12), 0.01)])    # MSE 1e-2, 1e-4
    values, capped = privacy.psnr(images, references)
    assert values.tolist() == pytest.approx([20.0, 40.0]) and not capped.any()
    scores = privacy.image_scores(images, references)
    assert scores["psnr_mean"] == pytest.approx(30.0) and scores["psnr_max"] == pytest.approx(40.0)
    values, capped = privacy.psnr(references, references)            # perfect: capped and flagged
    assert values.tolist() == [privacy.PSNR_CAP] * 2 and capped.all()


def test_ssim_against_hand_values_and_scikit_image():
    from skimage.metrics import structural_similarity
    # constant images a, b: SSIM = (2ab + C1) / (a^2 + b^2 + C1) (the contrast-structure term is C2 / C2)
    a, b = torch.full((1, 1, 28, 28), 0.2), torch.full((1, 1, 28, 28), 0.6)
    c1 = (0.01 * 1.0) ** 2
    assert privacy.ssim(a, b).item() == pytest.approx((2 * 0.2 * 0.6 + c1) / (0.04 + 0.36 + c1), abs=1e-6)
    assert privacy.ssim(b, b).item() == pytest.approx(1.0)
    generator = torch.Generator().manual_seed(0)
    originals = cvdataset.load_dataset("fashionmnist").train_images[:3].float() / 255
    noisy = (originals + 0.2 * torch.randn(originals.shape, generator=generator)).clamp(0, 1)
    ours = privacy.ssim(noisy, originals)
    reference = [structural_similarity(noisy[i, 0].double().numpy(), originals[i, 0].double().numpy(),
                                       gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1.0)
                 for i in range(3)]
    assert ours.tolist() == pytest.approx(reference, abs=1e-6)
    assert 0.05 < min(reference) < max(reference) < 0.95
    # torchmetrics' own reduction averages the reflect-padded map: not the valid region
    from torchmetrics.functional.image import structural_similarity_index_measure
    padded = structural_similarity_index_measure(noisy.double(), originals.double(), data_range=1.0, reduction="none")
    assert (padded - torch.tensor(reference)).abs().max() > 1e-3


def test_hungarian_pairing_finds_the_cheapest_assignment_not_the_greedy_one():
    # one-pixel images: originals 0 and 1, reconstructions 0.4 and -0.5; MSEs r0-o0 0.16, r0-o1 0.36,
    # r1-o0 0.25, r1-o1 2.25. Greedy (cheapest pair first) takes r0-o0 then r1-o1 (2.41); the
    # assignment r0-o1, r1-o0 costs 0.61: original 0 gets reconstruction 1, original 1 gets 0
    originals = torch.tensor([0.0, 1.0]).view(2, 1, 1, 1)
    reconstructions = torch.tensor([0.4, -0.5]).view(2, 1, 1, 1)
    assert privacy.hungarian_pairing(reconstructions, originals).tolist() == [1, 0]
    shuffled = torch.rand(5, 1, 6, 6, generator=torch.Generator().manual_seed(1))
    permutation = torch.tensor([3, 0, 4, 1, 2])
    assert torch.equal(shuffled[permutation][privacy.hungarian_pairing(shuffled[permutation], shuffled)], shuffled)


# ----------------------------------------------------------------------------- labels

def test_idlg_and_bias_sign_label_rules():
    torch.manual_seed(0)
    from models import build_model
    model = build_model("simplecnn-mnist", 10, (1, 28, 28))
    weight_name, bias_name = privacy.last_layer_names(model)
    assert (weight_name, bias_name) == ("classifier.fc.weight", "classifier.fc.bias")
    x = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    params = dict(model.named_parameters())
    for label in (0, 3, 9):           # one image: iDLG's rule is exact behind a ReLU
        loss = F.cross_entropy(model(x[:1]), torch.tensor([label]))
        weight_gradient, = torch.autograd.grad(loss, [params[weight_name]])
        assert privacy.idlg_label(weight_gradient) == label
    loss = F.cross_entropy(model(x), torch.tensor([2, 5, 5, 7]))
    bias_gradient, = torch.autograd.grad(loss, [params[bias_name]])
    assert set(privacy.labels_from_bias(bias_gradient, 4).tolist()) == {2, 5, 7}
    # hand values: present = {1: -0.4, 4: -0.1}; three slots: 1 (0.4 / 2 = 0.2 > 0.1 / 2) gets the third
    hand = torch.tensor([0.1, -0.4, 0.05, 0.1, -0.1, 0.25])
    assert privacy.labels_from_bias(hand, 3).tolist() == [1, 1, 4]
    assert privacy.labels_from_bias(hand, 1).tolist() == [1]
    assert privacy.label_scores([1, 1, 4], [1, 4, 4]) == {"label_accuracy": pytest.approx(2 / 3),
                                                          "label_precision": 1.0, "label_recall": 1.0}
    assert privacy.label_scores([1, 7], [0, 1, 2], multiset=False)["label_accuracy"] == 0.5


# ----------------------------------------------------------------------------- targets from uploads

def relative_error(found, expected):
    """||found - expected|| / ||expected||, all tensors as one vector."""
    difference = sum((a.double() - b.double()).pow(2).sum() for a, b in zip(found, expected))
    return (difference / sum(b.double().pow(2).sum() for b in expected)).sqrt().item()


def ce_gradient(model, weights, names, x, y):
    model.load_state_dict(weights)
    params = dict(model.named_parameters())
    loss = F.cross_entropy(model(x), y)
    return [g.double() for g in torch.autograd.grad(loss, [params[n] for n in names])]


@pytest.mark.parametrize("cls", [FedAvg, FedProx, SCAFFOLD])
def test_the_probe_recovers_the_cross_entropy_gradient_exactly(cls):
    """One SGD step (momentum 0.9, weight decay 1e-5; SCAFFOLD with nonzero c and c_i) turned
    back into the gradient equals the CE gradient at the global weights on the probe batch,
    and the probe leaves the client's state and the global RNG as they were."""
    algorithm, data = random_client_side(cls, "--reg", 0.01)
    initial = algorithm.setting.initial_weights[algorithm.args.model]
    download = algorithm.download(algorithm.init_server(initial), 0)
    generator = torch.Generator().manual_seed(3)
    state_before = {}
    if cls is SCAFFOLD:
        download["control"] = {n: 0.1 * torch.randn(c.shape, generator=generator)
                               for n, c in download["control"].items()}
        state_before = {"control": {n: 0.1 * torch.randn(c.shape, generator=generator)
                                    for n, c in download["control"].items()}}
    kept = privacy.clone_state(state_before)
    batch = privacy.probe_batch(data.clients[0], 2, torch.Generator().manual_seed(4))
    rngs = torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()
    with privacy.global_rng_untouched(torch.device("cpu")):
        result = privacy.probe_update(algorithm, 0, 0, download, state_before, data.clients[0], batch,
                                      torch.Generator().manual_seed(5))
        torch.rand(1), np.random.rand(), random.random()
    assert torch.equal(torch.get_rng_state(), rngs[0]) and (np.random.get_state()[1] == rngs[1]).all()
    assert random.getstate() == rngs[2]
    assert result.metrics["steps"] == 1
    if cls is SCAFFOLD:
        assert all(torch.equal(kept["control"][n], state_before["control"][n]) for n in kept["control"])
    model = algorithm.new_model()
    surface = privacy.upload_surface(algorithm, model, download, result, state_before, "probe")
    names = [n for n, _ in model.named_parameters()]
    expected = ce_gradient(algorithm.new_model(), initial, names, *batch)
    assert relative_error(surface.target, expected) < 1e-4
    assert surface.kind == "gradient" and privacy.infer_labels(surface, 2).tolist() == sorted(batch[1].tolist())


def test_a_batch_norm_model_is_attacked_in_train_mode_without_touching_its_statistics():
    """A model with BatchNorm trained on the batch's own statistics; the attacker's gradient
    function does the same (IG issue #6): it equals autograd of the model in train mode, and the
    running statistics it was given stay as they were (eval mode would give another gradient)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                                torch.nn.Flatten(), torch.nn.Linear(4 * 26 * 26, 10))
    model[1].running_mean.normal_()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    names = [n for n, _ in model.named_parameters()]
    x, y = torch.randn(3, 1, 28, 28), torch.tensor([1, 2, 3])
    given = {k: v.clone() for k, v in weights.items()}
    assert privacy.has_batch_norm(model)
    gradient_fn = privacy.model_gradient_fn(model, weights, names)
    found = [g.double() for g in gradient_fn(x, y)]
    assert all(torch.equal(weights[k], given[k]) for k in given)
    model.train()
    expected = ce_gradient(model, weights, names, x, y)
    assert relative_error(found, expected) < 1e-6
    model.eval()
    assert relative_error(ce_gradient(model, weights, names, x, y), expected) > 1e-2


@pytest.mark.parametrize("cls", [FedAvg, SCAFFOLD])
def test_the_simulated_update_at_the_true_batch_equals_the_real_upload(cls):
    """A client of 8 images, batch 8, no augmentation: its real round (2 steps, momentum 0.9,
    weight decay) is what the realistic mode's simulation gives at the true images and labels."""
    algorithm, data = random_client_side(cls, "--reg", 0.01, sizes=(8, 8))
    data.clients[0].augment = False             # what --no_augment does (the helper's clients augment)
    initial = algorithm.setting.initial_weights[algorithm.args.model]
    download = algorithm.download(algorithm.init_server(initial), 0)
    state_before = {}
    if cls is SCAFFOLD:
        generator = torch.Generator().manual_seed(3)
        download["control"] = {n: 0.1 * torch.randn(c.shape, generator=generator)
                               for n, c in download["control"].items()}
        state_before = {"control": {n: 0.1 * torch.randn(c.shape, generator=generator)
                                    for n, c in download["control"].items()}}
    from engine.executors import run_client
    result = run_client(algorithm, data, download, state_before, 0, 0)
    model = algorithm.new_model()
    surface = privacy.upload_surface(algorithm, model, download, result, state_before, "realistic")
    client = data.clients[0]
    x = cvdataset.normalise(client.images, client.mean, client.std)
    simulated = surface.gradient_fn(x, client.labels)
    assert surface.kind == "update (2 steps)"
    assert relative_error(simulated, surface.target) < 1e-4
    assert privacy.cosine_cost(simulated, surface.target).item() < 1e-6


# ----------------------------------------------------------------------------- the attack works

def test_inverting_gradients_rebuilds_one_image_of_an_untrained_simplecnn_far_above_noise():
    """One Fashion-MNIST image, its gradient on an untrained simplecnn-mnist: the label comes out
    by iDLG's rule and IG (library preset, 200 iterations: a smoke budget) reaches a PSNR 4 dB
    above uniform noise (measured: 10.7 dB against 5.6; SSIM 0.45 against 0.01)."""
    from models import build_model
    torch.manual_seed(0)
    model = build_model("simplecnn-mnist", 10, (1, 28, 28))
    weights, names = model.state_dict(), [n for n, _ in model.named_parameters()]
    dataset = cvdataset.load_dataset("fashionmnist")
    x, y = cvdataset.normalise(dataset.train_images[:1], (0.5,), (0.5,)), dataset.train_labels[:1]
    gradient_fn = privacy.model_gradient_fn(model, weights, names)
    target = [g.detach() for g in gradient_fn(x, y)]
    weight_name, bias_name = privacy.last_layer_names(model)
    surface = privacy.AttackSurface(gradient_fn, target, target[names.index(weight_name)],
                                    target[names.index(bias_name)])
    settings = dict(privacy.IG_PRESETS["library"], iterations=200, dlg_iterations=1)
    result, labels = privacy.run_attack("ig", surface, (1, 28, 28), 1, torch.Generator().manual_seed(0), settings,
                                        10, (-1.0, 1.0))
    assert labels.tolist() == y.tolist()
    original = privacy.to_unit_range(x, (0.5,), (0.5,))
    reconstruction = privacy.to_unit_range(result.images, (0.5,), (0.5,))
    noise = torch.rand(original.shape, generator=torch.Generator().manual_seed(1))
    attack, floor = privacy.image_scores(reconstruction, original), privacy.image_scores(noise, original)
    assert attack["psnr_mean"] > floor["psnr_mean"] + 4
    assert attack["ssim_mean"] > 0.3 > 0.05 > floor["ssim_mean"]
    assert result.loss < 0.1 and not result.diverged


# ----------------------------------------------------------------------------- runs with the harness

def run(cls, tmp_path, name, *flags):
    status = main(cls, [*map(str, TINY), *map(str, flags), "--logdir", str(tmp_path), "--log_file_name", name])
    assert status == 0
    folder = tmp_path / name
    return folder, [json.loads(line) for line in open(folder / "metrics.jsonl")]


@pytest.fixture(scope="module")
def scaffold_runs(tmp_path_factory):
    """SCAFFOLD without the harness, with it, and with part of it (B = 1, IG) on 2 workers."""
    tmp_path = tmp_path_factory.mktemp("privacy")
    return {name: run(SCAFFOLD, tmp_path, f"scaffold_{name}", *flags)
            for name, flags in [("plain", []), ("harness", HARNESS), ("workers", [*HARNESS, "--workers", 2,
                                                                                 "--privacy_batch_sizes", 1,
                                                                                 "--privacy_attacks", "ig"])]}


def test_unknown_parameters_are_fitted_with_the_images():
    """A surface whose classifier the attacker does not know (HyperFL's realistic attacker): the
    extractor gradient of one image under the true head; the attacker starts from another head.
    Fitting the head with the image (AttackSurface.unknown) ends at a lower gradient-matching
    cost than keeping the wrong head, from the same seed and budget; the trial's copies move, the
    starting guess does not."""
    from models import build_model
    torch.manual_seed(0)
    model = build_model("simplecnn-mnist", 10, (1, 28, 28))
    true_weights = model.state_dict()
    torch.manual_seed(1)
    guess = {k: v for k, v in build_model("simplecnn-mnist", 10, (1, 28, 28)).state_dict().items()
             if k.startswith("classifier")}
    names = [n for n, _ in model.named_parameters() if not n.startswith("classifier")]
    x, y = torch.rand(1, 1, 28, 28, generator=torch.Generator().manual_seed(2)) * 2 - 1, torch.tensor([3])
    target = [g.detach() for g in privacy.model_gradient_fn(model, true_weights, names)(x, y)]
    starting = {k: v.clone() for k, v in guess.items()}
    wrong_head = {**true_weights, **guess}
    fitted = privacy.AttackSurface(privacy.model_gradient_fn(model, wrong_head, names), target, unknown=guess)
    frozen = privacy.AttackSurface(privacy.model_gradient_fn(model, wrong_head, names), target)
    costs = [privacy.inverting_gradients(surface, None, (1, 28, 28), 1, torch.Generator().manual_seed(0),
                                         iterations=60, tv=0.0, signed=False).loss for surface in (fitted, frozen)]
    assert costs[0] < 0.8 * costs[1]
    assert all(torch.equal(guess[k], starting[k]) for k in guess)


def test_the_harness_changes_nothing_the_run_computes(scaffold_runs):
    plain, plain_records = scaffold_runs["plain"]
    for name in ("harness", "workers"):
        folder, records = scaffold_runs[name]
        assert [line for line in open(folder / "log.txt") if line.startswith(">> ")] == \
               [line for line in open(plain / "log.txt") if line.startswith(">> ")]
        strip = lambda r: {k: v for k, v in r.items() if k not in ("seconds", "privacy")}     # noqa: E731
        assert [strip(r) for r in records] == [strip(r) for r in plain_records]
        assert "privacy" in records[1] and "privacy" not in records[0]
        ours, theirs = (torch.load(f / "checkpoint.pt", weights_only=True) for f in (folder, plain))
        for key in ("server_state", "client_states"):
            assert json.dumps(ours[key], default=lambda t: t.tolist()) == \
                   json.dumps(theirs[key], default=lambda t: t.tolist())


def test_privacy_records_say_what_was_attacked_and_do_not_depend_on_the_executor(scaffold_runs):
    records = [json.loads(line) for line in open(scaffold_runs["harness"][0] / "privacy.jsonl")]
    assert len(records) == 2 * 2 * 2 * 2       # clients x modes x B x attacks
    assert {(r["client"], r["mode"], r["batch_size"], r["attack"]) for r in records} == \
           {(k, m, b, a) for k in (0, 2) for m in ("probe", "realistic") for b in (1, 2) for a in ("ig", "idlg")}
    for r in records:
        assert r["algorithm"] == "scaffold" and r["round"] == 1 and r["upload_kinds"] == ["control_delta", "weights"]
        assert r["target"] == ("gradient" if r["mode"] == "probe" else "update (2 steps)")
        assert math.isfinite(r["psnr_mean"]) and -1 <= r["ssim_mean"] <= 1 and 0 <= r["label_accuracy"] <= 1
        assert r["iterations"] == (4 if r["attack"] == "ig" else 1)
        if r["mode"] == "probe" and r["batch_size"] == 1:
            assert r["label_accuracy"] == 1.0     # iDLG's rule on a recovered single-image gradient
    parallel = [json.loads(line) for line in open(scaffold_runs["workers"][0] / "privacy.jsonl")]
    drop = lambda r: {k: v for k, v in r.items() if k not in ("seconds", "run")}       # noqa: E731
    assert [drop(r) for r in parallel] == [drop(r) for r in records if r["batch_size"] == 1 and r["attack"] == "ig"]
    assert len(parallel) == 4


def test_main_writes_the_privacy_table_and_the_picture(scaffold_runs, tmp_path, capsys):
    folder = scaffold_runs["harness"][0]
    assert privacy.main([str(folder), "-o", str(tmp_path)]) == 0
    table = (tmp_path / "privacy_table.md").read_text()
    assert "| SCAFFOLD | probe | 1 | IG | 2" in table and "| SCAFFOLD | realistic | 2 | IDLG | 2" in table
    rows = (tmp_path / "privacy_table.csv").read_text().splitlines()
    assert rows[0].startswith("algorithm,mode,batch_size,attack,attacks,psnr_mean") and len(rows) == 1 + 8
    assert (tmp_path / "privacy.png").stat().st_size > 1000
    assert privacy.main([str(tmp_path / "nothing")]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--privacy_attacks", "ig,foo"], "--privacy_attacks: unknown 'foo'"),
    (["--privacy_rounds", 5], "--privacy_rounds 5 is not a round of this run"),
    (["--privacy_batch_sizes", 0], "--privacy_batch_sizes must be positive"),
    (["--privacy_clients", 7], "--privacy_clients must lie in 0..2"),
    (["--privacy_modes", "realistic", "--optimizer", "adam"], "realistic simulates SGD"),
])
def test_bad_privacy_flags_are_one_line(flags, message, tmp_path, capsys):
    status = main(FedAvg, [*map(str, TINY), "--privacy_rounds", "0", *map(str, flags), "--logdir", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1 and message in err[0]
