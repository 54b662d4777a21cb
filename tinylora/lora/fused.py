"""A model -> a complete Hugging Face-format folder (or one GGUF file); and `fuse`, base model + adapter -> that.

    out/config.json              the source model's, with dtype updated
    out/model.safetensors        every weight under its Hugging Face name; tied embeddings once
    out/tokenizer.json, ...      copied from the source folder when present (from a .gguf base: its
                                 config and tokenizer, as `import-gguf` writes them)

transformers (and tinylora) load the folder like any other checkpoint. A save
path ending in .gguf writes one GGUF file instead (save_gguf, formats/gguf_write.py):
llama.cpp and Ollama run it as it is, tokenizer and chat template included. It is
written into a hidden staging folder and renamed into place when complete, so
`out/` is either absent or whole.

A model that still has LoRA layers is refused: fold them in first with
`merge` (W' = W + scale · B A), which is what `fuse` does. So is a weight
holding NaN or inf (as PEFT's `safe_merge` refuses one), and an `out` that is
the source folder itself.

What is not here: the merge (inject.py), sharded output (one file; the models
tinylora trains fit), the adapter format (peft.py).
"""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path

import numpy as np

from ..errors import TinyloraError
from ..formats.files import atomic_folder, read_json, write_json
from ..formats.gguf import read_gguf_metadata, write_side_files
from ..formats.gguf_tokenizer import tokenizer_fields
from ..formats.gguf_write import OUTTYPES, copied_fields, model_fields, write_model_gguf
from ..formats.lock import check_not_held
from ..formats.hub import TOKENIZER_AND_GENERATION_FILES
from ..formats.safetensors import BFLOAT16, SINGLE_FILE, write_safetensors
from ..kernels.bf16 import f32_to_bf16
from ..kernels.weights import as_weight
from ..loading import load_model
from ..tokenizer import Tokenizer
from .inject import lora_layers, merge
from .peft import base_weights, load_adapter, quantised_kinds

# Files copied as they are from the source folder, when it has them.
TOKENIZER_FILES = TOKENIZER_AND_GENERATION_FILES      # copied next to the merged weights
# --dtype spellings -> the name config.json uses.
DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16"}


def state_dict(model, dtype: str = "float32") -> dict[str, np.ndarray]:
    """{Hugging Face name: array as it goes on disk} of every weight, float32 or bfloat16.

    A weight already held as bf16 is written with its own bits (exactly); everything else is
    rounded to nearest even. `named_parameters` lists a shared tensor once, under the first
    name met: tied embeddings appear as model.embed_tokens.weight only, as transformers saves them.
    """
    tensors = {}
    for name, t in model.named_parameters():
        w = as_weight(t.data) if t.data.ndim == 2 else None
        if dtype == "bfloat16":
            bits = w.to_bf16_bits() if w is not None else f32_to_bf16(np.ascontiguousarray(t.data, np.float32))
            tensors[name] = bits.view(BFLOAT16)
        else:
            tensors[name] = np.asarray(w.to_float() if w is not None else t.data, dtype=np.float32)
    return tensors


def save_model(model, out_dir: str | os.PathLike, dtype: str = "float32", overwrite: bool = False) -> Path:
    """A merged (or LoRA-free) model -> out_dir as a Hugging Face-format folder; returns out_dir.

    dtype: "float32" or "bfloat16" (rounded to nearest even), for the weights
    and config.json's dtype. out_dir must not exist or be empty, unless overwrite.
    """
    if dtype not in DTYPES:
        raise TinyloraError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    dtype = DTYPES[dtype]
    out_dir = Path(out_dir)
    if lora_layers(model):
        raise TinyloraError("the model still has LoRA layers: merge them first (tinylora.merge), "
                            "or use fuse, which merges")
    source = getattr(model, "folder", None)
    gguf = Path(model.name_or_path) if str(getattr(model, "name_or_path", "")).endswith(".gguf") else None
    if source is None and gguf is None:
        raise TinyloraError("the model has no source folder to take config.json and tokenizer files from; "
                            "load it with tinylora.load or load_model")
    if source is not None and out_dir.resolve() == Path(source).resolve():
        raise TinyloraError(f"{out_dir}: is the folder the model was loaded from; choose another output folder")

    tensors = state_dict(model, dtype)
    for name, array in tensors.items():
        if not np.isfinite(array).all():
            raise TinyloraError(f"{name} holds NaN or inf values; not saving a broken model "
                                "(was the adapter trained with a non-finite loss?)")
    if source is None:              # a .gguf loaded directly: its config and tokenizer, as import-gguf writes them
        _, _, config, tokenizer, tokenizer_config = read_gguf_metadata(gguf)
    else:
        source, config = Path(source), read_json(Path(source) / "config.json")
    # transformers 5 writes "dtype", older versions "torch_dtype"; keep whichever the file has.
    keys = [k for k in ("dtype", "torch_dtype") if k in config] or ["torch_dtype"]
    for key in keys:
        config[key] = dtype
    config.pop("quantization_config", None)     # the weights written are floats, whatever the source held

    with atomic_folder(out_dir, overwrite=overwrite) as staging:
        write_safetensors(staging / SINGLE_FILE, tensors, metadata={"format": "pt"})
        if source is None:
            write_side_files(staging, config, tokenizer, tokenizer_config)     # config.json last
        else:
            write_json(staging / "config.json", config)
            for name in TOKENIZER_FILES:
                if (source / name).is_file():
                    shutil.copyfile(source / name, staging / name)
    return out_dir


