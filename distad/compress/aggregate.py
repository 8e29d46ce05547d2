"""Aggregation strategies: the only code that calls MPI for gradients.

Each strategy takes a communicator (an ``mpi4py.MPI.Comm``, or any object whose ``.mpi`` is
one, such as ``distad.comm.Communicator``), one rank's bucket (1-D float32, the same n on every
rank) and a compressor, and returns an :class:`Aggregated`: the mean over ranks as float32,
identical on every rank, and the exact bytes this rank passed to MPI. Only buffer-based
collectives with built-in operations are used (never pickle, never a Python ``MPI.Op``).

Strategies, by name:

- ``allreduce``: summable payloads, Allreduce with MPI.SUM on the widened dtype.
- ``dense_allreduce``: decompress locally, Allreduce the float32 result (any compressor).
- ``allgather``: Allgather (Allgatherv for variable sizes) of the payload bytes, then every
  rank decompresses and sums all payloads in float32.
- ``two_phase``: split into p chunks, compress each, Alltoallv, reduce one's own chunk,
  re-compress it, Allgatherv; about 2 wire_bytes(n) per rank whatever p is.
- ``majority``: signSGD's majority vote on the packed sign bits.
- ``powersgd``: PowerSGD's two allreduces (P, then Q) with a warm-started Q.

``choose_aggregation`` picks among the strategies whose result is the exact mean of the ranks'
decompressed payloads (allreduce, allgather, dense_allreduce) with an alpha-beta cost model;
two_phase (which compresses twice) and majority are used when asked for.

Every strategy takes an optional ``out`` (float32, (n,), C-contiguous) and then writes the mean
there instead of into a new array; ``out`` may be the bucket x itself, which is read for the
last time before ``out`` is written. Decoding into a buffer the caller reuses every step saves
the page faults of a fresh array (about 13 ms for 64 MB on the reference machine).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

from .base import Compressor, Payload, Sent, check_bucket, output_array
from .powersgd import (
    LowRankVector,
    PowerSGD,
    as_matrix,
    matmul_rows,
    matmul_transposed,
    orthogonalise,
)

STRATEGIES = ("allreduce", "dense_allreduce", "allgather", "two_phase", "majority", "powersgd")


@dataclass(frozen=True)
class Aggregated:
    """The result of aggregating one bucket.

    ``mean``: float32 (n,), the average over ranks (for ``majority``, the vote in {-1, 0, 1}),
    identical on every rank. ``bytes_sent`` / ``bytes_received``: the sum of ``nbytes`` of the
    send / receive buffers this rank passed to MPI in this call (an in-place Allreduce counts
    its buffer as both). ``sent``: what this rank's own contribution decompresses to, when asked
    for (error feedback needs it), else None: float32 (n,), or a :class:`SparseVector` (the
    allgather of a sparsifier; ``np.asarray`` makes it dense). ``state``: run state to hand to
    the next call for this bucket (PowerSGD's Q), else None. ``compress_s``,
    ``communicate_s``, ``decompress_s``: this rank's wall time encoding (including the local
    linear algebra of PowerSGD), inside MPI calls, and decoding and summing.
    """

    mean: np.ndarray
    strategy: str
    bytes_sent: int
    bytes_received: int
    sent: Sent | None = None
    state: np.ndarray | None = None
    compress_s: float = 0.0
    communicate_s: float = 0.0
    decompress_s: float = 0.0


def mpi_comm(comm: Any) -> Any:
    """The mpi4py communicator behind ``comm`` (its ``.mpi`` if it has one)."""
    return getattr(comm, "mpi", comm)


def _mpi():
    # Imported on first use, so that compressors and their benchmark run without MPI.
    from mpi4py import MPI

    return MPI


class _Traffic:
    """The communicator plus a count of the bytes of every buffer handed to MPI, and the time
    spent in each phase (``phase("compress")``, MPI calls, ``phase("decompress")``)."""

    def __init__(self, comm: Any) -> None:
        self.comm = mpi_comm(comm)
        self.size = self.comm.Get_size()
        self.rank = self.comm.Get_rank()
        self.sent = 0
        self.received = 0
        self.seconds = {"compress": 0.0, "communicate": 0.0, "decompress": 0.0}
        self.MPI = _mpi()

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - start

    def _op(self, op: str):
        return {"sum": self.MPI.SUM, "max": self.MPI.MAX}[op]

    def allreduce(self, send: np.ndarray, op: str) -> np.ndarray:
        recv = np.empty_like(send)
        with self.phase("communicate"):
            self.comm.Allreduce(send, recv, op=self._op(op))
        self.sent += send.nbytes
        self.received += recv.nbytes
        return recv

    def allreduce_in_place(self, buf: np.ndarray, op: str) -> np.ndarray:
        with self.phase("communicate"):
            self.comm.Allreduce(self.MPI.IN_PLACE, buf, op=self._op(op))
        self.sent += buf.nbytes
        self.received += buf.nbytes
        return buf

    def exchange_counts(self, counts: Sequence[int], personal: bool) -> list[int]:
        """Sizes before a v-collective, as int64: Allgather of this rank's one count, or
        (``personal``) Alltoall of one count per destination."""
        send = np.array(counts, np.int64)
        recv = np.empty(self.size, np.int64)
        with self.phase("communicate"):
            (self.comm.Alltoall if personal else self.comm.Allgather)(send, recv)
        self.sent += send.nbytes
        self.received += recv.nbytes
        return [int(c) for c in recv]

    def allgatherv(self, buf: np.ndarray, counts: Sequence[int] | None) -> list[np.ndarray]:
        """Every rank's uint8 buffer, in rank order; counts None means all are buf's size."""
        byte = self.MPI.BYTE
        if counts is None:
            counts = [buf.size] * self.size
            recv = np.empty(sum(counts), np.uint8)
            with self.phase("communicate"):
                self.comm.Allgather([buf, byte], [recv, byte])
        else:
            recv = np.empty(sum(counts), np.uint8)
            with self.phase("communicate"):
                self.comm.Allgatherv([buf, byte], [recv, counts, _displacements(counts), byte])
        self.sent += buf.nbytes
        self.received += recv.nbytes
        return _split(recv, counts)

    def alltoallv(self, send: np.ndarray, send_counts: Sequence[int], recv_counts: Sequence[int]):
        byte = self.MPI.BYTE
        recv = np.empty(sum(recv_counts), np.uint8)
        with self.phase("communicate"):
            self.comm.Alltoallv(
                [send, send_counts, _displacements(send_counts), byte],
                [recv, recv_counts, _displacements(recv_counts), byte],
            )
        self.sent += send.nbytes
        self.received += recv.nbytes
        return _split(recv, recv_counts)

    def result(self, mean, strategy, sent=None, state=None) -> Aggregated:
        sec = self.seconds
        return Aggregated(
            mean, strategy, self.sent, self.received, sent, state,
            sec["compress"], sec["communicate"], sec["decompress"],
        )  # fmt: skip


def _displacements(counts: Sequence[int]) -> list[int]:
    return [0, *np.cumsum(counts[:-1], dtype=np.int64).tolist()]


def _split(buf: np.ndarray, counts: Sequence[int]) -> list[np.ndarray]:
    ends = np.cumsum(counts).tolist()
    return [buf[end - c : end] for c, end in zip(counts, ends)]


def _shared_meta(t: _Traffic, compressor: Compressor, x: np.ndarray) -> dict[str, Any] | None:
    """Agree on the shared scale (Allreduce MAX of each rank's local scale), if one is needed.

    A NaN local scale is sent as +inf, so every rank gets the same non-finite scale (MAX over
    NaN is not defined by MPI) and every rank's decompression yields NaN.
    """
    if not compressor.needs_shared_scale:
        return None
    with t.phase("compress"):
        local = np.array([compressor.local_scale(x)], np.float32)
    if np.isnan(local[0]):
        local[0] = np.inf
    return {"scale": t.allreduce(local, "max")[0]}


def _check_size(compressor: Compressor, payload: Payload, n: int, op: str) -> None:
    if compressor.fixed_size and payload.nbytes != compressor.wire_bytes(n):
        raise RuntimeError(
            f"{op}: {compressor.spec} produced {payload.nbytes} bytes for n={n}, "
            f"wire_bytes says {compressor.wire_bytes(n)}"
        )


def _mean_in_place(total: np.ndarray, count: int) -> np.ndarray:
    if count != 1:
        np.divide(total, np.float32(count), out=total)
    return total


def _start(comm: Any, x: np.ndarray, out: np.ndarray | None, op: str
           ) -> tuple[np.ndarray, np.ndarray | None, _Traffic]:
    """What every strategy begins with: the checked bucket, the caller's destination (None
    without ``out``) and a counter of this call's traffic and phase times."""
    x = check_bucket(x, op)
    return x, (None if out is None else output_array(out, x.size, op)), _Traffic(comm)


