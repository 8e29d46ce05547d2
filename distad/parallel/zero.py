"""ZeroRedundancyOptimizer: optimizer state sharded over data-parallel ranks (ZeRO).

Data parallelism keeps a full copy of the optimizer state on every rank, which for Adam is
twice the parameters. Rajbhandari et al.'s stage 1 cuts it into shards: each rank owns an
equal slice of the flattened parameters, keeps the state of that slice only and updates only
it; one Allgatherv then gives every rank every updated parameter. With gradients already
averaged (DataParallel), the update of each element is the same arithmetic on the same
numbers as the unsharded optimizer's, so the result is bit for bit the same.

Given the DataParallel that averages the gradients, it also takes over stage 2's gradient
exchange: each bucket is reduce-scattered, so that a rank receives only its slice's averaged
gradients, and a step moves what one allreduce does (half of it in the reduce-scatter, half
in the parameters' allgather) instead of 1.5 times that.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from ..autodiff import Tensor, enable_grad, mark_modified
from ..comm import Communicator
from ..optim import Optimizer
from ..optim.clip import norm_terms, scale_grads, total_norm
from ..optim.optimizer import ParamsT

__all__ = ["ZeroRedundancyOptimizer"]


class ZeroRedundancyOptimizer(Optimizer):
    """`optimizer_class(**defaults)` on this rank's shard of `params`; the others' shards on
    the other ranks of `comm` (PyTorch's ZeroRedundancyOptimizer, DeepSpeed's ZeRO).

    The parameters, in the order given and flattened into one vector, are cut into
    `comm.size` contiguous shards of equal size (to one element; a parameter may be cut), as
    DeepSpeed does: each rank keeps the optimizer state of its shard only and updates only
    it, through 1-D views of the parameters (`shard`). Every rank passes the same
    parameters, which is checked (names cannot be, shapes and dtypes are). `param_groups`
    holds every parameter with its group's hyperparameters, so learning-rate schedules work
    as with any optimizer; each `step()` copies the hyperparameters into the local
    optimizer, updates this rank's shard from the current `.grad`s and exchanges the
    shards in one Allgatherv. Collective. Optimizers whose update is elementwise (SGD, Adam,
    AdamW) give bit for bit the parameters of the unsharded optimizer on the same gradients.

    Without `data_parallel` the `.grad`s must be averaged already (DataParallel's
    allreduce: stage 1). With `data_parallel`, the DataParallel (exact averaging) whose
    module holds these parameters in this order, its buckets are reduce-scattered instead
    (stage 2's exchange): after backward the `.grad` of a parameter holds the average only
    on this rank's elements, and is None for a parameter with none of them; clip with this
    optimizer's `clip_grad_norm`, not `ad.optim.clip_grad_norm`.
    `state_dict()` is this rank's shard's state (checkpoint it per rank), and loads back only
    on the same rank of the same number of ranks. All parameters must share one dtype.
    """

    def __init__(self, params: ParamsT, optimizer_class: type[Optimizer],
                 comm: Communicator | None = None, *, data_parallel: Any = None,
                 **defaults: Any) -> None:
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
        starts = np.cumsum([0] + [p.size for p in flat])
        total = int(starts[-1])
        # Rank r owns elements [bounds[r], bounds[r + 1]) of the flattened parameters.
        self.bounds = [r * total // size for r in range(size + 1)]
        lo, hi = self.bounds[rank], self.bounds[rank + 1]
        self._flat = flat
        # This rank's piece of each parameter it has elements of: (param, start, stop, piece),
        # the piece a Tensor over elements [start, stop) of the flattened parameter.
        self._pieces: list[tuple[Tensor, int, int, Tensor]] = []
        self._clipped = False
        local_groups, self._group_index = [], []
        offset = iter(starts)
        for i, g in enumerate(self.param_groups):
            mine = []
            for p in g["params"]:
                s = int(next(offset))
                a, b = max(lo, s) - s, min(hi, s + p.size) - s
                if a < b:
                    piece = Tensor(_flat_view(p)[a:b], requires_grad=True)
                    self._pieces.append((p, a, b, piece))
                    mine.append(piece)
            if mine:
                local_groups.append({**g, "params": mine})
                self._group_index.append(i)
        self.local: Optimizer | None = (optimizer_class(local_groups, **defaults)
                                         if local_groups else None)
        if data_parallel is not None:
            modules = [p for _, p in data_parallel.module.named_parameters()]
            if list(map(id, modules)) != list(map(id, flat)):
                raise ValueError("ZeroRedundancyOptimizer: data_parallel's module must hold "
                                 "exactly the parameters given, in the same order")
            data_parallel.shard_gradients(self.bounds)

    @property
    def shard(self) -> list[Tensor]:
        """This rank's pieces of the parameters: 1-D Tensors over their elements (views), the
        ones this rank updates and keeps the optimizer state of."""
        return [piece for *_, piece in self._pieces]

    def _point_pieces(self) -> None:
        """Aim the pieces at the parameters' current data and, unless `clip_grad_norm` has
        clipped them for this step, gradients (views, no copies)."""
        for p, a, b, piece in self._pieces:
            piece.data = _flat_view(p)[a:b]
            if not self._clipped:
                piece.grad = None if p.grad is None else np.reshape(p.grad, -1)[a:b]

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        self._clipped = False

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Update this rank's shard, then give every rank every parameter. Collective."""
        loss = None
        if closure is not None:
            with enable_grad():
                loss = closure()
        self._point_pieces()
        self._clipped = False
        if self.local is not None:
            for i, lg in zip(self._group_index, self.local.param_groups):
                lg.update({k: v for k, v in self.param_groups[i].items() if k != "params"})
            self.local.step()
        send = (np.concatenate([piece.data for *_, piece in self._pieces]) if self._pieces
                else np.empty(0, self._flat[0].dtype))
        full = self.comm.allgatherv(send, concat=True)
        offset = 0
        for p in self._flat:  # shards are contiguous and in rank order: so is `full`
            np.copyto(p.data, full[offset:offset + p.size].reshape(p.shape))
            mark_modified(p)
            offset += p.size
        return loss

    def clip_grad_norm(self, max_norm: float, norm_type: float = 2.0,
                       error_if_nonfinite: bool = False, *,
                       weight: Callable[[Tensor], float] | None = None,
                       comm: Communicator | None = None) -> float:
        """`ad.optim.clip_grad_norm` over all ranks' shards: the total norm of the whole
        gradient from every rank's per-piece terms, gathered and added in parameter order
        (equal to the unsharded norm up to rounding: a cut parameter's sum is two sums), then
        this shard's gradients clipped, for the next `step()`. Collective; returns the norm.

        For a model that is also split across ranks (pipeline stages, tensor-parallel
        shards), `comm` is where the squared norm is summed instead: every rank of it holds
        distinct elements (an allreduce, 2-norm only), and `weight(p)` scales parameter p's
        part (1/tp for a parameter every tensor-parallel rank holds a copy of)."""
        self._clipped = False
        self._point_pieces()
        mine = [(p, piece) for p, _, _, piece in self._pieces if piece.grad is not None]
        terms = norm_terms([piece.grad for _, piece in mine], norm_type)
        if comm is None and weight is None:
            total = total_norm(self.comm.allgatherv(np.array(terms, np.float64),
                                                    concat=True).tolist(), norm_type)
        else:
            if float(norm_type) != 2.0:
                raise ValueError(f"ZeroRedundancyOptimizer.clip_grad_norm: weight and comm "
                                 f"need the 2-norm, got norm_type={norm_type}")
            w = weight or (lambda _: 1.0)
            local = np.array([sum(w(p) * t for (p, _), t in zip(mine, terms))])
            total = math.sqrt(max(float((comm or self.comm).allreduce(local)[0]), 0.0))
        scale_grads([piece for _, piece in mine], max_norm, total, error_if_nonfinite)
        self._clipped = True  # the next step() takes these clipped pieces as they are
        return total

    @property
    def state_nbytes(self) -> int:
        """Bytes of this rank's shard's optimizer state."""
        return self.local.state_nbytes if self.local is not None else 0

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


def _flat_view(p: Tensor) -> np.ndarray:
    """`p.data` as a 1-D view (never a copy: the optimizer writes through it)."""
    if not p.data.flags.c_contiguous:
        raise ValueError(f"ZeroRedundancyOptimizer: parameter data must be C-contiguous, got "
                         f"{p.dtype} {p.shape} with strides {p.data.strides}")
    return p.data.reshape(-1)
