"""Hand-written float matrix products: a cache-blocked GEMM and a small-N GEMV, in plain Numba loops.

    gemm_nt   y (N, O) = x (N, I) @ w (O, I)ᵀ (+ bias), cache-blocked and parallel
    gemv_nt   the same for small N (decoding): one pass over the weights

A linear layer stores its weight as Hugging Face does, W (O, I) = (out, in),
so the product it needs is "NT": y = x Wᵀ, x holding one row per token.

Why the model does not use them: `tinylora bench kernels` measures them against
np.matmul (OpenBLAS) on SmolLM2's and Qwen2.5's shapes, and on these 2-core
AVX-512 machines gemm_nt reaches 0.3-0.7x of OpenBLAS' fp32 GEMM at N = 256
and gemv_nt 0.4-0.7x of its GEMV at N = 1. So every dense float product goes
to BLAS (the routing rule is in kernels/weights.py). They stay as the readable
version of what BLAS does, and as the benchmark's baseline: the bf16 GEMV
(kernels/bf16.py) is this file's gemv_nt, reading half the bytes.

No `fastmath`: it licenses LLVM to assume no NaN/inf (a NaN can become 0.0)
and to reorder sums. Without reassociation LLVM will not turn a dot-product
reduction into SIMD code by itself, so both kernels are written so that the
vectorised loop carries independent partial sums.
"""

import numba as nb
import numpy as np

# --------------------------------------------------------------------------
# GEMM: y (N, O) = x (N, I) @ w (O, I)ᵀ (+ bias)
#
# Blocking, from the inside out (the classic Goto/BLIS scheme, simplified):
#
# * Tile: one row of x times a strip of STRIP = 32 output columns. The 32
#   partial sums (two AVX-512 vectors in fp32, four in fp64) are updated by an
#   inner loop over the strip's columns, which LLVM vectorises because the 32
#   sums are independent (no reassociation needed).
# * Packing: the strip's weights are copied, transposed, into bp (DEPTH, STRIP),
#   so the inner loop reads 32 consecutive values per k. bp is 32 KiB in fp32:
#   it stays in the 48 KiB L1 while every row of x streams past it.
# * Depth blocking: I is consumed DEPTH = 256 at a time, so bp fits L1 for any
#   I; the partial sums of a row are stored in y between blocks.
# * Unrolling: the partial sums live in a small array, acc, which LLVM cannot
#   prove distinct from x and bp, so it loads and stores it around every
#   update instead of keeping it in registers. Summing the 8 products of
#   k .. k+7 in a fixed tree first makes that round trip (and the serial add
#   chain through acc) 8 times rarer. The order is in the source: no fastmath.
# * Threads: strips are independent, so `prange` splits them between cores;
#   each thread packs its own bp. x (N, DEPTH) is re-read once per strip from L2.
#
# Tried and no better: a 4x32 tile without unrolling (one acc round trip per
# product), unrolling by 4 or 16, a plain left-to-right sum of the 8 products,
# strips of 16 or 64, depths of 128 or 512, 2 or 4 rows of x per tile.
# --------------------------------------------------------------------------
STRIP = 32    # output columns per strip (register tile width)
DEPTH = 256   # depth of a packed block of weights (DEPTH * STRIP * 4 bytes = 32 KiB in fp32)
UNROLL = 8    # products summed per accumulator update


