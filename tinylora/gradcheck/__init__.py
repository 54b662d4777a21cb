"""Gradient checking: the analytic backward against central finite differences, in float64.

    checker.py       gradcheck(fn, inputs): sampled entries and one random direction; the result table
    op_catalogue.py  one check per op (every Function in tinylora.ops), what `tinylora gradcheck` prints
    model_check.py   LoRA end to end: every A and B of a tiny random Qwen2

`tinylora.gradcheck` (the function, re-exported by the package) is checker.gradcheck.
"""

from .checker import EPS, RTOL, Check, GradcheckResult, gradcheck

__all__ = ["EPS", "RTOL", "Check", "GradcheckResult", "gradcheck"]
