"""Matrix products: `MatMul` (a @ b with batch broadcasting) and `Linear` (x Wᵀ + b).

    MatMul:  y = a b            a (..., M, K), b (..., K, N) -> y (..., M, N)
             da = dy bᵀ         (..., M, N) @ (..., N, K) -> (..., M, K)
             db = aᵀ dy         (..., K, M) @ (..., M, N) -> (..., K, N)

    Linear:  y = x Wᵀ + b       x (..., C_in), W (C_out, C_in), b (C_out,) -> (..., C_out)
             dx = dy W          (..., C_out) @ (C_out, C_in) -> (..., C_in)
             dW = dyᵀ x         summed over every row (all leading axes) -> (C_out, C_in)
             db = sum of dy over every row -> (C_out,)

Both follow from y_ij = sum_k a_ik b_kj: dL/da_ik = sum_j dy_ij b_kj and
dL/db_kj = sum_i a_ik dy_ij. In MatMul, batch axes that broadcasting added or
stretched are summed back with `unbroadcast`.

The frozen-weight rule (SPEC §3.1) is what makes LoRA cheap: a pretrained W
has requires_grad=False, so `needs_input_grad` says no and backward never
forms dW, an (out, in) product as expensive as the forward itself. It forms
only dx, which the trainable layers below still need.

W may be bf16 bits (np.uint16, see tinylora/kernels/matmul.py) to halve the
memory of frozen weights; such a W can only be frozen. The products themselves
are in `tinylora/kernels/matmul.py`, whose dispatcher picks BLAS or a Numba
kernel per shape and dtype.
"""

import numpy as np

from ..kernels import matmul as matmul_kernels
from ..tensor import Function
from .elementwise import unbroadcast


class MatMulFn(Function):
    """a (..., M, K), b (..., K, N) -> a @ b (..., M, N), batch axes broadcast"""

    def forward(self, a, b):
        if a.ndim < 2 or b.ndim < 2:
            raise ValueError(f"MatMul needs arrays of at least 2 axes, got shapes {a.shape} and {b.shape}; "
                             "reshape a vector to (1, K) or (K, 1)")
        if matmul_kernels.is_bf16(a) or matmul_kernels.is_bf16(b):
            raise TypeError("MatMul: bf16 bits are only supported as the weight of Linear")
        self.save_for_backward(a, b)
        return matmul_kernels.matmul(a, b)

    def backward(self, dy):
        a, b = self.saved
        da = db = None
        if self.needs_input_grad[0]:
            # y = a b  ->  da = dy bᵀ, then sum over batch axes a was broadcast along
            da = unbroadcast(matmul_kernels.matmul(dy, np.swapaxes(b, -1, -2)), a.shape)
        if self.needs_input_grad[1]:
            # y = a b  ->  db = aᵀ dy
            db = unbroadcast(matmul_kernels.matmul(np.swapaxes(a, -1, -2), dy), b.shape)
        return da, db


class LinearFn(Function):
    """x (..., C_in), w (C_out, C_in) float or bf16 bits, [b (C_out,)] -> (..., C_out)"""

    def forward(self, x, w, b=None):
        if matmul_kernels.is_bf16(w) and self.needs_input_grad[1]:
            raise TypeError("Linear: a bf16 weight (np.uint16 bits) cannot require grad; bf16 is the "
                            "storage of frozen weights, keep a trainable weight in float32 or float64")
        if b is not None and matmul_kernels.is_bf16(b) and self.needs_input_grad[2]:
            raise TypeError("Linear: a bf16 bias (np.uint16 bits) cannot require grad")
        c_in, c_out = w.shape[1], w.shape[0]
        if x.shape[-1] != c_in:
            raise ValueError(f"Linear: x has {x.shape[-1]} features, weight {w.shape} expects {c_in}")
        x2 = np.ascontiguousarray(x.reshape(-1, c_in))        # (N, C_in), N = all leading axes
        y = matmul_kernels.linear(x2, w, b)                   # (N, C_out)
        # Keep x only if dW will be needed, and W only if dx will be.
        self.save_for_backward(x2 if self.needs_input_grad[1] else None,
                               w if self.needs_input_grad[0] else None,
                               x.shape, w.dtype, None if b is None else b.dtype)
        return y.reshape(x.shape[:-1] + (c_out,))

    def backward(self, dy):
        x2, w, x_shape, w_dtype, b_dtype = self.saved
        dy2 = dy.reshape(-1, dy.shape[-1])                    # (N, C_out)
        dx = dw = db = None
        if self.needs_input_grad[0]:
            # y = x Wᵀ  ->  dx = dy W   (N, C_out) @ (C_out, C_in) -> (N, C_in)
            w_dy = w if matmul_kernels.is_bf16(w) else w.astype(dy.dtype, copy=False)
            dx = matmul_kernels.matmul(dy2, w_dy).reshape(x_shape)
        if self.needs_input_grad[1]:
            # y = x Wᵀ  ->  dW = dyᵀ x   (C_out, N) @ (N, C_in) -> (C_out, C_in)
            dw = matmul_kernels.matmul(dy2.T, x2).astype(w_dtype, copy=False)
        if len(self.needs_input_grad) > 2 and self.needs_input_grad[2]:
            # y = ... + b  ->  db = dy summed over rows
            db = dy2.sum(axis=0).astype(b_dtype, copy=False)
        return (dx, dw) if len(self.needs_input_grad) == 2 else (dx, dw, db)


def linear(x, w, b=None):
    """x (..., C_in), w (C_out, C_in), b (C_out,) or None -> (..., C_out)"""
    return LinearFn.apply(x, w) if b is None else LinearFn.apply(x, w, b)


def widen_bf16(a: np.ndarray) -> np.ndarray:
    """bf16 bits (np.uint16) -> float32, exactly; any other array is returned as it is.

    For the few places above the ops that hold bf16-stored weights (building
    the model, merging LoRA) and need plain floats.
    """
    return matmul_kernels.bf16_to_f32(np.ascontiguousarray(a)) if matmul_kernels.is_bf16(a) else a
