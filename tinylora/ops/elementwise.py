"""Elementwise ops with NumPy broadcasting: Add, Mul, SiLU.

    Add:  y = a + b        da = dy,       db = dy
    Mul:  y = a * b        da = dy * b,   db = dy * a
    SiLU: y = x * s(x)     dx = dy * s(x) * (1 + x * (1 - s(x))),   s = sigmoid

Broadcasting copies an input along some axes, so its gradient is the sum of the
gradients of all the copies: `unbroadcast` sums dy back down to the input's
shape. (The fused SwiGLU op in swiglu.py is what the MLP uses; SiLU is here for
completeness and for tests.)
"""

import numpy as np

from ..tensor import Function


def unbroadcast(grad: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Sum `grad` over the axes that broadcasting added or stretched -> `shape`."""
    if grad.shape == shape:
        return grad
    extra = grad.ndim - len(shape)
    grad = grad.sum(axis=tuple(range(extra))) if extra > 0 else grad     # leading axes added
    stretched = tuple(i for i, n in enumerate(shape) if n == 1 and grad.shape[i] != 1)
    if stretched:
        grad = grad.sum(axis=stretched, keepdims=True)                  # axes of length 1 stretched
    return grad.reshape(shape)


class AddFn(Function):
    """a (broadcastable), b (broadcastable) -> a + b"""

    def forward(self, a, b):
        self.save_for_backward(a.shape, b.shape)
        return a + b

    def backward(self, dy):
        a_shape, b_shape = self.saved
        da = unbroadcast(dy, a_shape) if self.needs_input_grad[0] else None
        db = unbroadcast(dy, b_shape) if self.needs_input_grad[1] else None
        return da, db


class MulFn(Function):
    """a (broadcastable), b (broadcastable) -> a * b"""

    def forward(self, a, b):
        self.save_for_backward(a, b)
        return a * b

    def backward(self, dy):
        a, b = self.saved
        da = unbroadcast(dy * b, a.shape) if self.needs_input_grad[0] else None
        db = unbroadcast(dy * a, b.shape) if self.needs_input_grad[1] else None
        return da, db


class SiLUFn(Function):
    """x (...) -> x * sigmoid(x) (...)"""

    def forward(self, x):
        s = 1.0 / (1.0 + np.exp(-x))
        self.save_for_backward(x, s)
        return x * s

    def backward(self, dy):
        x, s = self.saved
        return dy * s * (1.0 + x * (1.0 - s))
