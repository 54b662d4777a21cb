"""Shared test helpers: comparisons that say how far off and where."""

import numpy as np

# Tolerances, each with its reason.
F64_TOL = 1e-12   # two float64 computations of the same sums in different orders
F32_TOL = 2e-5    # float32 kernels vs a float64 reference: ~7 significant digits, sums of ~1e3 terms
GRAD_RTOL = 1e-6  # SPEC §3.2: analytic vs finite-difference gradients, float64


def assert_close(actual, expected, tol: float, what: str = "value") -> None:
    """Assert |actual - expected| <= tol * max(1, |expected|) elementwise.

    On failure the message gives the max error, its index and both values.
    NaN must match NaN and inf must match inf of the same sign.
    """
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != expected {expected.shape}"
    same_nonfinite = (np.isnan(actual) & np.isnan(expected)) | (np.isinf(actual) & (actual == expected))
    with np.errstate(invalid="ignore"):               # inf - inf is NaN; those places are masked next
        err = np.where(same_nonfinite, 0.0, np.abs(actual - expected) / np.maximum(1.0, np.abs(expected)))
    err = np.where(np.isnan(err), np.inf, err)
    if err.size and err.max() > tol:
        i = np.unravel_index(np.argmax(err), err.shape)
        raise AssertionError(f"{what}: max error {err.max():.3e} > {tol:.1e} at index {tuple(int(j) for j in i)}: "
                             f"got {actual[i]!r}, expected {expected[i]!r}")


def tol_for(dtype) -> float:
    return F64_TOL if np.dtype(dtype) == np.float64 else F32_TOL


def assert_gradcheck(result, title: str = "") -> None:
    """Assert a tinylora.gradcheck result passed; print its table on failure."""
    assert result.ok, "\n" + result.table(title)


def assert_abs_close(actual, expected, atol: float, what: str = "value") -> float:
    """Assert max |actual - expected| <= atol (absolute, whatever the magnitude); returns the max error."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != expected {expected.shape}"
    err = np.abs(actual - expected)
    worst = float(np.nanmax(err)) if err.size else 0.0
    if np.isnan(err).any() or worst > atol:
        i = np.unravel_index(np.nanargmax(err) if not np.isnan(err).all() else 0, err.shape)
        raise AssertionError(f"{what}: max abs error {worst:.3e} > {atol:.1e} at index {tuple(int(j) for j in i)}: "
                             f"got {actual[i]!r}, expected {expected[i]!r}")
    return worst
