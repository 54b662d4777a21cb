"""Safetensors files, read and written with the `safetensors` library; bfloat16 through `ml_dtypes`.

A .safetensors file is an 8-byte header length, a JSON header
({"<name>": {"dtype": "BF16", "shape": [576, 49152], "data_offsets": [begin, end]}, ...,
"__metadata__": {"format": "pt"}}) and the tensors' raw little-endian bytes.
The library parses and checks all of it (header size, JSON, dtypes, shapes
against offsets, overlaps, gaps, truncation), and `ml_dtypes` gives NumPy a
real bfloat16 dtype, so a BF16 tensor reads as a bfloat16 array and a
bfloat16 array writes as BF16. The rule for writing is one line: **the dtype
on disk is the array's dtype.**

What this module adds to the library:
* every error the library raises becomes one TinyloraError naming the file;
* tensors are read one at a time, and a `convert(name, array)` hook turns each
  into what the caller keeps (bf16 rounding, widening) before the next is read.
  The library maps the whole file into memory, and the pages a tensor was
  copied from stay resident, counted in the process's RSS, until the file is
  closed: a checkpoint read in one `safe_open` peaks at twice its size. So the
  file is opened afresh for each tensor (the header is parsed again, which
  costs microseconds), and a model loads with its own bytes plus one tensor;
* checkpoints: one model.safetensors, or shards listed by an index whose file
  names must stay inside the folder (files.inside);
* writing goes through the one atomic-write helper (files.atomic_path).

`check_tensors` is the one check of a set of tensors against the names and
shapes expected of it, used for checkpoints (model.py), adapters (lora/peft.py)
and optimizer state (optim.py).

What is not here: lazy loading (every tensor is read into its own array); what
each caller expects (model.expected_shapes, the adapter config's shapes).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from ..errors import TinyloraError
from .files import atomic_path, inside, read_json

BFLOAT16 = np.dtype(ml_dtypes.bfloat16)
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# What the library raises for a file it cannot read: its own error for a bad header, and the
# NumPy/ml_dtypes errors of building an array of a dtype NumPy lacks (float8, float4, ...).
_LIBRARY_ERRORS = (SafetensorError, ValueError, TypeError, AttributeError, OverflowError)


def is_float(dtype) -> bool:
    """A floating-point dtype, bfloat16 included (ml_dtypes' types have kind 'V', not 'f')."""
    return np.dtype(dtype).kind == "f" or np.dtype(dtype) == BFLOAT16


def _open(path: Path):
    if path.is_dir():
        raise TinyloraError(f"{path}: is a folder, not a safetensors file")
    try:
        return safe_open(path, framework="numpy")
    except FileNotFoundError:
        raise TinyloraError(f"{path}: file not found") from None
    except OSError as e:
        raise TinyloraError(f"{path}: cannot read: {e.strerror or e}") from None
    except _LIBRARY_ERRORS as e:
        raise TinyloraError(f"{path}: not a readable safetensors file ({_one_line(e)})") from None


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def read_header(path: str | os.PathLike) -> tuple[list[str], dict[str, str]]:
    """path -> (tensor names in file order, the `__metadata__` strings), checked by the library."""
    path = Path(path)
    with _open(path) as f:
        return list(f.keys()), dict(f.metadata() or {})


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The file's `__metadata__` (empty if none)."""
    return read_header(path)[1]


def read_safetensors(path: str | os.PathLike, convert: Callable[[str, np.ndarray], object] | None = None) -> dict:
    """path -> {name: array, or convert(name, array)}, in file order, one tensor in memory at a time.

    Arrays are writable, C-contiguous and of the file's dtype (BF16 -> bfloat16).
    """
    path = Path(path)
    names, _ = read_header(path)
    tensors = {}
    for name in names:
        with _open(path) as f:               # re-opened per tensor: see the module docstring
            try:
                array = f.get_tensor(name)
            except _LIBRARY_ERRORS as e:
                raise TinyloraError(f"{path}: cannot read tensor {name!r} ({_one_line(e)})") from None
        tensors[name] = array if convert is None else convert(name, array)
        del array
    return tensors


def load_checkpoint(folder: str | os.PathLike, convert: Callable[[str, np.ndarray], object] | None = None) -> dict:
    """An HF-format folder's weights -> {name: array, or convert(name, array)}.

    Either one `model.safetensors`, or shards listed by `model.safetensors.index.json`
    ({"weight_map": {tensor name: shard file}}). Every tensor the index names
    must be in the shard it names; a missing shard is an error naming it.
    """
    folder = Path(folder)
    index_path = folder / INDEX_FILE
    if not index_path.exists():
        single = folder / SINGLE_FILE
        if not single.exists():
            others = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt*"))
            hint = f" (found {', '.join(others[:3])}: pickle checkpoints are not loaded, convert to safetensors)" \
                if others else ""
            raise TinyloraError(f"{folder}: no {SINGLE_FILE} or {INDEX_FILE}{hint}")
        return read_safetensors(single, convert)

    weight_map = read_json(index_path).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise TinyloraError(f"{index_path}: no weight_map, or an empty one")
    shards = [inside(folder, shard) for shard in sorted(set(weight_map.values()), key=str)]
    for shard in shards:                     # all checked before the first tensor is read
        if not shard.exists():
            raise TinyloraError(f"{index_path}: shard {shard.name!r} is missing from {folder}")
    tensors: dict = {}
    for shard in shards:
        for name, array in read_safetensors(shard, convert).items():
            if name in tensors:
                raise TinyloraError(f"{shard}: tensor {name!r} also appears in another shard")
            tensors[name] = array
    for name, shard_name in weight_map.items():
        if name not in tensors:
            raise TinyloraError(f"{inside(folder, shard_name)}: has no tensor {name!r}, "
                                f"which {INDEX_FILE} places there")
    return tensors


def write_safetensors(path: str | os.PathLike, tensors: dict[str, np.ndarray],
                      metadata: dict[str, str] | None = None) -> None:
    """{name: array} -> a .safetensors file, written atomically; each tensor keeps its dtype.

    metadata: the `__metadata__` strings; by default {"format": "pt"}, which
    transformers and PEFT look for (the bytes themselves are framework-neutral).
    """
    metadata = {"format": "pt"} if metadata is None else metadata
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise TinyloraError(f"{path}: safetensors metadata must map strings to strings")
    for name in tensors:
        if not isinstance(name, str) or name == "__metadata__":
            raise TinyloraError(f"{path}: invalid tensor name {name!r}")
    # The library reads each array's memory directly: it must be C-contiguous (np.require keeps shape ()).
    arrays = {name: np.require(a, requirements="C") for name, a in tensors.items()}
    with atomic_path(path) as tmp:
        try:
            save_file(arrays, tmp, metadata=metadata or None)
        except _LIBRARY_ERRORS as e:
            raise TinyloraError(f"{path}: cannot write ({_one_line(e)})") from None


def check_tensors(source, found: dict, expected: dict, what: str = "tensor",
                  why_unexpected: Callable[[str], str] | None = None, missing_hint: str = "") -> None:
    """The one check of names and shapes: every expected name present with its shape, nothing else.

    found: name -> anything with a .shape (or None when only names count);
    expected: name -> shape tuple (or None). The first offender is named in
    one line, as "<source>: missing tensor X (expected shape S)", "<source>:
    unexpected tensor X: <why>" or "<source>: tensor X has shape S, expected S'".
    """
    def more(names: list) -> str:
        return f" (and {len(names) - 1} more)" if len(names) > 1 else ""

    if missing := [n for n in expected if n not in found]:
        shape = f" (expected shape {expected[missing[0]]})" if expected[missing[0]] is not None else ""
        raise TinyloraError(f"{source}: missing {what} {missing[0]}{shape}{more(missing)}{missing_hint}")
    if unexpected := [n for n in found if n not in expected]:
        why = f": {why_unexpected(unexpected[0])}" if why_unexpected else ""
        raise TinyloraError(f"{source}: unexpected {what} {unexpected[0]}{why}{more(unexpected)}")
    for name, shape in expected.items():
        if shape is not None and tuple(found[name].shape) != tuple(shape):
            raise TinyloraError(f"{source}: {what} {name} has shape {tuple(found[name].shape)}, "
                                f"expected {tuple(shape)}")


def check_floats(source, tensors: dict[str, np.ndarray]) -> None:
    """Every tensor floating-point (bfloat16 included) and finite, or one line naming the first that is not."""
    for key, array in tensors.items():
        if not is_float(array.dtype):
            raise TinyloraError(f"{source}: {key} has dtype {array.dtype}, expected a floating-point type")
        if not np.isfinite(array).all():
            raise TinyloraError(f"{source}: {key} holds NaN or inf values")
