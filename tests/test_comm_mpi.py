"""Communicator across ranks, under `mpiexec -n P python -m pytest --with-mpi -m mpi`.

The oracle: every rank's input is regenerated from a seed and the rank, so
each rank can compute the expected result of a collective with numpy alone.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from distad.comm import Communicator, MismatchError

pytestmark = pytest.mark.mpi(min_size=2)

DTYPES = [np.float32, np.float64]
SEED = 1234
SHAPE = (3, 5)


def rank_data(rank: int, dtype, shape=SHAPE) -> np.ndarray:
    return np.random.default_rng(SEED + rank).standard_normal(shape).astype(dtype)


def all_data(size: int, dtype, shape=SHAPE) -> np.ndarray:
    """Every rank's input, stacked: shape (size, *shape)."""
    return np.stack([rank_data(r, dtype, shape) for r in range(size)])


def tol(dtype) -> dict[str, float]:
    # MPI may sum in another order than numpy: allow rounding, not more.
    return {"rtol": 1e-5, "atol": 1e-6} if dtype == np.float32 else {"rtol": 1e-12, "atol": 1e-14}


def messages_on_all_ranks(comm: Communicator, exc: BaseException | None) -> list[str]:
    # Test-only metadata exchange: pickle of short strings is fine here.
    return comm.mpi.allgather(None if exc is None else str(exc))


def test_rank_and_size_are_those_of_comm_world(comm):
    from mpi4py import MPI

    assert (comm.rank, comm.size) == (MPI.COMM_WORLD.Get_rank(), MPI.COMM_WORLD.Get_size())
    assert comm.mpi is MPI.COMM_WORLD


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op", ["sum", "max", "min"])
def test_allreduce_matches_numpy_over_all_ranks_data(comm, dtype, op):
    expected = getattr(np, op)(all_data(comm.size, dtype), axis=0)
    got = comm.allreduce(rank_data(comm.rank, dtype), op=op)
    assert got.dtype == dtype and got.shape == SHAPE
    if op == "sum":
        np.testing.assert_allclose(got, expected, **tol(dtype))
    else:
        np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("dtype", DTYPES)
