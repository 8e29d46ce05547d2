"""Process grids: COMM_WORLD split into data-, pipeline- and tensor-parallel sub-communicators.

Rank layout, as in Megatron-LM: tensor parallelism varies fastest (its
allreduces run every layer, so its ranks should be neighbours — on one node),
then data parallelism, then pipeline stages:

    world rank = tp_rank + tp * (dp_rank + dp * pp_rank)

With dp=2, pp=2 on 4 ranks: stage 0 is ranks {0, 1}, stage 1 is {2, 3}; the
pipelines are {0, 2} and {1, 3}, and ranks {0, 1} (and {2, 3}) average the
gradients of their shared stage.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..comm import Communicator

__all__ = ["Grid", "grid"]


@dataclass
class Grid:
    """This rank's place in a dp x pp x tp grid and the communicators along each axis.

    `dp`, `pp`, `tp` are Communicators over the ranks that differ from this
    one only in that coordinate (a size-1 axis gives a communicator of one
    rank); `dp_rank`, `pp_rank`, `tp_rank` are this rank's coordinates, equal
    to its rank in the matching communicator. `world` is the split one.
    """

    world: Communicator
    dp: Communicator
    pp: Communicator
    tp: Communicator
    dp_size: int
    pp_size: int
    tp_size: int
    dp_rank: int
    pp_rank: int
    tp_rank: int

    def free(self) -> None:
        """Release the three sub-communicators. Collective."""
        for c in (self.dp, self.pp, self.tp):
            c.free()

    def __str__(self) -> str:
        return (f"rank {self.world.rank}/{self.world.size}: dp {self.dp_rank}/{self.dp_size}, "
                f"pp {self.pp_rank}/{self.pp_size}, tp {self.tp_rank}/{self.tp_size}")


def grid(dp: int | None = None, pp: int = 1, tp: int = 1,
         comm: Communicator | None = None) -> Grid:
    """Split `comm` (default COMM_WORLD) into a dp x pp x tp grid; collective.

    `dp=None` takes whatever the other two leave: `comm.size // (pp * tp)`.
    The product must equal `comm.size`, or every rank raises the same
    ValueError naming the sizes.
    """
    comm = comm if comm is not None else Communicator()
    size = comm.size
    pp, tp = int(pp), int(tp)
    if pp < 1 or tp < 1 or (dp is not None and int(dp) < 1):
        raise ValueError(f"grid: sizes must be >= 1, got dp={dp}, pp={pp}, tp={tp}")
    if dp is None:
        dp = size // (pp * tp)
    dp = int(dp)
    if dp * pp * tp != size:
        raise ValueError(f"grid: dp={dp} x pp={pp} x tp={tp} = {dp * pp * tp} ranks, but the "
                         f"communicator has {size}")
    r = comm.rank
    tp_rank, rest = r % tp, r // tp
    dp_rank, pp_rank = rest % dp, rest // dp
    # Each split groups the ranks that share the other two coordinates, ordered by this one.
    dp_comm = comm.split(pp_rank * tp + tp_rank, key=dp_rank)
    pp_comm = comm.split(dp_rank * tp + tp_rank, key=pp_rank)
    tp_comm = comm.split(pp_rank * dp + dp_rank, key=tp_rank)
    return Grid(comm, dp_comm, pp_comm, tp_comm, dp, pp, tp, dp_rank, pp_rank, tp_rank)
