"""Every op: a float64 gradient check, float32 behaviour, and its own edge cases."""

import importlib
import pkgutil

import numpy as np
import pytest
from helpers import GRAD_RTOL, assert_close, assert_gradcheck, tol_for

import tinylora.ops
from tinylora.gradcheck.op_catalogue import CASES, check_case
from tinylora.kernels.weights import BF16Weight
from tinylora.ops.cross_entropy import cross_entropy, linear_cross_entropy
from tinylora.ops.dropout import dropout
from tinylora.ops.embedding import embedding
from tinylora.ops.reduce import SoftmaxFn
from tinylora.ops.rmsnorm import rms_norm
from tinylora.ops.rope import rope, rope_inv_freq, rope_tables
from tinylora.ops.shape import concat
from tinylora.ops.linear import linear
from tinylora.tensor import Function, Tensor, no_grad


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
@pytest.mark.parametrize("seed", [0, 1])
def test_gradcheck_every_op(case, seed):
    result = check_case(case, seed)
    assert result.rtol == GRAD_RTOL
    assert_gradcheck(result, case.name)


def _all_functions():
    for info in pkgutil.iter_modules(tinylora.ops.__path__):
        importlib.import_module(f"tinylora.ops.{info.name}")
    found, todo = set(), list(Function.__subclasses__())
    while todo:
        cls = todo.pop()
        if cls.__module__.startswith("tinylora.ops."):
            found.add(cls)
        todo.extend(cls.__subclasses__())
    return found


def test_every_function_has_a_gradcheck_case():
    covered = {f for case in CASES for f in case.functions}
    missing = sorted(f.__name__ for f in _all_functions() - covered)
    assert not missing, f"ops without a gradient check in tinylora/gradcheck/op_catalogue.py: {missing}"


def test_every_function_is_named_with_fn():
    # One naming rule, so a Function never shares a name with the Module that uses it
    # (nn.Linear calls ops.linear.LinearFn).
    badly_named = sorted(f.__name__ for f in _all_functions() if not f.__name__.endswith("Fn"))
    assert not badly_named, f"Function subclasses must be named ...Fn: {badly_named}"


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_float32_in_float32_out(case):
    # The same cases in float32: outputs and gradients keep the inputs' dtype.
    fn, inputs, _ = case.build(np.random.default_rng(0))
    inputs32 = [Tensor(t.data.astype(np.float32), requires_grad=True) for t in inputs]
    out = fn(*inputs32)
    assert out.dtype == np.float32
    out.backward(np.ones(out.shape, dtype=np.float32))
    for t in inputs32:
        assert t.grad is not None and t.grad.dtype == np.float32


# ---- cross-entropy -------------------------------------------------------------------------------
def test_cross_entropy_is_the_mean_over_counted_tokens():
    rng = np.random.default_rng(0)
    z = rng.standard_normal((2, 3, 5))
    labels = np.array([[1, -100, 4], [-100, -100, 0]])
    p = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
    expected = -np.mean([np.log(p[0, 0, 1]), np.log(p[0, 2, 4]), np.log(p[1, 2, 0])])
    assert_close(cross_entropy(Tensor(z), labels).item(), expected, 1e-12, "mean CE")


def test_cross_entropy_with_nothing_counted_is_nan_like_pytorch():
    assert np.isnan(cross_entropy(Tensor(np.zeros((2, 3))), np.array([-100, -100])).item())


def test_cross_entropy_rejects_labels_outside_vocab():
    with pytest.raises(IndexError, match="label 5 outside the vocabulary of 5"):
        cross_entropy(Tensor(np.zeros((2, 5))), np.array([1, 5]))


