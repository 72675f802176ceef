"""FedKTL with the substitute generator (algorithms/heterogeneous/fedktl.py, generator.py): the
ETF classifier, the client's ArcFace and knowledge-transfer terms and its prototypes, the server's
prototype -> latent mapping (centroids of F(P)) and its training loss (MMD + lambda * MSE), its
batch-of-one guard, against hand-computed values; the generator's seeded, cached pre-training
(bit for bit the same twice); one short --eval local run over light4 ending above chance with
every log line labelled as the substitute, a resumed run equal to the uninterrupted one, and the
untrained-generator ablation."""
import dataclasses
import json
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import cvdataset
from conftest import (assert_resume_equals_uninterrupted, assert_same_tensors, interrupt_after,
                      random_client_side, records_of)
from algorithms.heterogeneous import generator as gen
from algorithms.heterogeneous.fedktl import (FedKTL, FedKTLRandomG, FeatureTransformer, PairStream,
                                             alignment_loss, arcface_logits, class_centroids, etf_matrix,
                                             etf_vertices, output_prototypes, server_batches)
from engine import ClientContext, ServerContext, main, payload_bytes
from engine.executors import run_client

torch.set_num_threads(1)

TINY_G = ["--ktl_generator_steps", 10]            # the runs' substitute: 10 pre-training steps (cached once)
PROJ_FLOATS = 84 * 64 + 64                         # proj_fc for light4's D = 84, w_dim = 64
PAIR_FLOATS = 10 * 28 * 28 + 10 * 64               # one image and one latent per class


@pytest.fixture(scope="module")
def generator_cache(tmp_path_factory):
    """A cache folder holding the runs' substitute (pre-trained once for the whole file)."""
    folder = tmp_path_factory.mktemp("fedktl-generator")
    gen.pretrained_generator(dataclasses.replace(gen.GeneratorConfig(), steps=TINY_G[1]), str(folder))
    return str(folder)


# ----------------------------------------------------------------------------- the client side

def test_etf_vertices_are_unit_and_equiangular():
    M = etf_matrix(4, torch.Generator().manual_seed(3))
    V = etf_vertices(M)
    assert torch.allclose(M.norm(dim=0), torch.ones(4), atol=1e-6)             # columns are unit already
    assert torch.allclose(V, M.T, atol=1e-6)
    expected = torch.full((4, 4), -1 / 3) + torch.eye(4) * (4 / 3)               # cos = -1 / (K - 1) off the diagonal
    assert torch.allclose(V @ V.T, expected, atol=1e-6)
    assert torch.equal(M, etf_matrix(4, torch.Generator().manual_seed(3)))      # seeded


def test_arcface_adds_the_margin_to_the_true_class_angle_only():
    cosine = torch.tensor([[0.5, 0.2, -0.1], [0.3, 0.9, 0.0]])
    logits = arcface_logits(cosine, torch.tensor([0, 1]))
    expected = 64 * torch.tensor([[math.cos(math.pi / 3 + 0.5), 0.2, -0.1],
                                  [0.3, math.cos(math.acos(0.9) + 0.5), 0.0]])
    assert torch.allclose(logits, expected, atol=1e-4)
    # a cosine of exactly 1 is clamped before arccos: a finite gradient (the reference's is NaN)
    cosine = torch.tensor([[1.0, 0.0]], requires_grad=True)
    F.cross_entropy(arcface_logits(cosine, torch.tensor([0])), torch.tensor([0])).backward()
    assert torch.isfinite(cosine.grad).all()


class Stub(nn.Module):
    """features(x) = x, head = Linear(2 -> 2) = identity: model(x) = x."""
    head_name = "classifier"

    def __init__(self):
        super().__init__()
        self.classifier = nn.Linear(2, 2)
        with torch.no_grad():
            self.classifier.weight.copy_(torch.eye(2)), self.classifier.bias.zero_()

    def features(self, x):
        return x

    def forward(self, x):
        return self.classifier(x)


class OnePair:
    def __init__(self, image, latent):
        self.image, self.latent = image, latent

    def next(self):
        return self.image, self.latent


