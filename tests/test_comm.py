"""Communicator in a single process: every collective gives the one-rank result.

These run without mpiexec. They wrap MPI.COMM_SELF (size 1 however pytest was
launched); the singleton COMM_WORLD path is checked in a fresh interpreter.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from mpi4py import MPI

from distad.comm import CommError, Communicator, wait_all

DTYPES = [np.float32, np.float64]


@pytest.fixture
def solo() -> Communicator:
    return Communicator(MPI.COMM_SELF)


def sample(dtype, shape=(3, 4), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def test_import_does_not_initialise_mpi_and_world_is_a_singleton(launch_env):
    code = (
        "import sys, numpy as np\n"
        "import distad.comm\n"
        "assert 'mpi4py.MPI' not in sys.modules, 'import initialised MPI'\n"
        "comm = distad.comm.Communicator()\n"
        "x = np.arange(5, dtype=np.float32)\n"
        "y = comm.allreduce(x)\n"
        "assert (y == x).all() and y.dtype == np.float32\n"
        "print(comm.rank, comm.size)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, env=launch_env)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["0", "1"]


def test_wraps_the_given_mpi_communicator(solo):
    assert solo.mpi is MPI.COMM_SELF
    assert (solo.rank, solo.size) == (0, 1)
    assert Communicator(solo).mpi is MPI.COMM_SELF


def test_rejects_a_null_communicator():
    with pytest.raises(TypeError, match="intra-communicator"):
        Communicator(MPI.COMM_NULL)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op", ["sum", "max", "min", "prod"])
def test_allreduce_of_one_rank_is_the_input(solo, dtype, op):
    x = sample(dtype)
    y = solo.allreduce(x, op=op)
    assert y is not x and y.dtype == dtype
    np.testing.assert_array_equal(y, x)


@pytest.mark.parametrize("dtype", DTYPES)
def test_allreduce_in_place_returns_the_same_array(solo, dtype):
    x = sample(dtype)
    expected = x.copy()
    assert solo.allreduce(x, out=x) is x
    np.testing.assert_array_equal(x, expected)


def test_allreduce_into_a_given_buffer(solo):
    x, out = sample(np.float32), np.zeros((3, 4), np.float32)
    assert solo.allreduce(x, out=out) is out
    np.testing.assert_array_equal(out, x)


def test_allreduce_packs_a_strided_input(solo):
    x = sample(np.float64, (4, 6))[:, ::2].T
    np.testing.assert_array_equal(solo.allreduce(x), x)


def test_allreduce_errors_name_the_operation_shapes_and_rank(solo):
    x = sample(np.float32)
    with pytest.raises(ValueError, match="allreduce: unknown op 'mean'"):
        solo.allreduce(x, op="mean")
    with pytest.raises(ValueError, match=r"allreduce: output buffer is float64 \(3, 4\), "
                                         r"expected float32 \(3, 4\) on rank 0/1"):
        solo.allreduce(x, out=np.zeros((3, 4)))
    with pytest.raises(ValueError, match="C-contiguous"):
        solo.allreduce(x.T, out=np.zeros((3, 4), np.float32).T)
    with pytest.raises(ValueError, match="partially overlaps"):
        buf = np.zeros(8, np.float32)
        solo.allreduce(buf[:6], out=buf[2:])
    with pytest.raises(TypeError, match="allreduce: dtype object has no MPI datatype"):
        solo.allreduce(np.array([None, 1]))


@pytest.mark.parametrize("dtype", DTYPES)
def test_iallreduce_wait_returns_the_result(solo, dtype):
    x = sample(dtype)
    req = solo.iallreduce(x, op="max")
    y = req.wait()
    assert req.done and req.test()
    assert y.dtype == dtype
    np.testing.assert_array_equal(y, x)
    assert req.wait() is y  # waiting again returns the same array


@pytest.mark.parametrize("dtype", DTYPES)
def test_allgather_stacks_along_a_new_first_axis(solo, dtype):
    x = sample(dtype)
    y = solo.allgather(x)
    assert y.shape == (1, 3, 4) and y.dtype == dtype
    np.testing.assert_array_equal(y[0], x)


@pytest.mark.parametrize("dtype", DTYPES)
def test_allgatherv_returns_a_list_or_the_concatenation(solo, dtype):
    x = sample(dtype, (5, 2))
    parts = solo.allgatherv(x)
    assert len(parts) == 1 and parts[0].dtype == dtype
    np.testing.assert_array_equal(parts[0], x)
    np.testing.assert_array_equal(solo.allgatherv(x, concat=True), x)
    assert solo.allgatherv(x[:0], concat=True).shape == (0, 2)


def test_allgatherv_rejects_a_scalar(solo):
    with pytest.raises(ValueError, match="allgatherv: needs an array with a first axis"):
        solo.allgatherv(np.float32(1.0))


@pytest.mark.parametrize("dtype", DTYPES)
def test_alltoall_of_one_rank_is_the_input(solo, dtype):
    x = sample(dtype, (1, 6))
    np.testing.assert_array_equal(solo.alltoall(x), x)
    with pytest.raises(ValueError, match=r"alltoall: first axis must equal .* size 1, "
                                         r"got float\d+ \(2, 3\)"):
        solo.alltoall(sample(dtype, (2, 3)))


@pytest.mark.parametrize("dtype", DTYPES)
def test_bcast_is_in_place(solo, dtype):
    x = sample(dtype)
    expected = x.copy()
    assert solo.bcast(x) is x
    np.testing.assert_array_equal(x, expected)
    with pytest.raises(ValueError, match="bcast: root 1 out of range for size 1"):
        solo.bcast(x, root=1)
    with pytest.raises(ValueError, match="bcast: .* must be C-contiguous"):
        solo.bcast(x.T)


@pytest.mark.parametrize("dtype", DTYPES)
def test_reduce_scatter_of_one_rank_is_the_input(solo, dtype):
    x = sample(dtype, (6,))
    y = solo.reduce_scatter(x)
    assert y.dtype == dtype
    np.testing.assert_array_equal(y, x)


def test_barrier_and_split(solo):
    solo.barrier()
    sub = solo.split(color=3)
    try:
        assert (sub.rank, sub.size) == (0, 1)
        np.testing.assert_array_equal(sub.allreduce(np.ones(2)), np.ones(2))
    finally:
        sub.free()
    with pytest.raises(ValueError, match="split: color must be >= 0"):
        solo.split(-1)


@pytest.mark.parametrize("dtype", DTYPES)
def test_messages_to_self_are_matched_by_tag(solo, dtype):
    a, b = sample(dtype, (4,), seed=1), sample(dtype, (4,), seed=2)
    sends = [solo.isend(a, dest=0, tag=1), solo.isend(b, dest=0, tag=2)]
    got_b = solo.recv(np.empty(4, dtype), source=0, tag=2)
    got_a = solo.irecv(np.empty(4, dtype), source=0, tag=1).wait()
    assert wait_all(sends) == [None, None]
    np.testing.assert_array_equal(got_a, a)
    np.testing.assert_array_equal(got_b, b)


def test_recv_of_a_message_with_another_size_raises(solo):
    req = solo.isend(np.ones(4, np.float32), dest=0, tag=3)
    with pytest.raises(CommError, match=r"recv: rank 0/1 expected 32 bytes \(float32 \(8,\)\) "
                                        r"from rank 0 tag 3, got 16 bytes"):
        solo.recv(np.empty(8, np.float32), source=0, tag=3)
    req.wait()
    req = solo.isend(np.ones(4, np.float32), dest=0, tag=4)
    with pytest.raises(CommError, match=r"recv on float32 \(2,\) failed on rank 0/1"):
        solo.recv(np.empty(2, np.float32), source=0, tag=4)  # MPI truncation error
    req.wait()


def test_peer_and_tag_are_checked(solo):
    with pytest.raises(ValueError, match="send: peer rank 1 out of range for size 1"):
        solo.send(np.ones(1), dest=1)
    with pytest.raises(ValueError, match="irecv: tag must be >= 0"):
        solo.irecv(np.ones(1), source=0, tag=-1)


def test_agree_passes_for_one_rank(solo):
    solo.agree("float32 (3, 4)", what="fingerprint")
    solo.agree(b"\x00\xff", what="digest")


def test_check_mode_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("DISTAD_CHECK_COLLECTIVES", "1")
    comm = Communicator(MPI.COMM_SELF)
    assert comm.check
    x = sample(np.float32)
    np.testing.assert_array_equal(comm.allreduce(x), x)  # checked, and consistent
    monkeypatch.setenv("DISTAD_CHECK_COLLECTIVES", "0")
    assert not Communicator(MPI.COMM_SELF).check
