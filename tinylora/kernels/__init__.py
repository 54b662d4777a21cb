"""Numba kernels: explicit loops on plain NumPy arrays, never a Tensor.

One module per op, with the same name as its op in `tinylora/ops/`; forward and
backward kernels sit next to each other. Every kernel works in float32 and
float64 and is tested against a vectorised NumPy reference (tests/test_kernels*.py).
This package imports only numpy, numba and llvmlite (Numba's own dependency: one cache-prefetch
hint in kernels/ggml_gemv.py).
"""

import os

# Numba's parallel kernels run on OpenMP threads (GNU libgomp), which by default
# busy-wait ~300000 spins after each kernel; on 2 cores they then fight
# OpenBLAS' threads for the CPU and the next BLAS call (or the next kernel
# after one) can run 50x slower (measured in kernels/matmul.py). Passive
# waiting avoids that, but then every parallel kernel pays for waking the
# pool: 14 us on a Zen 2 VM, 72-79 us on a Xeon VM (a prange(2) doing
# nothing), against ~2 us for threads still spinning. Decoding runs ~210
# parallel products a token, so a short spin first (GOMP_SPINCOUNT, libgomp's
# count of pause loops before it sleeps; it overrides PASSIVE's 0) keeps the
# pool awake between them. Measured on the Xeon, interleaved runs (tok/s):
#
#     spin count               0 (PASSIVE)   300    1000   3000   10000
#     decode Q8_0 SmolLM2        36-37        39-41  61-68  74-82  90
#     train bf16 base 2x128      229-233      223-235 218-230 224-238 227
#     train, bf16 compute        134-140      129-134 129-134 125-127 112
#
# so 3000: decoding 2.1x, float32-compute training unchanged within noise
# (NF4, Q4_K_M, float32 bases: within 0-8 %), bf16 compute ~7 % slower.
# Both must be set before the first parallel kernel starts the pool, so they
# are set here, when the kernels are imported; a value the user set wins.
THREADING_DEFAULTS = {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "3000"}
# The values before (None: unset), for programs this process starts that are not tinylora (the bench's peers).
THREADING_BEFORE = {name: os.environ.get(name) for name in THREADING_DEFAULTS}
for _name, _value in THREADING_DEFAULTS.items():
    os.environ.setdefault(_name, _value)

import types

import numba as nb
import numpy as np


# Elements of the largest array below which a kernel runs on one thread (an
# elementwise pass over 64k floats takes about as long as waking the pool).
PARALLEL_MIN = 1 << 16


def parallel_when_large(min_size: int, fastmath=False):
    """Compile a kernel twice, with and without `parallel=True`; each call picks by size.

    A parallel kernel wakes Numba's worker threads, which spin briefly and then
    sleep (see above), and waking them costs tens of microseconds here: more than a whole
    RMSNorm of one decoded token takes on one core. So a call whose largest
    array has fewer than `min_size` elements runs the serial compilation (a
    `prange` there is a plain `range`) and only large work pays for threads.
    Both compilations are of the same source and compute the same numbers.
    `fastmath` is passed to both (a set of LLVM flags, see kernels/matmul.py).
    Both use NumPy's error model: a float division by zero gives inf or NaN as
    IEEE arithmetic does, where Numba's default checks every division and raises
    ZeroDivisionError. That check is a branch per division, which stops LLVM
    vectorising the loop: SwiGLU's sigmoid 1 / (1 + e) ran at ~11 ns a float32
    with it and ~1.3 ns without (one core).

        @parallel_when_large(1 << 16)
        def rmsnorm_forward(x, w, eps): ...      # rmsnorm_forward.parallel / .serial
    """
    def compile_twice(fn):
        # A renamed twin of fn, so Numba's on-disk cache keeps the two apart.
        twin = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__ + "_serial", fn.__defaults__,
                                  fn.__closure__)
        twin.__qualname__ = fn.__qualname__ + "_serial"
        options = dict(cache=True, fastmath=fastmath, error_model="numpy")
        parallel = nb.njit(parallel=True, **options)(fn)
        serial = nb.njit(**options)(twin)

        def kernel(*args):
            for a in args:                      # run serially unless some array argument is large
                if isinstance(a, np.ndarray) and a.size >= min_size:
                    return parallel(*args)
            return serial(*args)

        kernel.parallel, kernel.serial, kernel.py_func = parallel, serial, fn
        kernel.__name__, kernel.__qualname__, kernel.__doc__ = fn.__name__, fn.__qualname__, fn.__doc__
        return kernel
    return compile_twice


@nb.njit(inline="always", cache=True)
def sum_f64(row, n):
    """row[:n] summed in float64, as four interleaved partial sums: without fast-math
    flags one accumulator is a chain of dependent additions, each waiting for the
    last; four chains overlap in the pipeline. The order is still fixed."""
    s0 = s1 = s2 = s3 = 0.0
    j = 0
    while j + 4 <= n:
        s0 += row[j]
        s1 += row[j + 1]
        s2 += row[j + 2]
        s3 += row[j + 3]
        j += 4
    while j < n:
        s0 += row[j]
        j += 1
    return (s0 + s1) + (s2 + s3)


@nb.njit(inline="always", cache=True)
def max_or_nan(row, n):
    """max of row[:n] (n >= 1), or NaN if any entry is NaN; four interleaved partial
    maxima and a NaN flag, loops LLVM vectorises without fast-math flags."""
    m0 = m1 = m2 = m3 = row[0]
    nan = row[0] != row[0]
    j = 0
    while j + 4 <= n:
        a, b, c, d = row[j], row[j + 1], row[j + 2], row[j + 3]
        m0 = a if a > m0 else m0
        m1 = b if b > m1 else m1
        m2 = c if c > m2 else m2
        m3 = d if d > m3 else m3
        nan |= (a != a) | (b != b) | (c != c) | (d != d)
        j += 4
    while j < n:
        m0 = row[j] if row[j] > m0 else m0
        nan |= row[j] != row[j]
        j += 1
    m0 = m1 if m1 > m0 else m0
    m2 = m3 if m3 > m2 else m2
    m = m2 if m2 > m0 else m0
    return row.dtype.type(np.nan) if nan else m
