"""Matmul kernels and the frozen-weight dispatcher against NumPy references; MatMulFn and LinearFn gradients.

Kernels are compared with float64 NumPy products on odd shapes (N = 1, I not
a multiple of any block size, I larger than one depth block), in float32 and
float64, including NaN and inf. bf16 rounding is checked against two
independent oracles: the nearer of the two neighbouring bf16 values, ties to
the one with an even last bit, and ml_dtypes' own float32 -> bfloat16 cast.
"""

import numpy as np
import pytest
from helpers import assert_close, assert_gradcheck, tol_for

from tinylora import Tensor, gradcheck
from tinylora.formats.safetensors import BFLOAT16
from tinylora.kernels import bf16 as B
from tinylora.kernels import matmul as K
from tinylora.kernels import weights as W
from tinylora.ops.linear import LinearFn, MatMulFn, linear

DTYPES = [np.float32, np.float64]
# (N, O, I): N = 1 (decoding), non-square, I not a multiple of UNROLL or LANES,
# I > DEPTH (several depth blocks with a remainder), O not a multiple of STRIP or ROWS.
SHAPES = [(1, 1, 1), (1, 3, 17), (3, 17, 67), (17, 67, 130), (67, 130, 3), (5, 33, 300), (130, 70, 520)]


# -- references ----------------------------------------------------------------
def assert_product_close(y, a, b, dtype, what, bias=None):
    """y vs the float64 product a @ b (+ bias), errors measured in units of
    sum_k |a_nk b_ko| (+ |bias_o|): the natural scale of a dot product's rounding
    error (float32: a few eps times it), unlike |result|, which cancellation can
    make arbitrarily small."""
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    ref, scale = a64 @ b64, np.abs(a64) @ np.abs(b64)
    if bias is not None:
        ref, scale = ref + bias, scale + np.abs(bias)
    scale = np.maximum(1.0, scale)
    assert_close(y / scale, ref / scale, tol_for(dtype), what)


def ref_widen(bits):
    """bf16 bits -> float32, by NumPy bit shifting"""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def ref_round(x):
    """finite float32 x -> bf16 bits: the nearer neighbour, ties to even (an oracle
    that looks at values, not at the kernel's integer trick)"""
    lo = (x.view(np.uint32) >> 16).astype(np.uint16)        # truncation: |lo| <= |x|
    f_lo = ref_widen(lo).astype(np.float64)
    exponent = (lo.astype(np.int64) >> 7) & 0xFF
    ulp = np.exp2(np.maximum(exponent, 1) - 127 - 7)       # bf16 spacing at lo (subnormals: 2^-133)
    f_hi = f_lo + np.sign(x.astype(np.float64)) * ulp      # the next bf16 away from zero: bits lo + 1
    d_lo, d_hi = np.abs(x - f_lo), np.abs(f_hi - x)
    up = (d_hi < d_lo) | ((d_hi == d_lo) & (lo % 2 == 1))
    return np.where(up, lo + 1, lo).astype(np.uint16)


def data(rng, N, O, I, dtype):
    return (rng.standard_normal((N, I)).astype(dtype), rng.standard_normal((O, I)).astype(dtype),
            rng.standard_normal(O).astype(dtype))


def bf16_weight(rng, O, I) -> W.BF16Weight:
    return W.BF16Weight.from_array(rng.standard_normal((O, I)).astype(np.float32))


# -- float kernels ---------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kernel", [K.gemm_nt, K.gemv_nt], ids=["gemm_nt", "gemv_nt"])
def test_float_kernels_match_reference(kernel, dtype):
    rng = np.random.default_rng(0)
    for N, O, I in SHAPES:
        x, w, b = data(rng, N, O, I, dtype)
        y = kernel(x, w)
        assert y.dtype == dtype
        assert_product_close(y, x, w.T, dtype, f"{kernel.__name__} {N}x{O}x{I}")
        assert_product_close(kernel(x, w, b), x, w.T, dtype, f"{kernel.__name__}+bias {N}x{O}x{I}", bias=b)


