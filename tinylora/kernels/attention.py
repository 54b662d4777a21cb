"""Causal grouped-query attention kernels (forward and backward): BLAS tiles + Numba rows.

For one query row i and the keys j it may see (causal, not padding):

    s_ij = scale * q_i . k_j                  scale = 1 / sqrt(D)
    p_ij = exp(s_ij - lse_i)                  lse_i = log sum_j exp(s_ij)
    o_i  = sum_j p_ij v_j

Layout, chosen so the q/k/v projections reshape into it without a transpose:
q (B, T, H, D), k and v (B, S, K, D), out (B, T, H, D), key_mask (B, S).

* Grouped-query attention: the H query heads share K kv heads in groups of
  G = H // K; query head h reads kv head h // G (Ainslie et al., 2023, GQA).
  The G heads of a group are stacked as rows, q -> (B, K, T*G, D) with row
  r = t*G + (h mod G), so one (T*G, D) @ (D, S) product per kv head scores
  all of its query heads at once.
* KV cache: S >= T, and the first S - T keys are cached past tokens, so query
  t sits at absolute position S - T + t and sees keys j <= S - T + t.
* Packing: key_mask holds segment ids, 0 for padding and 1, 2, ... for the
  examples packed into one row; a query in segment n sees only keys of
  segment n (the block-diagonal causal mask of packed-sequence training).
  A 0/1 mask is the unpacked case: one segment per row. A query at a padded
  position (segment 0) sees every real key before it, as without packing.
* Padding: keys with key_mask[b, j] == 0 get probability exactly 0, and
  their k and v rows are replaced by zeros before any product, so whatever a
  padded k or v holds (even NaN) cannot leak in.
* A query row with no visible key at all (a left-padded position) outputs
  zeros; its lse is +inf so that exp(s - lse) = 0 for every key and the
  backward gives it exactly zero gradient. Nothing produces a NaN by itself.
* A future key gets probability exactly 0, so its finite values have no
  effect at all (the products add exact zeros). As in every attention that
  multiplies a masked probability matrix, a NaN or inf in a future key's v
  (or, in the backward, its k) still reaches earlier rows as 0 * NaN = NaN;
  such a value only comes from a model that has already diverged.

The work is split by what bounds it:
* The four (rows, D) x (D, keys) products of the forward and backward are
  dense GEMMs, which OpenBLAS runs near the machine's peak (np.matmul over
  the batch of kv heads); hand-written Numba loops reach a fraction of that.
* The row-wise softmax, with its masks, exp and log, is a Numba kernel
  parallel over rows, done in place on the score tile (`softmax_rows`, and
  its backward `softmax_rows_backward`).
Queries go in blocks of Q_BLOCK positions, and block [t0, t1) only scores
keys 0 .. S - T + t1 - 1, the ones its last query can see: causal attention
then costs about half of the full (T, S) square, and the score tile is
bounded by (B, K, Q_BLOCK*G, S) whatever T is.

One decoding step (T = 1) has too little work for BLAS tiles to pay: `attention_one_query`
does it in plain loops, with the same softmax.

Like FlashAttention (Dao et al., 2022) the forward keeps only lse per
(b, t, h), not the (T, S) probability matrix; the backward recomputes each
tile of p from s and lse. Products run in the input's dtype (float32 BLAS
accumulates in float32, as PyTorch's does); exp is kernels/exp.py's, in
the input's precision; the softmax's sum and log are taken in float64, and
lse is always float64. No fastmath flag that would let LLVM assume NaN
never occurs (and turn one into 0); only `_scores` lets its sums be
reordered, so that they vectorise.

The op and its math are in `tinylora/ops/attention.py`; the vectorised NumPy
reference these kernels are tested against is in `tests/test_attention.py`.
"""

import numba as nb
import numpy as np

from . import PARALLEL_MIN, parallel_when_large, sum_f64
from .exp import exp_like

Q_BLOCK = 256      # query positions per tile: bounds the score tile's memory, skips the causal upper half


@nb.njit(cache=True, inline="always")
def visible(key_mask, b, j, segment):
    """May a query of `segment` in row b see key j (not in its future)? A real key (segment id != 0) of
    the query's own segment; a padded query (segment 0) sees every real key, as without packing."""
    return key_mask[b, j] != 0 and (segment == 0 or key_mask[b, j] == segment)


