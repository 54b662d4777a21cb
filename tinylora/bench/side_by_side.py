"""`tinylora bench`: tinylora and PyTorch+PEFT side by side, on the same CPU, in one run.

Workloads (SPEC §4): LoRA r=8 training, batch 2 x 128 tokens, float32
activations, on SmolLM2-135M with all seven projections adapted and with
q/v only, and on a random-init model of Qwen2.5-0.5B's shape; greedy
decoding with a KV cache (28-token prompt, 64 new tokens) on both models;
and training on SmolLM2 at sequence lengths 128 to 2048 (how cost grows).

tinylora keeps the frozen weights in bf16 (`load_model(dtype="bfloat16")`,
`--dtype bfloat16` on the command line): half the memory, half the bytes per
decoded token, float32 arithmetic. One training and one decoding row repeat
the work with float32 weights, to show what bf16 buys. The peer runs
float32 throughout, its fastest on these CPUs (no bf16 matrix units).

How it measures, and why:
* These machines' speed swings by up to 2x from minute to minute, so the two
  libraries are never timed minutes apart. Each workload starts one process
  per library (workers.serve), both warm up, and then repetitions
  alternate, tinylora-peer, peer-tinylora, ...; each figure is the median
  of its repetitions and the ratio is the ratio of those medians.
* A fresh process per library and workload, so its peak resident memory
  (Linux's VmHWM, generate.peak_memory_gb) is that workload's and nothing else's.
* Model-FLOPs utilisation (MFU) = model FLOPs per token x tokens/s / the
  machine's fp32 GEMM peak, which this process measures itself with
  np.matmul on 2048 x 2048 matrices once per round of repetitions (the
  median over the workload's rounds). Model FLOPs per trained token are
  those the work needs, whoever does it (train_flops_per_token): forward
  and input-gradient products of every frozen linear layer and lm_head
  (no weight gradients: they are frozen), the LoRA products, and causal
  attention.
* The BLAS NumPy uses is reported via threadpoolctl (kernels.blas_info), and each
  tinylora worker reports the kernel its own NumPy picked. The OPENBLAS_* variables of
  the environment are reported; `--native-blas` starts tinylora's workers without
  OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE (which these machines set for old OpenBLAS
  builds, halving numpy's GEMM on a Zen 5), so OpenBLAS picks its kernel for the CPU.
  The peers never see a change: PyTorch's MKL/oneDNN ignore both anyway.

`tinylora bench kernels` (bench/kernels.py) times the matmul paths alone.
"""

from __future__ import annotations

import contextlib
import importlib.util
import multiprocessing
import os
import platform
from pathlib import Path

import numpy as np

from ..config import ModelConfig
from ..errors import TinyloraError
from ..kernels import THREADING_BEFORE
from . import quantised
from .kernels import blas_info, time_call
from .workers import ALL_SEVEN, LORA_R, RANDOM, Workload, has_bf16_cpu, serve, users_threading_environment

SEQ_LENGTHS = (128, 512, 1024, 2048)
TARGETS = {"train": 1.2, "decode": 2.0}       # tokens/s ratio vs the peer at least
RSS_TARGET, MFU_TARGET = 0.6, 0.6             # training: peak RSS ratio at most; MFU at least
GEMM_N = 2048