@pytest.mark.parametrize("dtype", DTYPES)
def test_dispatcher_float(dtype):
    rng = np.random.default_rng(1)
    for N, O, I in SHAPES:
        x, w, b = data(rng, N, O, I, dtype)
        for weight in (w, W.DenseWeight(w)):                       # a plain array is a DenseWeight view
            assert W.linear_path(weight, N, dtype) == "blas"
            assert_product_close(W.linear(x, weight), x, w.T, dtype, "linear")
            assert_product_close(W.linear(x, weight, b), x, w.T, dtype, "linear+bias", bias=b)
            assert W.linear(x, weight, b).dtype == dtype
            dy = rng.standard_normal((N, O)).astype(dtype)
            assert_product_close(W.linear_dx(dy, weight), dy, w, dtype, "linear_dx")
    ids = np.array([[2, 0], [2, 1]])
    np.testing.assert_array_equal(W.gather(w, ids), w[ids])


# -- bf16 conversions ------------------------------------------------------------
def test_bf16_widening_is_exact_for_every_bit_pattern():
    bits = np.arange(1 << 16, dtype=np.uint16).reshape(256, 256)
    wide = B.bf16_to_f32(bits)
    assert wide.dtype == np.float32 and wide.shape == bits.shape
    np.testing.assert_array_equal(wide.view(np.uint32), ref_widen(bits).view(np.uint32))
    np.testing.assert_array_equal(wide.view(np.uint32), bits.view(BFLOAT16).astype(np.float32).view(np.uint32))


def test_bf16_round_trip():
    bits = np.arange(1 << 16, dtype=np.uint16)
    back = B.f32_to_bf16(B.bf16_to_f32(bits))
    nan = np.isnan(ref_widen(bits))
    np.testing.assert_array_equal(back[~nan], bits[~nan])          # every non-NaN bf16 survives exactly
    assert np.isnan(ref_widen(back[nan])).all()                     # NaN stays NaN


def test_bf16_rounding_to_nearest_even():
    rng = np.random.default_rng(2)
    # Random bit patterns cover every exponent, subnormals and the top of the range.
    x = rng.integers(0, 1 << 32, size=200_000, dtype=np.uint64).astype(np.uint32).view(np.float32)
    x = x[np.isfinite(x)]
    np.testing.assert_array_equal(B.f32_to_bf16(x), ref_round(x))
    np.testing.assert_array_equal(B.f32_to_bf16(x), x.astype(BFLOAT16).view(np.uint16))   # ml_dtypes agrees
    # Exact ties: 1 + 2^-8 lies halfway between 1 (even, 0x3F80) and 1 + 2^-7 (odd, 0x3F81).
    cases = [(1 + 2.0**-8, 0x3F80), (1 + 3 * 2.0**-8, 0x3F82), (-(1 + 2.0**-8), 0xBF80),
             (1 + 2.0**-8 + 2.0**-20, 0x3F81),                # just above the tie rounds up
             (float(np.finfo(np.float32).max), 0x7F80),       # beyond bf16's largest + half an ulp: inf
             (0.0, 0x0000), (-0.0, 0x8000)]
    got = B.f32_to_bf16(np.array([v for v, _ in cases], dtype=np.float32))
    np.testing.assert_array_equal(got, np.array([bits for _, bits in cases], dtype=np.uint16))


def test_bf16_nan_and_inf():
    special = np.array([0x7F800000, 0xFF800000,            # +inf, -inf
                        0x7FC00000, 0xFFC00000,            # quiet NaNs
                        0x7F800001, 0xFF800001],           # NaNs whose payload is only in the dropped bits
                       dtype=np.uint32).view(np.float32)
    out = B.f32_to_bf16(special)
    np.testing.assert_array_equal(out[:2], np.array([0x7F80, 0xFF80], dtype=np.uint16))
    assert np.isnan(ref_widen(out[2:])).all()
    assert list(np.signbit(ref_widen(out[2:]))) == [False, True, False, True]
    assert B.f32_to_bf16(np.zeros((2, 3, 4), np.float32)).shape == (2, 3, 4)


