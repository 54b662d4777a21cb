"""Cross-entropy loss over tokens, with ignored positions (labels == -100).

    forward:   loss = (1 / N_c) * sum over counted rows n of ( logsumexp(z_n) - z_n[c_n] )
    backward:  dz_n = dloss / N_c * (softmax(z_n) - onehot(c_n))     counted rows
               dz_n = 0                                               ignored rows

N_c is the number of rows whose label is not `ignore_index`: the mean is over
tokens that count (prompt and padding tokens carry -100), as in PyTorch's
`F.cross_entropy(..., ignore_index=-100, reduction="mean")`. With no counted
row the mean is 0/0 = NaN, again as in PyTorch. The next-token shift
(logits at t predict the label at t + 1) is the model's job, not these ops'.

Two ops share one kernel:
* `CrossEntropyFn` takes logits z (N, V) that already exist.
* `LinearCrossEntropyFn` takes the final hidden states h (N, C) and the lm_head
  weight W (V, C), with z = h Wᵀ formed inside, a block of rows at a time.
  For a language model z is the largest array of training (2 x 128 tokens x
  49152 words is 100 MB; Qwen's 151936 words, 300 MB), and it is only ever
  needed to make the loss and dz. So each block's logits are turned into dz
  in place, right after the loss is read off them, and into dh = dz W and
  dW = dzᵀ h at once; the full (N, V) logits never exist. Rows that are
  not counted (prompt, padding) are skipped before the product. Computing
  the gradient in the forward is exact because the loss is a scalar: the
  backward only multiplies the saved dh and dW by dloss / N_c. The products
  with W are the dispatcher's (kernels/weights.py), whatever W's storage.
  The simple version, cross_entropy(linear(h, W)), is ops/reference.py's
  `linear_cross_entropy`.
"""

import numpy as np

from ..kernels import weights
from ..kernels.cross_entropy import cross_entropy_rows
from ..tensor import Function, Tensor

IGNORE_INDEX = -100
CHUNK_ELEMENTS = 16 << 20   # logits per block in LinearCrossEntropyFn at most: 64 MB in float32
# (blocks are then evened out: 508 rows of SmolLM2 go as 2 x 254, where BLAS runs
# ~20 % faster than at 3 x 170 rows, measured)
# A stored (not dense float) W is widened tile by tile once per block
# (kernels/weights.py), twice counting dh = dz W; with Qwen's 151936 words a
# 64 MB block is 110 rows, and widening all of W ten times costs more than the
# products. So such blocks hold at least this many rows: more memory for the
# block, far fewer widenings.
WIDENED_MIN_ROWS = 256


def _check_labels(labels, N: int, V: int, ignore_index: int) -> np.ndarray:
    """labels, any int array of N entries -> (N,) int64; one clear error for a bad label."""
    labels = np.ascontiguousarray(labels, dtype=np.int64).reshape(-1)
    if labels.shape[0] != N:
        raise ValueError(f"cross_entropy: {labels.shape[0]} labels for {N} rows")
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= V))
    if bad.any():
        raise IndexError(f"cross_entropy: label {labels[bad][0]} outside the vocabulary of {V}")
    return labels


