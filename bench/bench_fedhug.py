"""Benchmark: one FedHUG round, this implementation vs a reference-style one, in one process.

    reference-style  as the published code runs it: the teacher's and student's parameters keep
                     requires_grad during synthesis (every backward also computes weight
                     gradients), PyTorch's own max pooling (nn.MaxPool2d) and
                     convolutions (oneDNN), and the synthetic set
                     is served by a torch DataLoader with 4 worker processes, a fresh iterator
                     (and fresh workers) every pass
    this             fedhug.py: gradients for the synthesised inputs only, the C code of
                     kernels.py (convolutions, ReLU + max pooling: the same numbers, faster on
                     CPU), the synthetic set as in-memory tensors
    this, no C kernels  the same with PyTorch's convolutions, ReLU and models.MaxPool2x2
                     (kernels.disabled())
    this, bf16       the same with --synthesis_bf16 (other numbers: an option, never the default;
                     under autocast the convolutions are oneDNN's bfloat16 ones, the ReLU + max
                     pooling is kernels.py's C code)
    this, bf16, no C kernels  the same under kernels.disabled()

Every client starts from the initial weights as its last model (drift 0), so each synthesises
from a budget of exactly --budget. Also printed: the synthesis FLOPs (torch's FLOP counter)
against this machine's large-matmul rate measured here (how close synthesis gets to its
floor), and whether one teacher evaluated on all clients' inputs at once would give each client
exactly the results it gets alone.

    python bench/bench_fedhug.py                    # 10 clients, 500 steps, budget 256: minutes
    python bench/bench_fedhug.py --clients 2 --g_steps 20 --local_iterations 10   # a quick check
    python bench/bench_fedhug.py --tiny             # seconds: a smoke test of every code path
"""
import argparse
import contextlib
import os
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.flop_counter import FlopCounterMode

import cvdataset
import kernels
import synthesis
from engine.executors import build_client_side, run_client
from engine.loop import algorithm_parser, initial_weights
from fedhug import FedHUG
from models import build_model, client_architectures, plain_pooling
from utils import parse_args

TINY = {"clients": 2, "g_steps": 2, "budget": 16, "local_iterations": 2, "workers": 1, "matmul_size": 256}


# ----------------------------------------------------------------------------- reference style

def reference_synthesize(teacher, student, targets, input_shape, generator, steps, lr, bn_weight,
                         oh_weight, entropy_weight, boundary_lambda):
    """synthesis.synthesize as the published code executes it: models in eval mode but their
    parameters left trainable, so each backward also fills (unused) weight gradients."""
    models = (teacher, student)
    flags = [[p.requires_grad for p in m.parameters()] for m in models]
    training = [m.training for m in models]
    for m in models:
        m.eval().requires_grad_(True)
    x = torch.randn((len(targets), *input_shape), generator=generator).to(targets.device).requires_grad_(True)
    optimizer = torch.optim.Adam([x], lr=lr, betas=(0.5, 0.9), eps=1e-8)
    best_loss, best = None, None
    for _ in range(steps):
        teacher_logits, student_logits = teacher(x), student(x)
        loss = synthesis.synthesis_loss(teacher_logits, student_logits, targets, None, bn_weight, oh_weight,
                                        entropy_weight, boundary_lambda)
        if best_loss is None or loss.item() < best_loss:
            best_loss, best = loss.item(), (x.detach().clone(), teacher_logits.detach().clone())
        optimizer.zero_grad(set_to_none=True)
        for m in models:
            m.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    for m, f, t in zip(models, flags, training):
        m.train(t)
        for p, flag in zip(m.parameters(), f):
            p.requires_grad_(flag)
            p.grad = None
    return best


class DataLoaderBatches:
    """The synthetic set served by a DataLoader with worker processes, a fresh iterator (and
    fresh workers) every pass, as the published code does. `tensors` as in cvdataset.ShuffledBatches."""

    def __init__(self, inputs, teacher_logits, batch_size, generator, workers):
        self.tensors = (inputs, teacher_logits)
        self.loader = DataLoader(TensorDataset(inputs, teacher_logits), batch_size=batch_size, shuffle=True,
                                 num_workers=workers, generator=generator)
        self.iterator = None

    def next(self):
        try:
            return next(self.iterator)
        except (StopIteration, TypeError):
            self.iterator = iter(self.loader)
            return next(self.iterator)


class ReferenceStyleFedHUG(FedHUG):
    workers = 4

    def synthesize(self, ctx, targets, student):
        a = self.args
        inputs, teacher_logits = reference_synthesize(ctx.global_model, student, targets, self.image_shape,
                                                      ctx.generator, a.g_steps, a.lr_g, a.bn, a.oh,
                                                      a.ua_entropy_weight, a.ua_boundary_lambda)
        return DataLoaderBatches(inputs, teacher_logits, a.batch_size, ctx.generator, self.workers)


# ----------------------------------------------------------------------------- measuring

