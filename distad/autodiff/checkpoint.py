"""Activation checkpointing: keep a segment's inputs, recompute its activations in backward."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from .engine import STATE, Primitive, Tensor, apply, backprop, enable_grad, no_grad

__all__ = ["checkpoint", "checkpoint_sequential"]


class _Segment:
    """One checkpointed call: the function, its arguments, every tensor it differentiates
    with respect to (the arguments, then the tensors it closes over), and the cotangents of
    the walk in progress."""

    __slots__ = ("fn", "args", "inputs", "last", "cache")

    def __init__(self, fn: Callable, args: tuple, inputs: tuple) -> None:
        self.fn = fn
        self.args = args
        self.inputs = inputs
        # The engine calls the rule once per input that needs a gradient, in input order.
        self.last = max(i for i, a in enumerate(inputs)
                        if isinstance(a, Tensor) and a.requires_grad)
        self.cache: tuple[Any, list] | None = None

    def cotangents(self, g: Any) -> list:
        """Re-run the segment with recording on, on the same tensors, and take the cotangent
        g of its output back to every input: a walk that stops at the inputs and runs none of
        their hooks (the outer walk adds these cotangents to what else the inputs receive, and
        runs the hooks once the sum is final). With a Tensor g (create_graph) the walk is
        recorded too, so the cotangents are differentiable again."""
        boundary = [a for a in self.inputs if isinstance(a, Tensor) and a.requires_grad]
        with enable_grad():
            out = self.fn(*self.args)
        found = [None] * len(boundary)
        if isinstance(out, Tensor) and out.requires_grad:
            found = backprop(out, g, inputs=boundary, create_graph=isinstance(g, Tensor),
                             input_hooks=False)
        by_id = {id(b): f for b, f in zip(boundary, found)}
        return [_zeros_if_none(by_id.get(id(a)), a) for a in self.inputs]


def _zeros_if_none(g: Any, a: Any) -> Any:
    if g is not None or not isinstance(a, Tensor):
        return g
    return np.zeros_like(a.data)


def _recompute_vjp(i: int, g, y, *xs, seg: _Segment, out: Any):
    """The segment's cotangents, recomputed once per walk (the engine asks for them input by
    input, with the same g) and dropped after the last input's."""
    if seg.cache is None or seg.cache[0] is not g:
        seg.cache = (g, seg.cotangents(g))
    grads = seg.cache[1]
    if i == seg.last:
        seg.cache = None
    return grads[i]


checkpoint_p = Primitive("checkpoint", lambda *xs, seg, out: out, vjp=_recompute_vjp)


def checkpoint(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """Wrap fn so that only its inputs are kept for backward; its activations are recomputed.

    fn takes Tensors/arrays and returns one Tensor. Tensors it closes over (parameters, or
    values computed before it) receive their gradients like its arguments: the segment runs
    once unrecorded, noting every tensor from outside it that needs a gradient, and is
    recorded as one operation on the arguments and those tensors. Backward re-runs it,
    recorded, on the same tensors. Memory drops from the segment's activations to its inputs,
    for one extra forward of the segment. Works with every transform: `ad.grad` and
    `create_graph` (higher order: the recomputation is recorded too), and under forward mode
    (jvp, and hvp's forward over reverse) fn runs as it is, its tangents pushed op by op.
    Randomness inside fn must be reproducible on the second call.
    """

    def wrapped(*args: Any) -> Tensor:
        if STATE.forward_active:
            return fn(*args)
        outer, captured = STATE.capture, {}
        STATE.capture = captured
        try:
            with no_grad():
                out = fn(*args)
        finally:
            STATE.capture = outer
        if outer is not None:  # inside another segment's unrecorded run: it reads them too
            outer.update(captured)
        if not STATE.grad_enabled:
            return out
        explicit = {id(a) for a in args}
        inputs = (*args, *(t for k, t in captured.items() if k not in explicit))
        if not any(isinstance(a, Tensor) and a.requires_grad for a in inputs):
            return out  # nothing in it needs a gradient
        seg_out = out.data if isinstance(out, Tensor) else out
        return apply(checkpoint_p, inputs, {"seg": _Segment(fn, args, inputs), "out": seg_out})

    return wrapped


def checkpoint_sequential(layers: Sequence[Callable], segments: int, x: Any) -> Tensor:
    """Run `layers` in order on x, in `segments` checkpointed chunks (the last runs normally)."""
    layers = list(layers)
    if not 1 <= segments <= max(1, len(layers)):
        raise ValueError(f"checkpoint_sequential: segments must be in 1..{len(layers)}, "
                         f"got {segments}")
    bounds = np.linspace(0, len(layers), segments + 1).round().astype(int)

    def run(chunk):
        def f(h):
            for layer in chunk:
                h = layer(h)
            return h
        return f

    for s in range(segments):
        chunk = layers[bounds[s]:bounds[s + 1]]
        x = run(chunk)(x) if s == segments - 1 else checkpoint(run(chunk))(x)
    return x
