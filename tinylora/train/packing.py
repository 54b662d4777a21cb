"""Packing (`train --pack`): several examples per row, up to --max-seq-length, instead of one padded row each.

Instruction data is short and uneven (the demo's examples are ~60 tokens), and
a padded token costs a CPU as much as a real one. A packed row

    ids        [a0 a1 a2 a3 | b0 b1 b2 | c0 c1 | pad pad]
    segments   [ 1  1  1  1 |  2  2  2 |  3  3 |  0   0 ]     -> attention_mask: a query sees its own example only
    positions  [ 0  1  2  3 |  0  1  2 |  0  1 |  0   0 ]     -> position_ids: RoPE restarts per example
    labels     [ -  a1 a2 a3 |  -  b1 b2 |  -  c1 |  -   - ]   -> each example's first label is ignored

computes exactly what the examples compute on their own rows: the attention kernels
take the segment ids as their mask (block-diagonal causal attention,
kernels/attention.py), the rotary angles depend only on the position within the
example, and the label at an example's first token, which the shift would score
from the previous example's last logits, is IGNORE. This is what transformers'
DataCollatorWithFlattening and FlashAttention's varlen training do.

Rows are filled greedily in each epoch's shuffled order (a pure function of
(seed, epoch), so --resume still lands on the same batch), batch_size rows to a
batch; the rows left over at an epoch's end are dropped, as unpacked training drops
its partial batch. Validation and test batches are not packed: their losses stay
those of the unpacked run.
"""

from __future__ import annotations

import itertools
from typing import Iterator

import numpy as np

from ..errors import TinyloraError
from .data import IGNORE, Batch, Tokenized, TokenizedSplit


def pack_rows(lengths: np.ndarray, order: np.ndarray, max_len: int) -> list[list[int]]:
    """Example indices in `order` -> rows of indices, each row's lengths summing to at most max_len."""
    rows, row, used = [], [], 0
    for i in order:
        n = int(lengths[i])
        if row and used + n > max_len:
            rows.append(row)
            row, used = [], 0
        row.append(int(i))
        used += n
    if row:
        rows.append(row)
    return rows


def collate_packed(rows: list[list[Tokenized]], pad_id: int) -> Batch:
    """Rows of examples -> one Batch with segment ids as attention_mask and per-example position_ids."""
    T = max(sum(len(e.ids) for e in row) for row in rows)
    input_ids = np.full((len(rows), T), pad_id, dtype=np.int64)
    labels = np.full((len(rows), T), IGNORE, dtype=np.int64)
    segments = np.zeros((len(rows), T), dtype=np.int64)
    positions = np.zeros((len(rows), T), dtype=np.int64)
    for r, row in enumerate(rows):
        start = 0
        for n, (ids, row_labels) in enumerate(row, start=1):
            end = start + len(ids)
            input_ids[r, start:end] = ids
            labels[r, start + 1:end] = row_labels[1:]     # the first is the previous example's target: ignored
            segments[r, start:end] = n
            positions[r, start:end] = np.arange(len(ids))
            start = end
    return Batch(input_ids, labels, segments, positions)


def packed_epoch(data: TokenizedSplit, batch_size: int, seed: int, epoch: int, max_len: int) -> list[list[list[int]]]:
    """The batches (lists of rows of example indices) of one packed training epoch."""
    order = np.random.default_rng([seed, epoch]).permutation(len(data))
    rows = pack_rows(data.lengths, order, max_len)
    return [rows[i * batch_size:(i + 1) * batch_size] for i in range(len(rows) // batch_size)]


def packed_steps(data: TokenizedSplit, batch_size: int, seed: int, max_len: int, epochs: float) -> int:
    """How many packed batches `epochs` passes hold (epochs may be fractional)."""
    whole, part = int(epochs), epochs - int(epochs)
    total = sum(len(packed_epoch(data, batch_size, seed, e, max_len)) for e in range(whole))
    return total + round(part * len(packed_epoch(data, batch_size, seed, whole, max_len)))


def iterate_packed_batches(data: TokenizedSplit, batch_size: int, max_len: int, seed: int = 0,
                           start_step: int = 0) -> Iterator[Batch]:
    """Packed training batches, endlessly, from global step `start_step` (as iterate_batches, shuffle=True)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise TinyloraError(f"batch size must be a positive integer, got {batch_size!r}")
    if not packed_epoch(data, batch_size, seed, 0, max_len):
        rows = len(pack_rows(data.lengths, np.arange(len(data)), max_len))
        raise TinyloraError(f"--pack: the {len(data)} examples of {data.name} ({data.source}) fill only {rows} rows "
                            f"of {max_len} tokens, fewer than --batch-size {batch_size}; lower --batch-size")

    def batches():
        step = 0
        for epoch in itertools.count():
            for rows in packed_epoch(data, batch_size, seed, epoch, max_len):
                if step >= start_step:
                    yield collate_packed([[data.examples[i] for i in row] for row in rows], data.pad_id)
                step += 1
    return batches()