# -- the frozen-weight types -------------------------------------------------------
def test_weight_types_know_shape_bytes_and_rows():
    rng = np.random.default_rng(3)
    a = rng.standard_normal((7, 5)).astype(np.float32)
    dense, half = W.DenseWeight(a), W.BF16Weight.from_array(a)
    for w, nbytes in ((dense, 7 * 5 * 4), (half, 7 * 5 * 2)):
        assert w.shape == (7, 5) and w.size == 35 and w.ndim == 2 and w.nbytes == nbytes
        assert w.dtype == np.float32
    assert (dense.storage, half.storage) == ("float32", "bfloat16")
    np.testing.assert_array_equal(half.to_float(), ref_widen(half.bits))
    np.testing.assert_array_equal(half.rows(2, 5), ref_widen(half.bits)[2:5])
    out = np.full((4, 5), np.nan, np.float32)
    assert half.rows(1, 3, out) is not None and np.array_equal(out[:2], ref_widen(half.bits)[1:3])
    ids = np.array([[6, 0, 6]])
    np.testing.assert_array_equal(half.gather(ids), ref_widen(half.bits)[ids])
    # the base class's row-by-row gather, which a new format gets for free, gives the same rows
    np.testing.assert_array_equal(W.FrozenWeight.gather(half, ids), half.gather(ids))
    np.testing.assert_array_equal(half.to_bf16_bits(), half.bits)
    np.testing.assert_array_equal(dense.to_bf16_bits(), half.bits)
    # a bfloat16 array keeps its bits; a float array is rounded
    np.testing.assert_array_equal(W.BF16Weight.from_array(a.astype(BFLOAT16)).bits, half.bits)
    assert isinstance(W.frozen_weight(a.astype(BFLOAT16)), W.BF16Weight)
    assert isinstance(W.frozen_weight(a), W.DenseWeight)
    assert W.frozen_weight(a.astype(BFLOAT16), np.float64).dtype == np.float64
    with pytest.raises(TypeError):
        W.BF16Weight(a)
    with pytest.raises(TypeError):
        W.DenseWeight(np.zeros((2, 2), np.int32))


@pytest.mark.parametrize("N", [1, 3, W.SMALL_N, W.SMALL_N + 1, 40, W.FEW_N + 1])     # each side of each switch
def test_bf16_products_match_widened_reference(N, monkeypatch):
    monkeypatch.setattr(W, "TILE_BYTES", 1024)        # tiny tiles: several tiles and a partial last one
    rng = np.random.default_rng(3)
    for O, I in [(1, 1), (67, 130), (70, 300)]:
        x = rng.standard_normal((N, I)).astype(np.float32)
        w = bf16_weight(rng, O, I)
        b = rng.standard_normal(O).astype(np.float32)
        wt = ref_widen(w.bits).T                               # the weights the kernels must use, (I, O)
        path = W.linear_path(w, N, np.float32)
        assert path == ("gemv" if N <= W.SMALL_N else "few" if N <= W.FEW_N else "tiles")
        y = W.linear(x, w, b)
        assert y.dtype == np.float32
        assert_product_close(y, x, wt, np.float32, f"linear via {path} N={N} {O}x{I}", bias=b)
        assert_product_close(W.linear(x, w), x, wt, np.float32, "linear no bias")
        # float64 activations with bf16 weights (the gradcheck path): widened in full
        x64 = x.astype(np.float64)
        assert W.linear_path(w, N, np.float64) == "widen-all"
        assert W.linear(x64, w, b).dtype == np.float64
        assert_product_close(W.linear(x64, w, b), x64, wt, np.float64, "linear f64 x", bias=b)
        # the backward product dy @ W
        dy = rng.standard_normal((N, O)).astype(np.float32)
        assert_product_close(W.linear_dx(dy, w), dy, wt.T, np.float32, "linear_dx bf16")
        assert W.linear_dx(dy.astype(np.float64), w).dtype == np.float64
        assert_product_close(W.linear_dx(dy.astype(np.float64), w), dy, wt.T, np.float64, "linear_dx bf16 f64")


