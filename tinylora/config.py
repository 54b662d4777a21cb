"""ModelConfig: the decoder's hyper-parameters, read from a checkpoint's config.json.

Field names are config.json's own (`hidden_size`, `num_key_value_heads`, …) so
a reader can hold the two side by side. Qwen2 and Llama share one decoder; what
differs is captured by three bias flags:

    Qwen2:  q/k/v projections have a bias, o_proj has none, the MLP has none
    Llama:  `attention_bias` switches the bias of q/k/v *and* o_proj; `mlp_bias` the MLP's

Anything the model cannot honour (another architecture, an activation other
than SiLU, sliding-window attention switched on, a rope_scaling type that is
not implemented) fails with one line naming the field. Keys that change
nothing here are ignored from an explicit list; any other unknown key is
reported in one warning, never silently dropped.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from .errors import TinyloraError
from .formats.files import read_json

ARCHITECTURES = {"Qwen2ForCausalLM": "qwen2", "LlamaForCausalLM": "llama"}

# config.json keys that are read below, and keys that are harmless to ignore
# (training-time or tooling settings that do not change the forward pass).
_USED = {"architectures", "model_type", "hidden_size", "num_hidden_layers", "num_attention_heads",
         "num_key_value_heads", "head_dim", "intermediate_size", "vocab_size", "rope_theta", "rope_parameters",
         "rope_scaling", "rms_norm_eps", "tie_word_embeddings", "attention_bias", "mlp_bias",
         "max_position_embeddings", "bos_token_id", "eos_token_id", "pad_token_id", "hidden_act",
         "use_sliding_window", "sliding_window", "layer_types", "max_window_layers"}
_HARMLESS = {"initializer_range", "is_llama_config", "rope_interleaved", "transformers.js_config", "use_cache",
             "torch_dtype", "dtype", "transformers_version",
             "pretraining_tp", "_name_or_path", "name_or_path", "output_attentions", "output_hidden_states",
             "return_dict", "is_decoder", "tokenizer_class", "use_return_dict", "quantization_config",
             "bos_token", "eos_token", "pad_token", "unk_token", "chat_template", "task_specific_params",
             "id2label", "label2id", "problem_type", "torchscript", "keys_to_ignore_at_inference", "mlp_only_layers"}


@dataclass
class ModelConfig:
    # Fields keep config.json's names, except four derived ones: `architecture`
    # (from "architectures"), `rope_scaling_factor` (from rope_parameters /
    # rope_scaling), `qkv_bias` / `o_bias` (Qwen2's fixed rule or Llama's
    # "attention_bias") and `eos_token_ids` (eos_token_id, an int or a list).
    architecture: str                    # "qwen2" or "llama"
    hidden_size: int                     # C
    num_hidden_layers: int
    num_attention_heads: int             # H
    num_key_value_heads: int             # K
    head_dim: int                        # D
    intermediate_size: int               # F
    vocab_size: int                      # V
    rope_theta: float = 10000.0
    rope_scaling_factor: float = 1.0     # "linear" rope scaling divides positions by this
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    max_position_embeddings: int = 32768
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)

    @classmethod
    def from_json(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        if not path.is_file():
            raise TinyloraError(f"{path}: no config.json; a model folder needs config.json, *.safetensors "
                                "and tokenizer.json")
        return cls.from_dict(read_json(path), source=str(path))

    @classmethod
    def from_dict(cls, raw: dict, source: str = "config.json") -> "ModelConfig":
        def bad(key, want):
            return TinyloraError(f"{source}: field '{key}' must be {want}, got {raw[key]!r}")

        def integer(key, default=None, minimum=1):
            """An int field (not a bool, not a float); missing or null -> default (required if None)."""
            if raw.get(key) is None:
                if default is None:
                    raise TinyloraError(f"{source}: missing field '{key}'")
                return default
            v = raw[key]
            if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
                raise bad(key, f"an integer >= {minimum}")
            return v

        def positive(key, value, default):
            """A positive finite number read from `value` (a sub-dict's entry or raw[key])."""
            v = default if value is None else value
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise TinyloraError(f"{source}: field '{key}' must be a positive number, got {v!r}")
            return float(v)

        def flag(key, default=False):
            v = raw.get(key, default)
            if v is None:
                return default
            if not isinstance(v, bool):
                raise bad(key, "true or false")
            return v

        def of_type(key, kind, want):
            v = raw.get(key)
            if v is not None and not isinstance(v, kind):
                raise bad(key, want)
            return v

        archs = of_type("architectures", list, "a list of class names") or []
        arch = next((ARCHITECTURES[a] for a in archs if isinstance(a, str) and a in ARCHITECTURES), None)
        if arch is None:
            raise TinyloraError(f"{source}: architectures {archs} not supported; tinylora runs "
                                f"{' and '.join(ARCHITECTURES)}")
        if raw.get("hidden_act", "silu") != "silu":
            raise TinyloraError(f"{source}: hidden_act {raw['hidden_act']!r} not supported (only 'silu')")
        sliding = [t for t in of_type("layer_types", list, "a list") or [] if t != "full_attention"]
        if raw.get("use_sliding_window") or sliding:
            raise TinyloraError(f"{source}: sliding-window attention (use_sliding_window / layer_types) "
                                "is not supported")

        # Rope: transformers 5 writes rope_parameters {rope_type, rope_theta, ...};
        # older files have rope_theta and rope_scaling at the top level.
        rope = of_type("rope_parameters", dict, "an object") or {}
        scaling = of_type("rope_scaling", dict, "an object") or {}
        rope_type = rope.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
        theta = positive("rope_theta", rope.get("rope_theta", raw.get("rope_theta")), 10000.0)
        factor = 1.0
        if rope_type == "linear":
            factor = positive("factor", rope.get("factor", scaling.get("factor")), 1.0)
        elif rope_type != "default":
            raise TinyloraError(f"{source}: rope scaling type {rope_type!r} is not implemented "
                                "(supported: default, linear)")

        if raw.get("attention_dropout"):
            warnings.warn(f"{source}: attention_dropout {raw['attention_dropout']} is not applied (tinylora "
                          "trains without dropout on attention weights; LoRA has its own dropout)", stacklevel=3)
        unknown = sorted(set(raw) - _USED - _HARMLESS - {"attention_dropout"})
        if unknown:
            warnings.warn(f"{source}: ignoring config keys tinylora does not use: {', '.join(unknown)}",
                          stacklevel=3)

        H = integer("num_attention_heads")
        C = integer("hidden_size")
        K = integer("num_key_value_heads", default=H)
        if H % K:
            raise TinyloraError(f"{source}: num_attention_heads {H} is not a multiple of num_key_value_heads {K}")
        if raw.get("head_dim") is None and C < H:
            raise TinyloraError(f"{source}: hidden_size {C} is smaller than num_attention_heads {H}")
        eos = raw.get("eos_token_id")
        eos_list = [] if eos is None else (eos if isinstance(eos, list) else [eos])
        if any(isinstance(e, bool) or not isinstance(e, int) for e in eos_list):
            raise bad("eos_token_id", "a token id or a list of them")
        bos = raw.get("bos_token_id")
        if bos is not None and (isinstance(bos, bool) or not isinstance(bos, int)):
            raise bad("bos_token_id", "a token id")
        eos_ids = list(eos_list)
        llama_bias = flag("attention_bias")
        return cls(
            architecture=arch, hidden_size=C, num_hidden_layers=integer("num_hidden_layers"),
            num_attention_heads=H, num_key_value_heads=K, head_dim=integer("head_dim", default=C // H),
            intermediate_size=integer("intermediate_size"), vocab_size=integer("vocab_size"),
            rope_theta=theta, rope_scaling_factor=factor,
            rms_norm_eps=positive("rms_norm_eps", raw.get("rms_norm_eps"), 1e-6),
            tie_word_embeddings=flag("tie_word_embeddings"),
            qkv_bias=True if arch == "qwen2" else llama_bias,
            o_bias=False if arch == "qwen2" else llama_bias,
            mlp_bias=False if arch == "qwen2" else flag("mlp_bias"),
            max_position_embeddings=integer("max_position_embeddings", default=32768),
            bos_token_id=bos, eos_token_ids=eos_ids,
        )
