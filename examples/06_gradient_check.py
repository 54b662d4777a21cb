"""Example 06: a gradient-check walk-through, from one derivative by hand to LoRA on a tiny Qwen2.

Every backward in tinylora is written by hand, so every one is checked against
finite differences. This script shows how, and why the check is built as it is:

(a) the central difference (f(x+h) − f(x−h)) / 2h on one scalar function, with
    its error as h shrinks: truncation error falls like h², rounding error grows
    like u/h (u = the float's unit roundoff), so the error traces a V. In
    float32 the bottom of the V is around 1e-5, too coarse to check a gradient
    to 1e-6 — which is why `tinylora.gradcheck` works in float64 with h = 1e-6;
(b) `tinylora.gradcheck` on one op, RMSNorm, with its table: sampled entries of
    each input's gradient, plus one random direction through all of them;
(c) two deliberately wrong backwards, both caught. One of them (a transpose
    that forgets to transpose the gradient back) passes if the check
    backpropagates `.sum()`: a uniform upstream gradient hides it. gradcheck
    uses a random upstream gradient instead;
(d) the end-to-end check: LoRA on all seven projections of a tiny random Qwen2
    (2 layers, grouped-query attention, padding, masked labels), every A and B
    against finite differences of the whole model's loss, and no gradient
    leaking into a frozen weight. `--fast` prints a shortened table.

    python examples/06_gradient_check.py            # full run, a few seconds
    python examples/06_gradient_check.py --fast     # what the tests run

Exits with status 1 if a correct backward fails its check or a wrong one passes.
"""

import argparse
import sys

import numpy as np

from tinylora.gradcheck import EPS, RTOL, gradcheck
from tinylora.gradcheck.model_check import check_lora_model
from tinylora.ops.rmsnorm import RMSNormFn, rms_norm
from tinylora.tensor import Function, Tensor

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--fast", action="store_true", help="fewer sampled entries per LoRA matrix and a shortened table")
parser.add_argument("--seed", type=int, default=0, help="seed of the inputs, the tiny model and the sampling")
args = parser.parse_args()
rng = np.random.default_rng(args.seed)
failures = []

# --- (a) Finite differences by hand ------------------------------------------------------------
print("(a) d/dx sin(x) at x = 1 by central differences, (sin(x+h) - sin(x-h)) / 2h, against cos(1)")
x0, exact = 1.0, np.cos(1.0)


def central_difference(dtype, h: float) -> float:
    x, h = dtype(x0), dtype(h)                  # every number, and so every rounding, in this dtype
    return float((np.sin(x + h) - np.sin(x - h)) / (dtype(2) * h))


print("      h     rel error float64   rel error float32    float64 error, log scale")
errors = {np.float64: {}, np.float32: {}}                # dtype -> {k: relative error at h = 10^-k}
for k in range(1, 13):
    for dtype in errors:
        errors[dtype][k] = abs(central_difference(dtype, 10.0 ** -k) - exact) / abs(exact)
    e64, e32 = errors[np.float64][k], errors[np.float32][k]
    bar = "#" * max(1, int(2 * (np.log10(max(e64, 1e-17)) + 17)))     # 2 marks per decade above 1e-17
    print(f"  1e-{k:02d}   {e64:17.2e}   {e32:17.2e}    {bar}")
best64, best32 = min(errors[np.float64].values()), min(errors[np.float32].values())
print(f"""Large h: truncation, error ≈ h² |f'''| / 6. Small h: rounding, error ≈ u |f| / h, since f(x±h)
are each rounded by u = {np.finfo(np.float64).eps / 2:.1e} (float64) or {np.finfo(np.float32).eps / 2:.1e} (float32).
The best h balances the two, h ≈ u^(1/3): float64 reaches {best64:.1e}, float32 only {best32:.1e}.
(In float32, 1 + 1e-8 rounds to 1: from h = 1e-8 on, x + h = x - h = x and the error is 100 %.)
So gradcheck works in float64, with h = {EPS:g} and a bound of {RTOL:g} on the relative error.\n""")
if not (best64 < 1e-9 and best32 > RTOL and errors[np.float64][12] > 100 * best64):
    failures.append("(a) the finite-difference errors did not come out as described")

