"""Rotary position embedding (RoPE; Su et al., 2021, "RoFormer").

Each head vector is split into D/2 pairs; pair d at position p is rotated by
the angle p * inv_freq[d], with inv_freq[d] = theta^(-2d/D). A query at
position m and a key at position n then have a dot product that depends only
on m - n, which is how attention sees relative positions.

Hugging Face's convention ("rotate half") pairs element d with d + D/2:

    forward:   y1 = x1 cos - x2 sin,     y2 = x2 cos + x1 sin        x1 = x[..., :D/2], x2 = x[..., D/2:]
    backward:  dx1 = dy1 cos + dy2 sin,  dx2 = dy2 cos - dy1 sin     (the rotation by -angle)

With a KV cache the new tokens' positions start at the cache length: the
caller passes positions S-T .. S-1 to `rope_tables`.
"""

import numpy as np

from ..kernels.rope import rope_backward, rope_forward
from ..tensor import Function, Tensor


def rope_inv_freq(head_dim: int, theta: float) -> np.ndarray:
    """-> inv_freq (D/2,) = 1 / theta^(2d/D), computed in float32 as transformers does."""
    exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    return (1.0 / (np.float32(theta) ** exponents)).astype(np.float32)


def rope_tables(positions: np.ndarray, inv_freq: np.ndarray, dtype=np.float32) -> tuple[np.ndarray, np.ndarray]:
    """positions (B, T) or (T,) ints, inv_freq (D/2,) -> cos, sin (B or 1, T, D/2) in `dtype`.

    For float32 the angles are formed in float32, exactly as transformers does
    (position * inv_freq, then cos/sin); the precision of the angle at large
    positions is part of what a checkpoint was trained with. For float64
    (gradient checks) everything is float64.
    """
    positions = np.asarray(positions)
    if positions.ndim == 1:
        positions = positions[None, :]                      # (1, T)
    work = np.float64 if np.dtype(dtype) == np.float64 else np.float32
    angles = positions.astype(work)[:, :, None] * inv_freq.astype(work)[None, None, :]   # (B, T, D/2)
    return np.cos(angles).astype(dtype), np.sin(angles).astype(dtype)


class RoPEFn(Function):
    """x (B, T, H, D), cos/sin (B or 1, T, D/2) -> x rotated (B, T, H, D)"""

    def forward(self, x, *, cos, sin):
        B, T = x.shape[:2]
        cos = np.ascontiguousarray(np.broadcast_to(cos, (B, T, cos.shape[-1])), dtype=x.dtype)
        sin = np.ascontiguousarray(np.broadcast_to(sin, (B, T, sin.shape[-1])), dtype=x.dtype)
        self.save_for_backward(cos, sin)
        return rope_forward(np.ascontiguousarray(x), cos, sin)

    def backward(self, dy):
        cos, sin = self.saved
        return rope_backward(np.ascontiguousarray(dy), cos, sin)


def rope(x: Tensor, cos: np.ndarray, sin: np.ndarray) -> Tensor:
    """x (B, T, H, D) -> (B, T, H, D)"""
    if x.shape[-1] % 2:
        raise ValueError(f"RoPE needs an even head dimension, got {x.shape[-1]}")
    return RoPEFn.apply(x, cos=cos, sin=sin)
