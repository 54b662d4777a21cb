"""The decoding product on llama.cpp's blocks: y = x Wᵀ (+ bias) for a few rows of x, reading W's blocks once.

Decoding reads every weight once per token, so the work is bound by reading
(and unpacking) the blocks. Each output row is a sum over its blocks, and
within a block the integer codes q meet x directly; the block's float16
scale d multiplies the block's sum once, and a block minimum m meets x only
through the block's sum Σ x_j, computed once per call:

    Q8_0   Σ x_j (d q_j)                          = d Σ x_j q_j
    Q4_0   Σ x_j d (q_j - 8)                      = d Σ x_j (q_j - 8)
    Q4_1   Σ x_j (d q_j + m)                      = d Σ x_j q_j + m Σ x_j
    Q5_0, Q5_1: as Q4_0 (q_j - 16) and Q4_1, with a 5th bit of q from qh
    Q4_K   Σ_i Σ_j x_ij ((d sc_i) q_ij - dmin m_i) = Σ_i (d sc_i) Σ_j x_ij q_ij - (dmin m_i) Σ_j x_ij
    Q5_K   as Q4_K, q of 5 bits
    Q6_K   Σ_i (d sc_i) Σ_j x_ij (q_ij - 32), over 16 sub-blocks of 16

in float32, with x as it is (not quantised to 8 bits as llama.cpp does with
its Q8_0 / Q8_K activations: here that was slower, see below), so the
result is x Wᵀ to float32 accuracy for W as `ggml.widen_rows` gives it,
only summed in another order. NaN and inf scales still spoil their rows
(no "nnan"/"ninf" flags); an inf scale may give NaN where the widened
weights give inf or the reverse, as inf · 0 now falls elsewhere.
`gemv_widened` (widen a row to float32, then dot it) is the simple
version, kept as the reference these kernels replaced.

How LLVM vectorises them (Numba runs its loop vectoriser, not the SLP one):
a loop over a fixed range(16) or range(32) is unrolled into 16 or 32 scalar
copies and never vectorised, so the loops within a block run over
range(_upto(16, I)): 16 for any real row, but a number the compiler cannot
fold, so it vectorises the loop instead (in one or two 8-float steps, as it
still knows the trip count is at most 16). Every integer goes through int32
(`_f32`) so that the vectors hold 8 lanes, not 4 of Numba's default int64.
With float32 x a 4-bit block costs a byte load, a mask, a shift, two int ->
float conversions and two fused multiply-adds per 8 bytes; with int8 x LLVM
emits vpmaddwd / vpdpwssd dot products, but the work per block (its scales,
the horizontal sum, the loop) dominates and that version measured slower
(Q4_1: 6.9 against 8.9 Gweights/s on one core). A loop over two blocks at a
time was slower too. Each row also asks for the row ~4 KiB ahead of it to
be fetched into cache (`_prefetch`, see PREFETCH_BYTES).
"""

import numba as nb
import numpy as np
from llvmlite import ir                                          # numba's own code generator
from numba.core import types
from numba.extending import intrinsic

from . import PARALLEL_MIN, parallel_when_large
from .bf16 import GEMV_FASTMATH, ROWS, dot_into
from .ggml import BLOCK, _half, _scale_min_k4, _widen_row
from .vector_ir import q4_0_row_dot, q4_1_row_dot, q5_0_row_dot, q5_1_row_dot, q8_0_row_dot


@intrinsic
def _prefetch(typingctx, a, i):
    """Ask for the cache line holding a.flat[i] (a C-contiguous array): LLVM's target-independent llvm.prefetch
    (prefetcht0 on x86, prfm on ARM, nothing where there is none). A hint: it never faults, nor waits."""
    def codegen(context, builder, signature, args):
        data = context.make_array(signature.args[0])(context, builder, args[0]).data
        fnty = ir.FunctionType(ir.VoidType(), [ir.IntType(8).as_pointer()] + [ir.IntType(32)] * 3)
        name = "llvm.prefetch.p0"
        fn = builder.module.globals.get(name) or ir.Function(builder.module, fnty, name=name)
        read, keep, data_cache = (ir.Constant(ir.IntType(32), v) for v in (0, 3, 1))
        builder.call(fn, [builder.bitcast(builder.gep(data, [args[1]]), ir.IntType(8).as_pointer()),
                          read, keep, data_cache])
        return context.get_dummy_value()
    return types.void(a, i), codegen


