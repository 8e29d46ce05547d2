"""PipelineParallel: stages on ranks, micro-batches, GPipe and 1F1B, against one process.

Every rank builds the same model from a seed, so each can compute the
single-process oracle (the whole model on the whole batch) itself and compare
its stage's gradients to the matching parameters of the oracle.
"""

import numpy as np
import pytest

import distad as ad
from distad.comm.errors import MismatchError
from distad.parallel import PipelineParallel, partition_by_parameters, pipeline_schedule

nn = ad.nn
cross_entropy = nn.functional.cross_entropy
mpi = pytest.mark.mpi(min_size=2)


def make_model(seed=0):
    rng = np.random.default_rng(seed)
    return nn.Sequential(nn.Linear(8, 16, rng=rng), nn.Tanh(), nn.Linear(16, 16, rng=rng),
                         nn.ReLU(), nn.Linear(16, 16, rng=rng), nn.Tanh(),
                         nn.Linear(16, 4, rng=rng))


def batch(n, seed=1):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, 8)).astype(np.float32), rng.integers(0, 4, n)


def one_process(X, y):
    ref = make_model()
    loss = cross_entropy(ref(X), y)
    loss.backward()
    return float(loss.data), {n: p.grad for n, p in ref.named_parameters()}


def agreed(comm, text):
    """True when every rank holds the same string."""
    got = comm.allgatherv(np.frombuffer(text.encode(), np.uint8))
    return all(np.array_equal(got[0], g) for g in got)


# ---- the schedules and the partition, without MPI ------------------------------------------

def test_1f1b_keeps_at_most_p_minus_stage_micro_batches_in_flight():
    p, m = 4, 16
    for stage in range(p):
        in_flight = peak = 0
        for kind, _ in pipeline_schedule("1f1b", m, p, stage):
            in_flight += 1 if kind == "F" else -1
            peak = max(peak, in_flight)
        assert peak == p - stage


def test_gpipe_runs_every_forward_before_any_backward():
    order = pipeline_schedule("gpipe", 3, 2, 0)
    assert order == [("F", 0), ("F", 1), ("F", 2), ("B", 2), ("B", 1), ("B", 0)]


def test_both_schedules_run_each_micro_batch_forward_once_then_backward_once():
    for kind in ("gpipe", "1f1b"):
        for stage in range(3):
            order = pipeline_schedule(kind, 5, 3, stage)
            assert sorted(order) == sorted([("F", i) for i in range(5)] +
                                           [("B", i) for i in range(5)])
            assert all(order.index(("F", i)) < order.index(("B", i)) for i in range(5))


def test_partition_minimises_the_largest_stage_parameter_count():
    assert partition_by_parameters([10, 20, 30, 40], 2) == [3, 1]      # 60 | 40, not 30 | 70
    assert partition_by_parameters([5, 5, 5, 5], 4) == [1, 1, 1, 1]


def test_partition_ties_go_to_the_split_with_the_fewest_layers_in_one_stage():
    # 30 | 40 either way; [5, 2] moves a parameter-free layer off the crowded first stage
    assert partition_by_parameters([10, 0, 10, 0, 10, 0, 40], 2) == [5, 2]


def test_partition_refuses_more_stages_than_layers():
    with pytest.raises(ValueError, match="cannot split 2 layers into 3"):
        partition_by_parameters([1, 1], 3)


# ---- under MPI --------------------------------------------------------------------------------

@mpi
@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_pipeline_gradients_equal_one_process_gradients(comm, schedule):
    X, y = batch(12)
    pp = PipelineParallel(make_model(), comm, microbatches=4, schedule=schedule, timeout=60)
    loss = pp.train_step(X, y, cross_entropy)
    ref_loss, ref_grads = one_process(X, y)
    assert loss == pytest.approx(ref_loss, rel=1e-6)
    assert len(list(pp.parameters())) > 0
    for name, p in pp.named_parameters():
        assert p.grad.dtype == np.float32
        np.testing.assert_allclose(p.grad, ref_grads[name], rtol=1e-5, atol=1e-7)
    pp.close()


@mpi
def test_uneven_micro_batches_weigh_each_part_by_its_rows(comm):
    X, y = batch(11)                                  # 11 rows in 4 parts: 3, 3, 3, 2
    pp = PipelineParallel(make_model(), comm, microbatches=4, timeout=60)
    loss = pp.train_step(X, y, cross_entropy)
    ref_loss, ref_grads = one_process(X, y)
    assert loss == pytest.approx(ref_loss, rel=1e-6)
    for name, p in pp.named_parameters():
        np.testing.assert_allclose(p.grad, ref_grads[name], rtol=1e-5, atol=1e-7)
    pp.close()


@mpi
def test_stages_are_contiguous_and_cover_every_layer_once(comm):
    pp = PipelineParallel(make_model(), comm, timeout=60)
    bounds = pp.partition
    assert bounds[0][0] == 0 and bounds[-1][1] == 7 and len(bounds) == comm.size
    assert all(a[1] == b[0] and a[0] < a[1] for a, b in zip(bounds, bounds[1:]))
    lo, hi = bounds[comm.rank]
    names = {n.split(".")[0] for n, _ in pp.named_parameters()}
    assert names <= {str(i) for i in range(lo, hi)}
    pp.close()


