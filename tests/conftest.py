"""Shared pytest fixtures for MPI tests.

MPI tests are marked `@pytest.mark.mpi(min_size=N)` (pytest-mpi) and run as
`mpiexec -n P python -m pytest --with-mpi -m mpi tests`; without --with-mpi
they are skipped. Tests that launch their own jobs use the `mpiexec` and
`launch_env` fixtures with subprocess.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

# Variables through which a launcher talks to its ranks; a job started from a
# test must not inherit them (or it would join the test runner's own job).
_LAUNCHER_PREFIXES = ("PMI_", "PMIX_", "HYDRA_", "MPI_LOCAL", "OMPI_", "MV2_")


@pytest.fixture(scope="session")
def mpiexec() -> Path:
    """The venv's mpiexec (MPICH from PyPI), else the one on PATH; skips if neither exists."""
    candidate = Path(sys.executable).parent / "mpiexec"
    if candidate.exists():
        return candidate
    found = shutil.which("mpiexec")
    if found is None:
        pytest.skip("no mpiexec: install distad[mpich] or an MPI library")
    return Path(found)


@pytest.fixture(scope="session")
def launch_env() -> dict[str, str]:
    """os.environ without launcher variables, with single-threaded BLAS, for subprocess jobs."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(_LAUNCHER_PREFIXES)}
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("OPENBLAS_NUM_THREADS", "1")
    return env


@pytest.fixture
def comm():
    """A distad Communicator over COMM_WORLD (for tests marked mpi)."""
    from distad.comm import Communicator

    return Communicator()


@pytest.fixture
def shared_tmp_path(comm) -> Iterator[Path]:
    """One temporary directory for all ranks (for tests marked mpi), removed afterwards.

    pytest's tmp_path differs per rank, and its cleanup of old directories races
    when several ranks start it at once; this one is made by rank 0 and broadcast.
    """
    path = tempfile.mkdtemp(prefix="distad-test-") if comm.rank == 0 else None
    path = comm.mpi.bcast(path, root=0)  # a short string: pickle is fine here
    yield Path(path)
    comm.barrier()
    if comm.rank == 0:
        shutil.rmtree(path, ignore_errors=True)
