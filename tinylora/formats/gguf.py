"""GGUF (llama.cpp's format) -> a Hugging Face-format folder, for Llama and Qwen2 files.

A GGUF file holds the weights (often quantised: Q4_1, Q8_0, ...) under
llama.cpp's tensor names, the model's hyper-parameters and its tokenizer as
key-value metadata. `import_gguf` turns one into the folder the rest of
tinylora (and transformers) reads:

    config.json             from the metadata (`llama.embedding_length` -> hidden_size, ...)
    model.safetensors       every tensor dequantised to float32, under Hugging Face names
                            (or, --keep-quantization, model.gguf: the file itself, loaded with its blocks)
    tokenizer.json          built with `tokenizers` (see gguf_tokenizer.py)
    tokenizer_config.json   chat template and special tokens
    generation_config.json  bos/eos ids

Three things to get right, each a classic bug:

1. Orientation. GGUF lists a tensor's dimensions fastest-varying first
   (ggml's `ne`), so a q_proj of Hugging Face shape (out, in) is listed as
   [in, out]. The `gguf` reader already hands us NumPy arrays in (out, in)
   order; we check that against the reversed `ne` rather than trust it.
2. Llama's q/k row permutation. llama.cpp's RoPE rotates *adjacent* pairs
   (x0, x1), (x2, x3), ...; Hugging Face's rotates halves (x_i, x_{i+D/2}).
   convert_hf_to_gguf.py therefore reorders the rows of q_proj and k_proj of
   Llama-architecture models, head by head:
       permute(w, n_head) = w.reshape(n_head, 2, D/2, in).swapaxes(1, 2).reshape(out, in)
   and we undo it (with n_head = num_key_value_heads for k_proj). Qwen2
   files are written unpermuted (llama.cpp uses the NeoX, rotate-half, RoPE
   for Qwen2), so they are taken as they are.
3. Tied embeddings. No `output.weight` means lm_head shares `token_embd`.

The import writes into a hidden sibling folder that is renamed into place at
the end (files.atomic_folder), so a crash mid-import never leaves a folder
that looks complete.

What is not here: other architectures, rope scaling, MoE, writing GGUF.
Anything the file says that we cannot honour is a TinyloraError naming the
file and the value, never a silently different model.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np

from ..errors import TinyloraError
from ..kernels import ggml
from ..kernels.quantized import F16Weight, GGMLWeight
from ..kernels.weights import BF16Weight
from .files import atomic_folder, atomic_path, write_json, write_text
from .gguf_tokenizer import build_tokenizer
from .safetensors import write_safetensors

# The tensor types a file may hold: floats, and the block formats of kernels/ggml.py. Others (Q2_K, Q3_K,
# the IQ and TQ families) are refused by name rather than dequantised by code no test here checks.
SUPPORTED_TYPES = ("F32", "F16", "BF16", *ggml.BLOCK_BYTES)

# general.architecture -> (config.json architectures[0], model_type)
ARCHITECTURES = {"llama": ("LlamaForCausalLM", "llama"), "qwen2": ("Qwen2ForCausalLM", "qwen2")}

# llama.cpp tensor names -> Hugging Face names.
GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
LAYER_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
BIASES = {"llama": set(), "qwen2": {"attn_q", "attn_k", "attn_v"}}   # which layers carry a bias


def hf_name(gguf_name: str, arch: str) -> str | None:
    """'blk.3.attn_q.weight' -> 'model.layers.3.self_attn.q_proj.weight'; None if it has no HF name."""
    base, _, kind = gguf_name.rpartition(".")
    if kind == "bias" and base.rpartition(".")[2] not in BIASES[arch]:
        return None
    if kind not in ("weight", "bias"):
        return None
    if base in GLOBAL_NAMES:
        return f"{GLOBAL_NAMES[base]}.{kind}"
    parts = base.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in LAYER_NAMES:
        return f"model.layers.{int(parts[1])}.{LAYER_NAMES[parts[2]]}.{kind}"
    return None


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row permutation (convert_hf_to_gguf.py's LlamaModel.permute): w (n_head * D, ...) in
    HF row order -> interleaved, for writing a GGUF file. unpermute(permute(w, n), n) == w."""
    out = w.shape[0]
    return w.reshape(n_head, 2, out // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation: w (n_head * D, in) -> same shape, HF row order.

    llama.cpp: w.reshape(n_head, 2, D // 2, in).swapaxes(1, 2) took each head's
    rows [first half | second half] to interleaved (h0, h_{D/2}, h1, ...).
    Reading the rows back as (n_head, D // 2, 2, in) and swapping the same two
    axes de-interleaves them.
    """
    out = w.shape[0]
    return w.reshape(n_head, out // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# --------------------------------------------------------------------------
# Metadata
# --------------------------------------------------------------------------

class Metadata:
    """The file's key-value metadata, read on demand, with errors that name the file and key."""

    _MISSING = object()

    def __init__(self, reader, path: Path):
        self.reader, self.path = reader, path

    def get(self, key: str, default=_MISSING):
        field = self.reader.fields.get(key)
        if field is None:
            if default is Metadata._MISSING:
                raise TinyloraError(f"{self.path}: GGUF metadata has no {key!r}")
            return default
        return field.contents()

    def integer(self, key: str, default=_MISSING) -> int:
        value = self.get(key, default)
        if not isinstance(value, int) or isinstance(value, bool):
            raise TinyloraError(f"{self.path}: GGUF metadata {key!r} = {value!r}, expected one integer "
                                "(per-layer values are not supported)")
        return value

    def number(self, key: str, default=_MISSING) -> float:
        value = self.get(key, default)
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise TinyloraError(f"{self.path}: GGUF metadata {key!r} = {value!r}, expected a number")
        # Stored as float32: 1e-5 reads back as 9.999999747378752e-06. The
        # shortest decimal that rounds to the same float32 is what was meant.
        return float(str(np.float32(value)))


def open_gguf(path: str | os.PathLike):
    """path -> gguf.GGUFReader, memory-mapped copy-on-write ("c"): tensors are read when touched, their
    arrays are writable as NumPy and Numba expect, and a write would change a private page, never the file."""
    path = Path(path)
    try:
        import gguf
    except ImportError:
        raise TinyloraError("importing GGUF files needs the gguf package: pip install gguf") from None
    if not path.is_file():
        raise TinyloraError(f"{path}: no such GGUF file")
    try:
        return gguf.GGUFReader(path, "c")
    except (ValueError, OSError, IndexError) as e:
        raise TinyloraError(f"{path}: not a readable GGUF file ({e})") from None


def build_config(meta: Metadata, arch: str, tensor_names: set[str], vocab_size: int) -> dict:
    """GGUF metadata -> config.json, with config.json's own field names."""
    p = f"{arch}."
    hidden = meta.integer(p + "embedding_length")
    n_heads = meta.integer(p + "attention.head_count")
    n_kv = meta.integer(p + "attention.head_count_kv", n_heads)
    head_dim = meta.integer(p + "attention.key_length", hidden // n_heads)
    rotary = meta.integer(p + "rope.dimension_count", head_dim)
    if rotary != head_dim:
        raise TinyloraError(f"{meta.path}: {p}rope.dimension_count = {rotary}, but heads have {head_dim} "
                            "dimensions; partial rotary embeddings are not supported")
    scaling = meta.get(p + "rope.scaling.type", "none")
    if scaling != "none":
        raise TinyloraError(f"{meta.path}: {p}rope.scaling.type = {scaling!r}; rope scaling is not supported")
    architecture, model_type = ARCHITECTURES[arch]
    config = {
        "architectures": [architecture],
        "model_type": model_type,
        "hidden_size": hidden,
        "intermediate_size": meta.integer(p + "feed_forward_length"),
        "num_hidden_layers": meta.integer(p + "block_count"),
        "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv,
        "head_dim": head_dim,
        "max_position_embeddings": meta.integer(p + "context_length"),
        "rms_norm_eps": meta.number(p + "attention.layer_norm_rms_epsilon"),
        "rope_theta": meta.number(p + "rope.freq_base", 10000.0),
        "vocab_size": vocab_size,
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "hidden_act": "silu",
        "torch_dtype": "float32",
    }
    if arch == "llama":
        config.update(attention_bias=False, mlp_bias=False)
    else:
        config.update(use_sliding_window=False)
    for key in ("bos", "eos", "padding"):
        token_id = meta.get(f"tokenizer.ggml.{key}_token_id", None)
        if token_id is not None:
            config["pad_token_id" if key == "padding" else f"{key}_token_id"] = int(token_id)
    return config


# --------------------------------------------------------------------------
# Tensors
# --------------------------------------------------------------------------

def convert_tensors(reader, path: Path, arch: str, config: dict, keep_blocks: bool = False, convert=None) -> dict:
    """Every tensor under its HF name and in HF row order: dequantised to float32, or with
    keep_blocks, a matrix of one of kernels/ggml.py's block types kept as its blocks (a GGMLWeight)
    and a BF16 matrix kept as its bits (a BF16Weight).

    convert(name, tensor), if given, is applied to each tensor as soon as it exists (quantising it,
    or dropping it after its checks), so the file's tensors never all exist in memory twice.

    The Llama q/k row permutation moves whole rows, and a row of blocks is a row of weights,
    so it is undone on the blocks just as on the floats.

    Kept blocks and bits are views of the file's memory map, as llama.cpp keeps them: the weights
    are the file's pages (read once, shared with the page cache), not a second copy in the
    process; only the permuted q/k rows are copies.
    """
    from gguf.quants import dequantize

    def put(name, tensor):
        return tensor if convert is None else convert(name, tensor)

    tensors: dict = {}
    for t in reader.tensors:
        name = hf_name(t.name, arch)
        if name is None:
            raise TinyloraError(f"{path}: tensor {t.name!r} has no counterpart in a Hugging Face "
                                f"{ARCHITECTURES[arch][0]} (unsupported feature)")
        shape = tuple(int(d) for d in reversed(t.shape))        # ggml's ne, reversed: (out, in)
        n_head = None                                           # rows already in HF order
        if arch == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            n_head = config["num_attention_heads"] if "q_proj" in name else config["num_key_value_heads"]
        if keep_blocks and t.tensor_type.name in ggml.BLOCK_BYTES and len(shape) == 2:
            blocks = np.asarray(t.data).reshape(shape[0], -1)   # (out, row bytes), still memory-mapped
            if not np.isfinite(ggml.block_scales(blocks, t.tensor_type.name)).all():
                raise TinyloraError(f"{path}: tensor {t.name!r} ({t.tensor_type.name}) has NaN or inf block "
                                    "scales; the file is damaged")
            tensors[name] = put(name, GGMLWeight(_hf_rows(blocks, n_head), t.tensor_type.name, shape))
            continue
        if keep_blocks and t.tensor_type.name in ("BF16", "F16") and len(shape) == 2:
            bits = np.asarray(t.data).view(np.uint16).reshape(shape)          # 16-bit floats as stored: bits kept
            kind = BF16Weight if t.tensor_type.name == "BF16" else F16Weight
            tensors[name] = put(name, kind(_hf_rows(bits, n_head)))
            continue
        if t.tensor_type.name not in SUPPORTED_TYPES:
            raise TinyloraError(f"{path}: tensor {t.name!r} has type {t.tensor_type.name}, which tinylora does not "
                                f"read (supported: {', '.join(SUPPORTED_TYPES)})")
        w = dequantize(t.data, t.tensor_type)
        if w.shape != shape:
            raise TinyloraError(f"{path}: tensor {t.name!r}: dequantised to shape {w.shape}, "
                                f"but its dimensions (ne) {list(t.shape)} say {shape}")
        w = np.asarray(w, dtype=np.float32)
        tensors[name] = put(name, _hf_rows(w, n_head))
    return tensors


def _hf_rows(rows: np.ndarray, n_head: int | None) -> np.ndarray:
    """Rows (floats, bf16 bits or blocks: a whole row each) in HF order: unpermuted for Llama's q/k."""
    return rows if n_head is None else unpermute(rows, n_head)


# --------------------------------------------------------------------------
# The import
# --------------------------------------------------------------------------

def import_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike, overwrite: bool = False,
                keep_quantization: bool = False) -> Path:
    """A Llama/Qwen2 GGUF file -> out_dir, a Hugging Face-format folder (float32 weights).

    keep_quantization: instead of model.safetensors, the folder holds the GGUF file itself as
    model.gguf beside config.json and the tokenizer files, and tinylora loads it with its blocks
    (transformers too, with gguf_file="model.gguf"). out_dir must not exist, or be empty, unless
    overwrite=True (then it is replaced, but only once the new folder is complete).
    """
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if out_dir.exists() and not overwrite and (not out_dir.is_dir() or any(out_dir.iterdir())):
        # (atomic_folder checks this too; checking first saves the dequantising)
        raise TinyloraError(f"{out_dir}: already exists and is not empty; choose a new folder or remove it")
    # keep_quantization: every tensor is read and checked, then dropped; the file itself is what is kept
    drop = (lambda name, tensor: None) if keep_quantization else None
    config, tensors, tokenizer, tokenizer_config = read_gguf(gguf_path, keep_blocks=keep_quantization, convert=drop)
    with atomic_folder(out_dir, overwrite=overwrite) as staging:
        if keep_quantization:
            del tensors
            with atomic_path(staging / GGUF_IN_FOLDER) as tmp:
                shutil.copyfile(gguf_path, tmp)
        else:
            write_safetensors(staging / "model.safetensors", tensors,
                              metadata={"format": "pt", "source": f"GGUF import of {gguf_path.name}"})
            del tensors
        write_side_files(staging, config, tokenizer, tokenizer_config)
    return out_dir


# The GGUF file inside a folder written by `import-gguf --keep-quantization`.
GGUF_IN_FOLDER = "model.gguf"


def write_side_files(folder: Path, config: dict, tokenizer, tokenizer_config: dict) -> None:
    """tokenizer.json, tokenizer_config.json, generation_config.json and, last, config.json (which
    marks a complete model, even inside a staging folder) from what read_gguf returned."""
    generation_config = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in config}
    write_text(folder / "tokenizer.json", tokenizer.to_str(pretty=True) + "\n")
    write_json(folder / "tokenizer_config.json", tokenizer_config)
    write_json(folder / "generation_config.json", generation_config)
    write_json(folder / "config.json", config)


def read_gguf(gguf_path: Path, keep_blocks: bool = False, convert=None):
    """A Llama/Qwen2 GGUF file -> (config dict, tensors, tokenizers.Tokenizer, tokenizer_config dict).

    The tensors are float32 arrays, or with keep_blocks the block-quantised matrices stay
    GGMLWeights (convert_tensors). The tokenizer and config are checked first: they fail fast.
    """
    reader, arch, config, tokenizer, tokenizer_config = read_gguf_metadata(gguf_path)
    return config, convert_tensors(reader, gguf_path, arch, config, keep_blocks, convert), tokenizer, tokenizer_config


def read_gguf_metadata(gguf_path: Path):
    """-> (the gguf reader, architecture, config dict, tokenizers.Tokenizer, tokenizer_config dict), no tensor read.
    The reader keeps its tensors; its metadata fields are emptied once read (they are large and not needed again)."""
    reader = open_gguf(gguf_path)
    meta = Metadata(reader, gguf_path)
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise TinyloraError(f"{gguf_path}: general.architecture = {arch!r} is not supported "
                            f"(supported: {', '.join(ARCHITECTURES)})")

    embed = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if embed is None:
        raise TinyloraError(f"{gguf_path}: no token_embd.weight tensor")
    tokenizer, tokenizer_config = build_tokenizer(meta)
    config = build_config(meta, arch, {t.name for t in reader.tensors}, vocab_size=int(embed.shape[-1]))
    if tokenizer.get_vocab_size() > config["vocab_size"]:
        raise TinyloraError(f"{gguf_path}: {tokenizer.get_vocab_size()} tokens, but token_embd.weight has "
                            f"only {config['vocab_size']} rows")
    tokenizer_config["model_max_length"] = config["max_position_embeddings"]
    reader.fields.clear()       # ~180 MB of small arrays for a 49k vocabulary, all read by now
    return reader, arch, config, tokenizer, tokenizer_config
