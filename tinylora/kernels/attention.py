"""Causal grouped-query attention kernels (forward and backward), Numba loops.

For one query row i and the keys j it may see (causal, not padding):

    s_ij = scale * q_i . k_j                  scale = 1 / sqrt(D)
    p_ij = exp(s_ij - lse_i)                  lse_i = log sum_j exp(s_ij)
    o_i  = sum_j p_ij v_j

Layout, chosen so the q/k/v projections reshape into it without a transpose:
q (B, T, H, D), k and v (B, S, K, D), out (B, T, H, D), key_mask (B, S).

* Grouped-query attention: the H query heads share K kv heads in groups of
  G = H // K; query head h reads kv head h // G (Ainslie et al., 2023, GQA).
* KV cache: S >= T, and the first S - T keys are cached past tokens, so query
  t sits at absolute position S - T + t and sees keys j <= S - T + t.
* Padding: keys with key_mask[b, j] == 0 are skipped, never multiplied by a
  zero weight, so whatever a padded k or v holds (even NaN) cannot leak in.
* A query row with no visible key at all (a left-padded position) outputs
  zeros; its lse is +inf so that exp(s - lse) = 0 for every key and the
  backward gives it exactly zero gradient. Nothing produces a NaN by itself.

Like FlashAttention (Dao et al., 2022) the forward keeps only lse per
(b, t, h), not the (T, S) probability matrix; the backward recomputes each
p_ij from s_ij and lse_i. A row of S scores lives in a scratch buffer during
the forward (two passes: find the max, then exponentiate) rather than being
rescaled online; it is O(S) per thread, never O(T * S).

Dot products and sums are accumulated in float64 whatever the input dtype;
results are stored in the input's dtype (lse always in float64, it is small).
Any strided layout works, e.g. a preallocated cache buffer k_cache[:, :S].
No fastmath: it would let LLVM assume NaN never occurs and turn one into 0.

The op and its math are in `tinylora/ops/attention.py`; the vectorised NumPy
reference these loops are tested against is in `tests/test_attention.py`.
"""

import numba as nb
import numpy as np


@nb.njit(inline="always", cache=True)
def _dot(a, b):
    """a (D,), b (D,) -> sum_d a[d] * b[d], accumulated in float64

    Four partial sums instead of one. Without fastmath the compiler must add
    in exactly the order written, so a single accumulator is one long chain of
    dependent additions, each waiting for the previous; four independent
    chains overlap in the CPU's pipeline (about 15% faster here). The order is
    still fixed, so results are deterministic.
    """
    n = a.shape[0]
    s0 = s1 = s2 = s3 = 0.0
    d = 0
    while d + 4 <= n:
        s0 += np.float64(a[d]) * b[d]
        s1 += np.float64(a[d + 1]) * b[d + 1]
        s2 += np.float64(a[d + 2]) * b[d + 2]
        s3 += np.float64(a[d + 3]) * b[d + 3]
        d += 4
    while d < n:                                # the tail when D is not a multiple of 4
        s0 += np.float64(a[d]) * b[d]
        d += 1
    return (s0 + s1) + (s2 + s3)


@nb.njit(parallel=True, cache=True)
def attention_forward(q, k, v, key_mask, scale):
    """q (B, T, H, D), k (B, S, K, D), v (B, S, K, D), key_mask (B, S), scale
    -> out (B, T, H, D), lse (B, T, H) float64

    Work items are (batch, query head) pairs: each writes only its own out and
    lse slices, so they run in parallel without coordination.
    """
    B, T, H, D = q.shape
    S, K = k.shape[1], k.shape[2]
    G = H // K                                  # query heads per kv head
    past = S - T                                # cached keys before query 0
    out = np.empty(q.shape, dtype=q.dtype)
    lse = np.empty((B, T, H), dtype=np.float64)
    for item in nb.prange(B * H):
        b, h = item // H, item % H
        g = h // G                              # the kv head this query head reads
        s = np.empty(S, dtype=np.float64)      # one row of scores, reused per query
        acc = np.empty(D, dtype=np.float64)    # one output row, accumulated in float64
        for t in range(T):
            last = past + t                     # causal: keys 0..last are not in the future
            # Pass 1: scores of the visible keys, and their max m. Subtracting
            # m before exp keeps every exponent <= 0, so exp cannot overflow.
            # `s > m` is False for NaN, so a NaN score is never the max, but
            # exp(NaN - m) still reaches the sums below and the output is NaN.
            # Visible keys are counted, not inferred from m: an all-NaN row
            # must give NaN, not the zeros of a row with no key.
            m = -np.inf
            n_visible = 0
            for j in range(last + 1):
                if not key_mask[b, j]:
                    continue
                s[j] = scale * _dot(q[b, t, h], k[b, j, g])
                if s[j] > m:
                    m = s[j]
                n_visible += 1
            if n_visible == 0:                  # nothing to attend to: output 0
                for d in range(D):
                    out[b, t, h, d] = 0.0
                lse[b, t, h] = np.inf           # exp(s - inf) = 0 in the backward
                continue
            # Pass 2: o = sum_j exp(s_j - m) v_j / l with l = sum_j exp(s_j - m).
            l = 0.0
            acc[:] = 0.0
            for j in range(last + 1):
                if not key_mask[b, j]:
                    continue
                e = np.exp(s[j] - m)
                l += e
                for d in range(D):
                    acc[d] += e * v[b, j, g, d]
            for d in range(D):
                out[b, t, h, d] = acc[d] / l
            # log sum_j exp(s_j) = m + log sum_j exp(s_j - m)
            lse[b, t, h] = m + np.log(l)
    return out, lse