def test_allreduce_in_place(comm, dtype):
    x = rank_data(comm.rank, dtype)
    assert comm.allreduce(x, out=x) is x
    np.testing.assert_allclose(x, all_data(comm.size, dtype).sum(0), **tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_iallreduce_completes_through_test_and_wait(comm, dtype):
    x = rank_data(comm.rank, dtype)
    req = comm.iallreduce(x, out=x)
    while not req.test():  # test() is what drives MPICH's progress here
        pass
    assert req.wait() is x and x.dtype == dtype
    np.testing.assert_allclose(x, all_data(comm.size, dtype).sum(0), **tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_allgather_stacks_every_ranks_array_in_rank_order(comm, dtype):
    got = comm.allgather(rank_data(comm.rank, dtype))
    assert got.dtype == dtype
    np.testing.assert_array_equal(got, all_data(comm.size, dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_allgatherv_gathers_ragged_first_axes(comm, dtype):
    # Rank r contributes r + 1 rows (rank 0 could contribute none: try that too).
    rows = [r + 1 if r else 0 for r in range(comm.size)]
    mine = rank_data(comm.rank, dtype, (rows[comm.rank], 4))
    parts = comm.allgatherv(mine)
    assert [p.shape for p in parts] == [(n, 4) for n in rows]
    for r, part in enumerate(parts):
        assert part.dtype == dtype
        np.testing.assert_array_equal(part, rank_data(r, dtype, (rows[r], 4)))
    np.testing.assert_array_equal(comm.allgatherv(mine, concat=True), np.concatenate(parts))


def test_allgatherv_with_mismatched_trailing_shapes_raises_the_same_error_everywhere(comm):
    width = 3 if comm.rank == 1 else 4
    err = None
    try:
        comm.allgatherv(np.zeros((2, width), np.float32))
    except MismatchError as e:
        err = e
    messages = messages_on_all_ranks(comm, err)
    assert None not in messages and len(set(messages)) == 1, messages
    assert "rank 1 has 'float32 (n, 3)'" in messages[0]


@pytest.mark.parametrize("dtype", DTYPES)
def test_alltoall_sends_row_j_to_rank_j(comm, dtype):
    p = comm.size
    mine = rank_data(comm.rank, dtype, (p, 2))
    got = comm.alltoall(mine)
    expected = np.stack([rank_data(j, dtype, (p, 2))[comm.rank] for j in range(p)])
    assert got.dtype == dtype
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("dtype", DTYPES)
def test_bcast_copies_the_roots_array_in_place(comm, dtype):
    root = comm.size - 1
    x = rank_data(comm.rank, dtype)
    assert comm.bcast(x, root=root) is x
    np.testing.assert_array_equal(x, rank_data(root, dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_reduce_scatter_gives_each_rank_its_chunk_of_the_sum(comm, dtype):
    p, m = comm.size, 3
    got = comm.reduce_scatter(rank_data(comm.rank, dtype, (p * m, 2)))
    total = all_data(p, dtype, (p * m, 2)).sum(0)
    assert got.shape == (m, 2) and got.dtype == dtype
    np.testing.assert_allclose(got, total[comm.rank * m:(comm.rank + 1) * m], **tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_reduce_scatterv_gives_each_rank_its_piece_of_the_sum_pieces_of_any_length(comm, dtype):
    counts = [(3 * r + 1) % 5 for r in range(comm.size)]  # uneven, rank 1 of 4 gets none
    n = sum(counts)
    got = comm.reduce_scatterv(rank_data(comm.rank, dtype, (n,)), counts)
    total = all_data(comm.size, dtype, (n,)).sum(0)
    start = sum(counts[:comm.rank])
    assert got.shape == (counts[comm.rank],) and got.dtype == dtype
    np.testing.assert_allclose(got, total[start:start + counts[comm.rank]], **tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_allgatherv_in_place_fills_every_ranks_piece_of_a_flat_buffer(comm, dtype):
    counts = [(2 * r + 1) % 4 for r in range(comm.size)]  # uneven, and one rank of 4 has none
    starts = np.cumsum([0, *counts])
    everyone = all_data(comm.size, dtype, (int(starts[-1]),))
    buf = np.zeros(int(starts[-1]), dtype)
    mine = slice(starts[comm.rank], starts[comm.rank + 1])
    buf[mine] = everyone[comm.rank][mine]  # rank r holds only its own piece
    assert comm.allgatherv_in_place(buf, counts) is buf
    expected = np.concatenate([everyone[r][starts[r]:starts[r + 1]] for r in range(comm.size)])
    np.testing.assert_array_equal(buf, expected)
    with pytest.raises(ValueError, match=r"allgatherv_in_place: .*counts"):
        comm.allgatherv_in_place(buf, [1] * comm.size)


def test_reduce_scatterv_refuses_counts_that_do_not_cover_the_array(comm):
    x = np.ones(4 * comm.size, np.float32)
    with pytest.raises(ValueError, match=r"reduce_scatterv: .*counts \[1"):
        comm.reduce_scatterv(x, [1] * comm.size)
    with pytest.raises(ValueError, match="overlaps"):
        comm.reduce_scatterv(x, [4] * comm.size, out=x[:4])


@pytest.mark.parametrize("dtype", DTYPES)
def test_ring_of_point_to_point_messages(comm, dtype):
    right, left = (comm.rank + 1) % comm.size, (comm.rank - 1) % comm.size
    req = comm.isend(rank_data(comm.rank, dtype), dest=right, tag=11)
    got = comm.recv(np.empty(SHAPE, dtype), source=left, tag=11)
    req.wait()
    np.testing.assert_array_equal(got, rank_data(left, dtype))

    req = comm.irecv(np.empty(SHAPE, dtype), source=right, tag=12)
    comm.send(rank_data(comm.rank, dtype), dest=left, tag=12)
    np.testing.assert_array_equal(req.wait(), rank_data(right, dtype))


def test_messages_are_matched_by_tag_not_order(comm):
    if comm.rank == 0:
        comm.send(np.full(2, 1.0), dest=1, tag=1)
        comm.send(np.full(2, 2.0), dest=1, tag=2)
    elif comm.rank == 1:
        second = comm.irecv(np.empty(2), source=0, tag=2)
        first = comm.recv(np.empty(2), source=0, tag=1)
        np.testing.assert_array_equal(first, [1.0, 1.0])
        np.testing.assert_array_equal(second.wait(), [2.0, 2.0])
    comm.barrier()


def test_split_into_even_and_odd_ranks(comm):
    color = comm.rank % 2
    # key = -rank reverses the order inside each sub-communicator.
    sub = comm.split(color, key=-comm.rank)
    try:
        members = [r for r in range(comm.size) if r % 2 == color]
        assert sub.size == len(members)
        assert sub.rank == members[::-1].index(comm.rank)
        got = sub.allreduce(rank_data(comm.rank, np.float64))
        np.testing.assert_allclose(got, sum(rank_data(r, np.float64) for r in members),
                                   **tol(np.float64))
        assert sub.allgather(np.array([comm.rank]))[:, 0].tolist() == members[::-1]
    finally:
        sub.free()


def test_agree_passes_when_all_ranks_agree(comm):
    comm.agree("linear.weight float32 (4, 3)", what="model fingerprint")


def test_agree_raises_the_same_error_on_every_rank_naming_the_odd_one(comm):
    value = "float32 (4, 3)" if comm.rank != 1 else "float32 (4, 4)"
    err = None
    try:
        comm.agree(value, what="model fingerprint")
    except MismatchError as e:
        err = e
    messages = messages_on_all_ranks(comm, err)
    assert None not in messages and len(set(messages)) == 1, messages
    others = ", ".join(str(r) for r in range(comm.size) if r != 1)
    who = f"rank {others} has" if comm.size == 2 else f"ranks {others} have"
    assert messages[0] == (f"the {comm.size} ranks disagree on model fingerprint: "
                           f"{who} 'float32 (4, 3)'; rank 1 has 'float32 (4, 4)'")


def test_checked_allreduce_of_mismatched_shapes_raises_on_every_rank(comm):
    checked = Communicator(comm.mpi, check=True)
    x = np.ones(4 if comm.rank == 0 else 5, np.float32)
    err = None
    try:
        checked.allreduce(x)
    except MismatchError as e:
        err = e
    messages = messages_on_all_ranks(comm, err)
    assert None not in messages and len(set(messages)) == 1, messages
    assert "disagree on allreduce arguments: rank 0 has 'op=sum float32 (4,)'" in messages[0]


def test_bench_collectives_runs_under_mpi(comm, shared_tmp_path, capsys):
    from distad.bench.collectives import bus_factor, main

    path = shared_tmp_path / "out.json"
    assert main(["--sizes", "4,64K", "--repeats", "3", "--json", str(path)]) == 0
    comm.barrier()
    printed = capsys.readouterr().out
    rows = json.loads(path.read_text())["rows"]
    assert [(r["op"], r["bytes"]) for r in rows][:2] == [("allreduce", 4), ("allreduce", 65536)]
    for r in rows:
        assert r["time_s"] > 0
        assert r["busbw_gbs"] == pytest.approx(r["algbw_gbs"] * bus_factor(r["op"], comm.size))
    assert ("| allgather |" in printed) == (comm.rank == 0)
