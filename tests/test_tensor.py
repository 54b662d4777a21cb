"""The engine: accumulation, frozen leaves, no_grad, graph freeing."""

import numpy as np
import pytest

import tinylora as tl
from tinylora.ops.elementwise import AddFn, MulFn
from tinylora.ops.linear import LinearFn
from tinylora.tensor import Function, Tensor


def test_diamond_accumulates_both_paths():
    # y = a*b + a*c uses `a` twice: dy/da = b + c, not just one of them.
    rng = np.random.default_rng(0)
    a, b, c = (Tensor(rng.standard_normal(3), requires_grad=True) for _ in range(3))
    y = a * b + a * c
    y.backward(np.ones(3))
    np.testing.assert_array_equal(a.grad, b.data + c.data)
    np.testing.assert_array_equal(b.grad, a.data)


def test_same_tensor_twice_in_one_op():
    # x * x: both inputs of Mul are the same tensor, dx = 2x
    x = Tensor(np.array([1.5, -2.0]), requires_grad=True)
    (x * x).backward(np.ones(2))
    np.testing.assert_array_equal(x.grad, 2 * x.data)


def test_deep_diamond_gradient_matches_closed_form():
    # h = x; repeat 50 times h = h + h  =>  h = 2^50 x ... keep it small: 20 levels, exact in float64.
    x = Tensor(np.array([3.0]), requires_grad=True)
    h = x
    for _ in range(20):
        h = h + h
    h.backward()
    assert x.grad[0] == 2.0 ** 20


def test_leaf_grads_accumulate_across_backward_calls():
    w = Tensor(np.array([2.0, 3.0]), requires_grad=True)
    for _ in range(3):
        (w * Tensor(np.array([1.0, 10.0]))).backward(np.ones(2))
    np.testing.assert_array_equal(w.grad, [3.0, 30.0])


def test_frozen_leaf_gets_no_gradient_and_costs_none():
    # A frozen weight must not even have its gradient computed: Mul only computes
    # the gradient for the input that needs it.
    calls = []

    class Spy(Function):
        def forward(self, a, b):
            return a * b

        def backward(self, dy):
            calls.append(self.needs_input_grad)
            return (dy if self.needs_input_grad[0] else None, dy if self.needs_input_grad[1] else None)

    x = Tensor(np.ones(3), requires_grad=True)
    frozen = Tensor(np.ones(3))
    Spy.apply(x, frozen).backward(np.ones(3))
    assert calls == [(True, False)]
    assert frozen.grad is None and x.grad is not None


def test_frozen_linear_weight_has_no_grad():
    rng = np.random.default_rng(1)
    x = Tensor(rng.standard_normal((2, 4)), requires_grad=True)
    w = Tensor(rng.standard_normal((3, 4)))          # frozen
    LinearFn.apply(x, w).backward(np.ones((2, 3)))
    assert w.grad is None
    np.testing.assert_allclose(x.grad, np.ones((2, 3)) @ w.data)


def test_result_of_frozen_inputs_does_not_require_grad():
    y = Tensor(np.ones(2)) + Tensor(np.ones(2))
    assert not y.requires_grad and y._ctx is None
    with pytest.raises(RuntimeError, match="does not require grad"):
        y.backward(np.ones(2))


def test_no_grad_records_nothing():
    x = Tensor(np.ones(2), requires_grad=True)
    with tl.no_grad():
        assert not tl.is_grad_enabled()
        y = x * x
    assert tl.is_grad_enabled()
    assert not y.requires_grad and y._ctx is None


def test_no_grad_restores_mode_after_exception():
    with pytest.raises(ValueError):
        with tl.no_grad():
            raise ValueError("boom")
    assert tl.is_grad_enabled()


def test_graph_is_freed_after_backward():
    x = Tensor(np.ones(2), requires_grad=True)
    h = x * Tensor(np.full(2, 3.0))
    y = h + h
    node = h._ctx                     # Mul's context: it saved both inputs for the backward
    assert node.saved != ()
    y.backward(np.ones(2))
    assert node.parents == () and node.saved == ()
    with pytest.raises(RuntimeError, match="already freed"):
        y.backward(np.ones(2))


def test_unsaved_intermediate_arrays_are_freed_before_backward():
    """The graph keeps only what save_for_backward saved: Add saves nothing, so
    the array of `a` dies with its Tensor, and the backward is still right."""
    import gc
    import weakref
    x = Tensor(np.arange(3.0), requires_grad=True)
    a = x * Tensor(np.full(3, 2.0))          # Mul saves x and the constant, not its output
    y = a + a                                # Add saves nothing
    out = weakref.ref(a.data)
    del a
    gc.collect()
    assert out() is None
    y.backward(np.ones(3))
    np.testing.assert_array_equal(x.grad, np.full(3, 4.0))


def test_intermediate_gradients_are_not_kept():
    x = Tensor(np.ones(2), requires_grad=True)
    h = x * x
    (h + x).backward(np.ones(2))
    assert h.grad is None            # only leaves keep .grad
    np.testing.assert_array_equal(x.grad, [3.0, 3.0])


def test_backward_without_dy_needs_a_scalar():
    x = Tensor(np.ones(3), requires_grad=True)
    with pytest.raises(RuntimeError, match="single value"):
        (x * x).backward()
    s = (x * x).sum()
    s.backward()
    np.testing.assert_array_equal(x.grad, [2.0, 2.0, 2.0])


def test_backward_rejects_wrong_dy_shape():
    x = Tensor(np.ones(3), requires_grad=True)
    with pytest.raises(ValueError, match="dy has shape"):
        (x * x).backward(np.ones(4))


def test_function_returning_wrong_gradient_shape_is_caught():
    class Bad(Function):
        def forward(self, a):
            return a * 2

        def backward(self, dy):
            return dy[:1]

    x = Tensor(np.ones(3), requires_grad=True)
    with pytest.raises(RuntimeError, match="gradient of shape"):
        Bad.apply(x).backward(np.ones(3))


def test_apply_rejects_non_tensor_positional_inputs():
    with pytest.raises(TypeError, match="expected Tensor"):
        AddFn.apply(Tensor(np.ones(2)), np.ones(2))


def test_operators_and_python_scalars():
    x = Tensor(np.array([1.0, 2.0]), requires_grad=True)
    y = (2.0 * x - 1.0) * x + (-x)         # 2x^2 - 2x, dy/dx = 4x - 2
    y.backward(np.ones(2))
    np.testing.assert_array_equal(x.grad, 4 * x.data - 2)
    assert y.dtype == np.float64


def test_deep_graph_does_not_hit_recursion_limit():
    x = Tensor(np.ones(1), requires_grad=True)
    h = x
    for _ in range(5000):
        h = MulFn.apply(h, Tensor(np.ones(1)))
    h.backward(np.ones(1))
    assert x.grad[0] == 1.0
