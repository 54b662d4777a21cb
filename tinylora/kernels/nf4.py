"""NF4 (bitsandbytes' 4-bit NormalFloat, the QLoRA paper's base format): quantising, widening rows, decoding.

bitsandbytes stores a 4-bit weight (O, I) as the row-major matrix flattened,
cut into blocks of `blocksize` (64) consecutive weights, each block with one
float32 scale, its absolute maximum:

    q_j    = the NF4 code value nearest w_j / absmax        (NF4: 16 values in [-1, 1], below)
    w_j   ~= NF4[q_j] · absmax                               (bitsandbytes' dequantize_4bit)
    packed = two codes per byte, the first (even flat index) in the HIGH nibble

With double quantisation ("nested", QLoRA's §3) the scales are quantised too:
absmax - offset (offset = their mean) goes through bitsandbytes' 8-bit
blockwise quantiser in blocks of 256, so a block's scale is

    absmax_b = code2[qabs_b] · absmax2[b // 256] + offset   (one float32 multiply, then one add)

code2 being bitsandbytes' 256-entry "dynamic" map, stored beside the weight
(`nested_quant_map`). Both kernels below compute a block's scale this way,
from the stored bytes; nothing is widened ahead of time.

Quantising reproduces bitsandbytes' CPU `quantize_4bit` (blocksize 64, no
nested statistics) byte for byte: the scaled value v = clamp(w · (1 / max(absmax,
1e-38)), -1, 1) in float32, then q = the number of midpoints between adjacent
NF4 values that lie strictly below v (torch.bucketize). Dequantising is one
float32 multiply per weight, as bitsandbytes' CPU kernel does, so both are
bit-identical to it (tests/test_quantized.py, against bitsandbytes itself) when
rows are whole blocks, as in every checkpoint; where blocks straddle rows,
bitsandbytes' CPU kernel applies the wrong scales and this one does not.

`widen_rows` serves the training products (tiles of rows for BLAS, serial as
bf16's is); `gemv_nf4` is the decoding product, one pass over the packed bytes.
"""

import numba as nb
import numpy as np

from . import PARALLEL_MIN, parallel_when_large
from .bf16 import GEMV_FASTMATH, ROWS, dot4_into, dot_into

# The NF4 code values: quantiles of N(0, 1) scaled to [-1, 1], with an exact 0 (QLoRA, Dettmers et al.
# 2023, appendix E); as float32, exactly the table in bitsandbytes (backends/utils.py, csrc/common.h).
NF4 = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0], dtype=np.float32)
# The 15 decision boundaries for quantising: midpoints of neighbouring values, in float32.
MIDPOINTS = ((NF4[:-1] + NF4[1:]) / np.float32(2)).astype(np.float32)
BLOCKSIZE = 64          # bitsandbytes' default, and what every *-bnb-4bit checkpoint uses
TINY = np.float32(1e-38)   # bitsandbytes' floor on a block's absmax before taking 1 / absmax


# --------------------------------------------------------------------------
# Quantising: float32 -> packed codes + one absmax per block
# --------------------------------------------------------------------------

