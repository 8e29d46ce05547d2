"""The core of the engine: Tensor, the dynamic tape, and the reverse walk.

Nothing here knows any particular operation. A `Primitive` pairs a numpy forward
with one VJP rule and one JVP rule per input (the table lives in `ops.py`).
Applying a primitive to Tensors records the output Tensor as a vertex of the
tape: it keeps its primitive, its inputs and its keyword arguments, and nothing
else — the backward closures are the rules themselves, called at backward time.

Design notes (lessons the peers paid for):
- The graph is walked iteratively (no recursion), so 100,000-op chains work.
- A vertex references its inputs, never its consumers, so the tape holds no
  reference cycles and Python's cyclic collector has nothing to chase.
- Vertices are the output Tensors themselves: one object per recorded op.
- Rules run on numpy arrays in the first-order fast path. With
  `create_graph=True` the same rules run on Tensors, and are recorded, which
  is all higher-order differentiation needs.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

__all__ = [
    "Tensor",
    "Primitive",
    "tensor",
    "no_grad",
    "enable_grad",
    "is_grad_enabled",
    "backprop",
    "detect_anomaly",
    "queue_callback",
    "mark_modified",
]


class _State:
    """Process-wide switches read on every op; attributes, not globals, so reads are cheap."""

    __slots__ = ("grad_enabled", "forward_active", "forward_levels", "anomaly",
                 "backward_depth", "callbacks", "capture")

    def __init__(self) -> None:
        self.grad_enabled = True
        # Forward mode: the ids of the jvp traces, outermost first, and how many of them are
        # live (all of them, except while a JVP rule of level k runs: then the first k).
        self.forward_levels: tuple[int, ...] = ()
        self.forward_active = 0
        self.anomaly = False
        self.backward_depth = 0  # nested walks (checkpoint recomputation) run inside another
        self.callbacks: list[Callable[[], None]] = []
        # While a checkpointed segment runs unrecorded: the tensors it reads that need a
        # gradient (so, created outside it), by id.
        self.capture: dict[int, Tensor] | None = None


STATE = _State()


class no_grad:
    """Context manager (and decorator) under which no operation is recorded."""

    def __enter__(self) -> None:
        self._prev = STATE.grad_enabled
        STATE.grad_enabled = False

    def __exit__(self, *exc: object) -> None:
        STATE.grad_enabled = self._prev

    def __call__(self, fn: Callable) -> Callable:
        def wrapped(*args, **kwargs):
            with no_grad():
                return fn(*args, **kwargs)

        return wrapped


class enable_grad(no_grad):
    """Context manager that turns recording back on (inside `no_grad`, e.g. for checkpointing)."""

    def __enter__(self) -> None:
        self._prev = STATE.grad_enabled
        STATE.grad_enabled = True


def is_grad_enabled() -> bool:
    return STATE.grad_enabled


def queue_callback(fn: Callable[[], None]) -> None:
    """Run fn once the backward walk in progress has finished (outermost walk only).

    Gradient hooks use this to finish work that spans the whole backward pass,
    e.g. waiting for the last gradient buckets to be reduced across ranks.
    """
    if STATE.backward_depth == 0:
        raise RuntimeError("queue_callback: no backward pass is running")
    STATE.callbacks.append(fn)


class detect_anomaly:
    """Context manager: the first op whose value or gradient is NaN/Inf raises.

    The error names the primitive and the source line that created it. Costs a
    finiteness check per op and a stack capture per recorded op.
    """

    def __enter__(self) -> None:
        self._prev = STATE.anomaly
        STATE.anomaly = True

    def __exit__(self, *exc: object) -> None:
        STATE.anomaly = self._prev


class _RuleTable:
    """Per-input rules of a variadic primitive: `rules[i]` is `rule(i, ...)` bound to i."""

    __slots__ = ("_rule",)

    def __init__(self, rule: Callable) -> None:
        self._rule = rule

    def __getitem__(self, i: int) -> Callable:
        rule = self._rule
        return lambda *args, **kw: rule(i, *args, **kw)


class Primitive:
    """A differentiable operation: numpy forward, VJP and JVP rule per input.

    `vjp[i](g, y, *inputs, **kw)` returns the cotangent of input i given the
    output cotangent g and the output y; `jvp[i](t, y, *inputs, **kw)` returns
    the output tangent contributed by tangent t of input i. For variadic
    primitives (concatenate, stack) pass a single function `rule(i, ...)`.
    Rules are written with operators and distad ops, so they run on numpy
    arrays (first order) and on Tensors (higher order) alike.

    `vjp_into` (optional, {input: rule}) writes a cotangent straight into a
    leaf's gradient buffer: `rule(out, scale, g, y, *inputs, **kw)` stores
    scale times what `vjp[i]` returns into `out`; the walk uses it for a leaf
    whose `grad_buffer()` offers one (DataParallel's buckets), saving the
    fresh array and its copy.

    `blocking=True` marks a primitive whose VJP waits on another rank (the
    backward of a send receives the cotangent): backward runs such vertices
    only when nothing else is ready, so every rank first posts the messages
    the others wait for.

    With `residual=True` the forward returns `(y, res)`: `res` (e.g. a
    fused op's intermediate) is kept on the tape and passed to the VJP rules
    as the keyword `res`, so backward need not recompute it.

    Calling a primitive on numpy inputs returns numpy (no recording); on any
    Tensor input it returns a Tensor and records when a gradient is needed.
    """

    __slots__ = ("name", "fwd", "vjp", "jvp", "residual", "blocking", "vjp_into", "__name__")

    def __init__(
        self,
        name: str,
        fwd: Callable,
        vjp: Sequence[Callable] | Callable | None = None,
        jvp: Sequence[Callable] | Callable | None = None,
        residual: bool = False,
        blocking: bool = False,
        vjp_into: dict[int, Callable] | None = None,
    ) -> None:
        self.name = self.__name__ = name
        self.vjp_into = vjp_into
        self.fwd = fwd
        self.residual = residual
        self.blocking = blocking
        self.vjp = _RuleTable(vjp) if callable(vjp) else tuple(vjp or ())
        self.jvp = _RuleTable(jvp) if callable(jvp) else tuple(jvp or ())

    def __call__(self, *args: Any, **kw: Any):
        for a in args:
            if isinstance(a, Tensor):
                return apply(self, args, kw)
        if STATE.anomaly:
            return apply(self, args, kw).data
        return self.fwd(*args, **kw)[0] if self.residual else self.fwd(*args, **kw)

    def __repr__(self) -> str:
        return f"<primitive {self.name}>"


_FREED = ()  # marker for the inputs of a vertex whose tape was released


class Tensor:
    """An n-dimensional numpy array that records the operations applied to it.

    `data` is the numpy array; `grad` receives the accumulated gradient of a
    leaf after `backward()` (a numpy array of the same shape and dtype).
    Operators follow numpy broadcasting; comparisons give non-differentiable
    boolean Tensors. Under forward mode, `_tangent` maps the id of each jvp
    trace the value depends on to its tangent there (None: no tangent).
    """

    __slots__ = ("data", "grad", "requires_grad", "_prim", "_inputs", "_vals", "_kw", "_edges",
                 "_hooks", "_tangent", "_origin", "_version", "grad_buffer", "__weakref__")
    __array_priority__ = 1000  # ndarray <op> Tensor defers to Tensor's reflected operator

    def __init__(self, data: Any, requires_grad: bool = False) -> None:
        self.data = data if isinstance(data, np.ndarray) else np.asarray(data)
        self.grad = None
        self.requires_grad = requires_grad
        self._prim = None
        self._inputs = None
        self._vals = None
        self._kw = None
        self._edges = None
        self._hooks = None
        self._tangent = None
        self._origin = None
        self._version = 0
        # A leaf's offer of where its next gradient may be written: a callable returning
        # (array, scale) or None (DataParallel sets it; see Primitive.vjp_into).
        self.grad_buffer = None

    # ---- array-like attributes -------------------------------------------------------
    shape = property(lambda self: self.data.shape)
    ndim = property(lambda self: self.data.ndim)
    size = property(lambda self: self.data.size)
    dtype = property(lambda self: self.data.dtype)
    is_leaf = property(lambda self: self._prim is None)

    def __len__(self) -> int:
        return len(self.data)

    def __repr__(self) -> str:
        fn = f", grad_fn={self._prim.name}" if self._prim is not None else ""
        rg = ", requires_grad=True" if self.requires_grad and self._prim is None else ""
        body = np.array2string(self.data, separator=", ", prefix="tensor(")
        return f"tensor({body}{rg}{fn})"

    def numpy(self) -> np.ndarray:
        """The value as a numpy array (not a copy)."""
        return self.data

    def item(self) -> Any:
        return self.data.item()

    def detach(self) -> Tensor:
        """The same value, cut from the tape."""
        return Tensor(self.data)

    def requires_grad_(self, flag: bool = True) -> Tensor:
        if self._prim is not None and not flag:
            raise RuntimeError("requires_grad_: only leaf tensors can stop requiring a gradient")
        self.requires_grad = flag
        return self

    def zero_grad(self) -> None:
        self.grad = None

    def register_hook(self, hook: Callable[[np.ndarray], np.ndarray | None]) -> Callable[[], None]:
        """Call `hook(grad)` once this tensor's gradient is final during backward.

        For a leaf, that is before the gradient is added into `.grad`; a hook
        that returns an array replaces the gradient. Returns a function that
        removes the hook. Data parallelism starts communication from here.
        """
        if not self.requires_grad:
            raise RuntimeError("register_hook: the tensor does not require a gradient")
        if self._hooks is None:
            self._hooks = []
        self._hooks.append(hook)
        return lambda: self._hooks.remove(hook)

    @property
    def hook_count(self) -> int:
        """How many hooks `register_hook` has registered on this tensor (and not removed)."""
        return len(self._hooks) if self._hooks else 0

    def backward(self, grad: Any = None, *, retain_graph: bool = False,
                 create_graph: bool = False) -> None:
        """Accumulate d(self)/d(leaf) into every leaf's `.grad` that requires it.

        `grad` is the cotangent of self; it may be omitted only for a scalar.
        The tape is freed afterwards unless `retain_graph` (or `create_graph`,
        which records the backward pass itself for higher-order derivatives).
        """
        backprop(self, grad, retain_graph=retain_graph, create_graph=create_graph)

    # Tensors are graph vertices and dict keys by identity; == is elementwise.
    __hash__ = object.__hash__


def tensor(data: Any, requires_grad: bool = False, dtype: Any = None) -> Tensor:
    """A leaf Tensor holding `np.asarray(data, dtype)` (no copy when already an array)."""
    if isinstance(data, Tensor):
        data = data.data
    return Tensor(np.asarray(data, dtype=dtype), requires_grad=requires_grad)


def apply(prim: Primitive, args: tuple, kw: dict) -> Tensor:
    """Run `prim` on the values of `args` and record the result if a gradient is needed."""
    # Unary and binary ops are nearly all ops: gather values and differentiable edges
    # without a comprehension (which costs a frame per call on Python 3.11).
    edges = None
    record = STATE.grad_enabled
    if len(args) == 2:
        a, b = args
        if isinstance(a, Tensor):
            da = a.data
            if record and a.requires_grad:
                edges = [(0, a, a._version)]
        else:
            da = a
        if isinstance(b, Tensor):
            db = b.data
            if record and b.requires_grad:
                edges = ([(1, b, b._version)] if edges is None
                         else [edges[0], (1, b, b._version)])
        else:
            db = b
        datas = [da, db]
    elif len(args) == 1:
        a = args[0]
        if isinstance(a, Tensor):
            datas = [a.data]
            if record and a.requires_grad:
                edges = [(0, a, a._version)]
        else:
            datas = [a]
    else:
        datas = []
        for i, a in enumerate(args):
            if isinstance(a, Tensor):
                datas.append(a.data)
                if record and a.requires_grad:
                    if edges is None:
                        edges = [(i, a, a._version)]
                    else:
                        edges.append((i, a, a._version))
            else:
                datas.append(a)
    if not record and STATE.capture is not None:
        _capture(args)
    try:
        y = prim.fwd(*datas, **kw) if kw else prim.fwd(*datas)
    except (ValueError, IndexError, TypeError) as e:
        shapes = ", ".join(str(np.shape(d)) for d in datas)
        raise type(e)(f"{prim.name}: invalid inputs of shapes {shapes}: {e}") from None
    res = None
    if prim.residual:
        y, res = y
    out = Tensor.__new__(Tensor)
    out.data = y
    out.grad = out._hooks = out._tangent = out._origin = out.grad_buffer = None
    out._version = 0
    if edges is None:
        out.requires_grad = False
        out._prim = out._inputs = out._vals = out._kw = out._edges = None
    else:
        out.requires_grad = True
        out._prim = prim
        out._inputs = args
        out._vals = datas  # the input values, so backward need not gather them again
        out._kw = kw if res is None else {**kw, "res": res}
        out._edges = edges
    if STATE.forward_active:
        _push_tangent(prim, args, datas, kw, out)
    if STATE.anomaly:
        _check_forward(prim, out)
    return out


def _capture(args: tuple) -> None:
    """Note the arguments that need a gradient, for the checkpointed segment running now."""
    for a in args:
        if isinstance(a, Tensor) and a.requires_grad:
            STATE.capture.setdefault(id(a), a)


def _push_tangent(prim: Primitive, args: tuple, datas: list, kw: dict, out: Tensor) -> None:
    """Forward mode: at each live level, outermost first, out's tangent is the sum of each
    input's tangent through its JVP rule.

    The rule runs on raw values unless its own arithmetic has to be differentiated: when the
    step is recorded for reverse mode (reverse-over-forward), or when a level outside this one
    reaches the step through its values or tangents (jvp of jvp). Then it runs on the Tensors
    with only the outer levels live, so its operations push their tangents and not this
    level's (no perturbation confusion), and the tangent is a Tensor that carries them.
    """
    levels, live = STATE.forward_levels, STATE.forward_active
    for k in range(live):
        level = levels[k]
        terms = []
        for i, a in enumerate(args):
            if isinstance(a, Tensor) and a._tangent is not None:
                t = a._tangent.get(level)
                if t is not None:
                    terms.append((i, t))
        if not terms:
            continue
        if not prim.jvp:
            raise NotImplementedError(f"forward mode: primitive '{prim.name}' has no JVP rule")
        traced = out.requires_grad
        if not traced:
            outer = levels[:k]
            for _, t in terms:
                if isinstance(t, Tensor) and (t.requires_grad or _has_level(t, outer)):
                    traced = True
                    break
            else:
                traced = k > 0 and any(_has_level(a, outer) for a in args)
        t_out = None
        if traced:
            STATE.forward_active = k
            try:
                for i, t in terms:
                    r = prim.jvp[i](t, out, *args, **kw)
                    t_out = r if t_out is None else t_out + r
            finally:
                STATE.forward_active = live
        else:
            for i, t in terms:
                if isinstance(t, Tensor):
                    t = t.data
                r = prim.jvp[i](t, out.data, *datas, **kw)
                t_out = r if t_out is None else t_out + r
        if out._tangent is None:
            out._tangent = {level: t_out}
        else:
            out._tangent[level] = t_out


def _has_level(x: Any, levels: tuple[int, ...]) -> bool:
    """Whether x is a Tensor with a tangent at one of `levels`."""
    t = x._tangent if isinstance(x, Tensor) else None
    return bool(t) and any(level in t for level in levels)


def live_tangent(x: Any) -> bool:
    """Whether x is a Tensor with a tangent at a live forward-mode level."""
    return _has_level(x, STATE.forward_levels[: STATE.forward_active])


def _check_forward(prim: Primitive, out: Tensor) -> None:
    if out.requires_grad:
        out._origin = traceback.extract_stack(limit=12)[:-3]
    y = out.data
    if np.issubdtype(np.asarray(y).dtype, np.inexact) and not np.all(np.isfinite(y)):
        raise FloatingPointError(f"anomaly: forward of '{prim.name}' produced NaN or Inf"
                                 f"{_where(out._origin or traceback.extract_stack()[:-3])}")


def _where(stack: traceback.StackSummary | list) -> str:
    frames = [f for f in stack if "/distad/autodiff/" not in f.filename.replace("\\", "/")]
    if not frames:
        return ""
    f = frames[-1]
    return f" (created at {f.filename}:{f.lineno}: {f.line})"


# ---- the reverse walk -----------------------------------------------------------------

def _graph(root: Tensor, stop: set | None) -> dict:
    """Consumer counts of every vertex that reaches a `requires_grad` leaf from root.

    Iterative DFS; a vertex in `stop` is treated as a leaf (functional
    transforms stop at their own inputs).
    """
    pending = {root: 0}
    stack = [root]
    while stack:
        v = stack.pop()
        edges = v._edges
        if edges is None or (stop is not None and v in stop):
            continue
        if edges is _FREED:
            raise RuntimeError(
                f"backward through a freed graph: the tape of '{v._prim.name}' was released by "
                "an earlier backward; pass retain_graph=True to the first backward() if you "
                "need to differentiate twice")
        for _, a, _ in edges:
            n = pending.get(a)
            if n is None:
                pending[a] = 1
                stack.append(a)
            else:
                pending[a] = n + 1
    return pending


def _seed(root: Tensor, grad: Any, create_graph: bool):
    if grad is None:
        if root.data.size != 1:
            raise RuntimeError(
                f"backward: output of shape {root.shape} is not a scalar; pass its cotangent "
                "(an array of the same shape) as backward(grad)")
        grad = np.ones(root.data.shape, dtype=root.data.dtype)
    else:
        gdata = grad.data if isinstance(grad, Tensor) else np.asarray(grad, dtype=root.dtype)
        if gdata.shape != root.shape:
            raise ValueError(f"backward: cotangent shape {gdata.shape} does not match output "
                             f"shape {root.shape}")
        if not isinstance(grad, Tensor):
            grad = gdata
    if create_graph and not isinstance(grad, Tensor):
        grad = Tensor(grad)
    return grad


def backprop(root: Tensor, grad: Any = None, *, inputs: Sequence[Tensor] | None = None,
             retain_graph: bool = False, create_graph: bool = False,
             input_hooks: bool = True) -> list | None:
    """Propagate the cotangent `grad` of `root` back through the tape.

    With `inputs=None`, gradients are accumulated into each leaf's `.grad`
    (hooks run first, as soon as the leaf's gradient is final). With `inputs`,
    the walk stops at those tensors and their cotangents are returned as a
    list (None where unreachable), leaving every `.grad` untouched; their hooks
    run unless `input_hooks=False` (a checkpointed segment's walk: its cotangents
    are only part of what the outer walk will hand those tensors).

    Vertices are processed in reverse topological order by dependency count
    (Kahn's algorithm with a LIFO ready set), so each gradient is final — and
    its hooks fire — as early as possible in the walk.
    """
    if not isinstance(root, Tensor):
        raise TypeError(f"backward: expected a Tensor, got {type(root).__name__}")
    if not root.requires_grad:
        raise RuntimeError("backward: the output does not depend on any tensor that requires "
                           "a gradient (were the inputs created with requires_grad=True, or "
                           "was it computed under no_grad?)")
    stop = set(inputs) if inputs is not None else None
    pending = _graph(root, stop)
    g0 = _seed(root, grad, create_graph)
    grads = {root: g0}
    ready = [root]
    deferred: list[Tensor] = []  # vertices of blocking primitives, run when nothing else is
    anomaly = STATE.anomaly
    prev_enabled = STATE.grad_enabled
    STATE.grad_enabled = create_graph
    STATE.backward_depth += 1
    try:
        while ready or deferred:
            v = ready.pop() if ready else deferred.pop(0)
            g = grads.pop(v)
            prim = v._prim
            if stop is not None and (prim is None or v in stop):
                if v in stop:  # functional mode: hooks of other leaves (parameters) stay quiet
                    grads[v] = _run_hooks(v, g) if v._hooks and input_hooks else g
                continue
            if v._hooks:
                g = _run_hooks(v, g)
            if prim is None:
                _accumulate_leaf(v, g)
                continue
            args = v._inputs
            if create_graph:
                y, vals = v, args
            else:
                y, vals = v.data, v._vals
            kw = v._kw
            vjps = prim.vjp
            for i, a, version in v._edges:
                if a._version != version:
                    raise RuntimeError(_modified_message(prim, v, i, a))
                buffer = None
                if (a.grad_buffer is not None and prim.vjp_into is not None and i in prim.vjp_into
                        and stop is None and not create_graph and pending[a] == 1
                        and a not in grads):
                    buffer = a.grad_buffer()  # this is the leaf's whole gradient: write it there
                if buffer is not None:
                    gi = prim.vjp_into[i](*buffer, g, y, *vals, **kw)
                else:
                    gi = vjps[i](g, y, *vals, **kw) if kw else vjps[i](g, y, *vals)
                if anomaly:
                    _check_backward(prim, v, gi)
                prev = grads.get(a)
                grads[a] = gi if prev is None else prev + gi
                left = pending[a] - 1
                if left == 0:
                    del pending[a]  # nothing else holds the vertex: its activation can go
                    p = a._prim
                    (deferred if p is not None and p.blocking else ready).append(a)
                else:
                    pending[a] = left
            if not retain_graph and not create_graph:
                v._edges = _FREED
                v._inputs = v._vals = v._kw = None
    except BaseException:
        if STATE.backward_depth == 1:
            STATE.callbacks.clear()  # a failed walk must not run its callbacks in the next one
        raise
    finally:
        STATE.grad_enabled = prev_enabled
        STATE.backward_depth -= 1
    if STATE.backward_depth == 0 and STATE.callbacks:
        callbacks, STATE.callbacks = STATE.callbacks, []
        for fn in callbacks:
            fn()
    if inputs is None:
        return None
    return [grads.get(t) for t in inputs]


def _modified_message(prim: Primitive, v: Tensor, i: int, a: Tensor) -> str:
    return (f"backward: input {i} of '{prim.name}' (shape {a.shape}, {a.dtype}) was changed in "
            f"place after the forward pass used it (by an optimizer step or load_state_dict), so "
            f"the values saved for backward are stale; run backward before updating the "
            f"parameters{_where(v._origin or [])}")


def mark_modified(t: Tensor) -> None:
    """Record that t's values were changed in place: a graph that used the old values refuses
    to run backward through them (PyTorch's version counter)."""
    t._version += 1


def _run_hooks(v: Tensor, g: Any) -> Any:
    for hook in v._hooks:
        r = hook(g)
        if r is not None:
            g = r
    return g


def _accumulate_leaf(leaf: Tensor, g: Any) -> None:
    if type(g) is not np.ndarray:
        g = g.data if isinstance(g, Tensor) and not g.requires_grad else g
        if not isinstance(g, (np.ndarray, Tensor)):
            g = np.asarray(g)
    if g.shape != leaf.data.shape:  # a rule bug would otherwise corrupt .grad silently
        raise RuntimeError(f"backward: gradient of shape {g.shape} for a leaf of shape "
                           f"{leaf.shape}")
    if type(g) is np.ndarray:
        # Gradient arrays may be shared between leaves (the rule of a + b hands the same g to
        # both), so they are read-only: replace .grad, never update it in place.
        g.flags.writeable = False
    leaf.grad = g if leaf.grad is None else leaf.grad + g


def _check_backward(prim: Primitive, v: Tensor, g: Any) -> None:
    d = g.data if isinstance(g, Tensor) else np.asarray(g)
    if not np.all(np.isfinite(d)):
        raise FloatingPointError(f"anomaly: backward of '{prim.name}' produced NaN or Inf"
                                 f"{_where(v._origin or [])}")
