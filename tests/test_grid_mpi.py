"""Process grids, and data parallelism composed with pipeline and tensor parallelism.

The oracle is one process training the whole model on the global batch; each
dp group trains on its contiguous shard of that batch.
"""

import numpy as np
import pytest

import distad as ad
from distad.parallel import DataParallel, PipelineParallel, grid, tensor_parallel

nn = ad.nn
cross_entropy = nn.functional.cross_entropy


def members(c):
    """The world ranks in communicator c, in c's rank order."""
    from distad.comm import Communicator

    return list(c.allgather(np.array([Communicator().rank])).ravel())


def make_mlp(width=16, seed=0):
    rng = np.random.default_rng(seed)
    return nn.Sequential(nn.Linear(8, width, rng=rng), nn.Tanh(), nn.Linear(width, width, rng=rng),
                         nn.ReLU(), nn.Linear(width, 4, rng=rng))


def global_batch(n, seed):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, 8)).astype(np.float32), rng.integers(0, 4, n)


def shard(a, index, count):
    n = len(a) // count
    return a[index * n:(index + 1) * n]


@pytest.mark.mpi(min_size=2)
def test_tensor_parallel_ranks_are_neighbours_and_pipelines_stride_over_them(comm):
    g = grid(dp=1, pp=2, tp=comm.size // 2, comm=comm)
    r, tp = comm.rank, comm.size // 2
    assert (g.tp_rank, g.pp_rank, g.dp_rank) == (r % tp, r // tp, 0)
    assert members(g.tp) == [g.pp_rank * tp + k for k in range(tp)]
    assert members(g.pp) == [g.tp_rank, g.tp_rank + tp]
    assert members(g.dp) == [r]
    g.free()


@pytest.mark.mpi(min_size=2)
def test_dp_is_inferred_from_the_other_axes(comm):
    g = grid(pp=2, comm=comm)
    assert (g.dp_size, g.pp_size, g.tp_size) == (comm.size // 2, 2, 1)
    assert members(g.dp) == [g.pp_rank * g.dp_size + k for k in range(g.dp_size)]
    g.free()


@pytest.mark.mpi(min_size=2)
def test_sizes_that_do_not_multiply_to_the_world_are_refused(comm):
    with pytest.raises(ValueError, match=f"= {2 * comm.size} ranks, but the communicator has"):
        grid(dp=comm.size, pp=2, comm=comm)


@pytest.mark.mpi(min_size=4)
def test_dp2_x_pp2_trains_ten_steps_to_the_parameters_of_one_process(comm):
    g = grid(dp=2, pp=comm.size // 2, comm=comm)
    lr, micro = 0.1, 2
    pp = PipelineParallel(make_mlp(), g.pp, microbatches=micro, schedule="1f1b",
                          data_parallel=g.dp, timeout=60)
    opt = ad.optim.SGD(pp.parameters(), lr=lr, momentum=0.9)
    ref = make_mlp()
    ref_opt = ad.optim.SGD(ref.parameters(), lr=lr, momentum=0.9)
    for step in range(10):
        X, y = global_batch(8, seed=100 + step)
        opt.zero_grad()
        loss = pp.train_step(shard(X, g.dp_rank, 2), shard(y, g.dp_rank, 2), cross_entropy)
        opt.step()
        ref_opt.zero_grad()
        cross_entropy(ref(X), y).backward()
        ref_opt.step()
        assert np.isfinite(loss)
    ref_state = ref.state_dict()
    mine = pp.state_dict()
    assert mine and set(mine) < set(ref_state)
    for name, value in mine.items():
        np.testing.assert_allclose(value, ref_state[name], rtol=1e-5, atol=1e-6)
        replicas = g.dp.allgather(value)              # both replicas of a stage agree bitwise
        assert np.array_equal(replicas[0], replicas[1])
    pp.close()
    g.free()


@pytest.mark.mpi(min_size=4)
def test_dp2_x_tp2_gradients_equal_one_process_gradients_on_the_global_batch(comm):
    g = grid(dp=comm.size // 2, tp=2, comm=comm)
    ref = make_mlp()
    model = DataParallel(tensor_parallel(ref, g.tp), g.dp)
    X, y = global_batch(8, seed=5)
    cross_entropy(model(shard(X, g.dp_rank, g.dp_size)), shard(y, g.dp_rank, g.dp_size)).backward()
    cross_entropy(ref(X), y).backward()
    k = slice(g.tp_rank * 8, (g.tp_rank + 1) * 8)        # width 16 over 2 tp ranks
    tp_model = model.module
    np.testing.assert_allclose(tp_model[0].weight.grad, ref[0].weight.grad[k], rtol=1e-5,
                               atol=1e-6)
    np.testing.assert_allclose(tp_model[2].weight.grad, ref[2].weight.grad[:, k], rtol=1e-5,
                               atol=1e-6)
    k = slice(g.tp_rank * 2, (g.tp_rank + 1) * 2)        # 4 classes over 2 tp ranks
    np.testing.assert_allclose(tp_model[4].weight.grad, ref[4].weight.grad[k], rtol=1e-5,
                               atol=1e-6)
    model.close()
    g.free()



@pytest.mark.mpi(min_size=4)
@pytest.mark.parametrize("parallel,norm", [("dp=2,pp=2", "none"), ("dp=2,tp=2", "none"),
                                           ("dp=2,tp=2", "batch"), ("dp=2,tp=2", "sync")])
def test_training_job_on_a_grid_matches_data_parallel_over_the_dp_ranks(comm, parallel, norm):
    """With --norm, each tensor-parallel rank normalises its slice of the features
    (ShardedBatchNorm; SyncBatchNorm sums over the dp ranks): the same run as DataParallel."""
    from distad.train.config import TrainConfig
    from distad.train.job import run
    from distad.train.model_parallel import run_model_parallel

    if comm.size != 4:
        pytest.skip("a 2 x 2 grid needs exactly 4 ranks")
    settings = dict(hidden="32,32", epochs=1, max_steps=15, microbatches=2, progress=False,
                    log_every=1000, norm=norm)
    model_parallel = run_model_parallel(TrainConfig(parallel=parallel, **settings), comm)
    g = grid(dp=2, pp=2, comm=comm)                     # g.dp: two ranks with different shards
    oracle = run(TrainConfig(parallel="dp", **settings), g.dp)
    g.free()
    assert model_parallel["test_loss"] == pytest.approx(oracle["test_loss"], rel=1e-5)
    assert model_parallel["test_acc"] == oracle["test_acc"]


@pytest.mark.mpi(min_size=4)
def test_pipeline_of_tensor_parallel_stages_trains_like_one_process(comm, tmp_path_factory):
    """--parallel pp,tp on 4 ranks (2 stages x 2 tensor-parallel shards): the same test loss
    and accuracy as one process, and the gathered model.npz equals the one process's."""
    from distad.train import checkpoint as ckpt
    from distad.train.config import TrainConfig
    from distad.train.job import run
    from distad.train.model_parallel import run_model_parallel

    if comm.size != 4:
        pytest.skip("a 2 x 2 grid needs exactly 4 ranks")
    path = np.zeros(512, np.uint8)                     # rank 0's temporary folder, to all
    if comm.rank == 0:
        name = str(tmp_path_factory.mktemp("pptp")).encode()
        path[:len(name)] = np.frombuffer(name, np.uint8)
    root = bytes(comm.bcast(path)).rstrip(b"\0").decode()
    settings = dict(hidden="32,32", epochs=1, max_steps=12, microbatches=2, progress=False,
                    log_every=1000)
    outs = [f"{root}/pptp", f"{root}/single"]
    grid_run = run_model_parallel(TrainConfig(parallel="pp,tp", out=outs[0], **settings), comm)
    alone = comm.split(comm.rank)
    single = run(TrainConfig(parallel="dp", out=outs[1] if comm.rank == 0 else None,
                             **settings), alone)
    alone.free()
    assert grid_run["steps"] == single["steps"] == 12
    assert grid_run["test_loss"] == pytest.approx(single["test_loss"], rel=1e-5)
    assert grid_run["test_acc"] == single["test_acc"]
    if comm.rank == 0:
        a = ckpt.load_state(f"{outs[0]}/model.npz")["model"]
        b = ckpt.load_state(f"{outs[1]}/model.npz")["model"]
        assert list(a) == list(b)
        for k in a:
            np.testing.assert_allclose(a[k], b[k], rtol=1e-4, atol=1e-6)


@pytest.mark.mpi(min_size=2)
def test_batch_norm_between_tensor_parallel_linears_runs_on_feature_slices(comm):
    """tensor_parallel turns a BatchNorm1d after a column-parallel Linear into a
    ShardedBatchNorm: forward, gradients, running statistics and the gathered state dict equal
    the single-process model's."""
    from distad.parallel import ShardedBatchNorm, tensor_parallel_state_dict

    def make():
        rng = np.random.default_rng(3)
        return nn.Sequential(nn.Linear(8, 16, rng=rng), nn.BatchNorm1d(16), nn.ReLU(),
                             nn.Linear(16, 4, rng=rng))
    ref, tp = make(), tensor_parallel(make(), comm)
    assert isinstance(tp[1], ShardedBatchNorm) and tp[1].num_features == 16 // comm.size
    X, y = global_batch(12, seed=9)
    for _ in range(3):  # running statistics move, parameters get gradients
        for m in (ref, tp):
            for p in m.parameters():
                p.grad = None
            cross_entropy(m(X), y).backward()
    np.testing.assert_allclose(tp(X).data, ref(X).data, rtol=1e-5, atol=1e-6)
    k = slice(comm.rank * 16 // comm.size, (comm.rank + 1) * 16 // comm.size)
    np.testing.assert_allclose(tp[1].weight.grad, ref[1].weight.grad[k], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(tp[0].weight.grad, ref[0].weight.grad[k], rtol=1e-5, atol=1e-6)
    full, want = tensor_parallel_state_dict(tp), ref.state_dict()
    assert list(full) == list(want)
    for name in want:
        np.testing.assert_allclose(full[name], want[name], rtol=1e-5, atol=1e-6, err_msg=name)