def test_client_loss_is_arcface_ce_plus_mu_times_the_knowledge_transfer_mse():
    algorithm, _ = make_algorithm("--ktl_mu", 50)
    proj_fc = nn.Linear(2, 1)
    with torch.no_grad():
        proj_fc.weight.copy_(torch.tensor([[1.0, 1.0]])), proj_fc.bias.zero_()
    ctx = SimpleNamespace(vertices=torch.eye(2), proj_fc=proj_fc, pairs=None)
    x, y = torch.tensor([[3.0, 4.0]]), torch.tensor([0])
    # q = (0.6, 0.8); cos(theta_0 + m) = 0.6 cos 0.5 - 0.8 sin 0.5; CE of 64 * (that, 0.8) for class 0
    target = 0.6 * math.cos(0.5) - 0.8 * math.sin(0.5)
    ce = math.log1p(math.exp(64 * (0.8 - target)))
    assert algorithm.local_loss(Stub(), x, y, ctx).item() == pytest.approx(ce, rel=1e-5)       # round 0: no pairs
    # with a pair: proj_fc(phi(x_G)) = 1 + 2 = 3 against w_G = 1: MSE 4, times mu = 50
    ctx.pairs = OnePair(torch.tensor([[1.0, 2.0]]), torch.tensor([[1.0]]))
    assert algorithm.local_loss(Stub(), x, y, ctx).item() == pytest.approx(ce + 200, rel=1e-5)


def test_pairs_cycle_in_shuffled_batches_of_the_client_batch_size():
    images, latents = torch.arange(3.0).view(3, 1, 1, 1), torch.arange(3.0).view(3, 1) * 10
    stream = PairStream(images, latents, 2, torch.Generator().manual_seed(0))
    batches = [stream.next() for _ in range(4)]                     # two passes: 2 + 1, 2 + 1
    assert [len(x) for x, _ in batches] == [2, 1, 2, 1]
    for first, second in (batches[:2], batches[2:]):
        assert sorted(torch.cat([first[0], second[0]]).flatten().tolist()) == [0.0, 1.0, 2.0]
    assert all(torch.equal(w, x.view(-1, 1) * 10) for x, w in batches)        # images stay with their latents


def test_prototypes_are_normalised_means_of_normalised_outputs():
    outputs = torch.tensor([[3.0, 4.0], [0.0, 2.0], [5.0, 0.0]])
    prototypes = output_prototypes(outputs, torch.tensor([0, 0, 2]), 3)
    assert set(prototypes) == {0, 2}                                   # only the classes present
    # class 0: mean of (0.6, 0.8) and (0, 1) = (0.3, 0.9), normalised
    assert torch.allclose(prototypes[0], torch.tensor([0.3, 0.9]) / math.sqrt(0.9))
    assert torch.allclose(prototypes[2], torch.tensor([1.0, 0.0]))


def make_algorithm(*flags, cls=FedKTL, sizes=(20, 12)):
    """(algorithm, data) over random Fashion-MNIST-shaped images, one client per size, light4 models."""
    return random_client_side(cls, "--client_models", "light-mlp,light-conv1", "--eval", "local", "--momentum", 0,
                              *flags, sizes=sizes, labels=torch.arange(sum(sizes)) % 7)   # classes 7, 8, 9 absent


def server(round_index=0):
    return ServerContext(round_index, torch.Generator().manual_seed(round_index), torch.device("cpu"))


