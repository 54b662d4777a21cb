"""LoRA adapters in PEFT's file format: save them, and load them into a model.

An adapter folder, as PEFT's `save_pretrained` writes it, is two files:

    adapter_config.json         {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 8, "lora_alpha": 16,
                                 "target_modules": ["q_proj", "v_proj"], "layers_to_transform": null, ...}
    adapter_model.safetensors   base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight  (R, in)
                                base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight  (out, R)
                                ... one A and one B per adapted projection; metadata {"format": "pt",
                                "tinylora.base_weights": "nf4"} (the base's storage: loading the adapter
                                onto a base of another precision works, with a one-line warning)

The key is `base_model.model.` + the parameter's dotted path in the model,
which is why tinylora's module names are Hugging Face's: `lora_parameters`
returns exactly these names. PEFT inserts its adapter name when it loads
(`lora_A.default.weight`) and removes it when it saves; both spellings load.

Loading checks before it changes anything. The config must describe plain
LoRA on the seven projections; whatever it cannot honour (DoRA, extra
trainable modules, a bias, a per-layer rank, a regex target, ...) is refused
with one line naming the field. Then every tensor the config implies must be
in the file with its exact shape, and nothing else may be; only then is LoRA
injected and A and B copied in. A failed load leaves the model as it was.

An mlx-lm adapter folder (adapters.safetensors) is read too, wherever an
adapter is: read_adapter hands it to lora/mlx.py, which converts it to these
keys and this orientation.

What is not here: the LoRA layer and its math (lora/inject.py, ops/lora.py), merging
(lora/inject.py), the fused full-model export (lora/fused.py), adapters on the hub (pass
a local folder), pickled `adapter_model.bin` files (never unpickled).
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import numpy as np

from ..errors import TinyloraError
from ..formats.files import atomic_write, read_json
from ..formats.safetensors import check_floats, check_tensors, read_metadata, read_safetensors, write_safetensors
from .config import PEFT_PREFIX, TARGETS, LoraConfig, adapted_projections
from .inject import apply_lora, lora_layers, lora_parameters
from .mlx import is_mlx_adapter, read_mlx_adapter

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_ADAPTER_NAME = "default"    # the name PEFT gives a loaded adapter; some tools save it inside the keys

# What PEFT 0.21's LoraConfig writes, with its defaults, beyond the fields
# save_adapter fills in. Writing them all makes PEFT load the file without
# "unexpected"/"missing" warnings. `peft_version` is PEFT's stamp of its own
# version: we are not PEFT, so we leave it out and PEFT fills in its own.
PEFT_DEFAULTS = {
    "alora_invocation_tokens": None, "alpha_pattern": {}, "arrow_config": None, "auto_mapping": None,
    "corda_config": None, "ensure_weight_tying": False, "eva_config": None, "exclude_modules": None,
    "fan_in_fan_out": False, "kasa_config": None, "layer_replication": None, "layers_pattern": None,
    "loftq_config": {}, "lora_bias": False, "lora_ga_config": None, "megatron_config": None,
    "megatron_core": "megatron.core", "modules_to_save": None, "monteclora_config": None,
    "qalora_group_size": 16, "rank_pattern": {}, "revision": None, "target_parameters": None,
    "trainable_token_indices": None, "use_bdlora": None, "use_dora": False, "use_qalora": False,
    "velora_config": None,
}

# Keys load_adapter reads, and keys that change nothing about the LoRA update
# (bookkeeping, or settings of initialisations whose result is in the file).
_READ = {"peft_type", "task_type", "r", "lora_alpha", "lora_dropout", "target_modules", "use_rslora",
         "layers_to_transform", "layers_pattern", "init_lora_weights"}
_HARMLESS = {"auto_mapping", "base_model_name_or_path", "revision", "inference_mode", "peft_version",
             "megatron_core", "qalora_group_size", "eva_config", "corda_config", "lora_ga_config",
             "ensure_weight_tying", "runtime_config"}
# Initialisations that need nothing but the saved A and B. The others (PiSSA,
# OLoRA, CorDA, LoftQ, LoRA-GA) also rewrite the base weights W, which PEFT
# redoes when it loads; an adapter trained that way is not a delta on the plain W.
_PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal")


# --------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------

def save_adapter(model, folder: str | os.PathLike) -> Path:
    """The model's A and B -> folder/adapter_model.safetensors + adapter_config.json; returns folder.

    Both files are written atomically, and the config only after the weights:
    if anything fails, an adapter saved there earlier is left whole.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise TinyloraError(f"{folder}: is a file; an adapter is saved into a folder")
    config = getattr(model, "lora_config", None)
    if config is None or not lora_layers(model):
        raise TinyloraError("the model has no LoRA layers to save: call apply_lora or load_adapter first")
    tensors = {name: t.data for name, t in lora_parameters(model)}
    for name, array in tensors.items():
        if not np.isfinite(array).all():
            raise TinyloraError(f"{folder / WEIGHTS_FILE}: not saved: {name} holds NaN or inf values")
    text = json.dumps(adapter_config_dict(config, getattr(model, "name_or_path", None)), indent=2) + "\n"

    # The config's temporary file is renamed into place only after the
    # weights' rename succeeded, so the two never disagree (but for the
    # instant between the two renames).
    with atomic_write(folder / CONFIG_FILE) as f:
        f.write(text.encode("utf-8"))
        write_safetensors(folder / WEIGHTS_FILE, tensors, metadata={"format": "pt", BASE_KEY: base_weights(model)})
    return folder


