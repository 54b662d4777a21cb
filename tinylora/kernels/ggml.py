"""llama.cpp's block formats (GGUF): widening rows of quantised blocks to float32.

A GGUF tensor of a quantised type is a sequence of blocks, each holding 32
consecutive weights of a row as small integers q and one or two float16
numbers (layouts from llama.cpp's ggml-common.h, values as in its
dequantize_row_* in ggml-quants.c):

    type   bytes  layout                                            weight
    Q8_0   34     d (f16), qs[32] int8                              d · q
    Q4_0   18     d (f16), qs[16]: q_j low nibble, q_j+16 high      d · (q - 8)
    Q4_1   20     d, m (f16), qs[16] as Q4_0                        d · q + m
    Q5_0   22     d (f16), qh (u32: bit j = 5th bit of q_j), qs[16] d · (q - 16)
    Q5_1   24     d, m (f16), qh (u32), qs[16]                      d · q + m

and the "K" types, super-blocks of 256 weights in 8 sub-blocks of 32 (Q4_K,
Q5_K) or 16 of 16 (Q6_K), each sub-block with its own 6- or 8-bit scale:

    Q4_K   144    d, dmin (f16), scales[12] (8 6-bit sc, 8 6-bit m), qs[128] 4-bit     (d·sc_i) · q - (dmin·m_i)
    Q5_K   176    as Q4_K, then qh[32] (bit i of byte j: 5th bit of weight 32i + j), qs    the same, q of 5 bits
    Q6_K   210    ql[128] 4-bit, qh[64] 2-bit, scales[16] int8, d (f16)                (d·sc_i) · (q - 32)

The float16 scales are widened through a 65536-entry table (`HALF`, NumPy's
own float16 -> float32, exact, NaN payloads kept), so there is no
bit-twiddling here. Every product and sum is one float32 operation in the
order above, with no fused multiply-add, so the result is bit-identical to
`gguf.quants.dequantize` (tests/test_ggml.py). A weight is stored as (O, row
bytes) uint8, one row of blocks per output row. `widen_rows` widens the rows
it is given into float32 for BLAS (serial, like bf16's: it runs between BLAS
calls), through LLVM vector IR; `widen_rows_simple` is the same weight by
weight, the definition it is tested against. `gemv_blocks`, the decoding product reading the blocks directly, is in
kernels/ggml_gemv.py (import it from here: that module imports this one).
"""

import numba as nb
import numpy as np

from .vector_ir import (q4_0_widen, q4_1_widen, q4_k_widen, q5_0_widen, q5_1_widen, q5_k_widen, q6_k_widen,
                        q8_0_widen)


BLOCK = 32                                                  # weights per block of the first five types
BLOCK_BYTES = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20, "Q5_0": 22, "Q5_1": 24, "Q4_K": 144, "Q5_K": 176, "Q6_K": 210}
BLOCK_WEIGHTS = {t: 256 if t.endswith("_K") else 32 for t in BLOCK_BYTES}
SCALES_AT = {"Q8_0": (0,), "Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2),   # byte offsets of the
             "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}                              # float16 scales
BYTES = np.array(list(BLOCK_BYTES.values()), dtype=np.int64)   # by KINDS number
HALF = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)   # (65536,)


@nb.njit(cache=True, inline="always")
def _half(blocks, r, p, half):
    """The float16 at bytes p, p+1 of row r (little-endian), as float32."""
    return half[np.int64(blocks[r, p]) | (np.int64(blocks[r, p + 1]) << 8)]


@nb.njit(cache=True, inline="always")
def _u32(blocks, r, p):
    return (np.uint32(blocks[r, p]) | (np.uint32(blocks[r, p + 1]) << 8) | (np.uint32(blocks[r, p + 2]) << 16)
            | (np.uint32(blocks[r, p + 3]) << 24))


# The block types by number, so that one kernel serves them all (a branch per block, not per weight).
KINDS = {t: k for k, t in enumerate(BLOCK_BYTES)}


