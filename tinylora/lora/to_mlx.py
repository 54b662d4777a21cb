"""A trained adapter -> an mlx-lm adapter folder, for `mlx_lm.generate --adapter-path` on a Mac.

    tinylora export --to mlx --adapter-path adapters/mine --out adapters/mine-mlx
    mlx_lm.generate --model <the base as a Hugging Face folder or repo> --adapter-path adapters/mine-mlx ...

The folder holds adapter_config.json and adapters.safetensors as mlx_lm.lora
writes them (the format and the transposes are in lora/mlx.py). The adapter
may be PEFT's or mlx-lm's own (then this is a check and a rewrite). It is
checked against the base's config first (only config.json is read, not the
weights), and the folder appears whole or not at all (files.atomic_folder).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import TinyloraError
from ..formats.files import atomic_folder, write_bytes
from ..formats.lock import check_not_held
from ..formats.safetensors import write_safetensors
from ..loading import read_config
from .mlx import CONFIG_FILE, WEIGHTS_FILE, mlx_config_dict, mlx_tensors
from .peft import read_adapter
from .to_gguf import adapter_base


def export_mlx(adapter_path: str | os.PathLike, out: str | os.PathLike, base: str | os.PathLike | None = None,
               overwrite: bool = False, weights_dir: str | os.PathLike = "weights") -> Path:
    """adapter_path -> the mlx-lm adapter folder `out`; returns its path. base: as export_gguf's."""
    check_not_held(out, "export into another folder")
    if Path(out).exists() and not overwrite:
        raise TinyloraError(f"{out}: exists; pass --force to replace it")
    base = adapter_base(adapter_path, base)
    model_config, _ = read_config(base, weights_dir)
    config, tensors = read_adapter(adapter_path, model_config)
    text = json.dumps(mlx_config_dict(config, model_config.num_hidden_layers, str(base)), indent=4) + "\n"
    weights = mlx_tensors(tensors)
    with atomic_folder(out, overwrite=overwrite) as staging:
        write_safetensors(staging / WEIGHTS_FILE, weights, metadata={"format": "mlx"})
        write_bytes(staging / CONFIG_FILE, text.encode("utf-8"))
    return Path(out)
