"""Frozen weights: one type per storage format, and the one dispatcher every product with them goes through.

A pretrained weight never changes during LoRA training, so it can be held in
whatever form is cheapest: float32 as read, bf16 (half the bytes), or
quantised blocks (kernels/quantized.py). Each storage format is a `FrozenWeight` subclass that knows

    shape, size        its logical (O, I) and O·I parameters, whatever the bytes
    nbytes             the bytes it holds
    rows(start, stop)  rows start:stop widened to float32: the one thing every format provides
    gather(ids)        the rows at ids, widened (the embedding lookup)
    gemv(x, bias)      optionally, a fused kernel for a few rows of x (decoding) reading the stored bytes
    few(x, bias)       optionally, a kernel for a few more (a prompt): 4 rows widened at a time, in L1
    path(N, dtype)     which product serves x (N, I) of that dtype

and the dispatcher below serves every product with one, so that no op knows
how a weight is stored:

    linear(x, w, bias)   x Wᵀ + b    Linear, LoRA's base layer, lm_head (fused with the loss or not)
    linear_dx(dy, w)     dy W        their input gradient; dW is never formed, W is frozen
    gather(w, ids)       W[ids]      the embedding lookup (the tied lm_head's table too)

The paths, from `tinylora bench kernels` (fp32 BLAS ~200 GFLOP/s here, see kernels/matmul.py):

    "blas"       a float32/64 matrix: np.matmul (OpenBLAS) reads it as it is, transposed view and all
    "gemv"       N <= SMALL_N, float32 x, a format with a fused GEMV: one pass over the stored bytes.
                 Decoding reads every weight once per token, so bytes, not FLOPs, bound it: the bf16
                 GEMV is ~2x fp32 BLAS on lm_head-sized weights, ~1x on small ones.
    "few"        SMALL_N < N <= FEW_N, float32 x, a format with one: a prompt's prefill. Each weight
                 row is widened into L1 and meets N rows of x there, 2 x 4 products at a time
                 (bf16.dot4_into), with no BLAS call and no widened tile in memory.
    "tiles"      otherwise, float32 x: rows widened TILE_BYTES at a time into a float32 buffer and
                 multiplied by BLAS; widening costs one pass per weight, BLAS then does 2N FLOPs per
                 widened weight (0.9-1.0x of fp32 BLAS at N = 256 with bf16).
    "bf16-dot"   instead of "tiles" (and of "blas" for a frozen float32 matrix) when the weight's
                 `compute` is "bfloat16" (CausalLM.set_compute, --compute bfloat16) and the CPU has
                 avx512_bf16: x and W rounded to bf16, float32 sums, kernels/bf16_dot.py; bf16 bits
                 are used as stored, any other format widened and rounded TILE_BYTES at a time.
    "widen-all"  float64 x (gradient checks, the float64 model): the whole matrix widened, then BLAS.

A trainable weight (LoRA's A and B, a test's W) is a plain ndarray; `as_weight`
wraps it as a `DenseWeight` view, no copy, so the dispatcher sees one interface.
Shapes: x (N, I) one row per token, W (O, I) as Hugging Face stores it.
"""

from __future__ import annotations

import numpy as np

from .bf16 import bf16_to_f32, f32_to_bf16, few_bf16, gemv_bf16, widen_rows
from .bf16_dot import has_bf16_dot, matmul_nn_bf16, matmul_nt_bf16

# A fused GEMV's cost grows with N (one dot product per row of x and row of W), the tiled
# path's widening does not: measured on the bench shapes with bf16, rows win at N <= 2,
# tie at N = 4 and lose 2-3x at N = 8. The few-rows kernels against widened tiles and BLAS, on the
# SmolLM2 shapes (Zen 2, 2 cores): 1.4-3.9x faster at N = 8-28, 1.1-1.2x at 32, tie at 40-48.
SMALL_N = 4
FEW_N = 32
# float32 bytes of W widened per BLAS call (stays in L3). Measured at N = 256: 1 MB tiles cut
# a 1536 x 576 product into four BLAS calls of 455 columns and ran at 0.75-0.9x of fp32;
# 4 MB (one call for every SmolLM2 projection) runs at 0.9-1.0x; 8 MB gains nothing more.
TILE_BYTES = 4 << 20