def save_gguf(model, path: str | os.PathLike, outtype: str = "f16", overwrite: bool = False) -> Path:
    """A merged (or LoRA-free) model -> one GGUF file for llama.cpp and Ollama (formats/gguf_write.py).

    From a GGUF base the file's own metadata and tokenizer are carried over; from a Hugging Face
    folder they are written from config.json and tokenizer.json, as convert_hf_to_gguf.py does."""
    if lora_layers(model):
        raise TinyloraError("the model still has LoRA layers: merge them first (tinylora.merge), "
                            "or use fuse, which merges")
    tensors = state_dict(model, "float32")
    for name, array in tensors.items():
        if not np.isfinite(array).all():
            raise TinyloraError(f"{name} holds NaN or inf values; not saving a broken model")
    folder, source = getattr(model, "folder", None), str(getattr(model, "name_or_path", ""))
    if folder is None and source.endswith(".gguf"):
        fields = copied_fields(source)
    elif folder is not None:
        tok = Tokenizer.from_folder(folder)
        fields = model_fields(model.config, Path(folder).name) + \
            tokenizer_fields(tok.backend, tok.special_tokens, tok.chat_template, model.config.vocab_size)
    else:
        raise TinyloraError("the model has no source folder or file to take its tokenizer from; "
                            "load it with tinylora.load or load_model")
    return write_model_gguf(path, model.config, tensors, fields, outtype=outtype, overwrite=overwrite)


def fuse(model_path: str | os.PathLike, adapter_path: str | os.PathLike, save_path: str | os.PathLike,
         dtype: str = "float32", overwrite: bool = False, quantize: str | None = None, outtype: str = "f16") -> Path:
    """Base model + adapter -> a merged Hugging Face-format folder at save_path (`tinylora fuse`), or,
    when save_path ends in .gguf, one GGUF file of type `outtype` (f32, f16, bf16, q8_0, q4_0, ...).

    The base model is loaded in float32 whatever `dtype` says: ΔW is merged at
    full precision and rounded once, on writing. A quantised base (a bitsandbytes checkpoint, or
    `quantize`, the base an adapter trained with --quantize saw) is dequantised, and the merge
    written as float: a warning says the weights are not the float model's.
    """
    if dtype not in DTYPES:
        raise TinyloraError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    save_path = Path(save_path)
    check_not_held(save_path, "fuse into another folder")      # a running train's adapter folder
    as_gguf = save_path.suffix == ".gguf"
    if as_gguf and outtype not in OUTTYPES:
        raise TinyloraError(f"--outtype must be one of {', '.join(OUTTYPES)}, got {outtype!r}")
    if as_gguf and save_path.exists() and not overwrite:
        raise TinyloraError(f"{save_path}: exists; pass --force to replace it")
    if not as_gguf and not overwrite and save_path.exists() and (not save_path.is_dir() or any(save_path.iterdir())):
        # checked before the (slow) load and merge; save_model checks again when it writes
        raise TinyloraError(f"{save_path}: already exists and is not empty; choose a new folder or remove it")
    model = load_model(model_path, dtype="float32", quantize=quantize)
    load_adapter(model, adapter_path)
    stored = base_weights(model)
    if quantised_kinds(stored):
        warnings.warn(f"fuse: the base's projections are held as {stored}: the merged weights are its "
                      f"dequantised values plus the update, written as {outtype if as_gguf else DTYPES[dtype]}, not the float "
                      "model's weights plus the update", stacklevel=2)
    merge(model)
    if as_gguf:
        return save_gguf(model, save_path, outtype=outtype, overwrite=overwrite)
    return save_model(model, save_path, dtype=dtype, overwrite=overwrite)
