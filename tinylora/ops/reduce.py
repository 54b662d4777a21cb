"""Reductions and softmax: Sum, Mean, Softmax.

    Sum:     y = sum of x over `axis`       dx = dy broadcast back over the summed axes
    Mean:    y = sum of x over `axis` / n   dx = dy broadcast back, divided by n
    Softmax: y_i = exp(x_i) / sum_j exp(x_j) (last axis)
             dx_i = y_i * (dy_i - sum_j dy_j y_j)

Softmax's backward is the Jacobian-vector product of diag(y) - y yᵀ. Inside the
model, softmax lives in the fused attention kernel and in cross-entropy; this
standalone op is for everything else (and for reading the math once).
"""

import numpy as np

from ..tensor import Function


def _expand(dy: np.ndarray, x_shape: tuple[int, ...], axis, keepdims: bool) -> np.ndarray:
    """Put back the reduced axes (as length 1) so dy broadcasts to x's shape."""
    if axis is None:
        return np.broadcast_to(dy.reshape((1,) * len(x_shape)), x_shape)
    if not keepdims:
        axes = sorted(a % len(x_shape) for a in np.atleast_1d(axis))
        for a in axes:
            dy = np.expand_dims(dy, a)
    return np.broadcast_to(dy, x_shape)


class SumFn(Function):
    """x (...) -> x summed over `axis` (all axes when None)"""

    def forward(self, x, *, axis=None, keepdims=False):
        self.save_for_backward(x.shape, axis, keepdims)
        return np.asarray(x.sum(axis=axis, keepdims=keepdims))

    def backward(self, dy):
        x_shape, axis, keepdims = self.saved
        return np.ascontiguousarray(_expand(dy, x_shape, axis, keepdims))


class MeanFn(Function):
    """x (...) -> mean of x over `axis` (all axes when None)"""

    def forward(self, x, *, axis=None, keepdims=False):
        y = np.asarray(x.mean(axis=axis, keepdims=keepdims))
        self.save_for_backward(x.shape, axis, keepdims, x.size // max(y.size, 1))
        return y

    def backward(self, dy):
        x_shape, axis, keepdims, n = self.saved
        return np.ascontiguousarray(_expand(dy, x_shape, axis, keepdims)) / n


class SoftmaxFn(Function):
    """x (..., N) -> softmax over the last axis (..., N)"""

    def forward(self, x):
        e = np.exp(x - x.max(axis=-1, keepdims=True))   # subtract the max: exp never overflows
        y = e / e.sum(axis=-1, keepdims=True)
        self.save_for_backward(y)
        return y

    def backward(self, dy):
        (y,) = self.saved
        return y * (dy - np.sum(dy * y, axis=-1, keepdims=True))
