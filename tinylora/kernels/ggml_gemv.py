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

How they vectorise: written as Numba loops over each block, LLVM vectorised
the block's inner sum and then reduced its 8 lanes to one float before the
block's scale, and that reduction with the loop around it cost as much as
the products. So each row's dot product is one loop in LLVM vector IR
(kernels/vector_ir.py) that keeps 8 lanes across all blocks and sums them
once per row; the K types' scales are unpacked by a plain Numba loop first,
one float32 per sub-block. Measured on one Zen 2 core, weights in cache:
1536 x 576 Q8_0 113 -> 54-60 us, Q5_0 (as 576 x 576) ~1.3x, 576 x 1536 Q6_K
250 -> 150 us. With int8 x (llama.cpp quantises x too) the block loops were
slower still (Q4_1: 6.9 against 8.9 Gweights/s). Each row also asks for the
row ~4 KiB ahead of it to be fetched into cache (`_prefetch`, PREFETCH_BYTES).
"""

import numba as nb
import numpy as np
from llvmlite import ir                                          # numba's own code generator
from numba.core import types
from numba.extending import intrinsic

from . import PARALLEL_MIN, parallel_when_large
from .bf16 import GEMV_FASTMATH, ROWS, dot4_into, dot_into
from .ggml import BLOCK, _widen_row, _widen_row_simple, k_scales
from .vector_ir import (q4_0_row_dot, q4_1_row_dot, q4_k_row_dot, q5_0_row_dot, q5_1_row_dot, q5_k_row_dot,
                        q6_k_row_dot, q8_0_row_dot)


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
    """n, for any I >= n, as a value LLVM cannot see is constant: a loop over a fixed range(32) is unrolled
    into 32 scalar copies and never vectorised (Numba runs the loop vectoriser, not the SLP one), a loop
    over range(_upto(32, I)) is vectorised. At least 1, so that no version of the loop nest is compiled
    for the case the inner loop never runs."""
    return max(1, min(n, I))


@nb.njit(cache=True, inline="always")
def _f32(i):
    """An integer as float32, converted from int32: vector lanes of 32 bits."""
    return np.float32(np.int32(i))


# The 32-weight block types: one loop per row in LLVM vector IR (kernels/vector_ir.py), 8 lanes throughout.
@nb.njit(cache=True, inline="always")
def _dot_q8_0(x, xs, blocks, r, half, scratch):
    """Q8_0 row: Σ_b d_b Σ_j x_j q_j, q an int8."""
    return q8_0_row_dot(x, xs, blocks, r, half)


@nb.njit(cache=True, inline="always")
def _dot_q4_0(x, xs, blocks, r, half, scratch):
    """Q4_0 row: Σ_b d_b Σ_j x_j (q_j - 8), q_j the low nibble of byte j, q_j+16 its high one."""
    return q4_0_row_dot(x, xs, blocks, r, half)


@nb.njit(cache=True, inline="always")
def _dot_q4_1(x, xs, blocks, r, half, scratch):
    """Q4_1 row: Σ_b d_b Σ_j x_j q_j + m_b Σ_j x_j."""
    return q4_1_row_dot(x, xs, blocks, r, half)


@nb.njit(cache=True, inline="always")
def _dot_q5_0(x, xs, blocks, r, half, scratch):
    """Q5_0 row: Σ_b d_b Σ_j x_j (q_j - 16), bit j of qh q_j's 5th bit."""
    return q5_0_row_dot(x, xs, blocks, r, half)


@nb.njit(cache=True, inline="always")
def _dot_q5_1(x, xs, blocks, r, half, scratch):
    """Q5_1 row: Σ_b d_b Σ_j x_j q_j + m_b Σ_j x_j."""
    return q5_1_row_dot(x, xs, blocks, r, half)