def workloads(max_seq: int = 2048) -> list[Workload]:
    """The benchmark's workloads in the order they run (the table's rows)."""
    bf16 = "bfloat16"
    rows = [Workload("train SmolLM2-135M, all seven", "train", "smollm2", dtype=bf16),
            Workload("train SmolLM2-135M, q/v only", "train", "smollm2", targets=("q_proj", "v_proj"), dtype=bf16),
            Workload("train Qwen2.5-0.5B shape, all seven", "train", "qwen2.5-0.5b", dtype=bf16),
            Workload("train SmolLM2-135M, all seven, tinylora fp32 weights", "train", "smollm2"),
            *bf16_compute_rows(),
            Workload("decode SmolLM2-135M", "decode", "smollm2", dtype=bf16),
            Workload("decode SmolLM2-135M, tinylora fp32 weights", "decode", "smollm2"),
            Workload("decode Qwen2.5-0.5B shape", "decode", "qwen2.5-0.5b", dtype=bf16)]
    for T in SEQ_LENGTHS[1:]:
        if T <= max_seq:          # long sequences: fewer repetitions (a step of 2 x 2048 takes ~30 s)
            rows.append(Workload(f"train SmolLM2-135M, all seven, 2 x {T}", "train", "smollm2", seq=T,
                                 dtype=bf16, repeats=3 if T <= 512 else 2))
    return rows + quantised.workloads()      # 4-bit bases and GGUF decoding (bench/quantised.py)


def bf16_compute_rows() -> list[Workload]:
    """tinylora with --compute bfloat16 against PyTorch in float32 and with bf16 autocast, where the CPU has
    avx512_bf16 (on another CPU tinylora would fall back to float32 and PyTorch's autocast would emulate)."""
    if not has_bf16_cpu():
        return []
    peers = ("peft", "peft-bf16")
    return [Workload("train SmolLM2-135M, all seven, bf16 compute", "train", "smollm2", dtype="bfloat16",
                     compute="bfloat16", peers=peers),
            Workload("train Qwen2.5-0.5B shape, all seven, bf16 compute", "train", "qwen2.5-0.5b",
                     dtype="bfloat16", compute="bfloat16", peers=peers)]


def train_flops_per_token(config: ModelConfig, targets, r: int, T: int) -> float:
    """Model FLOPs per trained token: LoRA fine-tuning with frozen weights, sequence length T.

    A product of an (n, a) and (a, b) matrix costs 2nab FLOPs. Per token:
      frozen linear layers and lm_head (P weights): forward 2P, input gradient 2P, no weight gradient
      LoRA on a layer (in, out): forward 2r(in + out), backward 4r(in + out) (dx, du, dA, dB)
      causal attention: q.k and p.v over (T + 1) / 2 keys on average, 4 H D (T + 1) / 2 forward,
                        twice that backward
    """
    C, F, V, L = config.hidden_size, config.intermediate_size, config.vocab_size, config.num_hidden_layers
    q, kv = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    shapes = {"q_proj": (C, q), "k_proj": (C, kv), "v_proj": (C, kv), "o_proj": (q, C),
              "gate_proj": (C, F), "up_proj": (C, F), "down_proj": (F, C)}
    frozen = L * sum(a * b for a, b in shapes.values()) + V * C
    lora = L * sum(6 * r * sum(shapes[t]) for t in targets)
    attention = L * 3 * 4 * q * (T + 1) / 2
    return 4 * frozen + lora + attention


def gemm_gflops(n: int = GEMM_N, calls: int = 3) -> float:
    """fp32 GEMM speed of this machine right now: np.matmul on (n, n) matrices, best of `calls`."""
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((n, n), dtype=np.float32), rng.standard_normal((n, n), dtype=np.float32)
    a @ b
    best = min(time_call(lambda: a @ b, 1) for _ in range(calls))
    return 2.0 * n ** 3 / best / 1e9


PEER_MODULES = {"peft": ("torch", "transformers", "peft"), "peft-bf16": ("torch", "transformers", "peft"),
                "peft-bnb4": ("torch", "transformers", "peft", "bitsandbytes"),
                "llama.cpp": ("llama_cpp",), "tinylora-bf16": ()}


def peer_available(side: str = "peft") -> str | None:
    """None if a peer's libraries are importable (PyTorch, transformers and PEFT by default), else why not."""
    missing = [m for m in PEER_MODULES[side] if importlib.util.find_spec(m) is None]
    return f"not installed: {', '.join(missing)} (pip install -e '.[reference]')" if missing else None


