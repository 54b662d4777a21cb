"""Causal grouped-query attention: kernels vs a NumPy reference, gradient checks, edges.

The reference below builds the whole (B, H, T, S) score matrix with the causal
and padding mask, takes its softmax and differentiates it analytically: slow
and memory-hungry, but a direct transcription of the math with no loops, so an
independent oracle for the kernels' loops, their indexing and their masking.
"""

import numpy as np
import pytest

from tinylora import Tensor, gradcheck
from tinylora.kernels import attention as K
from tinylora.ops.attention import attention
from helpers import F64_TOL, assert_close, assert_gradcheck, tol_for


def reference(q, k, v, key_mask, dout):
    """float64 q (B, T, H, D), k, v (B, S, K, D), key_mask (B, S), dout (B, T, H, D)
    -> out, dq (B, T, H, D), dk, dv (B, S, K, D), lse (B, T, H)"""
    B, T, H, D = q.shape
    S, Kh = k.shape[1], k.shape[2]
    G = H // Kh
    scale = 1.0 / np.sqrt(D)
    # Query head h reads kv head h // G: repeating each kv head G times lines them up.
    kr = np.repeat(k, G, axis=2).transpose(0, 2, 1, 3)           # (B, H, S, D)
    vr = np.repeat(v, G, axis=2).transpose(0, 2, 1, 3)           # (B, H, S, D)
    qh = q.transpose(0, 2, 1, 3)                                 # (B, H, T, D)
    dh = dout.transpose(0, 2, 1, 3)                              # (B, H, T, D)
    s = scale * qh @ kr.transpose(0, 1, 3, 2)                    # (B, H, T, S)
    causal = np.arange(S)[None, :] <= (S - T + np.arange(T))[:, None]      # (T, S)
    seg = np.asarray(key_mask).astype(np.int64)                  # segment ids: 0 padding, 1, 2, ... examples
    query = seg[:, S - T:, None]                                 # (B, T, 1): the query's own example
    same = (query == seg[:, None, :]) | (query == 0)             # a padded query sees every real key
    visible = causal[None, None] & ((seg[:, None, :] != 0) & same)[:, None]  # (B, 1, T, S)
    s = np.where(visible, s, -np.inf)
    m = s.max(axis=-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)                         # rows with no visible key
    e = np.where(visible, np.exp(s - m), 0.0)
    l = e.sum(axis=-1, keepdims=True)
    p = e / np.where(l > 0, l, 1.0)                              # (B, H, T, S); empty rows stay 0
    out = p @ vr                                                 # (B, H, T, D)
    lse = np.where(l[..., 0] > 0, m[..., 0] + np.log(np.where(l[..., 0] > 0, l[..., 0], 1.0)), np.inf)
    dvr = p.transpose(0, 1, 3, 2) @ dh                           # (B, H, S, D)
    dp = dh @ vr.transpose(0, 1, 3, 2)                           # (B, H, T, S)
    ds = p * (dp - (p * dp).sum(axis=-1, keepdims=True))         # softmax backward, the long way
    dq = scale * ds @ kr                                         # (B, H, T, D)
    dkr = scale * ds.transpose(0, 1, 3, 2) @ qh                  # (B, H, S, D)
    # A kv head's gradient is the sum over the G query heads that read it.
    dk = dkr.transpose(0, 2, 1, 3).reshape(B, S, Kh, G, D).sum(axis=3)
    dv = dvr.transpose(0, 2, 1, 3).reshape(B, S, Kh, G, D).sum(axis=3)
    t = (0, 2, 1, 3)
    return out.transpose(t), dq.transpose(t), dk, dv, lse.transpose(0, 2, 1)


def make_mask(B, S):
    """(B, S) bool: row 0 all real, row 1 right-padded, row 2 left-padded (so its
    first queries see no key when S == T), further rows real."""
    mask = np.ones((B, S), dtype=np.bool_)
    if B > 1 and S > 2:
        mask[1, -2:] = False
    if B > 2 and S > 2:
        mask[2, :2] = False
    return mask


def make_inputs(rng, B, T, S, H, Kh, D, dtype=np.float64):
    q = rng.standard_normal((B, T, H, D)).astype(dtype)
    k = rng.standard_normal((B, S, Kh, D)).astype(dtype)
    v = rng.standard_normal((B, S, Kh, D)).astype(dtype)
    return q, k, v


