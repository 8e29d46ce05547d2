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

import inspect
import json
import math
import numbers
from collections.abc import Callable
from typing import Any

import numpy as np

from ..autodiff import Tensor, enable_grad, mark_modified
from ..comm import Communicator
from ..optim import Optimizer
from ..optim.clip import norm_terms, scale_grads, total_norm
from ..optim.optimizer import ParamsT
from .data_parallel import DataParallel

__all__ = ["ZeroRedundancyOptimizer"]


def shard_bounds(total: int, ranks: int) -> list[int]:
    """Rank r of `ranks` owns elements [bounds[r], bounds[r + 1]) of `total` flattened ones."""
    return [r * total // ranks for r in range(ranks + 1)]


def piece_ranges(sizes: list[int], ranks: int, rank: int) -> list[tuple[int, int]]:
    """For each parameter (their sizes, in order, flattened one after the other), the elements
    [a, b) of it that `rank` of `ranks` owns; a >= b where it owns none."""
    starts = np.cumsum([0, *sizes]).tolist()
    bounds = shard_bounds(int(starts[-1]), ranks)
    lo, hi = bounds[rank], bounds[rank + 1]
    return [(max(lo, s) - s, min(hi, s + n) - s) for s, n in zip(starts, sizes)]


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
    `state_dict()` is this rank's shard's state (checkpoint it per rank; it loads back on the
    same rank of the same number of ranks); `consolidated_state_dict()` is the whole state in
    the unsharded optimizer's format, which loads anywhere. All parameters must share one
    dtype.
    """

    def __init__(self, params: ParamsT, optimizer_class: type[Optimizer],
                 comm: Communicator | None = None, *,
                 data_parallel: DataParallel | None = None,
                 **defaults: Any) -> None:
        # Every hyperparameter, the class's defaults included, as the unsharded one keeps them.
        signature = inspect.signature(optimizer_class.__init__).parameters.values()
        defaults = {**{q.name: q.default for q in signature
                       if q.default is not inspect.Parameter.empty}, **defaults}
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
        # The parameters' data become views of one flat buffer (FSDP's flat parameter), so
        # that the step's Allgatherv fills them in place.
        self._data = np.empty(total, flat[0].dtype)
        for p, s in zip(flat, starts):
            self._home(p, int(s))
        self.bounds = shard_bounds(total, size)
        self._flat = flat
        self._starts = [int(x) for x in starts[:-1]]  # where each parameter starts, flattened
        # This rank's piece of each parameter it has elements of: (param, start, stop, piece),
        # the piece a Tensor over elements [start, stop) of the flattened parameter.
        self._pieces: list[tuple[Tensor, int, int, Tensor]] = []
        self._clipped = False
        local_groups, self._group_index = [], []
        ranges = iter(zip(piece_ranges([p.size for p in flat], size, rank), self._starts))
        for i, g in enumerate(self.param_groups):
            mine = []
            for p in g["params"]:
                (a, b), s = next(ranges)
                if a < b:  # a view of the flat buffer, which the parameter's data also is
                    piece = Tensor(self._data[s + a:s + b], requires_grad=True)
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

    def _home(self, p: Tensor, start: int) -> None:
        """Make `p.data` the view of the flat buffer at `start` (copying its values there)
        unless it is already (the parameter's data may have been replaced since)."""
        where = self._data[start:start + p.size]
        if (p.data.base is self._data and p.data.flags.c_contiguous
                and p.data.__array_interface__["data"][0]
                == where.__array_interface__["data"][0]):
            return
        if p.dtype != self._data.dtype:
            raise TypeError(f"ZeroRedundancyOptimizer: parameter {p.shape} is now {p.dtype}, "
                            f"the optimizer's parameters {self._data.dtype}")
        where[...] = np.reshape(p.data, -1)
        p.data = where.reshape(p.shape)

    def _point_grads(self) -> None:
        """Aim the pieces at the parameters' current gradients (views, no copies), unless
        `clip_grad_norm` has clipped them for this step."""
        if self._clipped:
            return
        for p, a, b, piece in self._pieces:
            piece.grad = None if p.grad is None else np.reshape(p.grad, -1)[a:b]

    def _sync_hyperparameters(self) -> None:
        """Copy each group's hyperparameters (a schedule may have changed them) to the local
        optimizer's groups."""
        for i, lg in zip(self._group_index, self.local.param_groups):
            lg.update({k: v for k, v in self.param_groups[i].items() if k != "params"})

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        self._clipped = False

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Update this rank's shard, then give every rank every parameter. Collective."""
        loss = None
        if closure is not None:
            with enable_grad():
                loss = closure()
        for p, start in zip(self._flat, self._starts):  # data replaced since: copied back in
            self._home(p, start)
        self._point_grads()
        self._clipped = False
        if self.local is not None:
            self._sync_hyperparameters()
            self.local.step()
        # This rank's slice of the flat buffer is updated in place: gather the others'.
        self.comm.allgatherv_in_place(self._data, np.diff(self.bounds))
        for p in self._flat:
            mark_modified(p)
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
        self._point_grads()
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
        """Restore what `state_dict()` gave on this rank (same rank, same number of ranks), or
        a whole optimizer's state (`consolidated_state_dict()` of any number of ranks, or the
        `state_dict()` of an unsharded `optimizer_class` over the same parameters): this rank
        keeps its slices of it."""
        if "local" not in state_dict:
            self._load_whole(state_dict)
            return
        where = (int(state_dict["rank"]), int(state_dict["ranks"]))
        if where != (self.comm.rank, self.comm.size):
            raise ValueError(f"ZeroRedundancyOptimizer.load_state_dict: the state is rank "
                             f"{where[0]} of {where[1]}'s shard; this is rank {self.comm.rank} "
                             f"of {self.comm.size}")
        for g, saved in zip(self.param_groups, state_dict["param_groups"]):
            g.update(saved)
        if self.local is not None:
            self.local.load_state_dict(state_dict["local"])

    def consolidated_state_dict(self) -> dict[str, Any]:
        """The state as one unsharded `optimizer_class` over all the parameters would hold it
        (PyTorch's consolidate_state_dict), on every rank: each per-element array gathered
        from the ranks' slices (one Allgatherv per entry), the counters from their owners.
        Collective. It loads into the unsharded optimizer, or into a ZeroRedundancyOptimizer
        over any number of ranks; the arrays pass through every rank's memory at once."""
        state = self.local.state if self.local is not None else {}
        arrays, counters = set(), {}
        for piece, entries in state.items():
            for k, v in entries.items():
                if isinstance(v, np.ndarray) and v.shape == piece.shape:
                    arrays.add(k)
                elif isinstance(v, (numbers.Number, np.generic)) and np.ndim(v) == 0:
                    counters[k] = "int" if isinstance(v, (int, np.integer)) else "float"
                else:
                    raise TypeError(f"ZeroRedundancyOptimizer.consolidated_state_dict: state "
                                    f"{k!r} is neither per element nor a number")
        names = json.dumps([sorted(arrays), counters], sort_keys=True).encode()
        for theirs in self.comm.allgatherv(np.frombuffer(names, np.uint8)):
            their_arrays, their_counters = json.loads(theirs.tobytes())
            arrays.update(their_arrays)
            counters.update(their_counters)
        arrays, keys = sorted(arrays), sorted(counters)
        index = {id(p): i for i, p in enumerate(self._flat)}
        # Row 0: whether a parameter has state; then one row per counter (max over ranks).
        table = np.full((1 + len(keys), len(self._flat)), -np.inf)
        for p, _, _, piece in self._pieces:
            if piece in state:
                table[0, index[id(p)]] = 1.0
                for r, k in enumerate(keys, 1):
                    table[r, index[id(p)]] = float(state[piece][k])
        self.comm.allreduce(table, op="max", out=table)
        whole: dict[int, dict[str, Any]] = {
            i: {k: (int(table[r, i]) if counters[k] == "int" else float(table[r, i]))
                for r, k in enumerate(keys, 1)}
            for i in np.flatnonzero(table[0] > 0).tolist()}
        lo, hi = self.bounds[self.comm.rank], self.bounds[self.comm.rank + 1]
        for k in arrays:
            mine = np.zeros(hi - lo, self._flat[0].dtype)
            for p, a, b, piece in self._pieces:
                if k in state.get(piece, {}):
                    start = self._starts[index[id(p)]] + a - lo
                    mine[start:start + b - a] = state[piece][k]
            full = self.comm.allgatherv(mine, concat=True)
            for i, entries in whole.items():
                p, start = self._flat[i], self._starts[i]
                entries[k] = full[start:start + p.size].reshape(p.shape).copy()
        return {"state": whole, "param_groups": self._indexed_groups()}

    def load_shards(self, shards: list[dict[str, Any]]) -> None:
        """Load the state of a ZeroRedundancyOptimizer over the same parameters on any number
        of ranks from every one of its ranks' `state_dict()` (`shards[r]`: rank r's): each
        parameter's state is put back together from its pieces and this rank keeps its
        slices (a checkpoint resumed on another number of ranks). Not collective."""
        ranks, sizes = len(shards), [p.size for p in self._flat]
        whole: dict[int, dict[str, Any]] = {}
        for r, shard in enumerate(shards):
            if (int(shard["rank"]), int(shard["ranks"])) != (r, ranks):
                raise ValueError(f"ZeroRedundancyOptimizer.load_shards: shards[{r}] is rank "
                                 f"{shard['rank']} of {shard['ranks']}'s, not rank {r} of {ranks}")
            owned = [(i, a, b) for i, (a, b) in enumerate(piece_ranges(sizes, ranks, r))
                     if a < b]
            for j, entries in shard["local"].get("state", {}).items():
                i, a, b = owned[int(j)]
                state = whole.setdefault(i, {})
                for k, v in entries.items():
                    if np.ndim(v) == 0:
                        state[k] = v
                    else:
                        full = state.setdefault(k, np.zeros(sizes[i], np.asarray(v).dtype))
                        full[a:b] = np.reshape(v, -1)
        for i, state in whole.items():
            shape = self._flat[i].shape
            whole[i] = {k: v.reshape(shape) if np.ndim(v) else v for k, v in state.items()}
        groups = [{**g, **{k: v for k, v in saved.items() if k != "params"}}
                  for g, saved in zip(self._indexed_groups(), shards[0]["param_groups"])]
        self._load_whole({"state": whole, "param_groups": groups})

    def _load_whole(self, state_dict: dict[str, Any]) -> None:
        """This rank's slices of a whole optimizer's state (see load_state_dict)."""
        groups = state_dict["param_groups"]
        if [len(g["params"]) for g in groups] != [len(g["params"]) for g in self.param_groups]:
            raise ValueError("ZeroRedundancyOptimizer.load_state_dict: the state's parameter "
                             "groups hold other numbers of parameters than this optimizer's")
        for g, saved in zip(self.param_groups, groups):
            g.update({k: v for k, v in saved.items() if k != "params"})
        if self.local is None:
            return
        saved_state = {int(i): s for i, s in state_dict["state"].items()}
        index = {id(p): i for i, p in enumerate(self._flat)}
        where = {id(piece): (p, a, b) for p, a, b, piece in self._pieces}
        local_state = {}
        pieces = [q for lg in self.local.param_groups for q in lg["params"]]
        for j, piece in enumerate(pieces):
            p, a, b = where[id(piece)]
            entries = saved_state.get(index[id(p)])
            if entries is None:
                continue
            local_state[j] = {}
            for k, v in entries.items():
                if np.ndim(v) == 0:
                    local_state[j][k] = v
                elif np.shape(v) == p.shape:
                    local_state[j][k] = np.reshape(np.asarray(v), -1)[a:b].copy()
                else:
                    raise ValueError(f"ZeroRedundancyOptimizer.load_state_dict: state {k!r} of "
                                     f"parameter {index[id(p)]} has shape {np.shape(v)}, the "
                                     f"parameter {p.shape}")
        self._sync_hyperparameters()
        self.local.load_state_dict({"state": local_state,
                                    "param_groups": self.local._indexed_groups()})
