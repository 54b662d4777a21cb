"""The end-to-end gradient check: LoRA on a tiny random Qwen2, every A and B against finite differences.

The model: 2 layers, grouped-query attention (4 query heads sharing 2 kv
heads), q/k/v biases, tied embeddings, float64; LoRA on all seven projections
of both layers. The batch has right padding and -100 labels on a masked
prompt, as training batches do. B is set non-zero: LoRA starts from B = 0,
where dL/dA = 0 exactly, and a check of zeros against zeros proves nothing.

For each of the 28 A and B matrices a few sampled entries are compared, and
one random direction over all of them; afterwards no frozen tensor may hold
a gradient. `tinylora gradcheck` prints this as a table.
"""

from __future__ import annotations

import numpy as np

from ..config import ModelConfig
from ..lora import LoraConfig, apply_lora, lora_parameters
from ..model import CausalLM, random_state_dict
from .checker import GradcheckResult, gradcheck

TINY_QWEN2 = {"architectures": ["Qwen2ForCausalLM"], "hidden_size": 16, "intermediate_size": 24,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 40,
              "tie_word_embeddings": True, "rope_theta": 10000.0, "rms_norm_eps": 1e-6}


def tiny_lora_model(seed: int = 0, dtype=np.float64, lora: LoraConfig | None = None) -> CausalLM:
    """A tiny random Qwen2 with LoRA on all seven projections and B ~ N(0, 0.1²) instead of zeros."""
    config = ModelConfig.from_dict(TINY_QWEN2)
    rng = np.random.default_rng(seed)
    model = CausalLM.from_state_dict(config, random_state_dict(config, rng, dtype, std=0.2), dtype=dtype)
    apply_lora(model, lora or LoraConfig(r=4, alpha=8, target_modules="all-linear"), seed=seed)
    for name, t in lora_parameters(model):
        if ".lora_B." in name:
            t.data[...] = 0.1 * rng.standard_normal(t.shape)
    return model


def tiny_batch() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ids, labels, attention_mask (2, 7): the second row right-padded, prompts masked with -100."""
    ids = np.array([[5, 11, 3, 29, 17, 8, 2], [7, 1, 30, 14, 2, 0, 0]])
    mask = np.array([[1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0, 0]])
    labels = np.where(mask == 1, ids, -100)
    labels[:, :3] = -100
    return ids, labels, mask


def check_lora_model(seed: int = 0, entries: int = 2) -> tuple[GradcheckResult, list[str]]:
    """-> (the gradient check of every A and B, names of frozen tensors that wrongly got a gradient)"""
    model = tiny_lora_model(seed)
    ids, labels, mask = tiny_batch()
    params = lora_parameters(model)
    names = [n.removeprefix("base_model.model.model.") for n, _ in params]
    result = gradcheck(lambda *ab: model.loss(ids, labels, mask), [t for _, t in params], names=names,
                       entries=entries, seed=seed)
    leaked = [n for n, t in model.named_parameters() if not t.requires_grad and t.grad is not None]
    return result, leaked