def _detached(sent: Sent | None, dest: np.ndarray | None) -> Sent | None:
    """``sent``, copied if it shares memory with ``dest`` (the payload of ``none`` is x itself,
    and x may be the caller's ``out``), so that writing the mean cannot change it."""
    if isinstance(sent, np.ndarray) and dest is not None and np.may_share_memory(sent, dest):
        return sent.copy()
    return sent


def _deliver(mean: np.ndarray, dest: np.ndarray | None) -> np.ndarray:
    """``mean`` in ``dest`` if the caller gave one (copied only if it is not there already)."""
    if dest is None or mean is dest:
        return mean
    np.copyto(dest, mean)
    return dest


def allreduce_payloads(
    comm: Any,
    x: np.ndarray,
    compressor: Compressor,
    rng: np.random.Generator | None = None,
    *,
    need_sent: bool = False,
    out: np.ndarray | None = None,
) -> Aggregated:
    """``allreduce``: Allreduce(SUM) of a summable payload on its widened dtypes, then decode.

    Shared scales are agreed first (one Allreduce MAX of a float32). Compressors with
    ``divide_before_sum`` (fp16) compress x / p, so that the low-precision sum is already the
    mean and cannot overflow; the others are summed (integers exactly) and divided after
    decoding.
    """
    x, dest, t = _start(comm, x, out, "allreduce")
    if not compressor.summable:
        raise ValueError(f"allreduce: {compressor.spec} payloads are not summable")
    p, n = t.size, x.size
    meta = _shared_meta(t, compressor, x)
    divide = compressor.divide_before_sum and p > 1
    with t.phase("compress"):
        payload = compressor.compress(x / np.float32(p) if divide else x, rng, meta)
        _check_size(compressor, payload, n, "allreduce")
        wide = [a.astype(dt, copy=False) for a, dt in zip(payload.arrays, compressor.sum_dtypes(p))]
    sent = None
    if need_sent:
        with t.phase("decompress"):
            sent = _detached(compressor.decompress(payload, n), dest)
            if divide:
                sent = sent * np.float32(p)
    sums = []
    for a in wide:  # in place unless the buffer is the input or backs `sent`
        if np.may_share_memory(a, x) or (sent is not None and np.may_share_memory(a, sent)):
            sums.append(t.allreduce(a, "sum"))
        else:
            sums.append(t.allreduce_in_place(a, "sum"))
    with t.phase("decompress"):
        mean = compressor.decompress(Payload(tuple(sums), payload.meta), n, out=dest)
        if not divide:  # in place, unless mean is x itself (the payload of `none`)
            own = mean is dest or not np.may_share_memory(mean, x)
            mean = _mean_in_place(mean, p) if own else mean / np.float32(p)
        mean = _deliver(mean, dest)
    return t.result(mean, "allreduce", sent)


