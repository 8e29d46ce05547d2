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

from distad._blocked import BLOCK, block_slices

from .base import (
    ArraySpec,
    Compressor,
    Payload,
    SparseVector,
    check_bucket,
    check_payload,
    count_for_ratio,
    need_rng,
    scatter,
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


def indices_above(
    x: np.ndarray, threshold: np.float32, work=None, mask=None
) -> tuple[np.ndarray, np.ndarray]:
    """Sorted int64 indices i with |x[i]| > threshold, and x[i] (float32), in one blocked pass.

    |x| > t is compared on the bits with the sign shifted out, (bits(x) << 1) > (bits(t) << 1)
    as uint32: the order of the magnitudes, with NaN above every number as ``np.sort`` orders
    it, so a NaN in the bucket is sent rather than silently kept in a residual (``abs`` and
    ``>`` would drop it, at the same speed). The values are taken from each block while it is in
    cache, not gathered from memory afterwards. ``work`` (float32) and ``mask`` (bool), at
    least min(n, BLOCK) long, are used if given.
    """
    found, values = [], []
    a = np.empty(min(x.size, BLOCK), np.float32) if work is None else work
    mask = np.empty(a.size, bool) if mask is None else mask
    bits, shifted = x.view(np.uint32), a.view(np.uint32)
    limit = np.uint32((int(np.float32(threshold).view(np.uint32)) << 1) & 0xFFFFFFFF)
    for s in block_slices(x.size):
        sb, mb = shifted[: s.stop - s.start], mask[: s.stop - s.start]
        np.left_shift(bits[s], np.uint32(1), out=sb)
        np.greater(sb, limit, out=mb)
        hits = np.flatnonzero(mb)
        if hits.size:
            values.append(x[s][hits])
            hits += s.start
            found.append(hits)
    if not found:
        return np.empty(0, np.int64), np.empty(0, np.float32)
    return np.concatenate(found), np.concatenate(values)


def top_magnitudes(x: np.ndarray, k: int, work=None, mask=None) -> tuple[np.ndarray, np.ndarray]:
    """Sorted int64 indices of the k largest |x|, and their values; of equal magnitudes, the
    lowest indices first.

    A threshold from a strided sample of 64 Ki magnitudes picks somewhat more than k candidates
    in one blocked pass (``indices_above``), and the selection runs on the candidates only.
    Every element outside the candidates is <= the threshold < every candidate, so when there
    are at least k candidates the k largest among them are the k largest overall; otherwise
    (rare: a sample that misjudges the data) the selection runs on all of x.
    """
    n = x.size
    if 8 * k >= n or n <= 4 * BLOCK:
        indices = _k_largest(np.abs(x), k)
        return indices, x[indices]
    sample = np.abs(x[:: max(1, n // (1 << 16))])
    # Aim at the sample count above the k-th magnitude plus 4 standard deviations.
    expected = k * sample.size / n
    above = min(sample.size, math.ceil(expected + 4 * math.sqrt(expected)) + 2)
    threshold = np.partition(sample, sample.size - above)[sample.size - above]
    candidates, values = indices_above(x, threshold, work, mask)
    if candidates.size < k:
        indices = _k_largest(np.abs(x), k)
        return indices, x[indices]
    keep = _k_largest(np.abs(values), k)
    return candidates[keep], values[keep]


def _k_largest(magnitudes: np.ndarray, k: int) -> np.ndarray:
    """Sorted positions of the k largest magnitudes (float32), ties to the lowest positions."""
    c = magnitudes.size
    kth = np.partition(magnitudes, c - k)[c - k]  # the k-th largest
    if np.isnan(kth):  # NaNs among the k largest: np.argpartition's order, then sorted
        return np.sort(np.argpartition(magnitudes, c - k)[c - k :])
    keep = np.less_equal(magnitudes, kth)
    np.logical_not(keep, out=keep)  # > kth, and NaN: it sorts last, so it counts as largest
    need = k - int(np.count_nonzero(keep))
    if need:
        keep[np.flatnonzero(magnitudes == kth)[:need]] = True
    return np.flatnonzero(keep)


def sample_indices(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    """k distinct indices drawn uniformly from range(n), sorted (int64).

    For k <= n / 16: the distinct values of m iid draws are a uniformly random subset given
    their count (the draws are exchangeable); m covers the expected duplicates k^2 / 2n with a
    margin, more draws are added in the rare case that falls short, and the surplus is dropped
    at positions drawn without replacement. A sort does the work (numpy's is vectorised): about
    twice as fast as ``rng.choice(n, k, replace=False)``, which fills a hash set element by
    element.
    """
    if 16 * k > n:
        return np.sort(rng.choice(n, k, replace=False, shuffle=False))
    duplicates = k * k / (2 * n)  # expected, among k draws; about Poisson distributed
    margin = math.ceil(1.2 * duplicates + 6 * math.sqrt(duplicates)) + 8
    draws = _distinct(rng.integers(0, n, k + margin))
    while draws.size < k:  # the union with more iid draws is again a set of iid draws
        more = rng.integers(0, n, 2 * (k - draws.size) + 8)
        draws = _distinct(np.concatenate([draws, more]))
    if draws.size > k:
        draws = np.delete(draws, rng.choice(draws.size, draws.size - k, replace=False))
    return draws


def _distinct(values: np.ndarray) -> np.ndarray:
    """The sorted distinct values (np.unique, without its slower general machinery)."""
    values = np.sort(values)
    keep = np.empty(values.size, bool)
    keep[:1] = True
    np.not_equal(values[1:], values[:-1], out=keep[1:])
    return values[keep]


class _IndexedValues(Compressor):
    """Shared wire format of top-k and threshold: float32 values, then int32 indices."""

    sparse: ClassVar[bool] = True

    def _count(self, n: int) -> int:
        raise NotImplementedError

    def wire_layout(self, n: int) -> tuple[ArraySpec, ...]:
        k = self._count(n)
        return ((_F32, k), (_I32, k))

    def _payload(self, indices: np.ndarray, values: np.ndarray) -> Payload:
        return Payload((values, indices.astype(np.int32)))

    def _work(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Scratch for ``indices_above``: float32 and bool, min(n, BLOCK) each."""
        m = min(n, BLOCK)
        return self.scratch("work", m, np.float32), self.scratch("mask", m, bool)

    def decompress(self, payload: Payload, n: int, out: np.ndarray | None = None) -> np.ndarray:
        values, indices = self._checked(payload, n)
        return scatter(values, indices, n, out)

    def accumulate(self, payload: Payload, out: np.ndarray) -> None:
        values, indices = self._checked(payload, out.size)
        out[indices] += values  # indices of one payload are distinct

    def contribution(self, payload: Payload, n: int) -> SparseVector:
        values, indices = self._checked(payload, n)
        return SparseVector(indices, values, n)

    def _checked(self, payload: Payload, n: int) -> tuple[np.ndarray, np.ndarray]:
        check_payload(payload, self.wire_layout(n), f"{self.spec}.decompress")
        return payload.arrays[0], payload.arrays[1]


class TopK(_IndexedValues):
    """``topk:ratio``: the k = max(1, round(ratio n)) largest magnitudes (Aji & Heafield 2017).

    Wire: k float32 values then their k int32 indices, sorted (8k bytes). Of equal magnitudes
    at the k-th place, the lowest indices are kept. Deterministic and biased; pair it with
    error feedback (``topk:0.01+ef``).
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
        return self._payload(*top_magnitudes(x, self._count(x.size), *self._work(x.size)))


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
        return self._payload(*indices_above(x, threshold, *self._work(n)))

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
            indices = sample_indices(rng, n, k)
        values = x[indices]
        if self.rescale:
            values *= np.float32(n / k)
        return Payload((values,), {"indices": indices})

    def decompress(self, payload: Payload, n: int, out: np.ndarray | None = None) -> np.ndarray:
        check_payload(payload, self.wire_layout(n), f"{self.spec}.decompress")
        return scatter(payload.arrays[0], payload.meta["indices"], n, out)

    def accumulate(self, payload: Payload, out: np.ndarray) -> None:
        check_payload(payload, self.wire_layout(out.size), f"{self.spec}.decompress")
        out[payload.meta["indices"]] += payload.arrays[0]

    def contribution(self, payload: Payload, n: int) -> SparseVector:
        check_payload(payload, self.wire_layout(n), f"{self.spec}.decompress")
        return SparseVector(payload.meta["indices"], payload.arrays[0], n)
