"""Matrix-multiplication kernels and the dispatcher that picks one per shape.

Here, and only here, M, N, K are the classic GEMM sizes, not the model's
alphabet: a product (M, K) @ (K, N) -> (M, N), K the inner (summed) length.
A linear layer stores its weight as Hugging Face does, W (out, in) = (N, K),
so the product it needs is "NT": y = x Wᵀ, with x (M, K) and M = all tokens.

What is here, in reading order:

1. `gemm_nt`     a cache-blocked, parallel Numba GEMM, x (M, K) @ w (N, K)ᵀ.
2. `gemv_nt`     the small-M (decode) kernel: one pass over the weights.
3. bf16:         `bf16_to_f32`, `f32_to_bf16`, `linear_bf16`, `matmul_bf16`
                 for frozen weights kept as bfloat16 bits in np.uint16 arrays.
4. `linear`, `matmul`: the dispatcher the ops call, with its routing rule.

The routing rule, from `tinylora bench kernels` (tinylora/bench.py) on this
2-core AVX-512 machine: OpenBLAS' fp32 GEMM runs at ~200 GFLOP/s and its GEMV
streams weights at DRAM speed, while `gemm_nt` reaches 0.3-0.45x of the
GEMM (0.7x at best) and `gemv_nt` 0.4-0.7x of the GEMV. So every dense float
product goes to BLAS (np.matmul). Numba earns its place where bytes, not
FLOPs, bound the work: decoding (M = 1, a few) reads each weight once per
token, and a bf16 weight is half the bytes of an fp32 one, read by
`gemv_nt_bf16` without widening it in memory first. (Measured, that kernel
is still bound by its own arithmetic and reaches 0.6-0.95x of fp32 BLAS;
what bf16 buys today is half the memory. See the rule in section 4.)

Threads: Numba's OpenMP workers busy-wait after a parallel kernel and collide
with OpenBLAS' threads on 2 cores; unless OMP_WAIT_POLICY=PASSIVE is set
before the first parallel kernel runs, a Numba kernel launched right after a
BLAS call can take milliseconds instead of microseconds (measured: 50x).

No `fastmath` anywhere: it licenses LLVM to assume no NaN/inf (a NaN can
become 0.0) and to reorder sums. Without reassociation LLVM will not turn a
dot-product reduction into SIMD code by itself, so every kernel below is
written so that the vectorised loop carries independent partial sums.
"""

import numba as nb
import numpy as np

from . import PARALLEL_MIN, parallel_when_large

# --------------------------------------------------------------------------
# 1. GEMM: y (M, N) = x (M, K) @ w (N, K)ᵀ (+ bias)
#
# Blocking, from the inside out (the classic Goto/BLIS scheme, simplified):
#
# * Tile: one row of x times a strip of NR = 32 output columns. The 32
#   partial sums (two AVX-512 vectors in fp32, four in fp64) are updated by an
#   inner loop over the strip's columns, which LLVM vectorises because the 32
#   sums are independent (no reassociation needed).
# * Packing: the strip's weights are copied, transposed, into bp (KC, NR), so
#   the inner loop reads 32 consecutive values per k. bp is 32 KiB in fp32: it
#   stays in the 48 KiB L1 while every row of x streams past it.
# * K blocking: K is consumed KC = 256 at a time, so bp fits L1 for any K;
#   the partial sums of a row are stored in y between blocks.
# * K unrolling: the partial sums live in a small array, acc, which LLVM
#   cannot prove distinct from x and bp, so it loads and stores it around
#   every update instead of keeping it in registers. Summing the 8 products
#   of k .. k+7 in a fixed tree first makes that round trip (and the serial
#   add chain through acc) 8 times rarer. The order is in the source, so this
#   needs no fastmath.
# * Threads: strips are independent, so `prange` splits them between cores;
#   each thread packs its own bp. x (M, KC) is re-read once per strip from L2.
#
# Measured here (fp32, M = 256, SmolLM2/Qwen shapes): 65-95 GFLOP/s in the
# bench's medians, 100-148 in the best runs, against OpenBLAS' 180-210: 0.35-
# 0.7x. Tried and no better: a 4x32 tile without K unrolling (12 GFLOP/s: one
# acc round trip per product), unrolling by 4 or 16, a plain left-to-right
# sum of the 8 products, NR = 16 or 64, KC = 128 or 512, 2 or 4 rows of x
# per tile.
# --------------------------------------------------------------------------
NR = 32    # output columns per strip (register tile width)
KC = 256   # depth of a packed block of weights (KC * NR * 4 bytes = 32 KiB in fp32)
KU = 8     # products summed per accumulator update


