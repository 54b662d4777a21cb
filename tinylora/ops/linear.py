"""Matrix products: `MatMulFn` (a @ b with batch broadcasting) and `LinearFn` (x Wᵀ + b).

    MatMulFn:  y = a b            a (..., N, I), b (..., I, O) -> y (..., N, O)
               da = dy bᵀ         (..., N, O) @ (..., O, I) -> (..., N, I)
               db = aᵀ dy         (..., I, N) @ (..., N, O) -> (..., I, O)

    LinearFn:  y = x Wᵀ + b       x (..., I), W (O, I), b (O,) -> (..., O)
               dx = dy W          (..., O) @ (O, I) -> (..., I)
               dW = dyᵀ x         summed over every row (all leading axes) -> (O, I)
               db = sum of dy over every row -> (O,)

Both follow from y_ij = sum_k a_ik b_kj: dL/da_ik = sum_j dy_ij b_kj and
dL/db_kj = sum_i a_ik dy_ij. In MatMulFn, batch axes that broadcasting added or
stretched are summed back with `unbroadcast`.

The frozen-weight rule (SPEC §3.1) is what makes LoRA cheap: a pretrained W
has requires_grad=False, so `needs_input_grad` says no and backward never
forms dW, an (O, I) product as expensive as the forward itself. It forms
only dx, which the trainable layers below still need.

W is a `FrozenWeight` (float32, bf16, ...) or, when it trains, a float array.
How the product is done for each storage (BLAS, a fused GEMV, widened tiles)
is the dispatcher's business, kernels/weights.py: this op only calls
`linear` and `linear_dx`, as the LoRA op (lora.py) and lm_head + loss
(cross_entropy.py) do.
"""

import numpy as np

from ..kernels import weights
from ..kernels.weights import FrozenWeight
from ..tensor import Function
from .elementwise import unbroadcast


class MatMulFn(Function):
    """a (..., N, I), b (..., I, O) -> a @ b (..., N, O), batch axes broadcast"""

    def forward(self, a, b):
        if isinstance(a, FrozenWeight) or isinstance(b, FrozenWeight):
            raise TypeError("MatMulFn: a frozen weight goes through LinearFn (x Wᵀ), not a @ b")
        if a.ndim < 2 or b.ndim < 2:
            raise ValueError(f"MatMul needs arrays of at least 2 axes, got shapes {a.shape} and {b.shape}; "
                             "reshape a vector to (1, I) or (I, 1)")
        self.save_for_backward(a, b)
        return np.matmul(a, b)                                # dense float products: BLAS

    def backward(self, dy):
        a, b = self.saved
        da = db = None
        if self.needs_input_grad[0]:
            # y = a b  ->  da = dy bᵀ, then sum over batch axes a was broadcast along
            da = unbroadcast(np.matmul(dy, np.swapaxes(b, -1, -2)), a.shape)
        if self.needs_input_grad[1]:
            # y = a b  ->  db = aᵀ dy
            db = unbroadcast(np.matmul(np.swapaxes(a, -1, -2), dy), b.shape)
        return da, db


class LinearFn(Function):
    """x (..., I), w (O, I) a frozen weight or a float array, [b (O,)] -> (..., O)"""

    def forward(self, x, w, b=None):
        O, I = w.shape
        if x.shape[-1] != I:
            raise ValueError(f"Linear: x has {x.shape[-1]} features, weight {w.shape} expects {I}")
        x2 = np.ascontiguousarray(x.reshape(-1, I))          # (N, I), N = all leading axes
        y = weights.linear(x2, w, b)                          # (N, O)
        # Keep x only if dW will be needed, and W only if dx will be.
        self.save_for_backward(x2 if self.needs_input_grad[1] else None,
                               w if self.needs_input_grad[0] else None,
                               x.shape, None if b is None else b.dtype)
        return y.reshape(x.shape[:-1] + (O,))

    def backward(self, dy):
        x2, w, x_shape, b_dtype = self.saved
        dy2 = dy.reshape(-1, dy.shape[-1])                    # (N, O)
        dx = dw = db = None
        if self.needs_input_grad[0]:
            # y = x Wᵀ  ->  dx = dy W   (N, O) @ (O, I) -> (N, I)
            dx = weights.linear_dx(dy2, w).reshape(x_shape)
        if self.needs_input_grad[1]:
            # y = x Wᵀ  ->  dW = dyᵀ x   (O, N) @ (N, I) -> (O, I); only a float array W can train
            dw = np.matmul(dy2.T, x2)
        if len(self.needs_input_grad) > 2 and self.needs_input_grad[2]:
            # y = ... + b  ->  db = dy summed over rows
            db = dy2.sum(axis=0).astype(b_dtype, copy=False)
        return (dx, dw) if len(self.needs_input_grad) == 2 else (dx, dw, db)


def linear(x, w, b=None):
    """x (..., I), w (O, I), b (O,) or None -> (..., O)"""
    return LinearFn.apply(x, w) if b is None else LinearFn.apply(x, w, b)
