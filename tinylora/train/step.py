"""One optimiser step, and one pass of evaluation: the two things training does to the model.

    train_step:  for each of grad_accum micro-batches:   loss = model.loss(ids, labels, mask);  loss.backward()
                 g ← g / grad_accum                  (the mean of the micro-batches' mean losses, as mlx-lm;
                                                      each micro-batch weighs the same, whatever its token count)
                 clip g to a global L2 norm of grad_clip
                 AdamW update of every A and B at this step's learning rate;  g ← None
    evaluate:    the mean loss per counted token over some batches, no dropout, no graph

Everything around a step (the schedule, reports, evaluation every N steps,
checkpoints, resuming) is the trainer's (trainer.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

from ..errors import TinyloraError
from ..optim import AdamW, clip_grad_norm, grad_norm, scale_grads
from ..tensor import Tensor, no_grad
from .data import Batch, TokenizedSplit, count_targets, iterate_batches


class NonFinite(TinyloraError):
    """A loss or gradient norm that is NaN or inf: this step cannot be taken (the update would be garbage)."""


@dataclass
class StepResult:
    loss: float          # the mean of the micro-batches' mean losses
    grad_norm: float     # the global L2 norm of the gradients, before clipping
    tokens: int          # counted (trained) tokens in the step's micro-batches


def train_step(model, batches: Iterator[Batch], params: list[tuple[str, Tensor]], optimizer: AdamW, lr: float,
               grad_accum: int = 1, grad_clip: float | None = None) -> StepResult:
    """One optimiser step over the next grad_accum batches; raises NonFinite before a bad update."""
    step_loss, tokens = 0.0, 0
    for _ in range(grad_accum):
        batch = next(batches)
        loss = model.loss(batch.input_ids, batch.labels, batch.attention_mask, batch.position_ids)
        value = loss.item()
        if not math.isfinite(value):
            raise NonFinite(f"the loss is {value}")
        loss.backward()                                  # adds into every A's and B's .grad
        step_loss += value / grad_accum
        tokens += count_targets(batch.labels)
    if grad_accum > 1:
        scale_grads(params, 1.0 / grad_accum)            # sum of micro-batch gradients -> their mean
    norm = clip_grad_norm(params, grad_clip) if grad_clip else grad_norm(params)
    if not math.isfinite(norm):
        raise NonFinite(f"the gradient norm is {norm}")
    optimizer.step(lr=lr)
    optimizer.zero_grad()
    return StepResult(loss=step_loss, grad_norm=norm, tokens=tokens)


def evaluate(model, data: TokenizedSplit, batch_size: int, max_batches: int = -1) -> float:
    """Mean loss per counted token over the first max_batches batches (all with -1), no dropout, no graph."""
    total, count = 0.0, 0
    was_training = model.training
    model.train(False)
    with no_grad():
        for i, batch in enumerate(iterate_batches(data, batch_size, shuffle=False)):
            if i == max_batches:
                break
            n = count_targets(batch.labels)
            total += model.loss(batch.input_ids, batch.labels, batch.attention_mask, batch.position_ids).item() * n
            count += n
    model.train(was_training)
    return total / count
