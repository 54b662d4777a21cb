"""The Qwen2 / Llama decoder: one model for both, with Hugging Face's names.

    logits = lm_head(norm(layer_L(... layer_1(embed_tokens(ids)))))
    layer(x):  n1  = input_layernorm(x)
               h   = x + o_proj(attention(rope(q_proj(n1)), rope(k_proj(n1)), v_proj(n1)))
               n2  = post_attention_layernorm(h)
               out = h + down_proj(silu(gate_proj(n2)) * up_proj(n2))

Pre-norm residual blocks (RMSNorm before each sub-layer, the residual stream
itself never normalised until the final `norm`); grouped-query attention
with rotary positions; a SwiGLU MLP. The attribute paths are Hugging Face's
(`model.layers.{i}.self_attn.q_proj`, `…mlp.down_proj`, `…input_layernorm`,
`model.norm`, `lm_head`), so a checkpoint loads by name and PEFT's adapter keys
are these names behind a fixed prefix.

Qwen2 and Llama differ only in which projections carry a bias (see
config.py). Every pretrained tensor is frozen: requires_grad False, so a
backward pass computes gradients only for what LoRA (lora.py) adds. This
module never imports lora: LoRA wraps these Linear layers from outside.
"""

from __future__ import annotations

import numpy as np

from .cache import KVCache
from .config import ModelConfig
from .errors import TinyloraError
from .formats.safetensors import check_tensors, is_float
from .kernels.bf16 import bf16_to_f32
from .kernels.bf16_dot import has_bf16_dot
from .kernels.weights import BF16Weight, FrozenWeight, frozen_weight
from .nn import Embedding, Linear, Module, RMSNorm
from .ops.checkpoint import checkpoint
from .ops.reference import FUSED, OpSet
from .ops.rope import rope, rope_inv_freq, rope_tables
from .tensor import Tensor, is_grad_enabled


class Attention(Module):
    """x (B, T, C) -> (B, T, C): causal grouped-query self-attention with RoPE."""

    def __init__(self, q_proj: Linear, k_proj: Linear, v_proj: Linear, o_proj: Linear, config: ModelConfig,
                 ops: OpSet = FUSED):
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = q_proj, k_proj, v_proj, o_proj
        self.ops = ops                                       # FUSED, or REFERENCE (ops/reference.py)
        self.num_heads = config.num_attention_heads          # H
        self.num_kv_heads = config.num_key_value_heads       # K
        self.head_dim = config.head_dim                      # D

    def __call__(self, x: Tensor, cos: np.ndarray, sin: np.ndarray, key_mask: np.ndarray | None,
                 cache: KVCache | None, layer_idx: int) -> Tensor:
        """x (B, T, C), cos/sin (1, T, D/2), key_mask (B, S) or None -> (B, T, C)"""
        B, T, _ = x.shape
        H, K, D = self.num_heads, self.num_kv_heads, self.head_dim
        q = self.q_proj(x).reshape(B, T, H, D)               # (B, T, H, D)
        k = self.k_proj(x).reshape(B, T, K, D)               # (B, T, K, D)
        v = self.v_proj(x).reshape(B, T, K, D)               # (B, T, K, D)
        q, k = rope(q, cos, sin), rope(k, cos, sin)          # rotate by position; v is not rotated
        if cache is not None:                                # decoding: attend to the cached past too
            k_all, v_all = cache.update(layer_idx, k.data, v.data)
            k, v = Tensor(k_all), Tensor(v_all)              # (B, S, K, D), S = cached + T
        out = self.ops.attention(q, k, v, key_mask)          # (B, T, H, D)
        return self.o_proj(out.reshape(B, T, H * D))         # (B, T, C)


class MLP(Module):
    """x (B, T, C) -> down_proj(silu(gate_proj(x)) * up_proj(x)) (B, T, C)"""

    def __init__(self, gate_proj: Linear, up_proj: Linear, down_proj: Linear, ops: OpSet = FUSED):
        self.gate_proj, self.up_proj, self.down_proj = gate_proj, up_proj, down_proj
        self.ops = ops

    def __call__(self, x: Tensor) -> Tensor:
        return self.down_proj(self.ops.swiglu(self.gate_proj(x), self.up_proj(x)))   # (B, T, F) in the middle


