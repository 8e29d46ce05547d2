"""DataParallel: every rank differentiates its shard; gradients are averaged during backward.

How one step goes:
1. forward on the local shard, `loss.backward()` on the local loss;
2. a hook on every parameter copies its gradient into its fusion bucket the
   moment it is final; when a bucket is complete (and every bucket before it
   has been started — collectives are issued in the same order on every rank)
   its reduction is handed to a communication thread;
3. that thread runs the bucket's collective (mpi4py releases the GIL inside
   MPI, so it progresses while the main thread's numpy keeps computing the
   rest of backward — MPICH makes no progress on a non-blocking collective
   unless some thread is inside MPI);
4. when the backward walk ends, a queued callback zero-fills the slots of
   parameters that got no gradient, starts the remaining buckets in order,
   waits for all of them and points each `p.grad` at its averaged slot.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

from ..autodiff import Tensor, mark_modified, queue_callback
from ..comm import Communicator
from ..comm.buckets import Bucket, plan_buckets
from ..nn import Module
from .sync import AllreduceMean, ReduceScatterMean, make_sync

__all__ = ["DataParallel", "StepStats"]


class StepStats:
    """What the last synchronised backward cost on this rank (seconds and bytes)."""

    __slots__ = ("bytes_sent", "compress_s", "communicate_s", "decompress_s", "wait_s",
                 "buckets", "unused", "spans", "grad_error", "grad_cosine")

    def __init__(self) -> None:
        self.bytes_sent = 0
        self.compress_s = self.communicate_s = self.decompress_s = self.wait_s = 0.0
        self.buckets = 0
        self.unused = 0
        # (phase, bucket, start, end) in time.perf_counter() seconds; bucket -1: not per bucket
        self.spans: list[tuple[str, int, float, float]] = []
        # The averaged gradient against the exact average, on measured steps (else None):
        # ||got - exact|| / ||exact|| and cos(got, exact) over all buckets.
        self.grad_error: float | None = None
        self.grad_cosine: float | None = None

    def as_dict(self) -> dict[str, float]:
        d = {"bytes_sent": self.bytes_sent, "compress_s": self.compress_s,
             "communicate_s": self.communicate_s, "decompress_s": self.decompress_s,
             "wait_s": self.wait_s, "buckets": self.buckets, "unused_params": self.unused}
        if self.grad_error is not None:
            d.update(grad_error=self.grad_error, grad_cosine=self.grad_cosine)
        return d


class DataParallel(Module):
    """Wrap `module` so that `backward()` averages its gradients over `comm`'s ranks.

    At wrap time the parameters and buffers are broadcast from rank 0 and a
    fingerprint of (name, shape, dtype) is checked on every rank: a mismatch
    raises the same MismatchError everywhere, before any step. Buffers
    (BatchNorm's running statistics) are broadcast from rank 0 again at every
    forward in training mode (`broadcast_buffers`, PyTorch DDP's default), so
    every rank normalises with the same running statistics. `compressor` is a spec
    string or object of `distad.compress` (None: exact float allreduce).
    `bucket_mb` caps the fusion buckets; `first_bucket_mb` keeps the first
    one small so communication starts early. `overlap=False` reduces all
    buckets after backward instead of during it (for comparison).
    `measure_every=N` makes every N-th synchronisation also average the exact gradient
    (one more float32 allreduce per bucket) and report how far the compressed average is
    from it in `stats.grad_error` and `stats.grad_cosine` (for compression studies; the
    phase times exclude the measurement, the step's wall time does not).
    Parameters keep their dtype; gradients after backward are read-only views
    into the buckets.
    """

    def __init__(self, module: Module, comm: Communicator | None = None,
                 compressor: Any = None, *, bucket_mb: float = 25.0,
                 first_bucket_mb: float = 1.0, overlap: bool = True,
                 broadcast: bool = True, broadcast_buffers: bool = True,
                 measure_every: int = 0) -> None:
        super().__init__()
        self.module = module
        comm = comm if comm is not None else Communicator()
        object.__setattr__(self, "comm", comm)
        params = [p for _, p in module.named_parameters()]
        if not params:
            raise ValueError("DataParallel: the module has no parameters")
        self._check_fingerprint(module, comm)
        buckets = plan_buckets(params, cap_mb=bucket_mb, first_mb=first_bucket_mb)
        object.__setattr__(self, "buckets", buckets)
        object.__setattr__(self, "_broadcast_buffers_each_forward",
                           bool(broadcast_buffers) and comm.size > 1
                           and any(True for _ in module.buffers()))
        if broadcast and comm.size > 1:
            self._broadcast_parameters()
            self.broadcast_buffers()
        sync = make_sync(compressor, comm)
        object.__setattr__(self, "sync", sync)
        object.__setattr__(self, "stats", StepStats())
        object.__setattr__(self, "_overlap", bool(overlap) and comm.size > 1)
        object.__setattr__(self, "_executor", ThreadPoolExecutor(1, "distad-comm")
                           if self._overlap else None)
        object.__setattr__(self, "_futures", [])
        object.__setattr__(self, "_next", 0)
        object.__setattr__(self, "_armed", False)
        object.__setattr__(self, "_sync_enabled", True)
        object.__setattr__(self, "_join_steps", None)  # steps taken inside join(), else None
        object.__setattr__(self, "_t0", 0.0)
        object.__setattr__(self, "_owned", None)  # per bucket: slots this rank receives
        if measure_every < 0:
            raise ValueError(f"DataParallel: measure_every must be >= 0, got {measure_every}")
        object.__setattr__(self, "_measure_every", int(measure_every))
        object.__setattr__(self, "_syncs", 0)          # synchronisations so far
        object.__setattr__(self, "_measuring", False)  # this synchronisation is measured
        for b in buckets:
            for k, p in enumerate(b.params):
                p.register_hook(self._hook(b, k))
                p.grad_buffer = self._grad_buffer(b, k)

    # ---- set-up --------------------------------------------------------------------------

    @staticmethod
    def _check_fingerprint(module: Module, comm: Communicator) -> None:
        fp = ";".join(f"{n}:{tuple(p.shape)}:{p.dtype}" for n, p in
                      [*module.named_parameters(), *module.named_buffers()])
        comm.agree(fp, what="model fingerprint (parameter names, shapes, dtypes)")

    def _broadcast_parameters(self, root: int = 0) -> None:
        """One broadcast per bucket from `root`, so every rank has the same weights."""
        for b in self.buckets:
            for p, view in zip(b.params, b.views):
                np.copyto(view, p.data)
            self.comm.bcast(b.buffer, root=root)
            for p, view in zip(b.params, b.views):
                np.copyto(p.data, view)
                mark_modified(p)

    def broadcast_buffers(self, root: int = 0) -> None:
        """Rank `root`'s buffers to every rank, in place: one broadcast per buffer dtype (none
        without buffers or on one rank). Collective. `distad train` calls it before
        evaluating, so that every rank evaluates with the same running statistics."""
        if self.comm.size == 1:
            return
        by_dtype: dict[np.dtype, list[np.ndarray]] = {}
        for _, b in self.module.named_buffers():
            by_dtype.setdefault(b.dtype, []).append(b)
        for bufs in by_dtype.values():
            flat = np.concatenate([b.reshape(-1) for b in bufs])
            self.comm.bcast(flat, root=root)
            offset = 0
            for b in bufs:
                b[...] = flat[offset : offset + b.size].reshape(b.shape)
                offset += b.size

    def shard_gradients(self, bounds: Sequence[int]) -> None:
        """Average each gradient element on its owner rank only (ZeRO stage 2's exchange).

        Rank r owns elements [bounds[r], bounds[r + 1]) of the module's parameters flattened
        in `named_parameters()` order. From the next backward on, every bucket is
        reduce-scattered instead of allreduced, so each rank receives the average of its own
        elements only: half the bytes of an allreduce. After backward a parameter's `.grad`
        holds the average on this rank's elements (elsewhere this rank's own part of the
        sum), and is None for a parameter with none of them. For an optimizer that updates
        only its own elements and then gathers the parameters:
        ZeroRedundancyOptimizer(..., data_parallel=...) calls this. Exact averaging only.
        """
        params = [p for _, p in self.module.named_parameters()]
        starts = np.cumsum([0] + [p.size for p in params])
        bounds = np.asarray(bounds, dtype=np.int64)
        size, rank = self.comm.size, self.comm.rank
        if (bounds.shape != (size + 1,) or bounds[0] != 0 or bounds[-1] != starts[-1]
                or (np.diff(bounds) < 0).any()):
            raise ValueError(f"DataParallel.shard_gradients: needs {size + 1} non-decreasing "
                             f"element bounds from 0 to {starts[-1]}, got {bounds.tolist()}")
        if not isinstance(self.sync, AllreduceMean):  # exact (or already sharded) only
            raise ValueError(f"DataParallel.shard_gradients: needs exact averaging, but the "
                             f"gradients are compressed ({self.sync.name})")
        start_of = {id(p): int(s) for p, s in zip(params, starts)}
        lo, hi = bounds[rank], bounds[rank + 1]
        counts, owned = {}, []
        for b in self.buckets:
            begin = np.array([start_of[id(p)] for p in b.params])  # model order: contiguous
            end = begin + [p.size for p in b.params]
            s, e = begin[0], end[-1]
            counts[b.index] = np.clip(np.minimum(bounds[1:], e) - np.maximum(bounds[:-1], s),
                                      0, None)
            owned.append((begin < hi) & (end > lo))
        object.__setattr__(self, "sync", ReduceScatterMean(self.comm, counts))
        object.__setattr__(self, "_owned", owned)

    # ---- forward -------------------------------------------------------------------------

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self._join_steps is not None and self.training:
            self._announce(stepping=True)
            object.__setattr__(self, "_join_steps", self._join_steps + 1)
        if self._broadcast_buffers_each_forward and self.training:
            self.broadcast_buffers()
        return self.module(*args, **kwargs)

    @contextlib.contextmanager
    def join(self) -> Iterator[None]:
        """Train on uneven inputs: the ranks may run different numbers of steps in the block.

        Inside it, every training forward first counts, with one small allreduce, the ranks
        still stepping. A rank that has left the block (its data ran out) shadows each step
        of the others until none is left: the same buffer broadcast and bucket reductions,
        of zero gradients, so the average stays the sum over the stepping ranks divided by
        the number of ranks (PyTorch's Join does the same by default). Then every rank takes
        the parameters and buffers of the rank that stepped most, since the others skipped
        its last updates (optimizer state is not exchanged). Collective. A rank that has
        left mirrors only DataParallel's collectives: other per-step collectives of the loop
        (a loss allreduce, SyncBatchNorm) must stay outside the block.
        """
        if self.comm.size == 1:
            yield
            return
        if self._owned is not None:
            raise RuntimeError("DataParallel.join: the gradients are sharded for a "
                               "ZeroRedundancyOptimizer, whose step is a collective that a "
                               "rank out of data cannot shadow")
        object.__setattr__(self, "_join_steps", 0)
        try:
            yield
        except BaseException:
            object.__setattr__(self, "_join_steps", None)
            raise
        try:
            while True:
                stepping, syncing = self._announce(stepping=False)
                if not stepping:
                    break
                self._shadow_step(syncing)
            steps = self.comm.allgather(np.array([self._join_steps], np.int64)).ravel()
            most = int(np.argmax(steps))  # the lowest rank among those that stepped most
            self._broadcast_parameters(root=most)
            self.broadcast_buffers(root=most)
        finally:
            object.__setattr__(self, "_join_steps", None)

    def _announce(self, stepping: bool) -> tuple[int, int]:
        """(ranks stepping, ranks of those whose step synchronises gradients), from everyone."""
        flags = np.array([int(stepping), int(stepping and self._sync_enabled)], np.int64)
        self.comm.allreduce(flags, out=flags)
        return int(flags[0]), int(flags[1])

    def _shadow_step(self, syncing: int) -> None:
        """The collectives of one step of the ranks still stepping, with zero gradients."""
        if self._broadcast_buffers_each_forward:
            self.broadcast_buffers()
        if syncing:
            self._count_sync()  # the stepping ranks' measured steps are measured here too
            for b in self.buckets:
                b.buffer.fill(0)
                self._reduce(b)
            object.__setattr__(self, "_measuring", False)

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Accumulate gradients locally; the first backward after the block synchronises the
        accumulated sum (gradient accumulation over micro-batches without extra traffic)."""
        prev = self._sync_enabled
        object.__setattr__(self, "_sync_enabled", False)
        try:
            yield
        finally:
            object.__setattr__(self, "_sync_enabled", prev)

    # ---- backward: hooks, buckets, reduction -------------------------------------------------

    def _hook(self, bucket: Bucket, k: int):
        def hook(g: np.ndarray) -> None:
            if not self._sync_enabled:
                return None
            if not self._armed:  # first gradient of this backward
                self._arm()
                queue_callback(self._finish)
            self._arrive(bucket, k, g.data if isinstance(g, Tensor) else g)
            return None

        return hook

    def _grad_buffer(self, bucket: Bucket, k: int):
        """Where backward may write parameter k's gradient (PyTorch's gradient_as_bucket_view):
        its slot in the bucket, pre-divided, when this backward synchronises, nothing has
        accumulated in `.grad` and no other hook would see the gradient (otherwise None, and
        the hook copies as usual). A weight's gradient then goes from the matrix product
        straight into the bucket, without a fresh array and a copy of it (see
        Primitive.vjp_into)."""
        param = bucket.params[k]

        def offer() -> tuple[np.ndarray, Any] | None:
            if (not self._sync_enabled or param.grad is not None or bucket.ready[k]
                    or param.hook_count != 1):
                return None
            return bucket.slot(k), self.sync.prescale

        return offer

    def _arm(self) -> None:
        object.__setattr__(self, "_armed", True)
        object.__setattr__(self, "_t0", time.perf_counter())
        self._count_sync()

    def _count_sync(self) -> None:
        """One more synchronisation (every rank counts alike, so all measure the same ones)."""
        object.__setattr__(self, "_syncs", self._syncs + 1)
        object.__setattr__(self, "_measuring", self._measure_every > 0
                           and self._syncs % self._measure_every == 0)

    def _arrive(self, bucket: Bucket, k: int, g: np.ndarray) -> None:
        """Gradient k of `bucket` is final: copy it in, and start the bucket once complete."""
        param = bucket.params[k]
        view = bucket.views[k]
        if param.grad is None:  # copy and pre-divide in one pass (see GradientSync.prescale)
            if not np.may_share_memory(g, bucket.buffer):  # else backward wrote it there
                np.multiply(g, self.sync.prescale, out=view)
        else:  # gradients accumulated under no_sync() are part of this synchronisation
            np.add(param.grad, g, out=view)
            view *= self.sync.prescale
        if not bucket.ready[k]:
            bucket.ready[k] = True
            bucket.pending -= 1
        if bucket.pending == 0:
            self._launch_in_order()

    def sync_gradients(self) -> None:
        """Average every parameter's current `.grad` across ranks now, outside backward.

        For gradients computed another way (e.g. `ad.grad`, or hand-written);
        parameters whose `.grad` is None count as zero. Collective.
        """
        self._arm()
        for b in self.buckets:
            for k, p in enumerate(b.params):
                if p.grad is not None:
                    np.multiply(p.grad, self.sync.prescale, out=b.views[k])
                    b.ready[k] = True
                    b.pending -= 1
            if b.pending == 0:
                self._launch_in_order()
        self._finish()

    def _launch_in_order(self) -> None:
        """Start every complete bucket whose predecessors have all been started."""
        while self._next < len(self.buckets) and self.buckets[self._next].pending == 0:
            self._launch(self.buckets[self._next])
            object.__setattr__(self, "_next", self._next + 1)

    def _launch(self, bucket: Bucket) -> None:
        if self._executor is None:
            self._futures.append(bucket)
        else:
            self._futures.append(self._executor.submit(self._reduce, bucket))

    def _reduce(self, bucket: Bucket) -> dict:
        exact = (self._exact_mean(bucket.buffer) if self._measuring and self._owned is None
                 else None)
        t = time.perf_counter()
        report = self.sync.reduce(bucket.buffer, bucket.index,
                                  shapes=[tuple(p.shape) for p in bucket.params])
        report["start"], report["end"], report["bucket"] = t, time.perf_counter(), bucket.index
        if exact is not None:
            report["fidelity"] = _fidelity(bucket.buffer, exact)
        return report

    def _exact_mean(self, buffer: np.ndarray) -> np.ndarray:
        """The exact average over ranks of the gradient in `buffer` (a copy; pre-scaled as
        the strategy wants it, so divided here by what the prescale left to divide)."""
        exact = self.comm.allreduce(buffer)
        exact *= exact.dtype.type(1.0 / (self.comm.size * self.sync.prescale))
        return exact

    def _finish(self) -> None:
        """After the backward walk: complete the step's reductions and publish the gradients."""
        stats = StepStats()
        for b in self.buckets[self._next:]:
            stats.unused += b.fill_missing()
        self._launch_in_order()
        t_wait = time.perf_counter()
        reports = []
        try:
            for f in self._futures:
                reports.append(f.result() if isinstance(f, Future) else self._reduce(f))
        finally:
            self._futures.clear()
            object.__setattr__(self, "_next", 0)
            object.__setattr__(self, "_armed", False)
            for b in self.buckets:
                b.reset()
        t_done = time.perf_counter()
        stats.wait_s = t_done - t_wait
        stats.spans.append(("wait", -1, t_wait, t_done))
        for i, b in enumerate(self.buckets):
            if self._owned is None:
                for p, g in zip(b.params, b.grads):
                    p.grad = g
            else:  # only this rank's own slots hold the average
                for p, g, mine in zip(b.params, b.grads, self._owned[i]):
                    p.grad = g if mine else None
        stats.buckets = len(reports)
        measured = [r["fidelity"] for r in reports if "fidelity" in r]
        if measured:
            err2, ref2, got2, dot = np.sum(measured, axis=0)
            stats.grad_error = float(np.sqrt(err2 / ref2)) if ref2 > 0 else 0.0
            stats.grad_cosine = float(dot / np.sqrt(ref2 * got2)) if ref2 * got2 > 0 else 1.0
        object.__setattr__(self, "_measuring", False)
        for r in reports:
            stats.bytes_sent += r.get("bytes_sent", 0)
            stats.compress_s += r.get("compress_s", 0.0)
            stats.communicate_s += r.get("communicate_s", 0.0)
            stats.decompress_s += r.get("decompress_s", 0.0)
            t = r["start"]
            for phase in ("compress", "communicate", "decompress"):
                d = r.get(f"{phase}_s", 0.0)
                if d:
                    stats.spans.append((phase, r["bucket"], t, t + d))
                    t += d
        object.__setattr__(self, "stats", stats)

    def state_dict(self) -> dict[str, np.ndarray]:
        """The wrapped module's state (no 'module.' prefix, so it loads into an unwrapped model)."""
        return self.module.state_dict()

    def load_state_dict(self, state_dict: Any, strict: bool = True) -> Any:
        return self.module.load_state_dict(state_dict, strict=strict)

    def sync_state_dict(self) -> dict[str, np.ndarray]:
        """Run state of the gradient synchronisation (error-feedback residuals etc.), this rank."""
        return self.sync.state_dict()

    def load_sync_state_dict(self, state: dict[str, np.ndarray]) -> None:
        self.sync.load_state_dict(state)

    def close(self) -> None:
        """Stop the communication thread (also done at interpreter exit); the parameters'
        gradients go back to fresh arrays."""
        for b in self.buckets:
            for p in b.params:
                p.grad_buffer = None
        if self._executor is not None:
            self._executor.shutdown(wait=True)


def _fidelity(got: np.ndarray, exact: np.ndarray) -> tuple[float, float, float, float]:
    """(||got - exact||^2, ||exact||^2, ||got||^2, <got, exact>) of one bucket (BLAS dot
    products in the bucket's dtype, as Python floats: summed over buckets in float64)."""
    diff = got - exact
    return (float(np.vdot(diff, diff)), float(np.vdot(exact, exact)),
            float(np.vdot(got, got)), float(np.vdot(got, exact)))