# -- NaN and inf propagate through every kernel ------------------------------------
def _every_kernel(x, w):
    """name -> y for all paths that compute x wᵀ (w float of x's dtype)"""
    out = {"gemm_nt": K.gemm_nt(x, w), "gemv_nt": K.gemv_nt(x, w), "linear dense": W.linear(x, w)}
    if x.dtype == np.float32:
        half = W.BF16Weight.from_array(w)
        out["gemv_bf16"] = B.gemv_bf16(x, half.bits)
        out["gemv_bf16 parallel"] = B.gemv_bf16.parallel(x, half.bits)   # both compilations, fast-math
        out["linear bf16 few"] = W.linear(np.repeat(x, 4, axis=0), half)[::4]    # SMALL_N < N <= FEW_N
        out["few_bf16 parallel"] = B.few_bf16.parallel(np.repeat(x, 3, axis=0), half.bits)[::3]
        out["linear bf16 tiles"] = W.linear(np.repeat(x, 30, axis=0), half)[::30]   # N > FEW_N
        out["linear_dx bf16 tiles"] = W.linear_dx(x, W.BF16Weight.from_array(np.ascontiguousarray(w.T)))
    return out


@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_and_inf_propagate(dtype):
    rng = np.random.default_rng(4)
    N, O, I = 3, 37, 300
    x, w, _ = data(rng, N, O, I, dtype)
    w = ref_widen(B.f32_to_bf16(w.astype(np.float32))).astype(dtype)   # bf16 values: all paths agree
    x[1, 5] = np.nan                                            # NaN in row 1 of x
    x[2, 280] = np.inf                                          # inf in row 2, in the last depth block
    w[7, 0] = np.nan                                            # NaN in weight row 7
    for name, y in _every_kernel(x, w).items():
        assert np.isnan(y[1]).all(), f"{name}: a NaN in x row 1 must give NaN in all of output row 1"
        assert np.isnan(y[:, 7]).all(), f"{name}: a NaN in weight row 7 must reach output column 7"
        assert np.isinf(np.delete(y[2], 7)).all(), f"{name}: an inf in x row 2 must give inf in row 2"
        assert np.isfinite(np.delete(y[0], 7)).all(), f"{name}: row 0 must stay finite"
        with np.errstate(invalid="ignore"):                     # inf - inf inside the comparison
            assert_product_close(y, x, w.T, dtype, name)


# -- gradients (float64, SPEC §3.2) -----------------------------------------------------
def _leaf(rng, *shape, requires_grad=True):
    return Tensor(rng.standard_normal(shape), requires_grad=requires_grad)


@pytest.mark.parametrize("a_shape, b_shape", [((3, 4), (4, 5)),                 # 2-D
                                              ((2, 3, 4), (2, 4, 5)),           # batched
                                              ((3, 4), (2, 4, 5)),              # a broadcast over the batch
                                              ((2, 1, 3, 4), (3, 4, 2))])       # both broadcast
def test_matmul_gradcheck(a_shape, b_shape):
    rng = np.random.default_rng(5)
    a, b = _leaf(rng, *a_shape), _leaf(rng, *b_shape)
    assert_gradcheck(gradcheck(lambda a, b: MatMulFn.apply(a, b), [a, b], names=["a", "b"]), "MatMul")


@pytest.mark.parametrize("x_shape", [(2, 3, 5), (1, 1, 5)])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_gradcheck(x_shape, bias):
    rng = np.random.default_rng(6)
    x, w, b = _leaf(rng, *x_shape), _leaf(rng, 4, 5), _leaf(rng, 4)
    if bias:
        result = gradcheck(lambda x, w, b: linear(x, w, b), [x, w, b], names=["x", "w", "b"])
    else:
        result = gradcheck(lambda x, w: LinearFn.apply(x, w), [x, w], names=["x", "w"])
    assert_gradcheck(result, "Linear")