def test_a_client_round_uploads_its_prototypes_only_and_keeps_its_model_not_proj_fc(generator_cache):
    algorithm, data = make_algorithm(*TINY_G, "--ktl_generator_cache", generator_cache)
    state = algorithm.init_server({})
    state = algorithm.initialise_server(state, [], server(-1))
    download = algorithm.download(state, 1)
    assert set(download) == {"etf", "proj_fc"} and payload_bytes(download) == 4 * (100 + PROJ_FLOATS)
    sent_proj_fc = {k: v.clone() for k, v in download["proj_fc"].items()}
    result = run_client(algorithm, data, download, {}, 1, 0)
    assert set(result.upload) == {"prototypes"} and set(result.upload["prototypes"]) == set(range(7))
    assert payload_bytes(result.upload) == 7 * 10 * 4                # 7 classes x K = 10 floats: 280 bytes
    assert set(result.state) == {"etf", "proj_fc", "local_model"}
    assert result.metrics["generator"] == ("FedKTL-sub: substitute G pre-trained on sklearn-digits, "
                                           "not StyleGAN-XL")                  # every client's metrics say so
    assert result.metrics["kt_mse"] is None and result.metrics["arcface_ce"] > 0      # round 0: no pairs yet
    assert_same_tensors(result.state["proj_fc"], sent_proj_fc)          # the initial copy: its training is dropped
    # the upload: normalize(mean normalize(model(x))) of the trained model over the whole split
    model = algorithm.model("check", "light-conv1")
    model.load_state_dict(result.state["local_model"])
    model.eval()
    with torch.no_grad():
        outputs = model(cvdataset.normalise(data.clients[1].images, data.clients[1].mean, data.clients[1].std))
    expected = output_prototypes(outputs, data.clients[1].labels, 10)
    assert all(torch.allclose(result.upload["prototypes"][c], expected[c], atol=1e-6) for c in expected)
    # reported: its own model with the ETF classifier, cos(normalize(model(x)), v_c)
    ctx = ClientContext(1, 1, {}, result.state, data.clients[1], torch.Generator(), "light-conv1")
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        scores = algorithm.evaluation_model(ctx)(x)
        assert torch.allclose(scores, F.normalize(model(x), dim=1) @ etf_vertices(state["etf"]).T, atol=1e-6)


# ----------------------------------------------------------------------------- the server side

def test_alignment_loss_is_rbf_mmd_plus_lambda_times_the_centroid_mse():
    Q, W, centroids = torch.tensor([[0.0]]), torch.tensor([[1.0]]), torch.tensor([[2.0]])
    # k(a, b) = sum_sigma exp(-|a - b|^2 / (2 sigma)), sigma in 10, 15, 20, 50: MMD^2 = 4 + 4 - 2 k(0, 1)
    mmd = 8 - 2 * sum(math.exp(-0.5 / s) for s in (10, 15, 20, 50))
    loss, mmd_found, mse_found = alignment_loss(Q, W, centroids, 0.5)
    assert (mmd_found.item(), mse_found.item()) == (pytest.approx(mmd, rel=1e-5), 4.0)
    assert loss.item() == pytest.approx(mmd + 0.5 * 4, rel=1e-5)


def test_centroids_are_class_means_of_the_transformed_prototypes_absent_classes_kept():
    transformer = FeatureTransformer(2, 3)
    with torch.no_grad():
        first, last = transformer.mlp[0], transformer.mlp[3]
        first.weight.copy_(torch.eye(2)), first.bias.zero_()
        last.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])), last.bias.fill_(1.0)
    prototypes = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, -1.0]])
    labels = torch.tensor([0, 0, 2])
    old = torch.full((3, 3), 7.0)
    # eval-mode BatchNorm with its initial statistics divides by sqrt(1 + 1e-5); ReLU; last Linear
    bn = 1 / math.sqrt(1 + 1e-5)
    F_of = lambda p: torch.tensor([p[0], p[1], p[0] + p[1]]) * bn + 1   # noqa: E731 (p >= 0 after the ReLU)
    centroids = class_centroids(transformer, prototypes, labels, old)
    assert torch.allclose(centroids[0], (F_of([1, 0]) + F_of([0, 1])) / 2)
    assert torch.allclose(centroids[2], F_of([2, 0]))                    # ReLU cut the -1
    assert torch.equal(centroids[1], old[1]) and torch.equal(old, torch.full((3, 3), 7.0))


def test_server_batches_drop_a_final_batch_of_one_only():
    sizes = lambda n: [len(b) for b in server_batches(n, 100, torch.Generator().manual_seed(0))]  # noqa: E731
    assert sizes(201) == [100, 100] and sizes(200) == [100, 100] and sizes(102) == [100, 2] and sizes(1) == []
    batches = server_batches(201, 100, torch.Generator().manual_seed(0))
    assert len(torch.cat(batches).unique()) == 200


def uploads(*class_sets):
    """ClientResults uploading unit prototypes of the given classes."""
    from engine import ClientResult
    results = []
    for k, classes in enumerate(class_sets):
        generator = torch.Generator().manual_seed(k)
        results.append(ClientResult(k, 10, {"prototypes": {c: F.normalize(torch.rand(10, generator=generator), dim=0)
                                                           for c in classes}}, {}, {}, []))
    return results


