"""Sparsifiers: a subset of the coordinates is sent, at full precision.

``topk:ratio`` (the k largest magnitudes), ``randk:ratio[:rescale]`` (k coordinates chosen from
a seed every rank shares, so no indices travel) and ``threshold:density`` (DGC's sampled
threshold). Indices on the wire are int32, sorted ascending; a bucket must have fewer than
2**31 elements.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np

from .base import (
    BLOCK,
    ArraySpec,
    Compressor,
    Payload,
    block_slices,
    check_bucket,
    check_payload,
    count_for_ratio,
    need_rng,
)

_F32 = np.dtype(np.float32)
_I32 = np.dtype(np.int32)
_INDEX_LIMIT = np.iinfo(np.int32).max


def _check_ratio(name: str, ratio: float) -> float:
    if not (isinstance(ratio, (int, float)) and 0 < ratio <= 1):
        raise ValueError(f"{name}: ratio must be in (0, 1], got {ratio!r}")
    return float(ratio)


def _check_index_range(x: np.ndarray, op: str) -> None:
    if x.size > _INDEX_LIMIT:
        raise ValueError(f"{op}: int32 indices address < 2**31 elements, got a bucket of {x.size}")


def indices_above(x: np.ndarray, threshold: np.float32) -> np.ndarray:
    """Sorted int64 indices i with |x[i]| > threshold, from one blocked pass over x."""
    found = []
    a = np.empty(min(x.size, BLOCK), np.float32)
    mask = np.empty(a.size, bool)
    for s in block_slices(x.size):
        ab, mb = a[: s.stop - s.start], mask[: s.stop - s.start]
        np.abs(x[s], out=ab)
        np.greater(ab, threshold, out=mb)
        hits = np.flatnonzero(mb)
        if hits.size:
            found.append(hits + s.start)
    return np.concatenate(found) if found else np.empty(0, np.int64)


def top_magnitudes(x: np.ndarray, k: int) -> np.ndarray:
    """Sorted int64 indices of the k largest |x| (ties at the k-th broken arbitrarily).

    A threshold from a strided sample of 64 Ki magnitudes picks about 2k candidates in one
    blocked pass, and np.argpartition runs on the candidates only. Every element outside the
    candidates is <= the threshold < every candidate, so when there are at least k candidates
    the k largest among them are the k largest overall; otherwise (rare) it partitions all of x.
    """
    n = x.size
    if 8 * k >= n or n <= 4 * BLOCK:
        return np.sort(np.argpartition(np.abs(x), n - k)[n - k :])
    sample = np.abs(x[:: max(1, n // (1 << 16))])
    above = min(sample.size, math.ceil(2 * k * sample.size / n) + 2)
    threshold = np.partition(sample, sample.size - above)[sample.size - above]
    candidates = indices_above(x, threshold)
    if candidates.size < k:
        return np.sort(np.argpartition(np.abs(x), n - k)[n - k :])
    keep = np.argpartition(np.abs(x[candidates]), candidates.size - k)[candidates.size - k :]
    return np.sort(candidates[keep])


def scatter(values: np.ndarray, indices: np.ndarray, n: int) -> np.ndarray:
    """Dense float32 (n,) with ``values`` at ``indices`` and zeros elsewhere."""
    out = np.zeros(n, np.float32)
    out[indices] = values
    return out


class _IndexedValues(Compressor):
    """Shared wire format of top-k and threshold: float32 values, then int32 indices."""

    sparse: ClassVar[bool] = True

    def _count(self, n: int) -> int:
        raise NotImplementedError

    def wire_layout(self, n: int) -> tuple[ArraySpec, ...]:
        k = self._count(n)
        return ((_F32, k), (_I32, k))

    def _payload(self, x: np.ndarray, indices: np.ndarray) -> Payload:
        return Payload((x[indices], indices.astype(np.int32)))

    def decompress(self, payload: Payload, n: int) -> np.ndarray:
        values, indices = self._checked(payload, n)
        return scatter(values, indices, n)

    def accumulate(self, payload: Payload, out: np.ndarray) -> None:
        values, indices = self._checked(payload, out.size)
        out[indices] += values  # indices of one payload are distinct

    def _checked(self, payload: Payload, n: int) -> tuple[np.ndarray, np.ndarray]:
        check_payload(payload, self.wire_layout(n), f"{self.spec}.decompress")
        return payload.arrays[0], payload.arrays[1]


class TopK(_IndexedValues):
    """``topk:ratio``: the k = max(1, round(ratio n)) largest magnitudes (Aji & Heafield 2017).

    Wire: k float32 values then their k int32 indices, sorted (8k bytes). Deterministic and
    biased; pair it with error feedback (``topk:0.01+ef``).
    """

    name: ClassVar[str] = "topk"

    def __init__(self, ratio: float) -> None:
        self.ratio = _check_ratio("topk", ratio)

    @property
    def spec(self) -> str:
        return f"topk:{self.ratio:g}"

    def _count(self, n: int) -> int:
        return count_for_ratio(self.ratio, n)

    def compress(
        self,
        x: np.ndarray,
        rng: np.random.Generator | None = None,
        meta: Mapping[str, Any] | None = None,
    ) -> Payload:
        x = check_bucket(x, f"{self.spec}.compress")
        _check_index_range(x, f"{self.spec}.compress")
        return self._payload(x, top_magnitudes(x, self._count(x.size)))


class Threshold(_IndexedValues):
    """``threshold:density``: DGC's sampled threshold (Lin et al. 2018).

    The threshold is the (1 - density) quantile of the magnitudes of a random sample of
    max(1 %, 1024) of the elements (drawn with replacement from ``rng``); every element with a
    larger magnitude is sent, so the count is about density * n but varies with the data.
    Wire: the selected float32 values, then their int32 indices (8 bytes per element sent).
    Because the size varies, ``fixed_size`` is False: ``wire_bytes(n)`` is the nominal size at
    the target density, the payload's ``nbytes`` the exact one, and the allgather aggregation
    exchanges sizes and uses Allgatherv.
    """

    name: ClassVar[str] = "threshold"
    fixed_size: ClassVar[bool] = False

    def __init__(self, density: float) -> None:
        self.density = _check_ratio("threshold", density)

    @property
    def spec(self) -> str:
        return f"threshold:{self.density:g}"

    def _count(self, n: int) -> int:
        return count_for_ratio(self.density, n)

    def compress(
        self,
        x: np.ndarray,
        rng: np.random.Generator | None = None,
        meta: Mapping[str, Any] | None = None,
    ) -> Payload:
        x = check_bucket(x, f"{self.spec}.compress")
        _check_index_range(x, f"{self.spec}.compress")
        rng = need_rng(rng, f"{self.spec}.compress")
        n = x.size
        m = min(n, max(1024, n // 100))
        sample = np.abs(x[rng.integers(0, n, m)])
        above = count_for_ratio(self.density, m)
        threshold = np.partition(sample, m - above)[m - above]
        # The sampled quantile itself is excluded (strict >), hence the step below it.
        threshold = np.nextafter(threshold, np.float32(0)) if threshold > 0 else threshold
        return self._payload(x, indices_above(x, threshold))

    def unpack(self, buf: np.ndarray, n: int, meta: Mapping[str, Any]) -> Payload:
        if buf.nbytes % 8:
            raise ValueError(f"{self.spec}.unpack: {buf.nbytes} bytes is not 8 per element")
        k = buf.nbytes // 8
        values = np.frombuffer(buf, np.float32, k)
        return Payload((values, np.frombuffer(buf, np.int32, k, offset=4 * k)), meta)

    def _checked(self, payload: Payload, n: int) -> tuple[np.ndarray, np.ndarray]:
        values, indices = payload.arrays
        if values.shape != indices.shape or values.ndim != 1:
            raise ValueError(
                f"{self.spec}.decompress: values {values.shape} and indices {indices.shape} differ"
            )
        return values, indices


class RandK(Compressor):
    """``randk:ratio`` / ``randk:ratio:rescale``: k = max(1, round(ratio n)) random coordinates.

    The k indices (distinct, sorted) are drawn from ``rng``, which must be in the same state on
    every rank (``needs_shared_seed``): every rank picks the same indices, only the float32
    values travel (4k bytes), and payloads are summable with MPI's SUM. The indices are kept in
    ``meta["indices"]``. With ``rescale`` the values are multiplied by n / k, which makes the
    compressor unbiased (E = x) at the price of variance; without it, it is biased towards 0
    and meant for error feedback.
    """

    name: ClassVar[str] = "randk"
    summable: ClassVar[bool] = True
    needs_shared_seed: ClassVar[bool] = True
    sparse: ClassVar[bool] = True

    def __init__(self, ratio: float, rescale: bool = False) -> None:
        self.ratio = _check_ratio("randk", ratio)
        self.rescale = bool(rescale)
        self.unbiased = self.rescale

    @property
    def spec(self) -> str:
        return f"randk:{self.ratio:g}" + (":rescale" if self.rescale else "")

    def wire_layout(self, n: int) -> tuple[ArraySpec, ...]:
        return ((_F32, count_for_ratio(self.ratio, n)),)

    def sum_dtypes(self, count: int) -> tuple[np.dtype, ...]:
        return (_F32,)

    def compress(
        self,
        x: np.ndarray,
        rng: np.random.Generator | None = None,
        meta: Mapping[str, Any] | None = None,
    ) -> Payload:
        x = check_bucket(x, f"{self.spec}.compress")
        n, k = x.size, count_for_ratio(self.ratio, x.size)
        if meta and "indices" in meta:
            indices = meta["indices"]
            if indices.size != k:
                raise ValueError(
                    f"{self.spec}.compress: shared indices hold {indices.size} elements, "
                    f"need k={k} for n={n}"
                )
        else:
            rng = need_rng(rng, f"{self.spec}.compress")
            indices = np.sort(rng.choice(n, k, replace=False, shuffle=False))
        values = x[indices]
        if self.rescale:
            values *= np.float32(n / k)
        return Payload((values,), {"indices": indices})

    def decompress(self, payload: Payload, n: int) -> np.ndarray:
        check_payload(payload, self.wire_layout(n), f"{self.spec}.decompress")
        return scatter(payload.arrays[0], payload.meta["indices"], n)

    def accumulate(self, payload: Payload, out: np.ndarray) -> None:
        check_payload(payload, self.wire_layout(out.size), f"{self.spec}.decompress")
        out[payload.meta["indices"]] += payload.arrays[0]
