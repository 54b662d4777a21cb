"""Inverted dropout, driven by an explicit random generator.

    forward:   keep ~ Bernoulli(1 - p) per element,   y  = x * keep / (1 - p)
    backward:  dx = dy * keep / (1 - p)

Scaling the kept values by 1/(1 - p) during training keeps E[y] = x, so nothing
changes at inference, where dropout is the identity. The mask comes from the
`np.random.Generator` passed in, never from global state, so a run (and a
resumed run) is reproducible. LoRA applies it to the bypass input only.
"""

import numpy as np

from ..tensor import Function, Tensor


class Dropout(Function):
    """x (...) -> x with each element zeroed with probability p, the rest scaled by 1/(1-p)"""

    def forward(self, x, *, p: float, rng: np.random.Generator):
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        scale = np.asarray(1.0 / (1.0 - p), dtype=x.dtype)
        mask = (rng.random(x.shape) >= p).astype(x.dtype) * scale   # keep / (1 - p)
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
    return Dropout.apply(x, p=p, rng=rng)