def _block_rows(n: int, V: int, widened: bool) -> int:
    """Rows per block for n counted rows: at most CHUNK_ELEMENTS logits (at least
    WIDENED_MIN_ROWS rows for a W the products widen), in blocks of equal size."""
    cap = max(1, CHUNK_ELEMENTS // V, WIDENED_MIN_ROWS if widened else 1)
    blocks = max(1, -(-n // cap))
    return max(1, -(-n // blocks))


def _mean(total: float, count: int, dtype) -> np.ndarray:
    return np.asarray(total / count if count else np.nan, dtype=dtype)


class CrossEntropyFn(Function):
    """logits (N, V), labels (N,) ints -> mean loss ()"""

    def forward(self, logits, *, labels, ignore_index: int = IGNORE_INDEX):
        N, V = logits.shape
        labels = _check_labels(labels, N, V, ignore_index)
        grad = self.needs_input_grad[0]
        z = np.array(logits, order="C") if grad else np.ascontiguousarray(logits)   # (N, V), becomes dz
        loss, _ = cross_entropy_rows(z, labels, ignore_index, grad)
        count = int(np.count_nonzero(labels != ignore_index))
        self.save_for_backward(z if grad else None, count)
        return _mean(loss.sum(), count, logits.dtype)

    def backward(self, dy):
        dz, count = self.saved
        if not count:                       # nothing counted: no row has a gradient
            return np.zeros_like(dz)
        dz *= dz.dtype.type(float(dy) / count)     # softmax - onehot, times dloss / N_c
        return dz


class LinearCrossEntropyFn(Function):
    """h (N, C), w (V, C) a frozen weight or a float array, labels (N,) ints -> mean loss of
    cross_entropy(h wᵀ, labels) (), without forming the (N, V) logits in full"""

    def forward(self, h, w, *, labels, ignore_index: int = IGNORE_INDEX, chunk_rows: int | None = None):
        need_dh, need_dw = self.needs_input_grad
        (N, C), V = h.shape, w.shape[0]
        if w.shape[1] != C:
            raise ValueError(f"linear_cross_entropy: h has {C} features, weight {w.shape} expects {w.shape[1]}")
        labels = _check_labels(labels, N, V, ignore_index)
        counted = np.flatnonzero(labels != ignore_index)        # (N_c,) rows that count
        hc, yc = np.ascontiguousarray(h[counted]), labels[counted]   # (N_c, C), (N_c,)
        dhc = np.empty_like(hc) if need_dh else None              # (N_c, C)
        dw = np.zeros((V, C), dtype=h.dtype) if need_dw else None
        rows = chunk_rows or _block_rows(len(counted), V, widened=not weights.as_weight(w).dense)
        total = 0.0
        for r0 in range(0, len(counted), rows):
            part = slice(r0, r0 + rows)
            z = weights.linear(hc[part], w)                     # (n, V) logits z = h Wᵀ
            loss, _ = cross_entropy_rows(z, yc[part], ignore_index, need_dh or need_dw)   # z -> dz
            total += loss.sum()
            if need_dh:
                dhc[part] = weights.linear_dx(z, w)             # (n, C)  dh = dz W
            if need_dw:
                dw += z.T @ hc[part]                            # (V, C)  dW = dzᵀ h (a float W only)
            del z                                               # before the next block's logits exist
        count = len(counted)
        self.save_for_backward(counted, dhc, dw, h.shape, count)
        return _mean(total, count, h.dtype)

    def backward(self, dy):
        counted, dhc, dw, h_shape, count = self.saved
        scale = float(dy) / count if count else 0.0             # dloss / N_c; nothing counted: 0
        dh = None
        if dhc is not None:
            dh = np.zeros(h_shape, dtype=dhc.dtype)
            dh[counted] = dhc * dhc.dtype.type(scale)           # ignored rows stay 0
        if dw is not None:
            dw *= dw.dtype.type(scale)
        return dh, dw


def cross_entropy(logits: Tensor, labels: np.ndarray, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """logits (..., V), labels (...) ints -> mean loss over labels != ignore_index ()"""
    return CrossEntropyFn.apply(logits.reshape(-1, logits.shape[-1]), labels=np.asarray(labels).reshape(-1),
                              ignore_index=ignore_index)


def linear_cross_entropy(h: Tensor, weight: Tensor, labels: np.ndarray, ignore_index: int = IGNORE_INDEX,
                         chunk_rows: int | None = None) -> Tensor:
    """h (..., C), weight (V, C), labels (...) ints -> mean loss of cross_entropy(h weightᵀ, labels) ()"""
    return LinearCrossEntropyFn.apply(h.reshape(-1, h.shape[-1]), weight, labels=np.asarray(labels).reshape(-1),
                                    ignore_index=ignore_index, chunk_rows=chunk_rows)
