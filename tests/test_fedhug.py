"""FedHUG (fedhug.py): FedAvg before --start_round, the per-client synthesis plan, the local
loss, --double_gen, flag checks, and short real runs on Fashion-MNIST including a warm start."""
import math
import os
import re
import shutil
import types

import pytest
import torch
import torch.nn.functional as F

import synthesis
from conftest import algorithm_args, run_script, synthetic_client_side
from cvdataset import ShuffledBatches
from engine import clone_weights, main
from engine.checkpoint import load_checkpoint
from engine.executors import run_client
from fedavg import FedAvg
from fedhug import Distillation, FedHUG
from models import build_model

IMAGE_SHAPE = (1, 28, 28)


def tiny_args(*flags):
    """FedHUG's flags for two clients, synthesis from round 1, a few steps of everything."""
    return algorithm_args(FedHUG, "--n_parties", "2", "--start_round", "1", "--g_steps", "3",
                          "--synthesis_batch_size", "12", "--num_local_iterations", "4", "--batch_size", "8",
                          *flags)


def tiny_client_side(algorithm_class, args, initial):
    """(algorithm, data) over two clients of random 28x28 images (no real data needed): client 0
    holds 30 samples of classes 0-2, client 1 30 samples of all ten classes. `initial` is the
    run's initial global model (a never-trained client's previous model)."""
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (60, *IMAGE_SHAPE), dtype=torch.uint8, generator=g)
    labels = torch.cat([torch.randint(0, 3, (30,), generator=g), torch.randint(0, 10, (30,), generator=g)])
    return synthetic_client_side(algorithm_class, args, images, labels, [list(range(30)), list(range(30, 60))],
                                 initial)


def weights_of_seed(seed):
    torch.manual_seed(seed)
    return clone_weights(build_model("simplecnn-mnist", 10, IMAGE_SHAPE).state_dict())


