"""The alpha-beta cost model: closed forms, fitting bench output, the step and pipeline models."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest

from distad.comm.costmodel import (
    AlphaBeta,
    CollectiveModel,
    MeasuredCurve,
    StepModel,
    fit_alpha_beta,
    pipeline_step,
)

A, B = 10e-6, 1e-9  # 10 us per message, 1 ns per byte (8 Gbit/s)


def net(**kw) -> CollectiveModel:
    return CollectiveModel(alpha=A, beta=B, **kw)


def test_costmodel_imports_without_mpi():
    code = ("import sys; import distad.comm.costmodel as c; "
            "c.CollectiveModel().allreduce(1e6, 64); "
            "assert 'mpi4py.MPI' not in sys.modules, 'costmodel imported MPI'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_ring_allreduce_is_the_textbook_formula():
    n, p = 4e6, 8
    assert net(allreduce_algorithm="ring").allreduce(n, p) == pytest.approx(
        2 * (p - 1) * A + 2 * (p - 1) / p * n * B)


def test_recursive_doubling_wins_small_messages_and_ring_wins_large_ones():
    m = net()
    small, large, p = 64, 64e6, 64
    rd = lambda n: m.allreduce(n, p, algorithm="recursive_doubling")
    ring = lambda n: m.allreduce(n, p, algorithm="ring")
    assert rd(small) < ring(small)
    assert ring(large) < rd(large)
    assert m.allreduce(small, p) == min(rd(small), ring(small),
                                        m.allreduce(small, p, algorithm="rabenseifner"))


def test_allgather_bytes_grow_with_ranks_but_allreduce_bytes_do_not():
    m = net()
    ag = [m.allgather(1e6, p) for p in (8, 64, 512)]
    ar = [m.allreduce(1e6, p) for p in (8, 64, 512)]
    assert ag[2] / ag[0] == pytest.approx((511 * 1e6 * B + 9 * A) / (7 * 1e6 * B + 3 * A))
    assert ar[2] / ar[0] < 1.3  # bandwidth term saturates at 2 n beta


def test_one_rank_communicates_nothing():
    m = net()
    assert m.allreduce(1e9, 1) == m.allgather(1e9, 1) == m.alltoall(1e9, 1) == 0
    assert m.bcast(1e9, 1) == m.reduce_scatter(1e9, 1) == 0


def test_reduce_scatter_moves_p_minus_1_over_p_of_the_bytes_in_log_p_messages():
    """Recursive halving: log2(p) messages (not the pairwise exchange's p - 1 at large p),
    (p-1)/p of the input over the link and through the reduction."""
    m = net()
    assert m.reduce_scatter(0, 1024) == pytest.approx(10 * m.alpha)
    assert m.reduce_scatter(1e9, 4) == pytest.approx(2 * m.alpha + 0.75e9 * (m.beta + m.gamma))


def test_link_rate_sets_beta():
    m = CollectiveModel.link(10, alpha=5e-6)
    assert m.beta == pytest.approx(8 / 10e9)
    assert m.gbit_s == pytest.approx(10)
    assert CollectiveModel.link(1, efficiency=0.5).gbit_s == pytest.approx(0.5)
    with pytest.raises(ValueError, match="gbit_s > 0"):
        CollectiveModel.link(0)


def test_fit_recovers_alpha_and_beta_from_exact_points():
    sizes = [4, 256, 1024, 65536, 1 << 20, 16 << 20]
    times = [A + s * B for s in sizes]
    f = fit_alpha_beta(sizes, times)
    assert f.alpha == pytest.approx(A, rel=0.05)
    assert f.beta == pytest.approx(B, rel=5e-3)


def test_fit_needs_a_large_message():
    with pytest.raises(ValueError, match="no message of >= 65536 bytes"):
        fit_alpha_beta([4, 8, 16], [1e-6, 1e-6, 1e-6])


def bench_json(p: int, alpha: float, beta: float) -> dict:
    """What `distad bench collectives --json` writes, for a ring network (alpha, beta)."""
    rows = []
    for size in (4, 1024, 65536, 1 << 20, 16 << 20):
        t = 2 * (p - 1) * alpha + 2 * (p - 1) / p * size * beta
        rows.append({"op": "allreduce", "bytes": size, "time_s": t})
        # allgather: bytes is the whole gathered buffer, each rank gives bytes / p
        rows.append({"op": "allgather", "bytes": size * p,
                     "time_s": (p - 1) * alpha + (p - 1) * size * beta})
    return {"p": p, "rows": rows}


def test_measured_curve_is_exact_at_measured_sizes_and_linear_between():
    c = MeasuredCurve((1e3, 1e6, 2e6), (1e-5, 1e-3, 3e-3))
    assert c.time(1e6) == 1e-3
    assert c.time(1.5e6) == pytest.approx(2e-3)
    assert c.time(10) == 1e-5                       # below: the smallest measured time
    assert c.time(3e6) == pytest.approx(5e-3)       # beyond: the last segment's slope
    with pytest.raises(ValueError, match="ascending"):
        MeasuredCurve((2.0, 1.0), (1.0, 2.0))


def test_from_bench_can_read_the_least_disturbed_percentile():
    data = bench_json(2, A, B)
    for row in data["rows"]:
        row["p10_s"], row["time_s"] = row["time_s"], 3 * row["time_s"]  # a disturbed median
    quiet = CollectiveModel.from_bench([data], stat="p10_s")
    assert quiet.allreduce(1 << 20, 2) == pytest.approx(2 * A + (1 << 20) * B)


def test_from_bench_reads_link_parameters_off_the_allreduce_curve():
    m = CollectiveModel.from_bench([bench_json(2, A, B), bench_json(4, A, B)], name="test")
    assert m.alpha == pytest.approx(A, rel=0.05)
    assert m.beta == pytest.approx(B, rel=5e-3)
    assert set(m.fits) == {("allreduce", 2), ("allreduce", 4), ("allgather", 2),
                           ("allgather", 4)}
    # The measured curve is used at a measured p; the formula elsewhere.
    assert m.allgather(1 << 20, 4) == pytest.approx(3 * A + 3 * (1 << 20) * B, rel=5e-3)
    assert m.allreduce(1 << 20, 64, algorithm="ring") == pytest.approx(
        126 * A + 2 * 63 / 64 * (1 << 20) * B, rel=0.01)


def test_to_dict_round_trips():
    m = CollectiveModel.from_bench([bench_json(4, A, B)])
    back = CollectiveModel.from_dict(m.to_dict())
    assert back == m


def test_at_rate_drops_measured_curves():
    m = CollectiveModel.from_bench([bench_json(4, A, B)])
    fast = m.at_rate(100)
    assert fast.fits == {} and fast.gbit_s == pytest.approx(100) and fast.alpha == m.alpha


class FakeTopK:
    """The capabilities of a top-k compressor of ratio r (float32 values + int32 indices)."""

    summable = needs_shared_scale = multi_round = False
    fixed_size = True

    def __init__(self, ratio: float) -> None:
        self.ratio = ratio

    def wire_bytes(self, n: int) -> int:
        return 8 * max(1, round(self.ratio * n))


def test_seconds_prices_the_compression_layers_strategies():
    m, n, p = net(allreduce_algorithm="ring"), 1 << 22, 16
    topk = FakeTopK(0.01)
    assert m.seconds("dense_allreduce", topk, n, p) == m.allreduce(4 * n, p)
    assert m.seconds("allgather", topk, n, p) == m.allgather(topk.wire_bytes(n), p)
    two = m.seconds("two_phase", topk, n, p)
    chunk = topk.wire_bytes(n // p)
    assert two == pytest.approx(m.alltoall(p * chunk, p) + m.allgather(chunk, p))
    with pytest.raises(ValueError, match="unknown strategy 'gossip'"):
        m.seconds("gossip", topk, n, p)


def test_seconds_agrees_with_the_compress_layers_own_model_on_real_compressors():
    import distad as ad
    from distad.compress import CostModel

    theirs = CostModel(alpha=A, beta=B)
    ours = net()
    n = 1 << 20
    for spec in ("none", "fp16", "topk:0.01", "qsgd:16", "powersgd:2"):
        c = ad.compress.get(spec).compressor
        for strategy in ("dense_allreduce", "allgather", "allreduce", "powersgd"):
            try:
                expect = theirs.seconds(strategy, c, n, 8)
            except (TypeError, ValueError):
                continue
            assert ours.seconds(strategy, c, n, 8) == pytest.approx(expect, rel=0.35), \
                (spec, strategy)


def test_choose_aggregation_accepts_a_fitted_model():
    import distad as ad
    from distad.compress import choose_aggregation

    c = ad.compress.get("topk:0.01").compressor
    slow = CollectiveModel.link(1)
    assert choose_aggregation(c, 1 << 22, 4, slow) == "allgather"


def step(**kw) -> StepModel:
    base = dict(forward_s=0.010, backward_s=0.020, update_s=0.002, batch=32,
                bucket_elems=(250_000, 5_000_000))
    return StepModel(**{**base, **kw})


def test_one_rank_step_is_compute_alone():
    p = step().predict(net(), 1)
    assert p.step == pytest.approx(0.032) and p.wait == 0 and p.communicate == 0


def test_link_bound_step_is_compute_before_the_last_bucket_plus_all_communication():
    slow = CollectiveModel.link(1, alpha=0)  # 1 Gbit/s: 8 ns per byte
    m = step()
    p = m.predict(slow, 4, compressor=None)
    comm = [slow.allreduce(4 * n, 4) for n in m.bucket_elems]
    ready0 = 0.010 + 0.020 * 250_000 / 5_250_000
    expect = max(max(ready0, 0.0) + comm[0], 0.030) + comm[1] + 0.002
    assert p.step == pytest.approx(expect)
    assert p.wait == pytest.approx(p.step - p.compute)
    assert p.bytes_per_rank == pytest.approx(1.5 * 4 * 5_250_000)


def test_shared_memory_does_not_overlap_and_oversubscription_stretches_compute():
    shm = CollectiveModel(alpha=1e-6, beta=1 / 3e9, cpu_bound=True)
    m = step()
    p = m.predict(shm, 2)
    comm = sum(shm.allreduce(4 * n, 2) for n in m.bucket_elems)
    assert p.step == pytest.approx(0.032 + comm)
    half = m.predict(shm, 4, cores_per_rank=0.5)
    assert half.compute == pytest.approx(2 * 0.032)


def test_zero_reduce_scatters_gradients_splits_the_update_and_gathers_the_parameters():
    """ZeRO on a link: each bucket's reduce-scatter moves half an allreduce's bytes, the
    update takes 1/p of the time, and an allgather of the parameters ends the step."""
    slow = CollectiveModel.link(1, alpha=0)
    m = step(zero=True, update_s=0.080)
    p = m.predict(slow, 4)
    rs = [slow.reduce_scatter(4 * n, 4) for n in m.bucket_elems]
    gather = slow.allgather(4 * 5_250_000 / 4, 4)
    ready0 = 0.010 + 0.020 * 250_000 / 5_250_000
    expect = max(ready0 + rs[0], 0.030) + rs[1] + 0.080 / 4 + gather
    assert p.step == pytest.approx(expect)
    assert p.bytes_per_rank == pytest.approx(2 * 0.75 * 4 * 5_250_000)  # one allreduce's
    assert p.step < step(update_s=0.080).predict(slow, 4).step
    shm = CollectiveModel(alpha=1e-6, beta=1 / 3e9, cpu_bound=True)
    q = m.predict(shm, 2)
    assert q.step == pytest.approx(0.030 + 0.040 + sum(shm.reduce_scatter(4 * n, 2)
                                                       for n in m.bucket_elems)
                                   + shm.allgather(4 * 5_250_000 / 2, 2))
    assert m.predict(slow, 1).step == pytest.approx(0.110)  # one rank: nothing to shard


def test_compression_trades_bytes_for_arithmetic():
    slow = CollectiveModel.link(1)
    m = step(compress_s_per_elem=2e-9, accumulate_s_per_elem=1e-9)
    dense = m.predict(slow, 4)
    sparse = m.predict(slow, 4, compressor=FakeTopK(0.01), strategy="allgather")
    assert sparse.bytes_per_rank == pytest.approx(dense.bytes_per_rank * 3 * 0.08 / 6)
    assert sparse.compress == pytest.approx(5_250_000 * (2e-9 + 3 * 1e-9))
    assert sparse.step < dense.step / 3


def test_weak_scaling_efficiency_falls_with_ranks_for_allgather_not_for_allreduce():
    m = step()
    fast = CollectiveModel.link(10)
    one = m.predict(fast, 1).step
    eff_ar = [one / m.predict(fast, p).step for p in (64, 1024)]
    eff_ag = [one / m.predict(fast, p, compressor=FakeTopK(0.01), strategy="allgather").step
              for p in (64, 1024)]
    assert eff_ar[1] > 0.8 * eff_ar[0]
    assert eff_ag[1] < 0.5 * eff_ag[0]


def test_pipeline_bubble_is_s_minus_1_over_m_plus_s_minus_1():
    free = CollectiveModel(alpha=0, beta=0)
    t = pipeline_step("gpipe", stages=4, microbatches=12, forward_s=1, backward_s=2,
                      activation_bytes=1e6, net=free)
    assert t == 15 * 3
    ideal = 12 * 3
    assert 1 - ideal / t == pytest.approx(3 / 15)
    assert pipeline_step("1f1b", 4, 12, 1, 2, 1e6, free) == t
    assert pipeline_step("interleaved", 4, 12, 1, 2, 1e6, free, interleave=3) == \
        pytest.approx(12 * 3 + 3 * 1)


def test_pipeline_messages_cost_alpha_plus_bytes_beta():
    t = pipeline_step("gpipe", 2, 1, 0, 0, 1e6, net())
    assert t == pytest.approx(2 * 2 * (A + 1e6 * B))
    with pytest.raises(ValueError, match="unknown schedule"):
        pipeline_step("zigzag", 2, 1, 0, 0, 0, net())


def test_alpha_beta_time_is_linear():
    ab = AlphaBeta(1e-6, 2e-9)
    assert ab.time(0) == 1e-6 and ab.time(1e6) == pytest.approx(1e-6 + 2e-3)
    assert math.isclose(np.float64(ab.time(10)), 1e-6 + 2e-8)


@pytest.mark.parametrize("cpu_bound", [False, True])
def test_a_synchronisation_of_busy_ranks_is_a_floor_on_the_wait(cpu_bound):
    """sync_s (a small allreduce among ranks that each keep a thread busy) is the least a rank
    waits after its compute, once per step: it lengthens a step whose collectives are shorter,
    is hidden by collectives that last longer, and leaves compute alone."""
    fast = CollectiveModel(alpha=1e-5, beta=1 / 1e12, cpu_bound=cpu_bound)  # ~0.02 ms of comm
    slow = CollectiveModel(alpha=1e-5, beta=1 / 1e8, cpu_bound=cpu_bound)  # ~0.3 s of comm
    m = step()
    plain, synced = m.predict(fast, 4), m.predict(fast, 4, sync_s=0.02)
    assert plain.wait < 0.001
    assert synced.wait == pytest.approx(0.02)
    assert synced.step == pytest.approx(plain.step - plain.wait + 0.02)
    assert synced.compute == pytest.approx(plain.compute)
    plain, synced = m.predict(slow, 4), m.predict(slow, 4, sync_s=0.02)
    assert plain.wait > 0.1
    assert synced.step == pytest.approx(plain.step) and synced.wait == pytest.approx(plain.wait)


def test_on_shared_memory_with_more_ranks_than_cores_the_meeting_precedes_the_copying():
    """Oversubscribed shared memory: the ranks reach a collective sync_s apart and its copying
    starts once all are there, so a long collective adds to the meeting instead of hiding it;
    with a core per rank, or over a link, it hides it as before."""
    shm = CollectiveModel(alpha=1e-5, beta=1 / 1e8, cpu_bound=True)  # ~0.3 s of copying
    m = step()
    alone = m.predict(shm, 4, cores_per_rank=0.5)
    queued = m.predict(shm, 4, cores_per_rank=0.5, sync_s=0.02)
    assert queued.wait == pytest.approx(alone.wait + 0.02)
    own_core = m.predict(shm, 4, cores_per_rank=1.0, sync_s=0.02)
    assert own_core.wait == pytest.approx(m.predict(shm, 4, cores_per_rank=1.0).wait)


def test_busy_threads_run_while_the_block_runs_and_stop_after():
    import threading

    from distad.bench.collectives import busy_threads

    before = threading.active_count()
    with busy_threads(2):
        assert threading.active_count() == before + 2
    assert threading.active_count() == before
