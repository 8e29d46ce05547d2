"""Differentiable communication: collectives and messages whose VJPs are their exact transposes.

The function being differentiated is the *global* one: the sum of every rank's
loss (DESIGN.md). Under that convention each rule below is the transpose of its
forward, written as the dual operation on the cotangents:

    forward                              VJP (g: the output cotangent)
    allreduce       y = sum_r x_r         allreduce(g)            (sum of the ranks' cotangents)
    allgather       y = [x_0; ...; x_P-1] reduce_scatter(g)       (chunk r of the summed g)
    reduce_scatter  y_r = (sum_s x_s)[r]  allgather(g)
    send/recv       y_B = x_A             g travels back from B to A

Tensor parallelism (Megatron-LM) treats a replicated value as *one* variable,
not P copies, which gives the named pair:

    copy_to_parallel      forward identity    backward allreduce(g)
    reduce_from_parallel  forward allreduce   backward identity
    scatter_to_parallel   forward own chunk   backward allgather(g)
    gather_from_parallel  forward allgather   backward own chunk of g

Collectives are collective in both directions: every rank of `comm` must call
them in the same order, and every rank's backward must reach them (each rank's
loss must depend on the output), or the ranks that did call wait for the
others. The rules are written with these same primitives, so they also run on
recorded Tensors (higher-order derivatives of the collectives); forward mode
(JVP) is the forward op on the tangents. `send`/`recv` are first order only.

Nothing here imports mpi4py: the Communicator passed in does the messaging.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any

import numpy as np

from distad.autodiff import Primitive, Tensor

if TYPE_CHECKING:
    from distad.comm.communicator import Communicator
    from distad.comm.request import Request

__all__ = ["allreduce", "allgather", "reduce_scatter", "copy_to_parallel",
           "reduce_from_parallel", "scatter_to_parallel", "gather_from_parallel", "send", "recv",
           "wait_sends"]


def _v(a: Any) -> np.ndarray:
    return a.data if isinstance(a, Tensor) else np.asarray(a)


def _axis(opname: str, x: np.ndarray, axis: int) -> int:
    if x.ndim == 0:
        raise ValueError(f"{opname}: needs an array with at least one axis, got a scalar")
    if not -x.ndim <= axis < x.ndim:
        raise ValueError(f"{opname}: axis {axis} is out of range for shape {x.shape}")
    return axis % x.ndim


# ---- forwards ------------------------------------------------------------------------------

def _allreduce_fwd(x: np.ndarray, comm: Communicator, mean: bool = False) -> np.ndarray:
    out = comm.allreduce(np.ascontiguousarray(x))
    if mean:
        out /= comm.size  # in place: float32 stays float32
    return out


def _allgather_fwd(x: np.ndarray, comm: Communicator, axis: int = 0) -> np.ndarray:
    x = np.asarray(x)
    ax = _axis("allgather", x, axis)
    stacked = comm.allgather(np.ascontiguousarray(x))  # (P, *x.shape), row r from rank r
    if ax == 0:
        return stacked.reshape((comm.size * x.shape[0], *x.shape[1:]))
    return np.concatenate(stacked, axis=ax)


def _reduce_scatter_fwd(x: np.ndarray, comm: Communicator, axis: int = 0) -> np.ndarray:
    x = np.asarray(x)
    ax = _axis("reduce_scatter", x, axis)
    if x.shape[ax] % comm.size:
        raise ValueError(f"reduce_scatter: axis {axis} of shape {x.shape} is not divisible by "
                         f"the {comm.size} ranks (rank {comm.rank})")
    out = comm.reduce_scatter(np.ascontiguousarray(np.moveaxis(x, ax, 0)))
    return np.ascontiguousarray(np.moveaxis(out, 0, ax))


def _chunk(x: Any, comm: Communicator, axis: int = -1) -> Any:
    """This rank's chunk of x (array or Tensor) along axis: the r-th of comm.size equal parts."""
    shape = np.shape(_v(x))
    ax = axis % len(shape) if shape and -len(shape) <= axis < len(shape) else 0
    if not shape or not -len(shape) <= axis < len(shape) or shape[ax] % comm.size:
        raise ValueError(f"cannot split shape {shape} along axis {axis} into {comm.size} equal "
                         f"chunks (rank {comm.rank})")
    k = shape[ax] // comm.size
    return x[(slice(None),) * ax + (slice(comm.rank * k, (comm.rank + 1) * k),)]