@contextlib.contextmanager
def peer_environment():
    """os.environ as the user had it while a peer's process starts (workers.users_threading_environment)."""
    ours = users_threading_environment()
    try:
        yield
    finally:
        for name in THREADING_BEFORE:
            os.environ.pop(name, None)
        os.environ.update(ours)


NATIVE_BLAS_UNSET = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")


@contextlib.contextmanager
def tinylora_environment(native_blas: bool, environ=os.environ):
    """environ (os.environ) while a tinylora worker starts: as it is, or (native_blas) without NATIVE_BLAS_UNSET."""
    saved = {k: environ.pop(k) for k in NATIVE_BLAS_UNSET if native_blas and k in environ}
    try:
        yield
    finally:
        environ.update(saved)


class _Worker:
    """One side of one workload in its own spawned process."""

    def __init__(self, ctx, side: str, workload: Workload, model_dir: str | None, native_blas: bool = False):
        self.side, self.error, self.versions = side, None, ""
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=serve, args=(side, workload, model_dir, child), daemon=True)
        with tinylora_environment(native_blas) if side.startswith("tinylora") else peer_environment():
            self.process.start()
        child.close()
        reply = self._recv()
        if reply is not None:
            status, text = reply
            self.error, self.versions = (text, "") if status == "error" else (None, text)

    def _recv(self):
        try:
            return self.conn.recv()
        except (EOFError, ConnectionError):
            self.error = self.error or f"worker died (exit code {self.process.join(5) or self.process.exitcode})"
            return None

    def run(self) -> float | None:
        """One repetition -> tokens/s (None after a failure)."""
        if self.error:
            return None
        self.conn.send("run")
        reply = self._recv()
        return None if reply is None else reply[1] / reply[0]

    def stop(self) -> float | None:
        """-> peak RSS in GB, and the process is gone."""
        rss = None
        if not self.error:
            self.conn.send("stop")
            rss = self._recv()
        self.process.join(30)
        if self.process.is_alive():
            self.process.kill()
        return rss


def _row_head(workload: Workload) -> dict:
    return {"workload": workload.name, "kind": workload.kind, "model": workload.model, "base": workload.base,
            "batch": workload.batch, "seq": workload.seq, "targets": list(workload.targets)}


