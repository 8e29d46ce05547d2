"""Aggregation strategies against the single-process computation.

Run under MPI as ``mpiexec -n P python -m pytest --with-mpi -m mpi tests/test_compress_mpi.py``;
the tests on COMM_SELF (one rank) run in the serial suite. The oracle: every rank's bucket and
random stream are regenerated from a seed and the rank, so each rank computes what the
strategy must return (decompress-and-mean of every rank's payload, in rank order) with numpy
alone. A RecordingComm wrapper adds up the nbytes of every send buffer handed to MPI.
"""

from __future__ import annotations

import numpy as np
import pytest
from mpi4py import MPI

import distad.compress as C

SEED = 2024
N = 4099  # not a multiple of 8, of a column, or of the rank count

SPECS = [
    "none", "fp16", "bf16", "int8", "int8:stochastic", "qsgd:16", "terngrad", "sign", "efsign",
    "onebit:64", "topk:0.01", "randk:0.05", "randk:0.05:rescale", "threshold:0.01",
]  # fmt: skip
# Strategies whose result is computed in rank order here, so equality is exact.
EXACT = {"allgather", "two_phase", "majority"}


def cases() -> list[tuple[str, str]]:
    out = []
    for spec in SPECS:
        c = C.get(spec).compressor
        strategies = ["allgather", "dense_allreduce", "two_phase"]
        strategies += ["allreduce"] * c.summable + ["majority"] * c.majority_vote
        out += [(spec, s) for s in strategies]
    return out


class RecordingComm:
    """An mpi4py communicator that counts the nbytes of every send buffer it passes on."""

    def __init__(self, comm: MPI.Comm) -> None:
        self.comm, self.sent = comm, 0

    def Get_size(self) -> int:
        return self.comm.Get_size()

    def Get_rank(self) -> int:
        return self.comm.Get_rank()

    def _count(self, send, recv) -> None:
        buf = recv if send is MPI.IN_PLACE else send
        self.sent += (buf[0] if isinstance(buf, list) else buf).nbytes

    def Allreduce(self, send, recv, op):
        self._count(send, recv)
        self.comm.Allreduce(send, recv, op=op)

    def Allgather(self, send, recv):
        self._count(send, recv)
        self.comm.Allgather(send, recv)

    def Allgatherv(self, send, recv):
        self._count(send, recv)
        self.comm.Allgatherv(send, recv)

    def Alltoall(self, send, recv):
        self._count(send, recv)
        self.comm.Alltoall(send, recv)

    def Alltoallv(self, send, recv):
        self._count(send, recv)
        self.comm.Alltoallv(send, recv)


def buckets(p: int, n: int = N) -> list[np.ndarray]:
    """Every rank's bucket; rank r's values are scaled by r + 1 so the ranks differ in range."""
    return [
        np.random.default_rng([SEED, r]).standard_normal(n, dtype=np.float32) * np.float32(r + 1)
        for r in range(p)
    ]


def streams(c: C.Compressor, p: int) -> list[np.random.Generator]:
    """Every rank's random stream: one shared seed where the compressor needs it."""
    if c.needs_shared_seed:
        return [np.random.default_rng([SEED, 1]) for _ in range(p)]
    return [np.random.default_rng([SEED, 2, r]) for r in range(p)]


def shared_meta(c: C.Compressor, xs: list[np.ndarray]):
    return {"scale": max(c.local_scale(x) for x in xs)} if c.needs_shared_scale else None


