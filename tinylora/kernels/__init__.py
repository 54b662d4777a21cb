"""Numba kernels: explicit loops on plain NumPy arrays, never a Tensor.

One module per op, with the same name as its op in `tinylora/ops/`; forward and
backward kernels sit next to each other. Every kernel works in float32 and
float64 and is tested against a vectorised NumPy reference (tests/test_kernels*.py).
This package imports only numpy and numba.
"""
