"""Fusion buckets: many small gradients packed into a few flat buffers.

One collective per bucket instead of one per parameter is what makes gradient
synchronisation cost about one Allreduce of the whole model (Horovod's tensor
fusion, PyTorch DDP's buckets). Buckets are filled in reverse parameter order,
the order in which backward produces gradients, with a small first bucket so
communication starts early, then buckets of up to `cap_mb`. Inside a bucket the
parameters lie in model order, so that a sharding of the parameters into contiguous runs
(ZeRO) gives each rank one contiguous piece of every bucket, in rank order: what a
reduce-scatter delivers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np


@dataclass
class Bucket:
    """A flat buffer holding the gradients of `params` at `offsets` (one dtype per bucket).

    `views[k]` is a writable view of parameter k's slot shaped like the
    parameter, `grads[k]` a read-only view of the same slot (what `p.grad`
    points at after the reduction); `ready[k]` says whether its gradient
    arrived this step.
    """

    index: int
    params: list
    offsets: list[int]
    buffer: np.ndarray
    views: list[np.ndarray] = field(default_factory=list)
    grads: list[np.ndarray] = field(default_factory=list)
    ready: np.ndarray = field(default=None)
    pending: int = 0

    @property
    def nbytes(self) -> int:
        return self.buffer.nbytes

    def slot(self, k: int) -> np.ndarray:
        """A new writable view of parameter k's slot, shaped like the parameter."""
        v = self.views[k]
        return self.buffer[self.offsets[k]:self.offsets[k] + v.size].reshape(v.shape)

    def reset(self) -> None:
        """Mark every slot as waiting for its gradient (start of a step)."""
        self.ready[:] = False
        self.pending = len(self.params)

    def fill_missing(self) -> int:
        """Zero the slots whose gradient never arrived (unused parameters); return how many."""
        missing = np.flatnonzero(~self.ready)
        for k in missing:
            self.views[k].fill(0)
        self.ready[:] = True
        self.pending = 0
        return len(missing)


def plan_buckets(params: Sequence, cap_mb: float = 25.0, first_mb: float = 1.0) -> list[Bucket]:
    """Assign parameters (given in model order) to buckets, in reverse order.

    Each bucket holds parameters of one dtype; a bucket closes when adding the
    next parameter would exceed its capacity (`first_mb` for the first bucket,
    `cap_mb` after), or when the dtype changes. A parameter larger than the
    cap gets a bucket of its own. Within a bucket, parameters (and their slots) are in
    model order.
    """
    if cap_mb <= 0 or first_mb <= 0:
        raise ValueError(f"plan_buckets: capacities must be positive, got cap_mb={cap_mb}, "
                         f"first_mb={first_mb}")
    groups: list[list] = []
    cap = first_mb * 2**20
    size = 0
    for p in reversed(list(params)):
        nbytes = p.data.nbytes
        if groups and groups[-1][0].dtype == p.dtype and size + nbytes <= cap:
            groups[-1].append(p)
            size += nbytes
            continue
        if groups:
            cap = cap_mb * 2**20
        groups.append([p])
        size = nbytes
    buckets = []
    for i, group in enumerate(groups):
        group.reverse()
        sizes = [p.data.size for p in group]
        offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(int).tolist()
        buffer = np.zeros(int(sum(sizes)), dtype=group[0].dtype)
        views = [buffer[o:o + n].reshape(p.shape) for p, o, n in zip(group, offsets, sizes)]
        grads = [v.view() for v in views]
        for g in grads:
            g.flags.writeable = False
        b = Bucket(i, group, offsets, buffer, views, grads, np.zeros(len(group), dtype=bool))
        b.reset()
        buckets.append(b)
    return buckets
