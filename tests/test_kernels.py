"""RMSNorm, RoPE, SwiGLU and cross-entropy kernels against vectorised NumPy references.

Each reference is written independently of the kernel (whole-array NumPy, in
float64), so a kernel bug cannot hide in shared code. Both float32 and float64
inputs are checked; NaN and inf must propagate (no fast-math shortcut may turn
them into finite numbers). The matmul and attention kernels have their own files.
"""

import numpy as np
import pytest
from helpers import assert_close, tol_for

from tinylora.kernels import cross_entropy as ce
from tinylora.kernels import rmsnorm, rope, swiglu
from tinylora.ops.rope import rope_inv_freq, rope_tables

DTYPES = [np.float32, np.float64]


# ---- vectorised references (float64) -----------------------------------------------------------
def ref_rmsnorm(x, w, eps):
    rstd = 1.0 / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)
    return x * rstd * w, rstd[:, 0]


def ref_rmsnorm_backward(dy, x, w, eps):
    rstd = 1.0 / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)
    xhat, g = x * rstd, dy * w
    return rstd * (g - xhat * np.mean(g * xhat, axis=-1, keepdims=True)), np.sum(dy * xhat, axis=0)


def ref_rope(x, cos, sin):
    half = x.shape[-1] // 2
    rotate_half = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)     # Hugging Face's rotate_half
    cos2 = np.concatenate([cos, cos], axis=-1)[:, :, None, :]                  # (B, T, 1, D)
    sin2 = np.concatenate([sin, sin], axis=-1)[:, :, None, :]
    return x * cos2 + rotate_half * sin2


def ref_swiglu(g, u, dy):
    s = 1.0 / (1.0 + np.exp(-g))
    return g * s * u, dy * u * (s + g * s * (1 - s)), dy * g * s


def ref_cross_entropy(z, labels, ignore):
    m = z.max(axis=1, keepdims=True)
    lse = (m + np.log(np.exp(z - m).sum(axis=1, keepdims=True)))[:, 0]
    keep = labels != ignore
    safe = np.where(keep, labels, 0)
    loss = np.where(keep, lse - z[np.arange(len(z)), safe], 0.0)
    p = np.exp(z - lse[:, None])
    p[np.arange(len(z)), safe] -= 1.0
    return loss, np.where(keep[:, None], p, 0.0)


# ---- kernels vs references ---------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,C", [(1, 1), (3, 7), (17, 64), (5, 576)])
def test_rmsnorm(dtype, N, C):
    rng = np.random.default_rng(N * C)
    x, w, dy = (rng.standard_normal(s).astype(dtype) for s in [(N, C), (C,), (N, C)])
    x64, w64, dy64 = (a.astype(np.float64) for a in (x, w, dy))
    y, rstd = rmsnorm.rmsnorm_forward(x, w, 1e-6)
    y_ref, rstd_ref = ref_rmsnorm(x64, w64, 1e-6)
    assert y.dtype == dtype
    assert_close(y, y_ref, tol_for(dtype), "rmsnorm y")
    assert_close(rstd, rstd_ref, tol_for(dtype), "rmsnorm rstd")
    dx_ref, dw_ref = ref_rmsnorm_backward(dy64, x64, w64, 1e-6)
    assert_close(rmsnorm.rmsnorm_backward(dy, x, w, rstd), dx_ref, tol_for(dtype), "rmsnorm dx")
    assert_close(rmsnorm.rmsnorm_backward_weight(dy, x, rstd), dw_ref, tol_for(dtype) * N, "rmsnorm dw")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,T,H,D", [(1, 1, 1, 2), (2, 3, 4, 6), (1, 5, 3, 64)])