class FrozenWeight:
    """A frozen (O, I) matrix, held in some storage format; see the module docstring."""

    storage: str = ""                       # "float32", "bfloat16", ...: what `tinylora info` reports
    dense = False                           # True when BLAS can read the stored array itself
    shape: tuple[int, int]

    @property
    def dtype(self) -> np.dtype:            # of the values it yields
        return np.dtype(np.float32)

    @property
    def size(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def ndim(self) -> int:
        return 2

    @property
    def nbytes(self) -> int:
        raise NotImplementedError

    def rows(self, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
        """-> rows start:stop as float32 (stop - start, I), into out[:stop - start] if given"""
        raise NotImplementedError

    def gather(self, ids: np.ndarray) -> np.ndarray:
        """ids (...) ints -> the rows at ids, float32 (..., I). A format may do better than row by row."""
        flat = ids.reshape(-1)
        out = np.empty((flat.size, self.shape[1]), dtype=np.float32)
        for n, i in enumerate(flat):
            self.rows(int(i), int(i) + 1, out[n:n + 1])
        return out.reshape(ids.shape + (self.shape[1],))

    gemv = None                             # (x (N, I) float32, bias) -> (N, O); None: no fused kernel
    few = None                              # the same for SMALL_N < N <= FEW_N; None: tiles serve those
    compute = "float32"                     # "bfloat16": the larger products in bf16 ("bf16-dot")

    def path(self, N: int, dtype) -> str:
        """The product serving x (N, I) of `dtype` (the rule in the module docstring)."""
        if np.dtype(dtype) != np.float32:
            return "widen-all"
        if N <= SMALL_N and self.gemv is not None:
            return "gemv"
        if N <= FEW_N and self.few is not None:
            return "few"
        return "bf16-dot" if self.compute == "bfloat16" and has_bf16_dot() else "tiles"

    def to_float(self) -> np.ndarray:
        """The whole matrix as a float array (O, I): a new float32 array unless the storage is one."""
        return self.rows(0, self.shape[0])

    def to_bf16_bits(self) -> np.ndarray:
        """The matrix as bf16 bits (O, I) uint16, rounded to nearest even (for writing a bf16 checkpoint)."""
        return f32_to_bf16(np.ascontiguousarray(self.to_float(), dtype=np.float32))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(shape={self.shape}, {self.nbytes / 2**20:.1f} MiB)"


class DenseWeight(FrozenWeight):
    """A float32 (or float64) matrix kept as it is. BLAS reads it directly."""

    dense = True

    def __init__(self, array: np.ndarray):
        if array.ndim != 2 or array.dtype.kind != "f":
            raise TypeError(f"DenseWeight holds a 2-d float array, got {array.dtype} {array.shape}")
        self.array = array
        self.shape = array.shape
        self.storage = array.dtype.name

    @property
    def dtype(self) -> np.dtype:
        return self.array.dtype

    @property
    def nbytes(self) -> int:
        return self.array.nbytes

    def rows(self, start, stop, out=None):
        if out is None:
            return self.array[start:stop]
        out[:stop - start] = self.array[start:stop]
        return out[:stop - start]

    def gather(self, ids):
        return self.array[ids]

    def path(self, N, dtype):
        bf16 = self.compute == "bfloat16" and np.dtype(dtype) == np.float32 and N > FEW_N and has_bf16_dot()
        return "bf16-dot" if bf16 else "blas"


class Bits16Weight(FrozenWeight):
    """A matrix of some 16-bit float format, held as its (O, I) uint16 bit patterns (BF16Weight, F16Weight)."""

    def __init__(self, bits: np.ndarray):
        if bits.ndim != 2 or bits.dtype != np.uint16:
            raise TypeError(f"{type(self).__name__} holds (O, I) uint16 bits, got {bits.dtype} {bits.shape}")
        self.bits = np.ascontiguousarray(bits)
        self.shape = bits.shape

    @property
    def nbytes(self) -> int:
        return self.bits.nbytes


class BF16Weight(Bits16Weight):
    """A matrix held as bfloat16: its 16-bit patterns in an (O, I) uint16 array (kernels/bf16.py)."""

    storage = "bfloat16"

    @classmethod
    def from_array(cls, a: np.ndarray) -> "BF16Weight":
        """A bfloat16 array (its bits are kept) or a float array (rounded to nearest even) -> BF16Weight"""
        if a.dtype.name == "bfloat16":
            return cls(a.view(np.uint16))
        return cls(f32_to_bf16(np.ascontiguousarray(a, dtype=np.float32)))

    def rows(self, start, stop, out=None):
        if out is None:
            out = np.empty((stop - start, self.shape[1]), dtype=np.float32)
        widen_rows(self.bits, start, stop, out)
        return out[:stop - start]

    def gather(self, ids):
        return bf16_to_f32(np.ascontiguousarray(self.bits[ids]))

    def gemv(self, x, bias=None):
        return gemv_bf16(x, self.bits, bias)

    def few(self, x, bias=None):
        return few_bf16(x, self.bits, bias)

    def to_bf16_bits(self):
        return self.bits


def as_weight(w) -> FrozenWeight:
    """A FrozenWeight as it is; a plain float array (trainable, or a test's) as a DenseWeight view of it."""
    return w if isinstance(w, FrozenWeight) else DenseWeight(w)


def frozen_weight(a: np.ndarray, dtype=np.float32) -> FrozenWeight:
    """A checkpoint's matrix -> the weight that holds it as stored, for compute in `dtype`.

    bfloat16 stays bfloat16 under float32 compute (the products widen it as they go), and so does
    any FrozenWeight; anything else, and any storage under float64 compute, becomes a DenseWeight
    of `dtype`. Rounding float32 to bf16 is BF16Weight.from_array.
    """
    if isinstance(a, FrozenWeight):
        if np.dtype(dtype) == np.float32 or a.dtype == np.dtype(dtype):
            return a
        return DenseWeight(a.to_float().astype(dtype))      # float64 compute: the stored values, widened
    if a.dtype.name == "bfloat16":
        if np.dtype(dtype) == np.float32:
            return BF16Weight.from_array(a)
        return DenseWeight(bf16_to_f32(np.ascontiguousarray(a).view(np.uint16)).astype(dtype))
    return DenseWeight(np.ascontiguousarray(a, dtype=dtype))


# --------------------------------------------------------------------------
# The dispatcher
# --------------------------------------------------------------------------

def _tile_rows(I: int) -> int:
    return max(16, TILE_BYTES // (4 * max(I, 1))) // 2 * 2     # even: bf16 pairs of rows never straddle two


def _bf16_tiles(w):
    """(o0, o1, bits (o1 - o0, I) uint16) covering w's rows: a bf16 weight's own bits in one piece,
    any other format widened and rounded to bf16 TILE_BYTES at a time (the "bf16-dot" path)."""
    O, I = w.shape
    if isinstance(w, BF16Weight):
        yield 0, O, w.bits
        return
    rows = _tile_rows(I)
    tile = np.empty((min(rows, O), I), dtype=np.float32)
    for o0 in range(0, O, rows):
        o1 = min(O, o0 + rows)
        yield o0, o1, f32_to_bf16(w.rows(o0, o1, tile))


def linear(x: np.ndarray, w, bias: np.ndarray | None = None) -> np.ndarray:
    """x (N, I), w (O, I) a FrozenWeight or float array, bias (O,) or None -> x wᵀ + bias (N, O), x's dtype"""
    w = as_weight(w)
    N, O = x.shape[0], w.shape[0]
    if bias is not None:
        bias = bias.astype(x.dtype, copy=False)
    path = w.path(N, x.dtype)
    if path in ("gemv", "few"):
        return (w.gemv if path == "gemv" else w.few)(np.ascontiguousarray(x), bias)
    if path == "bf16-dot":
        x = np.ascontiguousarray(x)
        if isinstance(w, BF16Weight):
            return matmul_nt_bf16(x, w.bits, bias)
        y = np.empty((N, O), dtype=np.float32)
        for o0, o1, bits in _bf16_tiles(w):
            y[:, o0:o1] = matmul_nt_bf16(x, bits, None if bias is None else bias[o0:o1])
        return y
    if path == "widen-all":
        w = DenseWeight(w.to_float().astype(x.dtype))
    if path in ("blas", "widen-all"):
        y = np.matmul(x, w.array.astype(x.dtype, copy=False).T)   # BLAS takes the transposed view as is
        if bias is not None:
            y += bias
        return y
    y = np.empty((N, O), dtype=np.float32)                        # "tiles"
    rows = _tile_rows(w.shape[1])
    tile = np.empty((min(rows, O), w.shape[1]), dtype=np.float32)
    for o0 in range(0, O, rows):
        o1 = min(O, o0 + rows)
        w.rows(o0, o1, tile)                                      # (o1 - o0, I) widened
        np.matmul(x, tile[:o1 - o0].T, out=y[:, o0:o1])           # (N, I) @ (I, o) -> (N, o)
        if bias is not None:
            y[:, o0:o1] += bias[o0:o1]
    return y


def linear_dx(dy: np.ndarray, w) -> np.ndarray:
    """dy (N, O), w (O, I) a FrozenWeight or float array -> dy w (N, I), in dy's dtype

    The input gradient of y = x Wᵀ. Stored formats sum it tile by tile:
    dy W = sum over row tiles t of dy[:, t] @ W[t, :].
    """
    w = as_weight(w)
    N, (O, I) = dy.shape[0], w.shape
    path = w.path(N, dy.dtype)
    if path == "widen-all":
        w = DenseWeight(w.to_float().astype(dy.dtype))
    if path in ("blas", "widen-all"):
        return np.matmul(dy, w.array.astype(dy.dtype, copy=False))
    if path == "bf16-dot":                                        # dy W = sum over row tiles, as below
        out = None
        for o0, o1, bits in _bf16_tiles(w):
            out = matmul_nn_bf16(np.ascontiguousarray(dy[:, o0:o1]), bits, out)
        return out
    out = np.zeros((N, I), dtype=np.float32)                      # "gemv", "few" or "tiles": those have no
    rows = _tile_rows(I)                                          # transposed twin, so tiles serve both
    tile = np.empty((min(rows, O), I), dtype=np.float32)
    part = np.empty((N, I), dtype=np.float32)
    for o0 in range(0, O, rows):
        o1 = min(O, o0 + rows)
        w.rows(o0, o1, tile)
        np.matmul(dy[:, o0:o1], tile[:o1 - o0], out=part)         # (N, o) @ (o, I) -> (N, I)
        out += part
    return out


def gather(w, ids: np.ndarray) -> np.ndarray:
    """w (V, C) a FrozenWeight or float array, ids (...) ints -> w[ids] (..., C)"""
    return as_weight(w).gather(ids)


def linear_path(w, N: int, dtype) -> str:
    """The path `linear` takes for x (N, I) of `dtype` (for the kernel bench and the tests)."""
    return as_weight(w).path(N, dtype)