# The storage of the base projections an adapter was trained on ("nf4", "q4_k,q6_k", "bfloat16",
# "float32"), kept in the weights file's metadata: PEFT reads adapter_config.json strictly and warns
# about any key it does not know, but ignores safetensors metadata.
BASE_KEY = "tinylora.base_weights"


FLOATS = {"float16", "bfloat16", "float32", "float64"}


def quantised_kinds(base: str) -> set[str]:
    """The quantised storage types in a base_weights string ("q4_k,q8_0" -> {"q4_k", "q8_0"}; floats -> {})."""
    return set(base.split(",")) - FLOATS


def base_weights(model) -> str:
    """The storage types of the model's frozen projection weights, sorted and comma-joined."""
    kinds = {getattr(t.data, "storage", t.data.dtype.name) for name, t in model.named_parameters()
             if "_proj." in name and name.endswith(".weight") and "lora_" not in name}
    return ",".join(sorted(kinds))


def adapter_config_dict(config: LoraConfig, base_model_name_or_path: str | None = None) -> dict:
    """A LoraConfig -> the adapter_config.json object PEFT 0.21 writes (keys sorted, as PEFT sorts them)."""
    alpha = int(config.alpha) if float(config.alpha).is_integer() else float(config.alpha)   # PEFT's is an int
    ours = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": int(config.r), "lora_alpha": alpha,
        "lora_dropout": float(config.dropout), "target_modules": sorted(config.targets), "bias": "none",
        "use_rslora": bool(config.use_rslora), "layers_to_transform": config.layers,
        "base_model_name_or_path": base_model_name_or_path, "inference_mode": True, "fan_in_fan_out": False,
        # A ~ N(0, std²), B = 0. PEFT's "gaussian" has std 1/r; a custom init_std has no
        # PEFT name, and only matters before training, so the file says "gaussian" either way.
        "init_lora_weights": "gaussian",
    }
    return dict(sorted({**PEFT_DEFAULTS, **ours}.items()))


# --------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------

def load_adapter(model, folder: str | os.PathLike, seed: int = 0):
    """Inject LoRA into `model` as folder/adapter_config.json says, with A and B from the safetensors file
    (PEFT's folder, or mlx-lm's). seed: of the dropout masks, if training goes on from here.

    Returns the model. Everything is checked before the model is touched: on
    an error it is exactly as it was.
    """
    folder = Path(folder)
    if lora_layers(model):
        raise TinyloraError("the model already has LoRA layers; load the adapter into a freshly loaded model")
    config, tensors = read_adapter(folder, model.config)
    weights_path = folder / WEIGHTS_FILE
    trained_on = read_metadata(weights_path).get(BASE_KEY) if weights_path.is_file() else None   # not in mlx-lm's
    here = base_weights(model)
    if trained_on and quantised_kinds(trained_on) != quantised_kinds(here):
        warnings.warn(f"{folder}: the adapter was trained on a base held as {trained_on}; this base is "
                      f"{here}, so its outputs will differ somewhat from the trained model's", stacklevel=2)
    apply_lora(model, config, seed=seed)
    for name, param in lora_parameters(model):
        param.data = np.ascontiguousarray(tensors[name], dtype=model.dtype)
    model.train(False)       # ready for inference, as PEFT's from_pretrained; call train() to fine-tune further
    return model


