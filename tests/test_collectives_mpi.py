"""Differentiable collectives and messages, under mpiexec, against finite differences.

Every rank regenerates every rank's data from a seed, so each can evaluate the
*global* function (the sum of the ranks' losses, or the replicated loss of a
tensor-parallel region) in plain numpy and differentiate it by central
differences with respect to its own input; the distributed reverse-mode
gradient must match.
"""

import numpy as np
import pytest

import distad as ad
from distad.comm import collectives as C

pytestmark = pytest.mark.mpi(min_size=2)


def per_rank(P, shape, seed):
    """One float64 array per rank, the same on every rank."""
    return [np.random.default_rng(seed + r).standard_normal(shape) for r in range(P)]


def central_differences(F, x, eps=1e-6):
    """dF/dx of a scalar numpy function F by central differences (float64)."""
    g = np.empty_like(x)
    for i in np.ndindex(x.shape):
        old = x[i]
        x[i] = old + eps
        hi = F()
        x[i] = old - eps
        lo = F()
        x[i] = old
        g[i] = (hi - lo) / (2 * eps)
    return g


def check(grad, F, x):
    np.testing.assert_allclose(grad, central_differences(F, x), rtol=1e-6, atol=1e-7)


def test_allreduce_gradient_is_the_sum_of_every_ranks_cotangent(comm):
    P, r = comm.size, comm.rank
    xs, cs = per_rank(P, (3, 4), 1), per_rank(P, (3, 4), 100)
    x = ad.tensor(xs[r], requires_grad=True)
    (ad.sin(C.allreduce(x, comm)) * cs[r]).sum().backward()

    def F():   # sum over ranks of each rank's loss
        return sum((np.sin(sum(xs)) * c).sum() for c in cs)

    check(x.grad, F, xs[r])


def test_mean_allreduce_gradient_is_the_mean_of_the_cotangents(comm):
    P, r = comm.size, comm.rank
    xs, cs = per_rank(P, (5,), 2), per_rank(P, (5,), 200)
    x = ad.tensor(xs[r], requires_grad=True)
    (ad.tanh(C.allreduce(x, comm, op="mean")) * cs[r]).sum().backward()

    def F():
        return sum((np.tanh(sum(xs) / P) * c).sum() for c in cs)

    check(x.grad, F, xs[r])


def test_allgather_gradient_is_the_reduce_scatter_of_the_cotangents(comm):
    P, r = comm.size, comm.rank
    xs, cs = per_rank(P, (3, 2), 3), per_rank(P, (3, 2 * P), 300)
    x = ad.tensor(xs[r], requires_grad=True)
    y = C.allgather(x, comm, axis=1)
    assert y.shape == (3, 2 * P)
    (ad.tanh(y) * cs[r]).sum().backward()

    def F():
        return sum((np.tanh(np.concatenate(xs, axis=1)) * c).sum() for c in cs)

    check(x.grad, F, xs[r])


def test_reduce_scatter_gradient_is_the_allgather_of_the_cotangents(comm):
    P, r = comm.size, comm.rank
    xs, cs = per_rank(P, (2 * P, 3), 4), per_rank(P, (2, 3), 400)
    x = ad.tensor(xs[r], requires_grad=True)
    y = C.reduce_scatter(x, comm, axis=0)
    np.testing.assert_allclose(y.data, sum(xs)[2 * r:2 * r + 2])
    (ad.sin(y) * cs[r]).sum().backward()

    def F():
        total = sum(xs)
        return sum((np.sin(total[2 * s:2 * s + 2]) * cs[s]).sum() for s in range(P))

    check(x.grad, F, xs[r])


def test_copy_to_parallel_gradient_sums_the_shards_cotangents(comm):
    P, r = comm.size, comm.rank
    x0 = np.random.default_rng(5).standard_normal((4,))    # replicated: one variable
    ws = per_rank(P, (4,), 500)
    x = ad.tensor(x0, requires_grad=True)
    y = C.copy_to_parallel(x, comm)
    np.testing.assert_array_equal(y.data, x0)
    ad.sin(y * ws[r]).sum().backward()

    def F():
        return sum(np.sin(x0 * w).sum() for w in ws)

    check(x.grad, F, x0)


def test_reduce_from_parallel_gradient_passes_the_replicated_cotangent_through(comm):
    P, r = comm.size, comm.rank
    xs = per_rank(P, (2, 3), 6)
    c = np.random.default_rng(600).standard_normal((2, 3))  # the replicated code after it
    x = ad.tensor(xs[r], requires_grad=True)
    (ad.sin(C.reduce_from_parallel(x, comm)) * c).sum().backward()

    def F():   # the replicated loss counts once
        return (np.sin(sum(xs)) * c).sum()

    check(x.grad, F, xs[r])