def run(q, k, v, key_mask, dout):
    """The op through the engine -> out, dq, dk, dv (arrays)."""
    qt, kt, vt = (Tensor(x.copy(), requires_grad=True) for x in (q, k, v))
    out = attention(qt, kt, vt, key_mask)
    out.backward(dout)
    return out.data, qt.grad, kt.grad, vt.grad


# (B, T, S, H, K, D): T = 1 decoding, S > T cache offsets, D not a power of two
# (and not a multiple of 4, to reach the dot product's tail), H/K = 1, 2, 3.
SHAPES = [
    (1, 1, 1, 1, 1, 1),
    (2, 1, 7, 4, 2, 5),      # one decoding step after 6 cached tokens
    (2, 3, 8, 6, 2, 7),      # H/K = 3, offset 5
    (1, 5, 5, 3, 3, 4),      # H/K = 1 (plain multi-head)
    (3, 5, 5, 4, 2, 9),      # padding both sides: rows with no visible key
    (3, 4, 6, 6, 3, 6),      # padding with an offset
]


@pytest.mark.parametrize("q_block", [None, 2])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}T{}S{}H{}K{}D{}".format(*s))
def test_kernels_match_reference(shape, dtype, q_block, monkeypatch):
    """q_block=2 cuts every T > 2 into several query tiles, each with its own key range."""
    if q_block is not None:
        monkeypatch.setattr(K, "Q_BLOCK", q_block)
    B, T, S, H, Kh, D = shape
    rng = np.random.default_rng(0)
    q, k, v = make_inputs(rng, B, T, S, H, Kh, D, dtype)
    dout = rng.standard_normal(q.shape).astype(dtype)
    mask = make_mask(B, S)
    scale = 1.0 / np.sqrt(D)
    out, lse = K.attention_forward(q, k, v, mask, scale)
    dq, dk, dv = K.attention_backward(dout, q, k, v, out, lse, mask, scale)
    ref = reference(*(x.astype(np.float64) for x in (q, k, v)), mask, dout.astype(np.float64))
    tol = tol_for(dtype)
    for name, got, want in zip(["out", "dq", "dk", "dv"], [out, dq, dk, dv], ref):
        assert got.dtype == dtype, name
        assert_close(got, want, tol, f"{name} {np.dtype(dtype).name} {shape}")
    # lse is +inf exactly where a query sees no key, and float64 throughout.
    lse_ref = ref[4]
    assert lse.dtype == np.float64
    np.testing.assert_array_equal(np.isinf(lse), np.isinf(lse_ref))
    finite = np.isfinite(lse_ref)
    assert_close(lse[finite], lse_ref[finite], tol, f"lse {np.dtype(dtype).name} {shape}")


@pytest.mark.parametrize("shape", [(2, 4, 4, 4, 2, 3),    # GQA, right padding
                                   (3, 3, 6, 6, 2, 5),    # H/K = 3, offset 3, both paddings
                                   (3, 5, 5, 2, 1, 4),    # left padding: fully masked rows
                                   (1, 1, 5, 3, 3, 6)],   # one decoding step
                         ids=lambda s: "B{}T{}S{}H{}K{}D{}".format(*s))
def test_gradcheck(shape):
    B, T, S, H, Kh, D = shape
    q, k, v = (Tensor(x, requires_grad=True) for x in make_inputs(np.random.default_rng(1), *shape))
    mask = make_mask(B, S)
    result = gradcheck(lambda q, k, v: attention(q, k, v, mask), [q, k, v], names=["q", "k", "v"])
    assert_gradcheck(result, f"attention {shape}")


def test_gradcheck_frozen_keys_and_values():
    """Only q trainable: backward returns None for k and v, which stay gradient-free."""
    q, k, v = make_inputs(np.random.default_rng(2), 2, 3, 5, 4, 2, 3)
    q = Tensor(q, requires_grad=True)
    k, v = Tensor(k), Tensor(v)
    assert_gradcheck(gradcheck(lambda q, k, v: attention(q, k, v), [q, k, v], names=["q", "k", "v"]))
    assert k.grad is None and v.grad is None


