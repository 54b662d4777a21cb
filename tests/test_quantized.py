"""NF4, F16 and `--quantize` as frozen weights: bytes and values against bitsandbytes and the `gguf` package.

bitsandbytes (the reference extra, installed --no-deps after torch) is the oracle for NF4; without it those
tests skip and the NumPy reference below still checks the kernels.
"""

import gguf.quants as gguf_quants
import numpy as np
import pytest
from gguf import GGMLQuantizationType
from helpers import assert_close, assert_gradcheck

from tinylora import Tensor, gradcheck
from tinylora.kernels import nf4
from tinylora.kernels import quantized as Q
from tinylora.kernels import weights as W
from tinylora.ops.linear import LinearFn

# Shapes: a row length that is a whole number of blocks (the checkpoints people have), one whose blocks
# straddle rows (96 = 1.5 blocks), and an odd element count (a byte straddles two rows).
SHAPES = [(6, 128), (5, 96), (3, 37)]


def weights(shape, seed=0, std=0.05):
    w = np.random.default_rng(seed).standard_normal(shape).astype(np.float32) * std
    w[0, :3] = 0.0                      # an exact zero and
    if shape[0] > 2:
        w[2, :] = 0.0                   # an all-zero row (absmax 0: bitsandbytes floors it at 1e-38)
    return w


def nf4_reference(packed, absmax, shape, blocksize):
    """NumPy's own NF4 dequantisation: codes high nibble first, NF4[q] · absmax of the block."""
    n = shape[0] * shape[1]
    codes = np.stack([packed >> 4, packed & 0xF], axis=-1).reshape(-1)[:n]
    return (nf4.NF4[codes] * np.repeat(absmax, blocksize)[:n]).reshape(shape)


def bnb():
    return pytest.importorskip("bitsandbytes.functional", reason="bitsandbytes (reference extra) not installed")


@pytest.mark.parametrize("shape", SHAPES)
def test_nf4_quantisation_gives_bitsandbytes_bytes(shape):
    F = bnb()
    import torch
    w = weights(shape)
    ours = Q.NF4Weight.quantize(w)
    packed, state = F.quantize_4bit(torch.from_numpy(w), blocksize=64, quant_type="nf4")
    assert np.array_equal(ours.packed, packed.numpy().reshape(-1))
    assert np.array_equal(ours.absmax.view(np.uint32), state.absmax.numpy().view(np.uint32))
    theirs = F.dequantize_4bit(packed, state).numpy()
    mine = ours.to_float()
    assert np.array_equal(mine, nf4_reference(ours.packed, ours.absmax, shape, 64))
    if shape[1] % 64 and shape[1] % 2 == 0 and not np.array_equal(mine, theirs):
        # bitsandbytes' AVX-512 CPU kernel takes each row's blocks to start at the row (true of every
        # real checkpoint: rows are whole blocks), so where blocks straddle rows it applies the wrong
        # scales and does not invert its own quantisation (its AVX2 path does, and matches exactly);
        # ours follows the flat layout it writes
        assert np.abs(mine - w).max() < np.abs(theirs - w).max()
        return
    assert np.array_equal(mine.view(np.uint32), theirs.view(np.uint32))


@pytest.mark.parametrize("shape", [(6, 128), (40, 256)])
def test_nf4_double_quantised_dequantises_as_bitsandbytes(shape):
    F = bnb()
    import torch
    w = weights(shape, seed=3)
    packed, state = F.quantize_4bit(torch.from_numpy(w), blocksize=64, quant_type="nf4", compress_statistics=True)
    s2 = state.state2
    ours = Q.NF4Weight(packed.numpy(), state.absmax.numpy(), shape, 64,
                       nested=(s2.code.numpy(), s2.absmax.numpy(), s2.blocksize, state.offset.item()))
    theirs = F.dequantize_4bit(packed, state).numpy()
    assert ours.nested and ours.absmax.dtype == np.uint8
    assert np.array_equal(ours.to_float().view(np.uint32), theirs.view(np.uint32))
    assert np.array_equal(ours.rows(3, 5).view(np.uint32), theirs[3:5].view(np.uint32))