@mpi
def test_predict_gives_the_models_output_on_the_last_stage_only(comm):
    X, _ = batch(10)
    pp = PipelineParallel(make_model(), comm, microbatches=3, timeout=60)
    out = pp.predict(X)
    if pp.is_last:
        np.testing.assert_allclose(out, make_model()(X).data, rtol=1e-6, atol=1e-7)
    else:
        assert out is None
    pp.close()


@mpi
def test_full_state_dict_gathers_the_whole_model_on_the_first_stage(comm):
    pp = PipelineParallel(make_model(), comm, timeout=60)
    for p in pp.parameters():
        p.data += 1.0                                  # every stage changes its own layers
    full = pp.full_state_dict()
    if pp.is_first:
        ref = make_model().state_dict()
        assert list(full) == list(ref)
        for k in ref:
            np.testing.assert_array_equal(full[k], ref[k] + 1.0)
    else:
        assert full is None
    pp.close()


@mpi
def test_a_stage_whose_input_disagrees_with_its_predecessors_output_names_both_ranks(comm):
    # Stage 0 outputs 16 features; stage 1's first layer expects 12.
    P = comm.size
    rng = np.random.default_rng(0)
    layers = [nn.Linear(8, 16, rng=rng), nn.Linear(12, 16, rng=rng)]
    layers += [nn.Linear(16, 16, rng=rng) for _ in range(P - 2)]
    pp = PipelineParallel(nn.Sequential(*layers), comm, balance=[1] * P, timeout=60)
    X, y = batch(4)
    with pytest.raises(MismatchError) as err:
        pp.train_step(X, y, cross_entropy)
    text = str(err.value)
    assert "stage 0 (rank 0) outputs float32 (4, 16)" in text
    assert "stage 1 (rank 1" in text and "expected input of shape (..., 12)" in text
    assert agreed(comm, text)                          # the same error on every rank
    pp.close()


@mpi
def test_missing_targets_on_the_last_stage_raise_on_every_rank(comm):
    X, y = batch(8)
    pp = PipelineParallel(make_model(), comm, microbatches=2, timeout=60)
    with pytest.raises(ValueError, match="needs targets y") as err:
        pp.train_step(X, None if pp.is_last else y, cross_entropy)
    assert agreed(comm, str(err.value))
    pp.close()


@mpi
def test_a_batch_smaller_than_the_micro_batch_count_raises_on_every_rank(comm):
    X, y = batch(3)
    pp = PipelineParallel(make_model(), comm, microbatches=4, timeout=60)
    with pytest.raises(ValueError, match="3 rows cannot be cut into 4 micro-batches"):
        pp.train_step(X, y, cross_entropy)
    pp.close()


@mpi
def test_ten_sgd_steps_match_one_process(comm):
    lr = 0.1
    pp = PipelineParallel(make_model(), comm, microbatches=3, schedule="1f1b", timeout=60)
    opt = ad.optim.SGD(pp.parameters(), lr=lr)
    ref = make_model()
    ref_opt = ad.optim.SGD(ref.parameters(), lr=lr)
    for step in range(10):
        X, y = batch(9, seed=100 + step)
        opt.zero_grad()
        pp.train_step(X, y, cross_entropy)
        opt.step()
        ref_opt.zero_grad()
        cross_entropy(ref(X), y).backward()
        ref_opt.step()
    ref_state = ref.state_dict()
    for name, value in pp.state_dict().items():
        np.testing.assert_allclose(value, ref_state[name], rtol=1e-5, atol=1e-6)
    pp.close()


@mpi
def test_training_job_with_a_pipeline_matches_one_process_training(comm):
    from distad.train.config import TrainConfig
    from distad.train.job import run
    from distad.train.model_parallel import run_model_parallel

    settings = dict(hidden="32,32", epochs=1, max_steps=15, microbatches=4, progress=False,
                    log_every=1000)
    piped = run_model_parallel(TrainConfig(parallel="pp", **settings), comm)
    alone = comm.split(comm.rank)                      # every rank: the same job on one process
    single = run(TrainConfig(parallel="dp", **settings), alone)
    alone.free()
    assert piped["steps"] == single["steps"] == 15
    assert piped["test_loss"] == pytest.approx(single["test_loss"], rel=1e-5)
    assert piped["test_acc"] == single["test_acc"]


@mpi
def test_bench_pipeline_prints_the_bubble_and_memory_tables(comm, capsys):
    from distad.bench.pipeline import main

    args = ["--microbatches", "1,2", "--repeats", "1", "--warmup", "0", "--width", "16",
            "--rows", "4", "--fwd-ms", "0.2", "--bwd-ms", "0.4", "--memory-microbatches", "2"]
    assert main(args) == 0
    out = capsys.readouterr().out
    if comm.rank == 0:
        assert "| matmul | gpipe | 1 |" in out and "| sleep | 1f1b | 2 |" in out
        assert "Peak activation memory per stage" in out
    else:
        assert out == ""