def test_server_maps_prototypes_to_latent_centroids_and_renders_one_image_per_class(generator_cache):
    algorithm, _ = make_algorithm(*TINY_G, "--ktl_generator_cache", generator_cache, "--ktl_server_epochs", 0)
    state = algorithm.initialise_server(algorithm.init_server({}), [], server(-1))
    initial = state["centroids"].clone()
    results = uploads([0, 1], [1, 2])
    state = algorithm.server_update(state, results, server(0))
    # E_s = 0: Centroids[c] = mean of F(P) over class c's prototypes (F in eval mode, as initialised)
    transformer = FeatureTransformer(10, 64)
    transformer.load_state_dict(state["transformer"])
    P = [r.upload["prototypes"] for r in results]
    with torch.no_grad():
        transformer.eval()
        Q = lambda p: transformer(p[None])[0]      # noqa: E731
        expected = {0: Q(P[0][0]), 1: (Q(P[0][1]) + Q(P[1][1])) / 2, 2: Q(P[1][2])}
    for c, row in expected.items():
        assert torch.allclose(state["centroids"][c], row, atol=1e-6)
    assert torch.equal(state["centroids"][3:], initial[3:])                # absent classes keep their rows
    # the download: the latent centroids w_c and the images G.synthesis(w_c) in [0, 1]
    pairs = algorithm.download(state, 0)["pairs"]
    assert torch.equal(pairs["latents"], state["centroids"])
    G = algorithm.generator(state)
    with torch.no_grad():
        assert torch.allclose(pairs["images"], ((G.synthesis(pairs["latents"]) + 1) / 2).clamp(0, 1))
    assert pairs["images"].shape == (10, 1, 28, 28) and payload_bytes(pairs) == 4 * PAIR_FLOATS
    assert set(algorithm.download(state, 0)) == {"pairs"}                   # ETF and proj_fc went once

    # E_s = 2 from the same start: F and the present classes' centroids move, absent ones do not
    algorithm.args.ktl_server_epochs = 2
    again = algorithm.server_update(algorithm.initialise_server(algorithm.init_server({}), [], server(-1)),
                                    results, server(0))
    assert not torch.equal(again["transformer"]["mlp.0.weight"], state["transformer"]["mlp.0.weight"])
    assert not torch.equal(again["centroids"][:3], state["centroids"][:3])
    assert torch.equal(again["centroids"][3:], initial[3:])


# ----------------------------------------------------------------------------- the generator

def test_pretraining_is_deterministic_seeded_and_cached(tmp_path):
    config = dataclasses.replace(gen.GeneratorConfig(), steps=2, channels=(8, 4, 4), batch_size=8)
    rng = torch.get_rng_state()
    a, info = gen.pretrain(config)
    b, _ = gen.pretrain(config)
    assert torch.equal(torch.get_rng_state(), rng)                          # the global RNG untouched
    assert_same_tensors(a.state_dict(), b.state_dict())                     # bit for bit
    assert set(info) == {"seconds", "loss_g", "loss_d"}
    untrained = gen.untrained_generator(config)
    assert any(not torch.equal(a.state_dict()[k], v) for k, v in untrained.state_dict().items())
    other, _ = gen.pretrain(dataclasses.replace(config, seed=1))
    assert any(not torch.equal(a.state_dict()[k], v) for k, v in other.state_dict().items())
    # the cache: written once under a name keyed by the settings, then read back
    first, made = gen.pretrained_generator(config, str(tmp_path))
    second, read = gen.pretrained_generator(config, str(tmp_path))
    assert (made["cached"], read["cached"]) == (False, True) and made["path"] == read["path"]
    assert read["path"].endswith(f"sklearn-digits-{config.key()}.pt")
    assert config.key() != dataclasses.replace(config, steps=3).key()
    assert_same_tensors(first.state_dict(), a.state_dict())
    assert_same_tensors(second.state_dict(), a.state_dict())
    # the public data: scikit-learn's 1,797 bundled 8x8 digits, upsampled to 28x28 in [-1, 1]
    images = gen.public_images()
    assert images.shape == (1797, 1, 28, 28) and images.min() == -1 and images.max() <= 1


# ----------------------------------------------------------------------------- short real runs

