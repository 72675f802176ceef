"""A convolution on one-channel images (every model's first), with PyTorch's own numbers, faster on
CPU.

oneDNN's AVX2 kernels pad a convolution's single input channel to a block of 8, so for
SimpleCNN's conv(1->6, 5) on 28x28 images they spend most of their time on padding: forward and
backward of that convolution were ~45 % of a FedAvg training step on a Zen 3 CPU, and its input
gradient ~30 % of a FedHUG synthesis step. Each output is a plain sum whose order oneDNN fixes
(measured on this project's CPUs, one thread; float32 FMAs, each rounded once, `acc = fma(a, b,
acc)`), with g the output gradient of a stride-1 unpadded convolution:

    output           out[n, o, y, x] = chain from bias[o] over (i, j, c) of  fma(in[n, c, y+i, x+j], W[o, c, i, j])
    weight gradient  dW[o, c, i, j]  = chain from 0 over (n, y, x)       of  fma(in[n, c, y+i, x+j], g[n, o, y, x])
    bias gradient    db[o]           = chain from 0 over (n, y, x)       of  + g[n, o, y, x]
    input gradient   dI[n, c, h, w]  = chain from 0 over (output channels in blocks of 8, i, j, o in the block),
                                       valid (h-i, w-j) only, of  fma(W[o, c, i, j], g[n, o, h-i, w-j])

A few lines of C compute those chains in the same order (vectorised across chains, never within
one), so the results are the same bits, 2-7x faster on one thread.

Guarded twice, so no number can change:
- the C source is compiled once per machine with the system's C compiler (`cc`, about a second)
  into a cache folder; without a compiler, on any build error, or without AVX2 and FMA, oneDNN
  computes everything as before;
- the first time each shape is seen (per thread count), both oneDNN and the C code compute it and
  the C code is used for that shape only when every bit agrees. On CPUs whose oneDNN kernel sums
  in another order (AVX-512, several threads), the check fails once and oneDNN keeps the work.

`FastConv2d` is an nn.Conv2d (same parameters, state-dict names and numbers) that does this on
the CPU in float32; anything else (GPUs, autocast, second derivatives, several input channels,
padding, strides) is nn.Conv2d's own. `disabled()` switches it off for a benchmark of the plain
code; `FEDHUG_NATIVE_KERNELS=0` for a whole process.
"""
import contextlib
import ctypes
import hashlib
import os
import subprocess
import tempfile

import torch
import torch.nn.functional as F
from torch import nn

