"""Inverted dropout, driven by an explicit random generator.

    forward:   keep ~ Bernoulli(1 - p) per element,   y  = x * keep / (1 - p)
    backward:  dx = dy * keep / (1 - p)

Scaling the kept values by 1/(1 - p) during training keeps E[y] = x, so nothing
changes at inference, where dropout is the identity. The mask comes from the
`np.random.Generator` passed in, never from global state, so a run (and a
resumed run) is reproducible. `dropout_mask` is the one place a mask is drawn:
the `DropoutFn` op below and LoRA's bypass (lora/inject.py, which hands the mask
to the fused ops/lora.py) both use it.
"""

import numpy as np

from ..tensor import Function, Tensor


def dropout_mask(shape: tuple[int, ...], p: float, rng: np.random.Generator, dtype) -> np.ndarray:
    """-> keep / (1 - p) of `shape`: each entry 0 with probability p, else 1 / (1 - p), in `dtype`"""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
    dtype = np.dtype(dtype)
    return (rng.random(shape) >= p).astype(dtype) / dtype.type(1.0 - p)


class DropoutFn(Function):
    """x (...) -> x with each element zeroed with probability p, the rest scaled by 1/(1-p)"""

    def forward(self, x, *, p: float, rng: np.random.Generator):
        mask = dropout_mask(x.shape, p, rng, x.dtype)               # keep / (1 - p)
        self.save_for_backward(mask)
        return x * mask

    def backward(self, dy):
        (mask,) = self.saved
        return dy * mask


def dropout(x: Tensor, p: float, rng: np.random.Generator | None, training: bool = True) -> Tensor:
    """x (...) -> (...). The identity when p == 0 or not training (no rng needed then)."""
    if p == 0.0 or not training:
        return x
    if rng is None:
        raise ValueError("dropout with p > 0 needs an np.random.Generator")
    return DropoutFn.apply(x, p=p, rng=rng)
