"""Pipeline parallelism: a Sequential cut into contiguous stages, one per rank, fed micro-batches.

Every rank builds the same Sequential; `PipelineParallel` keeps the layers of
its own stage and drops its references to the others. A training step splits
the batch into m micro-batches; stage s runs its layers on each, sends the
activation to stage s+1 and later receives the activation's gradient back,
all by non-blocking point-to-point messages (each receive is posted one
micro-batch ahead). The last stage computes the loss. Each stage's engine
differentiates only its own layers: the backward of micro-batch i on stage s
is `out_i.backward(g_i)` with g_i from stage s+1, and the gradient of the
stage's input leaf goes back to stage s-1.

Schedules (Huang et al. 2019, GPipe; Narayanan et al. 2021, PipeDream-Flush):

- "gpipe": all m forwards, then all m backwards (newest first). A stage holds
  the activations of all m micro-batches at once.
- "1f1b": stage s runs min(p-s-1, m) warm-up forwards, then alternates one
  forward and one backward, then drains: at most p-s micro-batches (p at
  stage 0) are in flight, so activation memory no longer grows with m.

Both leave the same bubble: (p-1)/(m+p-1) of a step is idle on every stage
when forward and backward times are uniform.

Shapes. MPI carries no shapes, so each step starts with one small allreduce
that gives every stage the batch's signature (size, trailing shape, dtype)
and the presence of inputs and targets. The first time a signature appears,
the stages hand shapes down the pipeline by running each stage once on zeros
(no gradient, eval mode) and agree on the outcome: a stage that cannot take
its predecessor's output raises the same MismatchError, naming both stages
and ranks, on every rank, instead of leaving the pipeline blocked.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..autodiff import Tensor, no_grad
from ..comm import CommError, Communicator, MismatchError
from ..comm.request import Request
from ..nn import Module
from .data_parallel import DataParallel

__all__ = ["PipelineParallel", "partition_by_parameters", "pipeline_schedule"]

SCHEDULES = ("gpipe", "1f1b")
_MAX_DIMS = 6            # trailing dimensions of a batch that the step header can carry
_HEADER = 10 + _MAX_DIMS  # see _header()
_HANDSHAKE_TAG = 1 << 20  # tags below this are 2*i (activation) and 2*i+1 (gradient)
_STATE_TAG = _HANDSHAKE_TAG + 1
_SPIN_S = 2e-4           # a wait spins (yielding the CPU) this long, then sleeps between polls
_SLEEP_S = 5e-5


def pipeline_schedule(kind: str, microbatches: int, stages: int, stage: int
                      ) -> list[tuple[str, int]]:
    """The order of work on `stage`: a list of ("F", i) forwards and ("B", i) backwards.

    kind "gpipe": F0..F(m-1), then B(m-1)..B0. kind "1f1b": w = min(p-1-stage, m)
    warm-up forwards, then pairs F(w+k), B(k), then the remaining backwards.
    """
    m, p = int(microbatches), int(stages)
    if kind not in SCHEDULES:
        raise ValueError(f"pipeline schedule must be one of {SCHEDULES}, got {kind!r}")
    if m < 1 or not 0 <= stage < p:
        raise ValueError(f"pipeline_schedule: need m >= 1 and 0 <= stage < p, got m={m}, "
                         f"stage={stage}, p={p}")
    if kind == "gpipe":
        return [("F", i) for i in range(m)] + [("B", i) for i in reversed(range(m))]
    warm = min(p - 1 - stage, m)
    order = [("F", i) for i in range(warm)]
    for k in range(m - warm):
        order += [("F", warm + k), ("B", k)]
    return order + [("B", k) for k in range(m - warm, m)]


def partition_by_parameters(sizes: Sequence[int], parts: int) -> list[int]:
    """Layer counts of `parts` contiguous, non-empty groups minimising the largest parameter sum.

    `sizes` are the layers' parameter counts. Exact (dynamic programming over
    cut points, O(n^2 parts)); among equally good partitions the one whose
    largest group has the fewest layers wins, so parameter-free layers spread.
    """
    n = len(sizes)
    if not 1 <= parts <= n:
        raise ValueError(f"cannot split {n} layers into {parts} non-empty pipeline stages")
    prefix = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    inf = (float("inf"), float("inf"))
    # best[k][j]: (largest parameter sum, largest layer count) of layers[:j] in k groups
    best = [[inf] * (n + 1) for _ in range(parts + 1)]
    cut = [[0] * (n + 1) for _ in range(parts + 1)]
    best[0][0] = (0, 0)
    for k in range(1, parts + 1):
        for j in range(k, n - (parts - k) + 1):
            for i in range(k - 1, j):
                prev = best[k - 1][i]
                if prev == inf:
                    continue
                cand = (max(prev[0], int(prefix[j] - prefix[i])), max(prev[1], j - i))
                if cand < best[k][j]:
                    best[k][j], cut[k][j] = cand, i
    counts, j = [], n
    for k in range(parts, 0, -1):
        i = cut[k][j]
        counts.append(j - i)
        j = i
    return counts[::-1]


@dataclass(frozen=True)
class _Plan:
    """Shapes of one batch signature on this stage: micro-batch sizes, input and output shapes."""

    sizes: tuple[int, ...]
    in_shapes: tuple[tuple[int, ...], ...]
    in_dtype: np.dtype
    out_shapes: tuple[tuple[int, ...], ...]
    out_dtype: np.dtype


class _Stage(Module):
    """The layers of one stage, registered under their index in the full Sequential."""

    def __init__(self, layers: Mapping[int, Module]) -> None:
        super().__init__()
        for i, layer in layers.items():
            self.add_module(str(i), layer)

    def forward(self, x: Any) -> Any:
        for m in self._modules.values():
            x = m(x)
        return x


class PipelineParallel(Module):
    """Run a Sequential as a pipeline over the ranks of `comm`, one contiguous stage per rank.

    `module` is the whole model (every rank builds the same one, e.g. from the
    same seed); stage s keeps layers `partition[s]`, chosen to balance
    parameter counts unless `balance` (layer counts per stage) is given. The
    parameters, `state_dict()` keys and `load_state_dict()` are this stage's,
    under the full model's names ("2.weight"), so an optimizer over
    `pp.parameters()` updates this stage. `train_step(x, y, loss_fn)` runs one
    forward and backward of a batch in `microbatches` micro-batches with the
    `schedule` "gpipe" or "1f1b" and returns the batch's loss on every rank.
    `data_parallel`: a communicator over the replicas of this stage (the dp
    group of a `grid`); gradients are then averaged over it during the last
    micro-batch's backward (earlier ones accumulate locally), by a
    DataParallel built with `data_parallel_options` (e.g. a compressor) and
    available as `data_parallel`. `timeout` (seconds) turns a wait for a
    peer that never comes into a CommError.
    Construction is collective over `comm` (and `data_parallel`).
    """

    def __init__(self, module: Module, comm: Communicator, microbatches: int = 1,
                 schedule: str = "1f1b", balance: Sequence[int] | None = None, *,
                 data_parallel: Communicator | None = None,
                 data_parallel_options: Mapping[str, Any] | None = None,
                 timeout: float | None = None) -> None:
        super().__init__()
        try:
            layers = list(module)
        except TypeError:
            raise TypeError(f"PipelineParallel needs a Sequential (an iterable of layers), got "
                            f"{type(module).__name__}") from None
        if schedule not in SCHEDULES:
            raise ValueError(f"PipelineParallel: schedule must be one of {SCHEDULES}, "
                             f"got {schedule!r}")
        if int(microbatches) < 1:
            raise ValueError(f"PipelineParallel: microbatches must be >= 1, got {microbatches}")
        p, s = comm.size, comm.rank
        comm.agree(_fingerprint(layers), what="pipeline model (layers, parameter shapes)")
        sizes = [sum(q.size for q in layer.parameters()) for layer in layers]
        if balance is None:
            counts = partition_by_parameters(sizes, p)
        else:
            counts = [int(c) for c in balance]
            if len(counts) != p or min(counts) < 1 or sum(counts) != len(layers):
                raise ValueError(f"PipelineParallel: balance {list(balance)} must give each of "
                                 f"the {p} stages at least one layer and sum to the "
                                 f"{len(layers)} layers")
        bounds = np.concatenate([[0], np.cumsum(counts)]).astype(int)
        lo, hi = int(bounds[s]), int(bounds[s + 1])
        object.__setattr__(self, "partition", [(int(a), int(b)) for a, b in
                                               zip(bounds[:-1], bounds[1:])])
        object.__setattr__(self, "stage", s)
        object.__setattr__(self, "num_stages", p)
        object.__setattr__(self, "microbatches", int(microbatches))
        object.__setattr__(self, "schedule", schedule)
        object.__setattr__(self, "timeout", timeout)
        # Names, shapes and dtypes of every parameter of the full model, for gathering it.
        object.__setattr__(self, "_all_params", [
            (f"{i}.{n}", tuple(q.shape), q.dtype, k)
            for k in range(p) for i in range(int(bounds[k]), int(bounds[k + 1]))
            for n, q in layers[i]._state_items()])
        self.stage_module = _Stage({i: layers[i] for i in range(lo, hi)})
        # A private communicator: our tags cannot meet anyone else's messages.
        object.__setattr__(self, "_comm", comm.split(0))
        world = Communicator()
        ranks = comm.allgather(np.array([world.rank], dtype=np.int64)).ravel()
        object.__setattr__(self, "world_ranks", [int(r) for r in ranks])
        dp = None
        if data_parallel is not None:
            dp = DataParallel(self.stage_module, data_parallel, **(data_parallel_options or {}))
        object.__setattr__(self, "_dp", dp)
        object.__setattr__(self, "_plans", {})
        object.__setattr__(self, "_unfinished", [])  # sends of the last step not yet completed
        object.__setattr__(self, "timeline", [])
        object.__setattr__(self, "last_output", None)

    # ---- the Module interface: this stage's parameters under the full model's names ------------

    @property
    def data_parallel(self) -> DataParallel | None:
        """The DataParallel that averages this stage's gradients over its replicas, if any."""
        return self._dp

    @property
    def is_first(self) -> bool:
        return self.stage == 0

    @property
    def is_last(self) -> bool:
        return self.stage == self.num_stages - 1

    def named_parameters(self, prefix: str = "", recurse: bool = True
                         ) -> Iterator[tuple[str, Any]]:
        return self.stage_module.named_parameters(prefix, recurse)

    def _state_items(self, prefix: str = "") -> Iterator[tuple[str, Tensor]]:
        return self.stage_module._state_items(prefix)

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True) -> Any:
        """Load this stage's entries of a full-model state dict (other stages' keys are skipped)."""
        own = dict(self.stage_module._state_items())
        return self.stage_module.load_state_dict(
            {k: v for k, v in state_dict.items() if k in own}, strict=strict)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError("PipelineParallel runs whole batches across ranks: call "
                        "train_step(x, y, loss_fn) or predict(x), not the module itself")

    def __repr__(self) -> str:
        lo, hi = self.partition[self.stage]
        return (f"PipelineParallel(stage {self.stage}/{self.num_stages}, layers {lo}..{hi - 1}, "
                f"microbatches={self.microbatches}, schedule={self.schedule!r})")

    # ---- public steps --------------------------------------------------------------------------

    def train_step(self, x: Any = None, y: Any = None,
                   loss_fn: Callable[[Tensor, Any], Tensor] | None = None, *,
                   keep_output: bool = False) -> float:
        """Forward and backward of one batch; returns its loss (a float) on every stage.

        x (B, ...) is read on the first stage and y (B, ...) on the last (other
        ranks may pass None or the same arrays). The batch is cut into
        `microbatches` near-equal parts (B >= microbatches); `loss_fn(output,
        y_part)` must return the mean loss of a micro-batch, and is weighted by
        the part's share of B, so gradients and loss are those of the whole
        batch. Gradients accumulate into this stage's `.grad`s (zero them
        first, as with any backward). With `keep_output`, the last stage keeps
        the model's output for the batch in `last_output` (e.g. for accuracy;
        it costs the memory of all micro-batches' outputs). Collective over the
        pipeline.
        """
        if loss_fn is None and self.is_last:
            raise TypeError("PipelineParallel.train_step: the last stage needs loss_fn")
        return self._step(x, y, loss_fn, train=True, keep_output=keep_output)

    def predict(self, x: Any = None) -> np.ndarray | None:
        """The model's output for batch x (no gradient), on the last stage; None elsewhere.

        Runs the forwards only, micro-batched like train_step (into fewer parts
        when x has fewer rows than `microbatches`). Collective.
        """
        self._step(x, None, None, train=False, keep_output=True)
        out = self.last_output
        object.__setattr__(self, "last_output", None)
        return out

    def full_state_dict(self, stage_state: Mapping[str, np.ndarray] | None = None,
                        layout: Mapping[str, tuple[tuple[int, ...], Any]] | None = None
                        ) -> dict[str, np.ndarray] | None:
        """The whole model's state dict, gathered on the first stage (None on the others).

        Keys and order are those of the full Sequential's `state_dict()`. Each stage sends
        its own entries, or `stage_state` if given (e.g. its tensor-parallel shards gathered
        into whole arrays), whose (shape, dtype) per key `layout` then gives for the whole
        model. Collective over the pipeline.
        """
        comm = self._comm
        mine = stage_state if stage_state is not None else {
            name: t.data for name, t in self.stage_module._state_items()}
        if not self.is_first:
            for name, _, _, owner in self._all_params:
                if owner == self.stage:
                    comm.send(np.ascontiguousarray(mine[name]), 0, _STATE_TAG)
            return None
        out = {}
        for name, shape, dtype, owner in self._all_params:
            if layout is not None:
                shape, dtype = layout[name]
            if owner == 0:
                out[name] = np.array(mine[name], copy=True)
            else:
                out[name] = comm.recv(np.empty(shape, dtype=dtype), owner, _STATE_TAG)
        return out

    def close(self) -> None:
        """Release the private communicator and the data-parallel thread. Collective."""
        for r in self._unfinished:
            self._wait(r, "a send to complete", None)
        self._unfinished.clear()
        if self._dp is not None:
            self._dp.close()
        self._comm.free()

    # ---- one step --------------------------------------------------------------------------

    def _step(self, x: Any, y: Any, loss_fn: Any, train: bool, keep_output: bool) -> float:
        t_start = time.perf_counter()
        plan, xs, ys = self._prepare(x, y, train)
        loss = self._run(plan, xs, ys, loss_fn, train, keep_output, t_start)
        if not train:
            return 0.0
        value = np.array([loss if self.is_last else 0.0], dtype=np.float64)
        self._allreduce(value, "sum", "the loss from the last stage")
        return float(value[0])

    def _allreduce(self, buf: np.ndarray, op: str, what: str) -> None:
        """In-place allreduce waited for by polling: the last stage reaches the end of a step
        (and stage 0 its start) long before the others, and must not spin a core meanwhile."""
        self._wait(self._comm.iallreduce(buf, op=op, out=buf), what, None)

    def _prepare(self, x: Any, y: Any, train: bool) -> tuple[_Plan, list | None, list | None]:
        """Agree on the batch signature (one allreduce), build or look up its plan, split."""
        xv = x.data if isinstance(x, Tensor) else (None if x is None else np.asarray(x))
        yv = y.data if isinstance(y, Tensor) else (None if y is None else np.asarray(y))
        head = np.zeros(_HEADER, dtype=np.int64)
        if self.is_first:
            head[:] = _header(xv)
            head[1] = head[1] or xv is None or len(xv) == 0
        if self.is_last and train:
            head[-1] = 0 if yv is None or yv.ndim == 0 else len(yv) + 1
        self._allreduce(head, "max", "the batch signature from stage 0")
        batch, problem = int(head[0]), ""
        # Inference may cut a small batch (an evaluation's last one) into fewer parts.
        m = self.microbatches if train else max(1, min(self.microbatches, batch))
        if head[1]:
            problem = (f"stage 0 (rank {self.world_ranks[0]}) needs the input batch x: a "
                       f"numeric array with rows and at most {_MAX_DIMS} more axes")
        elif batch < m:
            problem = (f"a batch of {batch} rows cannot be cut into {m} micro-batches "
                       f"(microbatches={m})")
        elif train and head[-1] != batch + 1:
            have = "none" if head[-1] == 0 else f"{head[-1] - 1} rows"
            problem = (f"the last stage (rank {self.world_ranks[-1]}) needs targets y with one "
                       f"row per input row ({batch}), got {have}")
        if problem:  # every rank saw the same header, so every rank raises here
            raise ValueError(f"PipelineParallel: {problem}")
        key = (m, *(int(v) for v in head[:-1]))
        plan = self._plans.get(key)
        if plan is None:
            plan = self._handshake(head, m)
            self._plans[key] = plan
        bounds = np.cumsum((0,) + plan.sizes)
        xs = [xv[a:b] for a, b in zip(bounds[:-1], bounds[1:])] if self.is_first else None
        ys = ([yv[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
              if self.is_last and train else None)
        return plan, xs, ys

    def _handshake(self, head: np.ndarray, m: int) -> _Plan:
        """Pass shapes down the pipeline by running every stage once on zeros; agree on errors."""
        batch, ndim = int(head[0]), int(head[2])
        trailing = tuple(int(d) for d in head[3:3 + ndim])
        x_dtype = np.dtype(chr(int(head[3 + _MAX_DIMS])))
        sizes = tuple(len(c) for c in np.array_split(np.arange(batch), m))
        comm, s = self._comm, self.stage
        shapes_in: dict[int, tuple[int, ...]] = {}
        shapes_out: dict[int, tuple[int, ...]] = {}
        in_dtype = out_dtype = x_dtype
        error = ""
        modes = [(mod, mod.training) for mod in self.stage_module.modules()]
        try:
            self.stage_module.eval()
            for n in dict.fromkeys(sizes):  # each distinct micro-batch size once, in order
                if self.is_first:
                    shape, dtype, ok = (n, *trailing), x_dtype, True
                else:
                    msg = comm.recv(np.empty(_HEADER, dtype=np.int64), s - 1, _HANDSHAKE_TAG)
                    ok = bool(msg[0])
                    shape = (int(msg[0]), *(int(d) for d in msg[3:3 + int(msg[2])]))
                    dtype = np.dtype(chr(int(msg[3 + _MAX_DIMS]))) if ok else x_dtype
                out = None
                if ok and not error:
                    shapes_in[n], in_dtype = shape, dtype
                    try:
                        with no_grad():
                            out = self.stage_module(Tensor(np.zeros(shape, dtype=dtype)))
                        out = out.data if isinstance(out, Tensor) else np.asarray(out)
                        if out.ndim > _MAX_DIMS + 1 or out.dtype.kind not in "biuf":
                            raise ValueError(f"stage outputs must be numeric arrays of at "
                                             f"most {_MAX_DIMS + 1} axes, got {out.dtype} "
                                             f"{out.shape}")
                        shapes_out[n], out_dtype = out.shape, out.dtype
                    except Exception as exc:  # reported collectively below, never raised alone
                        error = self._describe_stage_error(shape, dtype, exc)
                        out = None
                if not self.is_last:
                    comm.send(_header(out), s + 1, _HANDSHAKE_TAG)
        finally:
            for mod, mode in modes:
                object.__setattr__(mod, "training", mode)
        messages = comm.allgatherv(np.frombuffer(error.encode(), dtype=np.uint8))
        errors = [bytes(m).decode() for m in messages if len(m)]
        if errors:
            raise MismatchError("PipelineParallel: " + "; ".join(errors))
        return _Plan(sizes, tuple(shapes_in[n] for n in sizes), in_dtype,
                     tuple(shapes_out[n] for n in sizes), out_dtype)

    def _describe_stage_error(self, shape: tuple, dtype: np.dtype, exc: Exception) -> str:
        s, lo = self.stage, self.partition[self.stage][0]
        me = f"stage {s} (rank {self.world_ranks[s]}, layers from {lo})"
        why = f"{type(exc).__name__}: {exc}"
        if self.is_first:
            return f"{me} cannot take the input batch of {dtype} {shape}: {why}"
        prev = f"stage {s - 1} (rank {self.world_ranks[s - 1]})"
        return (f"{prev} outputs {dtype} {shape} but {me} cannot take it as input: {why}")

    def _run(self, plan: _Plan, xs: list | None, ys: list | None, loss_fn: Any, train: bool,
             keep_output: bool, t_start: float) -> float:
        """Execute this stage's schedule for one batch; the loss sum on the last stage."""
        comm, s = self._comm, self.stage
        first, last = self.is_first, self.is_last
        batch = sum(plan.sizes)
        actions = pipeline_schedule(self.schedule if train else "gpipe", len(plan.sizes),
                                    self.num_stages, s)
        if not train:
            actions = [a for a in actions if a[0] == "F"]
        f_order = [i for kind, i in actions if kind == "F"]
        b_order = [i for kind, i in actions if kind == "B"]
        last_b = b_order[-1] if b_order else None
        acts_in: dict[int, Request] = {}
        grads_in: dict[int, Request] = {}
        sends: list[Request] = [r for r in self._unfinished if not r.test()]
        saved: dict[int, tuple[Tensor, Tensor]] = {}
        outputs: list[np.ndarray] = []
        spans: list[tuple[str, int, float, float]] = []
        loss_sum = 0.0
        runner = self._dp if (self._dp is not None and train) else self.stage_module

        def post_act(k: int) -> None:
            if not first and k < len(f_order):
                i = f_order[k]
                acts_in[i] = comm.irecv(np.empty(plan.in_shapes[i], plan.in_dtype), s - 1, 2 * i)

        def post_grad(k: int) -> None:
            if not last and k < len(b_order):
                j = b_order[k]
                grads_in[j] = comm.irecv(np.empty(plan.out_shapes[j], plan.out_dtype),
                                         s + 1, 2 * j + 1)

        post_act(0)
        post_grad(0)
        nf = nb = 0
        grad_mode = contextlib.nullcontext if train else no_grad
        for kind, i in actions:
            t0 = time.perf_counter()
            if kind == "F":
                if first:
                    xin = Tensor(xs[i])
                else:
                    data = self._wait(acts_in.pop(i), f"the activation of micro-batch {i}", s - 1)
                    xin = Tensor(data, requires_grad=train)
                nf += 1
                post_act(nf)
                t1 = time.perf_counter()
                with grad_mode():
                    out = runner(xin)
                    if last:
                        if keep_output:
                            outputs.append(out.data)
                        if train:
                            part = loss_fn(out, ys[i]) * (plan.sizes[i] / batch)
                            loss_sum += float(part.data)
                            out = part
                    else:
                        if out.shape != plan.out_shapes[i] or out.dtype != plan.out_dtype:
                            raise CommError(
                                f"PipelineParallel: stage {s} (rank {self.world_ranks[s]}) "
                                f"produced {out.dtype} {out.shape} for micro-batch {i}, but the "
                                f"shape handshake promised {plan.out_dtype} "
                                f"{plan.out_shapes[i]} (data-dependent output shapes are not "
                                "supported)")
                        sends.append(comm.isend(out.data, s + 1, 2 * i))
                if train:
                    saved[i] = (xin, out)
            else:
                xin, out = saved.pop(i)
                g = None
                if not last:
                    g = self._wait(grads_in.pop(i), f"the gradient of micro-batch {i}", s + 1)
                nb += 1
                post_grad(nb)
                t1 = time.perf_counter()
                sync = self._dp is not None and i != last_b
                with self._dp.no_sync() if sync else contextlib.nullcontext():
                    if out.requires_grad:
                        out.backward(g)
                if not first:
                    gx = xin.grad if xin.grad is not None else np.zeros_like(xin.data)
                    sends.append(comm.isend(gx, s - 1, 2 * i + 1))
                del xin, out
            t2 = time.perf_counter()
            if t1 - t0 > 1e-6:
                spans.append(("wait", i, t0 - t_start, t1 - t_start))
            spans.append((kind, i, t1 - t_start, t2 - t_start))
            sends = [r for r in sends if not r.test()]
        # Every message has been received (its receiver waited for it); a send request only
        # learns so when the receiver's acknowledgement is progressed, maybe not before the
        # receiver's next MPI call. Waiting here would add that delay to the step, so the
        # requests (and their buffers) are kept and reaped from the next step on.
        self._unfinished[:] = sends
        object.__setattr__(self, "timeline", spans)
        object.__setattr__(self, "last_output", np.concatenate(outputs) if outputs else None)
        return loss_sum

    def _wait(self, req: Request, what: str, peer: int | None) -> Any:
        """Wait for `req` without hogging the CPU: spin with sched_yield briefly, then poll.

        MPICH's blocking wait busy-polls; on an oversubscribed node a waiting
        stage would steal the core of a computing one.
        """
        if req.test():
            return req.wait()
        t0 = time.perf_counter()
        yield_cpu = getattr(os, "sched_yield", lambda: None)
        while not req.test():
            waited = time.perf_counter() - t0
            if waited < _SPIN_S:
                yield_cpu()
                continue
            if self.timeout is not None and waited > self.timeout:
                s = self.stage
                src = "" if peer is None else f" from stage {peer} (rank {self.world_ranks[peer]})"
                raise CommError(f"PipelineParallel: stage {s} (rank {self.world_ranks[s]}) "
                                f"waited {waited:.1f} s for {what}{src}")
            time.sleep(_SLEEP_S)
        return req.wait()


def _header(a: np.ndarray | None) -> np.ndarray:
    """An array's signature as int64: [rows, unsupported, ndim - 1, shape[1:] (padded to
    _MAX_DIMS), dtype char, 0...]; all zeros for None. The last slot is left free for the
    step header's target rows."""
    h = np.zeros(_HEADER, dtype=np.int64)
    if a is None:
        return h
    if a.ndim < 1 or a.ndim > _MAX_DIMS + 1 or a.dtype.kind not in "biuf":
        h[1] = 1
        return h
    h[0] = len(a)
    h[2] = a.ndim - 1
    h[3:3 + a.ndim - 1] = a.shape[1:]
    h[3 + _MAX_DIMS] = ord(a.dtype.char)
    return h


def _fingerprint(layers: list[Module]) -> str:
    return ";".join(f"{i}:{type(m).__name__}:" + ",".join(
        f"{n}{tuple(p.shape)}{p.dtype}" for n, p in m._state_items()) for i, m in enumerate(layers))
