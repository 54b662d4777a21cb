"""`tinylora.load`: a model folder, hub repo id or GGUF file -> (CausalLM, Tokenizer).

    name_or_path ──formats.hub──> local folder (weights/<name> for a hub id)
       config.json ──> ModelConfig        *.safetensors ──> tensors ──> CausalLM (all frozen)
       tokenizer.json + tokenizer_config.json ──> Tokenizer
    file.gguf ──formats.gguf──> the same config, tensors (block-quantised matrices kept as
       their blocks) and tokenizer, built in memory

Only config, tokenizer, safetensors and GGUF files are ever read: no pickle, no
remote code.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .config import ModelConfig
from .errors import TinyloraError
from .formats.gguf import read_gguf
from .formats.hub import resolve_model
from .formats.safetensors import BFLOAT16, load_checkpoint
from .kernels.weights import BF16Weight, FrozenWeight
from .model import CausalLM
from .tokenizer import Tokenizer

DTYPES = {"float32": np.float32, "float64": np.float64, "bfloat16": np.float32}   # -> the compute dtype


def as_read(dtype: str):
    """The per-tensor conversion of a checkpoint read for `dtype` (load_checkpoint's `convert`).

    Applied to each tensor as it is read, so a checkpoint never exists in memory twice:
    "bfloat16": matrices become BF16Weights (bf16 bits kept; floats rounded to nearest even);
    otherwise: bfloat16 tensors are widened to float32 (exactly); the model casts the rest.
    """
    def convert(name: str, a: np.ndarray):
        if dtype == "bfloat16" and a.ndim == 2:
            return BF16Weight.from_array(a)
        return a.astype(np.float32) if a.dtype == BFLOAT16 else a
    return convert


def load_model(name_or_path: str | Path, dtype: str = "float32", weights_dir: str | Path = "weights") -> CausalLM:
    """The model alone (no tokenizer needed).

    dtype: "float32" (default) computes and stores in float32; "bfloat16"
    stores the frozen matrices (projections, embeddings, lm_head) as bf16
    and computes in float32: half the memory, and half the bytes read per
    decoded token, which is what bounds decoding speed. A bf16 checkpoint's
    bits are kept exactly; a float32 checkpoint is rounded to nearest even,
    as torch's .to(torch.bfloat16) does. "float64" is for gradient checks.
    """
    if dtype not in DTYPES:
        raise TinyloraError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if _is_gguf(name_or_path):
        return _load_gguf(Path(name_or_path), dtype)[0]
    folder = resolve_model(name_or_path, weights_dir)
    config = ModelConfig.from_json(folder / "config.json")
    tensors = load_checkpoint(folder, convert=as_read(dtype))
    model = CausalLM.from_state_dict(config, tensors, dtype=DTYPES[dtype], source=str(folder))
    model.name_or_path = str(name_or_path)     # what the user asked for (PEFT's base_model_name_or_path)
    model.folder = folder                      # where its files are (tokenizer files for `fuse`)
    return model


def _is_gguf(name_or_path) -> bool:
    return Path(name_or_path).suffix == ".gguf" and Path(name_or_path).is_file()


def _load_gguf(path: Path, dtype: str) -> tuple[CausalLM, Tokenizer]:
    """A GGUF file, straight: its block-quantised matrices stay blocks (GGMLWeight), the rest is float;
    the tokenizer is built from its metadata, as `import-gguf` would write it."""
    config, tensors, backend, tokenizer_config = read_gguf(path, keep_blocks=True)
    convert = as_read(dtype)
    tensors = {name: t if isinstance(t, FrozenWeight) else convert(name, t) for name, t in tensors.items()}
    model = CausalLM.from_state_dict(ModelConfig.from_dict(config), tensors, dtype=DTYPES[dtype], source=str(path))
    model.name_or_path, model.folder = str(path), None     # no folder of tokenizer files to copy from
    templates = Tokenizer.config_templates(tokenizer_config)
    eos = [config["eos_token_id"]] if "eos_token_id" in config else []    # an int, as build_config writes it
    return model, Tokenizer.from_parts(backend, tokenizer_config, templates, eos, str(path))


def load(name_or_path: str | Path, dtype: str = "float32", weights_dir: str | Path = "weights"):
    """-> (model, tokenizer) from a local Hugging Face-format folder, a hub repo id or a .gguf file."""
    if _is_gguf(name_or_path):
        return _load_gguf(Path(name_or_path), dtype)
    folder = resolve_model(name_or_path, weights_dir)
    tokenizer = Tokenizer.from_folder(folder)          # checked first: a missing tokenizer fails fast
    return load_model(name_or_path, dtype, weights_dir), tokenizer   # resolves to the same folder again
