"""LoraConfig: the validated settings of a LoRA adapter, and the names of what it can adapt.

    y = x Wᵀ + b + s · drop(x) Aᵀ Bᵀ          A (R, in) ~ N(0, init_std²),  B (out, R) = 0
    s = alpha / R        (or alpha / √R with rsLoRA; Kalajdzievski, 2023)

Field names follow PEFT's LoraConfig where they mean the same thing (`r`,
`target_modules`, `use_rslora`); `alpha`, `dropout` and `layers` are PEFT's
`lora_alpha`, `lora_dropout` and `layers_to_transform` (lora/peft.py maps
them). A value that cannot be honoured is refused here, in one line, before
any model is touched.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ..errors import TinyloraError
from ..model import expected_shapes

# The seven projections of a Qwen2/Llama decoder layer, where each lives, in PEFT's order of a layer.
TARGETS = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
           "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
PEFT_PREFIX = "base_model.model."     # PEFT's saved key = this + the parameter's dotted path in the model


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


def adapted_projections(model_config, config: LoraConfig) -> list[tuple[str, int, int]]:
    """(dotted path, out_features, in_features) of every projection `config` adapts in a model of
    `model_config`, layer by layer in TARGETS order: what PEFT's and mlx-lm's files both enumerate."""
    weights = expected_shapes(model_config)
    layers = range(model_config.num_hidden_layers) if config.layers is None else config.layers
    paths = [f"model.layers.{i}.{TARGETS[name]}.{name}" for i in layers for name in config.targets]
    return [(path, *weights[f"{path}.weight"]) for path in paths]