def read_adapter_config(path: Path, n_layers: int) -> LoraConfig:
    """adapter_config.json -> LoraConfig, refusing (one line, naming the field) what tinylora cannot honour."""
    raw = read_json(path)

    def refuse(field: str, why: str) -> TinyloraError:
        return TinyloraError(f"{path}: {field} = {json.dumps(raw.get(field))}: {why}")

    if raw.get("peft_type") != "LORA":
        raise refuse("peft_type", "only LoRA adapters are supported")
    if raw.get("task_type") not in ("CAUSAL_LM", None):
        raise refuse("task_type", "tinylora adapts causal language models (CAUSAL_LM)")
    # Each of these switches on something beyond y = x Wᵀ + b + s·x Aᵀ Bᵀ on the seven projections.
    unsupported = {
        "use_dora": "DoRA (weight-decomposed LoRA) is not supported",
        "modules_to_save": "fully trained extra modules are not supported",
        "lora_bias": "a bias on lora_B is not supported",
        "fan_in_fan_out": "transposed (Conv1D-style) weights are not supported",
        "rank_pattern": "per-module ranks are not supported",
        "alpha_pattern": "per-module alphas are not supported",
        "exclude_modules": "excluded modules are not supported",
        "layer_replication": "layer replication is not supported",
        "target_parameters": "targeting raw parameters is not supported",
        "trainable_token_indices": "trainable token embeddings are not supported",
        "alora_invocation_tokens": "activated LoRA (aLoRA) is not supported",
        "use_qalora": "QA-LoRA is not supported", "use_bdlora": "block-diagonal LoRA is not supported",
        "megatron_config": "Megatron layers are not supported", "loftq_config": "LoftQ is not supported",
        "arrow_config": "Arrow routing is not supported", "kasa_config": "KaSA is not supported",
        "velora_config": "VeLoRA is not supported", "monteclora_config": "MonteCLoRA is not supported",
    }
    for field, why in unsupported.items():
        if raw.get(field):
            raise refuse(field, why)
    if raw.get("bias", "none") != "none":
        raise refuse("bias", 'only bias "none" is supported (biases are frozen)')
    if raw.get("init_lora_weights", True) not in _PLAIN_INITS:
        raise refuse("init_lora_weights", "this initialisation also rewrites the base weights, which tinylora "
                                          "does not redo; convert the adapter to plain LoRA first")
    if raw.get("layers_pattern") not in (None, "layers", ["layers"]):
        raise refuse("layers_pattern", "the decoder layers are model.layers")
    # A key from a newer PEFT is fine while it holds its "off" value; switched on, we cannot know its meaning.
    for field in sorted(set(raw) - _READ - _HARMLESS - set(unsupported) - {"bias"}):
        if raw[field] not in (None, False, {}, []):
            raise refuse(field, "this setting is not understood by tinylora")

    for field in ("r", "lora_alpha"):
        if field not in raw:
            raise TinyloraError(f"{path}: missing field {field!r}")
    layers = raw.get("layers_to_transform")
    if isinstance(layers, int) and not isinstance(layers, bool):
        layers = [layers]                                   # PEFT accepts a single index
    if layers == []:
        layers = None                                       # and reads an empty list as "every layer"
    if layers is not None:
        if not (isinstance(layers, list) and all(type(i) is int for i in layers)):
            raise refuse("layers_to_transform", "expected null or a list of layer indices")
        if not all(0 <= i < n_layers for i in layers):
            raise refuse("layers_to_transform", f"out of range: the model has {n_layers} layers "
                                                f"(0-{n_layers - 1})")
    targets = raw.get("target_modules")
    if isinstance(targets, str):
        if targets != "all-linear":
            raise refuse("target_modules", "a regular expression is not supported; use a list of names "
                                           f"({', '.join(TARGETS)}) or 'all-linear'")
    elif isinstance(targets, list) and targets and all(isinstance(t, str) for t in targets):
        targets, layers = _as_rectangle(targets, layers, n_layers, refuse)
    else:
        raise refuse("target_modules", "expected a non-empty list of module names or 'all-linear'")
    try:
        return LoraConfig(r=raw["r"], alpha=raw["lora_alpha"], dropout=raw.get("lora_dropout", 0.0),
                          target_modules=targets, use_rslora=raw.get("use_rslora", False), layers=layers)
    except TinyloraError as e:
        raise TinyloraError(f"{path}: {e}") from None