C_SOURCE = r"""
/* Every function returns 0 when done, 1 when out of memory, 2 when this build (no AVX2 and FMA)
   or this shape is not supported: the caller then uses oneDNN. fma() rounds once, as oneDNN's
   AVX2 kernels do; -ffp-contract=off keeps the compiler from fusing anything else. */
#include <stdlib.h>
#include <string.h>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define INLINE static inline __attribute__((always_inline))

/* out[n][o][y][x] = chain from b[o] over (i, j, c); a tile of OT output channels x R rows x V
   vectors of 8 pixels, each lane its own chain. */
INLINE void forward_tile(const float *in, const float *w, const float *b, float *out, int C, int H, int W,
                         int O, int K, int n, int o0, int y0, const int OT, const int R, const int V) {
    const int OH = H - K + 1, OW = W - K + 1;
    __m256 acc[4][2][4];
    for (int t = 0; t < OT; t++)
        for (int r = 0; r < R; r++)
            for (int v = 0; v < V; v++) acc[t][r][v] = _mm256_set1_ps(b[o0 + t]);
    for (int i = 0; i < K; i++)
        for (int j = 0; j < K; j++)
            for (int c = 0; c < C; c++) {
                const float *src = in + (((size_t)n * C + c) * H + y0 + i) * W + j;
                __m256 wv[4];
                for (int t = 0; t < OT; t++) wv[t] = _mm256_broadcast_ss(w + (((size_t)(o0 + t) * C + c) * K + i) * K + j);
                for (int r = 0; r < R; r++)
                    for (int v = 0; v < V; v++) {
                        const __m256 p = _mm256_loadu_ps(src + r * W + 8 * v);
                        for (int t = 0; t < OT; t++) acc[t][r][v] = _mm256_fmadd_ps(p, wv[t], acc[t][r][v]);
                    }
            }
    for (int t = 0; t < OT; t++)
        for (int r = 0; r < R; r++)
            for (int v = 0; v < V; v++)
                _mm256_storeu_ps(out + (((size_t)n * O + o0 + t) * OH + y0 + r) * OW + 8 * v, acc[t][r][v]);
}

INLINE void forward_all(const float *in, const float *w, const float *b, float *out, int N, int C, int H, int W,
                        int O, int K, const int OT, const int V) {
    const int OH = H - K + 1;
    for (int n = 0; n < N; n++)
        for (int o = 0; o < O; o += OT)
            for (int y = 0; y < OH; y += 2) forward_tile(in, w, b, out, C, H, W, O, K, n, o, y, OT, 2, V);
}

int conv_forward(const float *in, const float *w, const float *b, float *out, int N, int C, int H, int W, int O,
                 int K) {
    const int OH = H - K + 1, OW = W - K + 1;
    if (C != 1 || OH % 2) return 2;
    if (OW == 24 && O % 2 == 0) forward_all(in, w, b, out, N, C, H, W, O, K, 2, 3);
    else if (OW == 8 && O % 4 == 0) forward_all(in, w, b, out, N, C, H, W, O, K, 4, 1);
    else return 2;
    return 0;
}

/* One input channel, K <= 8: one chain a weight over (n, y, x). Lane j of acc[o][i] is
   dw[o][i][j]; an unaligned load of input row y+i at x gives the inputs x+j that weight row i
   meets (lanes beyond K: discarded). Two output channels at a time. */
INLINE void weight_grad_lanes_j(const float *in, const float *g, float *acc, float *bias, int N, int H, int W,
                                int O, const int K) {
    const int OH = H - K + 1, OW = W - K + 1;
    for (int n = 0; n < N; n++)
        for (int y = 0; y < OH; y++)
            for (int o = 0; o < O; o += 2) {
                const int pair = o + 1 < O;
                const float *g0 = g + (((size_t)n * O + o) * OH + y) * OW;
                const float *g1 = pair ? g0 + (size_t)OH * OW : g0;
                __m256 a0[8], a1[8];
                for (int i = 0; i < K; i++) {
                    a0[i] = _mm256_loadu_ps(acc + (o * 8 + i) * 8);
                    a1[i] = _mm256_loadu_ps(acc + ((o + pair) * 8 + i) * 8);
                }
                float b0 = bias[o], b1 = bias[o + pair];
                const float *row = in + ((size_t)n * H + y) * W;
                for (int x = 0; x < OW; x++) {
                    const __m256 v0 = _mm256_broadcast_ss(g0 + x), v1 = _mm256_broadcast_ss(g1 + x);
                    for (int i = 0; i < K; i++) {
                        const __m256 p = _mm256_loadu_ps(row + i * W + x);
                        a0[i] = _mm256_fmadd_ps(p, v0, a0[i]);
                        a1[i] = _mm256_fmadd_ps(p, v1, a1[i]);
                    }
                    b0 = b0 + g0[x];
                    b1 = b1 + g1[x];
                }
                for (int i = 0; i < K; i++) {
                    _mm256_storeu_ps(acc + (o * 8 + i) * 8, a0[i]);
                    if (pair) _mm256_storeu_ps(acc + ((o + 1) * 8 + i) * 8, a1[i]);
                }
                bias[o] = b0;
                if (pair) bias[o + 1] = b1;
            }
}

static int weight_grad_one_channel(const float *in, const float *g, float *dw, float *db, int N, int H, int W,
                                   int O, int K) {
    size_t count = (size_t)N * H * W;
    float *padded = malloc((count + 8) * sizeof(float));     /* the loads read up to 7 floats past a row */
    float *acc = calloc((size_t)(O + 1) * 64, sizeof(float));
    float *bias = calloc((size_t)O + 1, sizeof(float));
    if (!padded || !acc || !bias) { free(padded); free(acc); free(bias); return 1; }
    memcpy(padded, in, count * sizeof(float));
    memset(padded + count, 0, 8 * sizeof(float));
    if (K == 5) weight_grad_lanes_j(padded, g, acc, bias, N, H, W, O, 5);
    else weight_grad_lanes_j(padded, g, acc, bias, N, H, W, O, 3);
    for (int o = 0; o < O; o++) {
        for (int i = 0; i < K; i++)
            for (int j = 0; j < K; j++) dw[(o * K + i) * K + j] = acc[(o * 8 + i) * 8 + j];
        db[o] = bias[o];
    }
    free(padded); free(acc); free(bias);
    return 0;
}

int conv_weight_grad(const float *in, const float *g, float *dw, float *db, int N, int C, int H, int W, int O, int K) {
    if (C != 1 || (K != 5 && K != 3)) return 2;
    return weight_grad_one_channel(in, g, dw, db, N, H, W, O, K);
}

/* di[n][c][h][w] (rows of at most 8 V pixels): one chain a pixel over (output-channel block of
   8, i, j, o in the block), two image rows (2 V vectors of chains) at a time. The output gradient
   is copied into a zero-bordered image per sample, so out-of-range terms add an exact zero. */
INLINE void input_grad_rows(const float *g, const float *wt, float *di, float *gp, int N, int C, int H, int W,
                            int O, const int K, const int V) {
    const int OH = H - K + 1, OW = W - K + 1, PH = OH + 2 * (K - 1) + 1, PW = 8 * V + 2 * K + 8;
    for (int n = 0; n < N; n++) {
        memset(gp, 0, (size_t)O * PH * PW * sizeof(float));
        for (int o = 0; o < O; o++)
            for (int y = 0; y < OH; y++)
                memcpy(gp + ((size_t)o * PH + y + K - 1) * PW + K - 1, g + (((size_t)n * O + o) * OH + y) * OW,
                       OW * sizeof(float));
        for (int c = 0; c < C; c++)
            for (int h = 0; h < H; h += 2) {
                __m256 r0[4], r1[4];
                for (int v = 0; v < V; v++) r0[v] = r1[v] = _mm256_setzero_ps();
                for (int block = 0; block < O; block += 8)
                    for (int i = 0; i < K; i++)
                        for (int j = 0; j < K; j++)
                            for (int o = block; o < O && o < block + 8; o++) {
                                const __m256 w = _mm256_broadcast_ss(wt + (((size_t)o * C + c) * K + i) * K + j);
                                const float *p0 = gp + ((size_t)o * PH + h - i + K - 1) * PW + K - 1 - j;
                                const float *p1 = p0 + PW;
                                for (int v = 0; v < V; v++) {
                                    r0[v] = _mm256_fmadd_ps(w, _mm256_loadu_ps(p0 + 8 * v), r0[v]);
                                    r1[v] = _mm256_fmadd_ps(w, _mm256_loadu_ps(p1 + 8 * v), r1[v]);
                                }
                            }
                float rows[64];
                for (int v = 0; v < V; v++) {
                    _mm256_storeu_ps(rows + 8 * v, r0[v]);
                    _mm256_storeu_ps(rows + 32 + 8 * v, r1[v]);
                }
                memcpy(di + (((size_t)n * C + c) * H + h) * W, rows, W * sizeof(float));
                if (h + 1 < H) memcpy(di + (((size_t)n * C + c) * H + h + 1) * W, rows + 32, W * sizeof(float));
            }
    }
}

int conv_input_grad(const float *g, const float *wt, float *di, int N, int C, int H, int W, int O, int K) {
    if (C != 1 || K > 8 || W > 32) return 2;
    const int V = (W + 7) / 8, OH = H - K + 1;
    float *gp = malloc((size_t)O * (OH + 2 * (K - 1) + 1) * (8 * V + 2 * K + 8) * sizeof(float));
    if (!gp) return 1;
    if (V == 4) input_grad_rows(g, wt, di, gp, N, C, H, W, O, K, 4);
    else if (V == 3) input_grad_rows(g, wt, di, gp, N, C, H, W, O, K, 3);
    else if (V == 2) input_grad_rows(g, wt, di, gp, N, C, H, W, O, K, 2);
    else input_grad_rows(g, wt, di, gp, N, C, H, W, O, K, 1);
    free(gp);
    return 0;
}
#else
int conv_forward(const float *in, const float *w, const float *b, float *out, int N, int C, int H, int W, int O,
                 int K) { return 2; }
int conv_weight_grad(const float *in, const float *g, float *dw, float *db, int N, int C, int H, int W, int O,
                     int K) { return 2; }
int conv_input_grad(const float *g, const float *wt, float *di, int N, int C, int H, int W, int O, int K) {
    return 2;
}
#endif
"""
COMPILE = ["cc", "-O3", "-march=native", "-fno-math-errno", "-ffp-contract=off", "-fPIC", "-shared"]

