"""RoPE kernel: rotate each (x1, x2) pair of a head vector by its angle.

Hugging Face's "rotate half" layout pairs element d with element d + D/2:

    y[..., d]       = x[..., d] * cos[d] - x[..., d + D/2] * sin[d]
    y[..., d + D/2] = x[..., d + D/2] * cos[d] + x[..., d] * sin[d]      d < D/2

A rotation's inverse is its transpose, the rotation by -angle, so the backward
is the same loop with sin negated (`rope_backward`). The op and the angle
tables are in `tinylora/ops/rope.py`.
"""

import numba as nb
import numpy as np

from . import PARALLEL_MIN, parallel_when_large


@parallel_when_large(PARALLEL_MIN)
def rope_forward(x, cos, sin):
    """x (B, T, H, D), cos (B, T, D/2), sin (B, T, D/2) -> y (B, T, H, D)"""
    B, T, H, D = x.shape
    half = D // 2
    y = np.empty_like(x)
    for bt in nb.prange(B * T):
        b, t = bt // T, bt % T
        for h in range(H):
            for d in range(half):
                x1 = x[b, t, h, d]
                x2 = x[b, t, h, d + half]
                c = cos[b, t, d]
                s = sin[b, t, d]
                y[b, t, h, d] = x1 * c - x2 * s
                y[b, t, h, d + half] = x2 * c + x1 * s
    return y


def rope_backward(dy, cos, sin):
    """dy (B, T, H, D), cos, sin (B, T, D/2) -> dx (B, T, H, D)

    dx = R(angle)ᵀ dy = R(-angle) dy: the forward loop with sin negated.
    """
    return rope_forward(dy, cos, -sin)
