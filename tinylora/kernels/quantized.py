"""The frozen-weight types of stored formats other than float32 and bf16: GGUF's, and bitsandbytes' NF4.

Each holds the bytes exactly as its file stores them and widens rows of them
on demand (kernels/weights.py says what a FrozenWeight provides):

    F16Weight     GGUF F16: IEEE half floats, widened exactly through a table
    GGMLWeight    llama.cpp's block formats Q8_0 ... Q6_K (kernels/ggml.py)
    NF4Weight     bitsandbytes' 4-bit NormalFloat, plain or double-quantised (kernels/nf4.py)

`quantize(a, kind)` is `--quantize`: a float matrix -> one of these, as
llama.cpp's reference quantiser (Q8_0, Q4_0) or bitsandbytes' (NF4) would
write it, byte for byte (tests/test_quantized.py checks each against them).
"""

from __future__ import annotations

import numpy as np

from . import ggml, nf4
from .weights import Bits16Weight, FrozenWeight

QUANTIZE = ("nf4", "q8_0", "q4_0")       # what --quantize offers


class F16Weight(Bits16Weight):
    """A matrix of IEEE float16, held as its (O, I) uint16 bits; widened exactly (NumPy's own conversion)."""

    storage = "float16"

    def rows(self, start, stop, out=None):
        if out is None:
            out = np.empty((stop - start, self.shape[1]), dtype=np.float32)
        out[:stop - start] = self.bits[start:stop].view(np.float16)
        return out[:stop - start]


class BlockWeight(FrozenWeight):
    """A format whose kernel widens any list of rows at once: rows and gather are both that one call."""

    def _widen_into(self, rows: np.ndarray, out: np.ndarray) -> None:
        """rows (O_sel,) int64 -> out[:O_sel] (O_sel, I) float32"""
        raise NotImplementedError

    def _widen(self, rows: np.ndarray, out: np.ndarray | None) -> np.ndarray:
        if out is None:
            out = np.empty((rows.size, self.shape[1]), dtype=np.float32)
        self._widen_into(rows, out)
        return out[:rows.size]

    def rows(self, start, stop, out=None):
        return self._widen(np.arange(start, stop, dtype=np.int64), out)

    def gather(self, ids):
        flat = np.ascontiguousarray(ids.reshape(-1), dtype=np.int64)
        return self._widen(flat, None).reshape(ids.shape + (self.shape[1],))


class GGMLWeight(BlockWeight):
    """A matrix in one of llama.cpp's block formats (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K), as stored.

    blocks: (O, I / block weights · block bytes) uint8, one row of blocks per output row (kernels/ggml.py).
    """

    def __init__(self, blocks: np.ndarray, qtype: str, shape: tuple[int, int]):
        O, I = shape
        if qtype not in ggml.BLOCK_BYTES:
            raise TypeError(f"GGMLWeight: unknown block type {qtype!r} (known: {', '.join(ggml.BLOCK_BYTES)})")
        per_row = I // ggml.BLOCK_WEIGHTS[qtype] * ggml.BLOCK_BYTES[qtype]
        if I % ggml.BLOCK_WEIGHTS[qtype] or blocks.dtype != np.uint8 or blocks.shape != (O, per_row):
            raise TypeError(f"GGMLWeight: {qtype} blocks for ({O}, {I}) must be ({O}, {per_row}) uint8, "
                            f"got {blocks.dtype} {blocks.shape}")
        self.blocks = np.ascontiguousarray(blocks)
        self.qtype = qtype
        self.storage = qtype.lower()
        self.shape = (O, I)

    @property
    def nbytes(self) -> int:
        return self.blocks.nbytes

    def _widen_into(self, rows, out):
        ggml.widen_rows(self.blocks, ggml.KINDS[self.qtype], rows, out, ggml.HALF)

    def gemv(self, x, bias=None):
        return ggml.gemv_blocks(x, self.blocks, ggml.KINDS[self.qtype], ggml.HALF, bias)

    def few(self, x, bias=None):
        return ggml.few_blocks(x, self.blocks, ggml.KINDS[self.qtype], ggml.HALF, bias)