@pytest.mark.parametrize("chunk_rows", [None, 1, 3])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_linear_cross_entropy_equals_linear_then_cross_entropy(dtype, chunk_rows):
    """The fused lm_head + loss gives the unfused value and gradients, whatever the block size."""
    rng = np.random.default_rng(1)
    h0, w0 = rng.standard_normal((2, 4, 6)).astype(dtype), rng.standard_normal((9, 6)).astype(dtype)
    labels = np.array([[1, -100, 4, 8], [-100, -100, 0, 2]])
    results = []
    for fused in (True, False):
        h, w = Tensor(h0.copy(), requires_grad=True), Tensor(w0.copy(), requires_grad=True)
        loss = (linear_cross_entropy(h, w, labels, chunk_rows=chunk_rows) if fused
                else cross_entropy(linear(h, w), labels))
        (loss * 2.5).backward()                               # a non-unit upstream gradient
        results.append((loss.item(), h.grad, w.grad))
    tol = tol_for(dtype)
    for name, a, b in zip(["loss", "dh", "dw"], *results):
        assert_close(a, b, tol, f"fused {name}")
    assert np.all(results[0][1][labels == -100] == 0)         # ignored rows: no gradient


def test_linear_cross_entropy_frozen_bf16_weight_and_no_grad():
    rng = np.random.default_rng(2)
    h0 = rng.standard_normal((5, 8)).astype(np.float32)
    w32 = rng.standard_normal((7, 8)).astype(np.float32)
    half = BF16Weight.from_array(w32)
    labels = np.array([0, 6, -100, 3, 3])
    h = Tensor(h0, requires_grad=True)
    loss = linear_cross_entropy(h, Tensor(half), labels)
    loss.backward()
    h_ref = Tensor(h0, requires_grad=True)
    ref = cross_entropy(linear(h_ref, Tensor(half.to_float())), labels)
    ref.backward()
    assert_close(loss.item(), ref.item(), 1e-5, "loss with bf16 weight")
    assert_close(h.grad, h_ref.grad, 1e-5, "dh with bf16 weight")
    with no_grad():
        assert_close(linear_cross_entropy(Tensor(h0), Tensor(half), labels).item(), ref.item(), 1e-5, "no-grad loss")
    assert np.isnan(linear_cross_entropy(Tensor(h0), Tensor(w32), np.full(5, -100)).item())
    with pytest.raises(IndexError, match="label 7 outside the vocabulary of 7"):
        linear_cross_entropy(Tensor(h0), Tensor(w32), np.array([0, 1, 2, 3, 7]))


# ---- embedding -----------------------------------------------------------------------------------
def test_embedding_looks_up_rows_and_checks_ids():
    w = Tensor(np.arange(12.0).reshape(4, 3))
    np.testing.assert_array_equal(embedding(np.array([[3, 0]]), w).data, [[[9, 10, 11], [0, 1, 2]]])
    with pytest.raises(IndexError, match="token id 4 outside the vocabulary of 4"):
        embedding(np.array([[4]]), w)
    with pytest.raises(TypeError, match="must be integers"):
        embedding(np.array([[1.0]]), w)


def test_embedding_output_gradient_flows_while_table_is_frozen():
    # The frozen table gets nothing, but what is computed from its output does.
    w = Tensor(np.ones((4, 3)))
    scale = Tensor(np.full(3, 2.0), requires_grad=True)
    (embedding(np.array([[1, 1, 2]]), w) * scale).sum().backward()
    assert w.grad is None
    np.testing.assert_array_equal(scale.grad, [3.0, 3.0, 3.0])


# ---- dropout -------------------------------------------------------------------------------------
def test_dropout_identity_when_off():
    x = Tensor(np.ones(3), requires_grad=True)
    assert dropout(x, 0.0, None) is x
    assert dropout(x, 0.5, None, training=False) is x


def test_dropout_is_inverted_and_reproducible():
    x = Tensor(np.ones((200, 200)))
    a = dropout(x, 0.25, np.random.default_rng(3)).data
    b = dropout(x, 0.25, np.random.default_rng(3)).data
    np.testing.assert_array_equal(a, b)
    assert set(np.unique(a)) == {0.0, 1.0 / 0.75}
    assert abs((a == 0).mean() - 0.25) < 0.01            # 40,000 draws: std of the rate is 0.002
    assert abs(a.mean() - 1.0) < 0.02                    # E[y] = x


def test_dropout_bad_arguments():
    with pytest.raises(ValueError, match=r"in \[0, 1\)"):
        dropout(Tensor(np.ones(2)), 1.0, np.random.default_rng(0))
    with pytest.raises(ValueError, match="Generator"):
        dropout(Tensor(np.ones(2)), 0.1, None)


