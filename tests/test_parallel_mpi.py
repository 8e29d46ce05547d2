"""DataParallel and the distributed gradient service, under mpiexec, against one process.

Every rank can regenerate the global batch from a seed, so each test computes
the single-process oracle locally and compares the distributed result to it.
"""

import numpy as np
import pytest

import distad as ad
from distad.comm.errors import MismatchError

pytestmark = pytest.mark.mpi(min_size=2)


def make_model(seed=0, hidden=16):
    return ad.nn.Sequential(ad.nn.Linear(8, hidden, rng=seed), ad.nn.Tanh(),
                            ad.nn.Linear(hidden, hidden, rng=seed + 1), ad.nn.ReLU(),
                            ad.nn.Linear(hidden, 4, rng=seed + 2))


def global_batch(n, seed=7):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, 8)).astype(np.float32), rng.integers(0, 4, n)


def shard(a, comm):
    """Contiguous, equal shards: rank r gets rows [r*n/p, (r+1)*n/p)."""
    n = len(a) // comm.size
    return a[comm.rank * n:(comm.rank + 1) * n]


def grads_of(model):
    return [p.grad.copy() for p in model.parameters()]


def test_gradients_equal_one_process_on_the_global_batch(comm):
    X, y = global_batch(8 * comm.size)
    dp = ad.parallel.DataParallel(make_model(), comm, first_bucket_mb=0.001, bucket_mb=0.002)
    assert len(dp.buckets) > 1                 # several buckets, so ordering is exercised
    ad.nn.functional.cross_entropy(dp(shard(X, comm)), shard(y, comm)).backward()
    ref = make_model()
    ad.nn.functional.cross_entropy(ref(X), y).backward()
    for g, r in zip(grads_of(dp.module), grads_of(ref)):
        np.testing.assert_allclose(g, r, rtol=2e-5, atol=1e-7)
    assert dp.stats.bytes_sent == sum(b.nbytes for b in dp.buckets)


def test_ten_steps_match_one_process_with_the_global_batch_and_ranks_agree_bitwise(comm):
    lr = 0.1
    dp = ad.parallel.DataParallel(make_model(), comm)
    ref = make_model()
    for step in range(10):
        X, y = global_batch(4 * comm.size, seed=100 + step)
        for model, xb, yb in ((dp, shard(X, comm), shard(y, comm)), (ref, X, y)):
            model.zero_grad()
            ad.nn.functional.cross_entropy(model(xb), yb).backward()
            for p in model.parameters():
                p.data -= lr * p.grad
    for p, r in zip(dp.module.parameters(), ref.parameters()):
        np.testing.assert_allclose(p.data, r.data, rtol=1e-4, atol=1e-6)
        everyone = comm.allgather(p.data)
        assert all(np.array_equal(everyone[0], e) for e in everyone[1:])


def test_parameters_are_broadcast_from_rank_0_at_wrap_time(comm):
    model = make_model(seed=comm.rank)        # different weights on every rank
    ad.parallel.DataParallel(model, comm)
    expected = make_model(seed=0)
    for p, e in zip(model.parameters(), expected.parameters()):
        np.testing.assert_array_equal(p.data, e.data)


def test_mismatched_models_raise_the_same_error_on_every_rank(comm):
    model = make_model(hidden=16 if comm.rank == 0 else 17)
    with pytest.raises(MismatchError, match="fingerprint") as err:
        ad.parallel.DataParallel(model, comm)
    messages = comm.allgatherv(np.frombuffer(str(err.value).encode(), np.uint8))
    assert all(np.array_equal(messages[0], m) for m in messages)


