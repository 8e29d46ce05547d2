"""The compressor protocol: a payload of wire arrays, and the capabilities a compressor declares.

A compressor maps one fused gradient bucket (a flat, C-contiguous float32 array of n elements)
to a :class:`Payload` and back. It is stateless apart from the ``np.random.Generator`` passed to
``compress`` and knows nothing of MPI: the aggregation strategies in ``aggregate.py`` read the
capabilities declared here to decide which collective can carry a payload.
"""

from __future__ import annotations

import sys
import threading
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import numpy as np

from distad._blocked import zero_fill

#: One wire array of a payload, as (dtype, number of elements).
ArraySpec = tuple[np.dtype, int]


@dataclass(frozen=True)
class Payload:
    """What a compressor produces for one bucket: the wire arrays, plus shared metadata.

    ``arrays`` is the exact tuple of 1-D numpy arrays that goes on the wire, in the order of the
    compressor's ``wire_layout``; ``nbytes`` is the sum of their ``nbytes``. ``meta`` holds what
    decompression needs but is not sent because every rank already has it: a scale agreed by an
    Allreduce MAX (``"scale"``), or the indices drawn from a seed all ranks share
    (``"indices"``). A receiver rebuilds another rank's payload from the bytes plus its own
    ``meta`` (see :meth:`Compressor.unpack`). The arrays may share memory with the input.
    """

    arrays: tuple[np.ndarray, ...]
    meta: Mapping[str, Any] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        """Exact bytes of the wire arrays."""
        return sum(int(a.nbytes) for a in self.arrays)

    def to_bytes(self) -> np.ndarray:
        """The wire arrays as one uint8 buffer of ``nbytes`` (a view when there is one array)."""
        views = [np.ascontiguousarray(a).reshape(-1).view(np.uint8) for a in self.arrays]
        if len(views) == 1:
            return views[0]
        if not views:
            return np.empty(0, np.uint8)
        return np.concatenate(views)


@dataclass(frozen=True)
class SparseVector:
    """A float32 vector of ``n`` elements, zero outside ``indices`` (distinct) where it holds
    ``values``: what a sparsifier's payload decompresses to, without the dense array.

    Error feedback subtracts it from the compensated gradient in place (``subtract_from``),
    which touches k elements instead of writing and reading two dense arrays of n.
    ``np.asarray`` gives the dense vector.
    """

    indices: np.ndarray
    values: np.ndarray
    n: int

    def subtract_from(self, out: np.ndarray) -> None:
        """``out -= self`` in place (float32, (n,))."""
        out[self.indices] -= self.values

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        dense = scatter(self.values, self.indices, self.n)
        return dense if dtype is None else dense.astype(dtype, copy=False)


class Contribution(Protocol):
    """What a rank's own payload decompresses to, kept in a compact form (``SparseVector``,
    PowerSGD's ``LowRankVector``): error feedback only ever subtracts it."""

    n: int

    def subtract_from(self, out: np.ndarray) -> None:
        """``out -= self`` in place (float32, (n,))."""

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        """The dense float32 vector (n,)."""


#: What a rank's own payload decompresses to (``Aggregated.sent``): dense, or compact.
Sent = np.ndarray | Contribution