@nb.njit(parallel=True, cache=True)
def attention_backward(dout, q, k, v, out, lse, key_mask, scale):
    """dout (B, T, H, D), q (B, T, H, D), k (B, S, K, D), v (B, S, K, D),
    out (B, T, H, D), lse (B, T, H), key_mask (B, S), scale
    -> dq (B, T, H, D), dk (B, S, K, D), dv (B, S, K, D)

    Inverting the forward, for each visible pair (i, j):
        dv_j += p_ij dO_i                  o_i  = sum_j p_ij v_j
        dp_ij = dO_i . v_j                 (same line, gradient reaching p)
        ds_ij = p_ij (dp_ij - delta_i)     p_ij = softmax_j(s_ij)
            with delta_i = sum_j p_ij dp_ij = dO_i . o_i
        dq_i += scale ds_ij k_j            s_ij = scale q_i . k_j
        dk_j += scale ds_ij q_i            (same line)

    Work items are (batch, kv head) pairs. A kv head's dk and dv collect
    contributions from all G query heads of its group and all T queries, and
    only this work item touches them, so there are no races; the dq rows of
    the group's query heads are likewise written by this item alone.
    """
    B, T, H, D = q.shape
    S, K = k.shape[1], k.shape[2]
    G = H // K
    past = S - T
    dq = np.empty(q.shape, dtype=q.dtype)
    dk = np.empty(k.shape, dtype=k.dtype)
    dv = np.empty(v.shape, dtype=v.dtype)
    for item in nb.prange(B * K):
        b, g = item // K, item % K
        dk_acc = np.zeros((S, D), dtype=np.float64)   # this kv head's dk, dv, in float64
        dv_acc = np.zeros((S, D), dtype=np.float64)
        dq_acc = np.empty(D, dtype=np.float64)        # one dq row
        for h in range(g * G, (g + 1) * G):           # the query heads reading kv head g
            for t in range(T):
                # delta_i = dO_i . o_i: the softmax backward's sum_j p_ij dp_ij,
                # read off the saved output instead of a second pass over j.
                delta = _dot(dout[b, t, h], out[b, t, h])
                dq_acc[:] = 0.0
                # The same visible keys as the forward; a row with none leaves
                # dq_acc at zero (and its lse of +inf would zero p anyway).
                for j in range(past + t + 1):
                    if not key_mask[b, j]:
                        continue
                    # forward: s[j] = scale * _dot(q, k); e = exp(s[j] - m); e / l
                    # Recompute p_ij = exp(s_ij - lse_i), as lse_i = m + log l.
                    p = np.exp(scale * _dot(q[b, t, h], k[b, j, g]) - lse[b, t, h])
                    # forward: acc[d] += e * v[b, j, g, d]   (o_i = sum_j p_ij v_j)
                    dp = _dot(dout[b, t, h], v[b, j, g])         # dp_ij = dO_i . v_j
                    ds = p * (dp - delta)                       # ds_ij = p_ij (dp_ij - delta_i)
                    for d in range(D):
                        dv_acc[j, d] += p * dout[b, t, h, d]     # dv_j += p_ij dO_i
                        dq_acc[d] += ds * k[b, j, g, d]         # dq_i += ds_ij k_j
                        dk_acc[j, d] += ds * q[b, t, h, d]      # dk_j += ds_ij q_i
                for d in range(D):
                    dq[b, t, h, d] = scale * dq_acc[d]           # the scale of s_ij, applied once
        for j in range(S):
            for d in range(D):
                dk[b, j, g, d] = scale * dk_acc[j, d]
                dv[b, j, g, d] = dv_acc[j, d]
    return dq, dk, dv