def test_no_sync_accumulates_then_synchronises_the_sum(comm):
    X, y = global_batch(8 * comm.size)
    Xs, ys = shard(X, comm), shard(y, comm)
    dp = ad.parallel.DataParallel(make_model(), comm)
    half = len(Xs) // 2
    with dp.no_sync():
        ad.nn.functional.cross_entropy(dp(Xs[:half]), ys[:half]).backward()
    local_only = grads_of(dp.module)
    ad.nn.functional.cross_entropy(dp(Xs[half:]), ys[half:]).backward()
    # oracle: average over ranks of (loss on first half + loss on second half)
    ref = make_model()
    n = half
    for r in range(comm.size):
        xr, yr = X[r * 2 * n:(r + 1) * 2 * n], y[r * 2 * n:(r + 1) * 2 * n]
        for part in (slice(0, n), slice(n, 2 * n)):
            (ad.nn.functional.cross_entropy(ref(xr[part]), yr[part]) * (1.0 / comm.size)).backward()
    for g, r in zip(grads_of(dp.module), grads_of(ref)):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-6)
    everyone = comm.allgather(local_only[0])
    assert not all(np.array_equal(everyone[0], e) for e in everyone[1:]), \
        "under no_sync the gradients must stay local"


def test_a_parameter_without_gradient_on_some_ranks_is_zero_filled(comm):
    class TwoHeads(ad.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = ad.nn.Linear(8, 8, rng=0)
            self.a = ad.nn.Linear(8, 4, rng=1)
            self.b = ad.nn.Linear(8, 4, rng=2)

        def forward(self, x, head):
            return (self.a if head == "a" else self.b)(ad.tanh(self.body(x)))

    X, y = global_batch(4 * comm.size)
    dp = ad.parallel.DataParallel(TwoHeads(), comm)
    head = "a" if comm.rank == 0 else "b"      # rank 0 never touches head b, the others never a
    ad.nn.functional.cross_entropy(dp(shard(X, comm), head), shard(y, comm)).backward()
    ref = TwoHeads()
    for r in range(comm.size):
        xr, yr = X[r * 4:(r + 1) * 4], y[r * 4:(r + 1) * 4]
        out = ref(xr, "a" if r == 0 else "b")
        (ad.nn.functional.cross_entropy(out, yr) * (1.0 / comm.size)).backward()
    for name, p in dp.module.named_parameters():
        r = dict(ref.named_parameters())[name]
        np.testing.assert_allclose(p.grad, r.grad if r.grad is not None else 0, rtol=1e-4,
                                   atol=1e-6, err_msg=name)
    assert dp.stats.unused == 2                # weight and bias of the head this rank skips


def test_overlap_and_no_overlap_give_identical_gradients(comm):
    X, y = global_batch(8 * comm.size)
    out = []
    for overlap in (True, False):
        dp = ad.parallel.DataParallel(make_model(), comm, overlap=overlap, first_bucket_mb=0.001,
                                      bucket_mb=0.002)
        ad.nn.functional.cross_entropy(dp(shard(X, comm)), shard(y, comm)).backward()
        out.append(grads_of(dp.module))
        dp.close()
    for a, b in zip(*out):
        np.testing.assert_array_equal(a, b)


def logistic_loss(w, shard):
    X, y = shard
    z = X @ w
    return (ad.log(1.0 + ad.exp(-ad.abs(z))) + ad.relu(z) - y * z).mean() + 1e-3 * (w * w).sum()


def test_distributed_lbfgs_reaches_the_single_process_optimum(comm):
    rng = np.random.default_rng(3)
    n, d = 64 * comm.size, 5
    X = rng.standard_normal((n, d))
    y = (X @ rng.standard_normal(d) + 0.3 * rng.standard_normal(n) > 0).astype(np.float64)
    Xs, ys = shard(X, comm), shard(y, comm)
    service = ad.parallel.value_and_grad(logistic_loss, comm=comm, reduce="mean")

    def minimise(value_and_grad, data):
        w = ad.nn.Parameter(np.zeros(d))
        opt = ad.optim.LBFGS([w], lr=1, max_iter=200, tolerance_grad=1e-12,
                             tolerance_change=1e-14, line_search_fn="strong_wolfe")

        def closure():
            v, g = value_and_grad(w.data, data)
            w.grad = g
            return float(v)

        opt.step(closure)
        return w.data

    w_dist = minimise(service, (Xs, ys))
    w_one = minimise(ad.value_and_grad(logistic_loss), (X, y))
    np.testing.assert_allclose(w_dist, w_one, atol=1e-6)
    everyone = comm.allgather(w_dist)
    assert all(np.array_equal(everyone[0], e) for e in everyone[1:])


def test_sync_gradients_averages_gradients_computed_outside_backward(comm):
    dp = ad.parallel.DataParallel(make_model(), comm)
    params = list(dp.module.parameters())
    for i, p in enumerate(params):
        p.grad = np.full(p.shape, comm.rank + i, dtype=np.float32)
    params[1].grad = None if comm.rank == 0 else params[1].grad   # counts as zero on rank 0
    dp.sync_gradients()
    mean_rank = (comm.size - 1) / 2
    for i, p in enumerate(params):
        expected = mean_rank + i
        if i == 1:
            expected = sum(r + 1 for r in range(1, comm.size)) / comm.size
        np.testing.assert_allclose(p.grad, expected, rtol=1e-6)


def make_bn_model(seed=0):
    return ad.nn.Sequential(ad.nn.Linear(8, 16, rng=seed), ad.nn.BatchNorm1d(16), ad.nn.ReLU(),
                            ad.nn.Linear(16, 4, rng=seed + 1))


def test_batch_norm_gradients_are_the_mean_of_each_shards_and_buffers_come_from_rank_0(comm):
    """Each rank normalises its shard with the shard's own statistics (no SyncBatchNorm), so
    the averaged gradient is the mean over ranks of one process's gradient per shard; the
    running statistics are rank 0's at every training forward, then updated locally."""
    dp = ad.parallel.DataParallel(make_bn_model(), comm)
    bn = dp.module[1]
    if comm.rank != 0:  # a rank's own statistics must not survive the broadcast
        bn.running_mean[:] = 99.0
    lr = 0.1
    for step in range(3):
        X, y = global_batch(4 * comm.size, seed=200 + step)
        before = comm.allgather(bn.running_mean.copy())  # (p, 16): each rank's
        ref = make_bn_model()
        ref.load_state_dict(dp.module.state_dict())
        ref[1].running_mean[:] = before[0]  # rank 0's, as broadcast
        ref[1].running_var[:] = comm.bcast(bn.running_var.copy(), root=0)
        expected = [np.zeros_like(p.data) for p in ref.parameters()]
        for r in range(comm.size):  # one process, shard by shard, with rank 0's buffers
            shard_model = make_bn_model()
            shard_model.load_state_dict(ref.state_dict())
            rows = slice(r * 4, (r + 1) * 4)
            ad.nn.functional.cross_entropy(shard_model(X[rows]), y[rows]).backward()
            for e, p in zip(expected, shard_model.parameters()):
                e += p.grad / comm.size
            if r == comm.rank:
                mine = shard_model[1].running_mean.copy()
        dp.zero_grad()
        ad.nn.functional.cross_entropy(dp(shard(X, comm)), shard(y, comm)).backward()
        for p, e in zip(dp.module.parameters(), expected):
            np.testing.assert_allclose(p.grad, e, rtol=2e-5, atol=1e-6)
        np.testing.assert_allclose(bn.running_mean, mine, rtol=1e-6)  # rank 0's + own shard
        assert int(bn.num_batches_tracked) == step + 1
        for p in dp.module.parameters():
            p.data -= lr * p.grad
    for p in dp.module.parameters():  # parameters stay bit-identical
        np.testing.assert_array_equal(comm.bcast(p.data.copy(), root=0), p.data)


def test_sync_batch_norm_under_data_parallel_equals_batch_norm_on_the_global_batch(comm):
    """SyncBatchNorm's statistics are the global batch's, and its allreduces are
    differentiable: P ranks on shards compute one process's gradients, outputs and running
    statistics on the whole batch; every rank holds the same statistics."""
    def model(norm):
        return ad.nn.Sequential(ad.nn.Linear(8, 16, rng=0), norm, ad.nn.ReLU(),
                                ad.nn.Linear(16, 4, rng=1))

    dp = ad.parallel.DataParallel(model(ad.parallel.SyncBatchNorm(16, comm=comm)), comm)
    ref = model(ad.nn.BatchNorm1d(16))
    lr = 0.1
    for step in range(3):
        X, y = global_batch(4 * comm.size, seed=300 + step)
        dp.zero_grad()
        ref.zero_grad()
        out = dp(shard(X, comm))
        ad.nn.functional.cross_entropy(out, shard(y, comm)).backward()
        ref_out = ref(X)
        ad.nn.functional.cross_entropy(ref_out, y).backward()
        np.testing.assert_allclose(out.data, shard(ref_out.data, comm), rtol=1e-5, atol=1e-6)
        for p, r in zip(dp.module.parameters(), ref.parameters()):
            np.testing.assert_allclose(p.grad, r.grad, rtol=2e-4, atol=1e-6)
        for b, r in zip(dp.module[1].buffers(), ref[1].buffers()):
            np.testing.assert_allclose(b, r, rtol=1e-5, atol=1e-7)
        for model_ in (dp.module, ref):
            for p in model_.parameters():
                p.data -= lr * p.grad
    stats = dp.module[1].running_var.copy()
    np.testing.assert_array_equal(comm.bcast(stats.copy(), root=0), stats)


@pytest.mark.parametrize("spec", [None, "topk:0.25+ef"])
def test_join_trains_on_uneven_inputs_like_one_process_and_ends_with_one_model(comm, spec):
    """Rank r has 2 + r batches. Inside join() the ranks that still have data average their
    gradients over all ranks (the others shadow with zeros), so step t of plain SGD moves the
    parameters by -lr * sum over the ranks with a batch t of their gradients / P; at the end
    every rank holds the model of the rank that stepped most."""
    lr, P = 0.1, comm.size
    batches = {r: [global_batch(6, seed=100 * r + t) for t in range(2 + r)] for r in range(P)}
    model = make_model()
    # measured steps: a rank that has left mirrors their extra allreduces too
    dp = ad.parallel.DataParallel(model, comm, compressor=spec, first_bucket_mb=0.001,
                                  bucket_mb=0.002, measure_every=2)
    opt = ad.optim.SGD(model.parameters(), lr=lr)
    with dp.join():
        for X, y in batches[comm.rank]:
            opt.zero_grad()
            ad.nn.functional.cross_entropy(dp(X), y).backward()
            opt.step()
    final = [p.data.copy() for p in model.parameters()]
    for a in final:                                    # one model on every rank, bit for bit
        np.testing.assert_array_equal(comm.allgather(a)[0], a)
    if spec is None:                                   # the oracle: plain SGD in one process
        ref = make_model()
        for t in range(2 + P - 1):
            total = [np.zeros_like(p.data) for p in ref.parameters()]
            for r in range(P):
                if t < len(batches[r]):
                    for p in ref.parameters():
                        p.grad = None
                    X, y = batches[r][t]
                    ad.nn.functional.cross_entropy(ref(X), y).backward()
                    for acc, p in zip(total, ref.parameters()):
                        acc += p.grad
            for p, g in zip(ref.parameters(), total):
                p.data -= lr * g / P
        for a, p in zip(final, ref.parameters()):
            np.testing.assert_allclose(a, p.data, rtol=1e-5, atol=1e-6)
    dp.close()


@pytest.mark.parametrize("optimizer,kwargs", [(ad.optim.Adam, {"lr": 1e-2}),
                                              (ad.optim.SGD, {"lr": 0.1, "momentum": 0.9})])
def test_zero_redundancy_optimizer_is_bitwise_the_unsharded_optimizer(comm, optimizer, kwargs):
    """ZeRO stage 1: each rank keeps the state of its shard only, and after every step every
    rank holds exactly the parameters of DataParallel with the plain optimizer (a cosine
    schedule on the wrapper reaches the shards' optimizers)."""
    X, y = global_batch(8 * comm.size)
    runs = []
    for sharded in (False, True):
        model = make_model(hidden=24)
        dp = ad.parallel.DataParallel(model, comm)
        opt = (ad.parallel.ZeroRedundancyOptimizer(model.parameters(), optimizer, comm, **kwargs)
               if sharded else optimizer(model.parameters(), **kwargs))
        sched = ad.optim.CosineAnnealingLR(opt, T_max=6)
        for _ in range(6):
            opt.zero_grad()
            ad.nn.functional.cross_entropy(dp(shard(X, comm)), shard(y, comm)).backward()
            opt.step()
            sched.step()
        runs.append([p.data.copy() for p in model.parameters()])
        if sharded:
            mine = opt.shard
            assert opt.local is None or set(map(id, opt.local.state)) == set(map(id, mine))
            counts = comm.allgather(np.array([sum(p.size for p in mine)])).ravel()
            assert counts.sum() == sum(p.size for p in model.parameters())
            assert counts.max() < counts.sum()        # the state really is split
        dp.close()
    for a, b in zip(*runs):
        np.testing.assert_array_equal(a, b)


def test_zero_keeps_parameters_in_one_flat_buffer_and_takes_back_replaced_data(comm):
    """The parameters' data are views of the optimizer's flat buffer (the step's Allgatherv
    fills it in place); a parameter whose data was replaced since is copied back in first,
    and the run goes on exactly as the unsharded optimizer's."""
    X, y = global_batch(8 * comm.size)
    runs = []
    for sharded in (False, True):
        model = make_model()
        dp = ad.parallel.DataParallel(model, comm)
        opt = (ad.parallel.ZeroRedundancyOptimizer(model.parameters(), ad.optim.SGD, comm,
                                                   lr=0.1, momentum=0.9)
               if sharded else ad.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
        params = list(model.parameters())
        if sharded:
            bases = {id(p.data.base) for p in params}
            assert len(bases) == 1 and params[0].data.base is not None
        for step in range(4):
            if step == 2:
                params[1].data = params[1].data * np.float32(0.5)  # a new array
            opt.zero_grad()
            ad.nn.functional.cross_entropy(dp(shard(X, comm)), shard(y, comm)).backward()
            opt.step()
        if sharded:
            assert params[1].data.base is params[0].data.base  # home again
        runs.append([p.data.copy() for p in params])
        dp.close()
    for a, b in zip(*runs):
        np.testing.assert_array_equal(a, b)


def test_zero_redundancy_optimizer_state_dict_resumes_its_own_shard_only(comm):
    model = make_model()
    opt = ad.parallel.ZeroRedundancyOptimizer(model.parameters(), ad.optim.Adam, comm, lr=1e-2)
    for p in model.parameters():
        p.grad = np.ones_like(p.data)
    opt.step()
    state = opt.state_dict()
    again = ad.parallel.ZeroRedundancyOptimizer(model.parameters(), ad.optim.Adam, comm, lr=1e-2)
    again.load_state_dict(state)
    if opt.local is not None:
        for p, q in zip(opt.shard, again.shard):
            np.testing.assert_array_equal(again.local.state[q]["exp_avg"],
                                          opt.local.state[p]["exp_avg"])
    wrong = {**state, "rank": (comm.rank + 1) % comm.size}
    with pytest.raises(ValueError, match="shard"):
        again.load_state_dict(wrong)


def test_zero_with_reduce_scattered_gradients_trains_like_the_unsharded_optimizer(comm):
    """ZeRO stage 2's exchange: each bucket is reduce-scattered, a rank's own elements receive
    the averaged gradients (parameters without any have None), clipping sees the global norm,
    and the run equals DataParallel with the plain optimizer: bit for bit at 2 ranks, where a
    sum of two is the same in any order, to rounding at more (the reduce-scatter adds in its
    own order), the clipping norm to rounding (a cut parameter's sum is two sums). Every
    rank ends with the same parameters bit for bit."""
    X, y = global_batch(8 * comm.size)
    runs, norms = [], []
    for sharded in (False, True):
        model = make_model(hidden=24)
        dp = ad.parallel.DataParallel(model, comm, first_bucket_mb=0.001, bucket_mb=0.003)
        assert len(dp.buckets) > 1
        params = list(model.parameters())
        opt = (ad.parallel.ZeroRedundancyOptimizer(params, ad.optim.SGD, comm, lr=0.1,
                                                   momentum=0.9, data_parallel=dp)
               if sharded else ad.optim.SGD(params, lr=0.1, momentum=0.9))
        steps = []
        for _ in range(4):
            opt.zero_grad()
            ad.nn.functional.cross_entropy(dp(shard(X, comm)), shard(y, comm)).backward()
            steps.append([None if p.grad is None else p.grad.copy() for p in params])
            norms.append(opt.clip_grad_norm(0.5) if sharded
                         else ad.optim.clip_grad_norm(params, 0.5))
            opt.step()
        runs.append((steps, [p.data.copy() for p in params]))
        if sharded:  # rank r owns elements [bounds[r], bounds[r+1]) of the flat parameters
            lo, hi = opt.bounds[comm.rank], opt.bounds[comm.rank + 1]
            starts = np.cumsum([0] + [p.size for p in params])
            mine = [slice(max(lo - s, 0), max(min(hi - s, p.size), 0))
                    for p, s in zip(params, starts)]
            assert [g is not None for g in steps[-1]] == [m.stop > m.start for m in mine]
            assert any(g is None for g in steps[-1])  # the gradients really are sharded
            assert sum(piece.size for piece in opt.shard) == hi - lo
        dp.close()
    exact = comm.size == 2
    (plain_steps, plain), (zero_steps, zero) = runs
    for plain_grads, zero_grads in zip(plain_steps, zero_steps):
        for a, b, m in zip(plain_grads, zero_grads, mine):
            if b is not None:
                np.testing.assert_allclose(b.ravel()[m], a.ravel()[m],
                                           rtol=0 if exact else 1e-5, atol=0 if exact else 1e-7)
    np.testing.assert_allclose(norms[4:], norms[:4], rtol=1e-6)
    for a, b in zip(plain, zero):
        np.testing.assert_allclose(b, a, rtol=0 if exact else 1e-5, atol=0 if exact else 1e-6)
        everyone = comm.allgather(b)
        assert (everyone == everyone[0]).all()


def test_reduce_scattered_gradients_need_exact_averaging_and_the_same_parameters(comm):
    model = make_model()
    dp = ad.parallel.DataParallel(model, comm, compressor="topk:0.5")
    with pytest.raises(ValueError, match="shard_gradients: needs exact averaging.*topk"):
        ad.parallel.ZeroRedundancyOptimizer(model.parameters(), ad.optim.SGD, comm, lr=0.1,
                                            data_parallel=dp)
    dp.close()
    dp = ad.parallel.DataParallel(model, comm)
    with pytest.raises(ValueError, match="exactly the parameters given, in the same order"):
        ad.parallel.ZeroRedundancyOptimizer(list(model.parameters())[::-1], ad.optim.SGD, comm,
                                            lr=0.1, data_parallel=dp)
    with pytest.raises(ValueError, match="non-decreasing element bounds from 0 to"):
        dp.shard_gradients([0] * (comm.size + 1))
    ad.parallel.ZeroRedundancyOptimizer(model.parameters(), ad.optim.SGD, comm, lr=0.1,
                                        data_parallel=dp)
    with pytest.raises(RuntimeError, match="join: the gradients are sharded"), dp.join():
        pass
    dp.close()


@pytest.mark.parametrize("spec", [None, "topk:0.25", "fp16"])
def test_measured_steps_report_the_averaged_gradients_error_against_the_exact_average(comm,
                                                                                      spec):
    """measure_every=2: every second synchronisation also averages the exact gradient; the
    reported relative error and cosine equal the one-process oracle's: mean over ranks of
    each rank's top-k (one bucket, so top-k of the whole flattened gradient) against the mean
    of the gradients; 0 and 1 for exact averaging; fp16 a rounding error."""
    X, y = global_batch(8 * comm.size)
    model = make_model(hidden=24)
    dp = ad.parallel.DataParallel(model, comm, compressor=spec, bucket_mb=64,
                                  first_bucket_mb=64, measure_every=2)
    assert len(dp.buckets) == 1
    ref = make_model(hidden=24)
    flat = []
    for r in range(comm.size):  # every rank's gradient, flattened in model order
        for p in ref.parameters():
            p.grad = None
        n = len(X) // comm.size
        ad.nn.functional.cross_entropy(ref(X[r * n:(r + 1) * n]), y[r * n:(r + 1) * n]).backward()
        flat.append(np.concatenate([p.grad.ravel() for p in ref.parameters()]))
    flat = np.array(flat, np.float64)
    exact = flat.mean(0)
    if spec == "topk:0.25":
        k = round(0.25 * exact.size)
        sent = np.zeros_like(flat)
        for r, g in enumerate(flat):
            keep = np.argsort(-np.abs(g), kind="stable")[:k]
            sent[r, keep] = g[keep]
        got = sent.mean(0)
        expected = np.linalg.norm(got - exact) / np.linalg.norm(exact)
        cosine = got @ exact / (np.linalg.norm(got) * np.linalg.norm(exact))
    for step in (1, 2):
        for p in model.parameters():
            p.grad = None
        ad.nn.functional.cross_entropy(dp(shard(X, comm)), shard(y, comm)).backward()
        if step == 1:
            assert dp.stats.grad_error is None and "grad_error" not in dp.stats.as_dict()
    e, c = dp.stats.grad_error, dp.stats.grad_cosine
    if spec is None:
        assert e == 0.0 and c == pytest.approx(1.0, abs=1e-6)
    elif spec == "fp16":
        assert 0 < e < 1e-3 and c == pytest.approx(1.0, abs=1e-6)
    else:
        assert e == pytest.approx(expected, rel=1e-4) and c == pytest.approx(cosine, rel=1e-4)
        assert 0.05 < e < 1
    dp.close()


@pytest.mark.parametrize("optimizer,kwargs", [(ad.optim.Adam, {"lr": 1e-2, "amsgrad": True}),
                                              (ad.optim.SGD, {"lr": 0.1, "momentum": 0.9})])
def test_zero_state_consolidates_into_the_unsharded_optimizers_and_loads_back_anywhere(
        comm, optimizer, kwargs):
    """consolidated_state_dict() is the state_dict() of the unsharded optimizer on the same
    gradients, entry for entry and bit for bit; it loads into that optimizer, into a ZeRO
    optimizer, and the plain state into a ZeRO one: each continues exactly as the other."""
    X, y = global_batch(8 * comm.size)

    def train(opt, dp, steps):
        for _ in range(steps):
            opt.zero_grad()
            ad.nn.functional.cross_entropy(dp(shard(X, comm)), shard(y, comm)).backward()
            opt.step()

    models, opts, dps = [], [], []
    for sharded in (False, True):
        model = make_model(hidden=24)
        dp = ad.parallel.DataParallel(model, comm)
        opt = (ad.parallel.ZeroRedundancyOptimizer(model.parameters(), optimizer, comm, **kwargs)
               if sharded else optimizer(model.parameters(), **kwargs))
        train(opt, dp, 3)
        models.append(model), opts.append(opt), dps.append(dp)
    plain, whole = opts[0].state_dict(), opts[1].consolidated_state_dict()
    assert sorted(whole["state"]) == sorted(plain["state"]) and whole["param_groups"] == \
        plain["param_groups"]
    for i, entries in plain["state"].items():
        assert sorted(entries) == sorted(whole["state"][i])
        for k, v in entries.items():
            np.testing.assert_array_equal(whole["state"][i][k], v, err_msg=f"{i} {k}")
    # Swap: the plain optimizer takes the consolidated state, the ZeRO one the plain state.
    opts[0].load_state_dict(whole)
    opts[1].load_state_dict(plain)
    for opt, dp in zip(opts, dps):
        train(opt, dp, 2)
    for a, b in zip(*(m.parameters() for m in models)):
        np.testing.assert_array_equal(a.data, b.data)
    fresh = ad.parallel.ZeroRedundancyOptimizer(models[1].parameters(), optimizer, comm,
                                                **kwargs)
    fresh.load_state_dict(opts[1].consolidated_state_dict())
    for a, b in zip(fresh.shard, opts[1].shard):
        for k, v in opts[1].local.state[b].items():
            np.testing.assert_array_equal(fresh.local.state[a][k], v)
    for dp in dps:
        dp.close()


def test_weight_gradients_are_written_into_the_buckets_with_the_same_result(comm, monkeypatch):
    """gradient_as_bucket_view: backward writes each Linear weight's gradient, pre-divided,
    straight into its bucket slot; the gradients are bit for bit those of the copying path
    (1/P is a power of two here), not under no_sync, and not for a weight used twice."""
    from distad.nn.primitives import linear_p

    calls = []
    rule = linear_p.vjp_into[1]
    monkeypatch.setitem(linear_p.vjp_into, 1, lambda *a: calls.append(1) or rule(*a))
    X, y = global_batch(8 * comm.size)
    results = []
    for into in (True, False):
        model = make_model()
        dp = ad.parallel.DataParallel(model, comm, first_bucket_mb=0.001, bucket_mb=0.002)
        if not into:
            for p in model.parameters():
                p.grad_buffer = None
        calls.clear()
        ad.nn.functional.cross_entropy(dp(shard(X, comm)), shard(y, comm)).backward()
        assert (len(calls) == 3) == into              # the three Linear weights
        results.append(grads_of(model))
        if into:
            model.zero_grad()
            calls.clear()
            with dp.no_sync():                        # local accumulation: fresh arrays
                ad.nn.functional.cross_entropy(dp(shard(X, comm)), shard(y, comm)).backward()
            assert not calls
            dp.close()
            assert all(p.grad_buffer is None for p in model.parameters())
        else:
            dp.close()
    for a, b in zip(*results):
        np.testing.assert_array_equal(a, b)


def test_a_weight_used_twice_gets_both_uses_through_the_bucket(comm):
    lin = ad.nn.Linear(6, 6, rng=0)
    dp = ad.parallel.DataParallel(lin, comm)
    x = np.ones((2, 6), np.float32)
    (dp(dp(x)) ** 2).sum().backward()
    ref = ad.nn.Linear(6, 6, rng=0)
    (ref(ref(x)) ** 2).sum().backward()
    np.testing.assert_allclose(lin.weight.grad, ref.weight.grad, rtol=1e-5)
    dp.close()


def test_a_hook_of_its_own_keeps_a_parameters_gradient_out_of_the_bucket_path(comm):
    """A user hook on a wrapped parameter sees the rank's own gradient (not one already
    divided by P in the bucket), and what it returns is what gets averaged."""
    X, y = global_batch(8 * comm.size)
    model = make_model()
    seen = []
    w = model[0].weight
    w.register_hook(lambda g: seen.append(np.array(g)) or g * 2)  # before wrapping
    dp = ad.parallel.DataParallel(model, comm)
    ad.nn.functional.cross_entropy(dp(shard(X, comm)), shard(y, comm)).backward()
    ref = make_model()
    ad.nn.functional.cross_entropy(ref(shard(X, comm)), shard(y, comm)).backward()
    np.testing.assert_allclose(seen[0], ref[0].weight.grad, rtol=1e-5, atol=1e-7)
    mean = comm.allreduce(np.array(ref[0].weight.grad * 2)) / comm.size
    np.testing.assert_allclose(w.grad, mean, rtol=1e-5, atol=1e-7)
    dp.close()