class Compressor(ABC):
    """Encodes a flat float32 bucket into a :class:`Payload` and decodes it again.

    Subclasses set ``name`` and the capability flags below and implement ``wire_layout``,
    ``compress`` and ``decompress``. ``compress(x, rng, meta)`` takes a 1-D float32 array of n
    elements; ``decompress(payload, n)`` returns a new (or the payload's own) float32 array of
    shape (n,), and ``decompress(payload, n, out=buf)`` writes it into ``buf`` (float32, (n,),
    C-contiguous) and returns ``buf``, which is what a training step that reuses its buffers
    wants (a fresh 64 MB array costs about 13 ms of page faults on the reference machine).
    Payload arrays and scratch space come from a per-instance :class:`ArrayCache`, so a payload
    may reuse the memory of an earlier payload that nothing refers to any more. Wire arrays with
    the widest dtype come first, so that unpacking a received byte buffer gives aligned views.

    Capabilities (class attributes, some overridden per instance by options):

    - ``summable``: payloads of different ranks can be added elementwise by MPI's built-in SUM,
      after widening each wire array to ``sum_dtypes(count)``, and ``decompress`` of the sum is
      the sum of the decompressions. Needs every rank to compress under the same ``meta``.
    - ``divide_before_sum``: for low-precision float payloads, the allreduce compresses ``x / p``
      so the low-precision sum cannot overflow.
    - ``needs_shared_scale``: ``local_scale(x)`` gives a float32 the ranks reduce with MAX before
      compressing; ``compress(x, rng, {"scale": s})`` then quantizes under that shared scale.
    - ``needs_shared_seed``: ``rng`` must be in the same state on every rank (the indices, or
      PowerSGD's initial Q, are drawn from it and never sent). Given ``meta`` from an earlier
      payload, such a compressor reuses it and draws nothing.
    - ``unbiased``: E[decompress(compress(x))] == x over the rng.
    - ``fixed_size``: ``wire_bytes(n)`` is exact for every input; otherwise (threshold) it is
      the nominal size and the payload's own ``nbytes`` is the exact count.
    - ``sparse``: sends a subset of the coordinates (what DGC momentum masking needs).
    - ``majority_vote``: the payload is exactly one array, ``np.packbits(x >= 0)``.
    - ``multi_round``: needs a multi-round aggregation (PowerSGD), not a single collective.
    - ``preferred_aggregation``: the strategy ``get(spec)`` uses unless the spec names one
      ("auto" lets ``aggregate.choose_aggregation`` pick by cost).
    """

    name: ClassVar[str] = ""
    summable: ClassVar[bool] = False
    divide_before_sum: ClassVar[bool] = False
    needs_shared_scale: ClassVar[bool] = False
    needs_shared_seed: ClassVar[bool] = False
    unbiased: bool = False
    fixed_size: ClassVar[bool] = True
    sparse: ClassVar[bool] = False
    majority_vote: ClassVar[bool] = False
    multi_round: ClassVar[bool] = False
    preferred_aggregation: ClassVar[str] = "auto"

    @property
    def spec(self) -> str:
        """The spec string that ``distad.compress.get`` parses back into this compressor."""
        return self.name

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec!r})"

    @abstractmethod
    def wire_layout(self, n: int) -> tuple[ArraySpec, ...]:
        """The (dtype, element count) of each wire array for an input of n elements."""

    def wire_bytes(self, n: int) -> int:
        """Exact bytes on the wire for an input of n elements (nominal if not ``fixed_size``)."""
        return sum(np.dtype(dt).itemsize * count for dt, count in self.wire_layout(n))

    @abstractmethod
    def compress(
        self,
        x: np.ndarray,
        rng: np.random.Generator | None = None,
        meta: Mapping[str, Any] | None = None,
    ) -> Payload:
        """Encode a 1-D float32 bucket; ``meta`` holds values shared by all ranks, if any."""

    @abstractmethod
    def decompress(self, payload: Payload, n: int, out: np.ndarray | None = None) -> np.ndarray:
        """Decode a payload (or an elementwise sum of payloads) into a float32 array (n,).

        With ``out`` (float32, (n,), C-contiguous, not sharing memory with the payload unless it
        is the payload's own float32 array) the result is written there and ``out`` returned.
        """

    def contribution(self, payload: Payload, n: int) -> Sent:
        """What this rank's payload decompresses to, for error feedback: a new float32 array
        (n,), or a compact :class:`Contribution` (sparsifiers: a :class:`SparseVector`), which
        spares writing and reading a dense one."""
        return self.decompress(payload, n)

    def accumulate(self, payload: Payload, out: np.ndarray) -> None:
        """Add the decompressed payload into ``out`` (float32, (n,)); sparse ones override."""
        out += self.decompress(payload, out.size, out=self.scratch("accumulate", out.size, _F32))

    def scratch(self, tag: str, size: int, dtype: Any) -> np.ndarray:
        """An uninitialised 1-D array from this compressor's :class:`ArrayCache`."""
        cache = self.__dict__.get("_arrays")
        if cache is None:
            cache = self.__dict__["_arrays"] = ArrayCache()
        return cache.get(tag, size, dtype)

    def sum_dtypes(self, count: int) -> tuple[np.dtype, ...]:
        """Dtypes in which each wire array is summed across ``count`` ranks (summable only)."""
        raise TypeError(f"{self.spec}: payloads are not summable")

    def local_scale(self, x: np.ndarray) -> np.float32:
        """This rank's candidate for the shared scale (``needs_shared_scale`` only)."""
        raise TypeError(f"{self.spec}: has no shared scale")

    def unpack(self, buf: np.ndarray, n: int, meta: Mapping[str, Any]) -> Payload:
        """Rebuild a payload from its wire bytes (uint8) and the shared ``meta``."""
        return Payload(split_bytes(buf, self.wire_layout(n), f"{self.spec}.unpack"), meta)


_F32 = np.dtype(np.float32)


