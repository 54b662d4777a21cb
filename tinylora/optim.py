"""The optimiser side of training: AdamW, learning-rate schedules, gradient clipping.

Here:
* `AdamW` — Adam (Kingma & Ba 2015, "Adam: A Method for Stochastic
  Optimization") with the decoupled weight decay of Loshchilov & Hutter 2019
  ("Decoupled Weight Decay Regularization"), step for step the update of
  `torch.optim.AdamW`; its state saved to safetensors + JSON for exact resume.
* `LRSchedule` / `lr_at` — constant or linear/cosine decay, after an optional
  linear warm-up.
* `clip_grad_norm` — global-norm clipping with `torch.nn.utils.clip_grad_norm_`'s formula.
* `scale_grads` — multiply every gradient by a factor (gradient accumulation).

Parameters are `(name, Tensor)` pairs, as `lora.lora_parameters(model)` gives
them; the optimiser only ever sees the LoRA A and B matrices, never the frozen model.

Not here: the training loop, gradient accumulation itself (backward already
adds into `.grad`, see tensor.py; the trainer divides by the number of
micro-batches with `scale_grads`), other optimisers, and pickle — the state is
arrays in safetensors and numbers in JSON.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import TinyloraError
from .formats.files import read_json, write_json
from .formats.safetensors import check_tensors, read_metadata, read_safetensors, write_safetensors
from .tensor import Tensor

Params = list[tuple[str, Tensor]]

# The state files `AdamW.save(folder)` writes and `AdamW.load(folder)` reads.
STATE_TENSORS = "optimizer.safetensors"      # the moments m and v of every parameter
STATE_SCALARS = "optimizer.json"             # step counts and hyper-parameters


class AdamW:
    """AdamW over LoRA parameters, updating each `.data` in place from its `.grad`.

    For a parameter θ with gradient g, at its t-th update (t = 1, 2, …):

        θ ← θ − lr·λ·θ                          decoupled weight decay (L&H 2019)
        m ← β1·m + (1 − β1)·g                   first moment: running mean of g
        v ← β2·v + (1 − β2)·g²                  second moment: running mean of g²
        m̂ = m / (1 − β1^t),  v̂ = v / (1 − β2^t)  bias correction
        θ ← θ − lr · m̂ / (√v̂ + ε)

    Bias correction, in plain words: m and v start at zero, so for the first
    steps they are averages over too few gradients, padded with zeros, and hence
    too small. At step t the weights of all the gradients seen so far sum to
    exactly 1 − β^t, so dividing by it turns the padded average into a true
    weighted average. Without it the very first update would be
    (1 − β1)/√(1 − β2) ≈ 3.2 times lr, and v (β2 = 0.999) would stay too
    small for thousands of steps.

    "Decoupled" decay shrinks θ directly, instead of adding λθ to g as L2
    regularisation does; through g it would be divided by √v̂ and so decay
    parameters with large gradients less — the point of L&H's paper. (Their
    Algorithm 2 scales the decay by the schedule multiplier η_t alone; torch,
    and so we, scale it by the full lr, so their λ is our base_lr·λ.)

    The order is torch.optim.AdamW's: decay with the old θ first, then the
    Adam step, and ε added to √v̂ (not to √v, as in Kingma & Ba's
    "efficient" variant). Each parameter keeps its own step count t, as in
    torch: one skipped at some step (grad None) has had fewer updates, and
    its bias correction must count only those. All arithmetic is in the
    parameter's dtype, and m, v have that dtype too.

    weight_decay defaults to 0.0, not torch's 0.01: HF Trainer (the usual PEFT
    trainer) defaults to 0.0 and mlx-lm's LoRA trainer uses Adam without
    decay, and for LoRA decay pulls A and B — the adapter — towards the base
    model, a choice to make on purpose (`--weight-decay`). lr has no default
    here: the trainer's config owns it (usually with a schedule, see below).
    """

    def __init__(self, params: Params, lr: float, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0):
        if not params:
            raise TinyloraError("AdamW: no parameters to train (was LoRA applied to the model?)")
        self.params = list(params)
        names = [name for name, _ in self.params]
        if len(set(names)) != len(names):
            dup = next(n for n in names if names.count(n) > 1)
            raise TinyloraError(f"AdamW: parameter {dup!r} appears twice")
        for name, p in self.params:
            if p.data.dtype.kind != "f":
                raise TinyloraError(f"AdamW: parameter {name!r} has dtype {p.data.dtype}; it must be floating point")
        self._set_hyper(lr, betas, eps, weight_decay)
        self.exp_avg = {name: np.zeros_like(p.data) for name, p in self.params}      # m
        self.exp_avg_sq = {name: np.zeros_like(p.data) for name, p in self.params}   # v
        self.steps = {name: 0 for name, _ in self.params}                           # t, per parameter

    def _set_hyper(self, lr, betas, eps, weight_decay) -> None:
        if not (isinstance(betas, (list, tuple)) and len(betas) == 2
                and all(_is_number(b) and 0 <= b < 1 for b in betas)):
            raise TinyloraError(f"AdamW: betas must be two numbers in [0, 1), got {betas!r}")
        self.lr, self.betas = _nonnegative("learning rate", lr), (float(betas[0]), float(betas[1]))
        self.eps, self.weight_decay = _nonnegative("eps", eps), _nonnegative("weight_decay", weight_decay)

    def step(self, lr: float | None = None) -> None:
        """One update of every parameter that has a gradient; lr overrides self.lr for this step only."""
        lr = self.lr if lr is None else _nonnegative("learning rate", lr)
        beta1, beta2 = self.betas
        for name, p in self.params:
            if p.grad is None:
                continue
            if p.grad.shape != p.data.shape:
                raise TinyloraError(f"AdamW: gradient of {name!r} has shape {p.grad.shape}, "
                                    f"the parameter {p.data.shape}")
            theta, g = p.data, p.grad.astype(p.data.dtype, copy=False)
            m, v = self.exp_avg[name], self.exp_avg_sq[name]
            self.steps[name] += 1
            t = self.steps[name]
            # Python-float scalars keep the arrays' dtype (NumPy 2 promotion), so a float32
            # parameter is updated in float32 arithmetic, as torch does.
            theta *= 1.0 - lr * self.weight_decay              # θ ← (1 − lr·λ)·θ
            m *= beta1
            m += (1.0 - beta1) * g                             # m ← β1·m + (1 − β1)·g
            v *= beta2
            v += (1.0 - beta2) * (g * g)                       # v ← β2·v + (1 − β2)·g²
            bias_correction1 = 1.0 - beta1 ** t
            bias_correction2 = 1.0 - beta2 ** t
            denom = np.sqrt(v) / math.sqrt(bias_correction2) + self.eps   # √v̂ + ε
            theta -= (lr / bias_correction1) * m / denom                   # θ ← θ − lr·m̂/(√v̂ + ε)

    def zero_grad(self) -> None:
        """Drop every gradient (set to None, as torch's default), so the next backward starts afresh."""
        for _, p in self.params:
            p.grad = None

    # -- state, for exact resume -------------------------------------------
    def state_dict(self) -> tuple[dict[str, np.ndarray], dict]:
        """(tensors, scalars): copies of m and v as '<name>.exp_avg' / '<name>.exp_avg_sq',
        and a JSON-able dict of the per-parameter step counts and the hyper-parameters."""
        tensors = {}
        for name, _ in self.params:
            tensors[f"{name}.exp_avg"] = self.exp_avg[name].copy()
            tensors[f"{name}.exp_avg_sq"] = self.exp_avg_sq[name].copy()
        scalars = {"optimizer": "AdamW", "lr": self.lr, "betas": list(self.betas), "eps": self.eps,
                   "weight_decay": self.weight_decay, "steps": dict(self.steps)}
        return tensors, scalars

    def load_state_dict(self, tensors: dict[str, np.ndarray], scalars: dict, source: str = "optimizer state") -> None:
        """Restore a `state_dict()`: the same parameter names and shapes, or a TinyloraError naming the tensor.

        As in torch, the saved hyper-parameters replace the current ones. The
        moments are cast to each parameter's dtype. Nothing changes unless
        everything checks out.
        """
        try:
            lr, betas, eps, wd, steps = (scalars[k] for k in ("lr", "betas", "eps", "weight_decay", "steps"))
        except KeyError as e:
            raise TinyloraError(f"{source}: missing {e.args[0]!r}") from None
        names = [name for name, _ in self.params]
        check_tensors(source, steps if isinstance(steps, dict) else {}, dict.fromkeys(names),
                      what="step count for", why_unexpected=_not_trained)
        check_tensors(source, tensors, {f"{n}.{k}": p.data.shape for n, p in self.params
                                        for k in ("exp_avg", "exp_avg_sq")}, why_unexpected=_not_trained)
        exp_avg, exp_avg_sq = {}, {}
        for name, p in self.params:
            if type(steps[name]) is not int or steps[name] < 0:
                raise TinyloraError(f"{source}: step count of {name!r} is {steps[name]!r}, not an integer >= 0")
            for key, into in ((f"{name}.exp_avg", exp_avg), (f"{name}.exp_avg_sq", exp_avg_sq)):
                into[name] = np.array(tensors[key], dtype=p.data.dtype)      # a copy we own
        try:
            self._set_hyper(lr, betas, eps, wd)
        except TinyloraError as e:
            raise TinyloraError(f"{source}: {e}") from None
        self.exp_avg, self.exp_avg_sq = exp_avg, exp_avg_sq
        self.steps = {name: steps[name] for name, _ in self.params}

    def save(self, folder: str | os.PathLike) -> None:
        """Write folder/optimizer.safetensors (m, v) and folder/optimizer.json (scalars), each atomically.

        The step counts also go into the safetensors metadata, so `load` can
        tell a pair of files from two different saves (a crash between the
        two writes).
        """
        tensors, scalars = self.state_dict()
        steps = json.dumps(scalars["steps"], sort_keys=True)
        write_safetensors(Path(folder) / STATE_TENSORS, tensors, metadata={"format": "pt", "steps": steps})
        write_json(Path(folder) / STATE_SCALARS, scalars)

    def load(self, folder: str | os.PathLike) -> None:
        """Read what `save` wrote; see `load_state_dict` for the checks."""
        tensors_path, scalars_path = Path(folder) / STATE_TENSORS, Path(folder) / STATE_SCALARS
        tensors, scalars = read_safetensors(tensors_path), read_json(scalars_path)
        if read_metadata(tensors_path).get("steps") != json.dumps(scalars.get("steps"), sort_keys=True):
            raise TinyloraError(f"{folder}: {STATE_TENSORS} and {STATE_SCALARS} come from different saves "
                                "(their step counts differ)")
        self.load_state_dict(tensors, scalars, source=str(tensors_path))


def _not_trained(name: str) -> str:
    return "not a parameter being trained"


def _is_number(x) -> bool:
    return isinstance(x, (int, float, np.floating, np.integer)) and not isinstance(x, bool) and math.isfinite(x)


def _nonnegative(what: str, x) -> float:
    if not (_is_number(x) and x >= 0):
        raise TinyloraError(f"AdamW: {what} must be a finite number >= 0, got {x!r}")
    return float(x)


# --------------------------------------------------------------------------
# Learning-rate schedules
# --------------------------------------------------------------------------

SCHEDULES = ("constant", "linear", "cosine")


@dataclass(frozen=True)
class LRSchedule:
    """The learning rate for update t = 1 … total_steps (the same t as AdamW's step count).

    One continuous curve, sampled at the updates:
      warm-up, 0 ≤ t ≤ warmup:  lr = base_lr · t / warmup       (a line from 0 at t = 0)
      then, with p = (t − warmup) / (total_steps − warmup) going from 0 to 1:
        constant:  lr = base_lr
        linear:    lr = floor + (base_lr − floor) · (1 − p)
        cosine:    lr = floor + (base_lr − floor) · ½(1 + cos πp)      (Loshchilov & Hutter 2017, SGDR)
    where floor = min_lr_ratio · base_lr.

    So the first update uses base_lr/warmup (never a wasted update at lr 0,
    as HF's 0-based schedules give), update `warmup` uses base_lr exactly,
    and the decay reaches the floor at the last update (with a floor of 0,
    that update only moves the moments). Past total_steps the rate stays at
    its final value.
    """

    base_lr: float
    total_steps: int
    schedule: str = "cosine"
    warmup: int = 0
    min_lr_ratio: float = 0.0

    def __post_init__(self):
        if not (math.isfinite(self.base_lr) and self.base_lr > 0):
            raise TinyloraError(f"learning rate must be a finite number > 0, got {self.base_lr}")
        if self.schedule not in SCHEDULES:
            raise TinyloraError(f"unknown learning-rate schedule {self.schedule!r} "
                                f"(choose from {', '.join(SCHEDULES)})")
        if type(self.total_steps) is not int or self.total_steps < 1:
            raise TinyloraError(f"total steps must be an integer >= 1, got {self.total_steps!r}")
        if type(self.warmup) is not int or not 0 <= self.warmup <= self.total_steps:
            raise TinyloraError(f"warm-up must be an integer from 0 to the total steps ({self.total_steps}), "
                                f"got {self.warmup!r}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise TinyloraError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")

    def __call__(self, step: int) -> float:
        if step < 0:
            raise TinyloraError(f"learning-rate schedule: step must be >= 0, got {step}")
        if step < self.warmup:
            return self.base_lr * step / self.warmup
        if self.schedule == "constant" or self.warmup == self.total_steps:
            return self.base_lr
        p = min(1.0, (step - self.warmup) / (self.total_steps - self.warmup))
        floor = self.min_lr_ratio * self.base_lr
        shape = 1.0 - p if self.schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * p))
        return floor + (self.base_lr - floor) * shape


