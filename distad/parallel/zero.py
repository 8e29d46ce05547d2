"""ZeroRedundancyOptimizer: optimizer state sharded over data-parallel ranks (ZeRO stage 1).

Data parallelism keeps a full copy of the optimizer state on every rank, which for Adam is
twice the parameters. Rajbhandari et al.'s stage 1 cuts it into shards: each rank owns a
contiguous slice of the parameters, keeps the state of that slice only and updates only
it; one Allgatherv then gives every rank every updated parameter. With gradients already
averaged (DataParallel), the update of each parameter is the same arithmetic on the same
numbers as the unsharded optimizer's, so the result is bit for bit the same.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from ..autodiff import Tensor, enable_grad, mark_modified
from ..comm import Communicator
from ..optim import Optimizer
from ..optim.optimizer import ParamsT

__all__ = ["ZeroRedundancyOptimizer"]


class ZeroRedundancyOptimizer(Optimizer):
    """`optimizer_class(**defaults)` on this rank's shard of `params`; the others' shards on
    the other ranks of `comm` (PyTorch's ZeroRedundancyOptimizer).

    The parameters, in the order given, are cut into `comm.size` contiguous shards of
    balanced size (ranks beyond the parameter count own none); every rank passes the same
    parameters, which is checked (names cannot be, shapes and dtypes are). `param_groups`
    holds every parameter with its group's hyperparameters, so learning-rate schedules work
    as with any optimizer; each `step()` copies the hyperparameters into the local optimizer,
    updates this rank's shard from the current `.grad`s (already averaged across ranks, as
    DataParallel leaves them) and exchanges the shards in one Allgatherv. Collective.
    `state_dict()` is this rank's shard's state (checkpoint it per rank), and loads back only
    on the same rank of the same number of ranks. All parameters must share one dtype.
    """

    def __init__(self, params: ParamsT, optimizer_class: type[Optimizer],
                 comm: Communicator | None = None, **defaults: Any) -> None:
        super().__init__(params, defaults)
        self.comm = comm if comm is not None else Communicator()
        flat = [p for g in self.param_groups for p in g["params"]]
        dtypes = {p.dtype for p in flat}
        if len(dtypes) != 1:
            raise TypeError(f"ZeroRedundancyOptimizer: parameters of one dtype only, got "
                            f"{sorted(map(str, dtypes))}")
        self.comm.agree(";".join(f"{p.shape}:{p.dtype}" for p in flat),
                        what="ZeroRedundancyOptimizer parameters (shapes, dtypes)")
        size, rank = self.comm.size, self.comm.rank
        # Rank r owns the parameters that start in the r-th P-th of the elements.
        starts = np.cumsum([0] + [p.size for p in flat[:-1]])
        total = starts[-1] + flat[-1].size
        self.owner = np.minimum(starts * size // max(total, 1), size - 1)
        counts = np.bincount(self.owner, minlength=size)
        self._flat = flat
        start = int(np.sum(counts[:rank]))
        self._shard = flat[start:start + counts[rank]]
        own = {id(p) for p in self._shard}
        local_groups, self._group_index = [], []
        for i, g in enumerate(self.param_groups):
            mine = [p for p in g["params"] if id(p) in own]
            if mine:
                local_groups.append({**g, "params": mine})
                self._group_index.append(i)
        self.local: Optimizer | None = (optimizer_class(local_groups, **defaults)
                                         if local_groups else None)

    @property
    def shard(self) -> list[Tensor]:
        """The parameters this rank updates (and keeps the optimizer state of)."""
        return list(self._shard)

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Update this rank's shard, then give every rank every parameter. Collective."""
        loss = None
        if closure is not None:
            with enable_grad():
                loss = closure()
        if self.local is not None:
            for i, lg in zip(self._group_index, self.local.param_groups):
                lg.update({k: v for k, v in self.param_groups[i].items() if k != "params"})
            self.local.step()
        mine = self._shard
        send = (np.concatenate([p.data.ravel() for p in mine]) if mine
                else np.empty(0, self._flat[0].dtype))
        full = self.comm.allgatherv(send, concat=True)
        offset = 0
        for p in self._flat:  # shards are contiguous and in rank order: so is `full`
            np.copyto(p.data, full[offset:offset + p.size].reshape(p.shape))
            mark_modified(p)
            offset += p.size
        return loss

    def state_dict(self) -> dict[str, Any]:
        """This rank's shard: its optimizer state and every group's hyperparameters."""
        return {"rank": self.comm.rank, "ranks": self.comm.size,
                "param_groups": [{k: v for k, v in g.items() if k != "params"}
                                 for g in self.param_groups],
                "local": self.local.state_dict() if self.local is not None else {}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what `state_dict()` gave on this rank (same rank, same number of ranks)."""
        where = (int(state_dict["rank"]), int(state_dict["ranks"]))
        if where != (self.comm.rank, self.comm.size):
            raise ValueError(f"ZeroRedundancyOptimizer.load_state_dict: the state is rank "
                             f"{where[0]} of {where[1]}'s shard; this is rank {self.comm.rank} "
                             f"of {self.comm.size}")
        for g, saved in zip(self.param_groups, state_dict["param_groups"]):
            g.update(saved)
        if self.local is not None:
            self.local.load_state_dict(state_dict["local"])
