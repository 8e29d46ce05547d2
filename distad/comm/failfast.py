"""Fail fast: an uncaught exception on one rank aborts the whole MPI job.

Without this, a rank that raises leaves the others blocked in their next
collective, and itself blocks in MPI_Finalize at interpreter exit: measured
here, `mpiexec -n 2` where rank 1 raises while rank 0 waits in a Barrier hangs
until killed, even when rank 1 raises before initialising MPI. With `install()`
(or inside `abort_on_exception()`), the failing rank prints its traceback with
every line prefixed `[rank R/P] `, flushes, and calls MPI_Abort on
COMM_WORLD, so the launcher tears the job down with a non-zero exit code.

In a single process (size 1) nothing changes: the normal traceback, the
normal exit code. This module does not import mpi4py.MPI itself unless an
exception arrives in a job that a launcher started with more than one rank.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from types import TracebackType

# Environment variables through which launchers announce the job size
# (MPICH/Intel MPI hydra and PMI-2, Open MPI, MVAPICH, srun inside a step).
_LAUNCHER_SIZE_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE",
                       "SLURM_STEP_NUM_TASKS")

# Seconds between printing the traceback and MPI_Abort, so the launcher can forward it.
_FORWARD_GRACE_S = 0.25

_previous_excepthook = None
_previous_threading_excepthook = None


def install() -> None:
    """Make uncaught exceptions (main thread and other threads) abort the MPI job.

    Sets `sys.excepthook` and `threading.excepthook`. Idempotent: a second call
    changes nothing. In a size-1 run the previous hooks still print the
    traceback as usual.
    """
    global _previous_excepthook, _previous_threading_excepthook
    if sys.excepthook is not _excepthook:
        _previous_excepthook = sys.excepthook
        sys.excepthook = _excepthook
    if threading.excepthook is not _threading_excepthook:
        _previous_threading_excepthook = threading.excepthook
        threading.excepthook = _threading_excepthook


def uninstall() -> None:
    """Restore the hooks that install() replaced (a no-op if it was not installed)."""
    global _previous_excepthook, _previous_threading_excepthook
    if sys.excepthook is _excepthook:
        sys.excepthook = _previous_excepthook or sys.__excepthook__
    if threading.excepthook is _threading_excepthook:
        threading.excepthook = _previous_threading_excepthook or threading.__excepthook__
    _previous_excepthook = _previous_threading_excepthook = None


def installed() -> bool:
    """Whether install() is in effect for the main thread's exceptions."""
    return sys.excepthook is _excepthook


@contextlib.contextmanager
def abort_on_exception() -> Iterator[None]:
    """Context manager (and decorator) that aborts the MPI job on an exception inside it.

    For scripts that prefer a scoped guard to a global hook:
    `with abort_on_exception(): train()` or `@abort_on_exception()` on `main`.
    Also catches KeyboardInterrupt and `sys.exit(n)` with n != 0 (one rank
    exiting early blocks the rest just the same); the abort uses exit code n.
    In a size-1 run the exception propagates unchanged.
    """
    try:
        yield
    except SystemExit as exc:
        if exc.code in (None, 0):
            raise
        code = exc.code if isinstance(exc.code, int) else 1
        _abort_job(type(exc), exc, exc.__traceback__, code=code)
        raise
    except BaseException as exc:
        _abort_job(type(exc), exc, exc.__traceback__)
        raise


def _excepthook(exc_type: type[BaseException], exc: BaseException,
                tb: TracebackType | None) -> None:
    _abort_job(exc_type, exc, tb)
    (_previous_excepthook or sys.__excepthook__)(exc_type, exc, tb)


def _threading_excepthook(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is not SystemExit:  # threading ignores SystemExit too
        name = args.thread.name if args.thread is not None else "<unknown>"
        _abort_job(args.exc_type, args.exc_value, args.exc_traceback,
                   header=f"Exception in thread {name}:\n")
    (_previous_threading_excepthook or threading.__excepthook__)(args)


def _abort_job(exc_type: type[BaseException], exc: BaseException | None,
               tb: TracebackType | None, code: int = 1, header: str = "") -> None:
    """Print the traceback tagged with the rank and abort the job; return only if size is 1."""
    try:
        world = _world_comm()
    except Exception:  # a broken MPI must not hide the original exception
        return
    if world is None:
        return
    rank, size = world.Get_rank(), world.Get_size()
    if size <= 1:
        return
    lines = (header + "".join(traceback.format_exception(exc_type, exc, tb))).splitlines()
    text = "".join(f"[rank {rank}/{size}] {line}\n" for line in lines)
    try:
        sys.stdout.flush()
        sys.stderr.write(text)  # one write, so ranks' tracebacks do not interleave by line
        sys.stderr.flush()
        # The launcher forwards our stderr asynchronously and discards what it has
        # not read when the abort tears the job down (seen here about 1 run in 15
        # without this pause): give it a moment before pulling the plug.
        time.sleep(_FORWARD_GRACE_S)
    finally:
        try:
            world.Abort(code)
        finally:
            # MPICH's MPI_Abort returns once it has told the launcher; never run on
            # (no second traceback from the previous hook, no more work) until killed.
            os._exit(code)


def _world_comm():  # -> MPI.Comm | None; untyped so that mpi4py.MPI stays unimported
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is None:
        # The exception came before MPI was initialised. If a launcher started
        # several ranks, the others may already wait in a collective, so we
        # initialise MPI just to be able to abort them.
        if _launcher_size() <= 1:
            return None
        from mpi4py import MPI as mpi
    if not mpi.Is_initialized() or mpi.Is_finalized():
        return None
    return mpi.COMM_WORLD


def _launcher_size() -> int:
    for var in _LAUNCHER_SIZE_VARS:
        with contextlib.suppress(KeyError, ValueError):
            return int(os.environ[var])
    return 1
