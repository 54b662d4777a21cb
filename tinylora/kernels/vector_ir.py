"""Row dot products written as LLVM vector IR: what Numba's loop vectoriser does not find by itself.

A decoding GEMV (kernels/ggml_gemv.py) sums, for each row of blocks, every
block's scale d_b times that block's dot product with x:

    y_o = Σ_b d_b Σ_j x_{32b+j} q_{b,j}

Written as Numba loops, LLVM vectorises each block's inner sum and then
reduces it to one float (a horizontal add of 8 lanes, ~6 instructions)
before multiplying by d_b: per 32-weight block that reduction and the loop
around it cost as much as the products. Here the whole row is one loop in
LLVM IR that keeps 8 lanes throughout, as llama.cpp's AVX2 kernels do:

    t   = x[0:8] q[0:8] + x[8:16] q[8:16] + ...    (8 lanes, fused multiply-adds)
    acc = acc + d_b t                               (8 lanes: d_b broadcast)
    y_o = the 8 lanes of acc, summed once, in a fixed order

The IR uses only LLVM's target-independent vector operations (`<8 x float>`,
`sitofp`, `llvm.fma`), which LLVM lowers to AVX2 or AVX-512 registers on x86
and to NEON on ARM: nothing to detect, nothing to fall back from. It
replaced a Numba loop over blocks (a float32 t += x_j · q_j over the 32
codes, then s += d · t), measured here at 113 -> 54 us for a 1536 x 576
Q8_0 GEMV on one core with the weights in cache. The simple version tests
hold it to is still `gemv_widened` (widen the row, then dot it). NaN and
inf scales propagate (no fast-math flag assumes them away).
"""

from llvmlite import ir
from numba.core import types
from numba.extending import intrinsic

F32, I8, I16, I32, I64 = ir.FloatType(), ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64)
LANES = 8
V8F = ir.VectorType(F32, LANES)
V8I8 = ir.VectorType(I8, LANES)
V8I32 = ir.VectorType(I32, LANES)


def _const(n: int) -> ir.Constant:
    return ir.Constant(I64, n)


def _fma(builder, a, b, c):
    """a * b + c, lane by lane, rounded once (llvm.fma: vfmadd on x86 with FMA)."""
    name = "llvm.fma.v8f32"
    fn = builder.module.globals.get(name) or ir.Function(builder.module, ir.FunctionType(V8F, [V8F] * 3), name=name)
    return builder.call(fn, [a, b, c])


def _splat(builder, value, vector=V8F):
    """A float (or an int32, with vector=V8I32) -> a vector of 8 copies of it."""
    v = builder.insert_element(ir.Constant(vector, ir.Undefined), value, ir.Constant(I32, 0))
    return builder.shuffle_vector(v, ir.Constant(vector, ir.Undefined), ir.Constant(V8I32, [0] * LANES))


def _lane_sum(builder, v):
    """The 8 lanes summed as ((l0 + l4) + (l2 + l6)) + ((l1 + l5) + (l3 + l7)): one fixed order."""
    lanes = [builder.extract_element(v, ir.Constant(I32, i)) for i in range(LANES)]
    s = [builder.fadd(lanes[i], lanes[i + 4]) for i in range(4)]
    return builder.fadd(builder.fadd(s[0], s[2]), builder.fadd(s[1], s[3]))


def _row_arguments_ok(floats, blocks, r) -> bool:
    """Typing: every float array a C-contiguous float32 vector, blocks a C-contiguous (O, row bytes) uint8
    array, r an integer; otherwise the intrinsic does not apply (Numba reports the types it got)."""
    return (all(isinstance(a, types.Array) and a.dtype == types.float32 and a.ndim == 1 and a.layout == "C"
                for a in floats)
            and isinstance(blocks, types.Array) and blocks.dtype == types.uint8 and blocks.ndim == 2
            and blocks.layout == "C" and isinstance(r, types.Integer))


