"""The simple version of every fused op, built from primitives, with no hand-written backward.

The model's four fused ops each have a backward written by hand and loops in
a Numba kernel, because that is what makes training fast. Here each one is a
few lines of ops that are gradient-checked on their own (linear, matmul,
softmax, silu, concat, cross-entropy, add, mul), so its gradient comes from
the chain rule alone:

    attention              softmax(q kᵀ / √D + mask) v, each kv head repeated for its H/K query heads
    swiglu                 silu(g) · u
    linear_cross_entropy   cross_entropy(h Wᵀ, labels)
    lora_linear            x Wᵀ + b + s · (drop(x) Aᵀ) Bᵀ        two more linears and a scale

They are slow and memory-hungry (attention forms the (B, H, T, S) scores,
lm_head the whole (B, T, V) logits) and they are exact. A model is built with
one op set or the other, an explicit argument (`CausalLM.from_state_dict(...,
ops=REFERENCE)`), so a test can run the same model both ways and compare
logits and LoRA gradients: a second gradient oracle for the fused ops that
also works at SmolLM2's size, where finite differences are too slow
(tests/test_reference.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..tensor import Tensor
from . import attention as fused_attention
from . import cross_entropy as fused_cross_entropy
from . import lora as fused_lora
from . import swiglu as fused_swiglu
from .cross_entropy import IGNORE_INDEX, cross_entropy
from .elementwise import SiLUFn
from .linear import linear
from .reduce import SoftmaxFn
from .shape import concat


def attention(q: Tensor, k: Tensor, v: Tensor, key_mask: np.ndarray | None = None) -> Tensor:
    """q (B, T, H, D), k (B, S, K, D), v (B, S, K, D), key_mask (B, S) or None -> (B, T, H, D)

    The fused op is CausalAttentionFn (ops/attention.py).
    """
    B, T, H, D = q.shape
    S, K = k.shape[1], k.shape[2]
    group = H // K                                            # query heads per kv head
    heads = [g for g in range(K) for _ in range(group)]      # query head h reads kv head h // group
    k = concat([k[:, :, g:g + 1] for g in heads], axis=2)    # (B, S, H, D)
    v = concat([v[:, :, g:g + 1] for g in heads], axis=2)    # (B, S, H, D)
    scores = (q.transpose(0, 2, 1, 3) @ k.transpose(0, 2, 3, 1)) * (1.0 / np.sqrt(D))   # (B, H, T, S)
    # Query t sits at position S - T + t (after a cache) and sees keys j <= S - T + t that are real.
    causal = np.arange(S)[None, :] <= np.arange(S - T, S)[:, None]                      # (T, S)
    segments = np.ones((B, S), dtype=np.int64) if key_mask is None else np.asarray(key_mask).astype(np.int64)
    real = segments != 0
    # Packed rows: a query of example n (key_mask's segment id) sees only example n's keys; a padded
    # query (0) sees every real key before it, as without packing.
    query = segments[:, S - T:]                                                         # (B, T)
    same = (query[:, :, None] == segments[:, None, :]) | (query[:, :, None] == 0)      # (B, T, S)
    visible = causal[None, None] & real[:, None, None, :] & same[:, None]               # (B, 1, T, S)
    # A hidden key gets the most negative number rather than -inf, so that a query that sees no key at
    # all (a left-padded position) gets a uniform row instead of NaN; `any_visible` then zeroes it,
    # as the fused op outputs 0 there. Where some key is visible, exp underflows to exactly 0.
    hide = np.where(visible, 0.0, np.finfo(q.dtype).min).astype(q.dtype)
    any_visible = visible.any(axis=-1, keepdims=True).astype(q.dtype)                  # (B, 1, T, 1)
    p = SoftmaxFn.apply(scores + Tensor(hide)) * Tensor(any_visible)                    # (B, H, T, S)
    return (p @ v.transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3)                         # (B, T, H, D)


def swiglu(g: Tensor, u: Tensor) -> Tensor:
    """g (..., F), u (..., F) -> silu(g) · u (..., F). The fused op is SwiGLUFn (ops/swiglu.py)."""
    return SiLUFn.apply(g) * u


def linear_cross_entropy(h: Tensor, weight: Tensor, labels: np.ndarray, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """h (..., C), weight (V, C), labels (...) -> mean cross-entropy () over the full logits (..., V).

    The fused op is LinearCrossEntropyFn (ops/cross_entropy.py).
    """
    return cross_entropy(linear(h, weight), labels, ignore_index)


def lora_linear(x: Tensor, w: Tensor, lora_a: Tensor, lora_b: Tensor, bias: Tensor | None = None, *,
                scale: float, keep: np.ndarray | None = None) -> Tensor:
    """x (..., in), W (out, in), A (R, in), B (out, R) -> x Wᵀ + b + s · (drop(x) Aᵀ) Bᵀ (..., out)

    keep: the dropout mask (0 or 1/(1-p)) on the bypass input, or None.
    The fused op is LoraLinearFn (ops/lora.py).
    """
    dropped = x if keep is None else x * Tensor(keep.astype(x.dtype, copy=False))
    return linear(x, w, bias) + linear(linear(dropped, lora_a) * scale, lora_b)


@dataclass(frozen=True)
class OpSet:
    """The four ops a model is built with: the fused ones (FUSED, the default) or these (REFERENCE)."""
    attention: Callable
    swiglu: Callable
    linear_cross_entropy: Callable
    lora_linear: Callable


FUSED = OpSet(fused_attention.attention, fused_swiglu.swiglu, fused_cross_entropy.linear_cross_entropy,
              fused_lora.lora_linear)
REFERENCE = OpSet(attention, swiglu, linear_cross_entropy, lora_linear)