@pytest.mark.filterwarnings("ignore:invalid value encountered")
@pytest.mark.parametrize("offset", [0, 3])
def test_causal_future_keys_do_not_matter(offset):
    """A future key gets probability exactly 0: changing its finite k and v changes
    no earlier output and no earlier gradient, bit for bit."""
    B, T, H, Kh, D = 2, 5, 4, 2, 3
    S = T + offset
    rng = np.random.default_rng(3)
    q, k, v = make_inputs(rng, B, T, S, H, Kh, D)
    dout = rng.standard_normal(q.shape)
    j = S - 2                                       # a key seen only by the last two queries
    before = run(q, k, v, None, dout)
    k2, v2 = k.copy(), v.copy()
    k2[:, j] += 10.0
    v2[:, j] = 1e6
    after = run(q, k2, v2, None, dout)
    seen = j - offset                               # first query (local index) that sees key j
    for name, a, b in zip(["out", "dq"], after[:2], before[:2]):
        np.testing.assert_array_equal(a[:, :seen], b[:, :seen], err_msg=name)
        assert not np.array_equal(a[:, seen:], b[:, seen:]), name
    # A NaN there still propagates, as in any attention that multiplies by p = 0
    # (documented in tinylora/kernels/attention.py): only a diverged model makes one.
    v2[:, j] = np.nan
    assert np.isnan(run(q, k2, v2, None, dout)[0][:, seen:]).all()


def test_gqa_equals_repeated_kv_heads():
    """GQA = multi-head attention with each kv head repeated for its G query heads;
    the gradient of a shared kv head is the sum over its group."""
    B, T, S, H, Kh, D = 2, 4, 6, 6, 2, 5
    G = H // Kh
    rng = np.random.default_rng(4)
    q, k, v = make_inputs(rng, B, T, S, H, Kh, D)
    dout = rng.standard_normal(q.shape)
    mask = make_mask(B, S)
    out, dq, dk, dv = run(q, k, v, mask, dout)
    out_r, dq_r, dk_r, dv_r = run(q, np.repeat(k, G, axis=2), np.repeat(v, G, axis=2), mask, dout)
    assert_close(out, out_r, F64_TOL, "out")
    assert_close(dq, dq_r, F64_TOL, "dq")
    assert_close(dk, dk_r.reshape(B, S, Kh, G, D).sum(axis=3), F64_TOL, "dk")
    assert_close(dv, dv_r.reshape(B, S, Kh, G, D).sum(axis=3), F64_TOL, "dv")


def test_right_padding_is_never_attended():
    B, T, H, Kh, D = 2, 6, 4, 2, 3
    rng = np.random.default_rng(5)
    q, k, v = make_inputs(rng, B, T, T, H, Kh, D)
    dout = rng.standard_normal(q.shape)
    mask = np.ones((B, T), dtype=np.int64)          # the batch's attention_mask, as integers
    mask[1, 4:] = 0                                 # row 1: 4 real tokens, 2 pads
    out, dq, dk, dv = run(q, k, v, mask, dout)
    k2, v2 = k.copy(), v.copy()
    k2[1, 4:] = rng.standard_normal(k2[1, 4:].shape) * 100
    v2[1, 4:] = np.nan                              # skipped, not multiplied by 0
    out2, _, dk2, dv2 = run(q, k2, v2, mask, dout)
    np.testing.assert_array_equal(out2, out)        # every output, real or padded query
    assert (dk[1, 4:] == 0).all() and (dv[1, 4:] == 0).all()
    assert (dk2[1, 4:] == 0).all() and (dv2[1, 4:] == 0).all()
    assert np.isfinite(out[1, 4:]).all()            # padded queries still see real keys
    assert np.isfinite(dq).all() and np.isfinite(dk2).all()


