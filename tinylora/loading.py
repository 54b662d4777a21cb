"""`tinylora.load`: a model folder, hub repo id or GGUF file -> (CausalLM, Tokenizer).

    name_or_path ──formats.hub──> local folder (weights/<name> for a hub id)
       config.json ──> ModelConfig        *.safetensors ──> tensors ──> CausalLM (all frozen)
       tokenizer.json + tokenizer_config.json ──> Tokenizer
    file.gguf ──formats.gguf──> the same config, tensors (block-quantised matrices kept as
       their blocks) and tokenizer, built in memory
    a bitsandbytes 4-bit folder ──formats.bnb──> its NF4 groups assembled into NF4Weights
    quantize="nf4" | "q8_0" | "q4_0": a float checkpoint's projections quantised as each is read

Only config, tokenizer, safetensors and GGUF files are ever read: no pickle, no
remote code.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from .config import ModelConfig
from .errors import TinyloraError
from .formats.bnb import assemble_nf4, checkpoint_quantization
from .formats.files import read_json
from .formats.gguf import GGUF_IN_FOLDER, read_gguf, read_gguf_metadata
from .formats.hub import resolve_model
from .formats.safetensors import BFLOAT16, load_checkpoint
from .kernels import quantized
from .kernels.weights import BF16Weight, FrozenWeight
from .model import CausalLM
from .tokenizer import Tokenizer

DTYPES = {"float32": np.float32, "float64": np.float64, "bfloat16": np.float32}   # -> the compute dtype


def as_read(dtype: str, quantize: str | None = None):
    """The per-tensor conversion of a checkpoint read for `dtype` (load_checkpoint's `convert`).

    Applied to each tensor as it is read, so a checkpoint never exists in memory twice:
    quantize ("nf4", "q8_0", "q4_0"): the layers' projection matrices are quantised
    (kernels/quantized.py); embeddings, lm_head and norms stay as `dtype` says, as QLoRA keeps them.
    "bfloat16": float matrices become BF16Weights (bf16 bits kept; floats rounded to nearest even);
    otherwise: bfloat16 tensors are widened to float32 (exactly); the model casts the rest.
    Integer tensors (a bitsandbytes checkpoint's packed bytes) pass through untouched.
    """
    def convert(name: str, a: np.ndarray):
        if quantize and a.ndim == 2 and is_projection(name) and is_float_storage(a):
            try:
                return quantized.quantize(a.to_float() if isinstance(a, FrozenWeight) else a, quantize, name)
            except ValueError as e:
                raise TinyloraError(f"--quantize {quantize}: {e}") from None
        if isinstance(a, FrozenWeight) or not is_float_storage(a):
            return a
        if dtype == "bfloat16" and a.ndim == 2:
            return BF16Weight.from_array(a)
        return a.astype(np.float32) if a.dtype == BFLOAT16 else a
    return convert


def is_float_storage(a) -> bool:
    """Floats of any width (a float array, bfloat16, or a 16-bit float weight), not blocks nor bytes."""
    if isinstance(a, FrozenWeight):
        return a.storage in ("float16", "bfloat16", "float32", "float64")
    return a.dtype.kind == "f" or a.dtype == BFLOAT16


def is_projection(name: str) -> bool:
    """A decoder layer's q/k/v/o or gate/up/down matrix (what QLoRA quantises; LoRA's targets)."""
    return name.startswith("model.layers.") and name.endswith("_proj.weight")


def load_model(name_or_path: str | Path, dtype: str = "float32", weights_dir: str | Path = "weights",
               quantize: str | None = None, compute: str = "float32") -> CausalLM:
    """The model alone (no tokenizer needed).

    dtype: "float32" (default) computes and stores in float32; "bfloat16"
    stores the frozen matrices (projections, embeddings, lm_head) as bf16
    and computes in float32: half the memory, and half the bytes read per
    decoded token, which is what bounds decoding speed. A bf16 checkpoint's
    bits are kept exactly; a float32 checkpoint is rounded to nearest even,
    as torch's .to(torch.bfloat16) does. "float64" is for gradient checks.
    quantize: "nf4", "q8_0" or "q4_0" quantises a float checkpoint's projections as they are
    read (as_read). A quantised checkpoint (GGUF blocks, bitsandbytes NF4) keeps its own storage,
    and asking to quantise it again is an error.
    compute: "float32" (exact, the default) or "bfloat16": training products in bf16 on the CPU's
    bf16 dot-product instruction (CausalLM.set_compute; a CPU without it says so and stays float32).
    """
    model = _load_model(name_or_path, dtype, weights_dir, quantize)
    return _with_compute(model, compute)


def _with_compute(model: CausalLM, compute: str) -> CausalLM:
    note = model.set_compute(compute)
    if note:
        print(f"note: {note}", file=sys.stderr)
    return model


def _load_model(name_or_path, dtype, weights_dir, quantize) -> CausalLM:
    if dtype not in DTYPES:
        raise TinyloraError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if quantize is not None and quantize not in quantized.QUANTIZE:
        raise TinyloraError(f"--quantize must be one of {', '.join(quantized.QUANTIZE)}, got {quantize!r}")
    if _is_gguf(name_or_path):
        return _load_gguf(Path(name_or_path), dtype, quantize)[0]
    folder = resolve_model(name_or_path, weights_dir)
    if (folder / GGUF_IN_FOLDER).is_file() and not any(folder.glob("*.safetensors")):
        model = _load_gguf(folder / GGUF_IN_FOLDER, dtype, quantize)[0]     # import-gguf --keep-quantization
        model.name_or_path, model.folder = str(name_or_path), folder
        return model
    config = ModelConfig.from_json(folder / "config.json")
    stored = checkpoint_quantization(read_json(folder / "config.json"), str(folder / "config.json"))
    if stored and quantize:
        raise TinyloraError(f"{folder}: the checkpoint is already quantised (bitsandbytes {stored}); "
                            "--quantize applies to float checkpoints")
    tensors = load_checkpoint(folder, convert=as_read(dtype, quantize))
    if stored:
        tensors = assemble_nf4(tensors, str(folder))
    model = CausalLM.from_state_dict(config, tensors, dtype=DTYPES[dtype], source=str(folder))
    model.name_or_path = str(name_or_path)     # what the user asked for (PEFT's base_model_name_or_path)
    model.folder = folder                      # where its files are (tokenizer files for `fuse`)
    return model


def _is_gguf(name_or_path) -> bool:
    return Path(name_or_path).suffix == ".gguf" and Path(name_or_path).is_file()


def _load_gguf(path: Path, dtype: str, quantize: str | None = None) -> tuple[CausalLM, Tokenizer]:
    """A GGUF file, straight: its block-quantised and 16-bit matrices stay as stored (GGMLWeight,
    F16Weight, BF16Weight), the rest is float; the tokenizer is built from its metadata, as
    `import-gguf` would write it. quantize applies only to a file whose projections are float32."""
    convert = as_read(dtype, quantize)

    def convert_checked(name, t):               # each tensor as it is read: quantised, or kept as stored
        if quantize and is_projection(name) and not is_float_storage(t):
            raise TinyloraError(f"{path}: the file is already quantised ({t.storage}); "
                                "--quantize applies to float checkpoints")
        return convert(name, t)
    config, tensors, backend, tokenizer_config = read_gguf(path, keep_blocks=True, convert=convert_checked)
    model = CausalLM.from_state_dict(ModelConfig.from_dict(config), tensors, dtype=DTYPES[dtype], source=str(path))
    model.name_or_path, model.folder = str(path), None     # no folder of tokenizer files to copy from
    templates = Tokenizer.config_templates(tokenizer_config)
    eos = [config["eos_token_id"]] if "eos_token_id" in config else []    # an int, as build_config writes it
    return model, Tokenizer.from_parts(backend, tokenizer_config, templates, eos, str(path))


def read_config(name_or_path: str | Path, weights_dir: str | Path = "weights") -> tuple[ModelConfig, Path]:
    """-> (the model's ModelConfig, the file or folder it came from), reading no weight: a .gguf file's
    metadata, or a folder's (or hub repo id's) config.json."""
    if _is_gguf(name_or_path):
        path = Path(name_or_path)
        return ModelConfig.from_dict(read_gguf_metadata(path)[2], source=str(path)), path
    folder = resolve_model(name_or_path, weights_dir)
    if (folder / GGUF_IN_FOLDER).is_file() and not (folder / "config.json").is_file():
        return read_config(folder / GGUF_IN_FOLDER)
    return ModelConfig.from_json(folder / "config.json"), folder


def load(name_or_path: str | Path, dtype: str = "float32", weights_dir: str | Path = "weights",
         quantize: str | None = None, compute: str = "float32"):
    """-> (model, tokenizer) from a local Hugging Face-format folder, a hub repo id or a .gguf file.
    quantize: "nf4", "q8_0" or "q4_0" to hold a float checkpoint's projections quantised (load_model);
    compute: "float32" or "bfloat16" (load_model)."""
    if _is_gguf(name_or_path):
        if quantize is not None and quantize not in quantized.QUANTIZE:
            raise TinyloraError(f"--quantize must be one of {', '.join(quantized.QUANTIZE)}, got {quantize!r}")
        model, tokenizer = _load_gguf(Path(name_or_path), dtype, quantize)
        return _with_compute(model, compute), tokenizer
    folder = resolve_model(name_or_path, weights_dir)
    tokenizer = Tokenizer.from_folder(folder)          # checked first: a missing tokenizer fails fast
    return load_model(name_or_path, dtype, weights_dir, quantize, compute), tokenizer   # the same folder again