def run_workload(workload: Workload, repeats: int, model_dir: str | None, peer: bool,
                 native_blas: bool = False) -> dict:
    """Time one workload on both sides, alternating -> its result row (see the module docstring)."""
    ctx = multiprocessing.get_context("spawn")
    sides = ["tinylora"] + [p for p in workload.peers if (peer or p.startswith("tinylora"))
                            and peer_available(p) is None]
    if workload.base and workload.base != "nf4" and model_dir:
        try:
            quantised.ensure_gguf(model_dir, workload.base)   # llama.cpp writes the file once, beside SmolLM2
        except TinyloraError as e:                        # no llama-cpp-python: the row says so, the bench goes on
            empty = {"tokens_per_s": None, "repeats": [], "peak_rss_gb": None, "error": str(e), "versions": ""}
            return {**_row_head(workload), "gemm_gflops": None, "tinylora": empty, "ratios": {}}
    workers = [_Worker(ctx, side, workload, model_dir, native_blas) for side in sides]
    speeds = {side: [] for side in sides}
    gemm = []
    for i in range(workload.repeats or repeats):
        for w in (workers if i % 2 == 0 else workers[::-1]):
            speed = w.run()
            if speed is not None:
                speeds[w.side].append(speed)
        gemm.append(gemm_gflops())
    row = {**_row_head(workload), "gemm_gflops": float(np.median(gemm))}
    for w in workers:
        rss = w.stop()
        row[w.side] = {"tokens_per_s": float(np.median(speeds[w.side])) if speeds[w.side] else None,
                       "repeats": speeds[w.side], "peak_rss_gb": rss, "error": w.error, "versions": w.versions}
    pytorch = [s for s in ("peft", "peft-bf16") if s in row and row[s]["tokens_per_s"]]
    strongest = max(pytorch, key=lambda s: row[s]["tokens_per_s"]) if pytorch else "peft"
    ours, theirs = row["tinylora"], row.get(strongest)
    if workload.kind == "train" and (workload.model == "smollm2" or workload.model in RANDOM):
        config = (ModelConfig.from_json(Path(model_dir) / "config.json") if workload.model == "smollm2"
                  else ModelConfig.from_dict(RANDOM[workload.model]))
        flops = train_flops_per_token(config, workload.targets, LORA_R, workload.seq)
        row["flops_per_token"] = flops
        for side in sides:
            r = row[side]
            r["mfu"] = flops * r["tokens_per_s"] / (row["gemm_gflops"] * 1e9) if r["tokens_per_s"] else None
    row["ratios"] = {}                                   # tinylora / each other side
    for side in sides[1:]:
        other = row[side]
        row["ratios"][side] = {
            "speed": ours["tokens_per_s"] / other["tokens_per_s"] if ours["tokens_per_s"] and other["tokens_per_s"]
            else None,
            "rss": ours["peak_rss_gb"] / other["peak_rss_gb"] if ours["peak_rss_gb"] and other["peak_rss_gb"]
            else None}
    if theirs:                                           # the headline: the stronger PyTorch setup
        row["peer_side"] = strongest
        row["speed_ratio"], row["rss_ratio"] = row["ratios"][strongest]["speed"], row["ratios"][strongest]["rss"]
    return row


def machine() -> dict:
    cpu = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    env = {k: os.environ[k] for k in sorted(os.environ) if k.startswith(("OPENBLAS", "OMP_", "GOMP_", "MKL_"))}
    for name, value in THREADING_BEFORE.items():  # as the user had them, not as tinylora's kernels set them
        env.pop(name, None)
        if value is not None:
            env[name] = value
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "blas": blas_info(),
            "env": env}


def run_bench(rows: list[Workload], repeats: int = 5, model_dir: str | None = None, peer: bool = True,
              log=print, native_blas: bool = False) -> dict:
    """Every workload in turn -> {"machine", "peer", "rows"}; logs each row as it finishes."""
    reason = peer_available() if peer else "switched off (--no-peer)"
    if reason:
        log(f"PyTorch+PEFT: {reason}; timing tinylora alone")
    result = {"machine": machine(), "peer": reason or "PyTorch+transformers+PEFT", "rows": [],
              "native_blas": native_blas}
    headed = set()
    for workload in rows:
        kind = "quantised" if workload.base else "plain"
        if kind not in headed:                 # each table's header before its first row
            headed.add(kind)
            log(quantised.HEADER if workload.base else HEADER)
        row = run_workload(workload, repeats, model_dir, peer=reason is None, native_blas=native_blas)
        result["rows"].append(row)
        log("\n".join(quantised.format_rows([row])[2:]) if row["base"] else format_row(row))
    return result


# -- the table ------------------------------------------------------------------------------------
HEADER = ("| workload | tinylora tok/s | PyTorch+PEFT tok/s | speed ratio | tinylora peak RSS | "
          "PEFT peak RSS | RSS ratio | tinylora MFU | PEFT MFU |")


def _num(x, fmt: str, unit: str = "") -> str:
    return "—" if x is None else f"{x:{fmt}}{unit}"


