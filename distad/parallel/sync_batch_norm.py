"""SyncBatchNorm: batch normalisation with the statistics of every rank's batch together."""

from __future__ import annotations

from typing import Any

import numpy as np

from distad.comm import Communicator
from distad.comm.collectives import allreduce
from distad.nn.norm import _BatchNorm


class SyncBatchNorm(_BatchNorm):
    """BatchNorm for (N, C), (N, C, L) and (N, C, H, W) inputs whose training statistics are
    those of all ranks' batches together.

    Under DataParallel it computes what one process computes on the global batch: the element
    count and the per-channel sums go through the differentiable allreduce (two in forward,
    their transposes in backward), so the running statistics are the same on every rank and
    the gradients are those of the global batch's normalisation. The collectives run on a
    communicator of its own, split from `comm` (the world by default) at construction, which
    is therefore collective: every rank builds the same model. Its own, because backward's
    allreduces run while DataParallel's communication thread reduces gradient buckets, and
    two threads must not interleave collectives on one communicator. Evaluation uses the
    running statistics and no communication.
    """

    _dims = (2, 3, 4)

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True,
                 dtype: Any = np.float32, comm: Communicator | None = None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, dtype)
        own = (comm if comm is not None else Communicator()).split(0)
        object.__setattr__(self, "comm", own)
        if own.size > 1:  # on one rank the batch's own statistics are the group's
            object.__setattr__(self, "_group_sum", lambda a: allreduce(a, own))
