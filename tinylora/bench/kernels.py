"""Kernel benchmark: every matmul path on the model's real linear shapes.

`tinylora bench kernels` prints `blas_info()` and the table of
`run_kernel_bench()`: for SmolLM2-135M's linear layers (and one of
Qwen2.5-0.5B's), at N = 256 tokens (training, batch 2 x 128) and N = 1
(decoding one token), it times

    numpy          np.matmul(x, w.T), fp32 weights (OpenBLAS)
    numba          our fp32 kernel (kernels/matmul.py): gemm_nt, or gemv_nt when N <= SMALL_N
    dispatch fp32  kernels.weights.linear with a float32 DenseWeight: what the model runs
    dispatch bf16  kernels.weights.linear with a BF16Weight: a fused GEMV, or widened tiles + BLAS
    compute bf16   the same weight with compute "bfloat16" (--compute bfloat16), at N > FEW_N on a CPU
                   with avx512_bf16: the bf16 dot-product GEMM (kernels/bf16_dot.py)

and reports ms per call, GFLOP/s, weight bytes read per second and the speed
relative to numpy (> 1 is faster). The `kernel` column of the dispatch rows
is the path the dispatcher picked; these numbers are what its rule
(`FrozenWeight.path` in tinylora/kernels/weights.py) is based on.

These machines' speed swings by up to 2x from minute to minute, so paths are
interleaved: each repeat times every path of every shape once, in a shuffled
order, and the table shows the median over repeats. Noise then hits all
paths alike and the ratios are meaningful even when the absolute numbers
drift. Each timing runs a path enough times to take about 20 ms.
"""

from __future__ import annotations

import itertools
import os
import time
from typing import Callable

import numpy as np

from ..kernels import matmul as K
from ..kernels.bf16_dot import has_bf16_dot
from ..kernels import weights as W

# SmolLM2-135M: hidden 576, 9 query heads and 3 kv heads of 64 (kv dim 192),
# MLP width 1536, vocabulary 49152 (lm_head is tied to the embeddings).
# Qwen2.5-0.5B: hidden 896, MLP width 4864.
SHAPES = [  # (name, I in features, O out features)
    ("q_proj 576->576", 576, 576),
    ("k_proj 576->192", 576, 192),
    ("gate/up 576->1536", 576, 1536),
    ("down 1536->576", 1536, 576),
    ("lm_head 576->49152", 576, 49152),
    ("Qwen0.5B up 896->4864", 896, 4864),
]
TOKENS = (256, 1)            # N: training batch 2 x 128 tokens; decoding one token
TARGET_SECONDS = 0.02        # each timing repeats a call until about this long
# When decoding, each layer's weights are read once per token and the whole
# model does not fit in cache, so they come from DRAM. Timing one small weight
# over and over would measure the 32 MiB L3 instead; at N <= SMALL_N the calls
# cycle through copies of the weight totalling at least COLD_BYTES.
COLD_BYTES = 64 << 20


def blas_info() -> str:
    """What BLAS NumPy uses (via threadpoolctl) and Numba's threading, one line each."""
    lines = []
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        lines.append("BLAS: threadpoolctl not installed")
    else:
        for lib in threadpool_info():
            lines.append(f"{lib.get('user_api', '?')}: {lib.get('internal_api', '?')} {lib.get('version', '?')}, "
                         f"kernel {lib.get('architecture', '?')}, {lib.get('num_threads', '?')} threads "
                         f"({os.path.basename(lib.get('filepath', '?'))})")
        if not lines:
            lines.append("BLAS: threadpoolctl found no BLAS library loaded")
    import numba
    try:
        layer = numba.threading_layer()
    except ValueError:                   # no parallel kernel has run yet
        layer = "not started"
    lines.append(f"numba {numba.__version__}: {numba.get_num_threads()} threads, threading layer {layer}")
    return "\n".join(lines)


