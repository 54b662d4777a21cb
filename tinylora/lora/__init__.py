"""LoRA: the settings, injecting the layer, merging it back, and the adapter's files.

    config.py   LoraConfig (validated settings), the seven target projections, PEFT's key prefix
    inject.py   LoraLinear, apply_lora, lora_layers, lora_parameters, parameter_report, and
                merge: W' = W + scale · B A, the bypass folded away
    peft.py     save_adapter / load_adapter in PEFT's format (checked before anything is injected)
    fused.py    save_model (a model -> a Hugging Face folder) and fuse (base + adapter -> merged folder)

The op itself, forward and backward, is tinylora/ops/lora.py.
"""

from .config import PEFT_PREFIX, TARGETS, LoraConfig
from .fused import fuse, save_model
from .inject import LoraLinear, apply_lora, lora_layers, lora_parameters, merge, parameter_report
from .peft import load_adapter, save_adapter

__all__ = ["PEFT_PREFIX", "TARGETS", "LoraConfig", "LoraLinear", "apply_lora", "fuse", "load_adapter",
           "lora_layers", "lora_parameters", "merge", "parameter_report", "save_adapter", "save_model"]
