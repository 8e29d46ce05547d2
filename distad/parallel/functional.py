"""The gradient service for any function of parameters and a data shard."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from .. import autodiff as ad
from ..autodiff.transforms import tree_flatten, tree_unflatten
from ..comm import Communicator
from .sync import make_sync

__all__ = ["value_and_grad"]


def value_and_grad(f: Callable, comm: Communicator | None = None, reduce: str = "mean",
                   compressor: Any = None) -> Callable:
    """`f(params, shard, *rest) -> scalar` evaluated on every rank's shard, reduced globally.

    Returns a function giving `(value, grads)` on every rank: with
    reduce="mean" the average over ranks of f's value and of its gradient
    with respect to `params` (a pytree: an array, or a list/tuple/dict of
    arrays) — the global mean when f averages over equal-sized shards; with
    reduce="sum", their sums. Every rank gets bit-identical results, so a
    full-batch optimiser (e.g. L-BFGS) takes the identical step everywhere.
    Gradients are fused into one buffer per dtype, so each call costs one
    collective per dtype plus one for the value.
    """
    if reduce not in ("mean", "sum"):
        raise ValueError(f"parallel.value_and_grad: reduce must be 'mean' or 'sum', got {reduce!r}")
    comm = comm if comm is not None else Communicator()
    sync = make_sync(compressor, comm)
    local = ad.value_and_grad(f, argnums=0)

    def wrapped(params: Any, shard: Any, *rest: Any):
        value, grads = local(params, shard, *rest)
        leaves, treedef = tree_flatten(grads)
        by_dtype: dict[np.dtype, list[int]] = {}
        for i, g in enumerate(leaves):
            by_dtype.setdefault(np.asarray(g).dtype, []).append(i)
        out = list(leaves)
        for key, (dtype, idx) in enumerate(sorted(by_dtype.items(), key=lambda kv: kv[0].str)):
            flat = np.concatenate([np.ravel(leaves[i]) for i in idx]).astype(dtype, copy=False)
            flat *= sync.prescale
            sync.reduce(flat, key)
            if reduce == "sum":
                np.multiply(flat, comm.size, out=flat)
            offset = 0
            for i in idx:
                n = np.size(leaves[i])
                out[i] = flat[offset:offset + n].reshape(np.shape(leaves[i]))
                offset += n
        v = np.array([np.asarray(value, dtype=np.float64)])
        comm.allreduce(v, out=v)
        total = v[0] / comm.size if reduce == "mean" else v[0]
        return np.asarray(total, dtype=np.asarray(value).dtype), tree_unflatten(treedef, out)

    return wrapped
