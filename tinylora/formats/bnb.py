"""bitsandbytes 4-bit checkpoints (the `*-bnb-4bit` repositories people download): read as NF4 weights.

`save_pretrained` on a model loaded with BitsAndBytesConfig(load_in_4bit=True,
bnb_4bit_quant_type="nf4") writes a normal Hugging Face folder whose
config.json carries

    "quantization_config": {"quant_method": "bitsandbytes", "load_in_4bit": true,
                            "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": ..., ...}

and, for every quantised Linear (the projections; embeddings, norms and
lm_head stay float), these tensors beside the usual names:

    <name>.weight                                 uint8 (O·I/2, 1)  the packed NF4 codes (kernels/nf4.py)
    <name>.weight.absmax                          float32 (blocks,), or uint8 codes when double-quantised
    <name>.weight.quant_map                       float32 (16,)     the NF4 values
    <name>.weight.nested_absmax                   float32           double quantisation only
    <name>.weight.nested_quant_map                float32 (256,)    double quantisation only
    <name>.weight.quant_state.bitsandbytes__nf4   uint8: JSON {"quant_type", "blocksize", "dtype", "shape",
                                                  and "nested_blocksize", "nested_offset" when nested}

`assemble_nf4` turns each such group into one NF4Weight, bytes as stored.
What is not here: 8-bit (LLM.int8) checkpoints, FP4, and other quantisation
methods (GPTQ, AWQ, ...): each is refused by name in one line.
"""

from __future__ import annotations

import json

import numpy as np

from ..errors import TinyloraError
from ..kernels.nf4 import NF4
from ..kernels.quantized import NF4Weight

STATE = "quant_state.bitsandbytes__nf4"
COMPANIONS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map", STATE)


def checkpoint_quantization(raw: dict, source: str) -> str | None:
    """config.json's quantization_config -> "nf4" for a bitsandbytes 4-bit NF4 checkpoint, None without one."""
    qc = raw.get("quantization_config")
    if qc is None:
        return None
    if not isinstance(qc, dict):
        raise TinyloraError(f"{source}: quantization_config must be an object, got {qc!r}")
    method = qc.get("quant_method")
    if method != "bitsandbytes":
        raise TinyloraError(f"{source}: quantization_config.quant_method = {method!r}; tinylora reads "
                            "bitsandbytes 4-bit (nf4) checkpoints, GGUF files and float checkpoints")
    if qc.get("load_in_8bit"):
        raise TinyloraError(f"{source}: a bitsandbytes 8-bit (load_in_8bit) checkpoint; tinylora reads the "
                            "4-bit NF4 ones (load_in_4bit, bnb_4bit_quant_type nf4)")
    if not qc.get("load_in_4bit"):
        raise TinyloraError(f"{source}: quantization_config has neither load_in_4bit nor load_in_8bit set")
    kind = qc.get("bnb_4bit_quant_type", "fp4")             # transformers' own default is fp4
    if kind != "nf4":
        raise TinyloraError(f"{source}: quantization_config.bnb_4bit_quant_type = {kind!r}; only nf4 is supported")
    return "nf4"


def assemble_nf4(tensors: dict, source: str) -> dict:
    """A bitsandbytes checkpoint's tensors -> the same dict with each quantised weight's group of tensors
    replaced by one NF4Weight under the weight's name. Anything missing or inconsistent: one line naming it."""
    for name in tensors:
        if name.endswith(".quant_state.bitsandbytes__fp4"):
            raise TinyloraError(f"{source}: {name}: an FP4 weight; only NF4 is supported")
    out = dict(tensors)
    weights = [name[:-len(STATE) - 1] for name in tensors if name.endswith("." + STATE)]
    for w in weights:
        for suffix in COMPANIONS:
            out.pop(f"{w}.{suffix}", None)
        out[w] = _nf4_weight(tensors, w, source)
    for name, a in out.items():
        stray = next((s for s in COMPANIONS if name.endswith("." + s)), None)
        if stray is not None:
            raise TinyloraError(f"{source}: {name} belongs to {name[:-len(stray) - 1]}, which has no "
                                f"{STATE} tensor (the checkpoint is incomplete)")
        if isinstance(a, np.ndarray) and a.dtype == np.uint8:
            raise TinyloraError(f"{source}: {name} holds packed 4-bit bytes, but its quant state tensor "
                                f"{name}.{STATE} is missing")
    return out


def _nf4_weight(tensors: dict, w: str, source: str) -> NF4Weight:
    def need(suffix: str) -> np.ndarray:
        key = f"{w}.{suffix}" if suffix else w
        if key not in tensors and not suffix:
            raise TinyloraError(f"{source}: {w} is missing, but its bitsandbytes quant state tensors are there")
        if key not in tensors:
            raise TinyloraError(f"{source}: {key} is missing (part of the bitsandbytes quant state of {w})")
        return np.asarray(tensors[key])

    raw = need(STATE)
    try:
        state = json.loads(bytes(raw.astype(np.uint8)).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TinyloraError(f"{source}: {w}.{STATE} is not the JSON bitsandbytes writes ({e})") from None
    state = state if isinstance(state, dict) else {}
    shape, blocksize = state.get("shape"), state.get("blocksize")
    if (not isinstance(shape, list) or len(shape) != 2 or not all(isinstance(d, int) and d > 0 for d in shape)
            or not isinstance(blocksize, int) or blocksize <= 0 or blocksize % 2 or state.get("quant_type") != "nf4"):
        raise TinyloraError(f"{source}: {w}.{STATE} = {state!r}: expected quant_type nf4, an even blocksize "
                            "and a 2-d shape")
    packed = need("")
    if packed.dtype != np.uint8 or packed.size != (shape[0] * shape[1] + 1) // 2:
        raise TinyloraError(f"{source}: {w} holds {packed.size} {packed.dtype} values, but its quant state says "
                            f"shape {shape}: {(shape[0] * shape[1] + 1) // 2} packed uint8 bytes")
    quant_map = need("quant_map")
    if quant_map.shape != (16,) or not np.array_equal(quant_map.astype(np.float32), NF4):
        raise TinyloraError(f"{source}: {w}.quant_map is not bitsandbytes' NF4 table")
    nested = None
    if "nested_offset" in state or f"{w}.nested_absmax" in tensors:
        offset, blocksize2 = state.get("nested_offset"), state.get("nested_blocksize")
        if not isinstance(offset, (int, float)) or not isinstance(blocksize2, int) or blocksize2 < 1:
            raise TinyloraError(f"{source}: {w}.{STATE} lacks nested_offset / nested_blocksize, but the weight "
                                "is double-quantised")
        nested = (need("nested_quant_map").astype(np.float32), need("nested_absmax").astype(np.float32),
                  blocksize2, offset)
    try:
        return NF4Weight(packed, need("absmax"), tuple(shape), blocksize, nested)
    except TypeError as e:
        raise TinyloraError(f"{source}: {w}: {e}") from None
