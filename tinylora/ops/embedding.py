"""Embedding lookup: token ids -> rows of the embedding table.

    forward:   y[b, t, :] = W[ids[b, t], :]
    backward:  dW[v, :]   = sum of dy[b, t, :] over every (b, t) with ids[b, t] == v

The backward is a scatter-add (`np.add.at`): a token that appears twice gets
both gradients. In LoRA training the table is frozen, so this never runs; the
gradient still flows to the embedding *outputs*, which is all the layers above
need.

The table is a frozen weight of any storage (kernels/weights.py: the
dispatcher's `gather` widens just the rows it picks) or, when it trains, a
float array.
"""

import numpy as np

from ..kernels import weights
from ..tensor import Function, Tensor


class EmbeddingFn(Function):
    """ids (B, T) int, W (V, C) -> (B, T, C)"""

    def forward(self, w, *, ids):
        ids = np.asarray(ids)
        if not np.issubdtype(ids.dtype, np.integer):
            raise TypeError(f"embedding: token ids must be integers, got {ids.dtype}")
        if ids.size and (ids.min() < 0 or ids.max() >= w.shape[0]):
            bad = ids[(ids < 0) | (ids >= w.shape[0])][0]
            raise IndexError(f"embedding: token id {bad} outside the vocabulary of {w.shape[0]}")
        self.save_for_backward(ids, w.shape)                  # kept only when W trains
        return weights.gather(w, ids)                         # (B, T, C)

    def backward(self, dy):
        ids, w_shape = self.saved
        dw = np.zeros(w_shape, dtype=dy.dtype)
        np.add.at(dw, ids.reshape(-1), dy.reshape(-1, w_shape[1]))
        return dw


def embedding(ids: np.ndarray, w: Tensor) -> Tensor:
    """ids (B, T) int, W (V, C) -> (B, T, C)"""
    return EmbeddingFn.apply(w, ids=ids)
