"""exp for the hot loops: a float32 exp that LLVM can vectorise, exact handling of NaN and inf.

Softmax, cross-entropy and SiLU spend most of their time in exp. Numba's
np.exp calls the C library one element at a time (about 2.6 ns per float32
here), so `exp_like(x)` computes it with arithmetic LLVM turns into SIMD
instructions (about 10x faster in a loop), for float32 inputs; float64
inputs keep np.exp, so gradient checks run at full precision.

The float32 method (Cody and Waite, 1980): with n = round(x / ln 2) and
r = x - n ln 2, so |r| <= ln(2)/2,

    exp(x) = 2^n * exp(r),   exp(r) by its Taylor series to r^7 / 7!

(truncation error < 5e-9 relative, below float32's 6e-8 rounding); ln 2 is
split into a high part whose products with n are exact and a low part.
2^n is built directly as float32 bit patterns (exponent field n + 127), in
two halves so that n = 128, reached just below the overflow point, fits.
Results are within 2 ulp of the correctly rounded exp (tests/test_kernels.py).

Edges, explicitly: x > 88.72 (exp overflows float32) -> inf; x < -87.33
(below the smallest normal float32) -> 0, so exp(-inf) = 0 exactly; NaN ->
NaN (the polynomial of NaN is NaN). No fast-math flags are involved.
"""

import numba as nb
import numpy as np
from llvmlite import ir
from numba.core import types
from numba.extending import intrinsic

LOG2E = np.float32(1.4426950408889634)
LN2_HI = np.float32(0.693359375)          # 8 significant bits: n * LN2_HI is exact for |n| < 2^16
LN2_LO = np.float32(-2.12194440e-4)       # ln 2 - LN2_HI
X_MAX = np.float32(88.72283)              # exp(X_MAX) is the largest float32
X_MIN = np.float32(-87.33654)             # exp(X_MIN) is the smallest normal float32


@intrinsic
def _bits_as_float32(typingctx, bits):
    """int32 bits -> the float32 with that bit pattern (a free reinterpretation, as C's memcpy)."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())
    return types.float32(types.int32), codegen


@nb.njit(inline="always", cache=True)
def exp_f32(x):
    """float32 x -> exp(x) as float32, by the method in the module docstring"""
    xc = X_MAX if x > X_MAX else x                     # NaN compares False: stays NaN
    xc = X_MIN if xc < X_MIN else xc
    n = np.floor(xc * LOG2E + np.float32(0.5))         # nearest integer, as a float32
    r = (xc - n * LN2_HI) - n * LN2_LO
    p = np.float32(1.0 / 5040.0)
    p = p * r + np.float32(1.0 / 720.0)
    p = p * r + np.float32(1.0 / 120.0)
    p = p * r + np.float32(1.0 / 24.0)
    p = p * r + np.float32(1.0 / 6.0)
    p = p * r + np.float32(0.5)
    p = p * r + np.float32(1.0)
    p = p * r + np.float32(1.0)
    # exp(r) * 2^n, as 2^n1 * 2^n2 with n1 + n2 = n: n reaches 128 just below X_MAX,
    # one past the largest exponent field, so a single factor could not hold it.
    ni = np.int32(n)
    n1 = ni >> np.int32(1)
    n2 = ni - n1
    y = p * _bits_as_float32((n1 + np.int32(127)) << np.int32(23)) * _bits_as_float32((n2 + np.int32(127)) << np.int32(23))
    y = np.float32(np.inf) if x > X_MAX else y
    return np.float32(0.0) if x < X_MIN else y


@nb.njit(inline="always", cache=True)
def exp_like(x):
    """exp(x) in x's precision: exp_f32 for float32, np.exp for float64."""
    if isinstance(x, np.float32):
        return exp_f32(x)
    return np.exp(x)
