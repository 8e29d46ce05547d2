"""Choosing an aggregation: capabilities and the alpha-beta cost model; the mean into `out`."""

from __future__ import annotations

import numpy as np
import pytest

import distad.compress as C
from distad.compress.aggregate import check_strategy

N = 10_000_000  # large enough that bandwidth, not latency, decides


@pytest.mark.parametrize("p", [4, 16, 64])
def test_sparse_payload_is_allgathered_below_density_one_over_p(p):
    below, above = C.TopK(0.5 / p), C.TopK(2.0 / p)
    assert C.choose_aggregation(below, N, p) == "allgather"
    assert C.choose_aggregation(above, N, p) == "dense_allreduce"


def test_density_one_over_p_is_where_allgather_and_dense_allreduce_cost_the_same():
    cost, p = C.CostModel(alpha=0.0), 8
    sparse = C.TopK(1 / p)  # 8 bytes per kept element, k = n / p
    assert cost.seconds("allgather", sparse, N, p) == pytest.approx(
        cost.seconds("dense_allreduce", sparse, N, p)
    )


@pytest.mark.parametrize("spec", ["none", "int8", "terngrad", "randk:0.01", "fp16"])
def test_summable_payloads_are_allreduced(spec):
    assert C.choose_aggregation(C.get(spec).compressor, N, 8) == "allreduce"


def test_gradient_compression_reports_the_strategy_auto_picks():
    assert C.get("topk:0.01").strategy_for(N, 8) == "allgather"
    assert C.get("topk:0.5").strategy_for(N, 8) == "dense_allreduce"
    assert C.get("topk:0.5@two_phase").strategy_for(N, 8) == "two_phase"


def test_powersgd_always_uses_its_own_exchange():
    assert C.choose_aggregation(C.PowerSGD(2), N, 8) == "powersgd"


def test_tiny_summable_bucket_is_still_allreduced():
    # Recursive doubling: ceil(log2 p) steps, no more latency than an allgather.
    assert C.choose_aggregation(C.Identity(), 100, 8) == "allreduce"


def test_cost_model_parameters_change_the_choice():
    dense_enough = C.TopK(2.0 / 8)
    latency_only = C.CostModel(alpha=1e-3, beta=0.0)
    assert latency_only.seconds("allgather", dense_enough, N, 8) == pytest.approx(3e-3)
    assert C.choose_aggregation(dense_enough, N, 8, latency_only) == "allgather"
    assert C.choose_aggregation(dense_enough, N, 8) == "dense_allreduce"


def test_one_rank_costs_nothing_and_picks_the_first_candidate():
    assert C.CostModel().seconds("allgather", C.TopK(0.01), N, 1) == 0.0
    assert C.choose_aggregation(C.QSGD(16), N, 1) == "allgather"


def test_allreduce_cost_counts_the_widened_sum_dtype():
    cost = C.CostModel(alpha=0.0)
    # int8 levels are summed as int16 on 4 ranks: twice the bytes of the int8 payload
    assert cost.seconds("allreduce", C.Int8(), N, 4) == pytest.approx(
        cost.seconds("dense_allreduce", C.Int8(), N, 4) / 2
    )


@pytest.mark.parametrize(
    ("strategy", "spec", "message"),
    [
        ("allreduce", "qsgd:16", "needs summable payloads"),
        ("majority", "topk:0.1", "needs sign bits"),
        ("powersgd", "topk:0.1", "PowerSGD and only PowerSGD"),
        ("two_phase", "powersgd:2", "PowerSGD and only PowerSGD"),
        ("ring", "none", "unknown aggregation 'ring'"),
    ],
)
def test_strategy_that_cannot_carry_the_payload_is_refused(strategy, spec, message):
    with pytest.raises(ValueError, match=message):
        check_strategy(strategy, C.get(spec).compressor)


def _one_rank_case(spec: str):
    from mpi4py import MPI

    c = C.get(spec).compressor
    x = np.random.default_rng(3).standard_normal(4099, dtype=np.float32)
    strategies = ["allgather", "dense_allreduce", "two_phase"]
    strategies += ["allreduce"] * c.summable + ["majority"] * c.majority_vote
    strategies = ["powersgd"] if c.multi_round else strategies
    return MPI.COMM_SELF, c, x, strategies


@pytest.mark.parametrize("spec", ["none", "fp16", "int8", "sign", "topk:0.05", "powersgd:2"])
def test_aggregate_writes_the_mean_into_out_when_given_one(spec):
    comm, c, x, strategies = _one_rank_case(spec)
    for strategy in strategies:
        want = C.aggregate(comm, x, c, np.random.default_rng(0), strategy=strategy).mean
        out = np.full(x.size, np.nan, np.float32)
        got = C.aggregate(comm, x, c, np.random.default_rng(0), strategy=strategy, out=out)
        assert got.mean is out, strategy
        np.testing.assert_array_equal(out, want, err_msg=strategy)


@pytest.mark.parametrize("spec", ["none", "fp16", "int8", "sign", "topk:0.05", "powersgd:2"])
def test_aggregate_into_the_bucket_itself_gives_the_same_mean(spec):
    comm, c, x, strategies = _one_rank_case(spec)
    for strategy in strategies:
        want = C.aggregate(comm, x, c, np.random.default_rng(0), strategy=strategy).mean.copy()
        buffer = x.copy()
        got = C.aggregate(comm, buffer, c, np.random.default_rng(0), strategy=strategy, out=buffer)
        assert got.mean is buffer, strategy
        np.testing.assert_array_equal(buffer, want, err_msg=strategy)


@pytest.mark.parametrize("spec", ["none", "fp16", "topk:0.05"])
def test_sent_survives_the_mean_being_written_into_the_bucket(spec):
    comm, c, x, strategies = _one_rank_case(spec)
    for strategy in strategies:
        want = C.aggregate(comm, x, c, np.random.default_rng(0), strategy=strategy, need_sent=True)
        buffer = x.copy()
        got = C.aggregate(
            comm, buffer, c, np.random.default_rng(0), strategy=strategy, need_sent=True, out=buffer
        )
        assert not np.shares_memory(got.sent, buffer), strategy  # the mean cannot change it
        np.testing.assert_array_equal(got.sent, want.sent, err_msg=strategy)