# The super-block types: the scales unpacked into `scratch` (2, I / 16) float32 by ggml.k_scales, one
# float32 per sub-block (reused row after row), the minima's term summed here; the codes' dot products
# in LLVM vector IR (kernels/vector_ir.py). Every _dot_* takes `scratch`; the 32-weight types ignore it.
@nb.njit(cache=True, inline="always")
def _dot_k(kind, x, xs, blocks, r, half, scratch):
    """Q4_K, Q5_K row: Σ_i (d sc_i) Σ_j x_ij q_ij - (dmin m_i) Σ_j x_ij over the 8 sub-blocks i of 32 of
    each super-block; Q6_K row: Σ_i (d sc_i) Σ_j x_ij (q_ij - 32) over the 16 sub-blocks i of 16
    (the layouts of the codes: vector_ir._k_codes)."""
    scales, minima = scratch[0], scratch[1]
    k_scales(kind, blocks, r, x.size // 256, half, scales, minima)
    if kind == 7:
        return q6_k_row_dot(x, scales, blocks, r)
    m = np.float32(0.0)                                            # Σ_i (dmin m_i) Σ_j x_ij
    for i in range(x.size // 32):
        m += minima[i] * xs[i]
    codes = q4_k_row_dot(x, scales, blocks, r) if kind == 5 else q5_k_row_dot(x, scales, blocks, r)
    return codes - m


@nb.njit(cache=True, inline="always")
def _dot_q4_k(x, xs, blocks, r, half, scratch):
    return _dot_k(5, x, xs, blocks, r, half, scratch)


@nb.njit(cache=True, inline="always")
def _dot_q5_k(x, xs, blocks, r, half, scratch):
    return _dot_k(6, x, xs, blocks, r, half, scratch)


@nb.njit(cache=True, inline="always")
def _dot_q6_k(x, xs, blocks, r, half, scratch):
    return _dot_k(7, x, xs, blocks, r, half, scratch)


# Prefetching: these kernels run ~150 instructions per 64-byte line of blocks, so the out-of-order
# window holds only a few lines' loads in flight, and on weights that are not in cache (decoding:
# each is read once per token) the hardware prefetcher did not keep ahead: each kernel ran 1.1-2.1x
# slower than on cached weights, and decoding SmolLM2 ~1.5x slower. Asking for the row ~4 KiB
# ahead, one line at a time, removes most of that (~0-10% slower on weights already in cache).
PREFETCH_BYTES = 4096


@nb.njit(cache=True, inline="always")
def _rows(dot, x, xs, blocks, half, bias, y, start, stop):
    """y[:, start:stop] = x · rows start .. stop-1 of the blocks (+ bias), dot one of the _dot_* above
    (passed as an argument, each compiles its own copy of this loop: one branch per chunk of rows)."""
    O, R = blocks.shape
    scratch = np.empty((2, max(1, x.shape[1] // 16)), dtype=np.float32)   # the K types' scales, per row
    ahead = PREFETCH_BYTES // R + 1
    for o in range(start, stop):
        if o + ahead < O:
            for k in range(0, R, 64):
                _prefetch(blocks, (o + ahead) * R + k)
        for n in range(x.shape[0]):
            s = dot(x[n], xs[n], blocks, o, half, scratch)
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
    y = np.empty((N, O), dtype=np.float32)
    for t in nb.prange((O + ROWS - 1) // ROWS):
        start, stop = t * ROWS, min(O, (t + 1) * ROWS)
        if kind == 0:
            _rows(_dot_q8_0, x, xs, blocks, half, bias, y, start, stop)
        elif kind == 1:
            _rows(_dot_q4_0, x, xs, blocks, half, bias, y, start, stop)
        elif kind == 2:
            _rows(_dot_q4_1, x, xs, blocks, half, bias, y, start, stop)
        elif kind == 3:
            _rows(_dot_q5_0, x, xs, blocks, half, bias, y, start, stop)
        elif kind == 4:
            _rows(_dot_q5_1, x, xs, blocks, half, bias, y, start, stop)
        elif kind == 5:
            _rows(_dot_q4_k, x, xs, blocks, half, bias, y, start, stop)
        elif kind == 6:
            _rows(_dot_q5_k, x, xs, blocks, half, bias, y, start, stop)
        else:
            _rows(_dot_q6_k, x, xs, blocks, half, bias, y, start, stop)
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
            _widen_row_simple(kind, blocks, o, row, half)
            dot_into(x, row, o, y, bias)
    return y


# A few more rows of x (a prompt's prefill): 4 rows widened at a time, then dot4_into (kernels/bf16.py).
@parallel_when_large(PARALLEL_MIN, fastmath=GEMV_FASTMATH)
def few_blocks(x, blocks, kind, half, bias=None):
    """As gemv_blocks, for N of 5 .. weights.FEW_N rows of x."""
    N, I = x.shape
    O = blocks.shape[0]
    y = np.empty((N, O), dtype=np.float32)
    for t in nb.prange((O + ROWS - 1) // ROWS):
        rows = np.empty((4, I), dtype=np.float32)
        scratch = np.empty((2, max(1, I // 16)), dtype=np.float32)
        for o in range(t * ROWS, min(O, (t + 1) * ROWS), 4):
            count = min(4, O - o)
            for c in range(count):
                _widen_row(kind, blocks, o + c, rows[c], half, scratch)
            dot4_into(x, rows, count, o, y, bias)
    return y
