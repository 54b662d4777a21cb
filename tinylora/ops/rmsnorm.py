"""RMSNorm (Zhang & Sennrich, 2019), as Qwen2 and Llama use it.

    forward:   rstd = 1 / sqrt(mean(x^2, last axis) + eps)       (..., 1)
               y    = (x * rstd) * w                              (..., C)
    backward:  xhat = x * rstd,  g = dy * w
               dx   = rstd * (g - xhat * mean(g * xhat, last axis))
               dw   = sum over all rows of dy * xhat

Unlike LayerNorm there is no mean subtraction and no bias. The loops are in
`tinylora/kernels/rmsnorm.py`.
"""

import numpy as np

from ..kernels.rmsnorm import rmsnorm_backward, rmsnorm_backward_weight, rmsnorm_forward
from ..tensor import Function


class RMSNormFn(Function):
    """x (..., C), w (C,) -> y (..., C)"""

    def forward(self, x, w, *, eps: float):
        C = x.shape[-1]
        x2 = np.ascontiguousarray(x.reshape(-1, C))        # (N, C), N = all leading axes
        y, rstd = rmsnorm_forward(x2, w.astype(x.dtype, copy=False), eps)
        self.save_for_backward(x2, w, rstd)
        return y.reshape(x.shape)

    def backward(self, dy):
        x2, w, rstd = self.saved
        dy2 = np.ascontiguousarray(dy.reshape(x2.shape))    # (N, C)
        dx = dw = None
        if self.needs_input_grad[0]:
            dx = rmsnorm_backward(dy2, x2, w.astype(x2.dtype, copy=False), rstd).reshape(dy.shape)
        if self.needs_input_grad[1]:
            dw = rmsnorm_backward_weight(dy2, x2, rstd).astype(w.dtype, copy=False)
        return dx, dw


def rms_norm(x, w, eps: float = 1e-6):
    """x (..., C), w (C,) -> (..., C)"""
    return RMSNormFn.apply(x, w, eps=eps)