_library = None        # the loaded C library, False when it cannot be built
_agrees = {}           # (kind, shapes, mask, threads) -> whether the C result equals oneDNN's, bit for bit
_enabled = os.environ.get("FEDHUG_NATIVE_KERNELS", "1") != "0"


def _cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        return ""


def library():
    """The compiled C code (built on first use into ~/.cache/fl-suite-kernels), or None."""
    global _library
    if _library is None:
        _library = False
        key = hashlib.sha1((C_SOURCE + " ".join(COMPILE) + _cpu_flags()).encode()).hexdigest()[:16]
        folder = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "fl-suite-kernels")
        path = os.path.join(folder, f"conv-{key}.so")
        try:
            if not os.path.exists(path):
                os.makedirs(folder, exist_ok=True)
                with tempfile.TemporaryDirectory(dir=folder) as tmp:
                    source = os.path.join(tmp, "conv.c")
                    with open(source, "w") as f:
                        f.write(C_SOURCE)
                    subprocess.run(COMPILE + ["-o", os.path.join(tmp, "conv.so"), source], check=True,
                                   capture_output=True, timeout=120)
                    os.replace(os.path.join(tmp, "conv.so"), path)    # atomic: parallel builders agree
            lib = ctypes.CDLL(path)
            lib.conv_forward.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int] * 6
            lib.conv_weight_grad.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int] * 6
            lib.conv_input_grad.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int] * 6
            _library = lib
        except (OSError, subprocess.SubprocessError):
            _library = False
    return _library or None