@nb.njit(cache=True, inline="always")
def _upto(n, I):
    """n, for any I >= n, as a value LLVM cannot see is constant (see the module's docstring); at least 1,
    so that it does not also compile a version of each loop nest for the case the inner loops never run."""
    return max(1, min(n, I))


@nb.njit(cache=True, inline="always")
def _f32(i):
    """An integer as float32, converted from int32: vector lanes of 32 bits."""
    return np.float32(np.int32(i))


@nb.njit(cache=True, inline="always")
def _bits(v, shift, mask):
    """(v >> shift) & mask of an int32 v, each step cast back to int32 (Numba computes in int64; one cast
    per step lets LLVM narrow each back to 32 bits, which a single cast at the end does not always)."""
    return np.int32(np.int32(v >> shift) & mask)


# The 32-weight block types: one loop per row in LLVM vector IR (kernels/vector_ir.py), 8 lanes throughout.
@nb.njit(cache=True, inline="always")
def _dot_q8_0(x, xs, blocks, r, half, n16):
    """Q8_0 row: Σ_b d_b Σ_j x_j q_j, q an int8."""
    return q8_0_row_dot(x, xs, blocks, r, half)


@nb.njit(cache=True, inline="always")
def _dot_q4_0(x, xs, blocks, r, half, n16):
    """Q4_0 row: Σ_b d_b Σ_j x_j (q_j - 8), q_j the low nibble of byte j, q_j+16 its high one."""
    return q4_0_row_dot(x, xs, blocks, r, half)


@nb.njit(cache=True, inline="always")
def _dot_q4_1(x, xs, blocks, r, half, n16):
    """Q4_1 row: Σ_b d_b Σ_j x_j q_j + m_b Σ_j x_j."""
    return q4_1_row_dot(x, xs, blocks, r, half)


@nb.njit(cache=True, inline="always")
def _dot_q5_0(x, xs, blocks, r, half, n16):
    """Q5_0 row: Σ_b d_b Σ_j x_j (q_j - 16), bit j of qh q_j's 5th bit."""
    return q5_0_row_dot(x, xs, blocks, r, half)


@nb.njit(cache=True, inline="always")
def _dot_q5_1(x, xs, blocks, r, half, n16):
    """Q5_1 row: Σ_b d_b Σ_j x_j q_j + m_b Σ_j x_j."""
    return q5_1_row_dot(x, xs, blocks, r, half)


