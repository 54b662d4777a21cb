"""A Llama/Qwen2 model -> one GGUF file llama.cpp and Ollama run directly (`fuse --save-path FILE.gguf`).

The inverse of gguf.py's import, written with the `gguf` package's GGUFWriter:

    general.architecture        "llama" | "qwen2", first, as always
    general.*, llama.* ...      from a GGUF base: its own key-value pairs, copied as they are (name,
                                licence, hyper-parameters, tokenizer); from a Hugging Face folder: the
                                keys convert_hf_to_gguf.py writes for these two architectures
                                (context_length, embedding_length, feed_forward_length, block_count,
                                attention.head_count / head_count_kv / layer_norm_rms_epsilon,
                                rope.freq_base / dimension_count, vocab_size) and the tokenizer's
                                (gguf_tokenizer.tokenizer_fields)
    general.file_type           the --outtype's LlamaFileType; general.quantization_version 2
    token_embd.weight ...       every tensor under llama.cpp's name, in ggml's orientation (the
                                writer stores a NumPy (out, in) array as ne [in, out])

Per tensor: the Llama q/k rows are permuted back to llama.cpp's interleaved order (gguf.permute);
1-D tensors (norms, biases) stay F32, as convert_hf_to_gguf.py keeps them; a matrix whose rows are
not whole blocks of the chosen type falls back to F16 (the converter's rule); with a 4- or 5-bit
--outtype the embeddings (and lm_head) are written as Q8_0, since llama-quantize also keeps them at
higher precision (it picks Q6_K, which the `gguf` package cannot write). Quantising is the `gguf`
package's own `quants.quantize`, llama.cpp's reference code in NumPy. The file is renamed into
place when complete (files.atomic_path).
"""

from __future__ import annotations

import os
from pathlib import Path

import gguf
import numpy as np

from ..errors import TinyloraError
from .files import atomic_path
from .gguf import GLOBAL_NAMES, LAYER_NAMES, open_gguf, permute

Q = gguf.GGMLQuantizationType
OUTTYPES = {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0,
            "q4_0": Q.Q4_0, "q4_1": Q.Q4_1, "q5_0": Q.Q5_0, "q5_1": Q.Q5_1}
FILE_TYPES = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
              "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
              "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0, "q4_1": gguf.LlamaFileType.MOSTLY_Q4_1,
              "q5_0": gguf.LlamaFileType.MOSTLY_Q5_0, "q5_1": gguf.LlamaFileType.MOSTLY_Q5_1}
EMBEDDINGS = ("token_embd.weight", "output.weight")
# Keys the writer sets itself, never copied from a base file.
_OWN_KEYS = {"general.architecture", "general.file_type", "general.quantization_version"}
_HF_TO_GGUF = {**{hf: name for name, hf in GLOBAL_NAMES.items()},
               **{hf: name for name, hf in LAYER_NAMES.items()}}


def gguf_name(hf_name: str) -> str:
    """'model.layers.3.self_attn.q_proj.weight' -> 'blk.3.attn_q.weight' (gguf.hf_name's inverse)."""
    base, _, kind = hf_name.rpartition(".")
    if base in _HF_TO_GGUF:
        return f"{_HF_TO_GGUF[base]}.{kind}"
    parts = base.split(".")
    if len(parts) > 3 and parts[:2] == ["model", "layers"] and ".".join(parts[3:]) in _HF_TO_GGUF:
        return f"blk.{int(parts[2])}.{_HF_TO_GGUF['.'.join(parts[3:])]}.{kind}"
    raise TinyloraError(f"tensor {hf_name!r} has no llama.cpp name")


def tensor_type(name: str, shape: tuple[int, ...], outtype: str):
    """The GGML type a tensor is written as (see the module docstring)."""
    wanted = OUTTYPES[outtype]
    if len(shape) == 1:
        return Q.F32
    if name in EMBEDDINGS and outtype.startswith(("q4", "q5")):
        wanted = Q.Q8_0
    block = gguf.GGML_QUANT_SIZES[wanted][0]
    return wanted if shape[-1] % block == 0 else Q.F16


