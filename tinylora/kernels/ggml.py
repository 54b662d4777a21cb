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

The float16 scales are widened through a 65536-entry table (`HALF`, NumPy's
own float16 -> float32, exact, NaN payloads kept), so there is no
bit-twiddling here. Every product and sum is one float32 operation in the
order above, with no fused multiply-add, so the result is bit-identical to
`gguf.quants.dequantize` (tests/test_ggml.py). A weight is stored as (O, row
bytes) uint8, one row of blocks per output row; `rows` (O_sel,) says which
rows to widen into out (O_sel, I) float32. Serial, like bf16's widen_rows:
it runs between BLAS calls.
"""

import numba as nb
import numpy as np

BLOCK = 32                                                  # weights per block, every type here
BLOCK_BYTES = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20, "Q5_0": 22, "Q5_1": 24}
HALF = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)   # (65536,)


@nb.njit(cache=True, inline="always")
def _half(blocks, r, p, half):
    """The float16 at bytes p, p+1 of row r (little-endian), as float32."""
    return half[np.int64(blocks[r, p]) | (np.int64(blocks[r, p + 1]) << 8)]


@nb.njit(cache=True, inline="always")
def _u32(blocks, r, p):
    return (np.uint32(blocks[r, p]) | (np.uint32(blocks[r, p + 1]) << 8) | (np.uint32(blocks[r, p + 2]) << 16)
            | (np.uint32(blocks[r, p + 3]) << 24))


@nb.njit(cache=True)
def widen_q8_0(blocks, rows, out, half):
    for n in range(rows.size):
        r = rows[n]
        for b in range(out.shape[1] // BLOCK):
            p, o = b * 34, b * BLOCK
            d = _half(blocks, r, p, half)
            for j in range(BLOCK):
                q = np.int32(blocks[r, p + 2 + j])
                out[n, o + j] = np.float32(q - 256 if q >= 128 else q) * d          # int8 from its byte


@nb.njit(cache=True)
def widen_q4_0(blocks, rows, out, half):
    for n in range(rows.size):
        r = rows[n]
        for b in range(out.shape[1] // BLOCK):
            p, o = b * 18, b * BLOCK
            d = _half(blocks, r, p, half)
            for j in range(16):
                byte = np.int32(blocks[r, p + 2 + j])
                out[n, o + j] = d * np.float32((byte & 0xF) - 8)
                out[n, o + j + 16] = d * np.float32((byte >> 4) - 8)


@nb.njit(cache=True)
def widen_q4_1(blocks, rows, out, half):
    for n in range(rows.size):
        r = rows[n]
        for b in range(out.shape[1] // BLOCK):
            p, o = b * 20, b * BLOCK
            d, m = _half(blocks, r, p, half), _half(blocks, r, p + 2, half)
            for j in range(16):
                byte = np.int32(blocks[r, p + 4 + j])
                out[n, o + j] = d * np.float32(byte & 0xF) + m
                out[n, o + j + 16] = d * np.float32(byte >> 4) + m


@nb.njit(cache=True)
def widen_q5_0(blocks, rows, out, half):
    for n in range(rows.size):
        r = rows[n]
        for b in range(out.shape[1] // BLOCK):
            p, o = b * 22, b * BLOCK
            d, qh = _half(blocks, r, p, half), _u32(blocks, r, p + 2)
            for j in range(16):
                byte = np.int32(blocks[r, p + 6 + j])
                lo = (byte & 0xF) | (np.int32((qh >> j) & 1) << 4)
                hi = (byte >> 4) | (np.int32((qh >> (j + 16)) & 1) << 4)
                out[n, o + j] = d * np.float32(lo - 16)
                out[n, o + j + 16] = d * np.float32(hi - 16)


@nb.njit(cache=True)
def widen_q5_1(blocks, rows, out, half):
    for n in range(rows.size):
        r = rows[n]
        for b in range(out.shape[1] // BLOCK):
            p, o = b * 24, b * BLOCK
            d, m, qh = _half(blocks, r, p, half), _half(blocks, r, p + 2, half), _u32(blocks, r, p + 4)
            for j in range(16):
                byte = np.int32(blocks[r, p + 8 + j])
                lo = (byte & 0xF) | (np.int32((qh >> j) & 1) << 4)
                hi = (byte >> 4) | (np.int32((qh >> (j + 16)) & 1) << 4)
                out[n, o + j] = d * np.float32(lo) + m
                out[n, o + j + 16] = d * np.float32(hi) + m


WIDEN = {"Q8_0": widen_q8_0, "Q4_0": widen_q4_0, "Q4_1": widen_q4_1, "Q5_0": widen_q5_0, "Q5_1": widen_q5_1}
