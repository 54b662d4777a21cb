"""bf16 compute: a GEMM on the CPU's bf16 dot-product instruction (AVX512-BF16), and its simple twin.

`--compute bfloat16` (kernels/weights.py's "bf16-dot" path) serves the training products with frozen
weights, y = x Wᵀ and dx = dy W, in bfloat16: the activations (and dy) are rounded to bf16 to
nearest even, the weights are bf16 already (or a quantised type's widened rows, rounded), and every
product is summed in float32. One instruction does the work:

    vdpbf16ps acc, a, b      for each of 16 float32 lanes i:
                             acc_i += a_{2i+1} b_{2i+1};  acc_i += a_{2i} b_{2i}

a and b hold 32 bf16 values, two to a 32-bit lane, and the products of two bf16 values are exact
in float32 (8 + 8 mantissa bits), so each step is one rounded float32 addition, as in an fp32
GEMM; only the order of the sums differs. (The instruction treats subnormal inputs and results
as zero, whatever the MXCSR says; NaN and inf propagate.) It does twice the multiply-adds of an
fp32 FMA per instruction, and whether that is twice the speed depends on the CPU: on AMD Zen 5 a
register-only loop reached ~950-1030 GFLOP/s on 2 cores against fp32 FMA's ~475-520; on an Intel
Xeon (2026-12-05) it issues at half FMA's rate, ~120 GFLOP/s a core, no faster than fp32 (README,
"bf16 compute"). This GEMM runs at ~80 % of the instruction's rate on the model's shapes.

The micro-kernel (the BLIS design): C = A B, with the pairs running along the summed dimension K:

    A  (M, K/2) uint32: row m holds (a[m, 2p], a[m, 2p+1]) in lane p, as bf16 pairs (low, high)
    Bp (K/2, 64) uint32: a packed strip of 64 columns of B, pair p of column j at Bp[p, j]
    C  (M, N) float32

and one call computes an MR x NR = 6 x 64 tile of C: 24 accumulators of 16 lanes (24 of the 32
zmm registers), and for each pair p it loads 4 vectors of Bp[p], broadcasts 6 pairs A[m0 + r, p]
and issues 24 vdpbf16ps: 10 loads per 24 x 32 multiply-adds. LLVM keeps the 24 accumulators in
registers because they are loop values of the IR loop, not memory.

Forward and backward pair the weight differently: y = x Wᵀ sums over I, so B = Wᵀ and a pair is
(W[n, 2p], W[n, 2p+1]), two neighbours in a row of W; dx = dy W sums over O, so B = W and a pair
is (W[2p, i], W[2p+1, i]), one weight from each of two rows. Neither layout is stored: each thread
packs the 64-column strip it is about to use from the row-major bf16 bits (`_pack`, one pass over
the strip, ~1/(2 MR) = 1/12 of the tile's loads), as BLIS packs its B panels. The weight stays
one (O, I) bf16 array, and the packing costs one read of W per product, against the 2 M FLOPs
per weight that follow (M = 256 tokens in training).

The CPU must have the instruction: compiling it for a CPU without it aborts the process inside
LLVM, where Python cannot catch it. `has_bf16_dot()` asks first, as Numba would compile (its
NUMBA_CPU_NAME / NUMBA_CPU_FEATURES overrides included), and the dispatcher falls back to the
float32 path with a note. The simple version is `gemm_bf16_simple`: round, widen, np.matmul.
"""

from __future__ import annotations

import functools

import numba as nb
import numpy as np
from llvmlite import ir
from numba.core import types
from numba.extending import intrinsic

from .bf16 import bf16_to_f32, f32_to_bf16, round_bf16
from .vector_ir import F32, I32, I64, _block_loop, _const

MR, NR = 6, 64                 # the micro-tile: rows of A (broadcast) x columns of B (4 vectors of 16)
VECTORS = NR // 16
V16F = ir.VectorType(F32, 16)
V16I = ir.VectorType(I32, 16)


# --------------------------------------------------------------------------
# Can this process run it?
# --------------------------------------------------------------------------

