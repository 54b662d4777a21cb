"""Cross-entropy loss over tokens, with ignored positions (labels == -100).

    forward:   loss = (1 / N_c) * sum over counted rows n of ( logsumexp(z_n) - z_n[c_n] )
    backward:  dz_n = dloss / N_c * (softmax(z_n) - onehot(c_n))     counted rows
               dz_n = 0                                               ignored rows

N_c is the number of rows whose label is not `ignore_index`: the mean is over
tokens that count (prompt and padding tokens carry -100), as in PyTorch's
`F.cross_entropy(..., ignore_index=-100, reduction="mean")`. With no counted
row the mean is 0/0 = NaN, again as in PyTorch. The next-token shift
(logits at t predict the label at t + 1) is the model's job, not this op's.
"""

import numpy as np

from ..kernels.cross_entropy import cross_entropy_backward, cross_entropy_forward
from ..tensor import Function, Tensor

IGNORE_INDEX = -100


class CrossEntropy(Function):
    """logits (N, V), labels (N,) ints -> mean loss ()"""

    def forward(self, logits, *, labels, ignore_index: int = IGNORE_INDEX):
        labels = np.ascontiguousarray(labels, dtype=np.int64).reshape(-1)
        N, V = logits.shape
        if labels.shape[0] != N:
            raise ValueError(f"cross_entropy: {labels.shape[0]} labels for {N} rows of logits")
        bad = (labels != ignore_index) & ((labels < 0) | (labels >= V))
        if bad.any():
            raise IndexError(f"cross_entropy: label {labels[bad][0]} outside the vocabulary of {V}")
        logits = np.ascontiguousarray(logits)
        loss, lse = cross_entropy_forward(logits, labels, ignore_index)
        count = int(np.count_nonzero(labels != ignore_index))
        self.save_for_backward(logits, labels, lse, count, ignore_index)
        mean = loss.sum() / count if count else np.nan
        return np.asarray(mean, dtype=logits.dtype)

    def backward(self, dy):
        logits, labels, lse, count, ignore_index = self.saved
        scale = float(dy) / count if count else np.nan
        return cross_entropy_backward(logits, labels, lse, ignore_index, scale)


def cross_entropy(logits: Tensor, labels: np.ndarray, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """logits (..., V), labels (...) ints -> mean loss over labels != ignore_index ()"""
    return CrossEntropy.apply(logits.reshape(-1, logits.shape[-1]), labels=np.asarray(labels).reshape(-1),
                              ignore_index=ignore_index)
