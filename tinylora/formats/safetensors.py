"""The safetensors format, read and written with NumPy alone.

A .safetensors file is three parts:

    8 bytes      N, the header length, unsigned little-endian
    N bytes      a JSON object, padded with spaces to a multiple of 8:
                 {"<tensor name>": {"dtype": "BF16", "shape": [576, 49152],
                                    "data_offsets": [begin, end]},
                  ...,
                  "__metadata__": {"format": "pt"}}      (optional, str -> str)
    the rest     the tensors' raw little-endian bytes, C order; each tensor's
                 offsets count from the first byte after the header

Why not the `safetensors` package? Its NumPy backend refuses BF16 ("data type
'bfloat16' not understood": NumPy has no bfloat16), and BF16 is what most
Qwen checkpoints ship in. Reading the format ourselves is a page of code, and
we validate the header before allocating anything, so a corrupt or hostile
file fails with one line naming the file and the tensor instead of a
MemoryError or a silent short read. (The package stays in the tests, as an
independent oracle.)

BF16 is bfloat16: the top 16 bits of a float32. On read it becomes float32
(exact), or with `keep_bf16=True` stays as its raw bits in an np.uint16 array
("bf16 bits"), which the matmul kernels widen on the fly and which halves the
memory of frozen weights. The conversions live in kernels/matmul.py.

The writing rule, one line: **the dtype on disk is the array's dtype, except
that `bf16=True` writes every floating array as BF16** (rounded to nearest
even). An np.uint16 array is always written as U16: this writer cannot tell
bf16 bits from integers, so it never guesses. To write bf16 bits you hold,
widen them with `bf16_to_f32` (exact) and pass `bf16=True`; the same bits come
back out.

What is not here: no lazy loading (every tensor is read into its own array),
no float8 dtypes, no big-endian hosts.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np

from ..errors import TinyloraError
from ..kernels.matmul import bf16_to_f32, f32_to_bf16
from .files import atomic_write, inside, read_json

# safetensors dtype name <-> NumPy dtype (little-endian on disk). BF16 has no
# NumPy dtype; its bits are read as '<u2' and converted (see the docstring).
DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype("bool"), "U8": np.dtype("u1"), "I8": np.dtype("i1"),
    "I16": np.dtype("<i2"), "U16": np.dtype("<u2"), "I32": np.dtype("<i4"), "U32": np.dtype("<u4"),
    "I64": np.dtype("<i8"), "U64": np.dtype("<u8"),
    "F16": np.dtype("<f2"), "BF16": np.dtype("<u2"), "F32": np.dtype("<f4"), "F64": np.dtype("<f8"),
}
_NAMES = {dt: name for name, dt in DTYPES.items() if name != "BF16"}   # np dtype -> name, for writing

# The reference implementation refuses headers over 100 MB; so do we, before
# reading one. A real header is ~100 bytes per tensor.
MAX_HEADER_BYTES = 100_000_000
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


# --------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------

def read_header(path: str | os.PathLike) -> tuple[dict[str, dict], dict[str, str], int]:
    """path -> (entries {name: {dtype, shape, data_offsets}}, metadata, data_start), validated.

    Checks, before anything is allocated: the header length fits in the file;
    the header is a JSON object of well-formed entries; every dtype is known;
    each tensor's byte count is prod(shape) * itemsize; the tensors tile the
    data section exactly (no gaps, no overlaps, nothing past the end of file).
    """
    path = Path(path)
    try:
        file_size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise TinyloraError(f"{path}: not a safetensors file: {file_size} bytes, shorter than "
                                    "the 8-byte header length")
            n = int.from_bytes(prefix, "little")
            if n > MAX_HEADER_BYTES or 8 + n > file_size:
                raise TinyloraError(f"{path}: corrupt safetensors file: header length {n} bytes, "
                                    f"but the file has {file_size} bytes")
            raw = f.read(n)
    except FileNotFoundError:
        raise TinyloraError(f"{path}: file not found") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TinyloraError(f"{path}: corrupt safetensors header (not valid JSON: {e})") from None
    if not isinstance(header, dict):
        raise TinyloraError(f"{path}: corrupt safetensors header: expected a JSON object")

    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise TinyloraError(f"{path}: corrupt safetensors header: __metadata__ must map strings to strings")

    data_start, data_size = 8 + n, file_size - 8 - n
    for name, entry in header.items():
        _check_entry(path, name, entry, data_size)
    # The tensors must tile [0, data_size) exactly, as the format requires.
    end = 0
    for name, entry in sorted(header.items(), key=lambda kv: tuple(kv[1]["data_offsets"])):
        begin, stop = entry["data_offsets"]
        if begin != end:
            what = "overlaps the previous tensor" if begin < end else f"leaves a gap at byte {end}"
            raise TinyloraError(f"{path}: corrupt safetensors header: tensor {name!r} "
                                f"(bytes {begin}..{stop}) {what}")
        end = stop
    if end != data_size:
        raise TinyloraError(f"{path}: corrupt safetensors file: tensors end at byte {end} of a "
                            f"{data_size}-byte data section (truncated, or trailing bytes)")
    return header, metadata, data_start


def _check_entry(path: Path, name: str, entry, data_size: int) -> None:
    """One header entry: known dtype, shape of non-negative ints, offsets that match and fit."""
    def bad(why: str) -> TinyloraError:
        return TinyloraError(f"{path}: corrupt safetensors header: tensor {name!r}: {why}")

    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
        raise bad("needs dtype, shape and data_offsets")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in DTYPES:
        raise bad(f"dtype {dtype!r} is not supported (supported: {', '.join(DTYPES)})")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise bad(f"shape {shape!r} is not a list of non-negative integers")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(type(o) is int for o in offsets) or not 0 <= offsets[0] <= offsets[1]):
        raise bad(f"data_offsets {offsets!r} are not [begin, end] with 0 <= begin <= end")
    if offsets[1] > data_size:
        raise bad(f"data_offsets {offsets} run past the end of the file ({data_size} data bytes)")
    nbytes = math.prod(shape) * DTYPES[dtype].itemsize     # Python ints: no overflow on absurd shapes
    if offsets[1] - offsets[0] != nbytes:
        raise bad(f"shape {shape} of {dtype} needs {nbytes} bytes, data_offsets give {offsets[1] - offsets[0]}")


def read_safetensors(path: str | os.PathLike, keep_bf16: bool = False,
                     round_to_bf16: bool = False) -> dict[str, np.ndarray]:
    """path -> {name: array}, in file order; BF16 -> float32, or np.uint16 bits with keep_bf16.

    Each tensor is read straight from the file into its own (aligned, writable)
    array with np.fromfile: a 1 GB checkpoint is never a 1 GB Python bytes object.
    round_to_bf16: float matrices (2-D) become bf16 bits too, rounded to nearest
    even as each is read, so a float32 checkpoint loads into half its size
    without ever being in memory whole.
    """
    path = Path(path)
    header, _, data_start = read_header(path)
    tensors: dict[str, np.ndarray] = {}
    with open(path, "rb") as f:
        for name, entry in header.items():
            dtype, shape = entry["dtype"], tuple(entry["shape"])
            count = math.prod(shape)
            f.seek(data_start + entry["data_offsets"][0])
            array = np.fromfile(f, dtype=DTYPES[dtype], count=count)
            if array.size != count:             # the file shrank since read_header looked at it
                raise TinyloraError(f"{path}: truncated while reading tensor {name!r}")
            array = array.reshape(shape)
            if dtype == "BF16" and not keep_bf16:
                array = bf16_to_f32(array)
            elif round_to_bf16 and dtype in ("F16", "F32", "F64") and array.ndim == 2:
                array = f32_to_bf16(np.ascontiguousarray(array, dtype=np.float32))
            tensors[name] = array
    return tensors


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The file's `__metadata__` (empty if none)."""
    return read_header(path)[1]


