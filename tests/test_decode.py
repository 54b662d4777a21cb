"""decode.py's one-token step on arrays gives exactly what the modules give with a KV cache."""

import numpy as np
import pytest

from tinylora.cache import KVCache
from tinylora.config import ModelConfig
from tinylora.decode import decode_step
from tinylora.kernels.quantized import quantize
from tinylora.lora import LoraConfig, apply_lora, lora_layers
from tinylora.model import CausalLM, random_state_dict
from tinylora.tensor import no_grad

QWEN2 = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 64, "intermediate_size": 96,
         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 70,
         "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"}, "rms_norm_eps": 1e-6,
         "tie_word_embeddings": True, "max_position_embeddings": 128}
LLAMA = QWEN2 | {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "attention_bias": True,
                 "tie_word_embeddings": False, "num_key_value_heads": 4}


def build(arch: dict, storage: str, lora: bool) -> CausalLM:
    config = ModelConfig.from_dict(arch)
    dtype = np.float64 if storage == "float64" else np.float32
    tensors = random_state_dict(config, np.random.default_rng(3), dtype, std=0.2, bf16=storage == "bfloat16")
    if storage in ("q8_0", "nf4"):
        tensors = {name: quantize(t, storage, name) if t.ndim == 2 else t for name, t in tensors.items()}
    model = CausalLM.from_state_dict(config, tensors, dtype=dtype)
    if lora:
        apply_lora(model, LoraConfig(r=4, alpha=8, dropout=0.1, target_modules=list(
            ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])), seed=1)
        rng = np.random.default_rng(4)
        for _, layer in lora_layers(model):          # B = 0 would hide the bypass
            layer.lora_B.weight.data[...] = rng.standard_normal(layer.lora_B.weight.shape) * 0.1
    model.train(False)
    return model


@pytest.mark.parametrize("arch, storage, lora", [
    (QWEN2, "float32", False), (QWEN2, "float32", True), (QWEN2, "float64", True), (LLAMA, "float32", True),
    (QWEN2, "bfloat16", True), (QWEN2, "q8_0", False), (LLAMA, "nf4", True),
])
def test_a_decoding_step_is_the_modules_forward_bit_for_bit(arch, storage, lora):
    model = build(arch, storage, lora)
    prompt, tokens = np.array([[5, 17, 3, 42, 8]]), [11, 69, 0, 23, 23, 7]
    with no_grad():
        caches = []
        for _ in range(2):                                       # the same prefill for both paths
            cache = KVCache.for_model(model, batch=1, max_length=prompt.shape[1] + len(tokens))
            model.hidden_states(prompt, cache=cache)
            caches.append(cache)
        by_modules, by_arrays = caches
        for token in tokens:
            expected = model(np.array([[token]]), cache=by_modules).data[0, -1]     # (V,)
            got = decode_step(model, token, by_arrays)
            assert got.dtype == expected.dtype and got.shape == (model.config.vocab_size,)
            np.testing.assert_array_equal(got, expected)
    assert by_arrays.length == by_modules.length == prompt.shape[1] + len(tokens)
    for a, b in zip(by_arrays.k + by_arrays.v, by_modules.k + by_modules.v):
        np.testing.assert_array_equal(a, b)


def test_the_step_ignores_dropout_and_leaves_the_model_as_it_was():
    model = build(QWEN2, "float32", lora=True)
    model.train(True)                                            # dropout on: infer never applies it
    cache = KVCache.for_model(model, batch=1, max_length=4)
    first = decode_step(model, 5, cache)
    cache = KVCache.for_model(model, batch=1, max_length=4)
    assert np.array_equal(decode_step(model, 5, cache), first) and model.training