def model_fields(config, name: str) -> list[tuple[str, object, object]]:
    """A ModelConfig -> [(key, value, GGUFValueType)]: the hyper-parameters convert_hf_to_gguf.py writes."""
    a, T = config.architecture, gguf.GGUFValueType
    fields = [("general.type", "model", T.STRING), ("general.name", name, T.STRING),
              (f"{a}.block_count", config.num_hidden_layers, T.UINT32),
              (f"{a}.context_length", config.max_position_embeddings, T.UINT32),
              (f"{a}.embedding_length", config.hidden_size, T.UINT32),
              (f"{a}.feed_forward_length", config.intermediate_size, T.UINT32),
              (f"{a}.attention.head_count", config.num_attention_heads, T.UINT32),
              (f"{a}.attention.head_count_kv", config.num_key_value_heads, T.UINT32),
              (f"{a}.rope.freq_base", float(config.rope_theta), T.FLOAT32),
              (f"{a}.attention.layer_norm_rms_epsilon", float(config.rms_norm_eps), T.FLOAT32),
              (f"{a}.vocab_size", config.vocab_size, T.UINT32),
              (f"{a}.rope.dimension_count", config.head_dim, T.UINT32)]
    if config.head_dim * config.num_attention_heads != config.hidden_size:
        fields += [(f"{a}.attention.key_length", config.head_dim, T.UINT32),
                   (f"{a}.attention.value_length", config.head_dim, T.UINT32)]
    if config.rope_scaling_factor != 1.0:
        fields += [(f"{a}.rope.scaling.type", "linear", T.STRING),
                   (f"{a}.rope.scaling.factor", float(config.rope_scaling_factor), T.FLOAT32)]
    return fields


def copied_fields(path: str | os.PathLike) -> list[tuple[str, object, object, object]]:
    """A GGUF file's own key-value pairs -> [(key, value, type, item type)], but those the writer sets."""
    reader = open_gguf(path)
    out = []
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name in _OWN_KEYS:
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        out.append((field.name, field.contents(), vtype, sub))
    return out


def write_model_gguf(path: str | os.PathLike, config, tensors: dict[str, np.ndarray], fields: list[tuple],
                     outtype: str = "f16", overwrite: bool = False) -> Path:
    """{Hugging Face name: float32 array} of a Llama/Qwen2 model + its key-value pairs -> one GGUF file.

    fields: (key, value, GGUFValueType[, item type]) tuples (model_fields + tokenizer_fields, or
    copied_fields of a GGUF base). Tensors go out in llama.cpp's order: embeddings, then layer by layer.
    """
    path = Path(path)
    if outtype not in OUTTYPES:
        raise TinyloraError(f"--outtype must be one of {', '.join(OUTTYPES)}, got {outtype!r}")
    if path.exists() and not overwrite:
        raise TinyloraError(f"{path}: exists; choose another file or remove it")
    heads = {"attn_q": config.num_attention_heads, "attn_k": config.num_key_value_heads}
    writer = gguf.GGUFWriter(None, config.architecture)
    for key, value, vtype, *sub in fields:
        writer.add_key_value(key, value, vtype, sub_type=sub[0] if sub else None)
    writer.add_file_type(FILE_TYPES[outtype])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for hf in sorted(tensors, key=_llama_cpp_order):
        name = gguf_name(hf)
        w = np.ascontiguousarray(tensors[hf], dtype=np.float32)
        kind = name.split(".")[2] if name.startswith("blk.") else None
        if config.architecture == "llama" and kind in heads and name.endswith(".weight"):
            w = permute(w, heads[kind])                               # HF rows -> llama.cpp's interleaved rows
        qtype = tensor_type(name, w.shape, outtype)
        writer.add_tensor(name, gguf.quants.quantize(w, qtype) if qtype != Q.F32 else w, raw_dtype=qtype)
    return write_file(writer, path)


def write_file(writer, path: str | os.PathLike) -> Path:
    """A filled gguf.GGUFWriter (created with path None) -> the file at `path`, renamed into place when whole."""
    with atomic_path(path) as tmp:
        writer.write_header_to_file(path=tmp)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return Path(path)


def _llama_cpp_order(hf_name: str):
    """token_embd, the layers in order (each in HF's parameter order), then output_norm and output."""
    parts = hf_name.split(".")
    if parts[:2] == ["model", "layers"]:
        return (1, int(parts[2]), hf_name)
    return (0 if "embed_tokens" in hf_name else 2, 0, hf_name)