class DecoderLayer(Module):
    """x (B, T, C) -> (B, T, C): two pre-norm residual blocks, attention then MLP."""

    def __init__(self, self_attn: Attention, mlp: MLP, input_layernorm: RMSNorm, post_attention_layernorm: RMSNorm):
        self.self_attn = self_attn
        self.mlp = mlp
        self.input_layernorm = input_layernorm
        self.post_attention_layernorm = post_attention_layernorm

    def __call__(self, x: Tensor, cos: np.ndarray, sin: np.ndarray, key_mask: np.ndarray | None,
                 cache: KVCache | None, layer_idx: int) -> Tensor:
        """x (B, T, C) -> (B, T, C); the residual stream x is added to, never normalised."""
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, key_mask, cache, layer_idx)
        return h + self.mlp(self.post_attention_layernorm(h))


class DecoderModel(Module):
    """ids (B, T) -> final hidden states (B, T, C). Hugging Face's `model.` prefix."""

    def __init__(self, embed_tokens: Embedding, layers: list[DecoderLayer], norm: RMSNorm):
        self.embed_tokens = embed_tokens
        self.layers = layers
        self.norm = norm


class CausalLM(Module):
    """A decoder-only language model: ids (B, T) -> next-token logits (B, T, V).

    grad_checkpoint: when True, training keeps only each decoder layer's input and recomputes
    the layer during the backward (ops/checkpoint.py): the same gradients, a fraction of the memory.
    """

    grad_checkpoint: bool = False

    def __init__(self, config: ModelConfig, model: DecoderModel, lm_head: Linear, ops: OpSet = FUSED):
        self.config = config
        self.ops = ops                  # the op set every layer was built with; LoRA layers use it too
        self.model = model
        self.lm_head = lm_head          # shares embed_tokens' weight tensor when embeddings are tied
        inv_freq = rope_inv_freq(config.head_dim, config.rope_theta)
        self.inv_freq = inv_freq / np.float32(config.rope_scaling_factor)   # (D/2,) "linear" scaling

    @property
    def dtype(self) -> np.dtype:
        return self.model.norm.weight.dtype

    def set_compute(self, compute: str) -> str | None:
        """compute "float32" (the default, exact) or "bfloat16": the products of every frozen matrix
        with more than a few rows of x (training, a long prompt) round x and W to bf16 and sum in
        float32 on the CPU's bf16 dot-product instruction (kernels/bf16_dot.py). LoRA's A and B,
        their products and the optimizer stay float32. Returns a one-line note when the CPU cannot
        (no avx512_bf16): the products then stay float32."""
        if compute not in ("float32", "bfloat16"):
            raise TinyloraError(f"compute must be float32 or bfloat16, got {compute!r}")
        if compute == "bfloat16" and self.dtype != np.float32:
            raise TinyloraError(f"compute bfloat16 needs a float32 model, this one computes in {self.dtype}")
        for _, p in self.named_parameters():
            if isinstance(p.data, FrozenWeight):
                p.data.compute = compute
        if compute == "bfloat16" and not has_bf16_dot():
            return "compute bfloat16: this CPU has no avx512_bf16 (or Numba targets none), so products stay float32"
        return None

    def hidden_states(self, input_ids: np.ndarray, attention_mask: np.ndarray | None = None,
                      cache: KVCache | None = None, position_ids: np.ndarray | None = None) -> Tensor:
        """input_ids (B, T), attention_mask (B, S) or None -> final hidden states (B, T, C)

        attention_mask: 1 for real tokens, 0 for padding, over all S keys
        (cached + new). With a cache the new tokens continue at the cache's
        position; the cache is advanced by T afterwards.
        Packed rows (several examples in one row): attention_mask holds each
        token's example, 1, 2, ... (0 padding), so attention stays inside an
        example, and position_ids (B, T) restart at 0 with each example, as
        transformers' packed-sequence training passes them.
        """
        input_ids = np.asarray(input_ids)
        if input_ids.ndim != 2:
            raise TinyloraError(f"input_ids must have shape (B, T), got {input_ids.shape}")
        B, T = input_ids.shape
        past = 0
        if cache is not None:
            if is_grad_enabled():
                raise TinyloraError("a KV cache is for inference: run under tinylora.no_grad()")
            past = cache.length
        if attention_mask is not None:
            attention_mask = np.asarray(attention_mask)
            if attention_mask.shape != (B, past + T):
                raise TinyloraError(f"attention_mask has shape {attention_mask.shape}, expected {(B, past + T)}")
        if position_ids is None:
            positions = np.arange(past, past + T)                              # (T,)
        else:
            positions = np.asarray(position_ids)
            if positions.shape != (B, T) or cache is not None:
                raise TinyloraError(f"position_ids must have shape {(B, T)} (and no cache), got {positions.shape}")
        cos, sin = rope_tables(positions, self.inv_freq, self.dtype)           # (1 or B, T, D/2) each
        x = self.model.embed_tokens(input_ids)                                 # (B, T, C)
        checkpointed = self.grad_checkpoint and cache is None and is_grad_enabled()
        for i, layer in enumerate(self.model.layers):
            if checkpointed:                    # keep only x; the layer runs again in the backward
                x = checkpoint(layer, x, cos, sin, attention_mask, None, i)
            else:
                x = layer(x, cos, sin, attention_mask, cache, i)
        if cache is not None:
            cache.advance(T)
        return self.model.norm(x)                                              # (B, T, C)

    def __call__(self, input_ids: np.ndarray, attention_mask: np.ndarray | None = None,
                 cache: KVCache | None = None, position_ids: np.ndarray | None = None) -> Tensor:
        """input_ids (B, T) -> logits (B, T, V)"""
        return self.lm_head(self.hidden_states(input_ids, attention_mask, cache, position_ids))

    def loss(self, input_ids: np.ndarray, labels: np.ndarray, attention_mask: np.ndarray | None = None,
             position_ids: np.ndarray | None = None) -> Tensor:
        """input_ids (B, T), labels (B, T) with -100 = not counted -> mean cross-entropy ()

        The next-token shift, as transformers does it: the logits at position t
        are scored against labels[t + 1]. lm_head and the cross-entropy are one
        op (ops/cross_entropy.py): the logits are formed a block of rows at a
        time and only for positions whose label counts, so the (B, T, V) array
        never exists. The value equals cross_entropy(lm_head(h)[:, :-1], ...).
        """
        labels = np.asarray(labels)
        if labels.shape != np.shape(input_ids):
            raise TinyloraError(f"labels have shape {labels.shape}, input_ids {np.shape(input_ids)}")
        h = self.hidden_states(input_ids, attention_mask, position_ids=position_ids)   # (B, T, C)
        return self.ops.linear_cross_entropy(h[:, :-1], self.lm_head.weight, labels[:, 1:])   # () via (B, T-1, V) logits

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def from_state_dict(cls, config: ModelConfig, tensors: dict[str, np.ndarray | FrozenWeight],
                        dtype=np.float32, source: str = "checkpoint", ops: OpSet = FUSED) -> "CausalLM":
        """Build the model around a checkpoint's tensors (Hugging Face names), all frozen.

        Each matrix becomes a frozen weight that keeps its storage
        (kernels/weights.py, `frozen_weight`): a bfloat16 array stays bf16 for
        float32 compute, a float array becomes a float32 (or `dtype`) weight, a
        FrozenWeight is taken as it is. Vectors (norms, biases) are tiny: they
        become plain `dtype` arrays, so every op sees plain floats there.
        ops: FUSED (the default), or REFERENCE to build the same model from the
        plain versions of the fused ops (ops/reference.py), for testing.
        """
        expected = expected_shapes(config)
        tensors = dict(tensors)
        if config.tie_word_embeddings:
            tensors.pop("lm_head.weight", None)          # some tied checkpoints store the copy anyway
        for name in list(tensors):
            if name.endswith("rotary_emb.inv_freq"):     # a cache of rope_inv_freq, not a weight
                del tensors[name]
        check_tensors(source, tensors, expected,
                      why_unexpected=lambda name: f"not a tensor of a {config.architecture} model")
        for name, t in tensors.items():
            if not isinstance(t, FrozenWeight) and not is_float(t.dtype):
                raise TinyloraError(f"{source}: tensor {name} has dtype {t.dtype}, expected a floating-point type")
        return cls._build(config, tensors, np.dtype(dtype), ops)

    @classmethod
    def _build(cls, config: ModelConfig, tensors: dict, dtype: np.dtype, ops: OpSet) -> "CausalLM":
        def frozen(name: str) -> Tensor:
            a = tensors[name]
            if isinstance(a, FrozenWeight) or a.ndim == 2:
                return Tensor(frozen_weight(a, dtype))               # (O, I) matrices: typed frozen weights
            if a.dtype.name == "bfloat16":
                a = bf16_to_f32(np.ascontiguousarray(a).view(np.uint16))
            return Tensor(np.ascontiguousarray(a, dtype=dtype))     # (C,) norms and (O,) biases

        def proj(prefix: str, bias: bool) -> Linear:
            return Linear(frozen(f"{prefix}.weight"), frozen(f"{prefix}.bias") if bias else None)

        def norm(name: str) -> RMSNorm:
            return RMSNorm(frozen(name), config.rms_norm_eps)

        layers = []
        for i in range(config.num_hidden_layers):
            a, m = f"model.layers.{i}.self_attn", f"model.layers.{i}.mlp"
            attn = Attention(proj(f"{a}.q_proj", config.qkv_bias), proj(f"{a}.k_proj", config.qkv_bias),
                             proj(f"{a}.v_proj", config.qkv_bias), proj(f"{a}.o_proj", config.o_bias), config, ops)
            mlp = MLP(proj(f"{m}.gate_proj", config.mlp_bias), proj(f"{m}.up_proj", config.mlp_bias),
                      proj(f"{m}.down_proj", config.mlp_bias), ops)
            layers.append(DecoderLayer(attn, mlp, norm(f"model.layers.{i}.input_layernorm.weight"),
                                       norm(f"model.layers.{i}.post_attention_layernorm.weight")))
        embed = Embedding(frozen("model.embed_tokens.weight"))
        decoder = DecoderModel(embed, layers, norm("model.norm.weight"))
        lm_head = Linear(embed.weight) if config.tie_word_embeddings else Linear(frozen("lm_head.weight"))
        return cls(config, decoder, lm_head, ops)


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a checkpoint of this config must hold, with its shape (Hugging Face names)."""
    C, F, V = config.hidden_size, config.intermediate_size, config.vocab_size
    q_dim = config.num_attention_heads * config.head_dim           # H * D
    kv_dim = config.num_key_value_heads * config.head_dim          # K * D
    shapes = {"model.embed_tokens.weight": (V, C), "model.norm.weight": (C,)}
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}"
        for name, (out, inp), bias in [("self_attn.q_proj", (q_dim, C), config.qkv_bias),
                                       ("self_attn.k_proj", (kv_dim, C), config.qkv_bias),
                                       ("self_attn.v_proj", (kv_dim, C), config.qkv_bias),
                                       ("self_attn.o_proj", (C, q_dim), config.o_bias),
                                       ("mlp.gate_proj", (F, C), config.mlp_bias),
                                       ("mlp.up_proj", (F, C), config.mlp_bias),
                                       ("mlp.down_proj", (C, F), config.mlp_bias)]:
            shapes[f"{p}.{name}.weight"] = (out, inp)
            if bias:
                shapes[f"{p}.{name}.bias"] = (out,)
        shapes[f"{p}.input_layernorm.weight"] = (C,)
        shapes[f"{p}.post_attention_layernorm.weight"] = (C,)
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (V, C)
    return shapes


def random_state_dict(config: ModelConfig, rng: np.random.Generator, dtype=np.float32,
                      std: float = 0.02, bf16: bool = False) -> dict[str, np.ndarray | FrozenWeight]:
    """A random checkpoint for tests and benchmarks: N(0, std²) weights and biases, norms near 1.

    bf16: float32 matrices are rounded to BF16Weights one at a time, as drawn (what
    load_model(dtype="bfloat16") does with a float32 file), so the float32 model
    never exists whole.
    """
    tensors = {}
    for name, shape in expected_shapes(config).items():
        # Drawn directly in the target dtype and scaled in place: a Qwen-sized
        # embedding table drawn in float64 first would briefly need 2 GB more.
        a = rng.standard_normal(shape, dtype=np.dtype(dtype).type)
        a *= 0.1 if name.endswith("norm.weight") else std
        if name.endswith("norm.weight"):
            a += 1.0
        tensors[name] = BF16Weight.from_array(a) if bf16 and a.ndim == 2 else a
    return tensors
