"""Modules: the named tree of layers that holds a model's tensors.

A `Module` is a plain object whose attributes are its tensors (parameters),
its child modules, or lists of child modules. Walking those attributes gives
every tensor a dotted name, and the names are Hugging Face's
(`model.layers.0.self_attn.q_proj.weight`), so loading a checkpoint is a
dictionary walk and a LoRA adapter's PEFT key is a fixed prefix away.

Here: `Module`, and the three leaf layers the decoder is built from,
`Linear`, `Embedding`, `RMSNorm`, each a thin holder of tensors around its op.
Not here: the decoder itself (model.py) and LoRA's wrapper of Linear (lora.py).
There is no registration step and no hooks: a parameter is an attribute that
holds a Tensor, nothing more.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from .kernels import weights
from .ops.embedding import embedding
from .ops.linear import linear
from .ops.rmsnorm import rms_norm
from .tensor import Tensor


class Module:
    """Base of every layer: named parameters by walking attributes.

    `training` (True by default) switches what differs between training and
    inference, which here is only LoRA's dropout; `train(True / False)` sets
    it on the whole tree (there is deliberately no `eval` method: that name is
    reserved for the builtin we never use).
    """

    training: bool = True

    def train(self, mode: bool = True) -> "Module":
        for _, module in self.named_modules():
            module.training = mode
        return self

    def named_modules(self, prefix: str = "") -> Iterator[tuple[str, "Module"]]:
        """(dotted name, module) for this module and all below it, in attribute order."""
        yield prefix, self
        for name, value in vars(self).items():
            path = f"{prefix}.{name}" if prefix else name
            if isinstance(value, Module):
                yield from value.named_modules(path)
            elif isinstance(value, list):
                for i, item in enumerate(value):
                    if isinstance(item, Module):
                        yield from item.named_modules(f"{path}.{i}")

    def named_parameters(self) -> Iterator[tuple[str, Tensor]]:
        """(dotted name, tensor) for every tensor in the tree, each tensor once.

        A tensor shared by two modules (tied input and output embeddings) is
        listed once, under the first name met, as PyTorch does.
        """
        seen: set[int] = set()
        for prefix, module in self.named_modules():
            for name, value in vars(module).items():
                if isinstance(value, Tensor) and id(value) not in seen:
                    seen.add(id(value))
                    yield (f"{prefix}.{name}" if prefix else name), value

    def parameters(self) -> list[Tensor]:
        return [t for _, t in self.named_parameters()]

    def trainable_parameters(self) -> list[tuple[str, Tensor]]:
        return [(n, t) for n, t in self.named_parameters() if t.requires_grad]

    def zero_grad(self) -> None:
        for t in self.parameters():
            t.grad = None

    def get_submodule(self, path: str) -> "Module":
        """The module at a dotted path, e.g. 'model.layers.3.mlp'."""
        module = self
        for part in path.split(".") if path else []:
            module = module[int(part)] if isinstance(module, list) else getattr(module, part)
        return module


class Linear(Module):
    """x (..., in) -> x Wᵀ + b (..., out); weight (out, in) as Hugging Face stores it.

    A pretrained weight is frozen (requires_grad False), so its backward
    computes only dx. It is a FrozenWeight of some storage (float32, bf16, ...,
    kernels/weights.py) or, for a layer that trains (LoRA's A and B), a float array.
    """

    def __init__(self, weight: Tensor, bias: Tensor | None = None):
        self.weight = weight
        self.bias = bias

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def __call__(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)

    def infer(self, x: np.ndarray) -> np.ndarray:
        """x (N, in) array -> x Wᵀ + b (N, out): the same product on plain arrays, no graph (decode.py)"""
        return weights.linear(x, self.weight.data, None if self.bias is None else self.bias.data)


class Embedding(Module):
    """ids (B, T) ints -> rows of weight (B, T, C); weight (V, C)."""

    def __init__(self, weight: Tensor):
        self.weight = weight

    def __call__(self, ids: np.ndarray) -> Tensor:
        return embedding(ids, self.weight)


class RMSNorm(Module):
    """x (..., C) -> x / rms(x) * weight (..., C)."""

    def __init__(self, weight: Tensor, eps: float):
        self.weight = weight
        self.eps = eps

    def __call__(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.weight, self.eps)