def _paths(x: np.ndarray, ws: list[np.ndarray], bf16s: list) -> dict[str, tuple[str, Callable]]:
    """path name -> (kernel it runs, a call computing x wᵀ) for one shape.

    ws (float32 arrays) and bf16s (BF16Weights) are copies of the same weight; each call takes
    the next copy (see COLD_BYTES)."""
    N = x.shape[0]
    w, b = itertools.cycle(ws), itertools.cycle(bf16s)
    dense = [W.DenseWeight(a) for a in ws]
    d = itertools.cycle(dense)
    paths = {
        "numpy": ("blas", lambda: np.matmul(x, next(w).T)),
        "numba": (("gemv_nt", lambda: K.gemv_nt(x, next(w))) if N <= W.SMALL_N
                  else ("gemm_nt", lambda: K.gemm_nt(x, next(w)))),
        "dispatch fp32": (W.linear_path(dense[0], N, x.dtype), lambda: W.linear(x, next(d))),
        "dispatch bf16": (W.linear_path(bf16s[0], N, x.dtype), lambda: W.linear(x, next(b))),
    }
    if N > W.FEW_N and has_bf16_dot():
        dot = W.BF16Weight(bf16s[0].bits)
        dot.compute = "bfloat16"
        paths["compute bf16"] = (W.linear_path(dot, N, x.dtype), lambda: W.linear(x, dot))
    return paths


def time_call(call: Callable[[], np.ndarray], n: int) -> float:
    """Seconds per call, averaged over n back-to-back calls."""
    start = time.perf_counter()
    for _ in range(n):
        call()
    return (time.perf_counter() - start) / n


def run_kernel_bench(repeats: int = 5, shapes=SHAPES, tokens=TOKENS, seed: int = 0) -> list[dict]:
    """Time every path on every (shape, N); one dict per row of the table."""
    rng = np.random.default_rng(seed)
    cases = []                                    # (name, N, O, I, paths, calls per timing)
    for name, I, O in shapes:
        w = (rng.standard_normal((O, I)) / np.sqrt(I)).astype(np.float32)
        w_bf16 = W.BF16Weight.from_array(w)
        for N in tokens:
            x = rng.standard_normal((N, I)).astype(np.float32)
            if N <= W.SMALL_N:                    # decoding: weights come from DRAM, not cache
                ws = [w] + [w.copy() for _ in range(-(-COLD_BYTES // w.nbytes) - 1)]
                bf16s = [w_bf16] + [W.BF16Weight(w_bf16.bits.copy())
                                    for _ in range(-(-COLD_BYTES // w_bf16.nbytes) - 1)]
            else:
                ws, bf16s = [w], [w_bf16]
            paths = _paths(x, ws, bf16s)
            calls = {}
            for path, (_, call) in paths.items():
                call()                            # JIT-compile (or load from cache) and warm caches
                calls[path] = max(1, int(TARGET_SECONDS / max(time_call(call, 1), 1e-7)))
            cases.append((name, N, O, I, paths, calls))

    times: dict[tuple[int, str], list[float]] = {}
    for _ in range(repeats):
        for c, (_, _, _, _, paths, calls) in enumerate(cases):
            # A fresh order each repeat: a path may run slower right after another
            # (threads of the previous library still spinning), so no path should
            # always follow the same one.
            for path in rng.permutation(list(paths)):
                times.setdefault((c, path), []).append(time_call(paths[path][1], calls[path]))

    rows = []
    for c, (name, N, O, I, paths, _) in enumerate(cases):
        base = float(np.median(times[(c, "numpy")]))
        for path, (kernel, _) in paths.items():
            t = float(np.median(times[(c, path)]))
            weight_bytes = O * I * (2 if "bf16" in path else 4)
            rows.append(dict(shape=name, N=N, path=path, kernel=kernel, ms=t * 1e3,
                             gflops=2.0 * N * O * I / t / 1e9, gbps=weight_bytes / t / 1e9,
                             vs_numpy=base / t))
    return rows


def format_kernel_table(rows: list[dict]) -> str:
    """The rows of `run_kernel_bench` as a text table, one block per shape and N."""
    header = (f"{'shape':<22} {'N':>4}  {'path':<14} {'kernel':<15} {'ms':>9} {'GFLOP/s':>8} "
              f"{'W GB/s':>7} {'x numpy':>8}")
    lines = [header, "-" * len(header)]
    previous = None
    for row in rows:
        key = (row["shape"], row["N"])
        first = key != previous
        if first and previous is not None:
            lines.append("")
        previous = key
        shape, N = (row["shape"], str(row["N"])) if first else ("", "")
        lines.append(f"{shape:<22} {N:>4}  {row['path']:<14} {row['kernel']:<15} {row['ms']:>9.3f} "
                     f"{row['gflops']:>8.1f} {row['gbps']:>7.1f} {row['vs_numpy']:>8.2f}")
    lines.append("")
    lines.append("W GB/s: weight bytes read per second (fp32 4 bytes, bf16 2). x numpy: speed relative to "
                 "np.matmul, > 1 is faster. Medians of interleaved repeats.")
    return "\n".join(lines)