def warm_up(model_name, image_shape, num_classes, budget):
    """A few steps of both synthesis loops, so neither timed variant pays first-call costs."""
    teacher, student = (build_model(model_name, num_classes, image_shape) for _ in range(2))
    targets = torch.arange(budget) % num_classes
    for synthesize in (synthesis.synthesize, reference_synthesize):
        synthesize(teacher, student, targets, image_shape, torch.Generator().manual_seed(0), 3, 0.01,
                   0.0, 1.0, 0.3, 0.1)


def timed_round(algorithm, data, global_weights, clients):
    """One round of `clients` clients, each through engine.executors.run_client with the global
    weights as its download and an empty state (its last model: the initial one); returns
    (seconds, synthesis seconds, synthesised sizes, client 0's synthetic inputs)."""
    spent, sizes, first = [0.0], [], []
    synthesize = algorithm.synthesize

    def timed_synthesize(ctx, targets, student):
        started = time.perf_counter()
        batches = synthesize(ctx, targets, student)
        spent[0] += time.perf_counter() - started
        sizes.append(len(targets))
        first.append(batches.tensors[0])
        return batches

    algorithm.synthesize = timed_synthesize
    download = {"weights": global_weights}
    started = time.perf_counter()
    for k in range(clients):
        run_client(algorithm, data, download, {}, k, round_index=0)
    total = time.perf_counter() - started
    return total, spent[0], sizes, first[0]


def flops_per_sample_step(model_name, image_shape, num_classes):
    """FLOPs of one synthesis step per synthesised sample: teacher and student forward,
    backward to the inputs only (loss terms are negligible and not counted), counted on PyTorch's
    ops (torch's FLOP counter does not see the C code of kernels.py, which does the same work)."""
    teacher, student = (build_model(model_name, num_classes, image_shape).eval().requires_grad_(False)
                        for _ in range(2))
    n = 64
    x = torch.randn(n, *image_shape, requires_grad=True)
    counter = FlopCounterMode(display=False)
    with counter, kernels.disabled():     # PyTorch's ops, which the counter sees (kernels.py's C code: the same work)
        loss = synthesis.synthesis_loss(teacher(x), student(x), torch.zeros(n, dtype=torch.long), None,
                                        0.0, 1.0, 0.3, 0.1)
        loss.backward()
    return counter.get_total_flops() / n


def matmul_gflops(size, repeats=10):
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - started)
    return 2 * size ** 3 / best / 1e9


def shared_teacher_check(image_shape, num_classes, budget, clients, steps=5):
    """Would one teacher pass over all clients' inputs give each client its own results bit
    for bit? Compares logits and input gradients, and times the teacher's forward+backward
    either way."""
    torch.manual_seed(0)
    teacher = build_model("simplecnn-mnist", num_classes, image_shape).eval().requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(budget, *image_shape, generator=g) for _ in range(clients)]
    targets = [torch.randint(0, num_classes, (budget,), generator=g) for _ in range(clients)]

    def alone():
        out = []
        for x, y in zip(xs, targets):
            x = x.clone().requires_grad_(True)
            logits = teacher(x)
            torch.nn.functional.cross_entropy(logits, y).backward()
            out.append((logits.detach(), x.grad))
        return out

    def together():
        x = torch.cat(xs).requires_grad_(True)
        logits = teacher(x)
        loss = sum(torch.nn.functional.cross_entropy(part, y) for part, y in zip(logits.split(budget), targets))
        loss.backward()
        return list(zip(logits.detach().split(budget), x.grad.split(budget)))

    a, b = alone(), together()
    identical = all(torch.equal(l1, l2) and torch.equal(g1, g2) for (l1, g1), (l2, g2) in zip(a, b))
    difference = max(max((l1 - l2).abs().max().item(), (g1 - g2).abs().max().item())
                     for (l1, g1), (l2, g2) in zip(a, b))
    seconds = {}
    for name, fn in (("alone", alone), ("together", together)):
        started = time.perf_counter()
        for _ in range(steps):
            fn()
        seconds[name] = (time.perf_counter() - started) / steps
    return identical, difference, seconds


# ----------------------------------------------------------------------------- main