def test_fully_masked_rows_give_zero_and_no_nan():
    B, T, H, Kh, D = 2, 5, 4, 2, 3
    rng = np.random.default_rng(6)
    q, k, v = make_inputs(rng, B, T, T, H, Kh, D)
    dout = rng.standard_normal(q.shape)
    mask = np.ones((B, T), dtype=np.bool_)
    mask[0, :2] = False                             # left padding: queries 0, 1 see no key
    mask[1, :] = False                              # a batch row of nothing but padding
    out, dq, dk, dv = run(q, k, v, mask, dout)
    for name, x in [("out", out), ("dq", dq), ("dk", dk), ("dv", dv)]:
        assert np.isfinite(x).all(), f"{name} has a non-finite entry"
    assert (out[0, :2] == 0).all() and (out[1] == 0).all()
    assert (dq[0, :2] == 0).all() and (dq[1] == 0).all()
    assert (dk[1] == 0).all() and (dv[1] == 0).all()
    assert (dk[0, :2] == 0).all() and (dv[0, :2] == 0).all()
    lse = K.attention_forward(q, k, v, mask, 1.0 / np.sqrt(D))[1]
    assert (lse[0, :2] == np.inf).all()             # exp(s - lse) = 0: zero gradient by construction


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("T", [1, 3])
def test_kv_cache_offset_equals_last_rows_of_full(T, dtype):
    """A block of T queries against S keys (S - T of them cached) gives exactly
    the last T rows of attending with all S tokens as queries."""
    B, S, H, Kh, D = 3, 7, 6, 2, 5
    rng = np.random.default_rng(7)
    q_full, k, v = make_inputs(rng, B, S, S, H, Kh, D, dtype)
    mask = make_mask(B, S)
    full = attention(Tensor(q_full), Tensor(k), Tensor(v), mask).data
    block = attention(Tensor(q_full[:, S - T:]), Tensor(k), Tensor(v), mask).data
    assert_close(block, full[:, S - T:], tol_for(dtype), "cached block vs full")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_non_contiguous_kv_views(dtype):
    """k, v as the filled part of a preallocated cache buffer, whose unfilled
    tail holds NaN: the kernels must use the strides and stop at S."""
    B, T, S, S_max, H, Kh, D = 2, 3, 5, 9, 4, 2, 3
    rng = np.random.default_rng(8)
    q, k, v = make_inputs(rng, B, T, S, H, Kh, D, dtype)
    dout = rng.standard_normal(q.shape).astype(dtype)
    mask = make_mask(B, S)
    k_cache = np.full((B, S_max, Kh, D), np.nan, dtype=dtype)
    v_cache = np.full((B, S_max, Kh, D), np.nan, dtype=dtype)
    k_cache[:, :S], v_cache[:, :S] = k, v
    k_view, v_view = k_cache[:, :S], v_cache[:, :S]
    assert not k_view.flags.c_contiguous and np.shares_memory(k_view, k_cache)
    qt, kt, vt = (Tensor(x, requires_grad=True) for x in (q, k_view, v_view))
    out = attention(qt, kt, vt, mask)
    out.backward(dout)
    want = run(q, k, v, mask, dout)
    for name, got, ref in zip(["out", "dq", "dk", "dv"], [out.data, qt.grad, kt.grad, vt.grad], want):
        np.testing.assert_array_equal(got, ref, err_msg=name)


@pytest.mark.filterwarnings("ignore:invalid value encountered")
def test_nan_and_inf_propagate():
    B, T, H, Kh, D = 1, 4, 4, 2, 3
    rng = np.random.default_rng(9)
    q, k, v = make_inputs(rng, B, T, T, H, Kh, D)

    def forward(q, k, v):
        return attention(Tensor(q), Tensor(k), Tensor(v)).data

    q1 = q.copy()
    q1[0, 2, 1, 0] = np.nan                         # query 2, head 1
    out = forward(q1, k, v)
    assert np.isnan(out[0, 2, 1]).all()
    out[0, 2, 1] = 0.0
    assert np.isfinite(out).all()                   # every other row untouched

    v1 = v.copy()
    v1[0, 1, 0, 2] = np.nan                         # key 1, kv head 0 (query heads 0, 1), channel 2
    out = forward(q, k, v1)
    assert np.isnan(out[0, 1:, :2, 2]).all()        # every query that attends key 1
    assert np.isfinite(out[0, :, 2:]).all()         # other heads untouched

    v2 = v.copy()
    v2[0, 1, 0, 2] = np.inf
    assert (forward(q, k, v2)[0, 1:, :2, 2] == np.inf).all()

    k1 = k.copy()
    k1[0, 3, 1, 0] = np.nan                         # key 3 only reaches the last query
    out = forward(q, k1, v)
    assert np.isnan(out[0, 3, 2:]).all() and np.isfinite(out[0, :3]).all()


