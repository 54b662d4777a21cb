"""The autograd engine: `Tensor`, `Function`, `backward`, `no_grad`.

This is reverse-mode automatic differentiation over a recorded graph, in the
spirit of micrograd and early tinygrad:

* A `Tensor` wraps an `np.ndarray` (`.data`). Leaves that require a gradient
  (LoRA's A and B) collect it in `.grad`; frozen leaves (pretrained weights)
  have `requires_grad=False` and are never differentiated.
* Every differentiable op is a subclass of `Function` with `forward` and
  `backward` written side by side (see `tinylora/ops/`). `Function.apply`
  runs the forward on plain arrays and, when a gradient may be needed, records
  the call as a node of the graph: the output tensor remembers the `Function`
  instance (its "context"), which remembers where its inputs came from (the
  Functions that made them, or the trainable leaves themselves) and whatever
  the forward saved for the backward. The graph holds no intermediate Tensor,
  so an activation no backward needs is freed as soon as the forward is done
  with it: only what `save_for_backward` kept stays alive.
* `Tensor.backward()` sorts the graph topologically, walks it in reverse,
  calls each node's `backward` with the gradient of its output and adds (`+=`)
  the results into the gradients of the inputs. A tensor used twice therefore
  receives the sum of both contributions (the "diamond" case). Each node's
  context is freed as soon as it has been passed, so the activations saved for
  the backward are released during the backward itself.

What is deliberately not here: no device abstraction, no lazy evaluation, no
higher-order gradients (backward does not build a graph), no operator
registration magic — `Tensor.__matmul__` visibly calls `MatMulFn.apply`.

The only process-wide state is the grad mode, changed only through `no_grad()`.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import numpy as np

from .kernels.weights import FrozenWeight

# Grad mode: the one piece of global state. Under `no_grad()` no graph is
# recorded, so inference keeps no activations alive.
_grad_enabled = True


@contextlib.contextmanager
def no_grad() -> Iterator[None]:
    """Context manager: ops inside record no graph (inference, evaluation)."""
    global _grad_enabled
    previous, _grad_enabled = _grad_enabled, False
    try:
        yield
    finally:
        _grad_enabled = previous


def is_grad_enabled() -> bool:
    return _grad_enabled


class Tensor:
    """An n-dimensional array that can take part in reverse-mode autodiff.

    data:          the `np.ndarray` holding the values, or for a pretrained matrix
                   a `FrozenWeight` (kernels/weights.py: float32, bf16, ...), which
                   only the ops with a weight input read and which never trains
    requires_grad: True for trainable leaves and for results computed from them
    grad:          for leaves with requires_grad, the accumulated gradient
                   (same shape as data) after `backward()`; None before
    """

    __slots__ = ("data", "requires_grad", "grad", "_ctx")

    def __init__(self, data, requires_grad: bool = False):
        self.data = data if isinstance(data, (np.ndarray, FrozenWeight)) else np.asarray(data)
        if requires_grad and isinstance(data, FrozenWeight):
            raise TypeError(f"a frozen weight ({data.storage}) cannot require grad; a trainable weight is "
                            "a float array")
        self.requires_grad = bool(requires_grad)
        self.grad: np.ndarray | None = None
        self._ctx: Function | None = None  # the Function that produced this tensor

    # -- array-like conveniences -------------------------------------------
    @property
    def shape(self) -> tuple[int, ...]:
        return self.data.shape

    @property
    def dtype(self) -> np.dtype:
        return self.data.dtype

    @property
    def ndim(self) -> int:
        return self.data.ndim

    @property
    def size(self) -> int:
        return self.data.size

    def numpy(self) -> np.ndarray:
        return self.data

    def item(self) -> float:
        return self.data.item()

    def detach(self) -> "Tensor":
        """The same values, cut off from the graph (shares memory)."""
        return Tensor(self.data, requires_grad=False)

    def __repr__(self) -> str:
        flag = ", requires_grad=True" if self.requires_grad else ""
        return f"Tensor(shape={self.shape}, dtype={self.dtype}{flag})"

    # -- operators: each one visibly calls the Function that implements it (the ops
    # modules are imported at the bottom of this file: see "the one import cycle").
    def __add__(self, other) -> "Tensor":
        return elementwise_ops.AddFn.apply(self, _as_tensor(other, self.dtype))

    __radd__ = __add__

    def __sub__(self, other) -> "Tensor":
        minus_other = elementwise_ops.MulFn.apply(_as_tensor(other, self.dtype), _as_tensor(-1.0, self.dtype))
        return elementwise_ops.AddFn.apply(self, minus_other)

    def __neg__(self) -> "Tensor":
        return elementwise_ops.MulFn.apply(self, _as_tensor(-1.0, self.dtype))

    def __mul__(self, other) -> "Tensor":
        return elementwise_ops.MulFn.apply(self, _as_tensor(other, self.dtype))

    __rmul__ = __mul__

    def __matmul__(self, other: "Tensor") -> "Tensor":
        return linear_ops.MatMulFn.apply(self, other)

    def __getitem__(self, index) -> "Tensor":
        return shape_ops.SliceFn.apply(self, index=index)

    def reshape(self, *shape) -> "Tensor":
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = tuple(shape[0])
        return shape_ops.ReshapeFn.apply(self, shape=shape)

    def transpose(self, *axes) -> "Tensor":
        if len(axes) == 1 and isinstance(axes[0], (tuple, list)):
            axes = tuple(axes[0])
        return shape_ops.TransposeFn.apply(self, axes=axes or None)

    @property
    def T(self) -> "Tensor":
        return self.transpose()

    def sum(self, axis=None, keepdims: bool = False) -> "Tensor":
        return reduce_ops.SumFn.apply(self, axis=axis, keepdims=keepdims)

    def mean(self, axis=None, keepdims: bool = False) -> "Tensor":
        return reduce_ops.MeanFn.apply(self, axis=axis, keepdims=keepdims)

    # -- reverse mode -------------------------------------------------------
    def backward(self, dy: np.ndarray | None = None) -> None:
        """Backpropagate from this tensor, accumulating into leaves' `.grad`.

        dy: the gradient of some scalar objective with respect to this tensor
            (same shape). Omitted, this tensor must hold a single value and
            dy = 1, i.e. we differentiate this tensor itself.

        Gradients of intermediate tensors live only during this call; leaves
        accumulate (`+=`) so several backward passes add up, which is how
        gradient accumulation over micro-batches works. The graph is freed as
        it is walked: calling backward twice through the same graph is an error.
        """
        if not self.requires_grad:
            raise RuntimeError("backward() on a tensor that does not require grad: "
                               "no input of the computation was trainable")
        if dy is None:
            if self.data.size != 1:
                raise RuntimeError(f"backward() without dy needs a single value, got shape {self.shape}")
            dy = np.ones_like(self.data)
        dy = np.asarray(dy, dtype=self.data.dtype)
        if dy.shape != self.shape:
            raise ValueError(f"backward(): dy has shape {dy.shape}, tensor has shape {self.shape}")

        # Pending gradients, keyed by id(node). A node is a Function (standing
        # for the tensor it produced) or a trainable leaf Tensor. A result of
        # backward may alias its dy (Add passes dy straight through), so we
        # never update a stored gradient in place: `g = g + new` makes a copy.
        root = self._ctx
        if root is None:                         # backward on a trainable leaf itself: dL/dx = dy
            self.grad = dy.copy() if self.grad is None else self.grad + dy
            return
        pending: dict[int, np.ndarray] = {id(root): dy}
        for node in reversed(_topological_order(root)):
            g = pending.pop(id(node), None)
            if isinstance(node, Tensor):         # a trainable leaf
                if g is not None:
                    node.grad = g.copy() if node.grad is None else node.grad + g
                continue
            parents = node.parents
            node.parents, node.freed = (), True   # free the graph as we pass it
            if g is None:                        # no path from here to the output
                node.saved = ()
                continue
            input_grads = node.backward(g)
            node.saved = ()                      # drop the saved activations
            if not isinstance(input_grads, tuple):
                input_grads = (input_grads,)
            if len(input_grads) != len(parents):
                raise RuntimeError(f"{type(node).__name__}.backward returned {len(input_grads)} "
                                   f"gradients for {len(parents)} inputs")
            for parent, needed, dx in zip(parents, node.needs_input_grad, input_grads):
                if not needed or dx is None:
                    continue
                if dx.shape != parent.shape:
                    raise RuntimeError(f"{type(node).__name__}.backward: gradient of shape {dx.shape} "
                                       f"for an input of shape {parent.shape}")
                key = id(parent)
                pending[key] = dx if key not in pending else pending[key] + dx


def _topological_order(root: Function) -> list:
    """Nodes reachable from `root`, inputs first: Functions, and trainable leaves.

    Iterative depth-first search (a 30-layer model has thousands of nodes, more
    than Python's recursion limit would like). Only inputs that require grad
    are visited: frozen tensors are not part of the differentiated graph.
    """
    order: list = []
    visited: set[int] = set()
    stack: list[tuple[object, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        if children_done:
            order.append(node)
            continue
        if id(node) in visited:
            continue
        visited.add(id(node))
        if isinstance(node, Function) and node.freed:
            raise RuntimeError("backward() through a graph that an earlier backward() already freed; "
                               "recompute the forward pass")
        stack.append((node, True))
        if isinstance(node, Function):
            for parent, needed in zip(node.parents, node.needs_input_grad):
                if needed and id(parent) not in visited:
                    stack.append((parent, False))
    return order


def _as_tensor(x, dtype) -> Tensor:
    """Wrap a Python number or array as a constant (frozen) tensor."""
    return x if isinstance(x, Tensor) else Tensor(np.asarray(x, dtype=dtype))


class Function:
    """One differentiable op: `forward` and `backward` side by side.

    Subclasses implement

        forward(self, *arrays, **options) -> np.ndarray
            computes the output from the inputs' arrays; may store what the
            backward needs with `self.save_for_backward(...)`;
        backward(self, dy) -> tuple of np.ndarray | None
            given dL/d(output), returns dL/d(input) for each positional input,
            or None where `self.needs_input_grad[i]` is False. Skipping those
            is what makes frozen weights cheap: a linear layer with a frozen W
            computes only dx, never dW.

    Positional arguments of `apply` are Tensors (the differentiable inputs);
    keyword arguments are plain options (shapes, axes, masks, labels, eps).
    The Function instance itself is the node's context.
    """

    parents: tuple                  # per input: the Function that made it, or the trainable leaf itself
    needs_input_grad: tuple[bool, ...]
    saved: tuple
    shape: tuple[int, ...]          # of the output
    freed: bool                     # set once backward has passed this node

    @classmethod
    def apply(cls, *inputs: Tensor, **options) -> Tensor:
        for i, t in enumerate(inputs):
            if not isinstance(t, Tensor):
                raise TypeError(f"{cls.__name__}.apply: input {i} is {type(t).__name__}, expected Tensor "
                                "(pass non-differentiable options as keyword arguments)")
        ctx = cls()
        ctx.needs_input_grad = tuple(_grad_enabled and t.requires_grad for t in inputs)
        ctx.saved = ()
        out = Tensor(ctx.forward(*(t.data for t in inputs), **options),
                     requires_grad=any(ctx.needs_input_grad))
        if out.requires_grad:
            # The graph's edges lead to the Functions that made the inputs (or to
            # the trainable leaves themselves), never to intermediate Tensors:
            # an intermediate array nothing saved is freed as soon as Python
            # drops its Tensor, instead of living on in the graph until backward.
            ctx.parents = tuple(t if t._ctx is None else t._ctx for t in inputs)
            ctx.shape = out.data.shape           # the shape its gradient must have
            ctx.freed = False
            out._ctx = ctx
        return out

    def save_for_backward(self, *arrays) -> None:
        # Nothing needs a gradient (frozen inputs or no_grad): keep nothing alive.
        if any(self.needs_input_grad):
            self.saved = arrays

    def forward(self, *arrays, **options) -> np.ndarray:  # pragma: no cover - interface
        raise NotImplementedError

    def backward(self, dy: np.ndarray):  # pragma: no cover - interface
        raise NotImplementedError


# -- the one import cycle ---------------------------------------------------------------------
# Tensor's operators above (a + b, a @ b, a[i], ...) are ops, and every op is a Function
# defined in this file: ops/ imports this module, and this module imports ops/. The cycle is
# closed here and nowhere else, at the bottom, once Tensor and Function exist. Importing the
# modules (not their classes) works whichever side Python happens to load first.
from .ops import elementwise as elementwise_ops  # noqa: E402
from .ops import linear as linear_ops  # noqa: E402
from .ops import reduce as reduce_ops  # noqa: E402
from .ops import shape as shape_ops  # noqa: E402
