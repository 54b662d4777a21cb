"""Gradient checking: the analytic backward against central finite differences.

For a function f of some tensors we pick a random upstream gradient G (same
shape as f's output) and check the scalar objective

    L(x) = sum(G * f(x))          so that   dL/dx = the backward of f applied to G.

A random G, never `.sum()` or `.mean()` (G = 1), because a uniform upstream
gradient hides transposed or permuted gradients.

Two kinds of check, both in float64 (float32's 7 digits cannot resolve a
finite difference to 1e-6):

* entries: for a sample of entries x_i of each trainable input,
      numeric_i = (L(x + eps e_i) - L(x - eps e_i)) / (2 eps)
  against the analytic dL/dx_i. The error of an input is reported relative to
  its largest gradient entry, ``max|a - n| / max(|a|, |n|)``, so a gradient
  entry that is (close to) zero cannot produce a meaningless huge ratio.
* direction: one random unit direction v over all trainable inputs at once,
      numeric = (L(x + eps v) - L(x - eps v)) / (2 eps)   vs   analytic = sum_i a_i v_i,
  relative to sum_i |a_i v_i|. This sees every entry, not only the sampled ones
  (the idea of HIPS autograd's checker).

Central differences have truncation error O(eps^2) and rounding error about
1e-16 |L| / eps; with eps = 1e-6 and O(1) values both sit far below 1e-6.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from ..tensor import Tensor, no_grad

EPS = 1e-6     # finite-difference step, float64 (see the module docstring)
RTOL = 1e-6    # the acceptance bound of SPEC §3.2: relative error <= 1e-6


@dataclass
class Check:
    """One compared number: a gradient entry, or a directional derivative."""
    name: str
    analytic: float
    numeric: float
    abs_error: float
    rel_error: float


@dataclass
class GradcheckResult:
    checks: list[Check] = field(default_factory=list)
    rtol: float = RTOL

    @property
    def worst(self) -> Check:
        return max(self.checks, key=lambda c: c.rel_error)

    @property
    def max_abs_error(self) -> float:
        return max(c.abs_error for c in self.checks)

    @property
    def max_rel_error(self) -> float:
        return self.worst.rel_error

    @property
    def ok(self) -> bool:
        return bool(self.checks) and self.max_rel_error <= self.rtol

    def table(self, title: str = "") -> str:
        """The checks as a readable table, one row per compared number."""
        width = max([len(c.name) for c in self.checks] + [5])
        lines = [title] if title else []
        lines.append(f"{'check':<{width}}  {'analytic':>14}  {'numeric':>14}  {'abs err':>9}  {'rel err':>9}")
        for c in self.checks:
            mark = "" if c.rel_error <= self.rtol else "  <-- FAIL"
            lines.append(f"{c.name:<{width}}  {c.analytic:>14.8g}  {c.numeric:>14.8g}  "
                         f"{c.abs_error:>9.2e}  {c.rel_error:>9.2e}{mark}")
        verdict = "ok" if self.ok else "FAILED"
        lines.append(f"max abs error {self.max_abs_error:.2e}, max rel error {self.max_rel_error:.2e} "
                     f"(bound {self.rtol:.0e}) at {self.worst.name}: {verdict}")
        return "\n".join(lines)


def gradcheck(fn: Callable[..., Tensor], inputs: Sequence[Tensor], *, names: Sequence[str] | None = None,
              entries: int = 12, eps: float = EPS, rtol: float = RTOL, seed: int = 0) -> GradcheckResult:
    """Check `fn`'s backward against finite differences.

    fn:      takes the `inputs` (positionally) and returns a Tensor; it must be
             deterministic (build any dropout Generator inside fn from a fixed seed)
    inputs:  tensors; those with requires_grad=True are checked and must be float64
    names:   labels for the inputs in the report (default x0, x1, ...)
    entries: how many entries of each checked input to sample (all when fewer)
    """
    names = list(names) if names is not None else [f"x{i}" for i in range(len(inputs))]
    checked = [(name, t) for name, t in zip(names, inputs) if t.requires_grad]
    if not checked:
        raise ValueError("gradcheck: no input requires grad, nothing to check")
    for name, t in checked:
        if t.dtype != np.float64:
            raise ValueError(f"gradcheck: input {name} is {t.dtype}; finite differences need float64")
    rng = np.random.default_rng(seed)

    # Analytic gradients: one backward pass with a random upstream gradient G.
    for _, t in checked:
        t.grad = None
    out = fn(*inputs)
    G = rng.standard_normal(out.shape)
    out.backward(G)
    analytic = {name: (t.grad if t.grad is not None else np.zeros_like(t.data)) for name, t in checked}

    def objective() -> float:
        with no_grad():
            return float(np.sum(G * fn(*inputs).data))

    result = GradcheckResult(rtol=rtol)
    for name, t in checked:
        a = analytic[name]
        flat = t.data.reshape(-1)                 # a view: writing to it perturbs t.data
        if not np.shares_memory(flat, t.data):
            raise ValueError(f"gradcheck: input {name} is not contiguous")
        picks = np.arange(flat.size) if flat.size <= entries else rng.choice(flat.size, entries, replace=False)
        numeric = []
        for i in picks:
            original = flat[i]
            flat[i] = original + eps
            plus = objective()
            flat[i] = original - eps
            minus = objective()
            flat[i] = original
            numeric.append((plus - minus) / (2 * eps))
        a_picked = a.reshape(-1)[picks]
        numeric = np.array(numeric)
        scale = max(np.abs(a_picked).max(), np.abs(numeric).max())
        for i, ai, ni in zip(picks, a_picked, numeric):
            err = abs(ai - ni)
            rel = err / scale if scale > 0 else 0.0
            index = ",".join(str(int(j)) for j in np.unravel_index(i, t.shape))
            result.checks.append(Check(f"{name}[{index}]", float(ai), float(ni), float(err), float(rel)))

    # One random direction over all checked inputs together.
    directions = {name: rng.standard_normal(t.shape) for name, t in checked}
    norm = np.sqrt(sum(float(np.sum(v * v)) for v in directions.values()))
    originals = {name: t.data.copy() for name, t in checked}

    def move(step: float) -> None:
        for name, t in checked:
            t.data[...] = originals[name] + step * directions[name] / norm

    move(+eps)
    plus = objective()
    move(-eps)
    minus = objective()
    for name, t in checked:
        t.data[...] = originals[name]               # restore exactly, not by adding -0 * v
    numeric = (plus - minus) / (2 * eps)
    terms = [analytic[name] * directions[name] / norm for name, _ in checked]
    a_dir = float(sum(np.sum(x) for x in terms))
    scale = float(sum(np.sum(np.abs(x)) for x in terms))
    err = abs(a_dir - numeric)
    result.checks.append(Check("direction", a_dir, numeric, err, err / scale if scale > 0 else 0.0))
    return result