def same_weights(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_rounds_before_start_round_are_exactly_fedavg():
    args, w0 = tiny_args(), weights_of_seed(0)
    fedavg_algorithm, data = tiny_client_side(FedAvg, args, w0)
    fedhug_algorithm, _ = tiny_client_side(FedHUG, args, w0)
    fedavg = run_client(fedavg_algorithm, data, {"weights": w0}, {}, 1, 0)
    fedhug = run_client(fedhug_algorithm, data, {"weights": w0}, {}, 1, 0)
    assert same_weights(fedavg.upload["weights"], fedhug.upload["weights"])
    assert fedhug.upload.keys() == {"weights"}
    assert fedhug.log_lines == []
    assert fedavg.state == {}                                        # FedAvg keeps no per-client state
    assert same_weights(fedhug.state["local_model"], fedhug.upload["weights"])   # FedHUG keeps its last model


def parse_client_line(line):
    m = re.search(r"drift ([\d.]+), budget (\d+) \((\d+) synthesised\), weights real ([\d.]+) syn ([\d.]+)", line)
    return float(m[1]), int(m[2]), int(m[3]), float(m[4]), float(m[5])


def test_synthesis_plan_uses_last_model_or_initial_weights():
    args = tiny_args()
    w0, w_global, w_last = (weights_of_seed(s) for s in (0, 1, 2))
    algorithm, data = tiny_client_side(FedHUG, args, w0)
    real_w, syn_w = synthesis.loss_weights(data.clients[1].class_counts)

    # a client that never trained compares the run's initial model with the global model
    never = run_client(algorithm, data, {"weights": w0}, {}, 1, 1)
    assert len(never.log_lines) == 1
    drift, budget, synthesised, real, syn = parse_client_line(never.log_lines[0])
    assert (drift, budget) == (0.0, 12)               # global == initial: no drift, base budget
    assert real == pytest.approx(real_w, abs=1e-3) and syn == pytest.approx(syn_w, abs=1e-3)
    assert 12 - 10 <= synthesised <= 12
    never_later = run_client(algorithm, data, {"weights": w_global}, {}, 1, 1)
    drift, *_ = parse_client_line(never_later.log_lines[0])
    assert drift == pytest.approx(synthesis.drift(w0, w_global), abs=1e-4) and drift > 0.1

    # a client with a last model compares that model with the global model
    trained = run_client(algorithm, data, {"weights": w_global}, {"local_model": w_last}, 1, 1)
    drift, budget, *_ = parse_client_line(trained.log_lines[0])
    expected = synthesis.drift(w_last, w_global)
    assert drift == pytest.approx(expected, abs=1e-4) and expected > 0.1
    assert budget == synthesis.synthesis_budget(expected, 12, 1.0, 0.5, 2.0, 10)
    assert same_weights(trained.state["local_model"], trained.upload["weights"])


def test_local_loss_mixes_real_cross_entropy_and_distillation_by_hand():
    algorithm, _ = tiny_client_side(FedHUG, tiny_args("--T", "2"), weights_of_seed(0))
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
    g = torch.Generator().manual_seed(3)
    syn_x, teacher = torch.randn(5, 4, generator=g), torch.randn(5, 3, generator=g)
    x, y = torch.randn(2, 4, generator=g), torch.tensor([0, 2])
    batches = ShuffledBatches((syn_x, teacher), 8, torch.Generator().manual_seed(0))
    ctx = types.SimpleNamespace(round=1, step=0, distillation=Distillation(None, 0.25, 0.75, batches))
    loss = algorithm.local_loss(model, x, y, ctx)
    with torch.no_grad():
        p_t = F.softmax(teacher / 2, 1)
        log_p_s = F.log_softmax(model(syn_x) / 2, 1)        # batch 8 > 5 samples: the whole set
        kl = (p_t * (p_t.log() - log_p_s)).sum() / 5
        ce = -F.log_softmax(model(x), 1)[[0, 1], y].mean()
    assert loss.item() == pytest.approx(0.25 * ce.item() + 0.75 * 4 * kl.item(), rel=1e-5)


def test_synthetic_batches_cover_the_set_and_reshuffle():
    inputs = torch.arange(10.0).view(10, 1)
    batches = ShuffledBatches((inputs, inputs * 2), 4, torch.Generator().manual_seed(0))
    first_pass = [batches.next() for _ in range(3)]
    assert [len(x) for x, _ in first_pass] == [4, 4, 2]
    assert sorted(torch.cat([x for x, _ in first_pass]).view(-1).tolist()) == list(range(10))
    assert all(torch.equal(t, x * 2) for x, t in first_pass)      # inputs keep their own logits
    assert len(batches.next()[0]) == 4                              # a new pass begins


def test_double_gen_resynthesises_halfway_with_the_training_model():
    w0 = weights_of_seed(0)
    algorithm, data = tiny_client_side(FedHUG, tiny_args("--double_gen"), w0)
    calls = []
    original = algorithm.synthesize

    def recording(ctx, targets, student):
        batches = original(ctx, targets, student)
        calls.append((ctx.step, student, student.training))
        return batches

    algorithm.synthesize = recording
    run_client(algorithm, data, {"weights": w0}, {"local_model": weights_of_seed(2)}, 0, 1)
    assert [(step, student) for step, student, _ in calls] == [(0, algorithm.previous_model),
                                                                (2, algorithm.model("local"))]
    assert calls[1][2]                                  # train mode restored after re-synthesis


def test_start_round_after_comm_round_is_a_usage_error(tmp_path):
    result = run_script("fedhug.py", "--start_round", "5", "--comm_round", "3", logdir=tmp_path)
    assert result.returncode == 2
    assert "--start_round 5 exceeds --comm_round 3" in result.stderr
    assert "Traceback" not in result.stderr


def test_an_unbounded_budget_is_a_usage_error(tmp_path):
    result = run_script("fedhug.py", "--ua_budget_max_scale", "1e30", "--comm_round", "1", logdir=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "synthesised samples a client, more than 1,000,000" in result.stderr


def test_flags_of_other_algorithms_are_refused(capsys, tmp_path):
    # a tiny run's flags, so that a flag wrongly accepted costs seconds, not a 70-round run
    tiny_run = ["--n_parties", "2", "--comm_round", "1", "--start_round", "0", "--num_local_iterations", "1",
                "--g_steps", "1", "--checkpoint_every", "0", "--threads", "1", "--logdir", str(tmp_path)]
    assert main(FedHUG, [*tiny_run, "--mu", "0.1"]) == 2
    err = capsys.readouterr().err
    assert "error: --mu is not a flag of fedhug (it is a flag of fedprox, moon, heteroprox, incoprox, heteromoon, incomoon); see --help" in err
    assert "Traceback" not in err


def accuracies(stdout):
    return [float(a) for a in re.findall(r">> Round \d+ \| Current Acc: ([\d.]+)", stdout)]


def fedhug_client_lines(stdout):
    return [line for line in stdout.splitlines() if line.startswith("fedhug client")]


WARM_START_COMMON = ["--n_parties", "4", "--beta", "0.5", "--num_local_iterations", "30", "--lr", "0.05"]
FEDHUG_FLAGS = ["--start_round", "2", "--g_steps", "10", "--synthesis_batch_size", "32"]


def test_fedavg_then_fedhug_warm_start_on_fashion_mnist(tmp_path):
    fedavg = run_script("fedavg.py", *WARM_START_COMMON, "--comm_round", "2", "--keep_client_models",
                        logdir=tmp_path, name="fedavg")
    assert fedavg.returncode == 0, fedavg.stderr
    ckpt = load_checkpoint(str(tmp_path / "fedavg"))
    assert ckpt["client_states"] == {}                      # FedAvg keeps no per-client state
    assert sorted(ckpt["client_models"]) == [0, 1, 2, 3]    # --keep_client_models: the last uploads

    fedhug = run_script("fedhug.py", *WARM_START_COMMON, *FEDHUG_FLAGS, "--load_path", tmp_path / "fedavg",
                        "--comm_round", "4", logdir=tmp_path, name="fedhug")
    assert fedhug.returncode == 0, fedhug.stderr
    out = fedhug.stdout
    assert "continuing at round 2" in out
    lines = fedhug_client_lines(out)
    assert len(lines) == 8                                   # 4 clients x rounds 2 and 3
    assert [int(re.search(r"client (\d+)", line)[1]) for line in lines] == [0, 1, 2, 3] * 2
    # round 2 compares each client's model kept in the FedAvg checkpoint with the global model
    for k, line in enumerate(lines[:4]):
        expected = synthesis.drift(ckpt["client_models"][k], ckpt["server_state"]["weights"])
        assert expected > 0
        assert parse_client_line(line)[0] == pytest.approx(expected, abs=1e-4)
    acc = accuracies(out)
    assert len(acc) == 4 and acc[-1] > 0.3                   # rounds 0-1 carried over from FedAvg's log; chance 0.1
    assert "rounds 0-1 below are those of run fedavg" in out


def test_warm_start_without_client_models_starts_clients_from_the_loaded_global_model(tmp_path):
    fedavg = run_script("fedavg.py", *WARM_START_COMMON, "--comm_round", "1", logdir=tmp_path, name="fedavg")
    assert fedavg.returncode == 0, fedavg.stderr
    assert "client_models" not in load_checkpoint(str(tmp_path / "fedavg"))

    fedhug = run_script("fedhug.py", *WARM_START_COMMON, "--start_round", "1", "--g_steps", "2",
                        "--synthesis_batch_size", "16", "--load_path", tmp_path / "fedavg", "--comm_round", "2",
                        logdir=tmp_path, name="fedhug")
    assert fedhug.returncode == 0, fedhug.stderr
    lines = fedhug_client_lines(fedhug.stdout)
    assert len(lines) == 4                                   # 4 clients x round 1
    assert [parse_client_line(line)[0] for line in lines] == [0.0] * 4   # previous model = the global one


def test_bf16_hint_only_on_cpus_with_bf16_units_and_the_flag_off(monkeypatch, capsys):
    import fedhug
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for units, flags, hinted in [(["avx512_bf16"], [], True), (["amx_bf16"], ["--synthesis_bf16"], False),
                                 ([], [], False), (["avx512_bf16"], ["--start_round", "70"], False)]:
        monkeypatch.setattr(fedhug, "cpu_bf16_units", lambda: units)
        FedHUG.check_args(algorithm_args(FedHUG, *flags))
        err = capsys.readouterr().err
        assert (f"hint: this CPU has bf16 units ({units[0] if units else ''})" in err) == hinted, (units, flags, err)


def test_synthesis_diagnostics_by_hand():
    """teacher_agreement = share of argmax(teacher logits) == target; the student's mean entropy
    and mean top-1/top-2 margin of softmax on the inputs."""
    from fedhug import synthesis_diagnostics
    student = torch.nn.Linear(2, 3, bias=False)
    with torch.no_grad():
        student.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]))
    inputs = torch.tensor([[0.0, 0.0], [2.0, 0.0]])                 # student logits (0,0,0) and (2,0,0)
    teacher = torch.tensor([[0.0, 5.0, 1.0], [3.0, 0.0, 0.0]])
    found = synthesis_diagnostics(inputs, teacher, torch.tensor([1, 2]), student)
    p = torch.softmax(torch.tensor([2.0, 0.0, 0.0]), 0)
    entropies = [torch.log(torch.tensor(3.0)).item(), -(p * p.log()).sum().item()]
    assert found["teacher_agreement"] == 0.5
    assert found["student_entropy"] == pytest.approx(sum(entropies) / 2, rel=1e-5)
    assert found["student_margin"] == pytest.approx((0.0 + (p[0] - p[1]).item()) / 2, rel=1e-5)


