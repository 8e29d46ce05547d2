"""Memory: what a rank feeds back into the next step's compression (none, EF, DGC momentum).

A memory sits between the gradient and the compressor of one bucket:
``c = memory.compensate(bucket, g)`` is what gets compressed, and after the aggregation
``memory.update(bucket, c, sent)`` stores what was left behind, where ``sent`` is what this
rank's own payload decompresses to. State is per bucket id and belongs to the run: it goes
into checkpoints through ``state_dict()`` (numpy arrays only) and back through
``load_state_dict``. The memories work in place: ``compensate`` returns the bucket's state
array turned into the compensated gradient and ``update`` turns it back, so a step allocates
nothing (a fresh array of a 64 MB bucket costs about 13 ms of page faults). Between the two
calls the state array holds c, not the residual.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import numpy as np

from .base import Sent, SparseVector

BucketId = int | str


def _checked_state(state: dict[str, np.ndarray], key: str, like: np.ndarray, op: str) -> np.ndarray:
    """The state array for ``key``, zero-initialised on first use, shape-checked afterwards."""
    if not isinstance(like, np.ndarray) or like.dtype != np.float32 or like.ndim != 1:
        what = f"{like.dtype} {like.shape}" if isinstance(like, np.ndarray) else type(like).__name__
        raise ValueError(f"{op}: bucket {key!r} needs a 1-D float32 gradient, got {what}")
    if key not in state:
        state[key] = np.zeros_like(like)
    elif state[key].shape != like.shape:
        raise ValueError(
            f"{op}: bucket {key!r} has state of shape {state[key].shape}, got a gradient of "
            f"shape {like.shape}"
        )
    return state[key]


def _subtract_into(
    state: dict[str, np.ndarray], key: str, compensated: np.ndarray, sent: Sent
) -> None:
    """``state[key] = compensated - sent``; in place when ``compensated`` is the state array
    itself, as ``compensate`` left it, and ``sent`` is a compact contribution."""
    target = state.get(key)
    if target is None or target.shape != compensated.shape:
        target = state[key] = np.empty_like(compensated)
    if isinstance(sent, np.ndarray):
        np.subtract(compensated, sent, out=target)
    else:
        if target is not compensated:
            np.copyto(target, compensated)
        sent.subtract_from(target)


class Memory(ABC):
    """Per-bucket feedback between steps; subclasses hold their state as float32 arrays."""

    name: ClassVar[str] = ""
    #: Whether ``update`` needs ``sent`` (the aggregation computes it only on request).
    needs_sent: ClassVar[bool] = True

    @property
    def spec(self) -> str:
        """The spec suffix that ``distad.compress.get`` parses back into this memory."""
        return f"+{self.name}" if self.name else ""

    @abstractmethod
    def compensate(self, bucket: BucketId, grad: np.ndarray) -> np.ndarray:
        """The float32 vector (shape of ``grad``) to compress in place of the gradient."""

    @abstractmethod
    def update(self, bucket: BucketId, compensated: np.ndarray, sent: Sent | None) -> None:
        """Record what the compression of ``compensated`` left behind (``sent`` was sent)."""

    @abstractmethod
    def state_dict(self) -> dict[str, np.ndarray]:
        """The run state as ``{name: array}`` (copies; keys carry the bucket id)."""

    @abstractmethod
    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        """Replace the run state by one from ``state_dict`` (of this kind of memory)."""


class NoMemory(Memory):
    """No feedback: the gradient is compressed as it is, nothing is kept."""

    needs_sent: ClassVar[bool] = False

    def compensate(self, bucket: BucketId, grad: np.ndarray) -> np.ndarray:
        return grad

    def update(self, bucket: BucketId, compensated: np.ndarray, sent: Sent | None) -> None:
        return None

    def state_dict(self) -> dict[str, np.ndarray]:
        return {}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        if state:
            raise ValueError(
                f"NoMemory.load_state_dict: expected no state, got keys {sorted(state)}"
            )


def _load_prefixed(
    state: dict[str, np.ndarray], prefixes: tuple[str, ...], op: str
) -> tuple[dict[str, np.ndarray], ...]:
    """Split ``{prefix.bucket: array}`` into one float32 dict per prefix; reject other keys."""
    out: tuple[dict[str, np.ndarray], ...] = tuple({} for _ in prefixes)
    for key, value in state.items():
        head, _, bucket = key.partition(".")
        if head not in prefixes or not bucket:
            raise ValueError(
                f"{op}: unexpected key {key!r}; expected {'/'.join(prefixes)}.<bucket>"
            )
        array = np.asarray(value)
        if array.dtype != np.float32 or array.ndim != 1:
            raise ValueError(
                f"{op}: {key!r} must be a 1-D float32 array, got {array.dtype} {array.shape}"
            )
        out[prefixes.index(head)][bucket] = array.copy()
    return out


class ErrorFeedback(Memory):
    """``+ef``: error feedback (Seide et al. 2014; Karimireddy et al. 2019).

    Keeps a residual e per bucket: compress g + e, then e = (g + e) - sent. Over T steps the
    residuals telescope: sum(sent) + e_T = sum(g). State keys: ``residual.<bucket>``.
    """

    name: ClassVar[str] = "ef"

    def __init__(self) -> None:
        self.residual: dict[str, np.ndarray] = {}

    def compensate(self, bucket: BucketId, grad: np.ndarray) -> np.ndarray:
        e = _checked_state(self.residual, str(bucket), grad, "ErrorFeedback.compensate")
        e += grad  # the residual's array now holds g + e
        return e

    def update(self, bucket: BucketId, compensated: np.ndarray, sent: Sent | None) -> None:
        if sent is None:
            raise ValueError("ErrorFeedback.update: needs what was sent")
        _subtract_into(self.residual, str(bucket), compensated, sent)

    def state_dict(self) -> dict[str, np.ndarray]:
        return {f"residual.{k}": v.copy() for k, v in self.residual.items()}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        (self.residual,) = _load_prefixed(state, ("residual",), "ErrorFeedback.load_state_dict")


class DGCMomentum(Memory):
    """``+dgc`` / ``+dgc:m``: DGC momentum correction with momentum factor masking.

    Lin et al. 2018: the momentum is accumulated locally before sparsification,
    u = m u + g; v = v + u; v is compressed; then v = v - sent and u is zeroed wherever
    something was sent (momentum factor masking). The optimizer should then run without
    momentum of its own. Meant for sparsifiers (topk, randk, threshold); m = 0.9 by default.
    State keys: ``momentum.<bucket>`` and ``velocity.<bucket>``.
    """

    name: ClassVar[str] = "dgc"

    def __init__(self, momentum: float = 0.9) -> None:
        if not 0 <= momentum < 1:
            raise ValueError(f"dgc: momentum must be in [0, 1), got {momentum!r}")
        self.momentum = float(momentum)
        self.u: dict[str, np.ndarray] = {}
        self.v: dict[str, np.ndarray] = {}

    @property
    def spec(self) -> str:
        return "+dgc" if self.momentum == 0.9 else f"+dgc:{self.momentum:g}"

    def compensate(self, bucket: BucketId, grad: np.ndarray) -> np.ndarray:
        key = str(bucket)
        u = _checked_state(self.u, key, grad, "DGCMomentum.compensate")
        v = _checked_state(self.v, key, grad, "DGCMomentum.compensate")
        u *= np.float32(self.momentum)
        u += grad
        v += u  # the velocity's array now holds v + u
        return v

    def update(self, bucket: BucketId, compensated: np.ndarray, sent: Sent | None) -> None:
        if sent is None:
            raise ValueError("DGCMomentum.update: needs what was sent")
        key = str(bucket)
        _subtract_into(self.v, key, compensated, sent)
        if isinstance(sent, SparseVector):
            self.u[key][sent.indices[sent.values != 0]] = 0
        else:
            self.u[key][np.asarray(sent) != 0] = 0

    def state_dict(self) -> dict[str, np.ndarray]:
        return {
            **{f"momentum.{k}": v.copy() for k, v in self.u.items()},
            **{f"velocity.{k}": v.copy() for k, v in self.v.items()},
        }

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        self.u, self.v = _load_prefixed(
            state, ("momentum", "velocity"), "DGCMomentum.load_state_dict"
        )
        if self.u.keys() != self.v.keys():
            raise ValueError("DGCMomentum.load_state_dict: momentum and velocity buckets differ")
