"""LoRA adapters in mlx-lm's format, read and written: the same update as PEFT's, transposed.

`mlx_lm.lora` (Apple's MLX) saves an adapter folder as two files:

    adapter_config.json     every flag of the run, sorted, indent 4; what loading reads is
                              "fine_tune_type": "lora"            ("dora", "full": other methods)
                              "num_layers": 16                    the LAST 16 decoder layers are adapted
                              "lora_parameters": {"rank": 8, "scale": 20.0, "dropout": 0.0,
                                                  "keys": ["self_attn.q_proj", ...]}   (optional)
                              "model": "<the base>"
    adapters.safetensors    model.layers.N.self_attn.q_proj.lora_a   (in, r)
                            model.layers.N.self_attn.q_proj.lora_b   (r, out)      metadata {"format": "mlx"}

mlx-lm's LoRALinear (mlx_lm/tuner/lora.py) computes

    y = x Wᵀ + scale · (x lora_a) lora_b

and PEFT's   y = x Wᵀ + (alpha / r) · (x Aᵀ) Bᵀ,   so   lora_a = Aᵀ,  lora_b = Bᵀ,  scale = alpha / r
(alpha / √r for rsLoRA: mlx-lm stores only the scale, so an adapter read back is plain LoRA with
alpha = scale · r, the same update).

Which modules: mlx-lm's linear_to_lora_layers adapts `model.layers[-max(num_layers, 0):]` (so 0 and
-1 mean every layer) and, in each, the modules named by `keys` — or, without keys, every Linear of the
layer, which in Llama and Qwen2 are the seven projections. A tinylora adapter on layers that are not
the last few (say layers [0, 2]) has no mlx-lm spelling and is refused in one line, as are DoRA and
full fine-tunes on reading. Neither mlx nor PyTorch is needed: the files are JSON and safetensors.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..errors import TinyloraError
from ..formats.files import read_json
from ..formats.safetensors import check_floats, check_tensors, read_safetensors
from .config import PEFT_PREFIX, TARGETS, LoraConfig, adapted_projections

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapters.safetensors"
KEYS = {f"{parent}.{name}": name for name, parent in TARGETS.items()}    # "self_attn.q_proj" -> "q_proj"


def is_mlx_adapter(folder) -> bool:
    """An mlx-lm adapter folder: adapters.safetensors, or a config in mlx-lm's words (no peft_type)."""
    folder = Path(folder)
    if (folder / WEIGHTS_FILE).is_file():
        return True
    if not (folder / CONFIG_FILE).is_file():
        return False
    try:
        raw = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False                          # the PEFT reader names what is wrong with it
    return isinstance(raw, dict) and "peft_type" not in raw and ("lora_parameters" in raw or "fine_tune_type" in raw)


# --------------------------------------------------------------------------
# Reading: an mlx-lm folder -> (LoraConfig, A and B under PEFT's keys)
# --------------------------------------------------------------------------

def read_mlx_config(path: Path, n_layers: int) -> LoraConfig:
    """mlx-lm's adapter_config.json -> LoraConfig, refusing in one line (naming the field) what is not LoRA."""
    raw = read_json(path)

    def refuse(field: str, value, why: str) -> TinyloraError:
        return TinyloraError(f"{path}: {field} = {json.dumps(value)}: {why}")

    kind = raw.get("fine_tune_type", "dora" if raw.get("use_dora") else "lora")
    if kind != "lora":
        why = {"dora": "DoRA (weight-decomposed LoRA) is not supported",
               "full": "a full fine-tune is not a LoRA adapter"}.get(kind, "expected \"lora\"")
        raise refuse("fine_tune_type", kind, why)
    if raw.get("use_dora"):
        raise refuse("use_dora", True, "DoRA (weight-decomposed LoRA) is not supported")
    params = raw.get("lora_parameters")
    if not isinstance(params, dict):
        raise refuse("lora_parameters", params, "expected an object with rank, scale and dropout")
    for field in ("rank", "scale"):
        if field not in params:
            raise TinyloraError(f"{path}: lora_parameters has no {field!r}")
    rank, scale = params["rank"], params["scale"]
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise refuse("lora_parameters.rank", rank, "expected a positive integer")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0:
        raise refuse("lora_parameters.scale", scale, "expected a positive number")

    keys = params.get("keys")
    if keys is None:
        targets = list(TARGETS)                   # every Linear of a Llama/Qwen2 layer: the seven projections
    elif isinstance(keys, list) and keys and all(isinstance(k, str) for k in keys):
        if unknown := [k for k in keys if k not in KEYS]:
            raise refuse("lora_parameters.keys", unknown[0], "names none of the projections tinylora adapts "
                         f"({', '.join(KEYS)})")
        targets = [KEYS[k] for k in keys]
    else:
        raise refuse("lora_parameters.keys", keys, "expected null or a non-empty list of module names")

    num_layers = raw.get("num_layers", 16)        # mlx_lm.lora's default
    if isinstance(num_layers, bool) or not isinstance(num_layers, int):
        raise refuse("num_layers", num_layers, "expected an integer")
    if num_layers > n_layers:
        raise refuse("num_layers", num_layers, f"the model has {n_layers} layers; is this adapter for another model?")
    layers = None if num_layers <= 0 or num_layers == n_layers else list(range(n_layers - num_layers, n_layers))
    try:
        return LoraConfig(r=rank, alpha=float(scale) * rank, dropout=params.get("dropout", 0.0),
                          target_modules=targets, layers=layers)
    except TinyloraError as e:
        raise TinyloraError(f"{path}: {e}") from None


