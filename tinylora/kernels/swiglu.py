"""SwiGLU kernels: the gated product of the Qwen2/Llama MLP, in one pass.

    y = silu(g) * u,   silu(g) = g * s,   s = sigmoid(g) = 1 / (1 + exp(-g))

Fusing the SiLU and the product reads g and u once and writes y once, instead
of three NumPy passes with two temporaries of size (N, F); exp is
kernels/exp.py's, which LLVM vectorises. The op is in `tinylora/ops/swiglu.py`.
"""

import numba as nb
import numpy as np

from . import PARALLEL_MIN, parallel_when_large
from .exp import exp_like


@parallel_when_large(PARALLEL_MIN)
def swiglu_forward(g, u):
    """g (N, F), u (N, F) -> y (N, F)"""
    N, F = g.shape
    y = np.empty_like(g)
    one = g.dtype.type(1.0)
    for n in nb.prange(N):
        for f in range(F):
            s = one / (one + exp_like(-g[n, f]))
            y[n, f] = g[n, f] * s * u[n, f]
    return y


@parallel_when_large(PARALLEL_MIN)
def swiglu_backward(dy, g, u):
    """dy (N, F), g (N, F), u (N, F) -> dg (N, F), du (N, F)

    du = dy * silu(g)
    dg = dy * u * silu'(g),   silu'(g) = s + g s (1 - s) = s (1 + g (1 - s))
    The sigmoid is recomputed rather than saved: cheaper than storing (N, F).
    """
    N, F = g.shape
    dg = np.empty_like(g)
    du = np.empty_like(u)
    one = g.dtype.type(1.0)
    for n in nb.prange(N):
        for f in range(F):
            s = one / (one + exp_like(-g[n, f]))
            du[n, f] = dy[n, f] * g[n, f] * s
            dg[n, f] = dy[n, f] * u[n, f] * s * (one + g[n, f] * (one - s))
    return dg, du
