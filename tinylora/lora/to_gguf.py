"""A PEFT adapter -> a GGUF LoRA adapter for llama.cpp and Ollama: the file llama.cpp's convert_lora_to_gguf.py writes.

llama.cpp (`llama-cli -m base.gguf --lora adapter.gguf`, llama-cpp-python's
`lora_path`) and Ollama (`ADAPTER adapter.gguf` in a Modelfile) read an
adapter as one GGUF file:

    general.architecture            "llama" | "qwen2": the base's (llama.cpp refuses a mismatch)
    general.type = "adapter",  adapter.type = "lora"
    general.name, general.size_label, ...
                                    descriptive keys, derived by the `gguf` package's own Metadata from
                                    the adapter folder (its README.md, if any) and the base's name,
                                    exactly as the converter derives them
    adapter.lora.alpha              float32; llama.cpp scales B A by alpha / r, r = lora_a's rows
    general.quantization_version
    blk.N.attn_q.weight.lora_a      (r, in)  PEFT's lora_A as it is   (ggml's ne: [in, r])
    blk.N.attn_q.weight.lora_b      (out, r) PEFT's lora_B            (ggml's ne: [r, out])
    ... attn_k, attn_v, attn_output, ffn_gate, ffn_up, ffn_down; tensors in the order of the
    PEFT file's sorted keys, A then B, as the converter writes them

Two things to get right:

1. Llama's q/k row permutation. A Llama GGUF holds attn_q and attn_k with
   each head's rows interleaved (formats/gguf.py, `permute`); the update
   s · B A has B's rows as its output rows, so lora_b is permuted as the
   weight was (n_head for q, n_kv_head for k) and lora_a is left alone.
   Qwen2 files are not permuted, and neither is their adapter.
2. The scale. llama.cpp computes alpha / r. An rsLoRA adapter was trained
   with alpha / √r, so its file says alpha · √r: the same scale.

--outtype f32 | f16 | bf16 | q8_0 converts both A and B, with the `gguf`
package's own quantize; a q8_0 tensor whose rows are not a multiple of 32
(lora_b's rows have r entries) falls back to f16, as the converter does.

What cannot be written: LoRA on the embeddings or lm_head, per-module ranks
or alphas, DoRA and the rest — read_adapter_config (peft.py) refuses each in
one line before anything is written. The output is renamed into place when
complete (files.atomic_path) and an existing file is kept unless
overwrite=True.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import gguf
import numpy as np

from ..errors import TinyloraError
from ..formats.files import read_json
from ..formats.gguf import LAYER_NAMES, permute
from ..formats.gguf_write import write_file
from ..formats.lock import check_not_held
from ..loading import read_config
from .config import PEFT_PREFIX
from .mlx import is_mlx_adapter
from .peft import CONFIG_FILE, read_adapter

OUTTYPES = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
            "bf16": gguf.GGMLQuantizationType.BF16, "q8_0": gguf.GGMLQuantizationType.Q8_0}
GGUF_NAMES = {hf: name for name, hf in LAYER_NAMES.items()}     # "self_attn.q_proj" -> "attn_q"


def gguf_tensor_name(peft_key: str) -> tuple[str, str]:
    """'base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight' -> ('blk.3.attn_q.weight', 'lora_a')."""
    path = peft_key[len(PEFT_PREFIX):]                                 # model.layers.3.self_attn.q_proj.lora_A.weight
    parts = path.split(".")
    layer, module, which = int(parts[2]), ".".join(parts[3:5]), parts[5]
    return f"blk.{layer}.{GGUF_NAMES[module]}.weight", "lora_a" if which == "lora_A" else "lora_b"


def gguf_tensors(model_config, config, tensors: dict[str, np.ndarray]) -> list[tuple[str, np.ndarray]]:
    """PEFT's A and B -> [(GGUF name, float32 array)] in llama.cpp's orientation and row order."""
    heads = {"attn_q": model_config.num_attention_heads, "attn_k": model_config.num_key_value_heads}
    out = []
    for key in sorted(tensors):
        name, which = gguf_tensor_name(key)
        a = np.asarray(tensors[key], dtype=np.float32)
        kind = name.split(".")[2]
        if which == "lora_b" and model_config.architecture == "llama" and kind in heads:
            a = permute(a, heads[kind])                               # B's rows are the weight's rows
        out.append((f"{name}.{which}", np.ascontiguousarray(a)))
    return out


def gguf_alpha(config) -> float:
    """The alpha to write, so that llama.cpp's alpha / r is the scale the adapter was trained with."""
    return float(config.alpha) * math.sqrt(config.r) if config.use_rslora else float(config.alpha)


def export_gguf(adapter_path: str | os.PathLike, out: str | os.PathLike, base: str | os.PathLike | None = None,
                outtype: str = "f32", overwrite: bool = False, weights_dir: str | os.PathLike = "weights") -> Path:
    """adapter_path (a PEFT adapter folder) -> the GGUF adapter file `out`; returns its path.

    base: the model the adapter was trained on (a folder, hub id or .gguf; only its config is read),
    by default the adapter's base_model_name_or_path."""
    adapter_path, out = Path(adapter_path), Path(out)
    if outtype not in OUTTYPES:
        raise TinyloraError(f"--outtype must be one of {', '.join(OUTTYPES)}, got {outtype!r}")
    check_not_held(out, "export elsewhere")
    if out.exists() and not overwrite:
        raise TinyloraError(f"{out}: exists; pass --force to replace it")
    base = adapter_base(adapter_path, base)
    model_config, base_path = read_config(base, weights_dir)
    config, tensors = read_adapter(adapter_path, model_config)

    writer = gguf.GGUFWriter(None, model_config.architecture)         # general.architecture first, as always
    qtype = OUTTYPES[outtype]
    for name, a in gguf_tensors(model_config, config, tensors):
        try:
            data, kind = gguf.quants.quantize(a, qtype), qtype
        except gguf.QuantError:                                       # rows of r values: not whole Q8_0 blocks
            data, kind = gguf.quants.quantize(a, gguf.GGMLQuantizationType.F16), gguf.GGMLQuantizationType.F16
        writer.add_tensor(name, data, raw_dtype=kind)
    _add_metadata(writer, adapter_path, base_path, gguf_alpha(config))
    return write_file(writer, out)


def _add_metadata(writer, adapter_path: Path, base_path: Path, alpha: float) -> None:
    """The key-value pairs, in the converter's order (its ModelBase.prepare_metadata with LoraModel's
    set_type and set_gguf_parameters)."""
    total, shared, experts, expert_count = writer.get_total_parameter_count()
    metadata = gguf.Metadata.load(None, adapter_path, None, total)
    if metadata.name is None:
        metadata.name = base_path.stem if base_path.suffix == ".gguf" else base_path.name
    if metadata.size_label is None and total > 0:
        metadata.size_label = gguf.size_label(total, shared, experts, expert_count)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    metadata.set_gguf_meta_model(writer)
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def adapter_base(adapter_path: str | os.PathLike, base=None):
    """The base an adapter is for: `base` if given, else its adapter_config.json's base_model_name_or_path
    (PEFT's field; mlx-lm's is "model")."""
    if base is not None:
        return base
    config = Path(adapter_path) / CONFIG_FILE
    field = "model" if is_mlx_adapter(adapter_path) else "base_model_name_or_path"
    named = read_json(config).get(field) if config.is_file() else None
    if not named or not isinstance(named, str):
        raise TinyloraError(f"{config}: {field} is not set; pass --model with the base the adapter was trained on")
    return named