def mlx_shapes(model_config, config: LoraConfig) -> dict[str, tuple[int, int]]:
    """mlx-lm's key and shape of every lora_a (in, r) and lora_b (r, out) that `config` adapts."""
    shapes = {}
    for path, out_features, in_features in adapted_projections(model_config, config):
        shapes[f"{path}.lora_a"] = (in_features, config.r)
        shapes[f"{path}.lora_b"] = (config.r, out_features)
    return shapes


def read_mlx_adapter(folder, model_config) -> tuple[LoraConfig, dict[str, np.ndarray]]:
    """An mlx-lm adapter folder -> (LoraConfig, {PEFT key: A (r, in) or B (out, r)}), checked against the base."""
    folder = Path(folder)
    config = read_mlx_config(folder / CONFIG_FILE, model_config.num_hidden_layers)
    weights_path = folder / WEIGHTS_FILE
    if not weights_path.is_file():
        raise TinyloraError(f"{weights_path}: file not found")
    tensors = read_safetensors(weights_path)
    check_tensors(weights_path, tensors, mlx_shapes(model_config, config),
                  why_unexpected=lambda key: _why_unexpected(key, model_config.num_hidden_layers),
                  missing_hint=f", which {CONFIG_FILE} implies")
    check_floats(weights_path, tensors)
    peft = {}
    for key, array in tensors.items():
        module, which = key.rsplit(".", 1)
        peft[f"{PEFT_PREFIX}{module}.{'lora_A' if which == 'lora_a' else 'lora_B'}.weight"] = \
            np.ascontiguousarray(array.T)
    return config, peft


def _why_unexpected(key: str, n_layers: int) -> str:
    if key.endswith(".m"):
        return "a DoRA magnitude vector; only plain LoRA is supported"
    parts = key.split(".")
    if len(parts) > 2 and parts[:2] == ["model", "layers"] and parts[2].isdigit() and int(parts[2]) >= n_layers:
        return f"the model has {n_layers} layers (0-{n_layers - 1}); is this adapter for another model?"
    return f"{CONFIG_FILE} does not adapt this module in this model"


# --------------------------------------------------------------------------
# Writing: (LoraConfig, PEFT tensors) -> an mlx-lm folder
# --------------------------------------------------------------------------

def mlx_config_dict(config: LoraConfig, n_layers: int, base: str | None) -> dict:
    """The adapter_config.json mlx-lm's load_adapters reads (and mlx_lm.lora writes), keys sorted."""
    layers = list(range(n_layers)) if config.layers is None else config.layers
    num_layers = len(layers)
    if layers != list(range(n_layers - num_layers, n_layers)):
        raise TinyloraError(f"the adapter adapts layers {layers}: mlx-lm adapts the last num_layers layers "
                            f"of the model, so only a run ending at layer {n_layers - 1} can be written")
    keys = [f"{TARGETS[name]}.{name}" for name in config.targets]
    return dict(sorted({"fine_tune_type": "lora", "num_layers": num_layers, "model": base,
                        "lora_parameters": {"rank": int(config.r), "scale": float(config.scale),
                                            "dropout": float(config.dropout), "keys": keys}}.items()))


def mlx_tensors(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """{PEFT key: A (r, in) / B (out, r)} -> {mlx-lm key: lora_a (in, r) / lora_b (r, out)}, float32."""
    out = {}
    for key in sorted(tensors):
        module, which = key[len(PEFT_PREFIX):].rsplit(".", 2)[:2]     # model.layers.3.self_attn.q_proj, lora_A
        out[f"{module}.{which.lower()}"] = np.ascontiguousarray(np.asarray(tensors[key], dtype=np.float32).T)
    return out
