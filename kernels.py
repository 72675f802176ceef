"""SimpleCNN's convolutions (and every model's first), ReLU + 2x2 max pooling and the batch
augmentation in C, with PyTorch's own numbers, faster on CPU.

Convolutions. oneDNN's AVX2 kernels pad a convolution's single input channel to a block of 8, so
for SimpleCNN's conv(1->6, 5) on 28x28 images they spend most of their time on padding: forward
and backward of that convolution were ~45 % of a FedAvg training step on a Zen 3 CPU, and its
input gradient ~30 % of a FedHUG synthesis step; conv(6->16, 5) was then the largest piece left.
Each output is a plain sum whose order oneDNN fixes (measured on this project's CPUs, one thread;
float32 FMAs, each rounded once, `acc = fma(a, b, acc)`), with g the output gradient of a
stride-1 unpadded convolution:

    output           out[n, o, y, x] = chain from bias[o] over (i, j, c) of  fma(in[n, c, y+i, x+j], W[o, c, i, j])
    weight gradient  dW[o, c, i, j]  = chain from 0 over (n, y, x)       of  fma(in[n, c, y+i, x+j], g[n, o, y, x])
    bias gradient    db[o]           = chain from 0 over (n, y, x)       of  + g[n, o, y, x]
    input gradient   dI[n, c, h, w]  = chain from 0 over (output channels in blocks of 8, i, j, o in the block),
                                       valid (h-i, w-j) only, of  fma(W[o, c, i, j], g[n, o, h-i, w-j])

The C code computes those chains in the same order, vectorised across chains and never within
one (one input channel: pixels or kernel columns in lanes; several: output channels in lanes for
the weight gradient, samples in lanes for the input gradient, transposed in and out), so the
results are the same bits, 1.5-7x faster on one thread.

Guarded twice, so no number can change:
- the C source is compiled once per machine with the system's C compiler (`cc`, about a second)
  into a cache folder; without a compiler, on any build error, or without AVX2 and FMA, oneDNN
  computes everything as before;
- the first time each shape is seen (per thread count), both oneDNN and the C code compute it and
  the C code is used for that shape only when every bit agrees. On CPUs whose oneDNN kernel sums
  in another order (AVX-512, several threads), the check fails once and oneDNN keeps the work.

`FastConv2d` is an nn.Conv2d (same parameters, state-dict names and numbers) that does this on
the CPU in float32; anything else (GPUs, autocast, second derivatives, padding, strides, shapes
the C code does not cover) is nn.Conv2d's own.

ReLU + 2x2 max pooling (`relu_max_pool_2x2`) and the augmentation (`crop_flip_normalise`) select
and look up values, with no arithmetic of their own, so they give PyTorch's numbers on every CPU
(ties, NaN and signed zeros follow PyTorch's rules; the normalisation is a table that PyTorch's
normalise computed). The pooling also takes bfloat16, which FedHUG's synthesis hands it under
`--synthesis_bf16` (autocast): widened to float32, selected, narrowed back, NaNs written as
PyTorch's bfloat16 relu writes them (0x7FC0). `disabled()` switches all of it off for a
benchmark of the plain code; `FEDHUG_NATIVE_KERNELS=0` for a whole process.
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
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#define INLINE static inline __attribute__((always_inline))
/* Loads a value into a register once: without it GCC folds the load into each FMA that uses it,
   and the loads, not the FMAs, then bound the loop. */
#define KEEP_IN_REGISTER(v) __asm__("" : "+x"(v))
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>

/* out[n][o][y][x] = chain from b[o] over (i, j, c); a tile of OT output channels x R rows x V
   vectors of 8 pixels, each lane its own chain. */
INLINE void forward_tile(const float *in, const float *w, const float *b, float *out, int C, int H, int W,
                         int O, int K, int n, int o0, int y0, const int OT, const int R, const int V) {
    const int OH = H - K + 1, OW = W - K + 1;
    __m256 acc[4][3][4];
    for (int t = 0; t < OT; t++)
        for (int r = 0; r < R; r++)
            for (int v = 0; v < V; v++) acc[t][r][v] = _mm256_set1_ps(b[o0 + t]);
    for (int i = 0; i < K; i++)
        for (int j = 0; j < K; j++)
            for (int c = 0; c < C; c++) {
                const float *src = in + (((size_t)n * C + c) * H + y0 + i) * W + j;
                if (R * V <= 3) {       /* the inputs in registers, one weight at a time (16 registers) */
                    __m256 p[3];
                    for (int r = 0; r < R; r++)
                        for (int v = 0; v < V; v++) {
                            p[r * V + v] = _mm256_loadu_ps(src + r * W + 8 * v);
                            KEEP_IN_REGISTER(p[r * V + v]);
                        }
                    for (int t = 0; t < OT; t++) {
                        const __m256 wv = _mm256_broadcast_ss(w + (((size_t)(o0 + t) * C + c) * K + i) * K + j);
                        for (int r = 0; r < R; r++)
                            for (int v = 0; v < V; v++) acc[t][r][v] = _mm256_fmadd_ps(p[r * V + v], wv, acc[t][r][v]);
                    }
                    continue;
                }
                __m256 wv[4];           /* the weights in registers, one input vector at a time */
                for (int t = 0; t < OT; t++) wv[t] = _mm256_broadcast_ss(w + (((size_t)(o0 + t) * C + c) * K + i) * K + j);
                for (int r = 0; r < R; r++)
                    for (int v = 0; v < V; v++) {
                        __m256 p = _mm256_loadu_ps(src + r * W + 8 * v);
                        KEEP_IN_REGISTER(p);
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

/* Several input channels, rows of 8 outputs: tiles of 4 output channels x 3 rows (12 chains in
   registers), the last rows 2 or 1 at a time. */
static void forward_rows_of_8(const float *in, const float *w, const float *b, float *out, int N, int C, int H,
                              int W, int O, int K) {
    const int OH = H - K + 1;
    for (int n = 0; n < N; n++)
        for (int o = 0; o < O; o += 4) {
            int y = 0;
            for (; y + 3 <= OH; y += 3) forward_tile(in, w, b, out, C, H, W, O, K, n, o, y, 4, 3, 1);
            for (; y + 2 <= OH; y += 2) forward_tile(in, w, b, out, C, H, W, O, K, n, o, y, 4, 2, 1);
            for (; y < OH; y++) forward_tile(in, w, b, out, C, H, W, O, K, n, o, y, 4, 1, 1);
        }
}

int conv_forward(const float *in, const float *w, const float *b, float *out, int N, int C, int H, int W, int O,
                 int K) {
    const int OH = H - K + 1, OW = W - K + 1;
    if (C > 1) {
        if (OW != 8 || O % 4) return 2;
        forward_rows_of_8(in, w, b, out, N, C, H, W, O, K);
        return 0;
    }
    if (OH % 2) return 2;
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
                        __m256 p = _mm256_loadu_ps(row + i * W + x);
                        KEEP_IN_REGISTER(p);
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

/* A block of 8 rows of 8 floats (row k at src + k * src_r) transposed: column k to dst + k * dst_c. */
INLINE void transpose8x8(const float *src, size_t src_r, float *dst, size_t dst_c) {
    __m256 r[8], t[8], u[8];
    for (int k = 0; k < 8; k++) r[k] = _mm256_loadu_ps(src + k * src_r);
    for (int k = 0; k < 8; k += 2) {
        t[k] = _mm256_unpacklo_ps(r[k], r[k + 1]);
        t[k + 1] = _mm256_unpackhi_ps(r[k], r[k + 1]);
    }
    for (int k = 0; k < 8; k += 4) {
        u[k] = _mm256_shuffle_ps(t[k], t[k + 2], 0x44);
        u[k + 1] = _mm256_shuffle_ps(t[k], t[k + 2], 0xEE);
        u[k + 2] = _mm256_shuffle_ps(t[k + 1], t[k + 3], 0x44);
        u[k + 3] = _mm256_shuffle_ps(t[k + 1], t[k + 3], 0xEE);
    }
    for (int k = 0; k < 4; k++) {
        _mm256_storeu_ps(dst + k * dst_c, _mm256_permute2f128_ps(u[k], u[k + 4], 0x20));
        _mm256_storeu_ps(dst + (k + 4) * dst_c, _mm256_permute2f128_ps(u[k], u[k + 4], 0x31));
    }
}

/* dst[r + c * dst_c] = src[r * src_r + c] for r < rows, c < cols: a strided transposition, 8 x 8
   at a time (the edges element by element). */
static void transpose(const float *src, float *dst, int rows, int cols, size_t src_r, size_t dst_c) {
    for (int r0 = 0; r0 < rows; r0 += 8)
        for (int c0 = 0; c0 < cols; c0 += 8) {
            if (r0 + 8 <= rows && c0 + 8 <= cols) {
                transpose8x8(src + r0 * src_r + c0, src_r, dst + c0 * dst_c + r0, dst_c);
                continue;
            }
            for (int c = c0; c < cols && c < c0 + 8; c++)
                for (int r = r0; r < rows && r < r0 + 8; r++) dst[r + c * dst_c] = src[r * src_r + c];
        }
}

/* Several input channels, output channels in lanes (O a multiple of 16): dw[o][c][i][j] a chain
   from 0 over (n, y, x) of fma(in[n][c][y+i][x+j], g[n][o][y][x]), db[o] a chain from 0 over
   (n, y, x) of + g. The output gradient is first transposed to gt[n][y][x][o], so 8 consecutive
   output channels are one load. Registers hold K x 2 vectors of chains (one c, one i, all j, 16
   output channels) through the whole (n, y, x) sequence. */
#define ACC_J(J) __m256 lo##J = _mm256_setzero_ps(), hi##J = _mm256_setzero_ps();
#define FMA_J(J) { const __m256 p = _mm256_broadcast_ss(row + x + J);                                               \
                   lo##J = _mm256_fmadd_ps(p, g0, lo##J); hi##J = _mm256_fmadd_ps(p, g1, hi##J); }
#define STORE_J(J) { _mm256_storeu_ps(lanes[J], lo##J); _mm256_storeu_ps(lanes[J] + 8, hi##J); }
/* Named accumulators (lo/hi: output channels o0..o0+7, o0+8..o0+15 of dw[.][c][i][J]): an array
   indexed in loops made GCC store them to memory on every step. */
#define WEIGHT_GRAD_O_LANES_BLOCK(K, FOR_J)                                                                          \
static void weight_grad_o_lanes_block_##K(const float *in, const float *gt, float *dw, int N, int C, int H, int W,  \
                                          int O, int c, int i, int o0) {                                            \
    const int OH = H - K + 1, OW = W - K + 1;                                                                        \
    FOR_J(ACC_J)                                                                                                     \
    for (int n = 0; n < N; n++)                                                                                      \
        for (int y = 0; y < OH; y++) {                                                                               \
            const float *row = in + (((size_t)n * C + c) * H + y + i) * W;                                           \
            const float *gy = gt + (((size_t)n * OH + y) * OW) * O + o0;                                             \
            for (int x = 0; x < OW; x++) {                                                                           \
                const __m256 g0 = _mm256_loadu_ps(gy + (size_t)x * O), g1 = _mm256_loadu_ps(gy + (size_t)x * O + 8); \
                FOR_J(FMA_J)                                                                                         \
            }                                                                                                        \
        }                                                                                                            \
    float lanes[K][16];                                                                                              \
    FOR_J(STORE_J)                                                                                                   \
    for (int j = 0; j < K; j++)                                                                                      \
        for (int o = 0; o < 16; o++) dw[(((size_t)(o0 + o) * C + c) * K + i) * K + j] = lanes[j][o];                \
}
#define FOR_J5(M) M(0) M(1) M(2) M(3) M(4)
#define FOR_J3(M) M(0) M(1) M(2)
WEIGHT_GRAD_O_LANES_BLOCK(5, FOR_J5)
WEIGHT_GRAD_O_LANES_BLOCK(3, FOR_J3)

static int weight_grad_o_lanes(const float *in, const float *g, float *dw, float *db, int N, int C, int H, int W,
                               int O, int K) {
    const int OH = H - K + 1, OW = W - K + 1;
    const size_t positions = (size_t)N * OH * OW;
    float *gt = malloc(positions * O * sizeof(float));
    if (!gt) return 1;
    for (int n = 0; n < N; n++)       /* per sample: rows o, columns p -> rows p, columns o */
        transpose(g + (size_t)n * O * OH * OW, gt + (size_t)n * OH * OW * O, O, OH * OW, OH * OW, O);
    for (int o0 = 0; o0 < O; o0 += 8) {
        __m256 bias = _mm256_setzero_ps();
        for (size_t p = 0; p < positions; p++) bias = _mm256_add_ps(bias, _mm256_loadu_ps(gt + p * O + o0));
        _mm256_storeu_ps(db + o0, bias);
    }
    for (int o0 = 0; o0 < O; o0 += 16)
        for (int c = 0; c < C; c++)
            for (int i = 0; i < K; i++) {
                if (K == 5) weight_grad_o_lanes_block_5(in, gt, dw, N, C, H, W, O, c, i, o0);
                else weight_grad_o_lanes_block_3(in, gt, dw, N, C, H, W, O, c, i, o0);
            }
    free(gt);
    return 0;
}

/* Several input channels, samples in lanes: di[n][c][h][w] a chain from 0 over (output-channel
   block of 8, i, j, o in the block), valid (h-i, w-j) only, of fma(W[o][c][i][j], g[n][o][h-i][w-j]).
   The output gradient is transposed to gn[y][x][o][n] (n padded to a multiple of 8 with zeros),
   so 8 samples are one load; a register tile holds CB input channels x NB groups of 8 samples
   for one pixel (h, w); the result, di[c][h][w][n], is transposed back. */
INLINE void input_grad_n_lanes_tile(const float *gn, const float *w, float *dn, int NP, int C, int H, int W, int O,
                                    int K, int h, int x, int c0, int n0, const int CB, const int NB) {
    const int OH = H - K + 1, OW = W - K + 1;
    const int i_lo = h - OH + 1 > 0 ? h - OH + 1 : 0, i_hi = h < K - 1 ? h : K - 1;
    const int j_lo = x - OW + 1 > 0 ? x - OW + 1 : 0, j_hi = x < K - 1 ? x : K - 1;
    __m256 acc[6][2];
    for (int c = 0; c < CB; c++)
        for (int b = 0; b < NB; b++) acc[c][b] = _mm256_setzero_ps();
    for (int block = 0; block < O; block += 8)
        for (int i = i_lo; i <= i_hi; i++)
            for (int j = j_lo; j <= j_hi; j++)
                for (int o = block; o < O && o < block + 8; o++) {
                    const float *gp = gn + ((((size_t)h - i) * OW + x - j) * O + o) * NP + n0;
                    __m256 gv[2];
                    for (int b = 0; b < NB; b++) gv[b] = _mm256_loadu_ps(gp + 8 * b);
                    for (int c = 0; c < CB; c++) {
                        const __m256 wv = _mm256_broadcast_ss(w + (((size_t)o * C + c0 + c) * K + i) * K + j);
                        for (int b = 0; b < NB; b++) acc[c][b] = _mm256_fmadd_ps(wv, gv[b], acc[c][b]);
                    }
                }
    for (int c = 0; c < CB; c++)
        for (int b = 0; b < NB; b++) _mm256_storeu_ps(dn + (((size_t)(c0 + c) * H + h) * W + x) * NP + n0 + 8 * b, acc[c][b]);
}

#define INPUT_GRAD_TILE(CB, NB) input_grad_n_lanes_tile(gn, w, dn, NP, C, H, W, O, K, h, x, c0, n0, CB, NB)
/* The tile for cb input channels (1-6) and NB groups of 8 samples, each size a compile-time constant. */
#define INPUT_GRAD_TILES(NB)                                                                                         \
    switch (cb) {                                                                                                    \
        case 6: INPUT_GRAD_TILE(6, NB); break;   case 5: INPUT_GRAD_TILE(5, NB); break;                              \
        case 4: INPUT_GRAD_TILE(4, NB); break;   case 3: INPUT_GRAD_TILE(3, NB); break;                              \
        case 2: INPUT_GRAD_TILE(2, NB); break;   default: INPUT_GRAD_TILE(1, NB);                                    \
    }
static int input_grad_n_lanes(const float *g, const float *w, float *di, int N, int C, int H, int W, int O, int K) {
    const int OH = H - K + 1, OW = W - K + 1, NP = (N + 7) / 8 * 8;
    float *gn = calloc((size_t)O * OH * OW * NP, sizeof(float));
    float *dn = malloc((size_t)C * H * W * NP * sizeof(float));
    if (!gn || !dn) { free(gn); free(dn); return 1; }
    for (int o = 0; o < O; o++)       /* per output channel: rows n, columns p -> gn[p][o][n] */
        transpose(g + (size_t)o * OH * OW, gn + (size_t)o * NP, N, OH * OW, (size_t)O * OH * OW, (size_t)O * NP);
    for (int h = 0; h < H; h++)
        for (int x = 0; x < W; x++)
            for (int c0 = 0; c0 < C; c0 += 6)
                for (int n0 = 0; n0 < NP; n0 += 16) {
                    const int cb = C - c0 < 6 ? C - c0 : 6;
                    if (NP - n0 >= 16) { INPUT_GRAD_TILES(2) } else { INPUT_GRAD_TILES(1) }
                }
    for (int c = 0; c < C; c++)       /* per input channel: rows p, columns n -> di[n][c][p] */
        transpose(dn + (size_t)c * H * W * NP, di + (size_t)c * H * W, H * W, N, NP, (size_t)C * H * W);
    free(gn); free(dn);
    return 0;
}

int conv_weight_grad(const float *in, const float *g, float *dw, float *db, int N, int C, int H, int W, int O, int K) {
    if (K != 5 && K != 3) return 2;
    if (C == 1) return weight_grad_one_channel(in, g, dw, db, N, H, W, O, K);
    return O % 16 == 0 ? weight_grad_o_lanes(in, g, dw, db, N, C, H, W, O, K) : 2;
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
    if (C != 1) return input_grad_n_lanes(g, wt, di, N, C, H, W, O, K);
    if (K > 8 || W > 32) return 2;
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

/* ReLU then 2x2 max pooling (stride 2) over planes of H x W (H, W even), as PyTorch's relu and
   max_pool2d compute them: relu(v) = v < 0 ? +0 : v (so -0 and NaN pass through); each window scans
   a b / c d and the first maximum wins (a later value wins if greater, or if NaN); arg records the
   winner (0-3). The gradient is PyTorch's max_pool2d backward (0 + g into the winner, zeros
   elsewhere) followed by relu's threshold backward (0 where the relu output, the pooled value, is
   <= 0). Pure selection, no rounding: the same bits on every CPU. Four windows at a time with SSE
   (branch-free: random maxima defeat a branch predictor), one at a time on other CPUs. Float32 and
   bfloat16 (FedHUG's synthesis under autocast), the latter widened to float32 and narrowed back. */
#if defined(__SSE4_1__)
#include <smmintrin.h>
INLINE __m128 relu4(__m128 v) { return _mm_andnot_ps(_mm_cmplt_ps(v, _mm_setzero_ps()), v); }

/* The four windows of two rows of 8 values: their pooled values; winners into arg */
INLINE __m128 pool4_values(__m128 u0, __m128 u1, __m128 l0, __m128 l1, unsigned char *arg) {
    const __m128 candidates[3] = {relu4(_mm_shuffle_ps(u0, u1, 0xDD)), relu4(_mm_shuffle_ps(l0, l1, 0x88)),
                                  relu4(_mm_shuffle_ps(l0, l1, 0xDD))};
    __m128 best = relu4(_mm_shuffle_ps(u0, u1, 0x88));
    __m128i winner = _mm_setzero_si128();
    for (int k = 0; k < 3; k++) {
        const __m128 v = candidates[k];
        const __m128 wins = _mm_or_ps(_mm_cmpgt_ps(v, best), _mm_cmpunord_ps(v, v));
        best = _mm_blendv_ps(best, v, wins);
        winner = _mm_blendv_epi8(winner, _mm_set1_epi32(k + 1), _mm_castps_si128(wins));
    }
    const int bytes = _mm_cvtsi128_si32(_mm_packus_epi16(_mm_packus_epi32(winner, winner), winner));
    memcpy(arg, &bytes, 4);
    return best;
}

/* The gradients of four windows (the value 0 + g where the pooled value is > 0, at the winner; zeros
   elsewhere) as the two rows of 8 they came from: at[0..1] the upper row, at[2..3] the lower */
INLINE void unpool4_values(__m128 g, __m128 out, const unsigned char *arg, __m128 *rows) {
    int bytes;
    memcpy(&bytes, arg, 4);
    const __m128i winner = _mm_cvtepu8_epi32(_mm_cvtsi32_si128(bytes));
    const __m128 value = _mm_andnot_ps(_mm_cmple_ps(out, _mm_setzero_ps()), _mm_add_ps(_mm_setzero_ps(), g));
    __m128 at[4];
    for (int k = 0; k < 4; k++) at[k] = _mm_and_ps(value, _mm_castsi128_ps(_mm_cmpeq_epi32(winner, _mm_set1_epi32(k))));
    rows[0] = _mm_unpacklo_ps(at[0], at[1]);
    rows[1] = _mm_unpackhi_ps(at[0], at[1]);
    rows[2] = _mm_unpacklo_ps(at[2], at[3]);
    rows[3] = _mm_unpackhi_ps(at[2], at[3]);
}

INLINE void pool4(const float *upper, const float *lower, float *out, unsigned char *arg) {
    _mm_storeu_ps(out, pool4_values(_mm_loadu_ps(upper), _mm_loadu_ps(upper + 4), _mm_loadu_ps(lower),
                                    _mm_loadu_ps(lower + 4), arg));
}

INLINE void unpool4(const float *g, const float *out, const unsigned char *arg, float *upper, float *lower) {
    __m128 rows[4];
    unpool4_values(_mm_loadu_ps(g), _mm_loadu_ps(out), arg, rows);
    _mm_storeu_ps(upper, rows[0]);
    _mm_storeu_ps(upper + 4, rows[1]);
    _mm_storeu_ps(lower, rows[2]);
    _mm_storeu_ps(lower + 4, rows[3]);
}

/* bfloat16 is the upper half of a float32: widening appends 16 zero bits; narrowing drops them, exact
   for values that came from bfloat16, as selections and 0 + g do */
INLINE __m128 widen4(const uint16_t *p) {
    return _mm_castsi128_ps(_mm_unpacklo_epi16(_mm_setzero_si128(), _mm_loadl_epi64((const __m128i *)p)));
}

INLINE void widen8(const uint16_t *p, __m128 *low, __m128 *high) {
    const __m128i v = _mm_loadu_si128((const __m128i *)p);
    *low = _mm_castsi128_ps(_mm_unpacklo_epi16(_mm_setzero_si128(), v));
    *high = _mm_castsi128_ps(_mm_unpackhi_epi16(_mm_setzero_si128(), v));
}

INLINE __m128i narrow8(__m128 low, __m128 high) {
    return _mm_packus_epi32(_mm_srli_epi32(_mm_castps_si128(low), 16), _mm_srli_epi32(_mm_castps_si128(high), 16));
}

/* PyTorch's bfloat16 relu writes every NaN as 0x7FC0 (its float -> bfloat16 rounding) */
INLINE __m128 canonical_nan4(__m128 v) {
    return _mm_blendv_ps(v, _mm_castsi128_ps(_mm_set1_epi32(0x7FC00000)), _mm_cmpunord_ps(v, v));
}

INLINE void pool4_bf16(const uint16_t *upper, const uint16_t *lower, uint16_t *out, unsigned char *arg) {
    __m128 u0, u1, l0, l1;
    widen8(upper, &u0, &u1);
    widen8(lower, &l0, &l1);
    const __m128 best = canonical_nan4(pool4_values(u0, u1, l0, l1, arg));
    _mm_storel_epi64((__m128i *)out, narrow8(best, best));
}

INLINE void unpool4_bf16(const uint16_t *g, const uint16_t *out, const unsigned char *arg, uint16_t *upper,
                         uint16_t *lower) {
    __m128 rows[4];
    unpool4_values(widen4(g), widen4(out), arg, rows);
    _mm_storeu_si128((__m128i *)upper, narrow8(rows[0], rows[1]));
    _mm_storeu_si128((__m128i *)lower, narrow8(rows[2], rows[3]));
}
#define VECTOR_WINDOWS(...) __VA_ARGS__
#else
#define VECTOR_WINDOWS(...)
#endif

#define RELU(v) ((v) < 0.0f ? 0.0f : (v))
static void pool1(const float *upper, const float *lower, float *out, unsigned char *arg) {
    const float v[3] = {RELU(upper[1]), RELU(lower[0]), RELU(lower[1])};
    float best = RELU(upper[0]);
    unsigned char winner = 0;
    for (int k = 0; k < 3; k++)
        if (v[k] > best || v[k] != v[k]) { best = v[k]; winner = k + 1; }
    *out = best;
    *arg = winner;
}

static void unpool1(const float *g, const float *out, const unsigned char *arg, float *upper, float *lower) {
    const float value = *out <= 0.0f ? 0.0f : 0.0f + *g;
    upper[0] = *arg == 0 ? value : 0.0f;
    upper[1] = *arg == 1 ? value : 0.0f;
    lower[0] = *arg == 2 ? value : 0.0f;
    lower[1] = *arg == 3 ? value : 0.0f;
}

static float widen1(uint16_t v) {
    const uint32_t bits = (uint32_t)v << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static uint16_t narrow1(float f) {
    uint32_t bits;
    memcpy(&bits, &f, 4);
    return bits >> 16;
}

static void pool1_bf16(const uint16_t *upper, const uint16_t *lower, uint16_t *out, unsigned char *arg) {
    const float u[2] = {widen1(upper[0]), widen1(upper[1])}, l[2] = {widen1(lower[0]), widen1(lower[1])};
    float best;
    pool1(u, l, &best, arg);
    *out = best != best ? 0x7FC0 : narrow1(best);
}

static void unpool1_bf16(const uint16_t *g, const uint16_t *out, const unsigned char *arg, uint16_t *upper,
                         uint16_t *lower) {
    const float g1 = widen1(*g), out1 = widen1(*out);
    float u[2], l[2];
    unpool1(&g1, &out1, arg, u, l);
    upper[0] = narrow1(u[0]), upper[1] = narrow1(u[1]), lower[0] = narrow1(l[0]), lower[1] = narrow1(l[1]);
}

/* The forward and backward over planes of H x W for one element type T: four windows at a time
   where SSE is there, then one at a time */
#define DEFINE_RELU_MAX_POOL(NAME, T, POOL4, POOL1, UNPOOL4, UNPOOL1)                                    \
int NAME(const T *x, T *out, unsigned char *arg, long planes, int H, int W) {                            \
    if (H % 2 || W % 2) return 2;                                                                        \
    const int OH = H / 2, OW = W / 2;                                                                    \
    for (long p = 0; p < planes; p++)                                                                    \
        for (int y = 0; y < OH; y++) {                                                                   \
            const T *upper = x + ((size_t)p * H + 2 * y) * W, *lower = upper + W;                       \
            const size_t at = ((size_t)p * OH + y) * OW;                                                 \
            int k = 0;                                                                                   \
            VECTOR_WINDOWS(for (; k + 4 <= OW; k += 4)                                                   \
                               POOL4(upper + 2 * k, lower + 2 * k, out + at + k, arg + at + k);)         \
            for (; k < OW; k++) POOL1(upper + 2 * k, lower + 2 * k, out + at + k, arg + at + k);        \
        }                                                                                                \
    return 0;                                                                                            \
}                                                                                                        \
                                                                                                         \
int NAME##_backward(const T *g, const T *out, const unsigned char *arg, T *gi, long planes, int H, int W) { \
    if (H % 2 || W % 2) return 2;                                                                        \
    const int OH = H / 2, OW = W / 2;                                                                    \
    for (long p = 0; p < planes; p++)                                                                    \
        for (int y = 0; y < OH; y++) {                                                                   \
            T *upper = gi + ((size_t)p * H + 2 * y) * W, *lower = upper + W;                             \
            const size_t at = ((size_t)p * OH + y) * OW;                                                 \
            int k = 0;                                                                                   \
            VECTOR_WINDOWS(for (; k + 4 <= OW; k += 4)                                                   \
                               UNPOOL4(g + at + k, out + at + k, arg + at + k, upper + 2 * k, lower + 2 * k);) \
            for (; k < OW; k++)                                                                          \
                UNPOOL1(g + at + k, out + at + k, arg + at + k, upper + 2 * k, lower + 2 * k);           \
        }                                                                                                \
    return 0;                                                                                            \
}

DEFINE_RELU_MAX_POOL(relu_max_pool_2x2, float, pool4, pool1, unpool4, unpool1)
DEFINE_RELU_MAX_POOL(relu_max_pool_2x2_bf16, uint16_t, pool4_bf16, pool1_bf16, unpool4_bf16, unpool1_bf16)

/* Random crop (zero padding `pad`) and horizontal flip of images[index[b]] (uint8, B x C x H x W),
   normalised by lookup: out[b][c][i][j] = table[c][pixel] with pixel = images[index[b]][c][r][x],
   r = offsets[b] + i - pad, x = offsets[B + b] + (flips[b] ? W - 1 - j : j) - pad, 0 outside. */
int crop_flip_normalise(const unsigned char *images, const int64_t *index, const int64_t *offsets,
                        const unsigned char *flips, const float *table, float *out, int B, int C, int H, int W,
                        int pad) {
    for (int b = 0; b < B; b++) {
        /* column j reads source column first + step * j; columns outside 0..W-1 are padding */
        const int64_t step = flips[b] ? -1 : 1, first = offsets[B + b] - pad + (flips[b] ? W - 1 : 0);
        for (int c = 0; c < C; c++) {
            const unsigned char *src = images + ((size_t)index[b] * C + c) * H * W;
            const float *lookup = table + (size_t)c * 256;
            float *dst = out + ((size_t)b * C + c) * H * W;
            for (int i = 0; i < H; i++) {
                const int64_t r = offsets[b] + i - pad;
                for (int j = 0; j < W; j++) {
                    const int64_t x = first + step * j;
                    dst[i * W + j] = lookup[r >= 0 && r < H && x >= 0 && x < W ? src[r * W + x] : 0];
                }
            }
        }
    }
    return 0;
}
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
            for name in ("relu_max_pool_2x2", "relu_max_pool_2x2_bf16"):
                getattr(lib, name).argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_long] + [ctypes.c_int] * 2
                getattr(lib, name + "_backward").argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_long] + [ctypes.c_int] * 2
            lib.crop_flip_normalise.argtypes = [ctypes.c_void_p] * 6 + [ctypes.c_int] * 5
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


# ------------------------------------------------------------------ ReLU then 2x2 max pooling
def _pool_function(dtype, backward=False):
    name = "relu_max_pool_2x2" + ("_bf16" if dtype == torch.bfloat16 else "") + ("_backward" if backward else "")
    return getattr(library(), name)


def c_relu_max_pool(x):
    """(pooled relu(x), winner 0-3 of each window as uint8) by the C code, or None."""
    n, c, h, w = x.shape
    out, winner = x.new_empty(n, c, h // 2, w // 2), torch.empty(n, c, h // 2, w // 2, dtype=torch.uint8)
    return (out, winner) if _call(_pool_function(x.dtype), x, out, winner, n * c, h, w) else None


def c_relu_max_pool_backward(grad, out, winner, input_shape):
    grad_input = grad.new_empty(input_shape)
    n, c, h, w = input_shape
    ok = _call(_pool_function(grad.dtype, backward=True), grad, out, winner, grad_input, n * c, h, w)
    return grad_input if ok else None


_window_origins = {}


def window_origin(height, width):
    """Flat index (row * width + column) of the top-left corner of every 2x2 window: [H/2, W/2]."""
    if (height, width) not in _window_origins:
        rows = torch.arange(0, height, 2).view(-1, 1) * width
        _window_origins[height, width] = rows + torch.arange(0, width, 2).view(1, -1)
    return _window_origins[height, width]


def pytorch_relu_max_pool_backward(grad, x, winner):
    """What autograd runs for F.max_pool2d(torch.relu(x), 2): PyTorch's max_pool2d backward with the
    flat indices of the winners, then relu's threshold backward (differentiable in grad)."""
    h, w = x.shape[2:]
    index = window_origin(h, w) + (winner // 2).long() * w + (winner % 2).long()
    relu_out = torch.relu(x)
    grad_relu = torch.ops.aten.max_pool2d_with_indices_backward(grad, relu_out, [2, 2], [2, 2], [0, 0], [1, 1],
                                                                 False, index)
    return torch.ops.aten.threshold_backward(grad_relu, relu_out, 0)


class _ReLUMaxPool2x2(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        out, winner = c_relu_max_pool(x)
        ctx.save_for_backward(x, out, winner)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, out, winner = ctx.saved_tensors
        if torch.is_grad_enabled():     # a second derivative follows: PyTorch's differentiable ops
            return pytorch_relu_max_pool_backward(grad, x, winner)
        return c_relu_max_pool_backward(grad.contiguous(), out, winner, x.shape)


def relu_max_pool_2x2(x):
    """F.max_pool2d(torch.relu(x), 2) with the same outputs and gradients, in one pass of C on the
    CPU (float32 or bfloat16, 4-d contiguous, even height and width); None where it cannot (the
    caller then runs PyTorch's). bfloat16 (FedHUG's synthesis under autocast) is widened to float32,
    selected as float32 is, and narrowed: the same bits as PyTorch's bfloat16 ops, NaN as its 0x7FC0."""
    if not (_enabled and x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16) and x.dim() == 4
            and x.is_contiguous() and x.shape[2] % 2 == 0 and x.shape[3] % 2 == 0 and library()):
        return None
    if torch.is_grad_enabled() and x.requires_grad:
        return _ReLUMaxPool2x2.apply(x)
    return c_relu_max_pool(x)[0]


# ------------------------------------------------------------------ batch augmentation
def crop_flip_normalise(images, index, offsets, flips, table, padding):
    """cvdataset.augment_batch's crop, flip and normalisation of images[index] in one pass of C:
    offsets [2, B] (int64: crop rows, columns in the padded image), flips [B] (bool), table
    [C, 256] (the normalised value of every pixel value, computed by PyTorch). None where the C
    code cannot run (the caller then computes it with PyTorch)."""
    if not (_enabled and images.device.type == "cpu" and images.dtype == torch.uint8 and images.dim() == 4
            and images.is_contiguous() and index.dtype == torch.int64 and index.device.type == "cpu"
            and offsets.dtype == torch.int64 and offsets.device.type == "cpu" and flips.dtype == torch.bool
            and flips.device.type == "cpu" and table.dtype == torch.float32 and library()):
        return None
    index, offsets, flips, table = index.contiguous(), offsets.contiguous(), flips.contiguous(), table.contiguous()
    b, (c, h, w) = len(index), images.shape[1:]
    out = torch.empty(b, c, h, w)
    return out if _call(library().crop_flip_normalise, images, index, offsets, flips, table, out, b, c, h, w,
                        padding) else None


@contextlib.contextmanager
def disabled():
    """Within it, FastConv2d is nn.Conv2d and the other functions here return None, so that their
    callers run PyTorch's code (for benchmarks of plain code)."""
    global _enabled
    saved, _enabled = _enabled, False
    try:
        yield
    finally:
        _enabled = saved
