"""A gradient check for every op: the catalogue `tinylora gradcheck` prints.

Each case builds small float64 inputs with awkward shapes (non-square, a
length-1 axis, broadcasting, padding, a KV-cache offset) and a function of
them; `tinylora.gradcheck` then compares the op's backward with finite
differences. The test suite runs the same catalogue (tests/test_ops.py) and
also checks that every `Function` subclass in `tinylora.ops` appears here, so
a new op cannot land without its gradient check.

The model-level check (LoRA on a tiny random model) is not here: it needs the
model, which sits above the ops.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..nn import Module
from ..ops.attention import CausalAttentionFn, attention
from ..ops.checkpoint import CheckpointFn, checkpoint
from ..ops.cross_entropy import CrossEntropyFn, LinearCrossEntropyFn, cross_entropy, linear_cross_entropy
from ..ops.dropout import DropoutFn, dropout
from ..ops.elementwise import AddFn, MulFn, SiLUFn
from ..ops.embedding import EmbeddingFn, embedding
from ..ops.linear import LinearFn, MatMulFn, linear
from ..ops.lora import LoraLinearFn
from ..ops.reduce import MeanFn, SoftmaxFn, SumFn
from ..ops.rmsnorm import RMSNormFn, rms_norm
from ..ops.rope import RoPEFn, rope, rope_inv_freq, rope_tables
from ..ops.shape import ConcatFn, ReshapeFn, SliceFn, TransposeFn, concat
from ..ops.swiglu import SwiGLUFn, swiglu
from ..tensor import Tensor
from .checker import RTOL, GradcheckResult, gradcheck


@dataclass
class OpCase:
    name: str
    functions: tuple[type, ...]                                   # the Function classes exercised
    build: Callable[[np.random.Generator], tuple[Callable, list[Tensor], list[str]]]


def _t(rng: np.random.Generator, *shape: int) -> Tensor:
    """A trainable float64 tensor of standard-normal values."""
    return Tensor(rng.standard_normal(shape), requires_grad=True)


def _attention_case(rng):
    # B=2, T=3 new queries against S=5 keys (2 cached), H=4 heads sharing K=2 kv heads, D=6;
    # the second sequence ends in one padding key.
    q, k, v = _t(rng, 2, 3, 4, 6), _t(rng, 2, 5, 2, 6), _t(rng, 2, 5, 2, 6)
    mask = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]])
    return (lambda q, k, v: attention(q, k, v, key_mask=mask)), [q, k, v], ["q", "k", "v"]


def _packed_attention_case(rng):
    # Packing: row 0 holds three examples (segment ids 1, 2, 3) and a padding key, row 1 two;
    # each query attends only within its own example.
    q, k, v = _t(rng, 2, 7, 4, 6), _t(rng, 2, 7, 2, 6), _t(rng, 2, 7, 2, 6)
    mask = np.array([[1, 1, 2, 2, 2, 3, 0], [1, 1, 1, 2, 2, 2, 2]])
    return (lambda q, k, v: attention(q, k, v, key_mask=mask)), [q, k, v], ["q", "k", "v"]


class _Block(Module):
    """A small layer with two trainable tensors, to checkpoint: x (..., 5) -> (..., 4)."""

    def __init__(self, w: Tensor, v: Tensor):
        self.w, self.v = w, v                                     # (4, 5), (5,)

    def __call__(self, x):
        return swiglu(linear(x, self.w), linear(rms_norm(x, self.v, 1e-6), self.w))


def _checkpoint_case(rng):
    # the block's tensors reach their gradients only through the recomputation in the backward
    return (lambda x, w, v: checkpoint(_Block(w, v), x)), [_t(rng, 2, 3, 5), _t(rng, 4, 5), _t(rng, 5)], ["x", "w", "v"]


def _rope_case(rng):
    # positions 4..6: a block of 3 new tokens after a 4-token KV cache
    cos, sin = rope_tables(np.arange(4, 7), rope_inv_freq(6, 10000.0), np.float64)
    return (lambda x: rope(x, cos, sin)), [_t(rng, 2, 3, 2, 6)], ["x"]


def _cross_entropy_case(rng):
    labels = np.array([3, -100, 0, 10, -100, 7, 2])               # 2 of 7 rows ignored
    return (lambda z: cross_entropy(z, labels)), [_t(rng, 7, 11)], ["logits"]


def _linear_cross_entropy_case(rng):
    # blocks of 2 rows, so the 5 counted rows span three blocks; h and W both trainable
    labels = np.array([3, -100, 0, 10, -100, 7, 2])
    return ((lambda h, w: linear_cross_entropy(h, w, labels, chunk_rows=2)),
            [_t(rng, 7, 5), _t(rng, 11, 5)], ["h", "w"])


def _dropout_case(rng):
    # the generator is rebuilt on every call, so each evaluation draws the same mask
    return (lambda x: dropout(x, 0.3, np.random.default_rng(7))), [_t(rng, 4, 5)], ["x"]


def _lora_case(rng):
    # x (2, 3, 5) through a frozen W (4, 5) + bias, rank 2, with a fixed dropout mask on the bypass.
    # B is non-zero: with B = 0 (LoRA's start) dA would be exactly zero and the check vacuous.
    w, bias = Tensor(rng.standard_normal((4, 5))), Tensor(rng.standard_normal(4))
    keep = (rng.random((2, 3, 5)) >= 0.25) / 0.75
    return ((lambda x, a, b: LoraLinearFn.apply(x, w, a, b, bias, scale=1.5, keep=keep)),
            [_t(rng, 2, 3, 5), _t(rng, 2, 5), _t(rng, 4, 2)], ["x", "A", "B"])


def _embedding_case(rng):
    ids = np.array([[1, 4, 1], [0, 6, 4]])                       # repeated ids: scatter-add
    return (lambda w: embedding(ids, w)), [_t(rng, 7, 5)], ["W"]


CASES: list[OpCase] = [
    OpCase("add (broadcast)", (AddFn,), lambda r: (lambda a, b: a + b, [_t(r, 2, 3, 4), _t(r, 4)], ["a", "b"])),
    OpCase("mul (broadcast)", (MulFn,), lambda r: (lambda a, b: a * b, [_t(r, 2, 1, 4), _t(r, 3, 1)], ["a", "b"])),
    OpCase("silu", (SiLUFn,), lambda r: (lambda x: SiLUFn.apply(x), [_t(r, 3, 5)], ["x"])),
    OpCase("matmul (batched)", (MatMulFn,), lambda r: (lambda a, b: a @ b, [_t(r, 2, 3, 5), _t(r, 5, 4)], ["a", "b"])),
    OpCase("linear + bias", (LinearFn,),
           lambda r: (lambda x, w, b: linear(x, w, b), [_t(r, 2, 3, 5), _t(r, 4, 5), _t(r, 4)], ["x", "W", "b"])),
    OpCase("lora linear (dropout)", (LoraLinearFn,), _lora_case),
    OpCase("reshape", (ReshapeFn,), lambda r: (lambda x: x.reshape(6, 4), [_t(r, 2, 3, 4)], ["x"])),
    OpCase("transpose", (TransposeFn,), lambda r: (lambda x: x.transpose(1, 2, 0), [_t(r, 2, 3, 4)], ["x"])),
    OpCase("slice", (SliceFn,), lambda r: (lambda x: x[:, 1:, ::2], [_t(r, 2, 3, 5)], ["x"])),
    OpCase("concat", (ConcatFn,), lambda r: (lambda a, b: concat([a, b], axis=1), [_t(r, 2, 1, 3), _t(r, 2, 4, 3)],
                                           ["a", "b"])),
    OpCase("sum (axis 1)", (SumFn,), lambda r: (lambda x: x.sum(axis=1), [_t(r, 2, 3, 4)], ["x"])),
    OpCase("mean (keepdims)", (MeanFn,), lambda r: (lambda x: x.mean(axis=-1, keepdims=True), [_t(r, 3, 5)], ["x"])),
    OpCase("softmax", (SoftmaxFn,), lambda r: (lambda x: SoftmaxFn.apply(x), [_t(r, 3, 7)], ["x"])),
    OpCase("embedding", (EmbeddingFn,), _embedding_case),
    OpCase("rmsnorm", (RMSNormFn,), lambda r: (lambda x, w: rms_norm(x, w, 1e-6), [_t(r, 2, 3, 5), _t(r, 5)],
                                             ["x", "w"])),
    OpCase("rope (offset 4)", (RoPEFn,), _rope_case),
    OpCase("swiglu", (SwiGLUFn,), lambda r: (lambda g, u: swiglu(g, u), [_t(r, 2, 3, 5), _t(r, 2, 3, 5)], ["g", "u"])),
    OpCase("attention (GQA, pad, cache)", (CausalAttentionFn,), _attention_case),
    OpCase("attention (packed rows)", (CausalAttentionFn,), _packed_attention_case),
    OpCase("cross-entropy (-100)", (CrossEntropyFn,), _cross_entropy_case),
    OpCase("lm_head + cross-entropy", (LinearCrossEntropyFn,), _linear_cross_entropy_case),
    OpCase("dropout (p=0.3)", (DropoutFn,), _dropout_case),
    OpCase("checkpointed block", (CheckpointFn,), _checkpoint_case),
]


def check_case(case: OpCase, seed: int = 0) -> GradcheckResult:
    fn, inputs, names = case.build(np.random.default_rng(seed))
    return gradcheck(fn, inputs, names=names, seed=seed)


def run_all(seed: int = 0, verbose: bool = False) -> bool:
    """Check every op, print a table (one line per op, or every number if verbose); True if all pass."""
    all_ok = True
    if not verbose:
        print(f"{'op':<30} {'checks':>6}  {'max abs err':>11}  {'max rel err':>11}  result")
    for case in CASES:
        result = check_case(case, seed)
        all_ok &= result.ok
        if verbose:
            print(result.table(f"\n== {case.name} =="))
        else:
            print(f"{case.name:<30} {len(result.checks):>6}  {result.max_abs_error:>11.2e}  "
                  f"{result.max_rel_error:>11.2e}  {'ok' if result.ok else 'FAILED'}")
    print(f"\n{len(CASES)} ops, bound: relative error <= {RTOL:.0e} in float64: "
          f"{'all ok' if all_ok else 'FAILURES'}")
    return all_ok