@functools.cache
def has_bf16_dot() -> bool:
    """True when the CPU has avx512_bf16 and Numba compiles for it (the features it targets).

    Numba compiles for the host CPU unless NUMBA_CPU_NAME / NUMBA_CPU_FEATURES say otherwise; with
    NUMBA_CPU_NAME=generic (portable caches) it targets no extension, and this says False. Asked once
    per process: Numba reads those variables when it is imported.
    """
    import llvmlite.binding as llvm
    from numba.core import config
    if not llvm.get_host_cpu_features().get("avx512bf16", False):
        return False                                  # the instruction would be illegal here
    features = config.CPU_FEATURES
    if features is None:
        features = llvm.get_host_cpu_features().flatten()
    return "+avx512bf16" in features.split(",")


# --------------------------------------------------------------------------
# The micro-kernel, in LLVM IR
# --------------------------------------------------------------------------

def _dpbf16(builder, acc, a, b):
    """acc + the pairwise products of a and b (16 lanes; llvm.x86.avx512bf16.dpbf16ps.512)."""
    name = "llvm.x86.avx512bf16.dpbf16ps.512"
    fn = builder.module.globals.get(name) or ir.Function(builder.module, ir.FunctionType(V16F, [V16F, V16I, V16I]),
                                                         name=name)
    return builder.call(fn, [acc, a, b])


def _broadcast(builder, value):
    v = builder.insert_element(ir.Constant(V16I, ir.Undefined), value, ir.Constant(I32, 0))
    return builder.shuffle_vector(v, ir.Constant(V16I, ir.Undefined), ir.Constant(V16I, [0] * 16))


def _vector_at(builder, base, index, typ):
    """A pointer to a 16-lane vector at base[index]: alignment 4, as NumPy guarantees (not 64)."""
    return builder.bitcast(builder.gep(base, [index]), typ.as_pointer())


@intrinsic
def _tile(typingctx, a, m0, p0, bp, c, row, col, accumulate):
    """C[row:row+MR, col:col+NR] (+)= A[m0:m0+MR, p0:p0+D] Bp: a (M, P) uint32, bp (D, NR) uint32 (pairs p0 ..
    p0+D-1 of a strip), c (., .) float32, all C-contiguous; accumulate: add to what C holds (a depth block
    after the first) or overwrite it."""
    arrays_ok = (all(isinstance(t, types.Array) and t.ndim == 2 and t.layout == "C" for t in (a, bp, c))
                 and a.dtype == types.uint32 and bp.dtype == types.uint32 and c.dtype == types.float32)
    if not (arrays_ok and all(isinstance(t, (types.Integer, types.Boolean)) for t in (m0, p0, row, col, accumulate))):
        return None

    def codegen(context, builder, signature, args):
        aa, ba, ca = (context.make_array(signature.args[i])(context, builder, args[i]) for i in (0, 3, 4))
        m0_, p0_, row_, col_ = (context.cast(builder, args[i], signature.args[i], types.int64) for i in (1, 2, 5, 6))
        add = context.cast(builder, args[7], signature.args[7], types.boolean)
        lda, depth = builder.extract_value(aa.shape, 1), builder.extract_value(ba.shape, 0)
        ldc = builder.extract_value(ca.shape, 1)
        a_rows = [builder.gep(aa.data, [builder.add(builder.mul(builder.add(m0_, _const(r)), lda), p0_)])
                  for r in range(MR)]
        c_at = [[builder.add(builder.mul(builder.add(row_, _const(r)), ldc), builder.add(col_, _const(16 * v)))
                 for v in range(VECTORS)] for r in range(MR)]

        # the starting sums: zeros, or C's values (loaded only when accumulating)
        zero = ir.Constant(V16F, [0.0] * 16)
        start = []
        with builder.if_else(add) as (then, otherwise):
            with then:
                loaded = [builder.load(_vector_at(builder, ca.data, c_at[r][v], V16F), align=4)
                          for r in range(MR) for v in range(VECTORS)]
                then_block = builder.block
            with otherwise:
                else_block = builder.block
        for value in loaded:
            phi = builder.phi(V16F)
            phi.add_incoming(value, then_block)
            phi.add_incoming(zero, else_block)
            start.append(phi)

        def pair(p, acc):                                  # acc[r * VECTORS + v] += A[m0 + r, p] Bp[p, 16v:16v+16]
            b = [builder.load(_vector_at(builder, ba.data, builder.add(builder.mul(p, _const(NR)), _const(16 * v)),
                                         V16I), align=4) for v in range(VECTORS)]
            out = list(acc)
            for r in range(MR):
                x = _broadcast(builder, builder.load(builder.gep(a_rows[r], [p]), align=4))
                for v in range(VECTORS):
                    out[r * VECTORS + v] = _dpbf16(builder, acc[r * VECTORS + v], x, b[v])
            return out
        sums = _block_loop(builder, depth, start, pair)
        for r in range(MR):
            for v in range(VECTORS):
                builder.store(sums[r * VECTORS + v], _vector_at(builder, ca.data, c_at[r][v], V16F), align=4)
        return context.get_dummy_value()
    return types.void(a, m0, p0, bp, c, row, col, accumulate), codegen


