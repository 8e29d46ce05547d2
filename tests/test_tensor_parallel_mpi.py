"""Tensor-parallel layers (Megatron-style) under mpiexec, against the unsplit single-process model.

Every rank builds the full model from a seed, so the oracle — the same model
on the same batch in one process — is computed locally. A column-parallel
shard's gradient must equal the matching rows of the full gradient, a
row-parallel shard's the matching columns.
"""

import numpy as np
import pytest

import distad as ad
from distad.parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    TensorParallelMLP,
    tensor_parallel,
    tensor_parallel_state_dict,
)

nn = ad.nn
pytestmark = pytest.mark.mpi(min_size=2)


def rows(comm, n):
    k = n // comm.size
    return slice(comm.rank * k, (comm.rank + 1) * k)


def batch(n=6, d=8, seed=3):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, d)).astype(np.float32), rng.integers(0, 4, n)


def close(a, b):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_column_parallel_output_is_this_ranks_slice_of_the_full_output(comm):
    full = nn.Linear(8, 4 * comm.size, rng=0)
    col = ColumnParallelLinear.from_linear(full, comm)
    X, _ = batch()
    close(col(X).data, full(X).data[:, rows(comm, 4 * comm.size)])


def test_mlp_block_gradients_equal_one_process_gradients(comm):
    d, h = 8, 4 * comm.size
    fc1, fc2 = nn.Linear(d, h, rng=1), nn.Linear(h, d, rng=2)
    ref = nn.Sequential(fc1, nn.GELU(), fc2)
    X, _ = batch()
    c = np.random.default_rng(9).standard_normal((6, d)).astype(np.float32)
    mlp = TensorParallelMLP.from_linears(fc1, fc2, comm)
    x = ad.tensor(X, requires_grad=True)
    out = mlp(x)
    (out * c).sum().backward()                         # the replicated loss
    xr = ad.tensor(X, requires_grad=True)
    ref_out = ref(xr)
    (ref_out * c).sum().backward()
    close(out.data, ref_out.data)
    r = rows(comm, h)
    close(mlp.fc1.weight.grad, fc1.weight.grad[r])     # column-parallel: rows
    close(mlp.fc1.bias.grad, fc1.bias.grad[r])
    close(mlp.fc2.weight.grad, fc2.weight.grad[:, r])  # row-parallel: columns
    close(mlp.fc2.bias.grad, fc2.bias.grad)            # replicated, counted once
    close(x.grad, xr.grad)                             # copy_to_parallel summed the shards


def test_tensor_parallel_sequential_trains_like_one_process(comm):
    h = 4 * comm.size
    rng = np.random.default_rng(4)
    ref = nn.Sequential(nn.Linear(8, h, rng=rng), nn.ReLU(), nn.Linear(h, h, rng=rng),
                        nn.Tanh(), nn.Linear(h, 4 * comm.size, rng=rng))
    tp = tensor_parallel(ref, comm)
    assert [type(m).__name__ for m in tp] == ["ColumnParallelLinear", "ReLU",
                                              "RowParallelLinear", "Tanh", "ColumnParallelLinear"]
    assert tp[4].gather_output                          # the unpaired last layer gathers
    opts = [ad.optim.SGD(m.parameters(), lr=0.1) for m in (tp, ref)]
    for step in range(3):
        X, y = batch(seed=10 + step)
        for model, opt in zip((tp, ref), opts):
            opt.zero_grad()
            nn.functional.cross_entropy(model(X), y).backward()
            opt.step()
    full = tensor_parallel_state_dict(tp)
    ref_state = ref.state_dict()
    assert list(full) == list(ref_state)
    for k in ref_state:
        close(full[k], ref_state[k])


def test_row_parallel_with_replicated_input_slices_it_and_returns_its_full_gradient(comm):
    full = nn.Linear(4 * comm.size, 5, rng=5)
    row = RowParallelLinear.from_linear(full, comm, input_is_parallel=False)
    X = np.random.default_rng(6).standard_normal((3, 4 * comm.size)).astype(np.float32)
    x, xr = ad.tensor(X, requires_grad=True), ad.tensor(X, requires_grad=True)
    row(x).sum().backward()
    full(xr).sum().backward()
    close(x.grad, xr.grad)


def test_new_layers_draw_the_same_weights_as_nn_linear_with_the_same_rng(comm):
    col = ColumnParallelLinear(8, 2 * comm.size, comm, rng=7)
    row = RowParallelLinear(2 * comm.size, 3, comm, rng=7)
    full = nn.Linear(8, 2 * comm.size, rng=7)
    np.testing.assert_array_equal(col.weight.data, full.weight.data[rows(comm, 2 * comm.size)])
    np.testing.assert_array_equal(row.full_state()["weight"],
                                  nn.Linear(2 * comm.size, 3, rng=7).weight.data)


def test_features_not_divisible_by_the_group_size_are_refused(comm):
    with pytest.raises(ValueError, match=f"cannot be split evenly over {comm.size}"):
        ColumnParallelLinear(8, 2 * comm.size + 1, comm)


def test_float32_stays_float32_in_outputs_and_gradients(comm):
    mlp = TensorParallelMLP(8, 2 * comm.size, comm, rng=0)
    X, _ = batch()
    out = mlp(X)
    out.sum().backward()
    assert out.dtype == np.float32
    assert all(p.grad.dtype == np.float32 for p in mlp.parameters())
