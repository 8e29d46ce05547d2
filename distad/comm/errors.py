"""Exceptions raised by distad's communication layer."""

from __future__ import annotations


class CommError(RuntimeError):
    """An MPI call failed; the message names the operation, the arrays and the rank."""


class MismatchError(ValueError):
    """Ranks disagree on something they must share (a shape, a dtype, a fingerprint).

    Raised with the same message on every rank of the communicator, so that all
    of them stop at the same point instead of some blocking in a collective.
    """
