"""Activation checkpointing: a decoder layer that keeps only its input, and runs again during the backward.

Training keeps every op's saved activations until the backward reaches it:
about 70 MB per layer of a 7B model at 256 tokens, 2.2 GB over its 32 layers,
more than half again its NF4 weights. A checkpointed layer keeps only its
input x (B, T, C):

    forward   y = layer(x) under no_grad: nothing inside the layer saves anything
    backward  run layer(x) again, with the graph this time, from the same dropout
              generator states, then backpropagate dy through that graph:
              A and B accumulate their gradients as they always do, and the
              gradient that reaches x is dx

so one layer's activations exist at a time, for the price of one more forward
(the recomputation). The gradients are the same numbers: the recomputation is
the same ops on the same inputs in the same order, and each LoRA dropout
generator is wound back to its state before the forward, so it draws the same
masks, then set back to where the forward left it, so that the next step (and
a resumed run) draws exactly what it would have. torch.utils.checkpoint does
the same, with `preserve_rng_state`.

The layer's trainable tensors (A and B) are passed as inputs although the
forward does not read them here: that is what makes the output need a gradient
when x does not (the first layer's input is the frozen embedding's output), so
that the backward reaches this node at all. Their gradients arrive through the
inner backward, so for them this node returns None.
"""

from __future__ import annotations

import numpy as np

from ..tensor import Function, Tensor, is_grad_enabled, no_grad


class CheckpointFn(Function):
    """x (B, T, C), the layer's trainable tensors -> layer(x, *args) (B, T, C), keeping only x"""

    def forward(self, x, *trainable, layer=None, args=(), generators=()):
        # generators: the layer's dropout generators, wound back to here for the recomputation
        states = [g.bit_generator.state for g in generators]
        self.save_for_backward(x, layer, args, generators, states)
        with no_grad():
            return layer(Tensor(x), *args).data

    def backward(self, dy):
        x, layer, args, generators, states = self.saved
        if not is_grad_enabled():
            raise RuntimeError("a checkpointed layer's backward recomputes its forward: call backward() "
                               "outside no_grad()")
        after = [g.bit_generator.state for g in generators]
        for g, state in zip(generators, states):
            g.bit_generator.state = state                        # the same dropout masks as the forward
        x_again = Tensor(x, requires_grad=True)                  # a leaf: its .grad is dx
        y = layer(x_again, *args)
        for g, state in zip(generators, after):
            g.bit_generator.state = state                        # and on from where the forward left them
        y.backward(np.asarray(dy, dtype=y.data.dtype))           # A and B accumulate here
        dx = x_again.grad if self.needs_input_grad[0] else None
        return (dx,) + (None,) * (len(self.needs_input_grad) - 1)


def checkpoint(layer, x: Tensor, *args) -> Tensor:
    """layer(x, *args), recomputed in the backward instead of keeping its activations (see above)."""
    trainable = [t for _, t in layer.named_parameters() if t.requires_grad]
    generators = [m.rng for _, m in layer.named_modules()
                  if isinstance(getattr(m, "rng", None), np.random.Generator) and getattr(m, "training", False)]
    return CheckpointFn.apply(x, *trainable, layer=layer, args=args, generators=generators)
