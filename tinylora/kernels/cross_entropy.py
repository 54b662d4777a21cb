"""Cross-entropy kernels over rows of logits, with ignored rows.

For a row of logits z (V,) with target class c:

    lse  = log sum_v exp(z_v)       (computed as m + log sum exp(z_v - m), m = max z)
    loss = lse - z_c
    dz_v = softmax(z)_v - [v == c] = exp(z_v - lse) - [v == c]

Rows whose label equals `ignore_index` contribute nothing and get zero
gradient. Sums run in float64 whatever the logits' dtype (V is ~50k-150k).
The op, with the mean over counted rows, is in `tinylora/ops/cross_entropy.py`.
"""

import numba as nb
import numpy as np


@nb.njit(parallel=True, cache=True)
def cross_entropy_forward(logits, labels, ignore_index):
    """logits (N, V), labels (N,) -> loss (N,) float64 (0 where ignored), lse (N,) float64"""
    N, V = logits.shape
    loss = np.zeros(N, dtype=np.float64)
    lse = np.zeros(N, dtype=np.float64)
    for n in nb.prange(N):
        if labels[n] == ignore_index:
            continue
        m = logits[n, 0]
        for v in range(1, V):
            if logits[n, v] > m or np.isnan(logits[n, v]):
                m = logits[n, v]
        total = 0.0
        for v in range(V):
            total += np.exp(np.float64(logits[n, v]) - m)
        lse[n] = m + np.log(total)
        loss[n] = lse[n] - logits[n, labels[n]]
    return loss, lse


@nb.njit(parallel=True, cache=True)
def cross_entropy_backward(logits, labels, lse, ignore_index, scale):
    """logits (N, V), labels (N,), lse (N,) -> dlogits (N, V)

    dlogits[n] = scale * (softmax(logits[n]) - onehot(labels[n])), zero for
    ignored rows; `scale` is dloss / (number of counted rows) for a mean.
    """
    N, V = logits.shape
    dlogits = np.empty_like(logits)
    for n in nb.prange(N):
        if labels[n] == ignore_index:
            for v in range(V):
                dlogits[n, v] = 0.0
            continue
        for v in range(V):
            dlogits[n, v] = scale * np.exp(np.float64(logits[n, v]) - lse[n])
        dlogits[n, labels[n]] -= scale
    return dlogits
