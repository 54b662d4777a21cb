"""Differentiable ops: one `Function` per op, forward and backward side by side.

Each module's docstring gives the math of both directions; heavy loops live in
the `tinylora/kernels/` module of the same name.
"""
