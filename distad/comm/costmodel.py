"""An alpha-beta (Hockney) cost model of distad's collectives, aggregation strategies, the
data-parallel training step and pipeline schedules.

A message of n bytes between two ranks costs ``alpha + n * beta`` seconds: alpha is the
per-message latency (software stack plus wire), beta the seconds per byte of one rank's link
(8 / bits-per-second for a saturated link). Each collective algorithm is a sum of such steps
(Thakur, Rabenseifner and Gropp 2005; Chan et al. 2007); ``gamma`` is the seconds per byte of
the local reduction arithmetic. For p ranks, n bytes per rank and L = ceil(log2 p):

========================  =====================================================
allreduce, ring           2 (p-1) alpha + 2 (p-1)/p n beta + (p-1)/p n gamma
allreduce, rec. doubling  L (alpha + n beta + n gamma)
allreduce, Rabenseifner   2 L alpha + 2 (p-1)/p n beta + (p-1)/p n gamma
allgather (n per rank)    min(ring (p-1), rec. doubling L) alpha + (p-1) n beta
alltoall (n sent)         (p-1) alpha + (p-1)/p n beta
reduce_scatter (n in)     min(pairwise (p-1), rec. halving L) alpha + (p-1)/p n (beta + gamma)
bcast                     min(binomial L (alpha + n beta),
                          scatter+allgather (L + p - 1) alpha + 2 (p-1)/p n beta)
========================  =====================================================

:class:`CollectiveModel` holds (alpha, beta, gamma) of one network and, optionally, curves
fitted per (operation, rank count) from ``distad bench collectives --json`` output, which it
uses in place of the formulas at the rank counts that were measured. ``seconds(strategy,
compressor, n, p)`` has the signature of ``distad.compress.CostModel.seconds``, so a fitted
model can drive the compression layer's choice of aggregation. :class:`StepModel` predicts one
data-parallel training step (compute, compression, communication overlapping the backward
pass bucket by bucket, the wait at the end) and :func:`pipeline_step` the time of GPipe and
1F1B pipeline schedules. The module needs numpy only: no MPI, so predictions run anywhere.

Latency cannot be emulated on the machine where this was calibrated (no netem in its kernel),
so alpha there is the software stack's alone; give ``alpha=`` explicitly when predicting for a
real network.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

# The aggregation strategies and how each composes collectives live in the compression layer
# (numpy only, no MPI at import); this module prices the collectives on a measured network.
from ..compress.aggregate import strategy_seconds

__all__ = [
    "AlphaBeta",
    "CollectiveModel",
    "MeasuredCurve",
    "StepModel",
    "StepPrediction",
    "fit_alpha_beta",
    "pipeline_step",
    "shared_memory_default",
]

ALLREDUCE_ALGORITHMS = ("auto", "ring", "recursive_doubling", "rabenseifner")
_FIT_OPS = ("allreduce", "iallreduce", "allgather", "reduce_scatter", "alltoall", "bcast")


def _steps(p: int) -> int:
    """ceil(log2 p), the rounds of a recursive-doubling or binomial-tree algorithm."""
    return math.ceil(math.log2(p)) if p > 1 else 0


@dataclass(frozen=True)
class AlphaBeta:
    """A measured curve ``time = alpha + beta * nbytes`` (seconds; nbytes per rank)."""

    alpha: float
    beta: float

    def time(self, nbytes: float) -> float:
        """Seconds for nbytes."""
        return self.alpha + self.beta * float(nbytes)


def fit_alpha_beta(nbytes: Sequence[float], seconds: Sequence[float], *,
                   latency_max_bytes: int = 1024,
                   bandwidth_min_bytes: int = 64 * 1024) -> AlphaBeta:
    """Fit ``t = alpha + beta * n`` the Hockney way: latency from small, bandwidth from large.

    ``alpha`` is the median time of the messages of at most ``latency_max_bytes`` (if there
    are none, the intercept of the fit below); ``beta`` is the least-squares slope of
    ``t - alpha`` on ``n`` over messages of at least ``bandwidth_min_bytes``, weighted by
    1/t^2 so that every size counts by its relative error. Takes two equal-length sequences
    (bytes, seconds); returns an :class:`AlphaBeta`. Raises ValueError if fewer than two
    sizes are given or none is large enough to fit a slope.
    """
    n = np.asarray(nbytes, dtype=np.float64)
    t = np.asarray(seconds, dtype=np.float64)
    if n.shape != t.shape or n.size < 2:
        raise ValueError(f"fit_alpha_beta: need >= 2 (bytes, seconds) pairs, got {n.size}")
    large = n >= bandwidth_min_bytes
    if not large.any():
        raise ValueError(f"fit_alpha_beta: no message of >= {bandwidth_min_bytes} bytes to fit "
                         f"beta (largest is {int(n.max())})")
    small = n <= latency_max_bytes
    w = 1.0 / t[large] ** 2
    if small.any():
        alpha = float(np.median(t[small]))
        y = t[large] - alpha
        beta = float((w * n[large] * y).sum() / (w * n[large] ** 2).sum())
    else:  # weighted least squares for both
        A = np.stack([np.ones(large.sum()), n[large]], axis=1) * np.sqrt(w)[:, None]
        alpha, beta = np.linalg.lstsq(A, t[large] * np.sqrt(w), rcond=None)[0]
        alpha = max(float(alpha), 0.0)
    return AlphaBeta(float(alpha), max(float(beta), 0.0))


@dataclass(frozen=True)
class MeasuredCurve:
    """Seconds against bytes as measured, for sizes in between: linear interpolation between
    the measured sizes, the first time below them, the last segment's slope beyond them.
    Exact at every measured size, which an alpha-beta line is not where a machine's bandwidth
    depends on the size (caches, protocol switches). ``sizes`` ascending, bytes per rank."""

    sizes: tuple[float, ...]
    times: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.sizes) != len(self.times) or len(self.sizes) < 2:
            raise ValueError("MeasuredCurve: needs >= 2 (bytes, seconds) pairs of equal length")
        if any(b <= a for a, b in zip(self.sizes, self.sizes[1:])):
            raise ValueError("MeasuredCurve: sizes must be strictly ascending")

    def time(self, nbytes: float) -> float:
        """Seconds for nbytes."""
        n, xs, ys = float(nbytes), self.sizes, self.times
        if n <= xs[0]:
            return ys[0]
        if n >= xs[-1]:
            slope = max((ys[-1] - ys[-2]) / (xs[-1] - xs[-2]), 0.0)
            return ys[-1] + slope * (n - xs[-1])
        return float(np.interp(n, xs, ys))


@dataclass(frozen=True)
class CollectiveModel:
    """The alpha-beta cost of every collective on one network, per rank.

    ``alpha``: seconds per message step; ``beta``: seconds per byte on one rank's link;
    ``gamma``: seconds per byte of local reduction. ``cpu_bound``: the transport's copies run
    on the ranks' own cores (shared memory), so communication does not overlap computation on
    a rank that has one core. ``allreduce_algorithm``: one of ``ALLREDUCE_ALGORITHMS``
    ("auto" takes the cheapest). ``fits``: curves measured on this network, keyed by
    (operation, p), used instead of the formulas for that operation at that rank count;
    ``from_bench`` fills them. Byte conventions: ``allreduce``, ``bcast``: one rank's buffer;
    ``allgather``: one rank's contribution; ``alltoall``: one rank's whole send buffer;
    ``reduce_scatter``: one rank's whole input.
    """

    alpha: float = 20e-6
    beta: float = 8 / 10e9
    gamma: float = 0.0
    name: str = ""
    cpu_bound: bool = False
    allreduce_algorithm: str = "auto"
    fits: Mapping[tuple[str, int], AlphaBeta | MeasuredCurve] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.allreduce_algorithm not in ALLREDUCE_ALGORITHMS:
            raise ValueError(f"CollectiveModel: allreduce_algorithm must be one of "
                             f"{ALLREDUCE_ALGORITHMS}, got {self.allreduce_algorithm!r}")
        if self.alpha < 0 or self.beta < 0 or self.gamma < 0:
            raise ValueError("CollectiveModel: alpha, beta and gamma must be >= 0")

    # ---- networks -------------------------------------------------------------------------

    @classmethod
    def link(cls, gbit_s: float, *, alpha: float = 20e-6, efficiency: float = 1.0,
             name: str | None = None, **kw: Any) -> CollectiveModel:
        """A network whose links carry ``gbit_s`` Gbit/s each way, ``efficiency`` of it usable
        (TCP over a shaped link reached 0.94 on the emulated cluster), with latency alpha."""
        if gbit_s <= 0 or not 0 < efficiency <= 1:
            raise ValueError(f"CollectiveModel.link: need gbit_s > 0 and 0 < efficiency <= 1, "
                             f"got {gbit_s}, {efficiency}")
        return cls(alpha=alpha, beta=8 / (gbit_s * 1e9 * efficiency),
                   name=name or f"{gbit_s:g} Gbit/s", **kw)

    def at_rate(self, gbit_s: float, *, alpha: float | None = None,
                efficiency: float = 1.0) -> CollectiveModel:
        """This network with its links changed to ``gbit_s`` Gbit/s (``efficiency`` of which
        is usable): the measured curves are dropped, as they belong to the old links; alpha
        is kept unless given."""
        if gbit_s <= 0 or not 0 < efficiency <= 1:
            raise ValueError(f"CollectiveModel.at_rate: need gbit_s > 0 and 0 < efficiency <= 1,"
                             f" got {gbit_s}, {efficiency}")
        return replace(self, alpha=self.alpha if alpha is None else alpha,
                       beta=8 / (gbit_s * 1e9 * efficiency), fits={}, cpu_bound=False,
                       name=f"{gbit_s:g} Gbit/s")

    @property
    def gbit_s(self) -> float:
        """The link rate that beta amounts to, in Gbit/s."""
        return 8 / self.beta / 1e9 if self.beta > 0 else math.inf

    # ---- collectives ----------------------------------------------------------------------

    def _fitted(self, op: str, p: int, nbytes: float) -> float | None:
        f = self.fits.get((op, p))
        return f.time(nbytes) if f is not None else None

    def allreduce(self, nbytes: float, p: int, algorithm: str | None = None) -> float:
        """Seconds for an Allreduce of nbytes per rank on p ranks."""
        if p <= 1:
            return 0.0
        measured = self._fitted("allreduce", p, nbytes)
        if measured is not None and algorithm is None:
            return measured
        a, b, g, L = self.alpha, self.beta, self.gamma, _steps(p)
        frac = (p - 1) / p
        costs = {"ring": 2 * (p - 1) * a + 2 * frac * nbytes * b + frac * nbytes * g,
                 "recursive_doubling": L * (a + nbytes * (b + g)),
                 "rabenseifner": 2 * L * a + 2 * frac * nbytes * b + frac * nbytes * g}
        algo = algorithm or self.allreduce_algorithm
        return min(costs.values()) if algo == "auto" else costs[algo]

    def allgather(self, nbytes: float, p: int) -> float:
        """Seconds for an Allgather in which each of p ranks contributes nbytes."""
        if p <= 1:
            return 0.0
        measured = self._fitted("allgather", p, nbytes)
        if measured is not None:
            return measured
        return min(p - 1, _steps(p)) * self.alpha + (p - 1) * nbytes * self.beta

    def alltoall(self, nbytes: float, p: int) -> float:
        """Seconds for an Alltoall in which each rank sends nbytes in all (nbytes/p to each)."""
        if p <= 1:
            return 0.0
        measured = self._fitted("alltoall", p, nbytes)
        if measured is not None:
            return measured
        return (p - 1) * self.alpha + (p - 1) / p * nbytes * self.beta

    def reduce_scatter(self, nbytes: float, p: int) -> float:
        """Seconds for a Reduce_scatter of nbytes per rank (each keeps nbytes/p)."""
        if p <= 1:
            return 0.0
        measured = self._fitted("reduce_scatter", p, nbytes)
        if measured is not None:
            return measured
        # Pairwise exchange or recursive halving (MPICH's two for commutative operations):
        # the same bytes, p - 1 or log2(p) messages.
        steps = min(p - 1, _steps(p))
        return steps * self.alpha + (p - 1) / p * nbytes * (self.beta + self.gamma)

    def bcast(self, nbytes: float, p: int) -> float:
        """Seconds for a Bcast of nbytes to p ranks."""
        if p <= 1:
            return 0.0
        measured = self._fitted("bcast", p, nbytes)
        if measured is not None:
            return measured
        L = _steps(p)
        binomial = L * (self.alpha + nbytes * self.beta)
        scatter_allgather = (L + p - 1) * self.alpha + 2 * (p - 1) / p * nbytes * self.beta
        return min(binomial, scatter_allgather)

    def p2p(self, nbytes: float) -> float:
        """Seconds for one point-to-point message of nbytes."""
        return self.alpha + nbytes * self.beta

    # ---- aggregation strategies of distad.compress --------------------------------------

    def seconds(self, strategy: str, compressor: Any, n: int, p: int) -> float:
        """Seconds of communication for aggregating one bucket of n float32 elements on p ranks
        with ``strategy`` (one of ``distad.compress.STRATEGIES``) and ``compressor`` (a
        distad.compress Compressor, or None for the exact float32 allreduce). The signature of
        ``distad.compress.CostModel.seconds`` and the same composition of collectives
        (``strategy_seconds``), priced on this network, so this model can replace it in
        ``choose_aggregation``. Compression arithmetic is not included (see StepModel)."""
        return strategy_seconds(self, strategy, compressor, n, p)

    def wire_bytes_per_rank(self, strategy: str, compressor: Any, n: int, p: int) -> float:
        """Bytes one rank puts on its link for one bucket (the optimal algorithm's count, as
        nccl-tests' busbw assumes): what a link-bound run's bytes/s is compared with."""
        if p <= 1:
            return 0.0
        frac = (p - 1) / p
        if compressor is None or strategy == "dense_allreduce":
            return 2 * frac * 4 * n
        wire = compressor.wire_bytes(n)
        if strategy == "allreduce":
            return 2 * frac * wire
        if strategy in ("allgather", "majority"):
            return (p - 1) * wire
        if strategy == "two_phase":
            return 2 * frac * wire
        if strategy == "powersgd":
            return 2 * frac * wire
        raise ValueError(f"wire_bytes_per_rank: unknown strategy {strategy!r}")

    # ---- fitting --------------------------------------------------------------------------

    @classmethod
    def from_bench(cls, sources: Iterable[str | Path | Mapping[str, Any]], *,
                   name: str = "", cpu_bound: bool = False,
                   allreduce_algorithm: str = "auto", stat: str = "time_s") -> CollectiveModel:
        """Fit a model to ``distad bench collectives --json`` outputs (paths or loaded dicts),
        one per rank count. Every (operation, p) measured keeps its measured curve
        (``MeasuredCurve``: exact at the sizes measured); the network's alpha and beta come
        from the Hockney fit (``fit_alpha_beta``) of the allreduce curve of the largest p,
        read as the ring algorithm's (alpha = a / 2(p-1), beta = b p / 2(p-1)): that is what
        the formulas use at rank counts and rates that were not measured. ``stat`` picks the
        figure of each row: ``time_s`` (the median over repeats) or ``p10_s`` (the 10th
        percentile: on a shared machine, the least disturbed estimate)."""
        fits: dict[tuple[str, int], AlphaBeta | MeasuredCurve] = {}
        lines: dict[int, AlphaBeta] = {}
        for src in sources:
            data = src if isinstance(src, Mapping) else json.loads(Path(src).read_text())
            p = int(data["p"])
            by_op: dict[str, list[tuple[float, float]]] = {}
            for row in data["rows"]:
                nbytes = float(row["bytes"])
                if row["op"] == "allgather":
                    nbytes /= p  # the bench counts the whole gathered buffer
                by_op.setdefault(row["op"], []).append((nbytes, float(row[stat])))
            for op, pts in by_op.items():
                if op in _FIT_OPS and len(pts) >= 2:
                    sizes, times = zip(*sorted(dict(pts).items()))
                    if len(sizes) >= 2:
                        fits[(op, p)] = MeasuredCurve(tuple(sizes), tuple(times))
                    if op == "allreduce" and p > 1:
                        with contextlib.suppress(ValueError):  # no large message: no line
                            lines[p] = fit_alpha_beta(sizes, times)
        ring = sorted(lines.items())
        if not ring:
            raise ValueError("CollectiveModel.from_bench: no allreduce rows with p > 1 to fit")
        p, f = ring[-1]
        alpha = f.alpha / (2 * (p - 1))
        beta = f.beta * p / (2 * (p - 1))
        return cls(alpha=alpha, beta=beta, name=name or f"fitted ({8 / beta / 1e9:.2f} Gbit/s)",
                   cpu_bound=cpu_bound, allreduce_algorithm=allreduce_algorithm, fits=fits)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready parameters (fits as 'op@p' -> [alpha, beta])."""
        fits: dict[str, Any] = {}
        for (op, p), f in self.fits.items():
            fits[f"{op}@{p}"] = ([f.alpha, f.beta] if isinstance(f, AlphaBeta)
                                 else {"sizes": list(f.sizes), "times": list(f.times)})
        return {"name": self.name, "alpha": self.alpha, "beta": self.beta, "gamma": self.gamma,
                "gbit_s": self.gbit_s, "cpu_bound": self.cpu_bound,
                "allreduce_algorithm": self.allreduce_algorithm, "fits": fits}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CollectiveModel:
        """The inverse of ``to_dict``."""
        fits: dict[tuple[str, int], AlphaBeta | MeasuredCurve] = {}
        for key, f in d.get("fits", {}).items():
            op, p = key.rsplit("@", 1)
            fits[(op, int(p))] = (
                MeasuredCurve(tuple(f["sizes"]), tuple(f["times"])) if isinstance(f, Mapping)
                else AlphaBeta(float(f[0]), float(f[1])))
        return cls(alpha=float(d["alpha"]), beta=float(d["beta"]), gamma=float(d.get("gamma", 0)),
                   name=str(d.get("name", "")), cpu_bound=bool(d.get("cpu_bound", False)),
                   allreduce_algorithm=str(d.get("allreduce_algorithm", "auto")), fits=fits)


def shared_memory_default() -> CollectiveModel:
    """A rough one-node shared-memory model (MPICH, 2-core VM; docs/benchmarks.md): about
    5 us per step and 2-4 GB/s busbw for multi-MB buffers. Fit your own with ``from_bench``."""
    return CollectiveModel(alpha=2.5e-6, beta=1 / 3.0e9, name="shared memory (nominal)",
                           cpu_bound=True)


@dataclass(frozen=True)
class StepPrediction:
    """One predicted training step, in seconds per step on one rank: ``compute`` (forward,
    backward and optimizer on this rank's share of the cores, plus compression arithmetic
    that competes with them), ``compress`` (compression and decompression arithmetic),
    ``communicate`` (collectives, overlapped or not), ``wait`` (what remains after backward:
    the part of communication not hidden), ``step`` (= compute + wait) and ``bytes_per_rank``
    (what one rank puts on its link)."""

    compute: float
    compress: float
    communicate: float
    wait: float
    step: float
    bytes_per_rank: float

    def as_dict(self) -> dict[str, float]:
        """The fields as a dict (seconds, bytes)."""
        return {"compute_s": self.compute, "compress_s": self.compress,
                "communicate_s": self.communicate, "wait_s": self.wait, "step_s": self.step,
                "bytes_per_rank": self.bytes_per_rank}


@dataclass(frozen=True)
class StepModel:
    """One data-parallel training step of a model: calibrated once, predicted anywhere.

    ``forward_s``, ``backward_s``, ``update_s``: one rank's forward, backward and optimizer
    step at ``batch`` samples on one whole core (backward and forward scale with the batch,
    the update does not). ``bucket_elems``: float32 elements of each fusion bucket in launch
    order (DataParallel's buckets: reverse parameter order, so bucket i is ready when the
    backward pass has produced ``ready_fraction[i]`` of its work). ``compress_s_per_elem``:
    one rank's compression + memory + its own decompression, per element (0 for none);
    ``accumulate_s_per_elem``: decoding and adding one more rank's payload, per element
    (paid p - 1 times by allgather aggregation). ``fixed_s``: per-step costs that do not
    scale (Python overhead, the loss allreduce). ``zero``: the optimizer state is sharded
    (ZeroRedundancyOptimizer, `distad train --zero`): each rank updates 1/p of the
    parameters and the step ends with an Allgather of them; exact gradients are then
    reduce-scattered per bucket instead of allreduced.
    """

    forward_s: float
    backward_s: float
    update_s: float
    batch: int
    bucket_elems: tuple[int, ...]
    ready_fraction: tuple[float, ...] = ()
    compress_s_per_elem: float = 0.0
    accumulate_s_per_elem: float = 0.0
    fixed_s: float = 0.0
    zero: bool = False

    def __post_init__(self) -> None:
        if not self.bucket_elems:
            raise ValueError("StepModel: needs at least one bucket")
        if self.ready_fraction and len(self.ready_fraction) != len(self.bucket_elems):
            raise ValueError("StepModel: ready_fraction needs one entry per bucket")

    @property
    def params(self) -> int:
        """Elements in all buckets (the model's parameter count)."""
        return int(sum(self.bucket_elems))

    def _ready(self) -> list[float]:
        if self.ready_fraction:
            return list(self.ready_fraction)
        total = float(self.params)
        return list(np.cumsum(self.bucket_elems) / total)

    def predict(self, net: CollectiveModel, p: int, *, batch: int | None = None,
                compressor: Any = None, strategy: str | None = None,
                cores_per_rank: float = 1.0, overlap: bool = True,
                sync_s: float = 0.0) -> StepPrediction:
        """Predict one step on p ranks over ``net`` at ``batch`` samples per rank.

        ``compressor``/``strategy``: as in ``CollectiveModel.seconds`` (None: exact float32
        allreduce). ``cores_per_rank``: the share of a core each rank gets (0.5 for 4 ranks
        on 2 cores); the compute and compression arithmetic stretch by 1/cores_per_rank when
        it is below 1. The schedule is the one DataParallel runs: bucket i's collective starts
        on the communication thread once backward has produced it and bucket i-1's collective
        is done; compression arithmetic takes the rank's core away from backward; on a
        ``cpu_bound`` network (shared memory) the copies of a collective do too, so nothing
        overlaps. ``overlap=False``: all collectives after backward. ``sync_s``: how long
        ranks that are computing take to meet (with more threads than cores, the latency of a
        small allreduce while every rank keeps a thread busy, as `distad bench collectives
        --busy-threads 1` measures it: the ranks wait for each other to be scheduled; 0 with
        a core per thread). It is a floor, not a surcharge: a rank waits at least ``sync_s``
        after its own compute once per step, and a collective that outlasts that already
        contains the meeting (the link kept them waiting anyway), except on a ``cpu_bound``
        network with more ranks than cores, where the collective's copying, every rank's CPU
        work, starts only once the last rank is scheduled there: the meeting, then the
        collective.
        """
        b = batch if batch is not None else self.batch
        slow = 1.0 / min(1.0, cores_per_rank)
        scale = b / self.batch
        fwd, bwd = self.forward_s * scale * slow, self.backward_s * scale * slow
        shards = p if self.zero else 1
        update = self.update_s / shards * slow + self.fixed_s
        # ZeRO ends the step with an allgather of the parameters (not overlapped).
        gather = net.allgather(4 * self.params / p, p) if self.zero and p > 1 else 0.0
        gather_bytes = (p - 1) / p * 4 * self.params if self.zero and p > 1 else 0.0
        scatter = self.zero and compressor is None
        strategy = strategy or ("allreduce" if compressor is None else "allgather")
        comm_s, compress_s, bytes_rank = [], [], gather_bytes
        for n in self.bucket_elems:
            if scatter:  # each rank receives its own slice of the average only
                comm_s.append(net.reduce_scatter(4 * n, p) if p > 1 else 0.0)
                bytes_rank += (p - 1) / p * 4 * n if p > 1 else 0.0
                compress_s.append(0.0)
                continue
            comm_s.append(net.seconds(strategy, compressor, n, p) if p > 1 else 0.0)
            bytes_rank += net.wire_bytes_per_rank(strategy, compressor, n, p)
            c = 0.0
            if compressor is not None:
                c = n * self.compress_s_per_elem
                if strategy in ("allgather", "majority") and p > 1:
                    c += (p - 1) * n * self.accumulate_s_per_elem
            compress_s.append(c * slow)
        total_comm, total_compress = float(sum(comm_s)), float(sum(compress_s))
        if p <= 1:  # no communication; DataParallel still compresses, after backward
            compute = fwd + bwd + update
            return StepPrediction(compute, total_compress, 0.0, total_compress,
                                  compute + total_compress, 0.0)
        if net.cpu_bound or not overlap:
            # Everything on the rank's core, one after the other. A collective that outlasts
            # the meeting contains it, unless the ranks outnumber the cores on shared memory:
            # then they reach it as the scheduler lets them (sync_s apart), and its copying,
            # CPU work of every rank, starts only once they are all there.
            compute = fwd + bwd + total_compress + update
            queued = net.cpu_bound and slow > 1
            wait = (total_comm + sync_s if queued else max(total_comm, sync_s)) + gather
            return StepPrediction(compute, total_compress, total_comm + gather, wait,
                                  compute + wait, bytes_rank)
        # Event schedule: the core runs forward, backward and the compression of each bucket
        # (which delays the rest of backward); the link runs the collectives in order.
        cpu_t = fwd
        link_t = 0.0
        done_bwd = 0.0
        for frac, c, t in zip(self._ready(), compress_s, comm_s):
            cpu_t += (frac - done_bwd) * bwd  # backward up to this bucket's last gradient
            done_bwd = frac
            cpu_t += c                        # its compression, on the same core
            link_t = max(link_t, cpu_t) + t
        cpu_t += (1.0 - done_bwd) * bwd
        end = max(cpu_t + sync_s, link_t)
        compute = cpu_t + update
        wait = end - cpu_t + gather
        return StepPrediction(compute, total_compress, total_comm + gather, wait,
                              end + update + gather, bytes_rank)


def pipeline_step(schedule: str, stages: int, microbatches: int, forward_s: float,
                  backward_s: float, activation_bytes: float,
                  net: CollectiveModel, interleave: int = 1) -> float:
    """Seconds for one step of a pipeline-parallel schedule (per rank; all stages balanced).

    ``forward_s``/``backward_s``: one stage's time for one micro-batch; ``activation_bytes``:
    what crosses a stage boundary per micro-batch (the activation forward, its gradient
    back). GPipe (all forwards, then all backwards) and 1F1B (PipeDream-Flush) both take
    (m + s - 1)(t_f + t_b + 2 c) with c = alpha + activation_bytes * beta: the bubble is
    (s - 1)/(m + s - 1) of the step; 1F1B only holds fewer activations. The interleaved 1F1B
    of Megatron-LM with v chunks per rank shrinks the bubble to (s - 1)/v stage-slots at v
    times the messages. Returns seconds.
    """
    s, m = int(stages), int(microbatches)
    if s < 1 or m < 1:
        raise ValueError(f"pipeline_step: stages and microbatches must be >= 1, got {s}, {m}")
    c = net.p2p(activation_bytes) if s > 1 else 0.0
    slot = forward_s + backward_s
    if schedule in ("gpipe", "1f1b"):
        return (m + s - 1) * (slot + 2 * c)
    if schedule == "interleaved":
        v = max(1, int(interleave))
        return m * (slot + 2 * v * c) + (s - 1) * (slot / v + 2 * c)
    raise ValueError(f"pipeline_step: unknown schedule {schedule!r}; valid: gpipe, 1f1b, "
                     "interleaved")