def test_linear_gradcheck_with_frozen_bf16_weight():
    rng = np.random.default_rng(7)
    x, b = _leaf(rng, 2, 3, 6), _leaf(rng, 5)
    w = Tensor(bf16_weight(rng, 5, 6))                        # a frozen bf16 weight
    assert_gradcheck(gradcheck(lambda x, b: linear(x, w, b), [x, b], names=["x", "b"]), "Linear bf16")


def test_linear_bf16_float32_backward():
    rng = np.random.default_rng(8)
    x = Tensor(rng.standard_normal((2, 9, 6)).astype(np.float32), requires_grad=True)   # N = 18 > SMALL_N
    w = bf16_weight(rng, 5, 6)
    y = linear(x, Tensor(w))
    assert_product_close(y.data.reshape(18, 5), x.data.reshape(18, 6), ref_widen(w.bits).T, np.float32, "y")
    dy = rng.standard_normal(y.shape).astype(np.float32)
    y.backward(dy)
    assert x.grad.dtype == np.float32
    assert_product_close(x.grad.reshape(18, 6), dy.reshape(18, 5), ref_widen(w.bits), np.float32, "dx")


def test_frozen_weight_cannot_require_grad():
    rng = np.random.default_rng(9)
    with pytest.raises(TypeError, match="cannot require grad"):
        Tensor(bf16_weight(rng, 5, 6), requires_grad=True)
    with pytest.raises(TypeError, match="frozen weight goes through LinearFn"):
        Tensor(rng.standard_normal((2, 5))) @ Tensor(bf16_weight(rng, 5, 6))


# -- a frozen weight costs only dx ------------------------------------------------------------
def _record_products(monkeypatch):
    """Wrap np.matmul, which every product ends in (the dispatcher's BLAS calls and LinearFn's dW);
    return the list of result shapes formed."""
    shapes = []
    original = np.matmul

    def counting(*args, **kwargs):
        y = original(*args, **kwargs)
        shapes.append(y.shape)
        return y
    monkeypatch.setattr(np, "matmul", counting)
    return shapes


@pytest.mark.parametrize("w_trainable", [False, True])
def test_frozen_weight_never_computes_dw(w_trainable, monkeypatch):
    rng = np.random.default_rng(10)
    x, b = _leaf(rng, 2, 3, 5), _leaf(rng, 4)
    w = _leaf(rng, 4, 5, requires_grad=w_trainable)           # (out, in) = (4, 5), never a dx or y shape
    shapes = _record_products(monkeypatch)
    linear(x, w, b).backward(rng.standard_normal((2, 3, 4)))
    assert x.grad is not None and b.grad is not None
    if w_trainable:
        assert (4, 5) in shapes and w.grad.shape == (4, 5)    # the recorder does see a dW product
    else:
        assert w.grad is None
        assert (4, 5) not in shapes, f"a frozen weight formed a dW-shaped product: {shapes}"
        assert shapes == [(6, 4), (6, 5)]                     # forward y and dx, nothing else


def test_frozen_input_computes_no_dx(monkeypatch):
    rng = np.random.default_rng(11)
    x, w = _leaf(rng, 6, 5, requires_grad=False), _leaf(rng, 4, 5)
    shapes = _record_products(monkeypatch)
    linear(x, w).backward(rng.standard_normal((6, 4)))
    assert x.grad is None and shapes == [(6, 4), (4, 5)]


def test_tensor_matmul_operator():
    rng = np.random.default_rng(12)
    a, b = _leaf(rng, 2, 3, 4), _leaf(rng, 4, 5)
    y = a @ b
    assert isinstance(y, Tensor) and y.shape == (2, 3, 5)
    assert_close(y.data, a.data @ b.data, 1e-12, "a @ b")
    dy = rng.standard_normal(y.shape)
    y.backward(dy)
    assert_close(a.grad, dy @ b.data.T, 1e-12, "da")
    assert_close(b.grad, np.einsum("bmk,bmn->kn", a.data, dy), 1e-12, "db")
    with pytest.raises(ValueError, match="at least 2 axes"):
        Tensor(np.ones(3)) @ Tensor(np.ones((3, 2)))
