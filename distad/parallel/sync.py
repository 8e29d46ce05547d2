"""Gradient synchronisation strategies: how one flat bucket is averaged across ranks.

DataParallel and `parallel.value_and_grad` hand each flat gradient buffer to a
strategy's `reduce(buffer, key)`, which leaves the average over ranks in
`buffer` and reports what it sent and how long each phase took. The exact
float Allreduce lives here; compressed strategies come from `distad.compress`
(compressor + memory + aggregation), so this layer holds no compression logic.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from ..comm import Communicator

if TYPE_CHECKING:
    from ..compress import GradientCompression


class GradientSync(Protocol):
    """Averages a flat gradient buffer over the ranks of a communicator, in place.

    `prescale` is the factor the caller applies while copying gradients into
    the buffer (1/size for a plain sum: dividing before adding costs no extra
    pass and keeps low-precision sums from overflowing); `reduce` does the rest.
    """

    prescale: float

    def reduce(self, buffer: np.ndarray, key: int,
               shapes: list[tuple[int, ...]] | None = None) -> dict[str, Any]:
        """Replace `buffer` by its mean over ranks; return {"bytes_sent", "<phase>_s", ...}.

        `key` names the bucket (the same on every rank), `shapes` the tensors packed in it.
        """
        ...

    def state_dict(self) -> dict[str, np.ndarray]: ...

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None: ...

    def regroup(self, states: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        """This rank's state from the `state_dict()`s of a run on another number of ranks."""
        ...


class AllreduceMean:
    """Exact averaging: an in-place Allreduce (built-in SUM) of the buffer, then / size."""

    name = "none"

    def __init__(self, comm: Communicator) -> None:
        self.comm = comm
        self.prescale = 1.0 / comm.size

    def reduce(self, buffer: np.ndarray, key: int,
               shapes: list[tuple[int, ...]] | None = None) -> dict[str, Any]:
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
            raise ValueError(f"{type(self).__name__} has no state, got keys {sorted(state)}")

    def regroup(self, states: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        return {}


class ReduceScatterMean(AllreduceMean):
    """Exact averaging of this rank's own piece of each bucket only (ZeRO's gradient exchange).

    `counts[key]` gives, per rank, how many consecutive elements of bucket `key` it owns
    (in rank order). One Reduce_scatter per bucket leaves in this rank's piece the sum of
    the (pre-divided) gradients over ranks, the mean; the rest of the buffer keeps this
    rank's own contribution, which nobody must read. It moves half the bytes of an
    allreduce: its reduce-scatter phase without the allgather.
    """

    def __init__(self, comm: Communicator, counts: dict[int, np.ndarray]) -> None:
        super().__init__(comm)
        self.counts = {k: [int(c) for c in v] for k, v in counts.items()}
        self._piece: dict[int, np.ndarray] = {}  # receive buffer per bucket, reused

    def reduce(self, buffer: np.ndarray, key: int,
               shapes: list[tuple[int, ...]] | None = None) -> dict[str, Any]:
        """Sum this rank's piece of the (pre-divided) buffer over ranks, in place."""
        if self.comm.size == 1:
            return {"bytes_sent": 0, "communicate_s": 0.0}
        counts, rank = self.counts[key], self.comm.rank
        start = sum(counts[:rank])
        piece = self._piece.get(key)
        if piece is None:
            piece = self._piece[key] = np.empty(counts[rank], buffer.dtype)
        t = time.perf_counter()
        self.comm.reduce_scatterv(buffer, counts, out=piece)
        buffer[start:start + piece.size] = piece
        return {"bytes_sent": buffer.nbytes, "communicate_s": time.perf_counter() - t}


class CompressedSync:
    """Averaging through `distad.compress`: compressor x memory x aggregation, per bucket.

    The gradient is handed over as is (prescale 1): the aggregation strategy
    decides where to divide. Reports the exact bytes this rank passed to MPI.
    """

    prescale = 1.0

    def __init__(self, compression: GradientCompression, comm: Communicator) -> None:
        self.compression = compression
        self.comm = comm
        self.name = compression.spec

    def reduce(self, buffer: np.ndarray, key: int,
               shapes: list[tuple[int, ...]] | None = None) -> dict[str, Any]:
        result = self.compression.reduce_bucket(self.comm, key, buffer, shapes=shapes,
                                                out=buffer)
        return {"bytes_sent": result.bytes_sent, "strategy": result.strategy,
                "compress_s": result.compress_s, "communicate_s": result.communicate_s,
                "decompress_s": result.decompress_s}

    def state_dict(self) -> dict[str, np.ndarray]:
        return self.compression.state_dict()

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        self.compression.load_state_dict(state)

    def regroup(self, states: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        return self.compression.regroup_state_dicts(states, self.comm.rank)


def make_sync(compressor: Any, comm: Communicator) -> GradientSync:
    """The strategy for `compressor`: None or "none" is the exact Allreduce; a spec string
    (see `distad.compress.get`), a GradientCompression or a Compressor gives a compressed one."""
    if compressor is None or compressor == "none":
        return AllreduceMean(comm)
    from .. import compress  # compress sits beside comm, below parallel

    if isinstance(compressor, str):
        compressor = compress.get(compressor)
    elif isinstance(compressor, compress.Compressor):
        compressor = compress.GradientCompression(compressor)
    if not isinstance(compressor, compress.GradientCompression):
        raise TypeError(f"make_sync: expected a spec string, Compressor or GradientCompression, "
                        f"got {type(compressor).__name__}")
    return CompressedSync(compressor, comm)
