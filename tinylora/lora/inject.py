"""LoRA in a frozen model: the `LoraLinear` layer, injecting it, naming it as PEFT does, merging it away.

Right after injection B = 0, so the model computes exactly what it computed
before; training moves only A and B. The math of the forward and backward is
in tinylora/ops/lora.py (`LoraLinearFn`); this module is the bookkeeping
around it:

* `LoraLinear`: wraps a frozen `Linear` as `base_layer` and holds A and B as
  `lora_A.weight` / `lora_B.weight`, so a parameter's dotted name is PEFT's
  saved key minus the prefix `base_model.model.`;
* `apply_lora`, `lora_layers`, `lora_parameters`, `parameter_report`;
* `merge`: W' = W + scale · B A. Afterwards each adapted projection is a plain
  `Linear` again, computing x W'ᵀ + b = x Wᵀ + b + scale · x Aᵀ Bᵀ (dropout is
  off at inference); `tinylora fuse` (lora/fused.py) merges, then saves.

The settings are lora/config.py, the file formats lora/peft.py and lora/fused.py.
"""

from __future__ import annotations

import numpy as np

from ..errors import TinyloraError
from ..kernels.weights import DenseWeight, as_weight
from ..nn import Linear, Module
from ..ops.dropout import dropout_mask
from ..ops.reference import FUSED, OpSet
from ..tensor import Tensor
from .config import PEFT_PREFIX, TARGETS, LoraConfig


class LoraLinear(Module):
    """x (..., in) -> base_layer(x) + scale · drop(x) Aᵀ Bᵀ (..., out); only A and B train.

    The five-line math of the forward and of dA, dB, dx is in tinylora/ops/lora.py, next to the code.
    """

    def __init__(self, base_layer: Linear, lora_a: np.ndarray, lora_b: np.ndarray, scale: float,
                 dropout: float = 0.0, rng: np.random.Generator | None = None, ops: OpSet = FUSED):
        self.base_layer = base_layer
        self.lora_A = Linear(Tensor(lora_a, requires_grad=True))        # weight (R, in)
        self.lora_B = Linear(Tensor(lora_b, requires_grad=True))        # weight (out, R)
        self.scale = scale
        self.dropout = dropout
        if dropout > 0.0 and rng is None:
            raise ValueError("LoraLinear with dropout > 0 needs an np.random.Generator for its masks")
        self.rng = rng                                                  # draws the dropout masks
        self.ops = ops                                                  # the model's op set (ops/reference.py)

    @property
    def r(self) -> int:
        return self.lora_A.weight.shape[0]

    def __call__(self, x: Tensor) -> Tensor:
        keep = None
        if self.dropout > 0.0 and self.training:
            keep = dropout_mask(x.shape, self.dropout, self.rng, x.dtype)      # 0 or 1/(1-p), inverted dropout
        return self.ops.lora_linear(x, self.base_layer.weight, self.lora_A.weight, self.lora_B.weight,
                                    self.base_layer.bias, scale=self.scale, keep=keep)

    def infer(self, x: np.ndarray) -> np.ndarray:
        """x (N, in) array -> base_layer(x) + scale · x Aᵀ Bᵀ (N, out), no graph, no dropout (decode.py);
        the same products in the same order as LoraLinearFn's forward, so the same numbers"""
        y = self.base_layer.infer(x)                                            # (N, out)
        y += (x @ self.lora_A.weight.data.T * self.scale) @ self.lora_B.weight.data.T
        return y

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
    ops = getattr(model, "ops", FUSED)                  # a LoRA layer computes with its model's op set
    for i in layers:
        layer = model.model.layers[i]
        for name in config.targets:
            parent = getattr(layer, TARGETS[name])
            base = getattr(parent, name)
            a = (std * rng.standard_normal((config.r, base.in_features))).astype(dtype)   # (R, in)
            b = np.zeros((base.out_features, config.r), dtype=dtype)                      # (out, R)
            dropout_rng = np.random.default_rng(dropout_seq.spawn(1)[0]) if config.dropout > 0 else None
            setattr(parent, name, LoraLinear(base, a, b, config.scale, config.dropout, dropout_rng, ops))
    model.lora_config = config
    return model


def lora_layers(model: Module) -> list[tuple[str, LoraLinear]]:
    """(dotted path, LoraLinear) for every adapted projection, in model order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoraLinear)]


def lora_parameters(model: Module) -> list[tuple[str, Tensor]]:
    """(PEFT key, tensor) for every A and B, e.g. base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"""
    return [(PEFT_PREFIX + name, t) for name, t in model.named_parameters() if ".lora_A." in name or ".lora_B." in name]


def parameter_report(model: Module) -> str:
    """PEFT's print_trainable_parameters line: trainable, all (each tensor once) and their ratio.

    Counts are logical parameters: a bf16 or quantised weight counts out × in, whatever bytes it holds.
    """
    trainable = sum(t.size for _, t in model.named_parameters() if t.requires_grad)
    total = sum(t.size for _, t in model.named_parameters())
    return f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"


def merge(model: Module) -> Module:
    """Fold every adapter into its base weight, W' = W + scale · B A, and remove the bypass (in place).

    The merged W' is a float32 (or the model's float64) DenseWeight whatever W's storage: ΔW is
    small next to W, and rounding the sum back to bf16 would erase much of it.
    """
    for path, lora in lora_layers(model):
        w = as_weight(lora.base_layer.weight.data).to_float()                  # (out, in) widened, if stored
        merged_w = (w + lora.delta_weight()).astype(w.dtype)
        merged = Linear(Tensor(DenseWeight(merged_w)), lora.base_layer.bias)
        parent_path, _, name = path.rpartition(".")
        setattr(model.get_submodule(parent_path), name, merged)
    if hasattr(model, "lora_config"):
        del model.lora_config
    return model