# --- (b) gradcheck on one op ---------------------------------------------------------------------
print("(b) tinylora.gradcheck on RMSNorm: y = x / rms(x) * w, x (3, 5), w (5,), float64")
x = Tensor(rng.standard_normal((3, 5)), requires_grad=True)
w = Tensor(1.0 + 0.1 * rng.standard_normal(5), requires_grad=True)
norm_check = gradcheck(rms_norm, [x, w], names=["x", "w"], entries=6, seed=args.seed)
print(norm_check.table())
print("Each row compares dL/d(entry) from the backward with the central difference of\n"
      "L = sum(G * rms_norm(x, w)), G a random upstream gradient; 'direction' moves every entry at once.\n")
if not norm_check.ok:
    failures.append(f"(b) RMSNorm's gradient check failed (max rel error {norm_check.max_rel_error:.2e})")


# --- (c) Wrong backwards -------------------------------------------------------------------------
class ForgetfulTranspose(Function):
    """x (M, N) -> xᵀ (N, M). The bug: backward returns dy as it is instead of dyᵀ.

    For a square x the shapes agree, so the engine's shape check cannot notice.
    """

    def forward(self, x):
        return np.ascontiguousarray(x.T)

    def backward(self, dy):
        return dy                                  # should be dy.T


class RMSNormConstantRstd(RMSNormFn):
    """RMSNorm whose backward forgets that rstd = 1/rms(x) depends on x: dx = rstd · dy · w, no correction term."""

    def backward(self, dy):
        x2, w, rstd = self.saved
        dx = (rstd[:, None] * dy.reshape(x2.shape) * w).reshape(dy.shape)     # rstd (N,) -> (N, 1)
        return dx, None


print("(c) Deliberately wrong backwards")
square = Tensor(rng.standard_normal((4, 4)), requires_grad=True)
via_sum = gradcheck(lambda t: ForgetfulTranspose.apply(t).sum(), [square], names=["x"], seed=args.seed)
print(f"transpose that forgets to transpose dy, checked through .sum() (upstream gradient all equal): "
      f"{'passes' if via_sum.ok else 'caught'}, max rel error {via_sum.max_rel_error:.1e}")
print("  (with every upstream gradient equal, dy and dyᵀ are the same matrix: the bug is invisible)")
wrong = gradcheck(ForgetfulTranspose.apply, [square], names=["x"], entries=6, seed=args.seed)
print("the same op, checked by gradcheck with a random upstream gradient:")
print(wrong.table())
print("  (diagonal entries agree, a transpose leaves them in place; the direction row sees every entry)")
x_only = Tensor(rng.standard_normal((3, 5)), requires_grad=True)
wrong_norm = gradcheck(lambda t: RMSNormConstantRstd.apply(t, w.detach(), eps=1e-6), [x_only], names=["x"],
                       seed=args.seed)
print(f"RMSNorm with rstd treated as a constant: {'passes' if wrong_norm.ok else 'caught'}, "
      f"max rel error {wrong_norm.max_rel_error:.2f} at {wrong_norm.worst.name}\n")
if wrong.ok or wrong_norm.ok:
    failures.append("(c) a deliberately wrong backward passed the gradient check")
if not via_sum.ok:
    failures.append("(c) the .sum() check was expected to miss the transpose bug (it is the point of the demo)")

# --- (d) End to end: LoRA on a tiny Qwen2 ------------------------------------------------------
entries = 2 if args.fast else 4
print(f"(d) LoRA (r = 4, all seven projections) on a tiny random Qwen2, float64: {entries} sampled entries\n"
      f"    of each of the 28 A and B matrices, and one random direction through all of them")
lora_check, leaked = check_lora_model(seed=args.seed, entries=entries)
lines = lora_check.table().splitlines()                # header, one row per check, the verdict
if args.fast:
    keep = 8
    lines = lines[:1 + keep] + [f"... {len(lines) - keep - 3} more rows ..."] + lines[-2:]
print("\n".join(lines))
print(f"frozen tensors that received a gradient: {leaked if leaked else 'none'}")
if not lora_check.ok or leaked:
    failures.append(f"(d) the LoRA model check failed (max rel error {lora_check.max_rel_error:.2e}, "
                    f"leaked {leaked})")

if failures:
    print("\nFAILED: " + "; ".join(failures))
    sys.exit(1)
print(f"\nOK: RMSNorm and the LoRA model pass (max rel errors {norm_check.max_rel_error:.1e} and "
      f"{lora_check.max_rel_error:.1e}, bound {RTOL:g}); both wrong backwards are caught")