@nb.njit(parallel=True, cache=True)
def gemm_nt(x, w, bias=None):
    """x (M, K), w (N, K), bias (N,) or None -> y (M, N) = x wᵀ + bias

    x and w share a float dtype; the sums are kept in that dtype, as BLAS does.
    """
    M, K = x.shape
    N = w.shape[0]
    y = np.empty((M, N), dtype=x.dtype)
    n_strips = (N + NR - 1) // NR
    n_kblocks = max(1, (K + KC - 1) // KC)          # K = 0 still runs once: y = bias
    for s in nb.prange(n_strips):
        j0 = s * NR
        nr = min(NR, N - j0)                        # the last strip may be narrower
        bp = np.zeros((KC, NR), dtype=x.dtype)      # packed weights; padding columns stay 0
        acc = np.empty(NR, dtype=x.dtype)           # the tile's 32 partial sums
        for kb in range(n_kblocks):
            p0 = kb * KC
            kc = min(KC, K - p0)
            # pack: bp[k, j] = w[j0 + j, p0 + k]  (a transposing copy of the block)
            for j in range(nr):
                for k in range(kc):
                    bp[k, j] = w[j0 + j, p0 + k]
            ku = kc - kc % KU
            for i in range(M):
                # start from the bias (first K block) or the partial sums so far
                for j in range(NR):
                    acc[j] = 0.0
                for j in range(nr):
                    if kb > 0:
                        acc[j] = y[i, j0 + j]
                    elif bias is not None:
                        acc[j] = bias[j0 + j]
                for k in range(0, ku, KU):
                    a0 = x[i, p0 + k]
                    a1 = x[i, p0 + k + 1]
                    a2 = x[i, p0 + k + 2]
                    a3 = x[i, p0 + k + 3]
                    a4 = x[i, p0 + k + 4]
                    a5 = x[i, p0 + k + 5]
                    a6 = x[i, p0 + k + 6]
                    a7 = x[i, p0 + k + 7]
                    for j in range(NR):             # the vectorised loop
                        acc[j] += (((a0 * bp[k, j] + a1 * bp[k + 1, j])
                                    + (a2 * bp[k + 2, j] + a3 * bp[k + 3, j]))
                                   + ((a4 * bp[k + 4, j] + a5 * bp[k + 5, j])
                                      + (a6 * bp[k + 6, j] + a7 * bp[k + 7, j])))
                for k in range(ku, kc):             # K not a multiple of KU
                    a = x[i, p0 + k]
                    for j in range(NR):
                        acc[j] += a * bp[k, j]
                for j in range(nr):
                    y[i, j0 + j] = acc[j]
    return y


# --------------------------------------------------------------------------
# 2. Small M (decoding): y[m, n] = sum_k x[m, k] w[n, k], one pass over w.
#
# With M = 1..4 every weight is used M times, so the work is bound by reading
# w from memory, and packing it (as gemm_nt does) would read it twice. Instead
# each thread takes a block of weight rows and dots each row with every row of
# x. A dot product is a reduction; to vectorise it without reassociation we
# keep LANES = 64 independent partial sums, acc[l] += x[k0 + l] w[k0 + l], and
# add them up at the end. (LLVM vectorises this loop at 64 lanes but, on
# numba 0.68, not at 16 or 32: measured, checked in the assembly.)
#
# Measured: ~10 G weights/s per thread from cache, about what OpenBLAS' GEMV
# does per thread; as in gemm_nt, acc makes a round trip to L1 every step.
# Tried and no better: 4 weight rows at a time (+10%, noisy), 4 lane blocks
# per update, 16 scalar accumulators (LLVM does not vectorise those). What
# helps is fastmath={"reassoc"} (NaN and inf still propagate), which lets
# LLVM keep a plain `s += x[k] * w[k]` in registers, 2-2.4x faster: the bf16
# decode kernel below uses it; this fp32 one stays exact, as it only serves
# as the benchmark's Numba baseline.
# --------------------------------------------------------------------------
LANES = 64   # independent partial sums of a dot product
ROWS = 64    # weight rows per parallel task


@nb.njit(inline="always")
def _dot_lanes(x, m, row, acc):
    """x (M, K), row (K,), acc (LANES,) scratch -> sum_k x[m, k] row[k]"""
    K = row.shape[0]
    kl = K - K % LANES
    for l in range(LANES):
        acc[l] = 0.0
    for k0 in range(0, kl, LANES):
        for l in range(LANES):                       # the vectorised loop
            acc[l] += x[m, k0 + l] * row[k0 + l]
    s = acc[0]
    for l in range(1, LANES):
        s += acc[l]
    for k in range(kl, K):                           # K not a multiple of LANES
        s += x[m, k] * row[k]
    return s


@nb.njit(parallel=True, cache=True)
def gemv_nt(x, w, bias=None):
    """x (M, K), w (N, K), bias (N,) or None -> y (M, N) = x wᵀ + bias, for small M"""
    M, K = x.shape
    N = w.shape[0]
    y = np.empty((M, N), dtype=x.dtype)
    for b in nb.prange((N + ROWS - 1) // ROWS):
        acc = np.empty(LANES, dtype=x.dtype)
        for n in range(b * ROWS, min(N, (b + 1) * ROWS)):
            for m in range(M):
                y[m, n] = _dot_lanes(x, m, w[n], acc)
                if bias is not None:
                    y[m, n] += bias[n]
    return y


# --------------------------------------------------------------------------
# 3. bfloat16 weights, stored as their 16 bits in np.uint16 ("bf16 bits").
#
# bf16 is the top half of an IEEE float32: same sign and 8-bit exponent, 7
# mantissa bits. Widening is exact: f32 bits = bf16 bits << 16. Narrowing
# rounds to nearest, ties to even, by adding 0x7FFF + (the lowest kept bit)
# before dropping the low 16 bits; a carry may ripple into the exponent, which
# is exactly right (and rounds the largest floats up to inf, as it should).
# NaN needs care: its payload may live only in the dropped bits, so we set
# the top mantissa bit to keep it a (quiet) NaN rather than turn it into inf.
# --------------------------------------------------------------------------


@parallel_when_large(PARALLEL_MIN)
def bf16_to_f32(bits):
    """bits (...) uint16, C-contiguous -> (...) float32 (exact)"""
    flat = bits.reshape(-1)
    out = np.empty(flat.size, dtype=np.uint32)
    for i in nb.prange(flat.size):
        out[i] = np.uint32(flat[i]) << 16
    return out.view(np.float32).reshape(bits.shape)


@parallel_when_large(PARALLEL_MIN)
def f32_to_bf16(x):
    """x (...) float32, C-contiguous -> (...) uint16 bf16 bits, round to nearest even"""
    u = x.reshape(-1).view(np.uint32)
    out = np.empty(u.size, dtype=np.uint16)
    for i in nb.prange(u.size):
        b = u[i]
        if (b & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000):     # NaN
            out[i] = np.uint16((b >> np.uint32(16)) | np.uint32(0x0040))
        else:
            lsb = (b >> np.uint32(16)) & np.uint32(1)
            out[i] = np.uint16((np.uint64(b) + np.uint64(0x7FFF) + lsb) >> np.uint64(16))
    return out.reshape(x.shape)


# The one kernel here with fast-math flags, and only two of them: "reassoc"
# lets LLVM split `s += x[k] * row[k]` into vector partial sums, "contract"
# fuses the multiply and add. Neither assumes finite numbers, so NaN and inf
# propagate as before (tests/test_matmul.py checks it); only the summation
# order changes, as it does between BLAS builds. Measured on the decode
# shapes: 2-2.4x faster than the LANES loop, which made bf16 decoding slower
# than fp32 BLAS; with it, bf16 halves the bytes and decoding is ~1.3x faster
# (`tinylora bench kernels`, `tinylora bench --only decode`).
GEMV_FASTMATH = {"reassoc", "contract"}


@parallel_when_large(1 << 20, fastmath=GEMV_FASTMATH)
def gemv_nt_bf16(x, w_bits, bias=None):
    """x (M, K) float32, w_bits (N, K) uint16, bias (N,) float32 or None -> y (M, N) float32

    Each weight row is widened into an L1-resident row buffer and dotted with
    every row of x: the only pass over memory reads the bf16 bytes, half of
    fp32's, and decoding is bound by exactly those bytes. Weights under 1M
    run on one thread: at M = 1 waking the pool costs more than it saves.
    """
    M, K = x.shape
    N = w_bits.shape[0]
    y = np.empty((M, N), dtype=np.float32)
    for b in nb.prange((N + ROWS - 1) // ROWS):
        wide = np.empty(K, dtype=np.uint32)          # one widened row ...
        row = wide.view(np.float32)                  # ... read as float32
        for n in range(b * ROWS, min(N, (b + 1) * ROWS)):
            w_n = w_bits[n]
            for k in range(K):
                wide[k] = np.uint32(w_n[k]) << 16
            for m in range(M):
                x_m = x[m]
                s = np.float32(0.0)
                for k in range(K):
                    s += x_m[k] * row[k]
                y[m, n] = s if bias is None else s + bias[n]
    return y


@nb.njit(cache=True)
def _widen_rows(w_bits, n0, n1, out):
    """w_bits (N, K) uint16, rows n0:n1 -> out[:n1-n0] (n1-n0, K) float32, in place.

    Serial on purpose: it runs between two BLAS calls, and a Numba thread pool
    waking up there would fight OpenBLAS' (still spinning) threads for the cores.
    """
    wide = out.view(np.uint32)
    for n in range(n1 - n0):
        for k in range(w_bits.shape[1]):
            wide[n, k] = np.uint32(w_bits[n0 + n, k]) << 16


# gemv_nt_bf16 costs one dot product per (row of x, row of W), so its time
# grows with M, while the tiled path's widening cost does not: measured on
# the bench shapes, rows win at M <= 2, tie at M = 4 and lose 2-3x at M = 8.
SMALL_M = 4                 # up to here, bf16 products use gemv_nt_bf16
# fp32 bytes of W widened per BLAS call (stays in L3). Measured at M = 256:
# 1 MB tiles cut a 1536 x 576 product into four BLAS calls of 455 columns and
# ran at 0.75-0.9x of fp32; 4 MB (one call for every SmolLM2 projection)
# runs at 0.9-1.0x; 8 MB gains nothing more.
TILE_BYTES = 4 << 20


def _tile_rows(K: int) -> int:
    return max(16, TILE_BYTES // (4 * max(K, 1)))


def linear_bf16(x: np.ndarray, w_bits: np.ndarray, bias: np.ndarray | None = None) -> np.ndarray:
    """x (M, K) float32, w_bits (N, K) uint16, bias (N,) float32 or None -> (M, N) float32

    Small M: `gemv_nt_bf16`, one pass over the bf16 bytes. Large M: the product
    is bound by FLOPs, so widen tiles of W's rows into an fp32 buffer and let
    BLAS multiply each tile; widening costs one pass per weight, BLAS then does
    2M FLOPs per widened weight.
    """
    M, K = x.shape
    N = w_bits.shape[0]
    if M <= SMALL_M:
        return gemv_nt_bf16(x, w_bits, bias)
    y = np.empty((M, N), dtype=np.float32)
    rows = _tile_rows(K)
    tile = np.empty((min(rows, N), K), dtype=np.float32)
    for n0 in range(0, N, rows):
        n1 = min(N, n0 + rows)
        _widen_rows(w_bits, n0, n1, tile)
        np.matmul(x, tile[:n1 - n0].T, out=y[:, n0:n1])       # (M, K) @ (K, n) -> (M, n)
        if bias is not None:
            y[:, n0:n1] += bias[n0:n1]
    return y


def matmul_bf16(a: np.ndarray, w_bits: np.ndarray) -> np.ndarray:
    """a (M, N) float32, w_bits (N, K) uint16 -> a @ widen(w_bits) (M, K) float32

    The input gradient of a bf16 Linear (dx = dy W), summed tile by tile:
    a @ W = sum over row tiles t of a[:, t] @ W[t, :].
    """
    M, N = a.shape
    K = w_bits.shape[1]
    out = np.zeros((M, K), dtype=np.float32)
    rows = _tile_rows(K)
    tile = np.empty((min(rows, N), K), dtype=np.float32)
    part = np.empty((M, K), dtype=np.float32)
    for n0 in range(0, N, rows):
        n1 = min(N, n0 + rows)
        _widen_rows(w_bits, n0, n1, tile)
        np.matmul(a[:, n0:n1], tile[:n1 - n0], out=part)      # (M, n) @ (n, K) -> (M, K)
        out += part
    return out


# --------------------------------------------------------------------------
# 4. The dispatcher: what the ops call.
#
# The rule, from `tinylora bench kernels` (medians, OMP_WAIT_POLICY=PASSIVE):
#   * float weights, any M        -> BLAS. At M = 256 gemm_nt runs at 0.3-0.45x
#     of OpenBLAS; at M = 1 gemv_nt at 0.4-0.7x of OpenBLAS' GEMV.
#   * bf16 weights, M <= SMALL_M  -> gemv_nt_bf16: it reads half the bytes,
#     and with its two fast-math flags streams them as fast as memory allows:
#     ~2x fp32 BLAS on lm_head-sized weights, ~1x on small ones.
#   * bf16 weights, M >  SMALL_M  -> widened 4 MB tiles + BLAS, 0.9-1.0x of fp32.
#   * bf16 weights, float64 x     -> widen all of W (tests and gradcheck only).
# The fp32 paths are the fastest; bf16 trades some speed for half the memory.
# --------------------------------------------------------------------------


def is_bf16(w: np.ndarray) -> bool:
    """Is `w` bf16 bits (np.uint16), the frozen-weight storage format?"""
    return w.dtype == np.uint16


def linear_path(M: int, x_dtype, w_dtype) -> str:
    """The kernel `linear` uses for x (M, K) of x_dtype and a weight of w_dtype."""
    if np.dtype(w_dtype) != np.uint16:
        return "blas"
    if np.dtype(x_dtype) != np.float32:
        return "bf16-widen-all"
    return "bf16-rows" if M <= SMALL_M else "bf16-tiles"


def linear(x: np.ndarray, w: np.ndarray, bias: np.ndarray | None = None) -> np.ndarray:
    """x (M, K), w (N, K) float or bf16 bits, bias (N,) or None -> x wᵀ + bias (M, N)

    The result has x's dtype; a float w or bias of another dtype is cast.
    """
    path = linear_path(x.shape[0], x.dtype, w.dtype)
    if bias is not None:
        bias = bf16_to_f32(bias) if is_bf16(bias) else bias
        bias = bias.astype(x.dtype, copy=False)
    if path == "blas":
        y = np.matmul(x, w.astype(x.dtype, copy=False).T)   # BLAS takes the transposed view as is
        if bias is not None:
            y += bias
        return y
    w_bits = np.ascontiguousarray(w)
    if path == "bf16-widen-all":
        return linear(x, bf16_to_f32(w_bits).astype(x.dtype), bias)
    return linear_bf16(np.ascontiguousarray(x), w_bits, bias)


def matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a (..., M, K), b (..., K, N) -> a @ b (..., M, N); b may be bf16 bits (2-D, float32 a)

    Dense float products always go to BLAS (see the rule above); a bf16 b is
    the backward of a frozen bf16 Linear, dx = dy @ W.
    """
    if is_bf16(b):
        if a.dtype == np.float32 and a.ndim == 2:
            return matmul_bf16(a, np.ascontiguousarray(b))
        return np.matmul(a, bf16_to_f32(np.ascontiguousarray(b)).astype(a.dtype))
    return np.matmul(a, b)
