"""The C code of kernels.py against what runs without it, one operation at a time.

    python bench/bench_kernels.py            # batch 64 (local training), 25 interleaved repeats, one thread
    python bench/bench_kernels.py --tiny     # seconds: every row once (CI)

Each row times one operation both ways on the same tensors, alternating the two in every repeat
so that a machine's drift hits both alike, and prints the medians and their ratio. The PyTorch
side is what the suite runs under `kernels.disabled()`: oneDNN's convolutions (through the same
aten calls the C code is checked against), torch.relu then models.MaxPool2x2, and the
augmentation in PyTorch's ops. The bfloat16 rows are the pooling of FedHUG's synthesis under
`--synthesis_bf16` (autocast hands it bfloat16 activations) at the synthesis batch size. Timing
only: tests/test_kernels.py and tests/test_models.py check that both sides give the same bits.
"""
import argparse
import contextlib
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import cvdataset  # noqa: E402
import kernels  # noqa: E402
import models  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=64, help="samples in a batch (local training's)")
    p.add_argument("--synthesis_batch", type=int, default=256, help="samples in a synthesis batch (bfloat16 rows)")
    p.add_argument("--repeats", type=int, default=25, help="interleaved repeats; medians are printed")
    p.add_argument("--calls", type=int, default=30, help="calls timed together in one repeat")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--tiny", action="store_true", help="every row once, small batches (CI)")
    args = p.parse_args(argv)
    if args.tiny:
        args.batch, args.synthesis_batch, args.repeats, args.calls = 8, 8, 1, 1
    return args


def c_code(use_c):
    """A context with kernels.py's C code on (as the suite runs) or off (kernels.disabled())."""
    return contextlib.nullcontext() if use_c else kernels.disabled()


def pooling_step(x, grad, use_c):
    """ReLU + 2x2 max pooling forward and backward, as ReLUMaxPool2x2 runs them."""
    with c_code(use_c):
        out = models.ReLUMaxPool2x2()(x)
    torch.autograd.grad(out, x, grad)


def operations(batch, synthesis_batch):
    """{name: (PyTorch's way, the C code)}, on fixed random tensors."""
    generator = torch.Generator().manual_seed(0)

    def randn(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=generator).to(dtype)

    x1, w1, b1, g1 = randn(batch, 1, 28, 28), randn(6, 1, 5, 5), randn(6), randn(batch, 6, 24, 24)
    x2, w2, b2, g2 = randn(batch, 6, 12, 12), randn(16, 6, 5, 5), randn(16), randn(batch, 16, 8, 8)
    pooled = {}     # name: (the convolution's output, the pooling's output gradient)
    for name, size, channels, side, dtype in (
            ("after conv1", batch, 6, 24, torch.float32), ("after conv2", batch, 16, 8, torch.float32),
            ("after conv1, bfloat16", synthesis_batch, 6, 24, torch.bfloat16),
            ("after conv2, bfloat16", synthesis_batch, 16, 8, torch.bfloat16)):
        pooled[name] = (randn(size, channels, side, side, dtype=dtype).requires_grad_(),
                        randn(size, channels, side // 2, side // 2, dtype=dtype))
    images = torch.randint(0, 256, (3000, 1, 28, 28), dtype=torch.uint8, generator=generator)
    index = torch.randperm(3000, generator=generator)[:batch]
    draws = torch.Generator().manual_seed(0)

    def augment(use_c):
        with c_code(use_c):
            return cvdataset.augment_batch(images, (0.286,), (0.353,), draws, index=index)

    table = {
        "conv1 forward": (lambda: torch.nn.functional.conv2d(x1, w1, b1), lambda: kernels.c_forward(x1, w1, b1)),
        "conv1 weight+bias grad": (lambda: kernels.onednn_backward(g1, x1, w1, [False, True, True]),
                                   lambda: kernels.c_weight_grad(g1, x1, w1)),
        "conv1 input grad": (lambda: kernels.onednn_backward(g1, x1, w1, [True, False, False]),
                             lambda: kernels.c_input_grad(g1, x1, w1)),
        "conv2 forward": (lambda: torch.nn.functional.conv2d(x2, w2, b2), lambda: kernels.c_forward(x2, w2, b2)),
        "conv2 weight+bias grad": (lambda: kernels.onednn_backward(g2, x2, w2, [False, True, True]),
                                   lambda: kernels.c_weight_grad(g2, x2, w2)),
        "conv2 input grad": (lambda: kernels.onednn_backward(g2, x2, w2, [True, False, False]),
                             lambda: kernels.c_input_grad(g2, x2, w2)),
    }
    for name, (x, grad) in pooled.items():
        table[f"relu+pool {name}"] = (lambda x=x, grad=grad: pooling_step(x, grad, False),
                                      lambda x=x, grad=grad: pooling_step(x, grad, True))
    table[f"augmentation of {batch} images"] = (lambda: augment(False), lambda: augment(True))
    return table


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if kernels.library() is None:
        print("the C code could not be built here (no cc, or no AVX2/FMA): nothing to compare")
        return 0
    table = operations(args.batch, args.synthesis_batch)
    for ways in table.values():        # first calls: the per-shape checks, allocations
        for way in ways:
            way()
    seconds = {name: ([], []) for name in table}
    for _ in range(args.repeats):
        for name, ways in table.items():
            for way, times in zip(ways, seconds[name]):
                start = time.perf_counter()
                for _ in range(args.calls):
                    way()
                times.append((time.perf_counter() - start) / args.calls)
    print(f"batch {args.batch} (bfloat16 rows: {args.synthesis_batch}), {args.threads} thread(s), "
          f"medians of {args.repeats} interleaved repeats of {args.calls} calls")
    print(f"{'operation':36} {'PyTorch ms':>10} {'C ms':>8} {'ratio':>7}")
    for name, (plain, c_code) in seconds.items():
        plain_ms, c_ms = statistics.median(plain) * 1e3, statistics.median(c_code) * 1e3
        print(f"{name:36} {plain_ms:10.3f} {c_ms:8.3f} {plain_ms / c_ms:6.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
