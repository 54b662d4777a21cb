"""bfloat16 kernels: conversions, widening rows for BLAS, and the one-token GEMV that reads bf16 directly.

bf16 is the top half of an IEEE float32: the same sign and 8-bit exponent,
7 mantissa bits. The kernels see its 16 bits as np.uint16 ("bf16 bits");
the `BF16Weight` type (kernels/weights.py) is what the rest of tinylora holds.

* Widening is exact: f32 bits = bf16 bits << 16.
* Narrowing rounds to nearest, ties to even, by adding 0x7FFF + (the lowest
  kept bit) before dropping the low 16 bits; a carry may ripple into the
  exponent, which is exactly right (and rounds the largest floats up to inf,
  as it should). NaN needs care: its payload may live only in the dropped
  bits, so the top mantissa bit is set to keep it a (quiet) NaN rather than
  turn it into inf. torch's `.to(torch.bfloat16)` and ml_dtypes round the same way.

Shapes: x (N, I) activations, a weight (O, I) as Hugging Face stores it.
"""

import numba as nb
import numpy as np

from . import PARALLEL_MIN, parallel_when_large


@parallel_when_large(PARALLEL_MIN)
def bf16_to_f32(bits):
    """bits (...) uint16, C-contiguous -> (...) float32 (exact)"""
    flat = bits.reshape(-1)
    out = np.empty(flat.size, dtype=np.uint32)
    for i in nb.prange(flat.size):
        out[i] = np.uint32(flat[i]) << 16
    return out.view(np.float32).reshape(bits.shape)


@nb.njit(cache=True, inline="always")
def round_bf16(b):
    """b: a float32's bits (uint32) -> its bf16 bits (uint16), rounded to nearest even (NaN stays NaN)"""
    if (b & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000):         # NaN
        return np.uint16((b >> np.uint32(16)) | np.uint32(0x0040))
    lsb = (b >> np.uint32(16)) & np.uint32(1)
    return np.uint16((np.uint64(b) + np.uint64(0x7FFF) + lsb) >> np.uint64(16))


@parallel_when_large(PARALLEL_MIN)
def f32_to_bf16(x):
    """x (...) float32, C-contiguous -> (...) uint16 bf16 bits, round to nearest even"""
    u = x.reshape(-1).view(np.uint32)
    out = np.empty(u.size, dtype=np.uint16)
    for i in nb.prange(u.size):
        out[i] = round_bf16(u[i])
    return out.reshape(x.shape)


@nb.njit(cache=True)
def widen_rows(bits, start, stop, out):
    """bits (O, I) uint16, rows start:stop -> out[:stop-start] (stop-start, I) float32, in place.

    Serial on purpose: it runs between two BLAS calls, and a Numba thread pool
    waking up there would fight OpenBLAS' (still spinning) threads for the cores.
    """
    wide = out.view(np.uint32)
    for n in range(stop - start):
        for k in range(bits.shape[1]):
            wide[n, k] = np.uint32(bits[start + n, k]) << 16


# Decoding (N = 1, a few): each weight is used N times, so the work is bound
# by reading the weights from memory, and a bf16 weight is half the bytes.
# Each thread takes ROWS weight rows, widens one row at a time into an
# L1-resident buffer and dots it with every row of x: the only pass over
# memory reads the bf16 bytes.
#
# The one kernel in tinylora with fast-math flags, and only two of them:
# "reassoc" lets LLVM split `s += x[k] * row[k]` into vector partial sums,
# "contract" fuses the multiply and add. Neither assumes finite numbers, so
# NaN and inf propagate as before (tests/test_matmul.py checks both
# compilations); only the summation order changes, as it does between BLAS
# builds. Without them LLVM keeps one scalar sum, and this kernel ran 2-2.4x
# slower, slower than fp32 BLAS; with them bf16 decoding is ~1.3x faster
# than fp32 (`tinylora bench kernels`, `tinylora bench --only decode`).
GEMV_FASTMATH = {"reassoc", "contract"}
ROWS = 64    # weight rows per parallel task


@nb.njit(cache=True, inline="always")
def dot_into(x, row, o, y, bias):
    """y[n, o] = x[n] · row (+ bias[o]) for every row n of x (N, I): the GEMVs' inner loop.
    Inlined into its caller's IR, so it is compiled with the caller's fast-math flags."""
    for n in range(x.shape[0]):
        x_n = x[n]
        s = np.float32(0.0)
        for k in range(row.size):
            s += x_n[k] * row[k]
        y[n, o] = s if bias is None else s + bias[o]


