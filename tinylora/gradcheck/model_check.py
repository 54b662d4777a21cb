"""The end-to-end gradient check: LoRA on a tiny random Qwen2, every A and B against finite differences.

The model: 2 layers, grouped-query attention (4 query heads sharing 2 kv
heads), q/k/v biases, tied embeddings, float64; LoRA on all seven projections
of both layers. The batch has right padding and -100 labels on a masked
prompt, as training batches do. B is set non-zero: LoRA starts from B = 0,
where dL/dA = 0 exactly, and a check of zeros against zeros proves nothing.

For each of the 28 A and B matrices a few sampled entries are compared, and
one random direction over all of them; afterwards no frozen tensor may hold
a gradient. `tinylora gradcheck` prints this as a table.

The second check is QLoRA's: the same, on a tiny Llama whose projections are
quantised frozen weights, one storage type per projection (NF4, Q8_0, Q4_0,
Q4_K, Q6_K, Q5_1, and NF4 again), held as their blocks. The dequantised
weights are exact float32 numbers, so float64 finite differences through them
are as exact as through a float matrix, and the frozen blocks must stay blocks
with no gradient.
"""

from __future__ import annotations

import numpy as np

from ..config import ModelConfig
from ..kernels import ggml
from ..kernels.quantized import GGMLWeight, NF4Weight, quantize
from ..lora import LoraConfig, apply_lora, lora_parameters
from ..model import CausalLM, random_state_dict
from ..tensor import Tensor
from .checker import GradcheckResult, gradcheck

TINY_QWEN2 = {"architectures": ["Qwen2ForCausalLM"], "hidden_size": 16, "intermediate_size": 24,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 40,
              "tie_word_embeddings": True, "rope_theta": 10000.0, "rms_norm_eps": 1e-6}


# Rows of 256 weights: the K types' super-blocks need them.
TINY_LLAMA = {"architectures": ["LlamaForCausalLM"], "hidden_size": 256, "intermediate_size": 256,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 40,
              "tie_word_embeddings": True, "rope_theta": 10000.0, "rms_norm_eps": 1e-6}
# projection -> the storage its frozen weight is held in, in the quantised check
QUANTISED_BASE = {"q_proj": "nf4", "k_proj": "q8_0", "v_proj": "q4_0", "o_proj": "nf4",
                  "gate_proj": "Q4_K", "up_proj": "Q6_K", "down_proj": "Q5_1"}


def tiny_lora_model(seed: int = 0, dtype=np.float64, lora: LoraConfig | None = None,
                    quantised: bool = False) -> CausalLM:
    """A tiny random Qwen2 (or, quantised, the Llama above with QUANTISED_BASE's frozen projections)
    with LoRA on all seven projections and B ~ N(0, 0.1²) instead of zeros."""
    config = ModelConfig.from_dict(TINY_LLAMA if quantised else TINY_QWEN2)
    rng = np.random.default_rng(seed)
    model = CausalLM.from_state_dict(config, random_state_dict(config, rng, dtype, std=0.2), dtype=dtype)
    if quantised:
        for layer in model.model.layers:
            for block in (layer.self_attn, layer.mlp):
                for name, kind in QUANTISED_BASE.items():
                    if hasattr(block, name):              # q/k/v/o in attention, gate/up/down in the MLP
                        proj = getattr(block, name)
                        proj.weight = Tensor(_quantised(proj.weight.data.array, kind, rng))
    apply_lora(model, lora or LoraConfig(r=4, alpha=8, target_modules="all-linear"), seed=seed)
    for name, t in lora_parameters(model):
        if ".lora_B." in name:
            t.data[...] = 0.1 * rng.standard_normal(t.shape)
    return model


def _quantised(w: np.ndarray, kind: str, rng: np.random.Generator):
    """(O, I) float weights -> a frozen weight of `kind`: quantised from w ("nf4", "q8_0", "q4_0"), or random
    blocks of a type tinylora only reads (any bytes are a block; the float16 scales are set small)."""
    if kind.islower():
        return quantize(w, kind)
    O, I = w.shape
    size, per_row = ggml.BLOCK_BYTES[kind], I // ggml.BLOCK_WEIGHTS[kind]
    blocks = rng.integers(0, 256, size=(O, per_row, size), dtype=np.uint8)
    for at in ggml.SCALES_AT[kind]:
        scale = {"Q4_K": 2e-3, "Q6_K": 1e-4, "Q5_1": 1e-2}[kind]
        blocks[..., at:at + 2] = (rng.standard_normal((O, per_row)) * scale).astype("<f2")[..., None].view(np.uint8)
    return GGMLWeight(blocks.reshape(O, -1), kind, (O, I))


def tiny_batch() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ids, labels, attention_mask (2, 7): the second row right-padded, prompts masked with -100."""
    ids = np.array([[5, 11, 3, 29, 17, 8, 2], [7, 1, 30, 14, 2, 0, 0]])
    mask = np.array([[1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0, 0]])
    labels = np.where(mask == 1, ids, -100)
    labels[:, :3] = -100
    return ids, labels, mask


def check_lora_model(seed: int = 0, entries: int = 2, quantised: bool = False) -> tuple[GradcheckResult, list[str]]:
    """-> (the gradient check of every A and B, names of frozen tensors that wrongly got a gradient, or,
    quantised, whose blocks did not stay blocks)"""
    model = tiny_lora_model(seed, quantised=quantised)
    ids, labels, mask = tiny_batch()
    params = lora_parameters(model)
    names = [n.removeprefix("base_model.model.model.") for n, _ in params]
    result = gradcheck(lambda *ab: model.loss(ids, labels, mask), [t for _, t in params], names=names,
                       entries=entries, seed=seed)
    leaked = [n for n, t in model.named_parameters() if not t.requires_grad and t.grad is not None]
    if quantised:
        leaked += [n for n, t in model.named_parameters() if n.endswith("base_layer.weight")
                   and not isinstance(t.data, (NF4Weight, GGMLWeight))]
    return result, leaked
