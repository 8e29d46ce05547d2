"""Gradient synchronisation strategies: how one flat bucket is averaged across ranks.

DataParallel and `parallel.value_and_grad` hand each flat gradient buffer to a
strategy's `reduce(buffer, key)`, which leaves the average over ranks in
`buffer` and reports what it sent and how long each phase took. The exact
float Allreduce lives here; compressed strategies come from `distad.compress`
(compressor + memory + aggregation), so this layer holds no compression logic.
"""

from __future__ import annotations

import time
from typing import Any, Protocol

import numpy as np

from ..comm import Communicator


class GradientSync(Protocol):
    """Averages a flat gradient buffer over the ranks of a communicator, in place.

    `prescale` is the factor the caller applies while copying gradients into
    the buffer (1/size for a plain sum: dividing before adding costs no extra
    pass and keeps low-precision sums from overflowing); `reduce` does the rest.
    """

    prescale: float

    def reduce(self, buffer: np.ndarray, key: int) -> dict[str, Any]:
        """Replace `buffer` by its mean over ranks; return {"bytes_sent", "<phase>_s", ...}."""
        ...

    def state_dict(self) -> dict[str, np.ndarray]: ...

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None: ...


class AllreduceMean:
    """Exact averaging: an in-place Allreduce (built-in SUM) of the buffer, then / size."""

    name = "none"

    def __init__(self, comm: Communicator) -> None:
        self.comm = comm
        self.prescale = 1.0 / comm.size

    def reduce(self, buffer: np.ndarray, key: int) -> dict[str, Any]:
        """Sum the (pre-divided) buffer over ranks in place: the mean."""
        if self.comm.size == 1:
            return {"bytes_sent": 0, "communicate_s": 0.0}
        t = time.perf_counter()
        self.comm.allreduce(buffer, out=buffer)
        return {"bytes_sent": buffer.nbytes, "communicate_s": time.perf_counter() - t}

    def state_dict(self) -> dict[str, np.ndarray]:
        return {}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        if state:
            raise ValueError(f"AllreduceMean has no state, got keys {sorted(state)}")


def make_sync(compressor: Any, comm: Communicator) -> GradientSync:
    """The strategy for `compressor`: None or "none" is the exact Allreduce; a spec string or
    a `distad.compress` object gives a compressed strategy."""
    if compressor is None or compressor == "none":
        return AllreduceMean(comm)
    from ..compress import make_gradient_sync  # compress sits beside comm, below parallel

    return make_gradient_sync(compressor, comm)
