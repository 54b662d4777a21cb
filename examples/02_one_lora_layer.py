"""Example 02: one LoRA layer from scratch — a frozen Linear, a low-rank bypass, and what A and B learn.

A "pretrained" layer y = x Wᵀ (W: 16 × 32, frozen) should learn a new
behaviour y = x (W + ΔW_true)ᵀ, where ΔW_true has rank 4. We wrap W in a
`LoraLinear` (r = 4, alpha = 8, so scale = alpha / r = 2):

    y = x Wᵀ + scale · x Aᵀ Bᵀ        A (4, 32) ~ N(0, (1/r)²),  B (16, 4) = 0

and train only A and B with AdamW on fresh random inputs each step,
minimising the mean squared error to the new behaviour. The script shows:

* step 0: with B = 0 the layer's output equals the frozen layer's, bit for bit,
  and only B has a gradient (dL/dA is proportional to B);
* the loss going down, a few lines at intervals;
* that W never changed and never even received a .grad (LoraLinearFn skips dW);
* how close scale · B A gets to ΔW_true (relative error), and the principal
  angles between the learned and true column spaces (B's columns vs ΔW_true's)
  and row spaces (A's rows vs ΔW_true's): A and B each find their subspace,
  though not the singular vectors themselves, since B A = (B M)(M⁻¹ A) for any
  invertible 4 × 4 matrix M.

    python examples/02_one_lora_layer.py            # full run, about a second
    python examples/02_one_lora_layer.py --fast     # what the tests run

Exits with status 1 if any of those claims fails.
"""

import argparse
import sys

import numpy as np

from tinylora.lora import LoraConfig, LoraLinear
from tinylora.nn import Linear
from tinylora.optim import AdamW
from tinylora.tensor import Tensor, no_grad

OUT, IN = 16, 32
R, ALPHA = 4, 8
TRUE_SINGULAR_VALUES = np.array([1.0, 0.8, 0.6, 0.4])    # ΔW_true is about a third of ‖W‖
BATCH, LR = 64, 1e-2
MAX_REL_ERROR = 0.05       # the claims at the end: scale·B A within 5 % of ΔW_true,
MAX_ANGLE_DEG = 5.0        # subspaces within 5°, and the loss down by at least 100×
MIN_LOSS_DROP = 100.0

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--fast", action="store_true", help="fewer steps (what the tests run)")
parser.add_argument("--seed", type=int, default=0, help="seed of W, ΔW_true, A's initialisation and the inputs")
args = parser.parse_args()
steps, log_every = (300, 50) if args.fast else (600, 100)
rng = np.random.default_rng(args.seed)
dtype = np.float32                                          # training runs in float32

# --- The frozen layer and the behaviour we want ----------------------------------------------
w = (rng.standard_normal((OUT, IN)) / np.sqrt(IN)).astype(dtype)              # (out, in)
U, _ = np.linalg.qr(rng.standard_normal((OUT, R)))                           # true column space (out, R)
V, _ = np.linalg.qr(rng.standard_normal((IN, R)))                            # true row space (in, R)
delta_true = ((U * TRUE_SINGULAR_VALUES) @ V.T).astype(dtype)                # (out, in), rank 4
base = Linear(Tensor(w.copy(), requires_grad=False))                         # the "pretrained" layer
w_before = base.weight.data.copy()

# --- Wrap it: A Gaussian, B zero, as LoraConfig and apply_lora would -----------------------
config = LoraConfig(r=R, alpha=ALPHA)
lora_a = ((1.0 / R) * rng.standard_normal((R, IN))).astype(dtype)             # (R, in)   PEFT's "gaussian" init
lora_b = np.zeros((OUT, R), dtype=dtype)                                     # (out, R)
layer = LoraLinear(base, lora_a, lora_b, config.scale)
params = [("lora_A.weight", layer.lora_A.weight), ("lora_B.weight", layer.lora_B.weight)]
print(f"Frozen W: {OUT} x {IN} = {w.size} numbers. LoRA r = {R}, alpha = {ALPHA}, scale = {config.scale:g}: "
      f"A {lora_a.shape} + B {lora_b.shape} = {lora_a.size + lora_b.size} trainable numbers.")
print(f"‖W‖ = {np.linalg.norm(w):.3f}, ‖ΔW_true‖ = {np.linalg.norm(delta_true):.3f} "
      f"(rank {R}, singular values {', '.join(f'{s:g}' for s in TRUE_SINGULAR_VALUES)})\n")


def batch() -> tuple[Tensor, Tensor]:
    """x (BATCH, in) ~ N(0, 1) and the wanted output x (W + ΔW_true)ᵀ (BATCH, out)."""
    x = rng.standard_normal((BATCH, IN)).astype(dtype)
    return Tensor(x), Tensor(x @ (w + delta_true).T)