def dense_allreduce(
    comm: Any,
    x: np.ndarray,
    compressor: Compressor,
    rng: np.random.Generator | None = None,
    *,
    need_sent: bool = False,
    out: np.ndarray | None = None,
) -> Aggregated:
    """``dense_allreduce``: decompress this rank's payload and Allreduce(SUM) it as float32.

    Costs 4n bytes like no compression, but keeps the compressor's numerics; for a sparse
    payload of density above about 1/p it is cheaper than allgather.
    """
    x, dest, t = _start(comm, x, out, "dense_allreduce")
    meta = _shared_meta(t, compressor, x)
    with t.phase("compress"):
        payload = compressor.compress(x, rng, meta)
    with t.phase("decompress"):  # into dest unless it must survive as `sent`
        dense = compressor.decompress(payload, x.size, out=None if need_sent else dest)
        if need_sent:
            dense = _detached(dense, dest)
    if need_sent or (dense is not dest and np.may_share_memory(dense, x)):
        total = t.allreduce(dense, "sum")
    else:
        total = t.allreduce_in_place(dense, "sum")
    with t.phase("decompress"):
        mean = _deliver(_mean_in_place(total, t.size), dest)
    return t.result(mean, "dense_allreduce", dense if need_sent else None)


def allgather_payloads(
    comm: Any,
    x: np.ndarray,
    compressor: Compressor,
    rng: np.random.Generator | None = None,
    *,
    need_sent: bool = False,
    out: np.ndarray | None = None,
) -> Aggregated:
    """``allgather``: gather every rank's payload bytes, decompress and sum them in float32.

    Fixed-size payloads use one Allgather; variable ones (threshold) first Allgather their
    sizes (8 bytes per rank), then Allgatherv. Each rank receives p payloads.
    """
    x, dest, t = _start(comm, x, out, "allgather")
    n = x.size
    meta = _shared_meta(t, compressor, x)
    with t.phase("compress"):
        payload = compressor.compress(x, rng, meta)
        _check_size(compressor, payload, n, "allgather")
        buf = payload.to_bytes()
    counts = None if compressor.fixed_size else t.exchange_counts([buf.size], personal=False)
    blocks = t.allgatherv(buf, counts)
    with t.phase("decompress"):
        sent = _detached(compressor.contribution(payload, n), dest) if need_sent else None
        total = np.empty(n, np.float32) if dest is None else dest
        first, *rest = blocks  # the first decoded in place of zeros + accumulate
        compressor.decompress(compressor.unpack(first, n, payload.meta), n, out=total)
        for block in rest:
            compressor.accumulate(compressor.unpack(block, n, payload.meta), total)
        mean = _mean_in_place(total, t.size)
    return t.result(mean, "allgather", sent)