# ---- the table: forward, VJP, JVP ------------------------------------------------------------

allreduce_p = Primitive(
    "allreduce", _allreduce_fwd,
    vjp=(lambda g, y, x, comm, mean=False: allreduce_p(g, comm=comm, mean=mean),),
    jvp=(lambda t, y, x, comm, mean=False: allreduce_p(t, comm=comm, mean=mean),))
allgather_p = Primitive(
    "allgather", _allgather_fwd,
    vjp=(lambda g, y, x, comm, axis=0: reduce_scatter_p(g, comm=comm, axis=axis),),
    jvp=(lambda t, y, x, comm, axis=0: allgather_p(t, comm=comm, axis=axis),))
reduce_scatter_p = Primitive(
    "reduce_scatter", _reduce_scatter_fwd,
    vjp=(lambda g, y, x, comm, axis=0: allgather_p(g, comm=comm, axis=axis),),
    jvp=(lambda t, y, x, comm, axis=0: reduce_scatter_p(t, comm=comm, axis=axis),))
copy_to_parallel_p = Primitive(
    "copy_to_parallel", lambda x, comm: x,
    vjp=(lambda g, y, x, comm: allreduce_p(g, comm=comm),),
    jvp=(lambda t, y, x, comm: t,))
reduce_from_parallel_p = Primitive(
    "reduce_from_parallel", _allreduce_fwd,
    vjp=(lambda g, y, x, comm: g,),
    jvp=(lambda t, y, x, comm: allreduce_p(t, comm=comm),))

scatter_to_parallel_p = Primitive(
    "scatter_to_parallel", _chunk,
    vjp=(lambda g, y, x, comm, axis=-1: allgather_p(g, comm=comm, axis=axis),),
    jvp=(lambda t, y, x, comm, axis=-1: _chunk(t, comm, axis),))
gather_from_parallel_p = Primitive(
    "gather_from_parallel", _allgather_fwd,
    vjp=(lambda g, y, x, comm, axis=-1: _chunk(g, comm, axis),),
    jvp=(lambda t, y, x, comm, axis=-1: allgather_p(t, comm=comm, axis=axis),))


def allreduce(x: Any, comm: Communicator, op: str = "sum") -> Any:
    """Sum (or mean, `op="mean"`) of `x` over the ranks of `comm`, on every rank.

    `x` is a Tensor or array of any shape; the result has its shape and dtype.
    Backward: the cotangents of all ranks are summed (averaged for "mean") —
    the exact transpose, since the global loss is the sum of the ranks' losses.
    """
    if op not in ("sum", "mean"):
        raise ValueError(f"allreduce: op must be 'sum' or 'mean' to be differentiable, got {op!r}")
    return allreduce_p(x, comm=comm, mean=op == "mean")


def allgather(x: Any, comm: Communicator, axis: int = 0) -> Any:
    """Concatenate every rank's `x` along `axis` (rank order), on every rank.

    Every rank passes the same shape; the result is that shape with `axis`
    multiplied by `comm.size`, in x's dtype. Backward: reduce_scatter of the
    cotangent along the same axis (rank r gets its chunk, summed over ranks).
    """
    return allgather_p(x, comm=comm, axis=axis)


def reduce_scatter(x: Any, comm: Communicator, axis: int = 0) -> Any:
    """Sum `x` over the ranks and give rank r the r-th of `comm.size` equal chunks along `axis`.

    `x.shape[axis]` must be divisible by `comm.size`; the result has that axis
    divided by it, in x's dtype. Backward: allgather of the cotangents along
    the same axis.
    """
    return reduce_scatter_p(x, comm=comm, axis=axis)


