"""The LoRA linear layer as one op: a frozen W plus a trainable low-rank bypass.

LoRA (Hu et al., 2021, "LoRA: Low-Rank Adaptation of Large Language Models")
keeps a pretrained weight W (out, in) frozen and learns its change as a
product of two thin matrices, ΔW = s · B A with A (R, in), B (out, R), R ≪ in:

    forward:   u  = drop(x) Aᵀ                         (N, R)      the input squeezed to R numbers
               y  = x Wᵀ + bias + s · u Bᵀ              (N, out)
    backward:  dB = s · dyᵀ u                           (out, R)
               du = s · dy B                            (N, R)
               dA = duᵀ drop(x)                         (R, in)
               dx = dy W + drop'(du A)                  (N, in)
    never:     dW (out, in) — W is frozen; that product would cost as much as the forward

`drop` is inverted dropout on the bypass input only (a fixed mask `keep`,
scaled by 1/(1-p), drawn by the caller), and drop' applies the same mask.
With B = 0 at the start, y equals the base layer's output exactly, and dA is
zero until B moves away from zero: B learns first, then A.

The bypass costs 2·R·(in + out) FLOPs per token against 2·in·out for W:
for R = 8 and a 576×576 projection that is under 3 % more work. The frozen
products x Wᵀ and dy W are the same two dispatcher calls `LinearFn` makes
(kernels/weights.py), whatever W's storage; only the bypass is written here.
The module that owns A and B, and the scale s = alpha/R (or alpha/√R with
rsLoRA), is `LoraLinear` in tinylora/lora/inject.py, which also draws the
dropout mask. The same layer written as two linears and a scale, with no
hand-written backward, is `lora_linear` in ops/reference.py.
"""

import numpy as np

from ..kernels import weights
from ..tensor import Function


class LoraLinearFn(Function):
    """x (..., in), W (out, in), A (R, in), B (out, R), [bias (out,)] -> (..., out)"""

    def forward(self, x, w, lora_a, lora_b, bias=None, *, scale: float, keep=None):
        if self.needs_input_grad[1]:
            raise TypeError("LoraLinearFn: the base weight must be frozen (requires_grad False)")
        x2 = np.ascontiguousarray(x.reshape(-1, w.shape[1]))          # (N, in)
        if keep is not None:
            keep = keep.reshape(x2.shape).astype(x2.dtype, copy=False)  # (N, in) 0 or 1/(1-p)
        xd = x2 if keep is None else x2 * keep                          # (N, in)  drop(x)
        y = weights.linear(x2, w, bias)                                 # (N, out) x Wᵀ + bias
        u = xd @ lora_a.T                                               # (N, R)   drop(x) Aᵀ
        y += (u * scale) @ lora_b.T                                     # (N, out) + s · u Bᵀ, s on the thin side
        self.save_for_backward(xd, w, lora_a, lora_b, u, keep, x.shape, scale)
        return y.reshape(x.shape[:-1] + (w.shape[0],))

    def backward(self, dy):
        xd, w, lora_a, lora_b, u, keep, x_shape, scale = self.saved
        dy2 = dy.reshape(-1, dy.shape[-1])                              # (N, out)
        du = scale * (dy2 @ lora_b)                                     # (N, R)    s · dy B
        dx = da = db = dbias = None
        if self.needs_input_grad[0]:
            bypass = du @ lora_a                                        # (N, in)   du A
            if keep is not None:
                bypass *= keep                                          # drop'(du A)
            dx = weights.linear_dx(dy2, w)                              # (N, in)   dy W
            dx += bypass                                                #           + drop'(du A)
            dx = dx.reshape(x_shape)
        if self.needs_input_grad[2]:
            da = du.T @ xd                                              # (R, in)   duᵀ drop(x)
        if self.needs_input_grad[3]:
            db = scale * (dy2.T @ u)                                    # (out, R)  s · dyᵀ u
        if len(self.needs_input_grad) > 4 and self.needs_input_grad[4]:
            dbias = dy2.sum(axis=0)
        return (dx, None, da, db, dbias)[:len(self.needs_input_grad)]   # no dbias slot without a bias


def lora_linear(x, w, lora_a, lora_b, bias=None, *, scale: float, keep=None):
    """x (..., in), W (out, in), A (R, in), B (out, R), [bias (out,)] -> (..., out); keep: the dropout mask or None"""
    inputs = (x, w, lora_a, lora_b) if bias is None else (x, w, lora_a, lora_b, bias)
    return LoraLinearFn.apply(*inputs, scale=scale, keep=keep)