def _block_loop(builder, n_blocks, zeros, body):
    """for b in range(n_blocks): values = body(b, values), in IR; values start at `zeros` (constants)
    and the final ones are returned (the zeros themselves when n_blocks is 0). body emits the block's
    instructions at the builder's position and returns the new values."""
    entry = builder.block
    loop, done = builder.append_basic_block("block"), builder.append_basic_block("done")
    builder.cbranch(builder.icmp_signed(">", n_blocks, _const(0)), loop, done)
    builder.position_at_end(loop)
    b = builder.phi(I64)
    values = [builder.phi(z.type) for z in zeros]
    b.add_incoming(_const(0), entry)
    for v, z in zip(values, zeros):
        v.add_incoming(z, entry)
    new = body(b, values)
    b_next = builder.add(b, _const(1))
    end = builder.block
    b.add_incoming(b_next, end)
    for v, n in zip(values, new):
        v.add_incoming(n, end)
    builder.cbranch(builder.icmp_signed("<", b_next, n_blocks), loop, done)
    builder.position_at_end(done)
    finals = []
    for z, n in zip(zeros, new):
        f = builder.phi(z.type)
        f.add_incoming(z, entry)
        f.add_incoming(n, end)
        finals.append(f)
    return finals


ZERO_V8F = ir.Constant(V8F, [0.0] * LANES)


# The 32-weight block types by kernels/ggml.py's kind number: (bytes, offset of the min m or None,
# offset of the 5th bits qh or None, offset of the codes, what is subtracted from each code).
LAYOUTS = {0: (34, None, None, 2, 0),      # Q8_0: d, 32 int8 codes
           1: (18, None, None, 2, 8),      # Q4_0: d, 16 bytes of two 4-bit codes
           2: (20, 2, None, 4, 0),         # Q4_1: d, m, 16 bytes of two 4-bit codes
           3: (22, None, 2, 6, 16),        # Q5_0: d, qh, 16 bytes of low 4 bits
           4: (24, 2, 4, 8, 0)}            # Q5_1: d, m, qh, 16 bytes of low 4 bits


def _ivec(values) -> ir.Constant:
    return ir.Constant(V8I32, list(values))


def _load(builder, p, offset: int, typ, align: int = 1):
    return builder.load(builder.bitcast(builder.gep(p, [_const(offset)]), typ.as_pointer()), align=align)


def _block_codes(builder, kind: int, p):
    """The 32 codes of the block at byte p, minus the type's offset, as 4 vectors of 8 int32:
    weights 0-7, 8-15, 16-23, 24-31 (kernels/ggml.py's layouts)."""
    size, _, qh_at, qs_at, minus = LAYOUTS[kind]
    if kind == 0:
        return [builder.sext(_load(builder, p, qs_at + LANES * g, V8I8), V8I32) for g in range(4)]
    nibbles = [builder.zext(_load(builder, p, qs_at + LANES * g, V8I8), V8I32) for g in range(2)]
    codes = [builder.and_(v, _ivec([15] * LANES)) for v in nibbles]             # weights j: low nibbles
    codes += [builder.lshr(v, _ivec([4] * LANES)) for v in nibbles]             # weights j + 16: high ones
    if qh_at is not None:                                                       # bit j of qh: weight j's 5th
        qh = _splat(builder, _load(builder, p, qh_at, I32), V8I32)
        for g in range(4):
            bit = builder.and_(builder.lshr(qh, _ivec(range(LANES * g, LANES * g + LANES))), _ivec([1] * LANES))
            codes[g] = builder.or_(codes[g], builder.shl(bit, _ivec([4] * LANES)))
    if minus:
        codes = [builder.sub(c, _ivec([minus] * LANES)) for c in codes]
    return codes