def test_rope(dtype, B, T, H, D):
    rng = np.random.default_rng(B * T * H * D)
    x, dy = rng.standard_normal((B, T, H, D)).astype(dtype), rng.standard_normal((B, T, H, D)).astype(dtype)
    angles = rng.uniform(-10, 10, (B, T, D // 2))
    cos, sin = np.cos(angles).astype(dtype), np.sin(angles).astype(dtype)
    y = rope.rope_forward(x, cos, sin)
    assert y.dtype == dtype
    assert_close(y, ref_rope(x.astype(np.float64), cos.astype(np.float64), sin.astype(np.float64)),
                 tol_for(dtype), "rope y")
    # The backward is the transpose of the forward's linear map: <dy, R x> == <R^T dy, x>.
    dx = rope.rope_backward(dy, cos, sin)
    lhs = np.sum(dy.astype(np.float64) * y.astype(np.float64))
    rhs = np.sum(dx.astype(np.float64) * x.astype(np.float64))
    assert_close(lhs, rhs, tol_for(dtype) * x.size, "rope adjoint identity")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,F", [(1, 1), (3, 7), (9, 1536)])
def test_swiglu(dtype, N, F):
    rng = np.random.default_rng(N + F)
    g, u, dy = (rng.standard_normal((N, F)).astype(dtype) * 3 for _ in range(3))
    y_ref, dg_ref, du_ref = ref_swiglu(*(a.astype(np.float64) for a in (g, u, dy)))
    y = swiglu.swiglu_forward(g, u)
    dg, du = swiglu.swiglu_backward(dy, g, u)
    assert y.dtype == dg.dtype == du.dtype == dtype
    assert_close(y, y_ref, tol_for(dtype), "swiglu y")
    assert_close(dg, dg_ref, tol_for(dtype), "swiglu dg")
    assert_close(du, du_ref, tol_for(dtype), "swiglu du")


def test_swiglu_saturated_gate_is_finite():
    g = np.array([[-1000.0, 1000.0, -80.0, 80.0]], dtype=np.float32)
    u = np.ones_like(g)
    y = swiglu.swiglu_forward(g, u)
    dg, du = swiglu.swiglu_backward(np.ones_like(g), g, u)
    assert np.all(np.isfinite(y)) and np.all(np.isfinite(dg)) and np.all(np.isfinite(du))
    assert_close(y, [[0.0, 1000.0, 0.0, 80.0]], 1e-6, "silu at the extremes")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,V", [(1, 2), (7, 11), (6, 5000)])
def test_cross_entropy(dtype, N, V):
    rng = np.random.default_rng(N * V)
    z = (rng.standard_normal((N, V)) * 4).astype(dtype)
    labels = rng.integers(0, V, N)
    labels[::3] = -100
    loss_ref, dz_ref = ref_cross_entropy(z.astype(np.float64), labels, -100)
    z0 = z.copy()
    loss, lse = ce.cross_entropy_rows(z, labels, -100, False)
    np.testing.assert_array_equal(z, z0)                      # without grad the logits are only read
    assert_close(loss, loss_ref, tol_for(dtype), "cross-entropy loss")
    loss2, lse2 = ce.cross_entropy_rows(z, labels, -100, True)  # with grad: z becomes dz in place
    np.testing.assert_array_equal(loss2, loss)
    np.testing.assert_array_equal(lse2, lse)
    assert z.dtype == dtype
    assert_close(z, dz_ref, tol_for(dtype), "cross-entropy dlogits")
    assert np.all(z[labels == -100] == 0) and np.all(loss[labels == -100] == 0)


def test_cross_entropy_large_logits_do_not_overflow():
    z = np.array([[1000.0, 0.0, -1000.0]], dtype=np.float32)
    loss, _ = ce.cross_entropy_rows(z, np.array([1]), -100, True)
    assert_close(loss, [1000.0], 1e-6, "loss of a confident wrong answer")
    assert_close(z, [[1.0, -1.0, 0.0]], 1e-6, "its gradient")


# ---- NaN and inf propagate through every kernel -------------------------------------------------
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("dtype", DTYPES)
def test_nonfinite_inputs_propagate(bad, dtype):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 8)).astype(dtype)
    x[1, 2] = bad
    w = np.ones(8, dtype=dtype)

    y, rstd = rmsnorm.rmsnorm_forward(x, w, 1e-6)
    assert not np.all(np.isfinite(y[1])) and np.all(np.isfinite(y[[0, 2]]))
    dx = rmsnorm.rmsnorm_backward(np.ones_like(x), x, w, rstd)
    assert not np.all(np.isfinite(dx[1]))

    y = swiglu.swiglu_forward(x, np.ones_like(x))
    assert not np.isfinite(y[1, 2]) or bad == -np.inf          # silu(-inf) * 1 = -inf * 0 = NaN, checked below
    if bad == -np.inf:
        assert np.isnan(y[1, 2])
    dg, du = swiglu.swiglu_backward(np.ones_like(x), x, np.ones_like(x))
    assert not (np.isfinite(dg[1, 2]) and np.isfinite(du[1, 2]))

    x4 = x.reshape(1, 3, 1, 8)
    cos, sin = np.ones((1, 3, 4), dtype), np.zeros((1, 3, 4), dtype)
    assert not np.all(np.isfinite(rope.rope_forward(x4, cos, sin)[0, 1]))
    assert not np.all(np.isfinite(rope.rope_backward(x4, cos, sin)[0, 1]))

    labels = np.array([0, 2, 0])                              # row 1 targets the bad logit
    dz = x.copy()
    loss, lse = ce.cross_entropy_rows(dz, labels, -100, True)
    assert not np.isfinite(loss[1]) and np.all(np.isfinite(loss[[0, 2]]))
    assert np.all(np.isfinite(dz[[0, 2]]))
    if bad != -np.inf:                                        # -inf target: loss inf, softmax row still finite
        assert not np.all(np.isfinite(dz[1]))


def test_cross_entropy_minus_inf_logit_is_a_mask():
    # -inf on a non-target class means "impossible": it gets probability 0, the loss stays finite.
    z = np.array([[0.0, -np.inf, 0.0]])
    loss, lse = ce.cross_entropy_rows(z, np.array([0]), -100, True)
    assert_close(loss, [np.log(2.0)], 1e-12, "loss with a masked logit")
    assert_close(z, [[-0.5, 0.0, 0.5]], 1e-12, "dz")


