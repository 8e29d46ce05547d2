"""Activation checkpointing: keep a segment's inputs, recompute its activations in backward."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from .engine import STATE, Primitive, Tensor, apply, backprop, no_grad

__all__ = ["checkpoint", "checkpoint_sequential"]


class _Segment:
    """One checkpointed call: the function, and its input gradients once recomputed."""

    __slots__ = ("fn", "out", "grads")

    def __init__(self, fn: Callable, out: Any) -> None:
        self.fn = fn
        self.out = out
        self.grads = None


def _recompute_vjp(i: int, g, y, *xs, seg: _Segment):
    """Re-run the segment with recording on, backprop g through it (parameters inside it get
    their .grad and hooks as usual) and hand out the input gradients, computed once."""
    if isinstance(g, Tensor):
        raise NotImplementedError("checkpoint: create_graph (higher order) through a "
                                  "checkpointed segment is not supported")
    if seg.grads is None:
        leaves = [Tensor(x, requires_grad=True) if isinstance(x, np.ndarray) and
                  np.issubdtype(x.dtype, np.inexact) else x for x in xs[:-1]]
        prev = STATE.grad_enabled
        STATE.grad_enabled = True
        try:
            out = seg.fn(*leaves)
        finally:
            STATE.grad_enabled = prev
        if out.requires_grad:
            backprop(out, g)
        seg.grads = [lv.grad if isinstance(lv, Tensor) and lv.grad is not None
                     else np.zeros_like(x) for lv, x in zip(leaves, xs[:-1])] + [xs[-1]]
        seg.fn = None  # drop the closure: the recomputed graph is freed as soon as we return
    return seg.grads[i]


checkpoint_p = Primitive("checkpoint", lambda *xs, seg: seg.out, vjp=_recompute_vjp)


def checkpoint(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """Wrap fn so that only its inputs are kept for backward; its activations are recomputed.

    fn takes Tensors/arrays and returns one Tensor; parameters it closes over
    receive gradients during the recomputation. Memory drops from the
    segment's activations to its inputs, for one extra forward of the segment.
    Randomness inside fn must be reproducible on the second call. Under forward mode (jvp,
    and hvp's forward over reverse) fn runs as it is, its tangents pushed op by op: nothing is
    recomputed and nothing saved.
    """

    def wrapped(*args: Any) -> Tensor:
        if STATE.forward_active:
            return fn(*args)
        with no_grad():
            out = fn(*args)
        if not STATE.grad_enabled:
            return out
        seg_out = out.data if isinstance(out, Tensor) else out
        # The token is an input that always requires a gradient, so the segment is recorded
        # (and recomputed) even when only parameters inside it need gradients.
        token = Tensor(np.zeros(0, dtype=np.asarray(seg_out).dtype), requires_grad=True)
        return apply(checkpoint_p, (*args, token), {"seg": _Segment(fn, seg_out)})

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