@pytest.mark.parametrize("shape", SHAPES)
def test_nf4_rows_gather_and_gemv_against_numpy(shape):
    w = weights(shape, seed=1)
    q = Q.NF4Weight.quantize(w)
    ref = nf4_reference(q.packed, q.absmax, shape, 64)
    assert np.array_equal(q.to_float(), ref)
    assert np.array_equal(q.rows(1, 3), ref[1:3])
    ids = np.array([[2, 0], [1, 2]])
    assert np.array_equal(q.gather(ids), ref[ids])
    assert np.abs(ref - w).max() <= np.abs(w).max() * 0.2          # NF4's widest gap is 0.30 of absmax
    assert q.nbytes == q.packed.nbytes + q.absmax.nbytes and q.storage == "nf4"
    rng = np.random.default_rng(2)
    for N in (1, 3, 7):
        x = rng.standard_normal((N, shape[1])).astype(np.float32)
        bias = rng.standard_normal(shape[0]).astype(np.float32)
        expected = x.astype(np.float64) @ ref.T.astype(np.float64) + bias
        scale = np.abs(x) @ np.abs(ref).T + 1e-30
        for kernel in (nf4.gemv_nf4.serial, nf4.gemv_nf4.parallel, nf4.few_nf4.serial, nf4.few_nf4.parallel):
            y = kernel(x, q.packed, q.absmax, q.code2, q.absmax2, q.blocksize2, q.offset, q.blocksize,
                       shape[0], nf4.NF4, bias)
            assert (np.abs(y - expected) <= 1e-5 * scale + 1e-6).all()


def test_nf4_gemv_propagates_nan_and_inf():
    w = weights((4, 128), seed=4)
    q = Q.NF4Weight.quantize(w)
    q.absmax[1] = np.inf                # row 0's second block
    q.absmax[4] = np.nan                # row 2's first block
    for y in (q.gemv(np.ones((1, 128), np.float32)), q.few(np.ones((5, 128), np.float32))):
        assert not np.isfinite(y[:, 0]).any() and np.isnan(y[:, 2]).all() and np.isfinite(y[:, [1, 3]]).all()


def test_linear_through_nf4_has_exact_gradients_and_none_for_the_weight():
    # the dequantised weights are exact in float64, so the product's gradient checks in float64
    w = Q.NF4Weight.quantize(weights((6, 128), seed=5))
    rng = np.random.default_rng(6)
    x = Tensor(rng.standard_normal((3, 128)), requires_grad=True)
    assert_gradcheck(gradcheck(lambda x: LinearFn.apply(x, Tensor(w)), [x]), "NF4 linear")
    y = LinearFn.apply(Tensor(x.data.astype(np.float32)), Tensor(w))
    assert_close(y.data, x.data.astype(np.float32) @ w.to_float().T, 1e-5, "NF4 linear, float32 tiles")
    assert [W.linear_path(w, N, np.float32) for N in (1, 5, W.FEW_N + 1)] == ["gemv", "few", "tiles"]


@pytest.mark.parametrize("kind", ["q8_0", "q4_0"])
def test_q8_0_and_q4_0_quantisation_gives_gguf_bytes(kind):
    w = weights((8, 96), seed=7)
    w[1, 5] = -w[1].max() * 3           # a negative extreme: Q4_0's scale keeps its sign
    ours = Q.quantize(w, kind)
    theirs = gguf_quants.quantize(w, GGMLQuantizationType[kind.upper()])
    assert isinstance(ours, Q.GGMLWeight) and ours.storage == kind
    assert np.array_equal(ours.blocks, theirs)


def test_quantize_refuses_what_it_cannot_hold():
    with pytest.raises(ValueError, match="model.layers.0.mlp.up_proj.weight: rows of 37"):
        Q.quantize(weights((3, 37)), "q8_0", "model.layers.0.mlp.up_proj.weight")
    bad = weights((2, 64))
    bad[1, 1] = np.nan
    with pytest.raises(ValueError, match="lm_head.weight: holds NaN"):
        Q.quantize(bad, "nf4", "lm_head.weight")
    with pytest.raises(ValueError, match="must be one of nf4, q8_0, q4_0"):
        Q.quantize(bad, "q2_k")


def test_f16_weight_widens_exactly():
    halves = np.random.default_rng(8).standard_normal((4, 32)).astype(np.float16)
    halves[0, :4] = [np.inf, -np.inf, np.nan, 6e-8]          # infinities, NaN, a subnormal
    w = Q.F16Weight(halves.view(np.uint16))
    assert np.array_equal(w.to_float(), halves.astype(np.float32), equal_nan=True)
    assert np.array_equal(w.gather(np.array([3, 1])), halves[[3, 1]].astype(np.float32))
    assert w.nbytes == halves.nbytes and w.storage == "float16"
