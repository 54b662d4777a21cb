"""Cross-entropy kernels over rows of logits, with ignored rows.

For a row of logits z (V,) with target class c:

    lse  = log sum_v exp(z_v)       (computed as m + log sum exp(z_v - m), m = max z)
    loss = lse - z_c
    dz_v = softmax(z)_v - [v == c] = exp(z_v - lse) - [v == c]

Rows whose label equals `ignore_index` contribute nothing and get zero
gradient. Sums run in float64 whatever the logits' dtype (V is ~50k-150k).
The ops, with the mean over counted rows and the lm_head product fused in,
are in `tinylora/ops/cross_entropy.py`.
"""

import numba as nb
import numpy as np

from . import PARALLEL_MIN, max_or_nan, parallel_when_large, sum_f64
from .exp import exp_like


@parallel_when_large(PARALLEL_MIN)
def cross_entropy_rows(z, labels, ignore_index, grad):
    """z (N, V) logits, labels (N,) -> loss (N,) float64 (0 where ignored), lse (N,) float64

    With grad, z is overwritten in place by dloss_n / dz_n = softmax(z_n) -
    onehot(c_n), and by zeros in ignored rows: the gradient is formed while
    exp(z - m) is at hand, so each logit is exponentiated once, and no second
    (N, V) array is allocated. The caller scales it by dloss / (counted rows).
    """
    N, V = z.shape
    loss = np.zeros(N, dtype=np.float64)
    lse = np.zeros(N, dtype=np.float64)
    for n in nb.prange(N):
        row = z[n]
        c = labels[n]
        if c == ignore_index:
            if grad:
                row[:] = 0.0
            continue
        # m = max z (NaN if any logit is NaN, which then makes the whole row
        # NaN); subtracting it keeps every exponent <= 0, so exp cannot overflow.
        m = max_or_nan(row, V)
        target = row[c]
        if grad:                                # exp(z - m) overwrites z: it becomes dz below
            for v in range(V):                  # a loop LLVM vectorises (kernels/exp.py)
                row[v] = exp_like(row[v] - m)
            total = sum_f64(row, V)
        else:
            e = np.empty(V, dtype=z.dtype)
            for v in range(V):
                e[v] = exp_like(row[v] - m)
            total = sum_f64(e, V)
        lse[n] = m + np.log(total)              # log sum exp z = m + log sum exp(z - m)
        loss[n] = lse[n] - target
        if grad:
            inv = z.dtype.type(1.0 / total)
            for v in range(V):
                row[v] *= inv                   # softmax(z)_v = exp(z_v - m) / sum
            row[c] -= 1.0                       # - onehot(c)
    return loss, lse