def test_bad_shapes_fail_clearly():
    q, k, v = (Tensor(x) for x in make_inputs(np.random.default_rng(10), 2, 3, 5, 6, 4, 3))
    with pytest.raises(ValueError, match="6 query heads is not a multiple of 4 kv heads"):
        attention(q, k, v)
    q, k, v = (Tensor(x) for x in make_inputs(np.random.default_rng(10), 2, 4, 3, 4, 2, 3))
    with pytest.raises(ValueError, match="need S >= T"):
        attention(q, k, v)
    q, k, v = (Tensor(x) for x in make_inputs(np.random.default_rng(10), 2, 3, 5, 4, 2, 3))
    with pytest.raises(ValueError, match=r"key_mask has shape \(2, 3\), expected \(B, S\) = \(2, 5\)"):
        attention(q, k, v, np.ones((2, 3)))
    with pytest.raises(ValueError, match="one dtype"):
        attention(q, Tensor(k.data.astype(np.float32)), v)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_one_decoding_step_skips_padding_and_matches_the_reference(dtype):
    """T = 1 runs attention_one_query: padded keys (even NaN ones) are skipped, a query with no
    visible key gives zeros and lse = +inf, and a strided cache view gives the reference's numbers."""
    B, S, H, Kh, D = 3, 9, 6, 2, 7
    rng = np.random.default_rng(5)
    q, k, v = make_inputs(rng, B, 1, S, H, Kh, D, dtype)
    cache_k = np.full((B, S + 4, Kh, D), np.nan, dtype=dtype)
    cache_v = np.full((B, S + 4, Kh, D), np.nan, dtype=dtype)
    cache_k[:, :S], cache_v[:, :S] = k, v
    mask = np.ones((B, S), dtype=np.bool_)
    mask[1, :3] = False
    mask[2] = False                                 # nothing to attend to
    k[1, :3] = np.nan
    cache_k[1, :3] = np.nan
    out, lse = K.attention_forward(q, cache_k[:, :S], cache_v[:, :S], mask, 1.0 / np.sqrt(D))
    assert out.dtype == dtype and lse.dtype == np.float64
    ref = reference(q.astype(np.float64), np.nan_to_num(k).astype(np.float64), v.astype(np.float64), mask,
                    np.ones(q.shape))
    assert_close(out[:2], ref[0][:2], tol_for(dtype), "out")
    assert (out[2] == 0).all() and np.isinf(lse[2]).all() and np.isfinite(lse[:2]).all()
    assert_close(lse[:2], ref[4][:2], tol_for(dtype), "lse")


def packed_mask(B, S):
    """(B, S) int32 segment ids: row 0 three examples then padding, row 1 two, row 2 one (the 0/1 case)."""
    mask = np.ones((B, S), dtype=np.int32)
    cut = max(1, S // 3)
    mask[0, cut:2 * cut], mask[0, 2 * cut:], mask[0, S - 1:] = 2, 3, 0
    if B > 1:
        mask[1, S // 2:] = 2
    return mask


@pytest.mark.parametrize("q_block", [None, 2])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(3, 7, 7, 4, 2, 5), (2, 9, 9, 6, 3, 4), (2, 1, 8, 4, 2, 3)],
                         ids=lambda s: "B{}T{}S{}H{}K{}D{}".format(*s))
def test_packed_rows_attend_within_their_own_example(shape, dtype, q_block, monkeypatch):
    """Segment ids (packing): the kernels against the reference, and each example of a packed row equals
    the same example run alone (its own positions' queries see only its own keys)."""
    if q_block is not None:
        monkeypatch.setattr(K, "Q_BLOCK", q_block)
    B, T, S, H, Kh, D = shape
    rng = np.random.default_rng(1)
    q, k, v = make_inputs(rng, B, T, S, H, Kh, D, dtype)
    dout = rng.standard_normal(q.shape).astype(dtype)
    mask = packed_mask(B, S)
    dout[mask[:, S - T:] == 0] = 0          # a padded query sees every real key: let nothing flow back from it
    out, dq, dk, dv = run(q, k, v, mask, dout)
    ref = reference(*(x.astype(np.float64) for x in (q, k, v)), mask, dout.astype(np.float64))
    for name, got, want in zip(["out", "dq", "dk", "dv"], [out, dq, dk, dv], ref):
        assert_close(got, want, tol_for(dtype), f"packed {name} {np.dtype(dtype).name} {shape}")
    if T == S:
        for n in (1, 2, 3):
            cols = np.flatnonzero(mask[0] == n)
            alone = run(q[:1, cols], k[:1, cols], v[:1, cols], None, dout[:1, cols])
            for got, want in zip((out, dq, dk, dv), alone):
                assert_close(got[:1, cols], want, tol_for(dtype), f"example {n} alone")


def test_packed_attention_gradcheck():
    rng = np.random.default_rng(2)
    q, k, v = make_inputs(rng, 2, 6, 6, 4, 2, 3)
    mask = packed_mask(2, 6)
    result = gradcheck(lambda a, b, c: attention(a, b, c, mask), [Tensor(x, requires_grad=True) for x in (q, k, v)])
    assert_gradcheck(result, "packed attention")