def test_plain_inversion_diagnostics_are_recorded_and_change_nothing_else():
    """--plain_inversion_samples 4: the client's metrics gain the plain inversion's figures (on 4
    of its targets) beside FedHUG's own; its upload and state are those of the run without it."""
    w0, w_global = weights_of_seed(0), weights_of_seed(1)
    results = []
    for flags in ([], ["--plain_inversion_samples", "4"]):
        algorithm, data = tiny_client_side(FedHUG, tiny_args(*flags), w0)
        results.append(run_client(algorithm, data, {"weights": w_global}, {}, 1, 1))
    plain, diagnosed = results
    assert same_weights(plain.upload["weights"], diagnosed.upload["weights"])
    assert plain.log_lines == diagnosed.log_lines
    metrics = diagnosed.metrics
    assert sum(metrics["samples_per_class"]) == metrics["synthesised"] and len(metrics["samples_per_class"]) == 10
    for key in ("teacher_agreement", "student_entropy", "student_margin"):
        assert metrics[key] == plain.metrics[key] and f"plain_{key}" not in plain.metrics
        assert 0 <= metrics[f"plain_{key}"] <= math.log(10)
    assert 0 <= metrics["teacher_agreement"] <= 1 and metrics["student_entropy"] > 0


def test_the_ablation_script_runs_its_pipeline_at_a_tiny_setting(tmp_path):
    """docs/fedhug_ablations.py --tiny: the FedAvg run and every variant, continued from FedAvg's
    checkpoint (their first rounds are FedAvg's), the table with a row per variant and the plot."""
    import subprocess
    import sys
    from conftest import ROOT
    result = subprocess.run([sys.executable, os.path.join(ROOT, "docs", "fedhug_ablations.py"), "--tiny",
                             "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    table = (tmp_path / "table.md").read_text()
    for label in ("FedHUG (full)", "no entropy term", "no margin term", "plain inversion", "fixed budget", "FedHUG (full), bf16 synthesis",
                  "no synthesis (FedAvg)",
                  "FedHUG, 2 steps"):
        assert f"| {label}" in table
    assert (tmp_path / "steps.png").read_bytes()[:4] == b"\x89PNG"
    full = (tmp_path / "runs" / "full_seed0" / "log.txt").read_text()
    fedavg = (tmp_path / "runs" / "no-synthesis_seed0" / "log.txt").read_text()
    first = next(line for line in fedavg.splitlines() if line.startswith(">> Round 0 |"))
    assert "warm start: fedavg checkpoint after round 0" in full and first in full
    # runs kept as metrics only (no checkpoints), one variant missing: FedAvg runs again for its
    # checkpoint, the missing variant runs, the others are re-read; the same accuracies
    for checkpoint in (tmp_path / "runs").glob("*/checkpoint*.pt"):
        checkpoint.unlink()
    shutil.rmtree(tmp_path / "runs" / "no-margin_seed0")
    again = subprocess.run([sys.executable, os.path.join(ROOT, "docs", "fedhug_ablations.py"), "--tiny",
                            "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    said = dict(line.split(" ", 1) for line in again.stdout.splitlines() if line.endswith(("done", "finished before")))
    assert said["no-synthesis_seed0"] == "done" and said["no-margin_seed0"] == "done"
    assert said["full_seed0"] == "finished before" and said["steps-2_seed0"] == "finished before"
    def accuracies(text):       # every cell but the last (seconds, which a re-run changes)
        return [line.rsplit("|", 2)[0] for line in text.splitlines() if line.startswith("| ")]
    assert accuracies((tmp_path / "table.md").read_text()) == accuracies(table)