# ---- RoPE ----------------------------------------------------------------------------------------
def test_rope_tables_follow_transformers_float32_recipe():
    inv = rope_inv_freq(64, 10000.0)
    assert inv.dtype == np.float32 and inv.shape == (32,)
    assert_close(inv, 1.0 / 10000.0 ** (np.arange(0, 64, 2) / 64), 1e-6, "inv_freq")
    cos, sin = rope_tables(np.array([[0, 5, 1000]]), inv)
    assert cos.shape == (1, 3, 32) and cos.dtype == np.float32
    assert_close(cos[0, 0], np.ones(32), 0, "cos at position 0")
    assert_close(sin[0, 2, 0], np.float32(np.sin(np.float32(1000.0))), 1e-6, "sin of angle 1000")


def test_rope_offset_equals_slice_of_full_sequence():
    # A KV cache feeds new tokens at positions S-T..S-1: same result as those rows of the full sequence.
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 7, 3, 8))
    inv = rope_inv_freq(8, 10000.0)
    full = rope(Tensor(x), *rope_tables(np.arange(7), inv, np.float64)).data
    tail = rope(Tensor(x[:, 4:]), *rope_tables(np.arange(4, 7), inv, np.float64)).data
    assert_close(tail, full[:, 4:], 1e-12, "rope with offset")


def test_rope_preserves_norms_and_relative_positions():
    rng = np.random.default_rng(1)
    q, k = rng.standard_normal((1, 1, 1, 16)), rng.standard_normal((1, 1, 1, 16))
    inv = rope_inv_freq(16, 10000.0)

    def at(x, pos):
        return rope(Tensor(x), *rope_tables(np.array([pos]), inv, np.float64)).data.ravel()

    assert_close(np.linalg.norm(at(q, 9)), np.linalg.norm(q), 1e-12, "norm")
    assert_close(at(q, 10) @ at(k, 7), at(q, 5) @ at(k, 2), 1e-12, "q.k depends on m - n only")


def test_rope_rejects_odd_head_dim():
    with pytest.raises(ValueError, match="even head dimension"):
        rope(Tensor(np.ones((1, 1, 1, 3))), np.ones((1, 1, 1)), np.zeros((1, 1, 1)))


# ---- the rest ------------------------------------------------------------------------------------
def test_rmsnorm_op_matches_formula_on_3d_input():
    rng = np.random.default_rng(2)
    x, w = rng.standard_normal((2, 3, 8)), rng.standard_normal(8)
    expected = x / np.sqrt(np.mean(x ** 2, -1, keepdims=True) + 1e-5) * w
    assert_close(rms_norm(Tensor(x), Tensor(w), 1e-5).data, expected, 1e-12, "rmsnorm op")


def test_softmax_rows_sum_to_one_even_for_large_inputs():
    y = SoftmaxFn.apply(Tensor(np.array([[1000.0, 1000.0], [0.0, -1000.0]]))).data
    assert_close(y, [[0.5, 0.5], [1.0, 0.0]], 1e-12, "softmax")


def test_slice_refuses_advanced_indexing():
    with pytest.raises(TypeError, match="basic indexing"):
        Tensor(np.ones(4), requires_grad=True)[np.array([0, 0])]


def test_shape_ops_forward():
    x = Tensor(np.arange(24.0).reshape(2, 3, 4))
    np.testing.assert_array_equal(x.reshape(4, 6).data, np.arange(24.0).reshape(4, 6))
    np.testing.assert_array_equal(x.transpose(2, 0, 1).data, x.data.transpose(2, 0, 1))
    np.testing.assert_array_equal(x.T.data, x.data.T)
    np.testing.assert_array_equal(x[1, :, ::2].data, x.data[1, :, ::2])
    np.testing.assert_array_equal(concat([x, x], axis=0).data, np.concatenate([x.data, x.data]))
    np.testing.assert_array_equal(x.sum(axis=(0, 2)).data, x.data.sum(axis=(0, 2)))
    np.testing.assert_array_equal(x.mean().data, x.data.mean())
