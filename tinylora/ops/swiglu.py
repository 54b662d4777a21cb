"""SwiGLU: the gated activation of the Qwen2/Llama MLP (Shazeer, 2020, "GLU Variants").

The MLP is  down_proj( silu(gate_proj(x)) * up_proj(x) ); this op is the middle:

    forward:   y  = silu(g) * u,            silu(g) = g * sigmoid(g)
    backward:  du = dy * silu(g)
               dg = dy * u * s * (1 + g * (1 - s)),    s = sigmoid(g)

The loops are in `tinylora/kernels/swiglu.py`; the plain silu(g) · u, with no
hand-written backward, is `swiglu` in ops/reference.py.
"""

import numpy as np

from ..kernels.swiglu import swiglu_backward, swiglu_forward
from ..tensor import Function, Tensor


class SwiGLUFn(Function):
    """g (..., F), u (..., F) -> silu(g) * u (..., F)"""

    def forward(self, g, u):
        if g.shape != u.shape:
            raise ValueError(f"swiglu: gate {g.shape} and up {u.shape} differ in shape")
        F = g.shape[-1]
        g2 = np.ascontiguousarray(g.reshape(-1, F))   # (N, F)
        u2 = np.ascontiguousarray(u.reshape(-1, F))   # (N, F)
        self.save_for_backward(g2, u2)
        return swiglu_forward(g2, u2).reshape(g.shape)

    def backward(self, dy):
        g2, u2 = self.saved
        dg, du = swiglu_backward(np.ascontiguousarray(dy.reshape(g2.shape)), g2, u2)
        return (dg.reshape(dy.shape) if self.needs_input_grad[0] else None,
                du.reshape(dy.shape) if self.needs_input_grad[1] else None)


def swiglu(g: Tensor, u: Tensor) -> Tensor:
    """g (..., F), u (..., F) -> (..., F)"""
    return SwiGLUFn.apply(g, u)
