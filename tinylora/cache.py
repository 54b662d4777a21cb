"""The KV cache: keys and values of past tokens, so each new token runs through the model alone.

Without a cache, generating token n means running the whole prefix of n
tokens through the model again. With it, the prefix is run once (prefill) and
each layer stores its keys and values; every later step runs one new token,
appends its k and v, and attends to everything stored. The result is the same
as recomputing (the test suite checks token for token), because causal
attention never lets an old token see a new one, so old keys never change.

Buffers are preallocated to `max_length` per layer, so a step writes in place
and hands the attention kernel a view of the filled part, with no copying.
RoPE is applied before caching: the keys stored are already rotated for
their own positions.
"""

from __future__ import annotations

import numpy as np

from .errors import TinyloraError


class KVCache:
    """Per layer: k, v buffers (B, max_length, K, D); `length` positions filled."""

    def __init__(self, num_layers: int, batch: int, max_length: int, num_kv_heads: int, head_dim: int,
                 dtype=np.float32):
        shape = (batch, max_length, num_kv_heads, head_dim)                  # (B, S_max, K, D)
        self.k = [np.zeros(shape, dtype=dtype) for _ in range(num_layers)]
        self.v = [np.zeros(shape, dtype=dtype) for _ in range(num_layers)]
        self.max_length = max_length
        self.length = 0

    @classmethod
    def for_model(cls, model, batch: int, max_length: int) -> "KVCache":
        c = model.config
        return cls(c.num_hidden_layers, batch, max_length, c.num_key_value_heads, c.head_dim, model.dtype)

    def update(self, layer: int, k_new: np.ndarray, v_new: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """k_new, v_new (B, T, K, D) -> all keys and values so far, views (B, length + T, K, D)

        Writes the new entries after the `length` filled ones. `length` itself
        moves only in `advance`, once every layer has written this step.
        """
        start, end = self.length, self.length + k_new.shape[1]
        if end > self.max_length:
            raise TinyloraError(f"KV cache full: {end} positions needed, {self.max_length} allocated")
        self.k[layer][:, start:end] = k_new
        self.v[layer][:, start:end] = v_new
        return self.k[layer][:, :end], self.v[layer][:, :end]

    def advance(self, steps: int) -> None:
        self.length += steps

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.k) + sum(a.nbytes for a in self.v)