def _row_dot(kind: int):
    """The intrinsic for one 32-weight block type: (x (I,) float32, xs (I/32,) float32 block sums of x,
    blocks (O, row bytes) uint8, row r, half (65536,) float32) -> float32

        Σ_b d_b Σ_j x_{32b+j} q_{b,j}  (+ Σ_b m_b xs_b for the types with a min)

    every array C-contiguous, I a multiple of 32."""
    size, min_at, _, _, _ = LAYOUTS[kind]

    def row_dot(typingctx, x, xs, blocks, r, half):
        if not _row_arguments_ok((x, xs, half), blocks, r):
            return None

        def codegen(context, builder, signature, args):
            xa, sa, ba, _, ha = (context.make_array(t)(context, builder, a) if isinstance(t, types.Array) else None
                                 for t, a in zip(signature.args, args))
            r64 = context.cast(builder, args[3], signature.args[3], types.int64)
            n_blocks = builder.udiv(builder.extract_value(xa.shape, 0), _const(32))
            row = builder.gep(ba.data, [builder.mul(r64, builder.extract_value(ba.shape, 1))])

            def block(b, values):                                  # one block b: acc + d t, (m Σ_j x_j)
                acc, acc_min = values
                p = builder.gep(row, [builder.mul(b, _const(size))])   # the block's first byte

                def half_at(offset):                               # the float16 at p + offset, widened
                    bits = _load(builder, p, offset, I16)
                    return builder.load(builder.gep(ha.data, [builder.zext(bits, I64)]))
                x0 = builder.gep(xa.data, [builder.mul(b, _const(32))])
                t = None
                for g, code in enumerate(_block_codes(builder, kind, p)):
                    xv = _load(builder, x0, LANES * g, V8F, align=4)
                    qf = builder.sitofp(code, V8F)                 # small integers: exact in float32
                    t = builder.fmul(xv, qf) if t is None else _fma(builder, xv, qf, t)
                acc = _fma(builder, _splat(builder, half_at(0)), t, acc)
                if min_at is not None:
                    xs_b = builder.load(builder.gep(sa.data, [b]))
                    acc_min = builder.fadd(acc_min, builder.fmul(half_at(min_at), xs_b))
                return acc, acc_min
            total, total_min = _block_loop(builder, n_blocks, (ZERO_V8F, ir.Constant(F32, 0.0)), block)
            s = _lane_sum(builder, total)
            return s if min_at is None else builder.fadd(s, total_min)
        return types.float32(x, xs, blocks, r, half), codegen
    row_dot.__name__ = f"row_dot_kind{kind}"
    return intrinsic(row_dot)


q8_0_row_dot, q4_0_row_dot, q4_1_row_dot, q5_0_row_dot, q5_1_row_dot = (_row_dot(k) for k in range(5))


# The 256-weight super-block types: (bytes, offset of the 4-bit codes, offset of the extra high bits or None,
# weights per scale). Their scales (6-bit packed, or int8 times d) are unpacked by the Numba caller into
# one float32 per sub-block, so the loop here only meets codes, x and those scales.
K_LAYOUTS = {5: (144, 16, None, 32),       # Q4_K: d, dmin, 12 scale bytes, 128 bytes of codes
             6: (176, 48, 16, 32),         # Q5_K: ..., 32 bytes of 5th bits, 128 bytes of codes
             7: (210, 0, 128, 16)}         # Q6_K: 128 bytes of low 4 bits, 64 of high 2 bits, scales, d