def max_angle_deg(learned: np.ndarray, true_basis: np.ndarray) -> float:
    """The largest principal angle between span(learned's columns) and span(true_basis), in degrees.

    With orthonormal bases Q1, Q2 the singular values of Q1ᵀ Q2 are the cosines
    of the principal angles (Björck & Golub, 1973); 0° means the same subspace.
    """
    q, _ = np.linalg.qr(learned.astype(np.float64))
    cosines = np.linalg.svd(q.T @ true_basis, compute_uv=False)
    return float(np.degrees(np.arccos(np.clip(cosines.min(), -1.0, 1.0))))


failures = []

# --- Step 0: the bypass is silent, and only B has a gradient -------------------------------
x, target = batch()
with no_grad():
    same = np.array_equal(layer(x).data, base(x).data)
print(f"step 0: LoRA output equals the frozen layer's output exactly: {same}  (B = 0)")
if not same:
    failures.append("at step 0 the LoRA layer's output differs from the frozen layer's")
diff = layer(x) - target
loss = (diff * diff).mean()
loss.backward()
grad_a, grad_b = np.linalg.norm(layer.lora_A.weight.grad), np.linalg.norm(layer.lora_B.weight.grad)
print(f"step 0: ‖dL/dA‖ = {grad_a:.3g}, ‖dL/dB‖ = {grad_b:.3g}: B moves first, A follows once B is non-zero")
print(f"        angle between A's rows and ΔW_true's row space at the start: "
      f"{max_angle_deg(layer.lora_A.weight.data.T, V):.1f}° (random)\n")
first_loss = loss.item()

# --- Train A and B ---------------------------------------------------------------------------
optimizer = AdamW(params, lr=LR)            # only A and B: the optimiser never sees W
print(f"AdamW, lr {LR}, {steps} steps of {BATCH} fresh random inputs; the error of scale·B A against ΔW_true")
print("  step  batch loss   ‖ΔW − ΔW_true‖/‖ΔW_true‖   angle B vs cols   angle A vs rows")
for step in range(1, steps + 1):
    if step > 1:                             # step 1 uses the batch and the gradients computed above
        x, target = batch()
        diff = layer(x) - target                    # (BATCH, out)
        loss = (diff * diff).mean()
        loss.backward()                             # fills A.grad and B.grad only
    optimizer.step()
    optimizer.zero_grad()
    if step in (1, 10) or step % log_every == 0:
        rel = np.linalg.norm(layer.delta_weight() - delta_true) / np.linalg.norm(delta_true)
        print(f"  {step:4d}  {loss.item():10.3e}   {rel:22.5f}   {max_angle_deg(layer.lora_B.weight.data, U):14.2f}°"
              f"   {max_angle_deg(layer.lora_A.weight.data.T, V):14.2f}°")
last_loss = loss.item()
print("B's columns line up with ΔW_true's column space first; A's rows turn towards its row space later.")

# --- What happened to W, and what A and B learned --------------------------------------------
delta = layer.delta_weight()                                                  # scale · B A  (out, in)
rel_error = float(np.linalg.norm(delta - delta_true) / np.linalg.norm(delta_true))
angle_cols = max_angle_deg(layer.lora_B.weight.data, U)
angle_rows = max_angle_deg(layer.lora_A.weight.data.T, V)
w_same = np.array_equal(base.weight.data, w_before)
print(f"\nloss: {first_loss:.4g} at step 0 -> {last_loss:.3g} at step {steps} ({first_loss / last_loss:.3g}x lower)")
print(f"W unchanged: {w_same}; W.grad is None: {base.weight.grad is None} (frozen: its backward computed only dx)")
print(f"scale·B A vs ΔW_true: relative error {rel_error:.2e}")
print(f"singular values of scale·B A: {', '.join(f'{s:.4f}' for s in np.linalg.svd(delta, compute_uv=False)[:R])}")
print(f"largest principal angle, B's columns vs ΔW_true's column space: {angle_cols:.3f}°")
print(f"largest principal angle, A's rows vs ΔW_true's row space:       {angle_rows:.3f}°")
print("(Only the product and the two subspaces are determined: (B M)(M⁻¹ A) = B A for any invertible\n"
      " 4 x 4 matrix M, so the A and B found are one of many equally good pairs.)\n")

if not first_loss / last_loss >= MIN_LOSS_DROP:
    failures.append(f"the loss fell only {first_loss / last_loss:.3g}x (wanted {MIN_LOSS_DROP:g}x)")
if not w_same or base.weight.grad is not None:
    failures.append("the frozen W changed or received a gradient")
if not rel_error <= MAX_REL_ERROR:
    failures.append(f"scale·B A is {rel_error:.3g} away from ΔW_true (wanted <= {MAX_REL_ERROR})")
if not max(angle_cols, angle_rows) <= MAX_ANGLE_DEG:
    failures.append(f"learned subspaces {max(angle_cols, angle_rows):.2f}° from the true ones "
                    f"(wanted <= {MAX_ANGLE_DEG}°)")
if failures:
    print("FAILED: " + "; ".join(failures))
    sys.exit(1)
print(f"OK: output = base at step 0, loss down {first_loss / last_loss:.3g}x, W untouched, "
      f"ΔW within {rel_error:.1e} of the truth")