def _as_rectangle(targets: list[str], layers: list[int] | None, n_layers: int, refuse):
    """PEFT's target list -> (projection names, layer indices or None for all), as a LoraConfig holds them.

    PEFT adapts the module at path `model.layers.3.self_attn.q_proj` when an
    entry equals that path, or is a dotted suffix of it ("q_proj",
    "self_attn.q_proj") and layer 3 is in layers_to_transform (if given).
    PEFT itself writes full paths when it expands "all-linear" in a model
    with fewer than 20 linear layers. A LoraConfig is names × layers, so the
    chosen (layer, projection) pairs must form such a rectangle.
    """
    paths = {(i, name): f"model.layers.{i}.{parent}.{name}"
             for i in range(n_layers) for name, parent in TARGETS.items()}
    for t in targets:
        if not any(path == t or path.endswith("." + t) for path in paths.values()):
            raise refuse("target_modules", f"{t!r} names none of the projections tinylora adapts "
                                           f"({', '.join(TARGETS)} in model.layers.0-{n_layers - 1})")
    chosen = {pair for pair, path in paths.items()
              if path in targets or (any(path.endswith("." + t) for t in targets)
                                     and (layers is None or pair[0] in layers))}
    names = [name for name in TARGETS if any(name == n for _, n in chosen)]
    indices = sorted({i for i, _ in chosen})
    if not chosen or chosen != {(i, name) for i in indices for name in names}:
        raise refuse("target_modules", "selects different projections in different layers; tinylora adapts "
                                       "the same projections in every chosen layer")
    return names, (None if len(indices) == n_layers else indices)


def expected_shapes(model, config: LoraConfig) -> dict[str, tuple[int, int]]:
    """The PEFT key and shape of every A (R, in) and B (out, R) that `config` puts into `model`."""
    return adapter_shapes(model.config, config)


def adapter_shapes(model_config, config: LoraConfig) -> dict[str, tuple[int, int]]:
    """As expected_shapes, from the base's ModelConfig alone (no weights needed)."""
    shapes = {}
    for path, out_features, in_features in adapted_projections(model_config, config):
        shapes[f"{PEFT_PREFIX}{path}.lora_A.weight"] = (config.r, in_features)
        shapes[f"{PEFT_PREFIX}{path}.lora_B.weight"] = (out_features, config.r)
    return shapes


def read_adapter(folder: str | os.PathLike, model_config) -> tuple[LoraConfig, dict[str, np.ndarray]]:
    """An adapter folder, PEFT's or mlx-lm's -> (its LoraConfig, its A and B under PEFT's keys), checked
    against a base of `model_config` as load_adapter checks them (one line naming the field or tensor),
    nothing injected."""
    folder = Path(folder)
    if not folder.is_dir():
        raise TinyloraError(f"{folder}: adapter folder not found")
    if is_mlx_adapter(folder):
        return read_mlx_adapter(folder, model_config)         # mlx-lm's files, converted (lora/mlx.py)
    config = read_adapter_config(folder / CONFIG_FILE, n_layers=model_config.num_hidden_layers)
    weights_path = folder / WEIGHTS_FILE
    if not weights_path.exists():
        pickled = " (adapter_model.bin is a pickle and is never loaded: save it as safetensors)" \
            if (folder / "adapter_model.bin").exists() else ""
        raise TinyloraError(f"{weights_path}: file not found{pickled}")
    tensors = _check_tensors(weights_path, read_safetensors(weights_path), adapter_shapes(model_config, config),
                             n_layers=model_config.num_hidden_layers)
    return config, tensors


def _check_tensors(path: Path, tensors: dict[str, np.ndarray], expected: dict[str, tuple[int, int]],
                   n_layers: int) -> dict[str, np.ndarray]:
    """Keys normalised (PEFT may write the adapter name); names and shapes checked; float and finite."""
    found: dict[str, np.ndarray] = {}
    for key, array in tensors.items():
        plain = key.replace(f".lora_A.{PEFT_ADAPTER_NAME}.", ".lora_A.").replace(f".lora_B.{PEFT_ADAPTER_NAME}.",
                                                                                 ".lora_B.")
        if plain in found:
            raise TinyloraError(f"{path}: tensor {plain} appears twice (with and without '.{PEFT_ADAPTER_NAME}')")
        found[plain] = array
    check_tensors(path, found, expected, why_unexpected=lambda key: _why_unexpected(key, n_layers),
                  missing_hint=f", which {CONFIG_FILE} implies")
    check_floats(path, found)
    return found


def _why_unexpected(key: str, n_layers: int) -> str:
    """A hint for a key the config does not imply: a layer the model lacks, or a module not adapted."""
    parts = key.split(".")
    if len(parts) > 4 and parts[:4] == ["base_model", "model", "model", "layers"] and parts[4].isdigit() \
            and int(parts[4]) >= n_layers:
        return f"the model has {n_layers} layers (0-{n_layers - 1}); is this adapter for another model?"
    return f"{CONFIG_FILE} does not adapt this module in this model"
