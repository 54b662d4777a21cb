"""Shape ops: Reshape, Transpose, Slice, Concat.

None of these changes a value, they only move values around, so each backward
moves the gradient back the same way:

    Reshape:   y = x.reshape(s)          dx = dy.reshape(x.shape)
    Transpose: y = x.transpose(p)        dx = dy.transpose(argsort(p))     (the inverse permutation)
    Slice:     y = x[idx]                dx = zeros_like(x); dx[idx] = dy
    Concat:    y = concat(x_0..x_n, a)   dx_i = the slice of dy along axis a that x_i filled
"""

import numpy as np

from ..tensor import Function, Tensor


class ReshapeFn(Function):
    """x (...) -> x with shape `shape` (same number of values)"""

    def forward(self, x, *, shape):
        self.save_for_backward(x.shape)
        return x.reshape(shape)

    def backward(self, dy):
        (x_shape,) = self.saved
        return dy.reshape(x_shape)


class TransposeFn(Function):
    """x (...) -> x with axes permuted by `axes` (None reverses them, like ndarray.T)"""

    def forward(self, x, *, axes=None):
        axes = tuple(reversed(range(x.ndim))) if axes is None else tuple(axes)
        self.save_for_backward(axes)
        return x.transpose(axes)

    def backward(self, dy):
        (axes,) = self.saved
        return dy.transpose(np.argsort(axes))


class SliceFn(Function):
    """x (...) -> x[index] for basic indexing (ints, slices, Ellipsis, None).

    Advanced (array) indexing is refused: with repeated indices its backward
    would need a scatter-add, which is what the Embedding op is for.
    """

    def forward(self, x, *, index):
        parts = index if isinstance(index, tuple) else (index,)
        for p in parts:
            if not (p is None or p is Ellipsis or isinstance(p, (int, np.integer, slice))):
                raise TypeError(f"Slice supports basic indexing only, got {type(p).__name__}")
        self.save_for_backward(x.shape, x.dtype, index)
        return x[index]

    def backward(self, dy):
        x_shape, dtype, index = self.saved
        dx = np.zeros(x_shape, dtype=dtype)
        dx[index] = dy
        return dx


class ConcatFn(Function):
    """x_0 (..., n_0, ...), …, x_k (..., n_k, ...) -> (..., n_0 + … + n_k, ...) along `axis`"""

    def forward(self, *xs, axis: int):
        axis = axis % xs[0].ndim
        self.save_for_backward(axis, np.cumsum([x.shape[axis] for x in xs])[:-1])
        return np.concatenate(xs, axis=axis)

    def backward(self, dy):
        axis, splits = self.saved
        parts = np.split(dy, splits, axis=axis)
        return tuple(p if needed else None for p, needed in zip(parts, self.needs_input_grad))


def concat(tensors: list[Tensor], axis: int = -1) -> Tensor:
    """Join tensors along an existing axis."""
    return ConcatFn.apply(*tensors, axis=axis)
