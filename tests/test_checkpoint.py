"""Activation checkpointing (ops/checkpoint.py): the same gradients, bit for bit, from far fewer saved arrays."""

import numpy as np
import pytest

from tinylora.gradcheck.model_check import tiny_batch, tiny_lora_model
from tinylora.lora import LoraConfig, lora_parameters
from tinylora.tensor import Function, no_grad


def grads_after_two_steps(dtype, checkpointed: bool, dropout: float, quantised: bool = False):
    """A/B gradients accumulated over two backward passes, and the dropout generators' states after."""
    lora = LoraConfig(r=4, alpha=8, target_modules="all-linear", dropout=dropout)
    model = tiny_lora_model(seed=0, dtype=dtype, lora=lora, quantised=quantised).train(True)
    model.grad_checkpoint = checkpointed
    ids, labels, mask = tiny_batch()
    for _ in range(2):
        model.loss(ids, labels, mask).backward()
    states = [m.rng.bit_generator.state for _, m in model.named_modules() if getattr(m, "rng", None) is not None]
    return {n: p.grad for n, p in lora_parameters(model)}, states, model


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_checkpointed_gradients_are_identical(dtype, dropout):
    plain, plain_states, _ = grads_after_two_steps(dtype, False, dropout)
    ours, our_states, model = grads_after_two_steps(dtype, True, dropout)
    assert plain.keys() == ours.keys() and len(plain) == 28
    for name in plain:
        assert np.array_equal(plain[name], ours[name]), name            # the same ops on the same inputs
    assert our_states == plain_states and (len(our_states) == 14) == (dropout > 0)   # one per LoRA layer
    assert all(t.grad is None for n, t in model.named_parameters() if not t.requires_grad)


def test_checkpointed_gradients_on_a_quantised_base_are_identical():
    plain, _, _ = grads_after_two_steps(np.float64, False, 0.1, quantised=True)
    ours, _, _ = grads_after_two_steps(np.float64, True, 0.1, quantised=True)
    assert all(np.array_equal(plain[n], ours[n]) for n in plain)


def saved_bytes(model) -> int:
    """Bytes of the arrays the graph of one loss holds for its backward (each buffer once)."""
    ids, labels, mask = tiny_batch()
    loss = model.loss(ids, labels, mask)
    seen, buffers, stack = set(), {}, [loss._ctx]
    while stack:
        node = stack.pop()
        if not isinstance(node, Function) or id(node) in seen:
            continue
        seen.add(id(node))
        for a in node.saved:
            if isinstance(a, np.ndarray):                       # views of one buffer counted once
                start = a.__array_interface__["data"][0]
                buffers[start] = max(buffers.get(start, 0), a.nbytes)
        stack.extend(node.parents)
    return sum(buffers.values())


def test_a_checkpointed_model_saves_only_each_layers_input():
    model = tiny_lora_model(seed=0).train(True)
    plain = saved_bytes(model)
    model.grad_checkpoint = True
    ours = saved_bytes(model)
    x = 2 * 7 * model.config.hidden_size * 8                     # one layer input (2, 7, C) in float64
    assert ours < plain / 3 and ours >= model.config.num_hidden_layers * x, (plain, ours)


def test_checkpointing_is_off_without_gradients():
    model = tiny_lora_model(seed=0)
    model.grad_checkpoint = True
    ids, _, mask = tiny_batch()
    with no_grad():
        out = model(ids, mask)
    assert out._ctx is None