def _pointer(tensor):
    return ctypes.c_void_p(tensor.data_ptr())


def _call(function, *tensors_and_sizes):
    status = function(*(_pointer(a) if isinstance(a, torch.Tensor) else a for a in tensors_and_sizes))
    if status == 1:
        raise MemoryError(f"{function.__name__}: out of memory")
    return status == 0          # 2: shape or build not supported


def _sizes(x, weight):
    """N, C, H, W of the input, O and K of the (square) kernel: the C functions' size arguments."""
    return (*x.shape, weight.shape[0], weight.shape[2])


def c_forward(x, weight, bias):
    """The convolution's output by the C chains, or None where not supported."""
    out = x.new_empty(x.shape[0], weight.shape[0], x.shape[2] - weight.shape[2] + 1, x.shape[3] - weight.shape[3] + 1)
    return out if _call(library().conv_forward, x, weight, bias, out, *_sizes(x, weight)) else None


def c_weight_grad(grad, x, weight):
    """(dW, db) by the C chains, or None where not supported."""
    dw, db = torch.empty_like(weight), torch.empty(weight.shape[0], dtype=weight.dtype)
    return (dw, db) if _call(library().conv_weight_grad, x, grad, dw, db, *_sizes(x, weight)) else None


def c_input_grad(grad, x, weight):
    """dI by the C chains, or None where not supported."""
    di = torch.empty_like(x)
    return di if _call(library().conv_input_grad, grad, weight, di, *_sizes(x, weight)) else None