def two_phase_exchange(
    comm: Any,
    x: np.ndarray,
    compressor: Compressor,
    rng: np.random.Generator | None = None,
    *,
    need_sent: bool = False,
    out: np.ndarray | None = None,
) -> Aggregated:
    """``two_phase``: compressed reduce-scatter, then compressed allgather.

    The bucket is cut into p chunks, chunk j = x[j n // p : (j + 1) n // p]; each is compressed
    (in chunk order, so a shared rng stays in step) and sent to rank j with one Alltoallv. Rank
    j decompresses the p payloads of its chunk, averages them in float32, compresses the mean
    again under the shared metadata of phase one (the shared scale, or random-k's indices, so
    every rank can decode it) and one Allgatherv gives everyone every reduced chunk. Bytes per
    rank stay near 2 wire_bytes(n) for any p. The re-compression error is not fed back into
    error feedback (``sent`` holds the phase-one contribution only). Buckets with fewer
    elements than ranks go through ``allgather``.
    """
    x = check_bucket(x, "two_phase")
    if compressor.multi_round:
        raise ValueError(f"two_phase: {compressor.spec} needs its own multi-round exchange")
    if x.size < mpi_comm(comm).Get_size():
        return allgather_payloads(comm, x, compressor, rng, need_sent=need_sent, out=out)
    x, dest, t = _start(comm, x, out, "two_phase")
    p, me, n = t.size, t.rank, x.size
    bounds = [j * n // p for j in range(p + 1)]
    sizes = [bounds[j + 1] - bounds[j] for j in range(p)]
    meta = _shared_meta(t, compressor, x)
    with t.phase("compress"):
        parts = [compressor.compress(x[bounds[j] : bounds[j + 1]], rng, meta) for j in range(p)]
        for part, size in zip(parts, sizes):
            _check_size(compressor, part, size, "two_phase")
        send = np.concatenate([part.to_bytes() for part in parts])
    send_counts = [part.nbytes for part in parts]
    if compressor.fixed_size:
        recv_counts = [compressor.wire_bytes(sizes[me])] * p
    else:
        recv_counts = t.exchange_counts(send_counts, personal=True)
    blocks = t.alltoallv(send, send_counts, recv_counts)
    with t.phase("decompress"):
        mine = np.empty(sizes[me], np.float32)
        first, *rest = (compressor.unpack(b, sizes[me], parts[me].meta) for b in blocks)
        compressor.decompress(first, sizes[me], out=mine)
        for chunk in rest:
            compressor.accumulate(chunk, mine)
    with t.phase("compress"):
        reduced = compressor.compress(_mean_in_place(mine, p), rng, parts[me].meta)
    if compressor.fixed_size:
        counts = [compressor.wire_bytes(s) for s in sizes]
    else:
        counts = t.exchange_counts([reduced.nbytes], personal=False)
    blocks = t.allgatherv(reduced.to_bytes(), counts)
    with t.phase("decompress"):
        sent = None
        if need_sent:  # before dest is written: parts may be views of x, and x may be dest
            sent = np.empty(n, np.float32)
            for j, part in enumerate(parts):
                compressor.decompress(part, sizes[j], out=sent[bounds[j] : bounds[j + 1]])
        mean = np.empty(n, np.float32) if dest is None else dest
        for j, block in enumerate(blocks):
            chunk = compressor.unpack(block, sizes[j], parts[j].meta)
            compressor.decompress(chunk, sizes[j], out=mean[bounds[j] : bounds[j + 1]])
    return t.result(mean, "two_phase", sent)


def majority_vote(
    comm: Any,
    x: np.ndarray,
    compressor: Compressor,
    rng: np.random.Generator | None = None,
    *,
    need_sent: bool = False,
    out: np.ndarray | None = None,
) -> Aggregated:
    """``majority``: signSGD with majority vote (Bernstein et al. 2018).

    Every rank's packed sign bits are allgathered (ceil(n / 8) bytes each); the result is
    sign(sum of the ranks' ±1) as float32, 0 where the vote is tied.
    """
    x, dest, t = _start(comm, x, out, "majority")
    if not compressor.majority_vote:
        raise ValueError(f"majority: {compressor.spec} does not send packed sign bits")
    n = x.size
    with t.phase("compress"):
        payload = compressor.compress(x, rng)
        _check_size(compressor, payload, n, "majority")
    blocks = t.allgatherv(payload.arrays[0], None)
    with t.phase("decompress"):
        sent = compressor.decompress(payload, n) if need_sent else None
        ones = np.zeros(n, np.int32)
        for block in blocks:
            ones += np.unpackbits(block, count=n)
        ones *= 2  # sign(2 ones - p): +1 for a majority of ones, -1 of zeros, 0 on a tie
        ones -= t.size
        np.sign(ones, out=ones)
        vote = np.empty(n, np.float32) if dest is None else dest
        np.copyto(vote, ones, casting="same_kind")
    return t.result(vote, "majority", sent)


def powersgd_exchange(
    comm: Any,
    x: np.ndarray,
    compressor: PowerSGD,
    rng: np.random.Generator | None = None,
    *,
    state: np.ndarray | None = None,
    shapes: Sequence[Sequence[int]] | None = None,
    need_sent: bool = False,
    out: np.ndarray | None = None,
) -> Aggregated:
    """``powersgd``: rank-r PowerSGD as two explicit allreduce rounds.

    For each matrix M of ``compressor.plan(n, shapes)`` worth compressing, with Q (cols, r) the
    warm start from ``state`` (or, on the first call, standard normal draws from ``rng``, which
    must be in the same state on every rank):

    1. P = M Q; one Allreduce(SUM) of every P together with the uncompressed tensors; / p;
    2. P = orthogonalise(P) (reduced QR, identical on all ranks);
    3. Q = M^T P; one Allreduce(SUM) of every Q; / p;
    4. mean M ~ P Q^T.

    ``state`` of the result is the averaged Q (flat float32), the next call's warm start;
    ``sent`` is this rank's P (M^T P)^T (Vogels et al.'s per-rank error-feedback term).
    """
    x, dest, t = _start(comm, x, out, "powersgd")
    if not isinstance(compressor, PowerSGD):
        raise ValueError(f"powersgd: needs a PowerSGD compressor, got {compressor.spec}")
    p, n, r = t.size, x.size, compressor.rank
    blocks = compressor.plan(n, shapes)
    low_rank = [b for b in blocks if b.compressed]
    dense = [b for b in blocks if not b.compressed]
    q_size = compressor.q_size(blocks)
    if state is None or state.size != q_size:
        if not isinstance(rng, np.random.Generator):
            raise TypeError("powersgd: the first call needs a shared np.random.Generator for Q")
        state = rng.standard_normal(q_size, dtype=np.float32)
    p_size = sum(b.rows * r for b in low_rank)
    with t.phase("compress"):
        matrices = [as_matrix(x, b) for b in low_rank]
        qs = _views(state, [(b.cols, r) for b in low_rank])
        round1 = np.empty(p_size + sum(b.size for b in dense), np.float32)
        ps = _views(round1, [(b.rows, r) for b in low_rank])
        dense_slots = _split(round1[p_size:], [b.size for b in dense])
        for m, q, pm in zip(matrices, qs, ps):
            matmul_rows(m, q, pm)
        for b, slot in zip(dense, dense_slots):
            slot[:] = x[b.start : b.start + b.size]
    t.allreduce_in_place(round1, "sum")
    with t.phase("compress"):
        _mean_in_place(round1, p)
        ps = [orthogonalise(pm) for pm in ps]
        round2 = np.empty(q_size, np.float32)
        new_qs = _views(round2, [(b.cols, r) for b in low_rank])
        for m, pm, q in zip(matrices, ps, new_qs):
            matmul_transposed(m, pm, q)
    sent = None
    if need_sent:  # the local term, from this rank's Q before it is averaged (copied)
        sent = LowRankVector(
            tuple(blocks),
            tuple((pm, q.copy()) for pm, q in zip(ps, new_qs)),
            tuple(x[b.start : b.start + b.size].copy() for b in dense),
            n,
        )
    if low_rank:
        t.allreduce_in_place(round2, "sum")
    with t.phase("decompress"):
        _mean_in_place(round2, p)
        averaged = LowRankVector(tuple(blocks), tuple(zip(ps, new_qs)), tuple(dense_slots), n)
        mean = averaged.write_into(np.empty(n, np.float32) if dest is None else dest)
    return t.result(mean, "powersgd", sent, round2)


def _views(flat: np.ndarray, shapes: Sequence[tuple[int, int]]) -> list[np.ndarray]:
    """Consecutive views of a flat array with the given 2-D shapes."""
    views, offset = [], 0
    for rows, cols in shapes:
        views.append(flat[offset : offset + rows * cols].reshape(rows, cols))
        offset += rows * cols
    return views


@dataclass(frozen=True)
class CostModel:
    """An alpha-beta model of collective time: alpha s per message step, beta s per byte.

    Defaults: alpha = 20 us, beta = 0.8 ns/byte (10 Gbit/s). Per rank, for p ranks, B bytes
    and L = ceil(log2 p): allreduce min(ring 2 (p-1) alpha + 2 (p-1)/p B beta, recursive
    doubling L (alpha + B beta)); allgather of B per rank L alpha + (p-1) B beta; Alltoall of
    B in total (p-1) alpha + (p-1)/p B beta; a 4-byte scale agreement L alpha. For a large
    sparse payload of density d (8 bytes per kept element), allgather beats the dense float32
    allreduce when d < 1/p.
    """

    alpha: float = 20e-6
    beta: float = 1 / 1.25e9

    def allreduce(self, nbytes: float, p: int) -> float:
        ring = 2 * (p - 1) * self.alpha + 2 * (p - 1) / p * nbytes * self.beta
        return min(ring, _steps(p) * (self.alpha + nbytes * self.beta))

    def allgather(self, nbytes: float, p: int) -> float:
        return _steps(p) * self.alpha + (p - 1) * nbytes * self.beta

    def alltoall(self, nbytes: float, p: int) -> float:
        return (p - 1) * self.alpha + (p - 1) / p * nbytes * self.beta

    def seconds(self, strategy: str, compressor: Compressor, n: int, p: int) -> float:
        """Modelled time of ``strategy`` for one bucket of n elements on p ranks."""
        return strategy_seconds(self, strategy, compressor, n, p)


def strategy_seconds(net: Any, strategy: str, compressor: Compressor | None, n: int,
                     p: int) -> float:
    """Seconds of communication to aggregate one bucket of n float32 elements on p ranks.

    ``net`` prices the collectives: anything with ``alpha`` (seconds per message step) and
    ``allreduce``, ``allgather``, ``alltoall`` taking (bytes, p) — this module's alpha-beta
    CostModel, or a model fitted to a measured network (distad.comm.costmodel). Only the
    strategies' composition lives here, once. ``compressor`` None: the exact float32
    allreduce. Compression arithmetic is not included.
    """
    if p <= 1:
        return 0.0
    if compressor is None:
        return net.allreduce(4 * n, p)
    wire = compressor.wire_bytes(n)
    extra = _steps(p) * net.alpha if compressor.needs_shared_scale else 0.0
    if not compressor.fixed_size:
        extra += net.allgather(8, p)  # the size exchange before Allgatherv
    if strategy == "allreduce":
        layout = compressor.wire_layout(n)
        dtypes = compressor.sum_dtypes(p)
        summed = sum(np.dtype(dt).itemsize * count for dt, (_, count) in zip(dtypes, layout))
        return extra + net.allreduce(summed, p)
    if strategy == "dense_allreduce":
        return extra + net.allreduce(4 * n, p)
    if strategy in ("allgather", "majority"):
        return extra + net.allgather(wire, p)
    if strategy == "two_phase":
        chunk = compressor.wire_bytes(max(1, -(-n // p)))  # one of the p chunks, compressed
        return 2 * extra + net.alltoall(p * chunk, p) + net.allgather(chunk, p)
    if strategy == "powersgd":
        return sum(net.allreduce(np.dtype(dt).itemsize * c, p)
                   for dt, c in compressor.wire_layout(n))
    raise ValueError(f"CostModel.seconds: unknown strategy {strategy!r}; valid: {STRATEGIES}")


def _steps(p: int) -> int:
    return math.ceil(math.log2(p)) if p > 1 else 0


def check_strategy(strategy: str, compressor: Compressor) -> None:
    """Raise ValueError if ``strategy`` cannot aggregate ``compressor``'s payloads."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown aggregation {strategy!r}; valid: auto, {', '.join(STRATEGIES)}")
    if compressor.multi_round != (strategy == "powersgd"):
        raise ValueError(
            f"aggregation {strategy!r} cannot carry {compressor.spec}: PowerSGD and only "
            "PowerSGD uses the 'powersgd' exchange"
        )
    if strategy == "allreduce" and not compressor.summable:
        raise ValueError(
            f"aggregation 'allreduce' needs summable payloads; {compressor.spec} is not"
        )
    if strategy == "majority" and not compressor.majority_vote:
        raise ValueError(f"aggregation 'majority' needs sign bits; {compressor.spec} sends none")


def choose_aggregation(
    compressor: Compressor, n: int, p: int, cost_model: CostModel | None = None
) -> str:
    """The cheapest exact strategy for ``compressor`` on n elements and p ranks.

    PowerSGD always uses ``powersgd``. Otherwise the candidates are ``allreduce`` (summable
    payloads only), ``allgather`` and ``dense_allreduce``, compared by ``cost_model``; ties go
    to that order.
    """
    if compressor.multi_round:
        return "powersgd"
    cost = cost_model or CostModel()
    candidates = ["allreduce"] if compressor.summable else []
    candidates += ["allgather", "dense_allreduce"]
    return min(candidates, key=lambda s: cost.seconds(s, compressor, n, p))


_BY_NAME: Mapping[str, Callable[..., Aggregated]] = {
    "allreduce": allreduce_payloads,
    "dense_allreduce": dense_allreduce,
    "allgather": allgather_payloads,
    "two_phase": two_phase_exchange,
    "majority": majority_vote,
}


def aggregate(
    comm: Any,
    x: np.ndarray,
    compressor: Compressor,
    rng: np.random.Generator | None = None,
    *,
    strategy: str = "auto",
    cost_model: CostModel | None = None,
    need_sent: bool = False,
    state: np.ndarray | None = None,
    shapes: Sequence[Sequence[int]] | None = None,
    out: np.ndarray | None = None,
) -> Aggregated:
    """Average one bucket over the ranks of ``comm`` with ``strategy`` (or the chosen one).

    ``rng`` must be in the same state on every rank for compressors with
    ``needs_shared_seed``, and should differ between ranks otherwise. ``state`` and ``shapes``
    are PowerSGD's (see ``powersgd_exchange``) and ignored by the other strategies. With
    ``out`` (float32, (n,); may be x itself) the mean is written there.
    """
    if strategy == "auto":
        strategy = choose_aggregation(compressor, x.size, mpi_comm(comm).Get_size(), cost_model)
    check_strategy(strategy, compressor)
    if strategy == "powersgd":
        return powersgd_exchange(
            comm, x, compressor, rng, state=state, shapes=shapes, need_sent=need_sent, out=out
        )
    return _BY_NAME[strategy](comm, x, compressor, rng, need_sent=need_sent, out=out)
