"""Causal grouped-query attention with a key padding mask and a KV-cache offset.

For each batch row b, query head h (reading kv head g = h // (H // K)) and
query t at absolute position S - T + t, over the visible keys
j <= S - T + t with key_mask[b, j] != 0:

    forward:   s_tj  = q_t . k_j / sqrt(D)                      scores
               p_tj  = exp(s_tj) / sum_j' exp(s_tj')           softmax over visible keys
               o_t   = sum_j p_tj v_j
    backward:  dv_j  = sum_t p_tj dO_t                          (summed over the group's heads)
               dp_tj = dO_t . v_j
               ds_tj = p_tj (dp_tj - dO_t . o_t)                softmax backward
               dq_t  = sum_j ds_tj k_j / sqrt(D)
               dk_j  = sum_t ds_tj q_t / sqrt(D)                (summed over the group's heads)

The softmax backward in one line: with p = softmax(s), dL/ds_j =
p_j (dp_j - sum_j' p_j' dp_j'), and sum_j' p_j' dp_j' = dO . sum_j' p_j' v_j'
= dO . o, so it costs one dot product per query, not a pass over the keys.

A key a query cannot see gets probability exactly 0 from it and no gradient
through it; a padded key is seen by no query, so its dk and dv are exactly 0.
A query with no visible key at all (a left-padded position) outputs 0 and
gets 0 gradient. The kernels, and why they keep only a log-sum-exp per
query instead of the (T, S) matrix p, are in `tinylora/kernels/attention.py`.
The same attention written as softmax(q kᵀ / √D + mask) v from primitives,
with no hand-written backward, is `attention` in ops/reference.py.

Not here: the projections, RoPE and the cache itself (the model and cache.py);
dropout on the attention weights (Qwen2 and Llama train without it); sliding
windows; attention biases other than the padding mask.
"""

import numpy as np

from ..kernels.attention import attention_backward, attention_forward
from ..tensor import Function


def _check_shapes(q, k, v, key_mask) -> None:
    """Raise one clear ValueError for shapes the kernels cannot honour."""
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"attention: q, k, v must be 4-d, (B, T, H, D) and (B, S, K, D); "
                         f"got q {q.shape}, k {k.shape}, v {v.shape}")
    B, T, H, D = q.shape
    if k.shape != v.shape:
        raise ValueError(f"attention: k {k.shape} and v {v.shape} must have the same shape (B, S, K, D)")
    Bk, S, Kh, Dk = k.shape
    if Bk != B or Dk != D:
        raise ValueError(f"attention: k/v {k.shape} do not match q {q.shape} in batch or head dim")
    if Kh == 0 or H % Kh != 0:
        raise ValueError(f"attention: {H} query heads is not a multiple of {Kh} kv heads")
    if S < T:
        raise ValueError(f"attention: {S} keys for {T} queries; need S >= T "
                         "(the last T keys are the queries' own)")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (np.float32, np.float64):
        raise ValueError(f"attention: q, k, v must share one dtype, float32 or float64; "
                         f"got {q.dtype}, {k.dtype}, {v.dtype}")
    if key_mask is not None and np.shape(key_mask) != (B, S):
        raise ValueError(f"attention: key_mask has shape {np.shape(key_mask)}, expected (B, S) = {(B, S)}")


class CausalAttentionFn(Function):
    """q (B, T, H, D), k (B, S, K, D), v (B, S, K, D); key_mask (B, S) or None
    -> out (B, T, H, D)

    key_mask: 1 for a real token, 0 for padding (the batch's attention_mask,
    covering cached and new keys); None means every key is real. In a packed
    batch it holds each token's example, 1, 2, ... (0 still padding), and a
    query sees only the keys of its own example. k and v may be strided
    views, e.g. the filled part of a preallocated KV cache.
    """

    def forward(self, q, k, v, *, key_mask=None):
        _check_shapes(q, k, v, key_mask)
        B, T, H, D = q.shape
        S = k.shape[1]
        # The kernels take any layout, but each layout is a separate JIT
        # compilation; q is small, so make it contiguous. k and v are left
        # alone: copying a long cache every decoding step would cost as much
        # as attending to it.
        q = np.ascontiguousarray(q)
        if key_mask is None:
            mask = np.ones((B, S), dtype=np.bool_)                  # (B, S) every key real
        else:
            mask = np.ascontiguousarray(np.asarray(key_mask) != 0)   # (B, S) bool, any 0/1 dtype in
            if mask.any() and np.asarray(key_mask).max() > 1:         # segment ids of a packed batch
                mask = np.ascontiguousarray(key_mask, dtype=np.int32)
        scale = 1.0 / np.sqrt(D)
        out, lse = attention_forward(q, k, v, mask, scale)
        # Saved: the inputs (views, not copies), the output for delta = dO . o,
        # and lse (B, T, H) to recompute p. Never the (B, H, T, S) matrix.
        self.save_for_backward(q, k, v, out, lse, mask, scale)
        return out

    def backward(self, dy):
        q, k, v, out, lse, mask, scale = self.saved
        # One kernel computes all three: dq comes almost for free with dk and
        # dv (same loop, same recomputed p), and in a LoRA model the three
        # usually all need a gradient anyway (they lead back to earlier layers).
        dq, dk, dv = attention_backward(np.ascontiguousarray(dy), q, k, v, out, lse, mask, scale)
        return (dq if self.needs_input_grad[0] else None,
                dk if self.needs_input_grad[1] else None,
                dv if self.needs_input_grad[2] else None)


def attention(q, k, v, key_mask=None):
    """q (B, T, H, D), k (B, S, K, D), v (B, S, K, D) Tensors; key_mask (B, S)
    array or None -> out (B, T, H, D) Tensor

    Causal grouped-query attention: query t (at position S - T + t) attends
    to keys 0 .. S - T + t that key_mask marks as real.
    """
    return CausalAttentionFn.apply(q, k, v, key_mask=key_mask)
