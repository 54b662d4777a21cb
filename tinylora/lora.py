"""LoRA: configure it, inject it into a frozen model, name it as PEFT does, merge it back.

    y = x Wᵀ + b + s · drop(x) Aᵀ Bᵀ          A (R, in) ~ N(0, init_std²),  B (out, R) = 0
    s = alpha / R        (or alpha / √R with rsLoRA; Kalajdzievski, 2023)

Right after injection B = 0, so the model computes exactly what it computed
before; training moves only A and B. The math of the forward and backward is
in tinylora/ops/lora.py; this module is the bookkeeping around it:

* `LoraConfig`: the validated settings (r, alpha, dropout, targets, rsLoRA, layers, init_std);
* `LoraLinear`: wraps a frozen `Linear` as `base_layer` and holds A and B as
  `lora_A.weight` / `lora_B.weight`, so a parameter's dotted name is PEFT's
  saved key minus the prefix `base_model.model.`;
* `apply_lora`, `lora_parameters`, `parameter_report`, `merge`.

Saving and loading adapters in PEFT's file format is in formats/peft.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .errors import TinyloraError
from .nn import Linear, Module
from .ops.linear import widen_bf16
from .ops.lora import LoraLinearFn
from .tensor import Tensor

# The seven projections of a Qwen2/Llama decoder layer, where each lives, in PEFT's order of a layer.
TARGETS = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
           "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
PEFT_PREFIX = "base_model.model."


@dataclass
class LoraConfig:
    r: int = 8                                   # R, the rank of the update B A
    alpha: float = 16.0                          # the update is scaled by alpha / r
    dropout: float = 0.0                         # dropout on the bypass input while training
    target_modules: list[str] | str = field(default_factory=lambda: ["q_proj", "v_proj"])   # or "all-linear"
    use_rslora: bool = False                     # scale alpha / sqrt(r) instead
    layers: list[int] | None = None              # layer indices to adapt; None = all
    init_std: float | None = None                # std of A's Gaussian init; None = 1 / r (PEFT's "gaussian")

    def __post_init__(self):
        if isinstance(self.r, bool) or not isinstance(self.r, (int, np.integer)) or self.r <= 0:
            raise TinyloraError(f"LoRA r must be a positive integer, got {self.r!r}")
        if not (isinstance(self.alpha, (int, float)) and math.isfinite(self.alpha) and self.alpha > 0):
            raise TinyloraError(f"LoRA alpha must be a positive number, got {self.alpha!r}")
        if not (isinstance(self.dropout, (int, float)) and 0.0 <= self.dropout < 1.0):
            raise TinyloraError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
        if not isinstance(self.use_rslora, bool):
            raise TinyloraError(f"LoRA use_rslora must be true or false, got {self.use_rslora!r}")
        if self.init_std is not None and not (isinstance(self.init_std, (int, float)) and self.init_std > 0):
            raise TinyloraError(f"LoRA init_std must be a positive number, got {self.init_std!r}")
        if isinstance(self.target_modules, str):
            if self.target_modules != "all-linear":
                raise TinyloraError(f"LoRA target_modules must be a list of names or 'all-linear', "
                                    f"got {self.target_modules!r}")
        else:
            self.target_modules = list(self.target_modules)
            unknown = [t for t in self.target_modules if t not in TARGETS]
            if unknown or not self.target_modules:
                raise TinyloraError(f"LoRA target module {unknown[0] if unknown else '(none)'!r} is not one of "
                                    f"{', '.join(TARGETS)} (or 'all-linear'); lm_head is never adapted")
        if self.layers is not None:
            self.layers = sorted({int(i) for i in self.layers})
            if not self.layers or any(i < 0 for i in self.layers):
                raise TinyloraError(f"LoRA layers must be a non-empty list of indices >= 0 (or None for all), "
                                    f"got {self.layers}")

    @property
    def targets(self) -> list[str]:
        """The adapted projection names, in the fixed order of TARGETS."""
        wanted = TARGETS if self.target_modules == "all-linear" else self.target_modules
        return [t for t in TARGETS if t in wanted]

    @property
    def scale(self) -> float:
        return self.alpha / math.sqrt(self.r) if self.use_rslora else self.alpha / self.r


class LoraLinear(Module):
    """x (..., in) -> base_layer(x) + scale · drop(x) Aᵀ Bᵀ (..., out); only A and B train.

    The five-line math of the forward and of dA, dB, dx is in tinylora/ops/lora.py, next to the code.
    """

    def __init__(self, base_layer: Linear, lora_a: np.ndarray, lora_b: np.ndarray, scale: float,
                 dropout: float = 0.0, rng: np.random.Generator | None = None):
        self.base_layer = base_layer
        self.lora_A = Linear(Tensor(lora_a, requires_grad=True))        # weight (R, in)
        self.lora_B = Linear(Tensor(lora_b, requires_grad=True))        # weight (out, R)
        self.scale = scale
        self.dropout = dropout
        if dropout > 0.0 and rng is None:
            raise ValueError("LoraLinear with dropout > 0 needs an np.random.Generator for its masks")
        self.rng = rng                                                  # draws the dropout masks

    @property
    def r(self) -> int:
        return self.lora_A.weight.shape[0]

    def __call__(self, x: Tensor) -> Tensor:
        keep = None
        if self.dropout > 0.0 and self.training:
            p = self.dropout
            keep = (self.rng.random(x.shape) >= p).astype(x.dtype) / x.dtype.type(1.0 - p)   # inverted dropout
        inputs = [x, self.base_layer.weight, self.lora_A.weight, self.lora_B.weight]
        if self.base_layer.bias is not None:
            inputs.append(self.base_layer.bias)
        return LoraLinearFn.apply(*inputs, scale=self.scale, keep=keep)

    def delta_weight(self) -> np.ndarray:
        """ΔW = scale · B A (out, in), in A's dtype."""
        return self.scale * (self.lora_B.weight.data @ self.lora_A.weight.data)


