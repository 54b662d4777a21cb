"""tinylora: LoRA fine-tuning of Qwen2-family models in NumPy and Numba."""

from .gradcheck import gradcheck
from .tensor import Function, Tensor, is_grad_enabled, no_grad

__version__ = "0.1.0"

__all__ = ["Function", "Tensor", "gradcheck", "is_grad_enabled", "no_grad", "__version__"]