@pytest.fixture
def small_fashion_mnist(monkeypatch):
    """Fashion-MNIST cut to its first 5,000 training and 1,000 test images (FedKTL passes over every
    client's training split each round for its prototypes)."""
    real, cache = cvdataset.load_dataset, {}

    def load(name, datadir="./data/"):
        if name not in cache:
            full = real(name, datadir)
            cache[name] = dataclasses.replace(full, train_images=full.train_images[:5000],
                                              train_labels=full.train_labels[:5000],
                                              test_images=full.test_images[:1000], test_labels=full.test_labels[:1000])
        return cache[name]
    monkeypatch.setattr(cvdataset, "load_dataset", load)


# HtFLlib's plain SGD at lr 0.01 without augmentation (ArcFace's s = 64 trains poorly with momentum 0.9)
RUN = ["--n_parties", 4, "--client_models", "light4", "--beta", 0.5, "--num_local_iterations", 25,
       "--batch_size", 16, "--lr", 0.01, "--momentum", 0, "--no_augment", "--comm_round", 3, "--threads", 1,
       "--eval", "local", "--ktl_server_epochs", 20, *TINY_G]


def run(cls, tmp_path, cache, *flags, name=None, observers=()):
    name = name or cls.name
    status = main(cls, [*map(str, RUN), "--ktl_generator_cache", cache, *map(str, flags), "--logdir", str(tmp_path),
                        "--log_file_name", name], observers=observers)
    return status, tmp_path / name




def test_a_short_run_ends_above_chance_labelled_and_a_resumed_run_equals_it(tmp_path, generator_cache,
                                                                          small_fashion_mnist):
    status, whole = run(FedKTL, tmp_path, generator_cache, name="whole")
    assert status == 0
    records = records_of(whole)
    assert [r["round"] for r in records] == [0, 1, 2, 3] and records[-1]["evaluation_only"]
    assert records[-1]["accuracy"] > 0.5 and records[-1]["accuracy"] > records[0]["accuracy"]
    for record in records[:-1]:       # K-dim prototypes up: at most 10 x 10 floats a client
        assert set(record["bytes_uploaded_by_kind"]) == {"prototypes", "num_samples"}
        assert all(b <= 400 + 8 for b in record["bytes_uploaded_per_client"])
    assert records[0]["bytes_downloaded_by_kind"] == {"etf": 4 * 4 * 100, "proj_fc": 4 * 4 * PROJ_FLOATS}
    assert all(r["bytes_downloaded_by_kind"] == {"pairs": 4 * 4 * PAIR_FLOATS} for r in records[1:])
    for record in records[:-1]:       # the engine's client_metrics, where it records them
        for metrics in record.get("client_metrics", {}).values():
            assert metrics["generator"].startswith("FedKTL-sub: substitute G")
            assert (metrics["kt_mse"] is None) == (record["round"] == 0)
    lines = [line for line in (whole / "log.txt").read_text().splitlines() if "FedKTL" in line]
    assert len(lines) == 2 + 3 and all("substitute" in line and "not StyleGAN-XL" in line for line in lines)
    assert "loaded from the cache" in lines[0] and "pre-trained by the server on sklearn-digits" in lines[0]

    status, interrupted = run(FedKTL, tmp_path, generator_cache, name="interrupted", observers=[interrupt_after(1)])
    assert status == 130
    assert_resume_equals_uninterrupted(FedKTL, whole, interrupted, {"weights", "etf", "proj_fc", "transformer", "centroids",
                                                                    "generator", "generator_config", "pairs",
                                                                    "rounds_aggregated"})


def test_the_untrained_generator_ablation_runs_and_says_so(tmp_path, small_fashion_mnist):
    status, run_dir = run(FedKTLRandomG, tmp_path, str(tmp_path / "no-cache"), "--comm_round", 1)
    assert status == 0 and not (tmp_path / "no-cache").exists()             # nothing pre-trained
    assert [r["round"] for r in records_of(run_dir)] == [0, 1]
    lines = [line for line in (run_dir / "log.txt").read_text().splitlines() if "FedKTL" in line]
    assert lines and all(line.startswith("FedKTL-randG [generator: substitute UNTRAINED") for line in lines)
    assert json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])["accuracy"] > 0.3
    assert main(FedKTL, ["--ktl_generator", "random", "--eval", "local", "--logdir", str(tmp_path)]) == 2