@nb.njit(cache=True, inline="always")
def _scale_min_k4(scales_at, blocks, r, i):
    """Sub-block i's 6-bit scale and min from Q4_K/Q5_K's 12 packed bytes (ggml's get_scale_min_k4)."""
    if i < 4:
        return np.int32(blocks[r, scales_at + i]) & 63, np.int32(blocks[r, scales_at + i + 4]) & 63
    low = np.int32(blocks[r, scales_at + i + 4])
    return ((low & 0xF) | ((np.int32(blocks[r, scales_at + i - 4]) >> 6) << 4),
            (low >> 4) | ((np.int32(blocks[r, scales_at + i]) >> 6) << 4))


@nb.njit(cache=True, inline="always")
def _widen_row_k_simple(kind, blocks, r, out, half):
    """Row r of K-type super-blocks -> out (I,) float32, weight by weight."""
    size = BYTES[kind]
    for b in range(out.size // 256):
        p, o = b * size, b * 256
        if kind == 7:                                                   # Q6_K
            d = _half(blocks, r, p + 208, half)
            for e in range(256):
                h, within = e // 128, e % 128
                low = (np.int32(blocks[r, p + h * 64 + within % 64]) >> (4 * (within // 64))) & 0xF
                high = (np.int32(blocks[r, p + 128 + h * 32 + e % 32]) >> (2 * (within // 32))) & 3
                sc = np.int32(blocks[r, p + 192 + e // 16])
                scale = d * np.float32(sc - 256 if sc >= 128 else sc)
                out[o + e] = scale * np.float32((low | (high << 4)) - 32)
            continue
        d, dmin = _half(blocks, r, p, half), _half(blocks, r, p + 2, half)
        qs = p + 16 + 32 * (kind == 6)                                  # Q5_K keeps qh[32] before qs
        for i in range(8):
            sc, m = _scale_min_k4(p + 4, blocks, r, i)
            scale, minimum = d * np.float32(sc), dmin * np.float32(m)
            for j in range(32):
                q = (np.int32(blocks[r, qs + 32 * (i // 2) + j]) >> (4 * (i % 2))) & 0xF
                if kind == 6:
                    q |= ((np.int32(blocks[r, p + 16 + j]) >> i) & 1) << 4
                out[o + 32 * i + j] = scale * np.float32(q) - minimum


@nb.njit(cache=True, inline="always")
def _widen_row_simple(kind, blocks, r, out, half):
    """Row r of blocks -> out (I,) float32: each block's weights, by the table above, one at a time."""
    if kind >= 5:
        _widen_row_k_simple(kind, blocks, r, out, half)
        return
    size = BYTES[kind]
    for b in range(out.size // BLOCK):
        p, o = b * size, b * BLOCK
        d = _half(blocks, r, p, half)
        if kind == 0:                                                   # Q8_0: d · q, q an int8
            for j in range(BLOCK):
                q = np.int32(blocks[r, p + 2 + j])
                out[o + j] = np.float32(q - 256 if q >= 128 else q) * d
        elif kind == 1:                                                 # Q4_0: d · (q - 8)
            for j in range(16):
                byte = np.int32(blocks[r, p + 2 + j])
                out[o + j] = d * np.float32((byte & 0xF) - 8)
                out[o + j + 16] = d * np.float32((byte >> 4) - 8)
        elif kind == 2:                                                 # Q4_1: d · q + m
            m = _half(blocks, r, p + 2, half)
            for j in range(16):
                byte = np.int32(blocks[r, p + 4 + j])
                out[o + j] = d * np.float32(byte & 0xF) + m
                out[o + j + 16] = d * np.float32(byte >> 4) + m
        else:                                                           # Q5_0, Q5_1: a 5th bit from qh
            m = _half(blocks, r, p + 2, half) if kind == 4 else np.float32(0.0)
            qh = _u32(blocks, r, p + 2 + 2 * (kind == 4))
            qs = p + 6 + 2 * (kind == 4)
            for j in range(16):
                byte = np.int32(blocks[r, qs + j])
                lo = (byte & 0xF) | (np.int32((qh >> j) & 1) << 4)
                hi = (byte >> 4) | (np.int32((qh >> (j + 16)) & 1) << 4)
                if kind == 3:                                           # Q5_0: d · (q - 16)
                    out[o + j] = d * np.float32(lo - 16)
                    out[o + j + 16] = d * np.float32(hi - 16)
                else:                                                   # Q5_1: d · q + m
                    out[o + j] = d * np.float32(lo) + m
                    out[o + j + 16] = d * np.float32(hi) + m


@nb.njit(cache=True)
def widen_rows_simple(blocks, kind, rows, out, half):
    """widen_rows, weight by weight: the definition the vector-IR widening is tested against."""
    for n in range(rows.size):
        _widen_row_simple(kind, blocks, rows[n], out[n], half)


# The fast widening: the same arithmetic, 8 weights at a time in LLVM vector IR (kernels/vector_ir.py;
# a 576 x 1536 matrix on one core: Q8_0 ~2.5 -> ~7 G weights/s, Q6_K ~0.3 -> ~5). The K types'
# scales are unpacked first, one float32 per sub-block, by `k_scales` (the decoding GEMV shares it).
@nb.njit(cache=True, inline="always")
def k_scales(kind, blocks, r, n, half, scales, minima):
    """Row r's first n super-blocks: scales[i] = d · sc_i and minima[i] = dmin · m_i for each sub-block i
    in order (Q4_K, Q5_K: 8 of 32 weights a super-block; Q6_K: 16 of 16, and no minima)."""
    size = BYTES[kind]
    for b in range(n):
        p = size * b
        if kind == 7:
            d = _half(blocks, r, p + 208, half)
            for i in range(16):
                sc = np.int32(blocks[r, p + 192 + i])
                scales[16 * b + i] = d * np.float32(sc - 256 if sc >= 128 else sc)
            continue
        d, dmin = _half(blocks, r, p, half), _half(blocks, r, p + 2, half)
        for i in range(8):
            sc, m = _scale_min_k4(p + 4, blocks, r, i)
            scales[8 * b + i], minima[8 * b + i] = d * np.float32(sc), dmin * np.float32(m)


@nb.njit(cache=True, inline="always")
def _widen_row(kind, blocks, r, out, half, scratch):
    """Row r of blocks -> out (I,) float32, as _widen_row_simple; scratch (2, I / 16) float32 for the K
    types' unpacked scales."""
    if kind >= 5:
        k_scales(kind, blocks, r, out.size // 256, half, scratch[0], scratch[1])
        if kind == 5:
            q4_k_widen(scratch[0], scratch[1], blocks, r, out)
        elif kind == 6:
            q5_k_widen(scratch[0], scratch[1], blocks, r, out)
        else:
            q6_k_widen(scratch[0], scratch[1], blocks, r, out)
    elif kind == 0:
        q8_0_widen(blocks, r, half, out)
    elif kind == 1:
        q4_0_widen(blocks, r, half, out)
    elif kind == 2:
        q4_1_widen(blocks, r, half, out)
    elif kind == 3:
        q5_0_widen(blocks, r, half, out)
    else:
        q5_1_widen(blocks, r, half, out)


@nb.njit(cache=True)
def widen_rows(blocks, kind, rows, out, half):
    """blocks (O, row bytes) uint8 of type `kind`, rows (O_sel,) int64 -> out[:O_sel] (O_sel, I) float32"""
    scratch = np.empty((2, max(1, out.shape[1] // 16)), dtype=np.float32)
    for n in range(rows.size):
        _widen_row(kind, blocks, rows[n], out[n], half, scratch)


def block_scales(blocks, qtype: str):
    """blocks (O, row bytes) uint8 -> every block's float16 scales as float32 (O, blocks, 1 or 2): d, and m
    or dmin where the type has one. For a check at load time (a NaN or inf scale spoils its block)."""
    per_block = blocks.reshape(blocks.shape[0], -1, BLOCK_BYTES[qtype])
    at = np.array(SCALES_AT[qtype])
    pairs = np.stack([per_block[..., at], per_block[..., at + 1]], axis=-1)      # (O, blocks, halves, 2)
    return HALF[np.ascontiguousarray(pairs).view(np.uint16)[..., 0]]


from .ggml_gemv import few_blocks, gemv_blocks, gemv_widened  # noqa: E402  (decoding; it imports the helpers above)