def parse_options(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--clients", type=int, default=10)
    p.add_argument("--g_steps", type=int, default=500)
    p.add_argument("--budget", type=int, default=256, help="--synthesis_batch_size")
    p.add_argument("--local_iterations", type=int, default=100)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--workers", type=int, default=4, help="DataLoader workers of the reference style")
    p.add_argument("--no_bf16", action="store_true", help="skip the bf16 row")
    p.add_argument("--matmul_size", type=int, default=2048, help="n of the n x n matmul measuring this machine's rate")
    p.add_argument("--tiny", action="store_true",
                   help="smoke-test defaults: --clients 2 --g_steps 2 --budget 16 --local_iterations 2 "
                        "--workers 1 --matmul_size 256 (flags given explicitly still win)")
    if p.parse_known_args(argv)[0].tiny:
        p.set_defaults(**TINY)
    return p.parse_args(argv)


def main(argv=None):
    b = parse_options(argv)
    torch.set_num_threads(b.threads)
    ReferenceStyleFedHUG.workers = b.workers
    warnings.filterwarnings("ignore", message=".*worker processes in total.*")

    flags = ["--dataset", "fashionmnist", "--partition", "noniid", "--beta", "0.1", "--n_parties", str(b.clients),
             "--num_local_iterations", str(b.local_iterations), "--g_steps", str(b.g_steps),
             "--synthesis_batch_size", str(b.budget), "--start_round", "0", "--comm_round", "1"]
    args = parse_args(algorithm_parser(FedHUG), flags)
    bf16_args = parse_args(algorithm_parser(FedHUG), flags + ["--synthesis_bf16"])
    FedHUG.check_args(args)
    data = cvdataset.load_dataset("fashionmnist")      # loaded once, partitioned by each build
    cpu = torch.device("cpu")
    torch.manual_seed(0)
    weights = initial_weights(args, client_architectures(args.client_models, args.model, args.n_parties),
                              data.num_classes, data.image_shape, cpu)

    warm_up(args.model, data.image_shape, data.num_classes, b.budget)
    # (name, class, flags, whether PyTorch computes what kernels.py's C code would)
    variants = [("reference-style", ReferenceStyleFedHUG, args, True), ("this", FedHUG, args, False),
                ("this, no C kernels", FedHUG, args, True)]
    if not b.no_bf16:
        variants += [("this, bf16 (other numbers)", FedHUG, bf16_args, False),
                     ("this, bf16, no C kernels", FedHUG, bf16_args, True)]
    rows = {}
    for name, cls, arguments, without_c in variants:
        algorithm, client_data = build_client_side(cls, arguments, weights, cpu, dataset=data)
        with contextlib.ExitStack() as stack:
            if cls is ReferenceStyleFedHUG:
                stack.enter_context(plain_pooling())
            if without_c:
                stack.enter_context(kernels.disabled())
            rows[name] = timed_round(algorithm, client_data, weights[args.model], b.clients)
        total, synth, sizes, _ = rows[name]
        print(f"{name}: round {total:.2f} s (synthesis {synth:.2f} s)", file=sys.stderr, flush=True)

    reference_total = rows["reference-style"][0]
    sizes = rows["this"][2]
    per_sample = flops_per_sample_step(args.model, data.image_shape, data.num_classes)
    synthesis_flops = per_sample * b.g_steps * sum(sizes)
    rate = matmul_gflops(b.matmul_size)
    same_inputs = (rows["reference-style"][3] - rows["this"][3]).abs().max().item()
    identical, difference, teacher_seconds = shared_teacher_check(data.image_shape, data.num_classes,
                                                                  b.budget, min(b.clients, 4))

    print(f"\nFedHUG round: {b.clients} clients, {b.g_steps} synthesis steps, budget {b.budget} "
          f"({sum(sizes)} samples synthesised), {b.local_iterations} local iterations, {b.threads} thread(s)")
    print(f"{'variant':<28}{'round s':>10}{'synthesis s':>13}{'training s':>12}{'speed-up':>10}{'synth GFLOP/s*':>16}")
    for name, (total, synth, _, _) in rows.items():
        print(f"{name:<28}{total:>10.2f}{synth:>13.2f}{total - synth:>12.2f}{reference_total / total:>9.2f}x"
              f"{synthesis_flops / synth / 1e9:>16.1f}")
    print("* the FLOPs synthesis needs (input gradients only) / synthesis seconds")
    this_synthesis = rows["this"][1]
    floor = synthesis_flops / (rate * 1e9)
    print(f"\nsynthesis work: {synthesis_flops / 1e9:.1f} GFLOP ({per_sample / 1e6:.2f} MFLOP a sample a step); "
          f"large matmul here: {rate:.0f} GFLOP/s")
    print(f"synthesis floor at the matmul rate: {floor:.2f} s; this implementation: {this_synthesis:.2f} s "
          f"({100 * floor / this_synthesis:.1f}% of the floor's rate)")
    print(f"client 0's synthetic inputs, reference-style vs this: max |difference| {same_inputs:.2e}")
    if not b.no_bf16:
        same_bf16 = (rows["this, bf16 (other numbers)"][3] - rows["this, bf16, no C kernels"][3]).abs().max().item()
        print(f"client 0's bf16 synthetic inputs, with vs without the C code: max |difference| {same_bf16:.2e}")
    if not identical:
        verdict = "not usable: a client's results would differ from its run alone"
    elif teacher_seconds["together"] < 0.9 * teacher_seconds["alone"]:
        verdict = "identical and faster: worth an engine change (clients run one at a time now)"
    else:
        verdict = "identical but no faster here: not worth the engine change"
    print(f"one teacher pass over {min(b.clients, 4)} clients' inputs: identical to each alone: {identical} "
          f"(max |difference| {difference:.2e}); teacher step {teacher_seconds['alone'] * 1e3:.1f} ms alone vs "
          f"{teacher_seconds['together'] * 1e3:.1f} ms together -> {verdict}")


if __name__ == "__main__":
    main()