# ---- serial and parallel compilations agree ---------------------------------------------------
def _sized_kernel_calls(rng):
    """(name, kernel, args) for every kernel compiled twice by parallel_when_large, on inputs big
    enough for several threads' worth of rows, with ignored rows and masks where they apply."""
    from tinylora.kernels import attention as att
    from tinylora.kernels import bf16 as mm
    x = rng.standard_normal((37, 64)).astype(np.float32)
    w = rng.standard_normal(64).astype(np.float32)
    _, rstd = rmsnorm.rmsnorm_forward(x, w, 1e-6)
    x4 = rng.standard_normal((2, 5, 3, 8))
    cos, sin = (np.ascontiguousarray(np.broadcast_to(a, (2, 5, 4)))     # (B, T, D/2), as the op passes them
                for a in rope_tables(np.arange(5), rope_inv_freq(8, 10000.0), np.float64))
    s = rng.standard_normal((2, 3, 12, 9))
    mask = np.ones((2, 9), dtype=np.bool_)
    mask[1, -2:] = False
    lse = rng.standard_normal((2, 3, 12))
    labels = rng.integers(0, 64, 37)
    labels[::4] = -100
    bits = mm.f32_to_bf16(rng.standard_normal((70, 64)).astype(np.float32))
    return [("rmsnorm_forward", rmsnorm.rmsnorm_forward, (x, w, 1e-6)),
            ("rmsnorm_backward", rmsnorm.rmsnorm_backward, (x * 0.5, x, w, rstd)),
            ("rope_forward", rope.rope_forward, (x4, cos, sin)),
            ("swiglu_forward", swiglu.swiglu_forward, (x, x * 0.3)),
            ("swiglu_backward", swiglu.swiglu_backward, (x, x * 0.3, x * 0.7)),
            ("softmax_rows", att.softmax_rows, (s, mask, 6, 3, np.empty((2, 3, 12)))),
            ("softmax_rows_backward", att.softmax_rows_backward, (s, s * 0.5, lse, lse * 0.1, mask, 6, 3)),
            ("cross_entropy_rows", ce.cross_entropy_rows, (x, labels, -100, True)),
            ("bf16_to_f32", mm.bf16_to_f32, (bits,)),
            ("f32_to_bf16", mm.f32_to_bf16, (x,)),
            ("gemv_bf16", mm.gemv_bf16, (x[:3], bits))]


def _results(args, out):
    """a kernel's outputs plus its in-place arguments, as a flat list of arrays"""
    out = out if isinstance(out, tuple) else (out,)
    return [np.asarray(o) for o in out] + [a for a in args if isinstance(a, np.ndarray)]


def test_serial_and_parallel_compilations_agree():
    """parallel_when_large picks by size; both compilations must give the same numbers
    (gemv_nt_bf16 to rounding: its fast-math sums may split differently)."""
    for name, kernel, args in _sized_kernel_calls(np.random.default_rng(0)):
        copies = [[a.copy() if isinstance(a, np.ndarray) else a for a in args] for _ in range(2)]
        got_serial = _results(copies[0], kernel.serial(*copies[0]))
        got_parallel = _results(copies[1], kernel.parallel(*copies[1]))
        for a, b in zip(got_serial, got_parallel, strict=True):
            if name == "gemv_nt_bf16":
                assert_close(a, b, 1e-5, name)
            else:
                np.testing.assert_array_equal(a, b, err_msg=name)


# ---- the vectorised exp -----------------------------------------------------------------------
def test_exp_f32_within_two_ulp_and_exact_edges():
    import numba as nb

    from tinylora.kernels.exp import X_MAX, X_MIN, exp_like

    @nb.njit
    def exp_all(x):
        out = np.empty_like(x)
        for i in range(x.size):
            out[i] = exp_like(x[i])
        return out

    rng = np.random.default_rng(0)
    x = np.concatenate([rng.uniform(-87.3, 88.7, 200_000), rng.uniform(-1, 1, 10_000),
                        [0.0, -0.0, 1e-30, -1e-30, 88.7, -87.3]]).astype(np.float32)
    got, want = exp_all(x), np.exp(x.astype(np.float64))
    assert got.dtype == np.float32
    ulp = np.spacing(want.astype(np.float32)).astype(np.float64)
    err = np.abs(got - want) / ulp
    assert err.max() <= 2.0, f"max error {err.max():.2f} ulp at x = {x[err.argmax()]}"
    edges = np.array([np.nan, np.inf, -np.inf, X_MAX * 1.001, X_MIN * 1.001, -200.0], dtype=np.float32)
    e = exp_all(edges)
    assert np.isnan(e[0]) and e[1] == np.inf and e[2] == 0.0 and e[3] == np.inf and e[4] == 0.0 and e[5] == 0.0
    x64 = rng.uniform(-700, 700, 1000)
    np.testing.assert_allclose(exp_all(x64), np.exp(x64), rtol=1e-15)   # float64 keeps the C library's exp
