"""llama.cpp's block formats as frozen weights: widening bit-identical to the `gguf` package, products through them."""

import gguf.quants as gguf_quants
import numpy as np
import pytest
from gguf import GGMLQuantizationType
from helpers import assert_close, assert_gradcheck, tol_for

from tinylora import Tensor, gradcheck
from tinylora.kernels import ggml
from tinylora.kernels import quantized as Q
from tinylora.kernels import weights as W
from tinylora.ops.linear import LinearFn

TYPES = list(ggml.BLOCK_BYTES)
# float16 bit patterns a scale may hold: zeros, subnormals, the largest finite, infinities, NaNs with payloads
SPECIAL_HALVES = [0x0000, 0x8000, 0x0001, 0x03FF, 0x8200, 0x7BFF, 0x7C00, 0xFC00, 0x7E00, 0x7C01, 0xFFFF]


def random_blocks(qtype: str, O: int, I: int, seed: int = 0, special: bool = True, std: float = 0.02) -> np.ndarray:
    """(O, row bytes) uint8: any bytes are a valid block; float16 scales set to every special value."""
    rng = np.random.default_rng(seed)
    size = ggml.BLOCK_BYTES[qtype]
    blocks = rng.integers(0, 256, size=(O, I // ggml.BLOCK_WEIGHTS[qtype], size), dtype=np.uint8)
    # ordinary scales first (random bytes would give huge or NaN halves half the time) ...
    for at in ggml.SCALES_AT[qtype]:
        blocks[..., at:at + 2] = (rng.standard_normal(blocks.shape[:2]) * std).astype(np.float16)[..., None].view(np.uint8)
    # ... then the special ones, on the first blocks (d) and the last ones (m or dmin)
    flat = blocks.reshape(-1, size)
    for i, bits in enumerate(SPECIAL_HALVES if special else []):
        for k, at in enumerate(ggml.SCALES_AT[qtype]):
            flat[i if k == 0 else len(flat) - 1 - i, at:at + 2] = np.array([bits], dtype=np.uint16).view(np.uint8)
    return blocks.reshape(O, -1)


def reference(blocks: np.ndarray, qtype: str) -> np.ndarray:
    """The `gguf` package's own NumPy dequantisation (inf · 0 = NaN is what it should give: no warning)."""
    with np.errstate(invalid="ignore", over="ignore"):
        return gguf_quants.dequantize(blocks, GGMLQuantizationType[qtype])


@pytest.mark.parametrize("qtype", TYPES)
def test_widening_is_bit_identical_to_gguf(qtype):
    blocks = random_blocks(qtype, O=6, I=512)
    w = Q.GGMLWeight(blocks, qtype, (6, 512))
    ours, theirs = w.to_float(), reference(blocks, qtype)
    assert ours.dtype == theirs.dtype == np.float32 and ours.shape == theirs.shape
    assert np.array_equal(ours.view(np.uint32), theirs.view(np.uint32))        # NaN payloads and signed zeros too
    assert np.isnan(ours).any() and np.isinf(ours).any()                       # the special scales did reach it
    ids = np.array([[5, 0], [2, 5]])
    assert np.array_equal(w.gather(ids).view(np.uint32), theirs[ids].view(np.uint32))
    assert np.array_equal(w.rows(2, 5).view(np.uint32), theirs[2:5].view(np.uint32))
    assert w.nbytes == blocks.nbytes and w.size == 6 * 512 and w.storage == qtype.lower()
    simple = np.empty_like(ours)                # the weight-by-weight definition the vector IR replaced
    ggml.widen_rows_simple(blocks, ggml.KINDS[qtype], np.arange(6), simple, ggml.HALF)
    assert np.array_equal(simple.view(np.uint32), theirs.view(np.uint32))


@pytest.mark.parametrize("qtype", [t for t in TYPES if not t.endswith("_K")])   # gguf quantises these only
def test_quantised_bytes_of_real_values_round_trip_through_gguf(qtype):
    # blocks made by gguf's own quantiser from ordinary weights (what a real file holds)
    x = np.random.default_rng(1).standard_normal((8, 96)).astype(np.float32) * 0.05
    blocks = gguf_quants.quantize(x, GGMLQuantizationType[qtype])
    w = Q.GGMLWeight(blocks, qtype, x.shape)
    assert np.array_equal(w.to_float(), reference(blocks, qtype))
    assert np.abs(w.to_float() - x).max() < 0.05 * 0.3                          # and it is x, quantised


def finite_weight(qtype: str, O: int, I: int) -> tuple[Q.GGMLWeight, np.ndarray]:
    if qtype.endswith("_K"):                              # random blocks with ordinary scales
        blocks = random_blocks(qtype, O, I, seed=2, special=False, std=0.0005)   # weights ~0.1
    else:                                                 # gguf's own quantisation of ordinary weights
        x = np.random.default_rng(2).standard_normal((O, I)).astype(np.float32) * 0.1
        blocks = gguf_quants.quantize(x, GGMLQuantizationType[qtype])
    w = Q.GGMLWeight(blocks, qtype, (O, I))
    return w, w.to_float()


@pytest.mark.parametrize("qtype", TYPES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("N", [1, 3, 40, W.FEW_N + 1])
def test_products_equal_those_with_the_dequantised_matrix(qtype, dtype, N):
    w, dense = finite_weight(qtype, O=80, I=256)
    rng = np.random.default_rng(3)
    x, dy, bias = (rng.standard_normal((N, 256)).astype(dtype), rng.standard_normal((N, 80)).astype(dtype),
                   rng.standard_normal(80).astype(dtype))
    path = ("gemv" if N <= W.SMALL_N else "few" if N <= W.FEW_N else "tiles") if dtype == np.float32 else "widen-all"
    assert W.linear_path(w, N, dtype) == path
    assert_close(W.linear(x, w, bias), x.astype(np.float64) @ dense.T + bias, tol_for(dtype), "x Wᵀ + b")
    assert_close(W.linear_dx(dy, w), dy.astype(np.float64) @ dense, tol_for(dtype), "dy W")
    assert W.linear(x, w).dtype == dtype


def decoding_case(qtype: str, N: int, seed: int, special: bool):
    """blocks (70, I) of qtype with I several blocks long (an odd number of the 32-weight ones), x (N, I), bias,
    and the product through the gguf package's dequantised weights in float64 with Σ |x_k w_k| per output."""
    I = 3 * 256 if qtype.endswith("_K") else 11 * 32
    blocks = random_blocks(qtype, O=70, I=I, seed=seed, special=special)       # specials: first and last rows
    dense = reference(blocks, qtype).astype(np.float64)
    rng = np.random.default_rng(seed + 1)
    x, bias = rng.standard_normal((N, I)).astype(np.float32), rng.standard_normal(70).astype(np.float32)
    with np.errstate(invalid="ignore", over="ignore"):
        return blocks, x, bias, x.astype(np.float64) @ dense.T, np.abs(x.astype(np.float64)) @ np.abs(dense).T


@pytest.mark.parametrize("qtype", TYPES)
@pytest.mark.parametrize("N", [1, 2, 3, 4])
@pytest.mark.parametrize("compiled", ["serial", "parallel"])
def test_decoding_gemv_on_blocks_is_the_product_with_the_widened_weights(qtype, N, compiled):
    # gemv_blocks sums the integer codes against x and scales each block's sum once: float32 sums in
    # another order than x · widen(W), so held to float32 accuracy relative to Σ |x_k w_k| (+ |bias|)
    blocks, x, bias, expected, magnitude = decoding_case(qtype, N, seed=5, special=False)
    kernel = getattr(ggml.gemv_blocks, compiled)
    widened = getattr(ggml.gemv_widened, compiled)                 # the simple version it replaced
    for b in (None, bias):
        want = expected if b is None else expected + b
        tol = 1e-5 * (magnitude + (0.0 if b is None else np.abs(b))) + 1e-30
        for name, got in (("gemv_blocks", kernel(x, blocks, ggml.KINDS[qtype], ggml.HALF, b)),
                          ("gemv_widened", widened(x, blocks, ggml.KINDS[qtype], ggml.HALF, b))):
            assert got.dtype == np.float32 and got.shape == (N, 70)
            worst = np.unravel_index(np.argmax(np.abs(got - want) / tol), tol.shape)
            assert (np.abs(got - want) <= tol).all(), (f"{name} {qtype} N={N}: error {abs(got - want)[worst]:.2e} "
                                                       f"> {tol[worst]:.2e} at {worst}")


@pytest.mark.parametrize("qtype", TYPES)
@pytest.mark.parametrize("N", [5, 8, 13])
@pytest.mark.parametrize("compiled", ["serial", "parallel"])
def test_few_rows_product_is_the_product_with_the_widened_weights(qtype, N, compiled):
    # few_blocks: 4 widened rows against 2 rows of x at a time; 70 rows (a partial last 4), odd N
    blocks, x, bias, expected, magnitude = decoding_case(qtype, N, seed=9, special=False)
    kernel = getattr(ggml.few_blocks, compiled)
    for b in (None, bias):
        want = expected if b is None else expected + b
        tol = 1e-5 * (magnitude + (0.0 if b is None else np.abs(b))) + 1e-30
        got = kernel(x, blocks, ggml.KINDS[qtype], ggml.HALF, b)
        assert got.dtype == np.float32 and got.shape == (N, 70)
        assert (np.abs(got - want) <= tol).all(), f"few_blocks {qtype} N={N}: {np.abs(got - want).max():.2e}"


@pytest.mark.parametrize("qtype", TYPES)
@pytest.mark.parametrize("compiled", ["serial", "parallel"])
@pytest.mark.parametrize("name, N", [("gemv_blocks", 2), ("few_blocks", 6)])
def test_decoding_products_propagate_nan_and_inf_scales(qtype, compiled, name, N):
    blocks, x, bias, expected, magnitude = decoding_case(qtype, N, seed=7, special=True)
    kernel = getattr(getattr(ggml, name), compiled)
    got = kernel(x, blocks, ggml.KINDS[qtype], ggml.HALF, bias)
    expected = expected + bias
    # a NaN or inf scale spoils its row and only it; d · Σ x_j q_j may give NaN where Σ x_j (d q_j) gives
    # inf or the reverse (inf · 0 falls elsewhere), so finiteness must match, and a NaN scale gives NaN
    assert np.array_equal(np.isfinite(got), np.isfinite(expected))
    nan_scale = np.isnan(ggml.block_scales(blocks, qtype)).any(axis=(1, 2))
    assert nan_scale.any() and np.isnan(got[:, nan_scale]).all()
    finite = np.isfinite(expected)
    assert finite.sum() > 100 and (~finite).any()
    tol = 1e-5 * (magnitude + np.abs(bias)) + 1e-30
    assert (np.abs(got - expected)[finite] <= tol[finite]).all()


def test_a_quantised_base_gets_no_gradient_and_passes_gradcheck():
    w, dense = finite_weight("Q4_1", O=12, I=64)
    x = Tensor(np.random.default_rng(4).standard_normal((3, 64)), requires_grad=True)
    result = gradcheck(lambda x: LinearFn.apply(x, Tensor(w)), [x])
    assert_gradcheck(result, "linear through Q4_1 blocks")
    with pytest.raises(Exception, match="frozen"):
        Tensor(w, requires_grad=True)


def test_bad_blocks_are_refused_in_one_line():
    with pytest.raises(TypeError, match="Q4_0 blocks for \\(4, 64\\) must be \\(4, 36\\) uint8"):
        Q.GGMLWeight(np.zeros((4, 35), dtype=np.uint8), "Q4_0", (4, 64))
    with pytest.raises(TypeError, match="unknown block type 'Q2_K'"):
        Q.GGMLWeight(np.zeros((4, 36), dtype=np.uint8), "Q2_K", (4, 64))


@pytest.mark.slow
def test_real_smollm2_q4_1_tensors_widen_like_gguf(smollm2_gguf):
    from gguf import GGUFReader
    reader = GGUFReader(smollm2_gguf)
    seen = 0
    for t in reader.tensors:
        if t.tensor_type.name not in ggml.BLOCK_BYTES:
            continue
        O, I = int(t.shape[1]), int(t.shape[0])                   # GGUF lists dimensions innermost first
        blocks = np.asarray(t.data).reshape(O, -1)
        ours = Q.GGMLWeight(blocks, t.tensor_type.name, (O, I)).to_float()
        assert np.array_equal(ours.view(np.uint32), reference(blocks, t.tensor_type.name).view(np.uint32)), t.name
        seen += 1
    assert seen > 100                                              # the file's Q4_1 (and fall-back) matrices