def _refcount_when_unshared() -> int:
    """sys.getrefcount of an array held by one local variable only (interpreter dependent)."""
    a = np.empty(0)
    return sys.getrefcount(a)


_UNSHARED = _refcount_when_unshared()


class ArrayCache:
    """Arrays reused from call to call, so that steady-state encoding touches mapped memory.

    ``get(tag, size, dtype)`` returns an uninitialised 1-D array: the one it returned last time
    for the same key, unless something besides the cache still refers to that one (a payload the
    caller kept, or any view of it: sys.getrefcount tells), in which case a new one. A caller
    that keeps p payloads at once (the two-phase exchange) therefore gets p distinct arrays, and
    one that drops each payload before the next call reuses the same memory. Per thread; at most
    ``limit`` arrays per thread, the least recently used dropped first.
    """

    def __init__(self, limit: int = 64) -> None:
        self.limit = limit
        self._local = threading.local()

    def get(self, tag: str, size: int, dtype: Any) -> np.ndarray:
        entries = getattr(self._local, "entries", None)
        if entries is None:
            entries = self._local.entries = OrderedDict()
        key = (tag, int(size), np.dtype(dtype))
        a = entries.pop(key, None)
        if a is None or sys.getrefcount(a) > _UNSHARED:
            a = np.empty(size, dtype)
        entries[key] = a
        while len(entries) > self.limit:
            entries.popitem(last=False)
        return a

    def __getstate__(self) -> dict[str, Any]:  # copies and pickles start empty
        return {"limit": self.limit}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["limit"])


def output_array(out: np.ndarray | None, n: int, op: str) -> np.ndarray:
    """``out`` checked to be a writeable C-contiguous float32 array of shape (n,), or a new one."""
    if out is None:
        return np.empty(n, np.float32)
    if (
        not isinstance(out, np.ndarray)
        or out.dtype != np.float32
        or out.shape != (n,)
        or not out.flags.c_contiguous
        or not out.flags.writeable
    ):
        what = f"{out.dtype} array of shape {out.shape}" if isinstance(out, np.ndarray) else out
        raise ValueError(f"{op}: out must be a writeable contiguous float32 ({n},), got {what}")
    return out


def scatter(values: np.ndarray, indices: np.ndarray, n: int, out=None) -> np.ndarray:
    """Dense float32 (n,) with ``values`` at ``indices`` and zeros elsewhere (into ``out``)."""
    out = zero_fill(output_array(out, n, "scatter"))
    out[indices] = values
    return out


def check_bucket(x: np.ndarray, op: str) -> np.ndarray:
    """Return x as a C-contiguous 1-D float32 array with at least one element, or raise.

    A bucket of another dtype is an error, not a silent cast: float32 stays float32.
    """
    if not isinstance(x, np.ndarray) or x.dtype != np.float32 or x.ndim != 1 or x.size == 0:
        what = (
            f"{x.dtype} array of shape {x.shape}" if isinstance(x, np.ndarray) else type(x).__name__
        )
        raise ValueError(f"{op}: expected a non-empty 1-D float32 array, got {what}")
    return np.ascontiguousarray(x)


def check_payload(payload: Payload, layout: tuple[ArraySpec, ...], op: str) -> None:
    """Raise if the payload's arrays do not have the element counts of ``layout``.

    Dtypes are not checked: a summed payload holds the widened dtype of ``sum_dtypes``.
    """
    got = tuple(a.size for a in payload.arrays)
    want = tuple(count for _, count in layout)
    if got != want:
        raise ValueError(f"{op}: payload arrays have sizes {got}, expected {want}")


def split_bytes(buf: np.ndarray, layout: tuple[ArraySpec, ...], op: str) -> tuple[np.ndarray, ...]:
    """Split a uint8 buffer into views of the dtypes and counts of ``layout``."""
    want = sum(np.dtype(dt).itemsize * count for dt, count in layout)
    if buf.nbytes != want:
        raise ValueError(f"{op}: got {buf.nbytes} bytes, layout {layout} needs {want}")
    arrays, offset = [], 0
    for dt, count in layout:
        arrays.append(np.frombuffer(buf, dtype=dt, count=count, offset=offset))
        offset += np.dtype(dt).itemsize * count
    return tuple(arrays)


def need_rng(rng: np.random.Generator | None, op: str) -> np.random.Generator:
    """Return rng, or raise if a stochastic compressor was given none."""
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"{op}: needs an np.random.Generator, got {type(rng).__name__}")
    return rng


def count_for_ratio(ratio: float, n: int) -> int:
    """k = max(1, round(ratio * n)), capped at n: how many elements a sparsifier keeps."""
    return min(n, max(1, round(ratio * n)))