@parallel_when_large(PARALLEL_MIN)
def quantize_nf4(w, blocksize, midpoints):
    """w (n,) float32, flat -> (packed ((n + 1) // 2,) uint8, absmax (ceil(n / blocksize),) float32)

    blocksize must be even (so no byte straddles two blocks); an odd n's last
    nibble is the code of 0.0, as bitsandbytes pads.
    """
    n = w.size
    blocks = (n + blocksize - 1) // blocksize
    codes = np.empty(blocks * blocksize, dtype=np.uint8)
    absmax = np.empty(blocks, dtype=np.float32)
    for b in nb.prange(blocks):
        lo, hi = b * blocksize, min(n, (b + 1) * blocksize)
        amax = np.float32(0.0)
        for j in range(lo, hi):
            amax = max(amax, abs(w[j]))
        absmax[b] = amax
        inv = np.float32(1.0) / max(amax, TINY)
        for j in range(lo, (b + 1) * blocksize):
            v = min(max(w[j] * inv, np.float32(-1.0)), np.float32(1.0)) if j < hi else np.float32(0.0)
            q = 0
            while q < 15 and midpoints[q] < v:      # bucketize: how many midpoints lie below v
                q += 1
            codes[j] = q
    packed = np.empty((n + 1) // 2, dtype=np.uint8)
    for p in nb.prange(packed.size):
        packed[p] = (codes[2 * p] << 4) | codes[2 * p + 1]      # first code in the high nibble
    return packed, absmax


# --------------------------------------------------------------------------
# A block's scale, plain or double-quantised
# --------------------------------------------------------------------------

@nb.njit(cache=True, inline="always")
def _scale(absmax, code2, absmax2, blocksize2, offset, b):
    """Block b's absmax: stored as float32 (absmax2 empty), or as 8-bit codes into code2 (nested)."""
    if absmax2.size == 0:
        return np.float32(absmax[b])
    return code2[np.int64(absmax[b])] * absmax2[b // blocksize2] + offset


# --------------------------------------------------------------------------
# Widening rows (training tiles): flat weights -> float32
# --------------------------------------------------------------------------

@nb.njit(cache=True, inline="always")
def _widen_flat(packed, absmax, code2, absmax2, blocksize2, offset, blocksize, f0, f1, out, table):
    """Weights at flat indices f0:f1 -> out[:f1 - f0] float32: table[q] · the block's absmax.
    The simple version, weight by weight; it serves any layout (blocks straddling rows, odd sizes)."""
    f = f0
    while f < f1:
        b = f // blocksize
        end = min(f1, (b + 1) * blocksize)
        s = _scale(absmax, code2, absmax2, blocksize2, offset, b)
        for g in range(f, end):
            byte = np.int32(packed[g >> 1])
            q = (byte >> 4) if (g & 1) == 0 else (byte & 0xF)
            out[g - f0] = table[q] * s
        f = end


@nb.njit(cache=True, inline="always")
def _pairs(table):
    """table (16,) -> (256, 2): the two weights a byte of codes holds, high nibble first, unscaled."""
    pairs = np.empty((256, 2), dtype=np.float32)
    for byte in range(256):
        pairs[byte, 0], pairs[byte, 1] = table[byte >> 4], table[byte & 0xF]
    return pairs


@nb.njit(cache=True, inline="always")
def _widen_row(packed, absmax, code2, absmax2, blocksize2, offset, blocksize, f0, out, pairs):
    """The row starting at flat index f0 -> out (I,), when rows are whole blocks (every real checkpoint).

    Each byte is one lookup of its two code values (`_pairs`: 2 KiB, in L1), each times the block's
    absmax: the same float32 numbers as table[q] · absmax_b. ~0.8 ns a weight on a Zen 2 core (AVX2),
    against 1.0 for a per-block table of the 16 scaled values looked up nibble by nibble (0.5 on an
    AVX-512 Xeon), ~0.2 for bf16's widening, and ~2.3 for a BLAS product's share at N = 256.
    """
    for c0 in range(0, out.size, blocksize):
        s = _scale(absmax, code2, absmax2, blocksize2, offset, (f0 + c0) // blocksize)
        p = (f0 + c0) >> 1
        for j in range(blocksize // 2):                   # one byte: two codes, high nibble first
            byte = packed[p + j]
            out[c0 + 2 * j] = pairs[byte, 0] * s
            out[c0 + 2 * j + 1] = pairs[byte, 1] * s


@nb.njit(cache=True)
def widen_rows(packed, absmax, code2, absmax2, blocksize2, offset, blocksize, I, rows, out, table):
    """rows (O_sel,) int64 of a (O, I) NF4 weight -> out[:O_sel] (O_sel, I) float32

    packed (O·I/2,) uint8; absmax (blocks,) float32, or uint8 codes when absmax2 (blocks / blocksize2,)
    float32 is not empty (double quantisation, then code2 (256,) float32 and offset apply).
    """
    pairs = _pairs(table)
    for n in range(rows.size):
        f0 = rows[n] * I
        if I % blocksize == 0:
            _widen_row(packed, absmax, code2, absmax2, blocksize2, offset, blocksize, f0, out[n], pairs)
        else:
            _widen_flat(packed, absmax, code2, absmax2, blocksize2, offset, blocksize, f0, f0 + I, out[n], table)


# --------------------------------------------------------------------------
# Decoding: y = x Wᵀ for a few rows of x, reading the packed bytes once
# --------------------------------------------------------------------------

# As bf16's GEMV (kernels/bf16.py, where the two fast-math flags are explained, NaN and inf still
# propagating): each thread widens one row at a time into an L1-resident buffer and dots it with
# every row of x, so the only pass over memory reads the packed bytes (a quarter of bf16's). The
# lookups, not memory, bound it: ~2.3x the time of bf16's GEMV on a 4096 x 4096 weight.
@parallel_when_large(PARALLEL_MIN, fastmath=GEMV_FASTMATH)
def gemv_nf4(x, packed, absmax, code2, absmax2, blocksize2, offset, blocksize, O, table, bias=None):
    """x (N, I) float32, an (O, I) NF4 weight (as widen_rows), bias (O,) or None -> y (N, O), small N"""
    N, I = x.shape
    y = np.empty((N, O), dtype=np.float32)
    pairs = _pairs(table)
    for t in nb.prange((O + ROWS - 1) // ROWS):
        row = np.empty(I, dtype=np.float32)
        for o in range(t * ROWS, min(O, (t + 1) * ROWS)):
            if I % blocksize == 0:
                _widen_row(packed, absmax, code2, absmax2, blocksize2, offset, blocksize, o * I, row, pairs)
            else:
                _widen_flat(packed, absmax, code2, absmax2, blocksize2, offset, blocksize, o * I, o * I + I,
                            row, table)
            dot_into(x, row, o, y, bias)
    return y


@parallel_when_large(PARALLEL_MIN, fastmath=GEMV_FASTMATH)
def few_nf4(x, packed, absmax, code2, absmax2, blocksize2, offset, blocksize, O, table, bias=None):
    """As gemv_nf4, for N of 5 .. weights.FEW_N rows of x: 4 rows widened at a time, dot4_into."""
    N, I = x.shape
    y = np.empty((N, O), dtype=np.float32)
    pairs = _pairs(table)
    for t in nb.prange((O + ROWS - 1) // ROWS):
        rows = np.empty((4, I), dtype=np.float32)
        for o in range(t * ROWS, min(O, (t + 1) * ROWS), 4):
            count = min(4, O - o)
            for c in range(count):
                f0 = (o + c) * I
                if I % blocksize == 0:
                    _widen_row(packed, absmax, code2, absmax2, blocksize2, offset, blocksize, f0, rows[c], pairs)
                else:
                    _widen_flat(packed, absmax, code2, absmax2, blocksize2, offset, blocksize, f0, f0 + I,
                                rows[c], table)
            dot4_into(x, rows, count, o, y, bias)
    return y