def test_send_recv_gradient_travels_back_to_the_sender(comm):
    P, r = comm.size, comm.rank
    right, left = (r + 1) % P, (r - 1) % P
    xs, ws = per_rank(P, (3, 4), 7), per_rank(P, (3, 4), 700)
    x = ad.tensor(xs[r], requires_grad=True)
    token = C.send(x, right, comm)                     # everyone sends first, then receives;
    z = C.recv((3, 4), np.float64, left, comm, after=token)  # backward runs in reverse order
    np.testing.assert_array_equal(z.data, xs[left])
    loss = ad.tanh(z * ws[r]).sum() + (x * x).sum()
    (loss + token).backward()
    C.wait_sends()

    def F():   # rank s's loss uses x_{s-1}, received, and its own x_s
        return sum(np.tanh(xs[(s - 1) % P] * ws[s]).sum() + (xs[s] ** 2).sum() for s in range(P))

    check(x.grad, F, xs[r])


def test_large_messages_both_ways_at_once_do_not_deadlock(comm):
    """1 MB each way (MPI's rendezvous protocol): sends and gradient sends never block."""
    P, r = comm.size, comm.rank
    right, left = (r + 1) % P, (r - 1) % P
    shape = (512, 512)
    a = [np.full(shape, s + 1.0, np.float32) for s in range(P)]
    b = [np.full(shape, 10.0 * (s + 1), np.float32) for s in range(P)]
    x = ad.tensor(np.zeros(shape, np.float32), requires_grad=True)
    t1 = C.send(x, right, comm)
    t2 = C.send(x, left, comm, after=t1)
    from_left = C.recv(shape, np.float32, left, comm, after=t2)
    from_right = C.recv(shape, np.float32, right, comm, after=from_left)
    ((from_left * a[r]).sum() + (from_right * b[r]).sum()).backward()
    C.wait_sends()
    # x_r reaches rank r+1 as its `from_left` and rank r-1 as its `from_right`
    np.testing.assert_array_equal(x.grad, a[right] + b[left])


def test_float32_stays_float32_through_every_collective_and_its_gradient(comm):
    P = comm.size
    for op in (lambda x: C.allreduce(x, comm), lambda x: C.allreduce(x, comm, op="mean"),
               lambda x: C.allgather(x, comm), lambda x: C.reduce_scatter(x, comm),
               lambda x: C.copy_to_parallel(x, comm), lambda x: C.reduce_from_parallel(x, comm),
               lambda x: C.scatter_to_parallel(x, comm, axis=0),
               lambda x: C.gather_from_parallel(x, comm)):
        x = ad.tensor(np.ones((2 * P, 3), np.float32), requires_grad=True)
        y = op(x)
        assert y.dtype == np.float32
        (y * y).sum().backward()
        assert x.grad.dtype == np.float32


def test_second_derivative_through_allreduce_matches_the_global_hessian_vector_product(comm):
    P, r = comm.size, comm.rank
    xs, cs = per_rank(P, (4,), 8), per_rank(P, (4,), 800)
    x = ad.tensor(xs[r], requires_grad=True)
    loss = (ad.sin(C.allreduce(x, comm)) * cs[r]).sum()
    (g,) = ad.backprop(loss, inputs=[x], create_graph=True)
    g.sum().backward()                                  # d/dx_r of sum_j dF/dx_r[j]

    def F():   # every rank's second loss is the replicated sum_j cos(S_j) * sum_s c_s[j],
        return P * (np.cos(sum(xs)) * sum(cs)).sum()   # and the global one adds all P of them

    check(x.grad, F, xs[r])


def test_scatter_to_parallel_gradient_concatenates_the_chunks_cotangents(comm):
    P, r = comm.size, comm.rank
    x0 = np.random.default_rng(9).standard_normal((3, 2 * P))   # replicated: one variable
    cs = per_rank(P, (3, 2), 900)
    x = ad.tensor(x0, requires_grad=True)
    y = C.scatter_to_parallel(x, comm)
    np.testing.assert_array_equal(y.data, x0[:, 2 * r:2 * r + 2])
    (ad.sin(y) * cs[r]).sum().backward()

    def F():
        return sum((np.sin(x0[:, 2 * s:2 * s + 2]) * cs[s]).sum() for s in range(P))

    check(x.grad, F, x0)


def test_gather_from_parallel_gradient_is_this_ranks_chunk_of_the_replicated_cotangent(comm):
    P, r = comm.size, comm.rank
    xs = per_rank(P, (3, 2), 10)
    c = np.random.default_rng(1000).standard_normal((3, 2 * P))  # the replicated code after it
    x = ad.tensor(xs[r], requires_grad=True)
    (ad.tanh(C.gather_from_parallel(x, comm)) * c).sum().backward()

    def F():   # the replicated loss counts once
        return (np.tanh(np.concatenate(xs, axis=1)) * c).sum()

    check(x.grad, F, xs[r])


def test_a_ring_exchange_needs_no_ordering_hint(comm):
    """Every rank sends right, then receives from the left, without `after=`: the engine runs
    the blocking half of backward (the send's, which receives the cotangent) only when nothing
    else is ready, so every rank has already posted the cotangent its neighbour waits for."""
    right, left = (comm.rank + 1) % comm.size, (comm.rank - 1) % comm.size
    x = ad.tensor(np.full(3, comm.rank + 1.0), requires_grad=True)
    t = ad.comm.send(x * 2, right, comm)
    z = ad.comm.recv((3,), np.float64, left, comm)
    ((z * z).sum() + t).backward()
    ad.comm.wait_sends()
    np.testing.assert_allclose(x.grad, 8 * x.data)     # d/dx (2x)^2 on the right neighbour