def onednn_backward(grad, x, weight, mask):
    """PyTorch's own convolution backward (what autograd runs for F.conv2d): (dI, dW, db)."""
    return torch.ops.aten.convolution_backward(grad, x, weight, [weight.shape[0]], [1, 1], [0, 0], [1, 1], False,
                                               [0, 0], 1, mask)


def _same_bits(a, b):
    return a is not None and a.shape == b.shape and torch.equal(a.view(torch.int32), b.view(torch.int32))


def checked(key, c_version, pytorch_version):
    """pytorch_version() the first time `key` is seen, after comparing it with c_version() bit for
    bit (c_version returns a tuple of results, None for a result it cannot give); afterwards
    c_version() where they agreed, pytorch_version() where not."""
    if key not in _agrees:
        reference = pytorch_version()
        _agrees[key] = all(_same_bits(a, b) for a, b in zip(c_version(), reference) if b is not None)
        return reference
    return c_version() if _agrees[key] else pytorch_version()


def forward(x, weight, bias):
    """F.conv2d(x, weight, bias), by the C chains where they were checked to agree."""
    key = ("forward", tuple(x.shape), tuple(weight.shape), torch.get_num_threads())
    return checked(key, lambda: (c_forward(x, weight, bias),), lambda: (F.conv2d(x, weight, bias),))[0]


class _Conv2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        return forward(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        mask = list(ctx.needs_input_grad)
        if torch.is_grad_enabled():     # a second derivative follows: PyTorch's differentiable op
            return onednn_backward(grad, x, weight, mask)
        grad = grad.contiguous()

        def c_version():
            grad_input = c_input_grad(grad, x, weight) if mask[0] else None
            grad_weight, grad_bias = (c_weight_grad(grad, x, weight) or (None, None)) if mask[1] or mask[2] \
                else (None, None)
            return grad_input, grad_weight if mask[1] else None, grad_bias if mask[2] else None

        key = ("backward", tuple(x.shape), tuple(weight.shape), tuple(mask), torch.get_num_threads())
        return checked(key, c_version, lambda: onednn_backward(grad, x, weight, mask))


class FastConv2d(nn.Conv2d):
    """nn.Conv2d that runs the C chains above on the CPU (same numbers, faster) when it is a
    float32, stride-1, unpadded, ungrouped convolution with a bias, outside autocast; anything
    else is nn.Conv2d's own forward."""

    def forward(self, x):
        if not (_enabled and x.device.type == "cpu" and x.dtype == torch.float32 and self.bias is not None
                and not torch.is_autocast_enabled("cpu") and x.dim() == 4 and x.is_contiguous()
                and self.stride == (1, 1) and self.padding == (0, 0) and self.dilation == (1, 1)
                and self.groups == 1 and self.padding_mode == "zeros" and self.weight.dtype == torch.float32
                and self.weight.is_contiguous() and library()):
            return super().forward(x)
        if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad or self.bias.requires_grad):
            return _Conv2d.apply(x, self.weight, self.bias)
        return forward(x, self.weight, self.bias)


@contextlib.contextmanager
def disabled():
    """Within it, FastConv2d is nn.Conv2d (for benchmarks of plain code)."""
    global _enabled
    saved, _enabled = _enabled, False
    try:
        yield
    finally:
        _enabled = saved