@nb.njit(cache=True, inline="always")
def _dot_q45_k(kind, x, xs, blocks, r, half, n16):
    """Q4_K, Q5_K super-block: Σ_i (d sc_i) Σ_j x_ij q_ij - (dmin m_i) Σ_j x_ij over its 8 sub-blocks i of 32.
    Sub-blocks 2c and 2c+1 are the low and high nibbles of qs[32c + j], their 5th bits (Q5_K) bits 2c and
    2c+1 of qh[j]: one loop over j gathers all 8 sums (constant shifts keep LLVM's lanes 32-bit)."""
    size, qs = (144, 16) if kind == 5 else (176, 48)
    s = np.float32(0.0)
    for b in range(x.size // 256):
        p, o = size * b, 256 * b
        t0 = t1 = t2 = t3 = t4 = t5 = t6 = t7 = np.float32(0.0)
        for j in range(2 * n16):
            q0, q1 = np.int32(blocks[r, p + qs + j]), np.int32(blocks[r, p + qs + 32 + j])
            q2, q3 = np.int32(blocks[r, p + qs + 64 + j]), np.int32(blocks[r, p + qs + 96 + j])
            h = np.int32(blocks[r, p + 16 + j]) if kind == 6 else np.int32(0)
            t0 += x[o + j] * _f32(_bits(q0, 0, 0xF) | (_bits(h, 0, 1) << 4))
            t1 += x[o + 32 + j] * _f32(_bits(q0, 4, 0xF) | (_bits(h, 1, 1) << 4))
            t2 += x[o + 64 + j] * _f32(_bits(q1, 0, 0xF) | (_bits(h, 2, 1) << 4))
            t3 += x[o + 96 + j] * _f32(_bits(q1, 4, 0xF) | (_bits(h, 3, 1) << 4))
            t4 += x[o + 128 + j] * _f32(_bits(q2, 0, 0xF) | (_bits(h, 4, 1) << 4))
            t5 += x[o + 160 + j] * _f32(_bits(q2, 4, 0xF) | (_bits(h, 5, 1) << 4))
            t6 += x[o + 192 + j] * _f32(_bits(q3, 0, 0xF) | (_bits(h, 6, 1) << 4))
            t7 += x[o + 224 + j] * _f32(_bits(q3, 4, 0xF) | (_bits(h, 7, 1) << 4))
        d, dmin = _half(blocks, r, p, half), _half(blocks, r, p + 2, half)
        for i, t in enumerate((t0, t1, t2, t3, t4, t5, t6, t7)):
            sc, m = _scale_min_k4(p + 4, blocks, r, i)
            s += (d * np.float32(sc)) * t - (dmin * np.float32(m)) * xs[8 * b + i]
    return s


@nb.njit(cache=True, inline="always")
def _q6(low, shift, high, high_shift):
    """A Q6_K weight's q - 32: 4 bits of ql from bit `shift`, 2 of qh from bit `high_shift` above them."""
    return _f32(np.int32(_bits(low, shift, 0xF) | (_bits(high, high_shift, 3) << 4)) - 32)


@nb.njit(cache=True, inline="always")
def _dot_q6_k(x, xs, blocks, r, half, n16):
    """Q6_K super-block: Σ_i (d sc_i) Σ_j x_ij (q_ij - 32) over 16 sub-blocks i of 16, sc_i an int8. In half
    h of 128 weights, weight 32k + l takes the low (k < 2) or high nibble of ql[64h + 32 (k % 2) + l] and bits
    2k, 2k+1 of qh[32h + l]; one loop over j = l % 16 gathers the 8 sums of the half (sub-block 8h + 2k + l // 16)."""
    s = np.float32(0.0)
    for b in range(x.size // 256):
        p = 210 * b
        d = _half(blocks, r, p + 208, half)
        for h in range(2):
            ql, qh, o = p + 64 * h, p + 128 + 32 * h, 256 * b + 128 * h
            t0 = t1 = t2 = t3 = t4 = t5 = t6 = t7 = np.float32(0.0)
            for j in range(n16):
                a0, a1 = np.int32(blocks[r, ql + j]), np.int32(blocks[r, ql + 16 + j])
                c0, c1 = np.int32(blocks[r, ql + 32 + j]), np.int32(blocks[r, ql + 48 + j])
                h0, h1 = np.int32(blocks[r, qh + j]), np.int32(blocks[r, qh + 16 + j])
                t0 += x[o + j] * _q6(a0, 0, h0, 0)
                t1 += x[o + 16 + j] * _q6(a1, 0, h1, 0)
                t2 += x[o + 32 + j] * _q6(c0, 0, h0, 2)
                t3 += x[o + 48 + j] * _q6(c1, 0, h1, 2)
                t4 += x[o + 64 + j] * _q6(a0, 4, h0, 4)
                t5 += x[o + 80 + j] * _q6(a1, 4, h1, 4)
                t6 += x[o + 96 + j] * _q6(c0, 4, h0, 6)
                t7 += x[o + 112 + j] * _q6(c1, 4, h1, 6)
            for i, t in enumerate((t0, t1, t2, t3, t4, t5, t6, t7)):
                s += (d * _f32(np.int8(blocks[r, p + 192 + 8 * h + i]))) * t
    return s


@nb.njit(cache=True, inline="always")
def _dot_q4_k(x, xs, blocks, r, half, n16):
    return _dot_q45_k(5, x, xs, blocks, r, half, n16)


@nb.njit(cache=True, inline="always")
def _dot_q5_k(x, xs, blocks, r, half, n16):
    return _dot_q45_k(6, x, xs, blocks, r, half, n16)


# Prefetching: these kernels run ~150 instructions per 64-byte line of blocks, so the out-of-order
# window holds only a few lines' loads in flight, and on weights that are not in cache (decoding:
# each is read once per token) the hardware prefetcher did not keep ahead: each kernel ran 1.1-2.1x
# slower than on cached weights, and decoding SmolLM2 ~1.5x slower. Asking for the row ~4 KiB
# ahead, one line at a time, removes most of that (~0-10% slower on weights already in cache).
PREFETCH_BYTES = 4096


@nb.njit(cache=True, inline="always")
def _rows(dot, x, xs, blocks, half, n16, bias, y, start, stop):
    """y[:, start:stop] = x · rows start .. stop-1 of the blocks (+ bias), dot one of the _dot_* above
    (passed as an argument, each compiles its own copy of this loop: one branch per chunk of rows)."""
    O, R = blocks.shape
    ahead = PREFETCH_BYTES // R + 1
    for o in range(start, stop):
        if o + ahead < O:
            for k in range(0, R, 64):
                _prefetch(blocks, (o + ahead) * R + k)
        for n in range(x.shape[0]):
            s = dot(x[n], xs[n], blocks, o, half, n16)
            y[n, o] = s if bias is None else s + bias[o]


# As for bf16 (kernels/bf16.py, where the two fast-math flags are explained), each thread takes
# ROWS weight rows; the only pass over memory reads the blocks.
@parallel_when_large(PARALLEL_MIN, fastmath=GEMV_FASTMATH)
def gemv_blocks(x, blocks, kind, half, bias=None):
    """x (N, I) float32, blocks (O, row bytes) uint8 of type `kind`, bias (O,) or None -> y (N, O), small N"""
    N, I = x.shape
    O = blocks.shape[0]
    xs = np.empty((N, I // BLOCK), dtype=np.float32)                # every block's Σ x_j, for the minima
    for n in range(N):
        for b in range(I // BLOCK):
            t = np.float32(0.0)
            for j in range(_upto(BLOCK, I)):
                t += x[n, BLOCK * b + j]
            xs[n, b] = t
    n16 = _upto(16, I)
    y = np.empty((N, O), dtype=np.float32)
    for t in nb.prange((O + ROWS - 1) // ROWS):
        start, stop = t * ROWS, min(O, (t + 1) * ROWS)
        if kind == 0:
            _rows(_dot_q8_0, x, xs, blocks, half, n16, bias, y, start, stop)
        elif kind == 1:
            _rows(_dot_q4_0, x, xs, blocks, half, n16, bias, y, start, stop)
        elif kind == 2:
            _rows(_dot_q4_1, x, xs, blocks, half, n16, bias, y, start, stop)
        elif kind == 3:
            _rows(_dot_q5_0, x, xs, blocks, half, n16, bias, y, start, stop)
        elif kind == 4:
            _rows(_dot_q5_1, x, xs, blocks, half, n16, bias, y, start, stop)
        elif kind == 5:
            _rows(_dot_q4_k, x, xs, blocks, half, n16, bias, y, start, stop)
        elif kind == 6:
            _rows(_dot_q5_k, x, xs, blocks, half, n16, bias, y, start, stop)
        else:
            _rows(_dot_q6_k, x, xs, blocks, half, n16, bias, y, start, stop)
    return y


# The simple version gemv_blocks replaced: widen each row into an L1-resident float32 buffer and dot
# it with every row of x. Under "contract" the widening's d · q + m may become one fused multiply-add,
# so its weights can differ from `widen_rows`' in the last bit.
@parallel_when_large(PARALLEL_MIN, fastmath=GEMV_FASTMATH)
def gemv_widened(x, blocks, kind, half, bias=None):
    """As gemv_blocks, by widening each row (3-15x slower on weights not in cache)."""
    N, I = x.shape
    O = blocks.shape[0]
    y = np.empty((N, O), dtype=np.float32)
    for t in nb.prange((O + ROWS - 1) // ROWS):
        row = np.empty(I, dtype=np.float32)
        for o in range(t * ROWS, min(O, (t + 1) * ROWS)):
            _widen_row(kind, blocks, o, row, half)
            dot_into(x, row, o, y, bias)
    return y
