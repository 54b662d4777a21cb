"""One decoding step on plain arrays: the decoder's forward for one new token, with no autograd.

Generating (generate.py) runs the model once per new token, on that token alone
against the KV cache. Through the modules of model.py that is ~20 ops a layer,
each wrapping its arrays in a Tensor and a Function for a backward pass that
never comes; for a model as small as SmolLM2 that bookkeeping cost as much as
all the products (Q8_0 here: ~13 of ~26 ms a token). `decode_step` is the same
computation written on arrays, calling the kernels the ops call:

    x = embed_tokens[token]                                            (1, C)
    each layer:
        n1      = rmsnorm(x)                                           (1, C)
        q, k, v = rope(q_proj(n1)), rope(k_proj(n1)), v_proj(n1)       (1, 1, H or K, D)
        cache  <- k, v;   o = attention(q, every cached k, v)          (1, 1, H, D)
        x       = x + o_proj(o)
        n2      = rmsnorm(x)
        x       = x + down_proj(swiglu(gate_proj(n2), up_proj(n2)))
    logits = lm_head(norm(x))                                          (V,)

The modules stay the definition and the simple version: each projection
computes through its own `infer` (nn.Linear, or LoRA's LoraLinear with its
bypass), so this file knows neither LoRA nor how a weight is stored, and the
result is bit for bit what `model.hidden_states` with a cache gives
(tests/test_decode.py). One sequence, every key real: what generation needs.
"""

from __future__ import annotations

import numpy as np

from .cache import KVCache
from .kernels import weights
from .kernels.attention import attention_forward
from .kernels.rmsnorm import rmsnorm_forward
from .kernels.rope import rope_forward
from .kernels.swiglu import swiglu_forward
from .ops.rope import rope_tables


def _rmsnorm(x: np.ndarray, norm) -> np.ndarray:
    """x (1, C) -> x / rms(x) * weight (1, C), as RMSNormFn"""
    return rmsnorm_forward(x, norm.weight.data.astype(x.dtype, copy=False), norm.eps)[0]


def decode_step(model, token: int, cache: KVCache) -> np.ndarray:
    """One new token at the cache's position -> its next-token logits (V,); the cache advances by one."""
    config = model.config
    H, K, D = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    position = cache.length
    cos, sin = rope_tables(np.arange(position, position + 1), model.inv_freq, model.dtype)   # (1, 1, D/2)
    every_key = np.ones((1, position + 1), dtype=np.bool_)                                  # (1, S)
    scale = 1.0 / np.sqrt(D)
    x = weights.gather(model.model.embed_tokens.weight.data, np.array([token]))             # (1, C)
    for i, layer in enumerate(model.model.layers):
        attn, mlp = layer.self_attn, layer.mlp
        n1 = _rmsnorm(x, layer.input_layernorm)
        q = rope_forward(attn.q_proj.infer(n1).reshape(1, 1, H, D), cos, sin)   # (1, 1, H, D)
        k = rope_forward(attn.k_proj.infer(n1).reshape(1, 1, K, D), cos, sin)   # (1, 1, K, D)
        v = attn.v_proj.infer(n1).reshape(1, 1, K, D)                           # (1, 1, K, D)
        k_all, v_all = cache.update(i, k, v)                                    # (1, S, K, D) views
        o, _ = attention_forward(q, k_all, v_all, every_key, scale)             # (1, 1, H, D)
        x = x + attn.o_proj.infer(o.reshape(1, H * D))                          # (1, C)
        n2 = _rmsnorm(x, layer.post_attention_layernorm)
        x = x + mlp.down_proj.infer(swiglu_forward(mlp.gate_proj.infer(n2), mlp.up_proj.infer(n2)))
    cache.advance(1)
    return model.lm_head.infer(_rmsnorm(x, model.model.norm))[0]                # (V,)
