"""RMSNorm kernels (forward and backward), Numba loops on plain arrays.

    rstd_n = 1 / sqrt(mean_c x[n, c]^2 + eps)
    y[n, c] = x[n, c] * rstd_n * w[c]

The op and its math live in `tinylora/ops/rmsnorm.py`; the vectorised NumPy
reference these loops are tested against lives in `tests/test_kernels.py`.
Sums of squares are accumulated in float64 whatever the input dtype (a row of
several thousand float32 squares loses digits otherwise); results are stored
in the input's dtype. Rows are independent, so they are spread over threads.
"""

import numba as nb
import numpy as np

from . import PARALLEL_MIN, parallel_when_large


@parallel_when_large(PARALLEL_MIN)
def rmsnorm_forward(x, w, eps):
    """x (N, C), w (C,) -> y (N, C), rstd (N,)"""
    N, C = x.shape
    y = np.empty_like(x)
    rstd = np.empty(N, dtype=x.dtype)
    for n in nb.prange(N):
        ss = 0.0
        for c in range(C):
            ss += np.float64(x[n, c]) * x[n, c]
        r = 1.0 / np.sqrt(ss / C + eps)
        rstd[n] = r
        for c in range(C):
            y[n, c] = x[n, c] * r * w[c]
    return y, rstd


@parallel_when_large(PARALLEL_MIN)
def rmsnorm_backward(dy, x, w, rstd):
    """dy (N, C), x (N, C), w (C,), rstd (N,) -> dx (N, C)

    With xhat = x * rstd and g = dy * w (the gradient reaching xhat):
        dx = rstd * (g - xhat * mean_c(g * xhat))
    The mean term is the part of g along xhat, removed because scaling x
    does not change xhat.
    """
    N, C = x.shape
    dx = np.empty_like(x)
    for n in nb.prange(N):
        r = np.float64(rstd[n])
        dot = 0.0
        for c in range(C):
            dot += np.float64(dy[n, c]) * w[c] * (x[n, c] * r)
        m = dot / C
        for c in range(C):
            dx[n, c] = r * (dy[n, c] * w[c] - x[n, c] * r * m)
    return dx


@nb.njit(cache=True)
def rmsnorm_backward_weight(dy, x, rstd):
    """dy (N, C), x (N, C), rstd (N,) -> dw (C,) = sum_n dy[n, c] * xhat[n, c]

    Serial over rows (each row adds into every dw[c]); only runs when the norm
    weight is trainable, which LoRA training never needs.
    """
    N, C = x.shape
    acc = np.zeros(C, dtype=np.float64)
    for n in range(N):
        r = np.float64(rstd[n])
        for c in range(C):
            acc[c] += np.float64(dy[n, c]) * x[n, c] * r
    return acc.astype(x.dtype)