class NF4Weight(BlockWeight):
    """A matrix in bitsandbytes' NF4 layout (kernels/nf4.py), as `save_pretrained` writes it.

    packed:  (O·I/2,) uint8, two codes a byte, high nibble first, over the row-major matrix
    absmax:  (O·I/blocksize,) float32 block scales, or their uint8 codes when double-quantised, then
    nested:  (code2 (256,) float32, absmax2 (blocks/blocksize2,) float32, blocksize2, offset), else None
    """

    storage = "nf4"

    def __init__(self, packed: np.ndarray, absmax: np.ndarray, shape: tuple[int, int],
                 blocksize: int = nf4.BLOCKSIZE, nested: tuple | None = None):
        O, I = shape
        blocks = -(-O * I // blocksize)
        if packed.dtype != np.uint8 or packed.size != (O * I + 1) // 2:
            raise TypeError(f"NF4Weight: ({O}, {I}) needs {(O * I + 1) // 2} packed uint8, "
                            f"got {packed.dtype} {packed.shape}")
        if blocksize % 2 or absmax.size != blocks or absmax.dtype != (np.uint8 if nested else np.float32):
            raise TypeError(f"NF4Weight: ({O}, {I}) in blocks of {blocksize} needs {blocks} absmax "
                            f"({'uint8 codes' if nested else 'float32'}), got {absmax.dtype} {absmax.shape}")
        self.packed = np.ascontiguousarray(packed.reshape(-1))
        self.absmax = np.ascontiguousarray(absmax.reshape(-1))
        self.shape, self.blocksize = (O, I), int(blocksize)
        if nested is None:
            self.code2, self.absmax2 = np.zeros(0, np.float32), np.zeros(0, np.float32)
            self.blocksize2, self.offset = 1, np.float32(0.0)
        else:
            code2, absmax2, blocksize2, offset = nested
            if code2.size != 256 or absmax2.size != -(-blocks // int(blocksize2)):
                raise TypeError(f"NF4Weight: nested statistics for {blocks} blocks need a 256-value map and "
                                f"{-(-blocks // int(blocksize2))} absmax, got {code2.size} and {absmax2.size}")
            self.code2 = np.ascontiguousarray(code2, dtype=np.float32).reshape(-1)
            self.absmax2 = np.ascontiguousarray(absmax2, dtype=np.float32).reshape(-1)
            self.blocksize2, self.offset = int(blocksize2), np.float32(offset)

    @property
    def nested(self) -> bool:
        return self.absmax2.size > 0

    @property
    def nbytes(self) -> int:
        return self.packed.nbytes + self.absmax.nbytes + self.code2.nbytes + self.absmax2.nbytes

    @classmethod
    def quantize(cls, a: np.ndarray, blocksize: int = nf4.BLOCKSIZE) -> "NF4Weight":
        """A float matrix (O, I) -> NF4, the bytes bitsandbytes' quantize_4bit(a, quant_type="nf4") gives."""
        flat = np.ascontiguousarray(a, dtype=np.float32).reshape(-1)
        packed, absmax = nf4.quantize_nf4(flat, blocksize, nf4.MIDPOINTS)
        return cls(packed, absmax, a.shape, blocksize)

    def _widen_into(self, rows, out):
        nf4.widen_rows(self.packed, self.absmax, self.code2, self.absmax2, self.blocksize2, self.offset,
                       self.blocksize, self.shape[1], rows, out, nf4.NF4)

    def gemv(self, x, bias=None):
        return nf4.gemv_nf4(x, self.packed, self.absmax, self.code2, self.absmax2, self.blocksize2, self.offset,
                            self.blocksize, self.shape[0], nf4.NF4, bias)

    def few(self, x, bias=None):
        return nf4.few_nf4(x, self.packed, self.absmax, self.code2, self.absmax2, self.blocksize2, self.offset,
                           self.blocksize, self.shape[0], nf4.NF4, bias)


# --------------------------------------------------------------------------
# --quantize: llama.cpp's reference quantisers for Q8_0 and Q4_0, bitsandbytes' for NF4
# --------------------------------------------------------------------------

def _half_bytes(d: np.ndarray) -> np.ndarray:
    """float32 scales (..., 1) -> their float16 (rounded to nearest even) as 2 little-endian bytes (..., 2)"""
    return d.astype("<f2").view(np.uint8)


def quantize_q8_0(a: np.ndarray) -> np.ndarray:
    """(O, I) float32, I a multiple of 32 -> Q8_0 blocks (O, I/32 · 34), as llama.cpp's quantize_row_q8_0_ref:
    d = max|x| / 127, q = round(x / d) (half away from zero, computed as x · (1/d)), d stored as float16."""
    x = a.reshape(a.shape[0], -1, 32)
    d = np.abs(x).max(axis=-1, keepdims=True) / np.float32(127)
    with np.errstate(divide="ignore"):
        inv = np.where(d == 0, np.float32(0), np.float32(1) / d).astype(np.float32)
    v = x * inv
    a = np.abs(v)
    q = (np.sign(v) * (np.floor(a) + np.floor(2 * (a - np.floor(a))))).astype(np.int8)   # C's roundf
    return np.concatenate([_half_bytes(d), q.view(np.uint8)], axis=-1).reshape(a.shape[0], -1)


def quantize_q4_0(a: np.ndarray) -> np.ndarray:
    """(O, I) float32, I a multiple of 32 -> Q4_0 blocks (O, I/32 · 18), as llama.cpp's quantize_row_q4_0_ref:
    d = (the weight of largest magnitude, signed) / -8, q = min(15, trunc(x / d + 8.5)), two a byte
    (weight j in the low nibble of byte j, weight j + 16 in its high nibble)."""
    x = a.reshape(a.shape[0], -1, 32)
    extreme = np.take_along_axis(x, np.abs(x).argmax(axis=-1)[..., None], axis=-1)
    d = extreme / np.float32(-8)
    with np.errstate(divide="ignore"):
        inv = np.where(d == 0, np.float32(0), np.float32(1) / d).astype(np.float32)
    q = np.minimum(np.trunc(x * inv + np.float32(8.5)), np.float32(15)).astype(np.uint8)
    packed = q[..., :16] | (q[..., 16:] << np.uint8(4))
    return np.concatenate([_half_bytes(d), packed], axis=-1).reshape(a.shape[0], -1)


def quantize(a: np.ndarray, kind: str, name: str = "weight") -> FrozenWeight:
    """A float matrix (O, I) -> the frozen weight of `kind` ("nf4", "q8_0", "q4_0") holding it quantised.

    A row length the format cannot block (Q8_0/Q4_0 need multiples of 32) or a non-finite weight is a
    ValueError naming the tensor: quantising would silently spoil it.
    """
    if kind not in QUANTIZE:
        raise ValueError(f"--quantize must be one of {', '.join(QUANTIZE)}, got {kind!r}")
    a = np.asarray(a, dtype=np.float32)
    if not np.isfinite(a).all():
        raise ValueError(f"{name}: holds NaN or inf; it cannot be quantised")
    if kind == "nf4":
        return NF4Weight.quantize(a)
    if a.shape[1] % 32:
        raise ValueError(f"{name}: rows of {a.shape[1]} weights are not a whole number of {kind} blocks of 32")
    blocks = quantize_q8_0(a) if kind == "q8_0" else quantize_q4_0(a)
    return GGMLWeight(blocks, kind.upper(), a.shape)
