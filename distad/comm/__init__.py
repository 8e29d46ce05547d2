"""Communication layer: a numpy-array Communicator over mpi4py, and fail-fast hooks.

`import distad.comm` does not initialise MPI: mpi4py.MPI is imported (and MPI
initialised, as a singleton when there is no launcher) on first use of
Communicator, Request or wait_all. So `distad --help` and code that never
communicates work where MPI is unavailable.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from distad.comm import failfast
from distad.comm.collectives import (  # noqa: F401 (re-exported: ad.comm.allreduce, ...)
    allgather,
    allreduce,
    copy_to_parallel,
    gather_from_parallel,
    recv,
    reduce_from_parallel,
    reduce_scatter,
    scatter_to_parallel,
    send,
    wait_sends,
)
from distad.comm.errors import CommError, MismatchError

if TYPE_CHECKING:
    from distad.comm.communicator import Communicator
    from distad.comm.request import Request, wait_all

__all__ = ["Communicator", "CommError", "MismatchError", "Request", "failfast", "wait_all"]

_LAZY = {
    "Communicator": "distad.comm.communicator",
    "Request": "distad.comm.request",
    "wait_all": "distad.comm.request",
}


def __getattr__(name: str) -> object:
    # PEP 562: defer `from mpi4py import MPI` (which calls MPI_Init) to first use.
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'distad.comm' has no attribute {name!r}")