def apply_lora(model: Module, config: LoraConfig, seed: int = 0) -> Module:
    """Wrap the chosen projections of `model` in LoraLinear layers (in place); returns the model.

    A is drawn from N(0, init_std²) with a generator seeded by `seed`, layer
    by layer in TARGETS order, so the same seed gives the same adapter.
    """
    n_layers = len(model.model.layers)
    if any(isinstance(m, LoraLinear) for _, m in model.named_modules()):
        raise TinyloraError("the model already has LoRA layers; load a fresh model to inject again")
    layers = list(range(n_layers)) if config.layers is None else config.layers
    if any(i >= n_layers for i in layers):
        raise TinyloraError(f"LoRA layer {max(layers)} out of range: the model has {n_layers} layers "
                            f"(0-{n_layers - 1})")
    # Two independent streams from one seed: A's init, and the dropout masks (one generator per layer),
    # so the same seed gives the same A whether dropout is on or off.
    init_seq, dropout_seq = np.random.SeedSequence(seed).spawn(2)
    rng = np.random.default_rng(init_seq)
    std = config.init_std if config.init_std is not None else 1.0 / config.r
    dtype = model.dtype
    for i in layers:
        layer = model.model.layers[i]
        for name in config.targets:
            parent = getattr(layer, TARGETS[name])
            base = getattr(parent, name)
            a = (std * rng.standard_normal((config.r, base.in_features))).astype(dtype)   # (R, in)
            b = np.zeros((base.out_features, config.r), dtype=dtype)                      # (out, R)
            dropout_rng = np.random.default_rng(dropout_seq.spawn(1)[0]) if config.dropout > 0 else None
            setattr(parent, name, LoraLinear(base, a, b, config.scale, config.dropout, dropout_rng))
    model.lora_config = config
    return model


def lora_layers(model: Module) -> list[tuple[str, LoraLinear]]:
    """(dotted path, LoraLinear) for every adapted projection, in model order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoraLinear)]


def lora_parameters(model: Module) -> list[tuple[str, Tensor]]:
    """(PEFT key, tensor) for every A and B, e.g. base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"""
    return [(PEFT_PREFIX + name, t) for name, t in model.named_parameters() if ".lora_A." in name or ".lora_B." in name]


def parameter_report(model: Module) -> str:
    """PEFT's print_trainable_parameters line: trainable, all (each tensor once) and their ratio."""
    trainable = sum(t.size for _, t in model.named_parameters() if t.requires_grad)
    total = sum(t.size for _, t in model.named_parameters())
    return f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"


def merge(model: Module) -> Module:
    """Fold every adapter into its base weight, W' = W + scale · B A, and remove the bypass (in place).

    A bf16-stored W is widened to float32 first: ΔW is small next to W, and
    rounding the sum back to bf16 would erase much of it.
    """
    for path, lora in lora_layers(model):
        w = widen_bf16(lora.base_layer.weight.data)
        merged = Linear(Tensor((w + lora.delta_weight()).astype(w.dtype)), lora.base_layer.bias)
        parent_path, _, name = path.rpartition(".")
        setattr(model.get_submodule(parent_path), name, merged)
    if hasattr(model, "lora_config"):
        del model.lora_config
    return model
