"""Numba kernels: explicit loops on plain NumPy arrays, never a Tensor.

One module per op, with the same name as its op in `tinylora/ops/`; forward and
backward kernels sit next to each other. Every kernel works in float32 and
float64 and is tested against a vectorised NumPy reference (tests/test_kernels*.py).
This package imports only numpy and numba.
"""

import os

# Numba's parallel kernels run on OpenMP threads, which by default busy-wait
# for a while after each kernel; on 2 cores they then fight OpenBLAS' threads
# for the CPU and the next BLAS call (or the next kernel after one) can run 50x
# slower (measured in kernels/matmul.py). Passive waiting avoids that. It must
# be set before the first parallel kernel starts the thread pool, so it is set
# here, when the kernels are imported; a value the user set wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
