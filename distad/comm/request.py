"""Handles for non-blocking operations (Iallreduce, Isend, Irecv)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
from mpi4py import MPI


class Request:
    """A pending non-blocking MPI operation and the arrays it reads or fills.

    `wait()` blocks until the operation is complete and returns its result array
    (the reduced buffer of an iallreduce, the filled buffer of an irecv; None for
    an isend). `test()` returns whether it has completed, without blocking; with
    MPICH, calling it is also what drives a pending collective forward, since the
    library makes no progress unless something calls into MPI. The request keeps
    its buffers alive until completion: numpy must not free or reuse memory that
    MPI is still reading or writing.
    """

    __slots__ = ("_request", "_result", "_keepalive", "_on_complete", "_done")

    def __init__(
        self,
        request: MPI.Request,
        result: np.ndarray | None,
        keepalive: tuple[Any, ...] = (),
        on_complete: Callable[[MPI.Status], None] | None = None,
    ) -> None:
        self._request = request
        self._result = result
        self._keepalive = keepalive
        self._on_complete = on_complete
        self._done = False

    @property
    def done(self) -> bool:
        """Whether wait() or a successful test() has already completed this request."""
        return self._done

    def wait(self) -> np.ndarray | None:
        """Block until complete; return the result array (None for a send)."""
        if not self._done:
            # A Status costs an allocation; only irecv's size check needs one.
            status = MPI.Status() if self._on_complete is not None else None
            self._request.Wait(status)
            self._complete(status)
        return self._result

    def test(self) -> bool:
        """Return True if the operation has completed (never blocks)."""
        if not self._done:
            status = MPI.Status() if self._on_complete is not None else None
            if not self._request.Test(status):
                return False
            self._complete(status)
        return True

    def _complete(self, status: MPI.Status | None) -> None:
        self._done = True
        self._keepalive = ()
        if self._on_complete is not None:
            check, self._on_complete = self._on_complete, None
            check(status)


def wait_all(requests: Iterable[Request]) -> list[np.ndarray | None]:
    """Wait for every request (in one MPI_Waitall) and return their results in order."""
    requests = list(requests)
    pending = [r for r in requests if not r.done]
    if pending:
        statuses = [MPI.Status() for _ in pending]
        MPI.Request.Waitall([r._request for r in pending], statuses)
        for r, status in zip(pending, statuses, strict=True):
            r._complete(status)
    return [r._result for r in requests]