def format_row(row: dict) -> str:
    side = row.get("peer_side", "peft")
    ours, theirs = row["tinylora"], row.get(side) or {}
    name = row["workload"] + (" (PyTorch: bf16 autocast)" if side == "peft-bf16" else "")
    cells = [name, _num(ours["tokens_per_s"], ".1f"), _num(theirs.get("tokens_per_s"), ".1f"),
             _num(row.get("speed_ratio"), ".2f", "×"), _num(ours["peak_rss_gb"], ".2f", " GB"),
             _num(theirs.get("peak_rss_gb"), ".2f", " GB"), _num(row.get("rss_ratio"), ".2f", "×"),
             _num(ours.get("mfu") and 100 * ours["mfu"], ".0f", " %"),
             _num(theirs.get("mfu") and 100 * theirs["mfu"], ".0f", " %")]
    errors = [f"{s}: {r['error']}" for s, r in (("tinylora", ours), (side, theirs)) if r.get("error")]
    return "| " + " | ".join(cells) + " |" + (f"  ({'; '.join(errors)})" if errors else "")


def format_table(result: dict) -> str:
    """The whole run as a Markdown table, the machine it ran on and the targets it met."""
    m = result["machine"]
    lines = [f"Machine: {m['cpu']}, {m['cores']} cores, Python {m['python']}"]
    lines += m["blas"].splitlines()
    if m["env"]:
        lines.append("Environment: " + ", ".join(f"{k}={v}" for k, v in m["env"].items()))
    if result.get("native_blas"):
        lines.append(f"--native-blas: tinylora's workers ran without {' and '.join(NATIVE_BLAS_UNSET)}")
    versions = {side["versions"] for r in result["rows"] for side in r.values()
                if isinstance(side, dict) and side.get("versions")}
    lines += sorted(versions)
    gemm = [r["gemm_gflops"] for r in result["rows"] if r["gemm_gflops"]]
    lines.append(f"fp32 GEMM peak (np.matmul {GEMM_N}², median per workload): "
                 f"{min(gemm):.0f}–{max(gemm):.0f} GFLOP/s" if gemm else "")
    plain = [r for r in result["rows"] if not r.get("base")]
    based = [r for r in result["rows"] if r.get("base")]
    if plain:
        lines += ["", HEADER, "|" + "---|" * HEADER.count(" | ") + "---|"]
        lines += [format_row(r) for r in plain]
        lines += ["", "Ratios are tinylora / PyTorch+PEFT (speed: higher is better; RSS: lower is better), "
                  "each the median of alternated repetitions; MFU against the measured GEMM peak."]
    if based:
        lines += ["", "Quantised bases: tinylora on the base named vs each side it is measured against "
                  "(ratios tinylora / that side)", ""] + quantised.format_rows(based)
    lines += [""] + check_targets(result) + quantised.check_targets(based)
    return "\n".join(lines)


def check_targets(result: dict) -> list[str]:
    """One line per SPEC §4 target on the 2 x 128 workloads: met or not, with the figure."""
    out = []
    for r in result["rows"]:
        if r["seq"] != 128 or r.get("base"):          # quantised bases: quantised.check_targets
            continue
        if r.get("speed_ratio") is not None:
            goal = TARGETS[r["kind"]]
            out.append(f"{'met ' if r['speed_ratio'] >= goal else 'MISS'}  {r['workload']}: speed "
                       f"{r['speed_ratio']:.2f}× (target ≥ {goal}×)")
        if r["kind"] == "train" and r.get("rss_ratio") is not None:
            out.append(f"{'met ' if r['rss_ratio'] <= RSS_TARGET else 'MISS'}  {r['workload']}: peak RSS "
                       f"{r['rss_ratio']:.2f}× (target ≤ {RSS_TARGET}×)")
        if r["kind"] == "train" and r["tinylora"].get("mfu") is not None:
            mfu = r["tinylora"]["mfu"]
            out.append(f"{'met ' if mfu >= MFU_TARGET else 'MISS'}  {r['workload']}: MFU {100 * mfu:.0f} % "
                       f"(target ≥ {100 * MFU_TARGET:.0f} %)")
    return out


__all__ = ["ALL_SEVEN", "run_bench", "workloads", "format_table", "train_flops_per_token", "gemm_gflops"]