# A few rows of x (a prompt's prefill, N of 5 .. FEW_N): each widened weight now meets N rows of x,
# so the work is bound by the multiply-adds, not the bytes, and dot_into's one product at a time is
# bound by its two loads per multiply-add. dot4_into takes 4 widened weight rows against 2 rows of x
# at once: 8 sums kept in registers, 6 loads per 8 multiply-adds (1 x 576 x 1536 products on one
# core: ~36 GFLOP/s one at a time, ~73 as 2 x 4; fp32 BLAS with the rows widened into tiles ran
# these shapes at 28 rows at ~40, both cores).
@nb.njit(cache=True, inline="always")
def dot4_into(x, rows, count, o, y, bias):
    """y[n, o + c] = x[n] · rows[c] (+ bias[o + c]) for every row n of x (N, I) and c < count <= 4,
    rows (4, I) widened weight rows. Inlined, so compiled with the caller's fast-math flags."""
    if count < 4:
        for c in range(count):
            dot_into(x, rows[c], o + c, y, bias)
        return
    w0, w1, w2, w3 = rows[0], rows[1], rows[2], rows[3]
    N, I = x.shape
    for n in range(0, N, 2):
        x0, x1 = x[n], x[min(n + 1, N - 1)]             # an odd N's last row is summed twice, kept once
        a00 = a01 = a02 = a03 = a10 = a11 = a12 = a13 = np.float32(0.0)
        for k in range(I):
            p, q = x0[k], x1[k]
            a00 += p * w0[k]
            a01 += p * w1[k]
            a02 += p * w2[k]
            a03 += p * w3[k]
            a10 += q * w0[k]
            a11 += q * w1[k]
            a12 += q * w2[k]
            a13 += q * w3[k]
        _store4(y, n, o, a00, a01, a02, a03, bias)
        if n + 1 < N:
            _store4(y, n + 1, o, a10, a11, a12, a13, bias)


@nb.njit(cache=True, inline="always")
def _store4(y, n, o, s0, s1, s2, s3, bias):
    """y[n, o:o+4] = s0 .. s3 (+ bias[o:o+4])"""
    if bias is None:
        y[n, o], y[n, o + 1], y[n, o + 2], y[n, o + 3] = s0, s1, s2, s3
    else:
        y[n, o], y[n, o + 1] = s0 + bias[o], s1 + bias[o + 1]
        y[n, o + 2], y[n, o + 3] = s2 + bias[o + 2], s3 + bias[o + 3]


@parallel_when_large(PARALLEL_MIN, fastmath=GEMV_FASTMATH)
def gemv_bf16(x, bits, bias=None):
    """x (N, I) float32, bits (O, I) uint16, bias (O,) float32 or None -> y (N, O) float32, for small N

    Any weight of 64k or more runs on all threads: waking the pool costs ~10-15 us, and even a
    576 x 576 bf16 GEMV (~40 us on one core) finishes sooner on two (bf16 SmolLM2 decoding: 27 -> 33
    tokens/s on 2 cores against a 1M threshold).
    """
    N, I = x.shape
    O = bits.shape[0]
    y = np.empty((N, O), dtype=np.float32)
    for b in nb.prange((O + ROWS - 1) // ROWS):
        wide = np.empty(I, dtype=np.uint32)          # one widened row ...
        row = wide.view(np.float32)                  # ... read as float32
        for o in range(b * ROWS, min(O, (b + 1) * ROWS)):
            w_o = bits[o]
            for k in range(I):
                wide[k] = np.uint32(w_o[k]) << 16
            dot_into(x, row, o, y, bias)
    return y


@parallel_when_large(PARALLEL_MIN, fastmath=GEMV_FASTMATH)
def few_bf16(x, bits, bias=None):
    """As gemv_bf16, for a few more rows of x: 4 weight rows widened at a time, dot4_into."""
    N, I = x.shape
    O = bits.shape[0]
    y = np.empty((N, O), dtype=np.float32)
    for b in nb.prange((O + ROWS - 1) // ROWS):
        wide = np.empty((4, I), dtype=np.uint32)
        rows = wide.view(np.float32)
        for o in range(b * ROWS, min(O, (b + 1) * ROWS), 4):
            count = min(4, O - o)
            for c in range(count):
                for k in range(I):
                    wide[c, k] = np.uint32(bits[o + c, k]) << 16
            dot4_into(x, rows, count, o, y, bias)
    return y