@parallel_when_large(PARALLEL_MIN)
def softmax_rows(s, key_mask, first, G, lse):
    """s (B, K, R, Sb) scores, in place -> probabilities; key_mask (B, S);
    first: absolute position of the tile's first query; G: query heads per kv
    head -> fills lse (B, K, R) float64

    Row r holds query position first + r // G, which sees keys
    j <= first + r // G with visible(key_mask, b, j, segment); every other entry becomes 0.
    """
    B, K, R, Sb = s.shape
    for item in nb.prange(B * K * R):
        b, g, r = item // (K * R), (item // R) % K, item % R
        row = s[b, g, r]
        last = min(first + r // G, Sb - 1)    # causal: keys 0..last are not in the future
        segment = key_mask[b, first + r // G]   # the query's own example (0: a padded query)
        # Pass 1: the max m of the visible scores. Subtracting it before exp
        # keeps every exponent <= 0, so exp cannot overflow. `x > m` is False
        # for NaN, so a NaN is never the max, but exp(NaN - m) still reaches
        # the sum below and the row becomes NaN. Visible keys are counted,
        # not inferred from m: an all-NaN row must give NaN, not zeros.
        m = -np.inf
        n_visible = 0
        for j in range(last + 1):
            if visible(key_mask, b, j, segment):
                n_visible += 1
                if row[j] > m:
                    m = row[j]
        if n_visible == 0:                    # nothing to attend to: p = 0, output 0
            row[:] = 0.0
            lse[b, g, r] = np.inf             # exp(s - inf) = 0 in the backward
            continue
        # Pass 2: e_j = exp(s_j - m) (a loop LLVM vectorises: no sum in it),
        # then l = sum_j e_j, and p_j = e_j / l.
        m_row, zero = row.dtype.type(m), row.dtype.type(0.0)
        for j in range(last + 1):
            row[j] = exp_like(row[j] - m_row) if visible(key_mask, b, j, segment) else zero
        row[last + 1:] = zero
        l = sum_f64(row, last + 1)
        inv = row.dtype.type(1.0 / l)
        for j in range(last + 1):
            row[j] *= inv
        lse[b, g, r] = m + np.log(l)          # log sum_j exp(s_j) = m + log sum_j exp(s_j - m)


@parallel_when_large(PARALLEL_MIN)
def softmax_rows_backward(s, dp, lse, delta, key_mask, first, G):
    """s (B, K, R, Sb) scores, in place -> p; dp (B, K, R, Sb) = dO . v_j, in place
    -> ds; lse, delta (B, K, R); key_mask (B, S); first, G as in softmax_rows

    p_ij = exp(s_ij - lse_i) recomputes the forward's probabilities, and the
    softmax backward is ds_ij = p_ij (dp_ij - delta_i), delta_i = dO_i . o_i.
    Keys a row cannot see get p = ds = 0, whatever dp holds there.
    """
    B, K, R, Sb = s.shape
    for item in nb.prange(B * K * R):
        b, g, r = item // (K * R), (item // R) % K, item % R
        last = min(first + r // G, Sb - 1)
        segment = key_mask[b, first + r // G]
        row, drow = s[b, g, r], dp[b, g, r]
        lse_row, delta_row = row.dtype.type(lse[b, g, r]), row.dtype.type(delta[b, g, r])
        zero = row.dtype.type(0.0)
        for j in range(last + 1):                       # vectorised, as in softmax_rows
            seen = visible(key_mask, b, j, segment)
            p = exp_like(row[j] - lse_row) if seen else zero
            row[j] = p
            drow[j] = p * (drow[j] - delta_row) if seen else zero
        row[last + 1:] = zero
        drow[last + 1:] = zero


def _grouped(q, K):
    """q (B, T, H, D) -> (B, K, T*G, D), a copy: row t*G + i is query head g*G + i of kv head g"""
    B, T, H, D = q.shape
    return np.ascontiguousarray(q.reshape(B, T, K, H // K, D).transpose(0, 2, 1, 3, 4)).reshape(B, K, T * (H // K), D)


def _ungrouped(x, T):
    """(B, K, T*G, D) -> (B, T, H, D), a copy; the inverse of _grouped"""
    B, K, R, D = x.shape
    G = R // T
    return np.ascontiguousarray(x.reshape(B, K, T, G, D).transpose(0, 2, 1, 3, 4)).reshape(B, T, K * G, D)


def _kv_heads(x, key_mask):
    """k or v (B, S, K, D) -> (B, K, S, D): a transposed view (BLAS reads it as
    it is), or a copy with padded keys' rows zeroed when key_mask has zeros"""
    xt = x.transpose(0, 2, 1, 3)                                       # (B, K, S, D)
    if key_mask.all():
        return xt
    return np.where(key_mask[:, None, :, None] != 0, xt, x.dtype.type(0))


def _blocks(T):
    """(t0, t1) query-position blocks of at most Q_BLOCK covering 0..T"""
    return [(t0, min(t0 + Q_BLOCK, T)) for t0 in range(0, T, Q_BLOCK)]


# A dot product per key, summed in whatever order vectorises: the only fast-math flags in this file
# ("reassoc", "contract"), which change the order of the sum, never what NaN or inf give. A function
# of its own, so that the flags stay on its instructions and off the softmax's.
@nb.njit(cache=True, fastmath={"reassoc", "contract"}, error_model="numpy")
def _scores(qs, k, b, g, s):
    """qs (D,), k (B, S, K, D) -> s[j] = qs . k[b, j, g] for every key j (S,)"""
    for j in range(k.shape[1]):
        acc = qs.dtype.type(0.0)
        for d in range(qs.size):
            acc += qs[d] * k[b, j, g, d]
        s[j] = acc


@parallel_when_large(PARALLEL_MIN)
def attention_one_query(q, k, v, key_mask, scale):
    """q (B, 1, H, D), k (B, S, K, D), v (B, S, K, D), key_mask (B, S) bool, scale
    -> out (B, 1, H, D), lse (B, 1, H) float64

    One decoding step: its query sits after every key, so none is in the future. The same
    softmax as softmax_rows (the max first, float64 sum and log, padded keys exactly 0, no
    visible key -> zeros and lse = +inf), in a few loops per head instead of the tiled path's
    six NumPy calls around two small BLAS products (58 -> 18 us a SmolLM2 layer at 100 keys).
    """
    B, _, H, D = q.shape
    S, K = k.shape[1], k.shape[2]
    G = H // K
    out = np.zeros(q.shape, dtype=q.dtype)
    lse = np.empty((B, 1, H), dtype=np.float64)
    for item in nb.prange(B * H):
        b, h = item // H, item % H
        g = h // G                                        # the kv head of query head h (GQA)
        qs = q[b, 0, h] * q.dtype.type(scale)             # (D,) scale folded into q, as the tiles do
        s = np.empty(S, dtype=q.dtype)                    # s_j = scale q . k_j, then p_j
        _scores(qs, k, b, g, s)
        segment = key_mask[b, S - 1]                      # the query's own example
        m, n_visible = -np.inf, 0
        for j in range(S):
            if visible(key_mask, b, j, segment):
                n_visible += 1
                if s[j] > m:
                    m = s[j]
            else:
                s[j] = -np.inf                            # exp(-inf - m) = 0 exactly
        if n_visible == 0:
            lse[b, 0, h] = np.inf
            continue
        m_row = q.dtype.type(m)
        for j in range(S):
            s[j] = exp_like(s[j] - m_row)
        l = sum_f64(s, S)
        inv = q.dtype.type(1.0 / l)
        o = out[b, 0, h]
        for j in range(S):
            if visible(key_mask, b, j, segment):          # a hidden key is skipped, never multiplied by 0
                p = s[j] * inv
                for d in range(D):
                    o[d] += p * v[b, j, g, d]
        lse[b, 0, h] = m + np.log(l)
    return out, lse


def attention_forward(q, k, v, key_mask, scale):
    """q (B, T, H, D), k (B, S, K, D), v (B, S, K, D), key_mask (B, S) bool, scale
    -> out (B, T, H, D), lse (B, T, H) float64"""
    B, T, H, D = q.shape
    if T == 1:
        return attention_one_query(q, k, v, key_mask, scale)
    S, K = k.shape[1], k.shape[2]
    G, past = H // K, S - T
    qg = _grouped(q * q.dtype.type(scale), K)             # (B, K, T*G, D), scale folded into q
    kh, vh = _kv_heads(k, key_mask), _kv_heads(v, key_mask)   # (B, K, S, D)
    out = np.empty(qg.shape, dtype=q.dtype)               # (B, K, T*G, D)
    lse = np.empty((B, K, T * G), dtype=np.float64)
    for t0, t1 in _blocks(T):
        rows, keys = slice(t0 * G, t1 * G), past + t1     # the tile's rows; the keys its last query sees
        s = qg[:, :, rows] @ kh[:, :, :keys].swapaxes(-1, -2)    # (B, K, Rb, keys)  s = scale q kᵀ
        softmax_rows(s, key_mask, past + t0, G, lse[:, :, rows])  # s -> p in place
        np.matmul(s, vh[:, :, :keys], out=out[:, :, rows])       # (B, K, Rb, D)    o = p v
    return _ungrouped(out, T), _ungrouped(lse[..., None], T)[..., 0]


def attention_backward(dout, q, k, v, out, lse, key_mask, scale):
    """dout (B, T, H, D), q (B, T, H, D), k (B, S, K, D), v (B, S, K, D),
    out (B, T, H, D), lse (B, T, H), key_mask (B, S), scale
    -> dq (B, T, H, D), dk (B, S, K, D), dv (B, S, K, D)

    Inverting the forward, tile by tile:
        p  = exp(s - lse)              recomputed from s = scale q kᵀ
        dv = pᵀ dO                     o = p v
        dp = dO vᵀ                     (same line, gradient reaching p)
        ds = p (dp - delta)            p = softmax(s), delta_i = dO_i . o_i
        dq = scale ds k                s = scale q kᵀ
        dk = scale dsᵀ q               (same line)
    A kv head's dk and dv sum over the G query heads of its group: they are
    rows of the same tile, so the products do the sum.
    """
    B, T, H, D = q.shape
    S, K = k.shape[1], k.shape[2]
    G, past = H // K, S - T
    qg = _grouped(q * q.dtype.type(scale), K)             # (B, K, T*G, D)  scale q
    dog = _grouped(dout, K)                               # (B, K, T*G, D)  dO
    # delta_i = dO_i . o_i is the softmax backward's sum_j p_ij dp_ij, read off the output.
    delta = _grouped(np.einsum("bthd,bthd->bth", dout, out, dtype=np.float64)[..., None], K)[..., 0]
    lse_g = _grouped(lse[..., None], K)[..., 0]           # (B, K, T*G)
    kh, vh = _kv_heads(k, key_mask), _kv_heads(v, key_mask)   # (B, K, S, D)
    dq = np.empty(qg.shape, dtype=q.dtype)                # (B, K, T*G, D)
    dk = np.zeros((B, K, S, D), dtype=k.dtype)
    dv = np.zeros((B, K, S, D), dtype=v.dtype)
    for t0, t1 in _blocks(T):
        rows, keys = slice(t0 * G, t1 * G), past + t1
        s = qg[:, :, rows] @ kh[:, :, :keys].swapaxes(-1, -2)    # (B, K, Rb, keys)
        dp = dog[:, :, rows] @ vh[:, :, :keys].swapaxes(-1, -2)  # (B, K, Rb, keys)  dO vᵀ
        softmax_rows_backward(s, dp, lse_g[:, :, rows], delta[:, :, rows], key_mask, past + t0, G)
        dv[:, :, :keys] += s.swapaxes(-1, -2) @ dog[:, :, rows]  # (B, K, keys, D)  pᵀ dO
        dk[:, :, :keys] += dp.swapaxes(-1, -2) @ qg[:, :, rows]  # (B, K, keys, D)  dsᵀ (scale q)
        np.matmul(dp, kh[:, :, :keys], out=dq[:, :, rows])       # (B, K, Rb, D)    ds k
    dq *= q.dtype.type(scale)
    return _ungrouped(dq, T), np.ascontiguousarray(dk.transpose(0, 2, 1, 3)), \
        np.ascontiguousarray(dv.transpose(0, 2, 1, 3))