def expected_mean(strategy: str, c: C.Compressor, xs, rngs) -> np.ndarray:
    """The single-process computation of what ``strategy`` returns on every rank."""
    p, n = len(xs), xs[0].size
    meta = shared_meta(c, xs)
    if strategy == "majority":
        votes = sum(np.where(x >= 0, 1, -1) for x in xs)
        return np.sign(votes).astype(np.float32)
    if strategy != "two_phase":
        total = np.zeros(n, np.float32)
        for x, rng in zip(xs, rngs):
            total += c.decompress(c.compress(x, rng, meta), n)
        return total / np.float32(p)
    bounds = [j * n // p for j in range(p + 1)]
    chunks = [slice(bounds[j], bounds[j + 1]) for j in range(p)]
    parts = [[c.compress(x[s], rng, meta) for s in chunks] for x, rng in zip(xs, rngs)]
    out = np.empty(n, np.float32)
    for j, s in enumerate(chunks):
        total = np.zeros(s.stop - s.start, np.float32)
        for r in range(p):
            total += c.decompress(parts[r][j], total.size)
        again = c.compress(total / np.float32(p), rngs[j], parts[j][j].meta)
        out[s] = c.decompress(again, total.size)
    return out


def tolerance(strategy: str, c: C.Compressor, xs) -> dict[str, float]:
    """Exact where this file sums in MPI's order; else MPI's summation order, plus fp16 sums."""
    if strategy in EXACT:
        return {"rtol": 0, "atol": 0}
    scale = max(float(np.abs(x).max()) for x in xs)
    if strategy == "allreduce" and c.divide_before_sum:  # summed in float16 by MPI
        return {"rtol": 0, "atol": 2e-3 * scale}
    return {"rtol": 1e-6, "atol": 1e-6 * scale}


def gathered(comm: MPI.Comm, a: np.ndarray) -> np.ndarray:
    out = np.empty((comm.Get_size(), a.size), a.dtype)
    comm.Allgather(a, out)
    return out


def run_case(world: MPI.Comm, spec: str, strategy: str):
    c = C.get(spec).compressor
    p, rank = world.Get_size(), world.Get_rank()
    xs = buckets(p)
    recorder = RecordingComm(world)
    result = C.aggregate(recorder, xs[rank], c, streams(c, p)[rank], strategy=strategy)
    return c, xs, recorder, result


def check_case(world: MPI.Comm, spec: str, strategy: str) -> None:
    c, xs, recorder, result = run_case(world, spec, strategy)
    assert result.strategy == strategy
    assert result.mean.dtype == np.float32 and result.mean.shape == (N,)
    want = expected_mean(strategy, c, xs, streams(c, len(xs)))
    np.testing.assert_allclose(result.mean, want, **tolerance(strategy, c, xs))
    everyone = gathered(world, result.mean)
    assert all(np.array_equal(everyone[0], row) for row in everyone)  # bit-identical
    assert result.bytes_sent == recorder.sent


@pytest.mark.parametrize(("spec", "strategy"), cases())
def test_one_rank_strategy_returns_the_decompressed_payload(spec, strategy):
    check_case(MPI.COMM_SELF, spec, strategy)


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize(("spec", "strategy"), cases())
def test_strategy_equals_the_single_process_mean_on_every_rank(spec, strategy):
    check_case(MPI.COMM_WORLD, spec, strategy)


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize(
    "spec", ["none", "fp16", "bf16", "qsgd:16", "sign", "efsign", "onebit", "topk:0.01"]
)
def test_allgather_passes_exactly_wire_bytes_to_mpi(spec):
    c, _, recorder, result = run_case(MPI.COMM_WORLD, spec, "allgather")
    assert result.bytes_sent == recorder.sent == c.wire_bytes(N)


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("spec", ["int8", "terngrad"])
def test_shared_scale_costs_one_float32_on_top_of_wire_bytes(spec):
    c, _, recorder, result = run_case(MPI.COMM_WORLD, spec, "allgather")
    assert result.bytes_sent == recorder.sent == c.wire_bytes(N) + 4


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("spec", ["none", "int8", "terngrad", "randk:0.05", "fp16"])
def test_allreduce_passes_the_payload_in_its_widened_sum_dtype(spec):
    c, _, recorder, result = run_case(MPI.COMM_WORLD, spec, "allreduce")
    (dtype,) = c.sum_dtypes(MPI.COMM_WORLD.Get_size())
    (count,) = [count for _, count in c.wire_layout(N)]
    scale_exchange = 4 if c.needs_shared_scale else 0
    assert result.bytes_sent == recorder.sent == count * dtype.itemsize + scale_exchange


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("spec", ["none", "fp16", "qsgd:16", "onebit", "topk:0.01"])
def test_two_phase_moves_about_twice_wire_bytes_whatever_the_rank_count(spec):
    c, _, _, result = run_case(MPI.COMM_WORLD, spec, "two_phase")
    p = MPI.COMM_WORLD.Get_size()
    per_chunk_overhead = 16  # a norm, a column's means, a partial byte of bits
    bound = 2 * c.wire_bytes(N) + 2 * p * per_chunk_overhead
    assert result.bytes_sent <= bound and result.bytes_received <= bound
    allgather = run_case(MPI.COMM_WORLD, spec, "allgather")[3]
    assert allgather.bytes_received == p * c.wire_bytes(N)  # what two-phase avoids


@pytest.mark.mpi(min_size=2)
def test_threshold_payloads_of_different_sizes_are_gathered_with_their_sizes():
    c, xs, recorder, result = run_case(MPI.COMM_WORLD, "threshold:0.01", "allgather")
    sizes = [c.compress(x, rng).nbytes for x, rng in zip(xs, streams(c, len(xs)))]
    rank = MPI.COMM_WORLD.Get_rank()
    assert len(set(sizes)) > 1  # the ranks' buckets really select different counts
    assert result.bytes_sent == recorder.sent == sizes[rank] + 8  # + its size, as int64
    assert result.bytes_received == sum(sizes) + 8 * len(sizes)


def _low_rank_buckets(p: int, shared_columns: bool) -> list[np.ndarray]:
    """Per rank: a (40, 30) matrix of rank 2, a (4, 3, 2) tensor, then a bias of 7."""
    base = np.random.default_rng([SEED, 9])
    a = base.standard_normal((40, 2))
    out = []
    for r in range(p):
        rng = np.random.default_rng([SEED, 10, r])
        left = a if shared_columns else rng.standard_normal((40, 2))
        m = left @ rng.standard_normal((2, 30))
        parts = [m, rng.standard_normal((4, 3, 2)), rng.standard_normal(7)]
        out.append(np.concatenate([t.reshape(-1) for t in parts]).astype(np.float32))
    return out


SHAPES = [(40, 30), (4, 3, 2), (7,)]  # the last two too small to compress


def _powersgd_expected(xs, q0, r=2):
    """P = mean(M Q); P = orth(P); Q = mean(M^T P); mean M ~ P Q^T; small tensors averaged."""
    p = len(xs)
    ms = [x[:1200].reshape(40, 30) for x in xs]
    pm = C.powersgd.orthogonalise(sum(m @ q0 for m in ms) / np.float32(p))
    q = sum(m.T @ pm for m in ms) / np.float32(p)
    rest = sum(x[1200:] for x in xs) / np.float32(p)
    return np.concatenate([(pm @ q.T).reshape(-1), rest])


@pytest.mark.mpi(min_size=2)
def test_powersgd_exchange_equals_the_single_process_power_iteration():
    world = MPI.COMM_WORLD
    p, rank = world.Get_size(), world.Get_rank()
    c = C.PowerSGD(2)
    xs = _low_rank_buckets(p, shared_columns=False)
    recorder = RecordingComm(world)
    result = C.aggregate(recorder, xs[rank], c, np.random.default_rng([SEED, 1]), shapes=SHAPES)
    assert result.strategy == "powersgd"
    q0 = np.random.default_rng([SEED, 1]).standard_normal(30 * 2, dtype=np.float32)
    want = _powersgd_expected(xs, q0.reshape(30, 2))
    np.testing.assert_allclose(result.mean, want, rtol=1e-4, atol=1e-5)
    assert all(np.array_equal(gathered(world, result.mean)[0], row)
               for row in gathered(world, result.mean))  # fmt: skip
    # P (40 x 2) with the 31 uncompressed elements, then Q (30 x 2), all float32
    assert result.bytes_sent == recorder.sent == 4 * (40 * 2 + 24 + 7 + 30 * 2)
    assert result.state.shape == (30 * 2,)


@pytest.mark.mpi(min_size=2)
def test_powersgd_mean_is_exact_when_all_ranks_share_a_rank_r_column_space():
    world = MPI.COMM_WORLD
    p, rank = world.Get_size(), world.Get_rank()
    xs = _low_rank_buckets(p, shared_columns=True)
    result = C.aggregate(
        world, xs[rank], C.PowerSGD(2), np.random.default_rng([SEED, 1]), shapes=SHAPES
    )
    want = sum(xs) / np.float32(p)
    np.testing.assert_allclose(result.mean, want, rtol=1e-4, atol=1e-4)


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize(
    "spec",
    ["topk:0.02+ef", "qsgd:4+ef", "randk:0.05+ef", "powersgd:2+ef", "sign", "fp16",
     "threshold:0.01+dgc", "int8:stochastic+ef"],
)  # fmt: skip
def test_reduce_bucket_keeps_every_rank_bit_identical_step_after_step(spec):
    world = MPI.COMM_WORLD
    run = C.get(spec, seed=5)
    for step in range(4):
        grad = buckets(world.Get_size(), N)[world.Get_rank()] * np.float32(step + 1)
        mean = run.reduce_bucket(world, "b", grad).mean
        everyone = gathered(world, mean)
        assert all(np.array_equal(everyone[0], row) for row in everyone), f"step {step}"


@pytest.mark.mpi(min_size=2)
def test_error_feedback_over_ranks_telescopes_to_the_mean_gradient_sum():
    world = MPI.COMM_WORLD
    p, rank = world.Get_size(), world.Get_rank()
    run = C.get("topk:0.01+ef@allgather")
    applied = np.zeros(N, np.float64)
    grads = np.zeros(N, np.float64)
    for step in range(10):
        xs = buckets(p, N)
        applied += run.reduce_bucket(world, 0, xs[rank] * np.float32(step % 3 - 1)).mean
        grads += sum(x.astype(np.float64) for x in xs) * (step % 3 - 1) / p
    residuals = gathered(world, run.memory.residual["0"]).astype(np.float64).sum(axis=0) / p
    np.testing.assert_allclose(applied + residuals, grads, atol=1e-4)


@pytest.mark.mpi(min_size=2)
def test_aggregate_accepts_a_communicator_with_an_mpi_attribute():
    class Wrapped:
        mpi = MPI.COMM_WORLD

    x = buckets(MPI.COMM_WORLD.Get_size())[MPI.COMM_WORLD.Get_rank()]
    via_attr = C.aggregate(Wrapped(), x, C.Identity())
    direct = C.aggregate(MPI.COMM_WORLD, x, C.Identity())
    np.testing.assert_array_equal(via_attr.mean, direct.mean)


@pytest.mark.mpi(min_size=2)
def test_two_phase_bucket_smaller_than_the_rank_count_goes_through_allgather():
    world = MPI.COMM_WORLD
    x = np.array([world.Get_rank() + 1.0], np.float32)
    result = C.aggregate(world, x, C.FP16(), strategy="two_phase")
    assert result.strategy == "allgather"
    np.testing.assert_array_equal(result.mean, [(world.Get_size() + 1) / 2])


def expected_sent(strategy: str, c: C.Compressor, xs, rngs, rank: int) -> np.ndarray:
    """What this rank's own contribution decompresses to, in gradient units."""
    p, n, x, rng = len(xs), xs[0].size, xs[rank], rngs[rank]
    meta = shared_meta(c, xs)
    if strategy == "two_phase":
        bounds = [j * n // p for j in range(p + 1)]
        chunks = [x[bounds[j] : bounds[j + 1]] for j in range(p)]
        return np.concatenate([c.decompress(c.compress(ch, rng, meta), ch.size) for ch in chunks])
    if strategy == "allreduce" and c.divide_before_sum:
        return c.decompress(c.compress(x / np.float32(p), rng, meta), n) * np.float32(p)
    return c.decompress(c.compress(x, rng, meta), n)


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("spec", ["fp16", "int8:stochastic", "topk:0.01", "randk:0.05"])
@pytest.mark.parametrize("strategy", ["allreduce", "allgather", "dense_allreduce", "two_phase"])
def test_sent_is_what_this_ranks_own_payload_decompresses_to(spec, strategy):
    world = MPI.COMM_WORLD
    p, rank = world.Get_size(), world.Get_rank()
    c = C.get(spec).compressor
    if strategy == "allreduce" and not c.summable:
        pytest.skip(f"{spec} is not summable")
    xs = buckets(p)
    result = C.aggregate(world, xs[rank], c, streams(c, p)[rank], strategy=strategy, need_sent=True)
    want = expected_sent(strategy, c, xs, streams(c, p), rank)
    np.testing.assert_array_equal(result.sent, want)


def test_aggregated_reports_the_time_of_each_phase():
    x = buckets(1, 1 << 16)[0]
    result = C.aggregate(MPI.COMM_SELF, x, C.TopK(0.01), strategy="allgather")
    assert result.compress_s > 0 and result.communicate_s > 0 and result.decompress_s > 0
