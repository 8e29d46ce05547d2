"""Functional transforms: grad, value_and_grad, vjp, jvp, hvp, jacobian, hessian.

Arguments may be numpy arrays, Python numbers, Tensors, or (for the argnums
that are differentiated) lists / tuples / dicts of those. Results are numpy
arrays — unless the call is nested inside another transform, in which case
they are Tensors recorded on the outer tape, which is how `grad(grad(f))` and
forward-over-reverse `hvp` work.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from .engine import STATE, Primitive, Tensor, apply, backprop, live_tangent
from .ops import reshape, stack

__all__ = ["grad", "value_and_grad", "vjp", "jvp", "hvp", "jacobian", "hessian"]

identity_p = Primitive("identity", lambda x: x, vjp=(lambda g, y, x: g,), jvp=(lambda t, y, x: t,))


class _Trace:
    depth = 0  # transforms currently running; > 0 means results must stay differentiable


# ---- pytrees: nested lists / tuples / dicts of arrays -------------------------------------

def tree_flatten(tree: Any) -> tuple[list, Any]:
    """Leaves of a nested list/tuple/dict (in order) and a description to rebuild it."""
    if isinstance(tree, (list, tuple)):
        leaves, defs = [], []
        for t in tree:
            lv, d = tree_flatten(t)
            leaves += lv
            defs.append((len(lv), d))
        return leaves, (type(tree), defs)
    if isinstance(tree, dict):
        keys = list(tree)
        leaves, d = tree_flatten([tree[k] for k in keys])
        return leaves, (dict, (keys, d))
    return [tree], None


def tree_unflatten(treedef: Any, leaves: Sequence) -> Any:
    """Inverse of `tree_flatten`."""
    if treedef is None:
        return leaves[0]
    kind, spec = treedef
    if kind is dict:
        keys, d = spec
        return dict(zip(keys, tree_unflatten(d, leaves), strict=True))
    out, i = [], 0
    for n, d in spec:
        out.append(tree_unflatten(d, leaves[i:i + n]))
        i += n
    return kind(out)


# ---- helpers ---------------------------------------------------------------------------

def _is_traced(x: Any) -> bool:
    """Whether x belongs to an outer transform: recorded for reverse mode, or a live tangent."""
    return isinstance(x, Tensor) and (x.requires_grad or live_tangent(x))


def _watch(x: Any, op: str) -> Tensor:
    """A Tensor to differentiate with respect to; linked to an outer trace if x is traced."""
    if _is_traced(x):
        w = apply(identity_p, (x,), {})
        w.requires_grad = True
        return w
    arr = x.data if isinstance(x, Tensor) else np.asarray(x)
    if not np.issubdtype(arr.dtype, np.inexact):
        raise TypeError(f"{op}: can only differentiate with respect to floating-point inputs, "
                        f"got dtype {arr.dtype}")
    return Tensor(arr, requires_grad=True)


def _argnums(argnums: int | Sequence[int], nargs: int, op: str) -> tuple[int, ...]:
    nums = (argnums,) if isinstance(argnums, int) else tuple(argnums)
    for i in nums:
        if not -nargs <= i < nargs:
            raise ValueError(f"{op}: argnums {argnums} out of range for {nargs} positional "
                             "argument(s)")
    return tuple(i % nargs for i in nums)


def _out(x: Any, keep: bool) -> Any:
    """Result of a transform: numpy at top level, the Tensor itself when nested."""
    if keep:
        return x
    return x.data if isinstance(x, Tensor) else x


def _zeros_for(w: Tensor, keep: bool) -> Any:
    z = np.zeros_like(w.data)
    return Tensor(z) if keep else z


def _call_watched(f: Callable, args: tuple, nums: tuple[int, ...], kwargs: dict, op: str):
    """Call f with the argnums arguments replaced by watched Tensors (pytrees allowed)."""
    nested = _Trace.depth > 0 or any(_is_traced(v) for i in nums for v in tree_flatten(args[i])[0])
    args = list(args)
    watched, defs = [], []
    for i in nums:
        leaves, d = tree_flatten(args[i])
        ws = [_watch(v, op) for v in leaves]
        watched.append(ws)
        defs.append(d)
        args[i] = tree_unflatten(d, ws)
    _Trace.depth += 1
    prev = STATE.grad_enabled
    STATE.grad_enabled = True
    try:
        out = f(*args, **kwargs)
    finally:
        STATE.grad_enabled = prev
        _Trace.depth -= 1
    return out, watched, defs, nested


def _scalar_output(out: Any, op: str) -> Tensor:
    if not isinstance(out, Tensor):
        raise TypeError(f"{op}: the function must return a distad Tensor computed from its "
                        f"inputs, got {type(out).__name__} (use distad ops, not numpy, inside it)")
    if out.size != 1:
        raise ValueError(f"{op}: the function must return a scalar, got shape {out.shape}; "
                         "use ad.vjp or ad.jacobian for non-scalar outputs")
    return out


def _grads_of(out: Tensor, watched: list, defs: list, nested: bool, seed: Any = None,
              retain: bool = False) -> list:
    flat = [w for ws in watched for w in ws]
    if out.requires_grad:
        gs = backprop(out, seed, inputs=flat, retain_graph=retain, create_graph=nested)
    else:
        gs = [None] * len(flat)
    gs = [_out(g, nested) if g is not None else _zeros_for(w, nested) for g, w in zip(gs, flat)]
    trees, i = [], 0
    for ws, d in zip(watched, defs):
        trees.append(tree_unflatten(d, gs[i:i + len(ws)]))
        i += len(ws)
    return trees


# ---- reverse mode ----------------------------------------------------------------------

def value_and_grad(f: Callable, argnums: int | Sequence[int] = 0, has_aux: bool = False):
    """f's value and its gradient with respect to the argnums arguments (reverse mode).

    f must return a scalar Tensor (or `(scalar, aux)` with has_aux). Returns
    `(value, grad)`, or `(value, (grad_0, grad_1, ...))` when argnums is a
    tuple; each gradient has its argument's structure, shape and dtype.
    """

    def wrapped(*args, **kwargs):
        nums = _argnums(argnums, len(args), "grad")
        out, watched, defs, nested = _call_watched(f, args, nums, kwargs, "grad")
        aux = None
        if has_aux:
            out, aux = out
        out = _scalar_output(out, "grad")
        trees = _grads_of(out, watched, defs, nested)
        g = trees[0] if isinstance(argnums, int) else tuple(trees)
        value = _out(out, nested)
        return ((value, aux), g) if has_aux else (value, g)

    wrapped.__name__ = f"value_and_grad({getattr(f, '__name__', 'f')})"
    return wrapped


def grad(f: Callable, argnums: int | Sequence[int] = 0, has_aux: bool = False):
    """The gradient function of a scalar-valued f (see `value_and_grad`); grad(grad(f)) works."""
    vg = value_and_grad(f, argnums, has_aux)

    def wrapped(*args, **kwargs):
        (value, g) = vg(*args, **kwargs)
        return (g, value[1]) if has_aux else g

    wrapped.__name__ = f"grad({getattr(f, '__name__', 'f')})"
    return wrapped


def vjp(f: Callable, *primals: Any):
    """`(out, vjp_fn)`: f's output and a function from an output cotangent to input cotangents.

    `vjp_fn(ct)` returns a tuple with one cotangent per primal; it can be
    called several times (the tape is kept until vjp_fn is dropped).
    """
    nums = tuple(range(len(primals)))
    out, watched, defs, nested = _call_watched(f, primals, nums, {}, "vjp")
    if not isinstance(out, Tensor):
        raise TypeError(f"vjp: the function must return a distad Tensor, got {type(out).__name__}")

    def vjp_fn(ct: Any) -> tuple:
        ctv = ct.data if isinstance(ct, Tensor) and not nested else ct
        if np.shape(ctv) != out.shape:
            raise ValueError(f"vjp: cotangent shape {np.shape(ctv)} does not match output shape "
                             f"{out.shape}")
        if not isinstance(ctv, Tensor):
            ctv = np.asarray(ctv, dtype=out.dtype)
        return tuple(_grads_of(out, watched, defs, nested, seed=ctv, retain=True))

    return _out(out, nested), vjp_fn


# ---- forward mode ----------------------------------------------------------------------

#: Ids of jvp traces: every call gets its own, so a tangent never leaks into another call.
_levels = itertools.count(1)


def jvp(f: Callable, primals: Sequence, tangents: Sequence):
    """`(out, tangent_out)`: f's output and its directional derivative along `tangents`.

    primals and tangents are tuples of the same structure (pytrees of arrays);
    each primitive's JVP rule pushes the tangent forward along with the value.
    Cost: one forward pass per tangent direction (cheap for tall Jacobians).
    Nests with itself and with the reverse-mode transforms: jvp of jvp gives
    second directional derivatives, each call's tangents kept apart (a level
    per call, as JAX's traces), so an inner derivative never sees the outer
    perturbation as its own.
    """
    primals, tangents = tuple(primals), tuple(tangents)
    if len(primals) != len(tangents):
        raise ValueError(f"jvp: {len(primals)} primals but {len(tangents)} tangents")
    level = next(_levels)
    args = []
    for p, t in zip(primals, tangents):
        pl, d = tree_flatten(p)
        tl, _ = tree_flatten(t)
        if len(pl) != len(tl):
            raise ValueError("jvp: primals and tangents have different structures")
        ws = []
        for pv, tv in zip(pl, tl):
            # A traced primal gets a fresh vertex, which carries the outer tangents.
            w = apply(identity_p, (pv,), {}) if _is_traced(pv) else \
                Tensor(pv.data if isinstance(pv, Tensor) else np.asarray(pv))
            if not _is_traced(tv):  # a tangent that depends on an outer trace stays a Tensor
                tv = np.asarray(tv.data if isinstance(tv, Tensor) else tv).astype(w.dtype,
                                                                                 copy=False)
            if tv.shape != w.shape:
                raise ValueError(f"jvp: tangent shape {tv.shape} does not match primal shape "
                                 f"{w.shape}")
            w._tangent = {**(w._tangent or {}), level: tv}
            ws.append(w)
        args.append(tree_unflatten(d, ws))
    nested = _Trace.depth > 0 or any(_is_traced(v) for p in primals for v in tree_flatten(p)[0])
    prev_levels, prev_live = STATE.forward_levels, STATE.forward_active
    STATE.forward_levels = (*prev_levels[:prev_live], level)
    STATE.forward_active = prev_live + 1
    _Trace.depth += 1
    try:
        out = f(*args)
    finally:
        _Trace.depth -= 1
        STATE.forward_levels, STATE.forward_active = prev_levels, prev_live
    leaves, d = tree_flatten(out)
    outs, touts = [], []
    for o in leaves:
        if isinstance(o, Tensor):
            t = o._tangent.get(level) if o._tangent else None
            t = np.zeros_like(o.data) if t is None else t
            outs.append(_out(o, nested))
            if nested and not isinstance(t, Tensor):  # independent of the traced inputs
                t = Tensor(t)
            touts.append(_out(t, nested))  # a recorded Tensor when traced: reverse-over-forward
        else:
            outs.append(o)
            touts.append(np.zeros_like(np.asarray(o)))
    return tree_unflatten(d, outs), tree_unflatten(d, touts)


def hvp(f: Callable, primals: Sequence, tangents: Sequence):
    """Hessian-vector product of a scalar f: forward-mode JVP of the reverse-mode gradient.

    Returns a tuple with one array per primal: H v, at the cost of about two
    gradient evaluations and without forming H.
    """
    primals = tuple(primals)
    g = grad(f, argnums=tuple(range(len(primals))))
    return jvp(g, primals, tuple(tangents))[1]


def jacobian(f: Callable, argnums: int = 0, mode: str = "rev"):
    """The Jacobian of f with respect to argument `argnums`, shape out.shape + x.shape.

    mode="rev" builds it row by row from one recorded forward pass and one VJP
    per output element (best for wide functions, few outputs); mode="fwd"
    column by column, one JVP per input element (best for tall functions).
    Nests like the other transforms (inside one, the rows or columns are stacked
    with recorded ops): `jacobian(jacobian(f, mode="fwd"), mode="fwd")` is the
    Hessian by forward over forward, JAX's jacfwd(jacfwd(f)).
    """
    if mode not in ("rev", "fwd"):
        raise ValueError(f"jacobian: mode must be 'rev' or 'fwd', got {mode!r}")

    def wrapped(*args):
        i = _argnums(argnums, len(args), "jacobian")[0]
        x = args[i]
        xv = x.data if isinstance(x, Tensor) else np.asarray(x)
        nested = _Trace.depth > 0 or _is_traced(x)

        def fi(xi):
            return f(*args[:i], xi, *args[i + 1:])

        def assemble(parts: list, axis: int, shape: tuple) -> Any:
            if not nested:
                return np.stack([p.data if isinstance(p, Tensor) else p for p in parts],
                                axis=axis).reshape(shape)
            return reshape(stack([p if isinstance(p, Tensor) else Tensor(p) for p in parts],
                                 axis=axis), shape)

        if mode == "rev":
            out, vjp_fn = vjp(fi, x)
            outv = out.data if isinstance(out, Tensor) else np.asarray(out)
            if not outv.size:
                return _out(Tensor(np.zeros(outv.shape + xv.shape, outv.dtype)), nested)
            eye = np.eye(outv.size, dtype=outv.dtype)
            rows = [vjp_fn(eye[k].reshape(outv.shape))[0] for k in range(outv.size)]
            return assemble(rows, 0, outv.shape + xv.shape)
        eye = np.eye(xv.size, dtype=xv.dtype)
        cols, outv = [], None
        for k in range(xv.size):
            out, t = jvp(fi, (x,), (eye[k].reshape(xv.shape),))
            outv = out.data if isinstance(out, Tensor) else out
            cols.append(t)
        return assemble(cols, -1, np.shape(outv) + xv.shape)

    return wrapped


def hessian(f: Callable, argnums: int = 0):
    """The Hessian of a scalar f: forward-over-reverse Jacobian of its gradient (small inputs)."""
    return jacobian(grad(f, argnums), argnums, mode="fwd")