def load_checkpoint(folder: str | os.PathLike, keep_bf16: bool = False,
                    round_to_bf16: bool = False) -> dict[str, np.ndarray]:
    """An HF-format folder's weights -> {name: array}.

    Either one `model.safetensors`, or shards listed by `model.safetensors.index.json`
    ({"weight_map": {tensor name: shard file}}). Every tensor the index names
    must be in the shard it names; a missing shard is an error naming it.
    keep_bf16 and round_to_bf16 are read_safetensors'.
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
        return read_safetensors(single, keep_bf16, round_to_bf16)

    weight_map = read_json(index_path).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise TinyloraError(f"{index_path}: no weight_map, or an empty one")
    tensors: dict[str, np.ndarray] = {}
    for shard_name in sorted(set(weight_map.values()), key=str):
        shard = inside(folder, shard_name)
        if not shard.exists():
            raise TinyloraError(f"{index_path}: shard {shard_name!r} is missing from {folder}")
        for name, array in read_safetensors(shard, keep_bf16, round_to_bf16).items():
            if name in tensors:
                raise TinyloraError(f"{shard}: tensor {name!r} also appears in another shard")
            tensors[name] = array
    for name, shard_name in weight_map.items():
        if name not in tensors:
            raise TinyloraError(f"{inside(folder, shard_name)}: has no tensor {name!r}, "
                                f"which {INDEX_FILE} places there")
    return tensors


# --------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------

def write_safetensors(path: str | os.PathLike, tensors: dict[str, np.ndarray],
                      metadata: dict[str, str] | None = None, bf16: bool = False) -> None:
    """{name: array} -> a .safetensors file, written atomically.

    metadata: the `__metadata__` strings; by default {"format": "pt"}, which
              transformers and PEFT look for (the bytes themselves are
              framework-neutral).
    bf16:     write floating arrays as BF16, round to nearest even. Other
              arrays keep their dtype; np.uint16 is always U16 (see the module
              docstring for why).

    Tensors are laid out largest item size first: with the header padded to
    8 bytes, every tensor then starts at a multiple of its own item size, so a
    reader may map them without copying.
    """
    metadata = {"format": "pt"} if metadata is None else metadata
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise TinyloraError(f"{path}: safetensors metadata must map strings to strings")

    prepared: list[tuple[str, str, np.ndarray]] = []     # (name, dtype name, little-endian C-order array)
    for name, array in tensors.items():
        if not isinstance(name, str) or name == "__metadata__":
            raise TinyloraError(f"{path}: invalid tensor name {name!r}")
        prepared.append((name, *_to_disk(np.asarray(array), bf16, path, name)))
    prepared.sort(key=lambda t: (-t[2].dtype.itemsize, t[0]))

    header: dict[str, object] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, dtype, array in prepared:
        header[name] = {"dtype": dtype, "shape": list(array.shape), "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)

    with atomic_write(path) as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for _, _, array in prepared:
            f.write(memoryview(array.reshape(-1)).cast("B"))  # no bytes copy of the tensor


def _to_disk(array: np.ndarray, bf16: bool, path, name: str) -> tuple[str, np.ndarray]:
    """array -> (safetensors dtype name, C-contiguous little-endian array holding exactly those bytes)"""
    if bf16 and array.dtype.kind == "f":
        # f64 -> f32 -> bf16 rounds twice; a tie after the first rounding can
        # (rarely) round differently from a direct f64 -> bf16. Weights are f32.
        wide = np.require(array, dtype=np.float32, requirements="C")
        return "BF16", f32_to_bf16(wide)
    little = array.dtype.newbyteorder("<") if array.dtype.itemsize > 1 else array.dtype
    name_ = _NAMES.get(little)
    if name_ is None:
        raise TinyloraError(f"{path}: tensor {name!r} has dtype {array.dtype}, which safetensors "
                            f"cannot store (supported: {', '.join(sorted(set(_NAMES.values())))})")
    return name_, np.require(array, dtype=little, requirements="C")   # (keeps shape (), unlike ascontiguousarray)