# --------------------------------------------------------------------------
# Packing: the A rows and B strips as bf16 pairs
# --------------------------------------------------------------------------

@nb.njit(parallel=True, cache=True)
def bf16_pairs(x, rows):
    """x (M, K) float32, C-contiguous -> A (rows, ceil(K/2)) uint32: x rounded to bf16 (nearest even), two per lane
    (x[m, 2p] in the low half), rows >= M padded with zeros, and an odd K's last pair with a zero."""
    M, K = x.shape
    P = (K + 1) // 2
    a = np.zeros((rows, P), dtype=np.uint32)
    for m in nb.prange(M):
        u = x[m].view(np.uint32)
        for p in range(K // 2):
            a[m, p] = np.uint32(round_bf16(u[2 * p])) | (np.uint32(round_bf16(u[2 * p + 1])) << 16)
        if K % 2:
            a[m, P - 1] = np.uint32(round_bf16(u[K - 1]))
    return a


@nb.njit(cache=True)
def _pack(bits, transposed, n0, p0, bp):
    """bp (D, NR) = pairs p0 .. p0+D-1 of columns n0 .. n0+NR-1 of B, zeros past its edge, where
    B (K, N) = bitsᵀ (transposed: the forward x Wᵀ, pairs of neighbours in a row of W) or
    B = bits (the backward dy W, pairs from two rows of W)."""
    D = bp.shape[0]
    if transposed:                                    # B[k, n] = bits[n, k]
        N, K = bits.shape
        if K % 2 == 0 and n0 + NR <= N:               # inside W: its rows read as uint32 pairs, transposed
            pairs = bits.view(np.uint32)              # (N, K/2), a pair's first value in the low half
            for d in range(D):
                for j in range(NR):
                    bp[d, j] = pairs[n0 + j, p0 + d]
            return
        for j in range(NR):
            n = n0 + j
            for d in range(D):
                k = 2 * (p0 + d)
                lo = bits[n, k] if n < N and k < K else 0
                hi = bits[n, k + 1] if n < N and k + 1 < K else 0
                bp[d, j] = np.uint32(lo) | (np.uint32(hi) << 16)
    else:                                             # B[k, n] = bits[k, n]
        K, N = bits.shape
        for d in range(D):
            k = 2 * (p0 + d)
            if k + 1 < K and n0 + NR <= N:            # inside W: two row segments interleaved
                low, high = bits[k, n0:n0 + NR], bits[k + 1, n0:n0 + NR]
                for j in range(NR):
                    bp[d, j] = np.uint32(low[j]) | (np.uint32(high[j]) << 16)
                continue
            for j in range(NR):
                n = n0 + j
                lo = bits[k, n] if n < N and k < K else 0
                hi = bits[k + 1, n] if n < N and k + 1 < K else 0
                bp[d, j] = np.uint32(lo) | (np.uint32(hi) << 16)


# --------------------------------------------------------------------------
# The GEMM: strips of B over the threads, depth blocks, micro-tiles
# --------------------------------------------------------------------------
DEPTH = 256        # pairs per packed block: 256 x 64 x 4 bytes = 64 KiB, streamed from L2 by every micro-tile


@nb.njit(parallel=True, cache=True)
def _gemm(a, M, bits, transposed, out, accumulate):
    """out (M, N) (+)= A B for A = bf16_pairs(x) (M rounded up to MR rows), B as in _pack."""
    N = out.shape[1]
    K = bits.shape[1] if transposed else bits.shape[0]
    P = (K + 1) // 2
    strips = (N + NR - 1) // NR
    blocks = a.shape[0] // MR
    chunks = 1 if strips >= 8 else min(blocks, (8 + strips - 1) // strips)   # a few strips: split M too
    for t in nb.prange(strips * chunks):
        s, ch = t // chunks, t % chunks
        n0 = s * NR
        cols = min(NR, N - n0)
        bp = np.empty((DEPTH, NR), dtype=np.uint32)
        edge = np.zeros((MR, NR), dtype=np.float32)  # a micro-tile past C's edge is summed here
        for p0 in range(0, P, DEPTH):
            depth = min(DEPTH, P - p0)
            block = bp[:depth]
            _pack(bits, transposed, n0, p0, block)
            add = accumulate or p0 > 0
            for b in range(ch * blocks // chunks, (ch + 1) * blocks // chunks):
                m0 = b * MR
                if cols == NR and m0 + MR <= M:
                    _tile(a, m0, p0, block, out, m0, n0, add)
                    continue
                rows = min(MR, M - m0)
                if add:
                    edge[:rows, :cols] = out[m0:m0 + rows, n0:n0 + cols]
                _tile(a, m0, p0, block, edge, 0, 0, add)
                out[m0:m0 + rows, n0:n0 + cols] = edge[:rows, :cols]


def _check(name, x, bits):
    if not (isinstance(bits, np.ndarray) and bits.dtype == np.uint16 and bits.ndim == 2):
        raise TypeError(f"{name}: bits must be (O, I) uint16, got {getattr(bits, 'dtype', type(bits))}")
    if x.dtype != np.float32 or x.ndim != 2:
        raise TypeError(f"{name}: x must be (N, K) float32, got {x.dtype} {x.shape}")


def matmul_nt_bf16(x, bits, bias=None):
    """x (N, I) float32, bits (O, I) bf16 bits, bias (O,) or None -> x Wᵀ + bias (N, O) float32, in bf16
    compute. Only on a CPU where has_bf16_dot() is True."""
    _check("matmul_nt_bf16", x, bits)
    if x.shape[1] != bits.shape[1]:
        raise ValueError(f"matmul_nt_bf16: x {x.shape} and W {bits.shape} do not share I")
    M = x.shape[0]
    y = np.empty((M, bits.shape[0]), dtype=np.float32)
    _gemm(bf16_pairs(np.ascontiguousarray(x), -(-M // MR) * MR), M, np.ascontiguousarray(bits), True, y, False)
    if bias is not None:
        y += bias
    return y


def matmul_nn_bf16(dy, bits, out=None):
    """dy (N, O) float32, bits (O, I) bf16 bits -> dy W (N, I) float32 in bf16 compute, added to `out`
    when given (a row tile's share of dx). Only on a CPU where has_bf16_dot() is True."""
    _check("matmul_nn_bf16", dy, bits)
    if dy.shape[1] != bits.shape[0]:
        raise ValueError(f"matmul_nn_bf16: dy {dy.shape} and W {bits.shape} do not share O")
    M = dy.shape[0]
    accumulate = out is not None
    if out is None:
        out = np.empty((M, bits.shape[1]), dtype=np.float32)
    _gemm(bf16_pairs(np.ascontiguousarray(dy), -(-M // MR) * MR), M, np.ascontiguousarray(bits), False, out, accumulate)
    return out


def gemm_bf16_simple(x, bits, transposed=True):
    """The simple version: x rounded to bf16, both widened, np.matmul in float32 (x Wᵀ or x W)."""
    xr = bf16_to_f32(f32_to_bf16(np.ascontiguousarray(x, dtype=np.float32)))
    w = bf16_to_f32(np.ascontiguousarray(bits))
    return xr @ (w.T if transposed else w)