def lr_at(step: int, base_lr: float, total_steps: int, schedule: str = "cosine",
          warmup: int = 0, min_lr_ratio: float = 0.0) -> float:
    """`LRSchedule(base_lr, total_steps, schedule, warmup, min_lr_ratio)(step)`, in one call."""
    return LRSchedule(base_lr, total_steps, schedule, warmup, min_lr_ratio)(step)


# --------------------------------------------------------------------------
# Gradients: clipping and scaling
# --------------------------------------------------------------------------

def grad_norm(params: Params) -> float:
    """The global L2 norm of all gradients, √(Σ g²), summed in float64 (None gradients skipped)."""
    sum_sq = 0.0
    for _, p in params:
        if p.grad is not None:
            flat = p.grad.astype(np.float64, copy=False).ravel()
            sum_sq += float(flat @ flat)
    return math.sqrt(sum_sq)


def clip_grad_norm(params: Params, max_norm: float) -> float:
    """Scale all gradients together so their global L2 norm is at most max_norm; return the norm before.

    norm = √(Σ over all gradients of Σ g²), summed in float64. As in
    torch.nn.utils.clip_grad_norm_, every gradient is multiplied by
    c = max_norm / (norm + 1e-6) when c < 1 (the 1e-6 guards a zero norm);
    one factor for all keeps the direction of the whole update. A non-finite
    norm (inf or NaN somewhere) is returned untouched and nothing is scaled:
    the trainer stops on it rather than train on garbage. Gradients that are
    None are skipped.
    """
    if not (math.isfinite(max_norm) and max_norm > 0):
        raise TinyloraError(f"gradient clipping: max norm must be a finite number > 0, got {max_norm}")
    norm = grad_norm(params)
    if not math.isfinite(norm):
        return norm
    coef = max_norm / (norm + 1e-6)
    if coef < 1.0:
        scale_grads(params, coef)
    return norm


def scale_grads(params: Params, factor: float) -> None:
    """g ← factor · g for every gradient, in place, in its own dtype (None is skipped).

    Gradient accumulation: after k backward calls each .grad holds the sum of k
    micro-batch gradients; scale_grads(params, 1/k) makes it their mean.
    """
    for _, p in params:
        if p.grad is not None:
            p.grad *= p.grad.dtype.type(factor)