def _k_codes(builder, kind: int, p):
    """The 256 codes of the super-block at byte p as (first weight, 8 int32 lanes) pairs, offsets removed.

    Q4_K / Q5_K: weight 64c + l is the low nibble of qs[32c + l], weight 64c + 32 + l its high nibble,
    5th bits (Q5_K) bits 2c and 2c + 1 of qh[l]. Q6_K: in half h, weight 128h + 32k + l takes the low
    (k < 2) or high nibble of ql[64h + 32 (k % 2) + l] and bits 2k, 2k + 1 of qh[32h + l], minus 32."""
    _, qs_at, qh_at, _ = K_LAYOUTS[kind]
    out = []
    for g in range(32 // LANES):
        if kind in (5, 6):
            qh = None if qh_at is None else builder.zext(_load(builder, p, qh_at + LANES * g, V8I8), V8I32)

            def fifth(bit):                                        # bit `bit` of qh, as 16 (or 0)
                return builder.shl(builder.and_(builder.lshr(qh, _ivec([bit] * LANES)), _ivec([1] * LANES)),
                                   _ivec([4] * LANES))
            for c in range(4):
                q = builder.zext(_load(builder, p, qs_at + 32 * c + LANES * g, V8I8), V8I32)
                lo, hi = builder.and_(q, _ivec([15] * LANES)), builder.lshr(q, _ivec([4] * LANES))
                if qh is not None:
                    lo, hi = builder.or_(lo, fifth(2 * c)), builder.or_(hi, fifth(2 * c + 1))
                out += [(64 * c + LANES * g, lo), (64 * c + 32 + LANES * g, hi)]
        else:
            for h in range(2):
                qh = builder.zext(_load(builder, p, qh_at + 32 * h + LANES * g, V8I8), V8I32)
                for k in range(4):
                    ql = builder.zext(_load(builder, p, 64 * h + 32 * (k % 2) + LANES * g, V8I8), V8I32)
                    low = builder.and_(ql, _ivec([15] * LANES)) if k < 2 else builder.lshr(ql, _ivec([4] * LANES))
                    high = builder.and_(builder.lshr(qh, _ivec([2 * k] * LANES)), _ivec([3] * LANES))
                    code = builder.sub(builder.or_(low, builder.shl(high, _ivec([4] * LANES))), _ivec([32] * LANES))
                    out.append((128 * h + 32 * k + LANES * g, code))
    return out


def _k_row_dot(kind: int):
    """The intrinsic for one super-block type: (x (I,) float32, scales (I / weights per scale,) float32,
    blocks (O, row bytes) uint8, row r) -> Σ_i scales_i Σ_{j in sub-block i} x_j q_j as float32;
    every array C-contiguous, I a multiple of 256."""
    size, _, _, per_scale = K_LAYOUTS[kind]

    def row_dot(typingctx, x, scales, blocks, r):
        if not _row_arguments_ok((x, scales), blocks, r):
            return None

        def codegen(context, builder, signature, args):
            xa, sa, ba = (context.make_array(t)(context, builder, a) for t, a in zip(signature.args[:3], args[:3]))
            r64 = context.cast(builder, args[3], signature.args[3], types.int64)
            n_blocks = builder.udiv(builder.extract_value(xa.shape, 0), _const(256))
            row = builder.gep(ba.data, [builder.mul(r64, builder.extract_value(ba.shape, 1))])

            def superblock(b, values):                             # one super-block b: acc + Σ_i scale_i t_i
                acc, = values
                p = builder.gep(row, [builder.mul(b, _const(size))])
                x0 = builder.gep(xa.data, [builder.mul(b, _const(256))])
                s0 = builder.gep(sa.data, [builder.mul(b, _const(256 // per_scale))])
                t = {}                                             # sub-block -> its 8-lane sum
                for first, code in _k_codes(builder, kind, p):
                    xv = _load(builder, x0, first, V8F, align=4)
                    qf = builder.sitofp(code, V8F)
                    i = first // per_scale
                    t[i] = builder.fmul(xv, qf) if i not in t else _fma(builder, xv, qf, t[i])
                for i in sorted(t):
                    scale = builder.load(builder.gep(s0, [_const(i)]))
                    acc = _fma(builder, _splat(builder, scale), t[i], acc)
                return (acc,)
            total, = _block_loop(builder, n_blocks, (ZERO_V8F,), superblock)
            return _lane_sum(builder, total)
        return types.float32(x, scales, blocks, r), codegen
    row_dot.__name__ = f"k_row_dot_kind{kind}"
    return intrinsic(row_dot)


q4_k_row_dot, q5_k_row_dot, q6_k_row_dot = (_k_row_dot(k) for k in (5, 6, 7))


# --------------------------------------------------------------------------
# Widening a row of blocks into float32 (for the products that multiply many rows of x, kernels/weights.py)
# --------------------------------------------------------------------------
# The same codes, each times its scale (plus its min), stored 8 lanes at a time: as a Numba loop the
# 2-d byte indexing (a negative-index check per load) kept LLVM from vectorising it, and a 576 x 1536
# Q8_0 widened at ~2.5 G weights/s, Q6_K at ~0.3. The arithmetic is kernels/ggml.py's `_widen_row_simple`,
# one rounding per operation (d q, then + m), so the result is bit for bit the same.

def _store(builder, p, offset, value):
    builder.store(value, builder.bitcast(builder.gep(p, [_const(offset)]), V8F.as_pointer()), align=4)


def _widen(kind: int):
    """The intrinsic for one 32-weight block type: (blocks (O, row bytes) uint8, row r, half (65536,)
    float32, out (I,) float32) -> None; out[32b + j] = d_b q_{b,j} (+ m_b), every array C-contiguous."""
    size, min_at, _, _, _ = LAYOUTS[kind]

    def widen(typingctx, blocks, r, half, out):
        if not _row_arguments_ok((half, out), blocks, r):
            return None

        def codegen(context, builder, signature, args):
            ba, ha, oa = (context.make_array(signature.args[i])(context, builder, args[i]) for i in (0, 2, 3))
            r64 = context.cast(builder, args[1], signature.args[1], types.int64)
            n_blocks = builder.udiv(builder.extract_value(oa.shape, 0), _const(32))
            row = builder.gep(ba.data, [builder.mul(r64, builder.extract_value(ba.shape, 1))])

            def block(b, values):
                p = builder.gep(row, [builder.mul(b, _const(size))])
                o = builder.gep(oa.data, [builder.mul(b, _const(32))])

                def half_at(offset):
                    bits = _load(builder, p, offset, I16)
                    return _splat(builder, builder.load(builder.gep(ha.data, [builder.zext(bits, I64)])))
                d = half_at(0)
                m = None if min_at is None else half_at(min_at)
                for g, code in enumerate(_block_codes(builder, kind, p)):
                    w = builder.fmul(d, builder.sitofp(code, V8F))
                    _store(builder, o, LANES * g, w if m is None else builder.fadd(w, m))
                return values
            _block_loop(builder, n_blocks, (), block)
            return context.get_dummy_value()
        return types.void(blocks, r, half, out), codegen
    widen.__name__ = f"widen_kind{kind}"
    return intrinsic(widen)


q8_0_widen, q4_0_widen, q4_1_widen, q5_0_widen, q5_1_widen = (_widen(k) for k in range(5))


def _k_widen(kind: int):
    """The intrinsic for one super-block type: (scales, minima (I / weights per scale,) float32, blocks,
    row r, out (I,) float32) -> None; out[j] = scales_i q_j (- minima_i; Q6_K has none), j in sub-block i."""
    size, _, _, per_scale = K_LAYOUTS[kind]

    def widen(typingctx, scales, minima, blocks, r, out):
        if not _row_arguments_ok((scales, minima, out), blocks, r):
            return None

        def codegen(context, builder, signature, args):
            sa, ma, ba, _, oa = (context.make_array(t)(context, builder, a) if isinstance(t, types.Array) else None
                                 for t, a in zip(signature.args, args))
            r64 = context.cast(builder, args[3], signature.args[3], types.int64)
            n_blocks = builder.udiv(builder.extract_value(oa.shape, 0), _const(256))
            row = builder.gep(ba.data, [builder.mul(r64, builder.extract_value(ba.shape, 1))])

            def superblock(b, values):
                p = builder.gep(row, [builder.mul(b, _const(size))])
                o = builder.gep(oa.data, [builder.mul(b, _const(256))])
                first_scale = builder.mul(b, _const(256 // per_scale))

                def at(array, i):                                  # array[first_scale + i], 8 copies
                    return _splat(builder, builder.load(builder.gep(array.data, [builder.add(first_scale, _const(i))])))
                for first, code in _k_codes(builder, kind, p):
                    i = first // per_scale
                    w = builder.fmul(at(sa, i), builder.sitofp(code, V8F))
                    _store(builder, o, first, w if kind == 7 else builder.fsub(w, at(ma, i)))
                return values
            _block_loop(builder, n_blocks, (), superblock)
            return context.get_dummy_value()
        return types.void(scales, minima, blocks, r, out), codegen
    widen.__name__ = f"k_widen_kind{kind}"
    return intrinsic(widen)


q4_k_widen, q5_k_widen, q6_k_widen = (_k_widen(k) for k in (5, 6, 7))