def copy_to_parallel(x: Any, comm: Communicator) -> Any:
    """Enter a tensor-parallel region: forward identity, backward allreduce (sum) of g.

    `x` holds the same value on every rank of `comm` and is consumed by each
    rank's shard of a layer; its gradient is the sum of the shards' cotangents.
    """
    return copy_to_parallel_p(x, comm=comm)


def reduce_from_parallel(x: Any, comm: Communicator) -> Any:
    """Leave a tensor-parallel region: forward allreduce (sum), backward identity.

    The ranks' partial results are summed into one value replicated on every
    rank; the code after it runs identically everywhere and its loss counts
    once, so each rank's partial result gets the cotangent unchanged.
    """
    return reduce_from_parallel_p(x, comm=comm)


def scatter_to_parallel(x: Any, comm: Communicator, axis: int = -1) -> Any:
    """Enter a tensor-parallel region sharded: forward this rank's chunk, backward allgather.

    `x` is replicated (one variable); rank r keeps the r-th of `comm.size`
    equal chunks along `axis` and x's gradient is the concatenation of the
    chunks' cotangents. `x.shape[axis]` must be divisible by `comm.size`.
    """
    return scatter_to_parallel_p(x, comm=comm, axis=axis)


def gather_from_parallel(x: Any, comm: Communicator, axis: int = -1) -> Any:
    """Leave a tensor-parallel region by concatenation: forward allgather, backward own chunk.

    The shards are joined along `axis` into one value replicated on every
    rank; the code after it runs identically everywhere and counts once, so
    each shard's gradient is its chunk of the (replicated) cotangent.
    """
    return gather_from_parallel_p(x, comm=comm, axis=axis)


# ---- point to point ----------------------------------------------------------------------------
#
# The n-th message from A to B on a Communicator gets tag 2*(n mod 2**14) and its gradient, sent
# from B back to A, tag 2*(n mod 2**14) + 1. Both sides count their own sends to / receives from
# each peer, so tags are deterministic and match however the two backward passes are ordered.
#
# Deadlock freedom. Forward: a send never blocks (Isend), a recv blocks for its data. Backward,
# the roles swap: recv's VJP sends the cotangent without blocking, send's VJP blocks until the
# cotangent arrives. If every rank runs its backward messages in the reverse of its forward
# order, a wait-for cycle in the backward would be the time-reversal of one in the forward, so
# a forward that completed has a backward that completes. The engine orders vertices only by
# data dependence, so `after=` adds the missing one: an op given the previous op's result as
# `after` is differentiated before it.

_TAG_SPAN = 1 << 14
_counters: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_pending: list[Request] = []


def _next_tag(comm: Communicator, kind: str, peer: int) -> int:
    counts = _counters.setdefault(comm, {})
    n = counts.get((kind, peer), 0)
    counts[(kind, peer)] = n + 1
    return n % _TAG_SPAN


def _reap() -> None:
    """Forget completed sends (their buffers may then be freed)."""
    if _pending:
        _pending[:] = [r for r in _pending if not r.test()]


def _send_fwd(x: np.ndarray, after: Any, dest: int, comm: Communicator, tag: int) -> np.ndarray:
    _reap()
    x = np.asarray(x)
    _pending.append(comm.isend(np.ascontiguousarray(x), dest, 2 * tag))
    return np.zeros((), dtype=x.dtype if x.dtype.kind == "f" else np.float32)


def _send_vjp_x(g: Any, y: Any, x: Any, after: Any, dest: int, comm: Communicator,
                tag: int) -> np.ndarray:
    xv = _v(x)
    req = comm.irecv(np.empty(xv.shape, dtype=xv.dtype), dest, 2 * tag + 1)
    _reap()
    return req.wait()


def _recv_fwd(after: Any, shape: tuple[int, ...], dtype: Any, source: int, comm: Communicator,
              tag: int) -> np.ndarray:
    _reap()
    return comm.recv(np.empty(shape, dtype=dtype), source, 2 * tag)