@nb.njit(parallel=True, cache=True)
def gemm_nt(x, w, bias=None):
    """x (N, I), w (O, I), bias (O,) or None -> y (N, O) = x wᵀ + bias

    x and w share a float dtype; the sums are kept in that dtype, as BLAS does.
    """
    N, I = x.shape
    O = w.shape[0]
    y = np.empty((N, O), dtype=x.dtype)
    n_strips = (O + STRIP - 1) // STRIP
    n_blocks = max(1, (I + DEPTH - 1) // DEPTH)      # I = 0 still runs once: y = bias
    for s in nb.prange(n_strips):
        j0 = s * STRIP
        width = min(STRIP, O - j0)                   # the last strip may be narrower
        bp = np.zeros((DEPTH, STRIP), dtype=x.dtype)  # packed weights; padding columns stay 0
        acc = np.empty(STRIP, dtype=x.dtype)         # the tile's 32 partial sums
        for kb in range(n_blocks):
            p0 = kb * DEPTH
            depth = min(DEPTH, I - p0)
            # pack: bp[k, j] = w[j0 + j, p0 + k]  (a transposing copy of the block)
            for j in range(width):
                for k in range(depth):
                    bp[k, j] = w[j0 + j, p0 + k]
            unrolled = depth - depth % UNROLL
            for n in range(N):
                # start from the bias (first block) or the partial sums so far
                for j in range(STRIP):
                    acc[j] = 0.0
                for j in range(width):
                    if kb > 0:
                        acc[j] = y[n, j0 + j]
                    elif bias is not None:
                        acc[j] = bias[j0 + j]
                for k in range(0, unrolled, UNROLL):
                    a0 = x[n, p0 + k]
                    a1 = x[n, p0 + k + 1]
                    a2 = x[n, p0 + k + 2]
                    a3 = x[n, p0 + k + 3]
                    a4 = x[n, p0 + k + 4]
                    a5 = x[n, p0 + k + 5]
                    a6 = x[n, p0 + k + 6]
                    a7 = x[n, p0 + k + 7]
                    for j in range(STRIP):          # the vectorised loop
                        acc[j] += (((a0 * bp[k, j] + a1 * bp[k + 1, j])
                                    + (a2 * bp[k + 2, j] + a3 * bp[k + 3, j]))
                                   + ((a4 * bp[k + 4, j] + a5 * bp[k + 5, j])
                                      + (a6 * bp[k + 6, j] + a7 * bp[k + 7, j])))
                for k in range(unrolled, depth):    # depth not a multiple of UNROLL
                    a = x[n, p0 + k]
                    for j in range(STRIP):
                        acc[j] += a * bp[k, j]
                for j in range(width):
                    y[n, j0 + j] = acc[j]
    return y


# --------------------------------------------------------------------------
# Small N (decoding): y[n, o] = sum_k x[n, k] w[o, k], one pass over w.
#
# With N = 1..4 every weight is used N times, so the work is bound by reading
# w from memory, and packing it (as gemm_nt does) would read it twice. Instead
# each thread takes a block of weight rows and dots each row with every row of
# x. A dot product is a reduction; to vectorise it without reassociation we
# keep LANES = 64 independent partial sums, acc[l] += x[k0 + l] w[k0 + l], and
# add them up at the end. (LLVM vectorises this loop at 64 lanes but, on
# numba 0.68, not at 16 or 32: checked in the assembly.) As in gemm_nt, acc
# makes a round trip to L1 every step; fastmath={"reassoc"} would let LLVM keep
# a plain `s += x[k] * w[k]` in registers instead (the bf16 GEMV does that),
# but this fp32 kernel stays exact: it is the benchmark's baseline.
# Tried and no better: 4 weight rows at a time, 4 lane blocks per update,
# 16 scalar accumulators (LLVM does not vectorise those).
# --------------------------------------------------------------------------
LANES = 64   # independent partial sums of a dot product
ROWS = 64    # weight rows per parallel task


@nb.njit(inline="always")
def _dot_lanes(x, n, row, acc):
    """x (N, I), row (I,), acc (LANES,) scratch -> sum_k x[n, k] row[k]"""
    I = row.shape[0]
    full = I - I % LANES
    for lane in range(LANES):
        acc[lane] = 0.0
    for k0 in range(0, full, LANES):
        for lane in range(LANES):                    # the vectorised loop
            acc[lane] += x[n, k0 + lane] * row[k0 + lane]
    s = acc[0]
    for lane in range(1, LANES):
        s += acc[lane]
    for k in range(full, I):                         # I not a multiple of LANES
        s += x[n, k] * row[k]
    return s


@nb.njit(parallel=True, cache=True)
def gemv_nt(x, w, bias=None):
    """x (N, I), w (O, I), bias (O,) or None -> y (N, O) = x wᵀ + bias, for small N"""
    N = x.shape[0]
    O = w.shape[0]
    y = np.empty((N, O), dtype=x.dtype)
    for b in nb.prange((O + ROWS - 1) // ROWS):
        acc = np.empty(LANES, dtype=x.dtype)
        for o in range(b * ROWS, min(O, (b + 1) * ROWS)):
            for n in range(N):
                y[n, o] = _dot_lanes(x, n, w[o], acc)
                if bias is not None:
                    y[n, o] += bias[o]
    return y