def _recv_vjp(g: Any, y: Any, after: Any, shape: tuple[int, ...], dtype: Any, source: int,
              comm: Communicator, tag: int) -> np.ndarray:
    _reap()
    _pending.append(comm.isend(np.ascontiguousarray(_v(g), dtype=dtype), source, 2 * tag + 1))
    return np.zeros_like(_v(after))


def _ordering_vjp(g: Any, y: Any, x: Any, after: Any, **kw: Any) -> np.ndarray:
    return np.zeros_like(_v(after))  # `after` only orders the backward; it carries no gradient


def _no_jvp(*args: Any, **kw: Any) -> Any:
    raise NotImplementedError("send/recv: forward mode (JVP) across ranks is not supported")


send_p = Primitive("send", _send_fwd, vjp=(_send_vjp_x, _ordering_vjp), jvp=(_no_jvp, _no_jvp),
                   blocking=True)  # its VJP receives the cotangent: run it last
recv_p = Primitive("recv", _recv_fwd, vjp=(_recv_vjp,), jvp=(_no_jvp,))


def _tag(comm: Communicator, kind: str, peer: int, tag: int | None) -> int:
    if tag is None:
        return _next_tag(comm, kind, peer)
    if not 0 <= tag < _TAG_SPAN:
        raise ValueError(f"{kind}: tag must be in [0, {_TAG_SPAN}), got {tag}")
    return int(tag)


def _anchor(after: Any, dtype: np.dtype) -> Any:
    """What a message op hangs on: `after` if it is on the tape, else a fresh empty leaf."""
    if isinstance(after, Tensor) and after.requires_grad:
        return after
    return Tensor(np.zeros(0, dtype=dtype), requires_grad=True)


def send(x: Any, dest: int, comm: Communicator, *, after: Any = None,
         tag: int | None = None) -> Any:
    """Send `x` to rank `dest` without blocking; return a zero scalar token carrying its gradient.

    Add the token to this rank's loss (`(loss + token).backward()`, or
    `token.backward()` if the rank has no loss of its own): when the backward
    pass reaches it, it waits for d(global loss)/dx from `dest` — sent by the
    matching `recv`'s backward — and continues from x. The token is 0 (in x's
    floating dtype) and does not change the loss. `after`: the result of this
    rank's previous send/recv, so the backward handles them in reverse order
    (needed for deadlock freedom when a rank both sends and receives). `tag`
    (< 16384) is optional: by default the n-th send to `dest` on this
    Communicator pairs with the n-th recv from this rank on the other side.
    """
    t = _tag(comm, "send", dest, tag)
    if not (isinstance(after, Tensor) and after.requires_grad):
        after = np.zeros(0, dtype=_v(x).dtype)  # a constant: no vertex to order against
    return send_p(x, after, dest=int(dest), comm=comm, tag=t)


def recv(shape: tuple[int, ...], dtype: Any, source: int, comm: Communicator, *,
         after: Any = None, tag: int | None = None, requires_grad: bool = True) -> Tensor:
    """Receive an array of `shape` and `dtype` from rank `source`, as a Tensor.

    MPI carries no shapes: they are the protocol's (a wrong size raises
    CommError naming both sizes). With `requires_grad` (floating dtypes), the
    backward pass that reaches the result sends its cotangent back to
    `source` without blocking, where the matching `send`'s token picks it up;
    pass `requires_grad=False` for data whose sender expects no gradient.
    `after` and `tag` as in `send`: a rank that sends and then receives
    writes `z = recv(..., after=token)`.
    """
    dtype = np.dtype(dtype)
    t = _tag(comm, "recv", source, tag)
    shape = tuple(int(s) for s in shape)
    anchor: Any = np.zeros(0, dtype=dtype)
    if requires_grad and dtype.kind == "f":
        anchor = _anchor(after, dtype)  # gives the received value a tape vertex
    out = recv_p(anchor, shape=shape, dtype=dtype, source=int(source), comm=comm, tag=t)
    return out if isinstance(out, Tensor) else Tensor(out)


def wait_sends() -> None:
    """Block until every message started by `send` or a `recv`'s backward has been delivered."""
    while _pending:
        _pending.pop().wait()
