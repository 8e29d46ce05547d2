"""Quantizers: every coordinate is sent, with fewer bits each.

``int8`` (a scale shared by all ranks), ``qsgd:s`` (s levels under the bucket's L2 norm),
``terngrad`` (three levels under a shared max scaler), ``sign`` (1 bit, majority vote),
``efsign`` (1 bit scaled by the mean magnitude) and ``onebit`` (Seide's 1-bit SGD with a
reconstruction value per column and sign).

Stochastic rounding is q = floor(y + u) with u = (r + w) / 256: r is 8 random bits per element
and w one uniform float per block of ``BLOCK`` elements. Each u is exactly uniform on [0, 1),
so P(round up) = frac(y) and the rounding is unbiased up to float32 rounding (at most 2**-16
of a step); elements of one block share the sub-1/256 part of their dither. Eight random bits
per element instead of 16 halve the cost of the random numbers, the largest cost of these
compressors.
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
    check_bucket,
    check_payload,
    need_rng,
    output_array,
)

_F32 = np.dtype(np.float32)
_U32 = np.uint32
#: x + 1.5 * 2**23 rounds x to an integer (to nearest even) for |x| < 2**22 and leaves it in
#: the low bits of the float32: bits(x + M) = bits(M) + rint(x), and bits(M) ends in a zero
#: byte, so the low byte is rint(x) as an int8. 1.5 * 2**31 does the same for rint(x / 256).
_ROUND_1 = np.float32(1.5 * 2.0**23)
_ROUND_256 = np.float32(1.5 * 2.0**31)


def quantize(
    x: np.ndarray,
    scale: np.float32,
    levels: int,
    rng: np.random.Generator | None,
    out: np.ndarray | None = None,
    work: np.ndarray | None = None,
    bounded: bool = False,
) -> np.ndarray:
    """Map x (float32, (n,)) to int8 levels in [-levels, levels] (levels <= 127) under ``scale``.

    Level l stands for l * scale / levels. With ``rng`` the rounding is stochastic (unbiased up
    to float32 rounding, see the module docstring), otherwise to nearest even; values beyond
    the scale saturate. A zero scale gives zeros; a non-finite scale gives zeros too, and
    ``dequantize`` then returns NaN everywhere, so a NaN or inf in the bucket stays visible after
    decompression on every rank. ``out`` (int8, (n,)) and ``work`` (float32, at least
    2 min(n, BLOCK)) are used if given. ``bounded`` says the caller knows max |x| <= scale (the
    scale is x's own): rounding to nearest then cannot leave the range, and the per-block
    range check is skipped. Works block by block so the temporaries stay in cache.
    """
    out = np.empty(x.size, np.int8) if out is None else out
    if not (math.isfinite(scale) and scale > 0):
        out.fill(0)
        return out
    work = np.empty(2 * min(x.size, BLOCK), np.float32) if work is None else work
    low = out.view(np.uint8)
    if rng is None:
        mult, magic, bound = np.float32(levels) / np.float32(scale), _ROUND_1, levels
    else:
        # In units of 1/256 of a level: t = 256 y + r + w - 128, and rint(t / 256) = floor(y + u)
        mult, magic, bound = np.float32(256 * levels) / np.float32(scale), _ROUND_256, 256 * levels
    half = work.size // 2
    for s in block_slices(x.size):
        m = s.stop - s.start
        t = work[:m]
        if rng is not None:
            raw = rng.bit_generator.random_raw((m + 7) // 8 + 1)
            w = np.float32(int(raw[-1]) >> 40) * np.float32(2.0**-24)  # 24 bits, [0, 1)
            dither = work[half : half + m]
            np.add(raw[:-1].view(np.uint8)[:m], w - np.float32(128), out=dither)
            np.multiply(x[s], mult, out=t)
            t += dither
            bound_lo, bound_hi = -bound - 127, bound + 127  # rint(t / 256) within +-levels
        else:
            np.multiply(x[s], mult, out=t)
            bound_lo, bound_hi = -bound, bound
        # |x| * levels / scale can pass `levels` by an ulp (harmless when rounding to nearest),
        # a mean re-quantized under the scale of its parts by a few, and a dither by almost a
        # level: saturate so the int8 cannot wrap around.
        if not (bounded and rng is None) and (t.max() > bound_hi or t.min() < bound_lo):
            np.clip(t, bound_lo, bound_hi, out=t)
        t += magic
        np.copyto(low[s], t.view(_U32), casting="unsafe")  # the low byte: rint as an int8
    return out


def dequantize(
    q: np.ndarray, scale: np.float32, levels: int, out: np.ndarray | None = None
) -> np.ndarray:
    """Float32 values q * scale / levels for integer levels q (any int dtype, e.g. a sum)."""
    out = output_array(out, q.size, "dequantize")
    if not math.isfinite(scale):
        out.fill(np.nan)
        return out
    step = np.float32(scale) / np.float32(levels)
    for s in block_slices(q.size):
        np.copyto(out[s], q[s], casting="same_kind")
        out[s] *= step
    return out


def max_abs(x: np.ndarray) -> np.float32:
    """max |x| as float32 (NaN if x holds a NaN), from one blocked pass without a temporary."""
    hi = lo = np.float32(0)
    for s in block_slices(x.size):
        xb = x[s]
        bh, bl = xb.max(), xb.min()  # the second reduction reads the block from cache
        if np.isnan(bh):
            return np.float32("nan")
        hi, lo = max(hi, bh), min(lo, bl)
    return np.float32(max(hi, -lo))


def _shared_scale(compressor: Compressor, x: np.ndarray, meta: Mapping[str, Any] | None):
    if meta and "scale" in meta:
        return np.float32(meta["scale"])
    return compressor.local_scale(x)


def _own_scale(meta: Mapping[str, Any] | None) -> bool:
    """Whether the scale is the bucket's own max |x| (no shared scale given)."""
    return not (meta and "scale" in meta)


def _quantize_into(
    compressor: Compressor,
    x: np.ndarray,
    scale: np.float32,
    levels: int,
    rng: np.random.Generator | None,
    bounded: bool,
) -> np.ndarray:
    """``quantize`` into the compressor's reusable payload and scratch arrays."""
    out = compressor.scratch("payload", x.size, np.int8)
    work = compressor.scratch("work", 2 * min(x.size, BLOCK), np.float32)
    return quantize(x, scale, levels, rng, out, work, bounded)


def _int_dtype_for(bound: int) -> np.dtype:
    """The narrowest signed integer dtype that holds every value in [-bound, bound]."""
    for dt in (np.int8, np.int16, np.int32, np.int64):
        if bound <= np.iinfo(dt).max:
            return np.dtype(dt)
    raise OverflowError(f"no integer dtype holds {bound}")


class Int8(Compressor):
    """``int8`` / ``int8:stochastic``: 127 levels per sign under a scale shared by all ranks.

    The scale is max |x| over every rank's bucket (the aggregation agrees on it with an
    Allreduce MAX of ``local_scale`` and passes it as ``meta={"scale": s}``; alone, the bucket's
    own max is used). Wire: int8 levels (n bytes); the scale is shared, not sent. Summable: the
    levels of p ranks add up in the narrowest integer type that holds 127 p. Rounding is to
    nearest, or stochastic (unbiased) with ``stochastic=True``.
    """

    name: ClassVar[str] = "int8"
    summable: ClassVar[bool] = True
    needs_shared_scale: ClassVar[bool] = True
    levels: ClassVar[int] = 127

    def __init__(self, stochastic: bool = False) -> None:
        self.stochastic = bool(stochastic)
        self.unbiased = self.stochastic

    @property
    def spec(self) -> str:
        return "int8:stochastic" if self.stochastic else "int8"

    def wire_layout(self, n: int) -> tuple[ArraySpec, ...]:
        return ((np.dtype(np.int8), n),)

    def sum_dtypes(self, count: int) -> tuple[np.dtype, ...]:
        return (_int_dtype_for(self.levels * count),)

    def local_scale(self, x: np.ndarray) -> np.float32:
        return max_abs(check_bucket(x, f"{self.spec}.local_scale"))

    def compress(
        self,
        x: np.ndarray,
        rng: np.random.Generator | None = None,
        meta: Mapping[str, Any] | None = None,
    ) -> Payload:
        x = check_bucket(x, f"{self.spec}.compress")
        rng = need_rng(rng, f"{self.spec}.compress") if self.stochastic else None
        scale = _shared_scale(self, x, meta)
        q = _quantize_into(self, x, scale, self.levels, rng, bounded=_own_scale(meta))
        return Payload((q,), {"scale": scale})

    def decompress(self, payload: Payload, n: int, out: np.ndarray | None = None) -> np.ndarray:
        check_payload(payload, self.wire_layout(n), f"{self.spec}.decompress")
        return dequantize(payload.arrays[0], payload.meta["scale"], self.levels, out)


class TernGrad(Compressor):
    """``terngrad``: Wen et al. 2017, levels {-1, 0, 1} times a scaler shared by all ranks.

    Scaler sharing: the scaler s is max |x| over every rank (an Allreduce MAX before
    quantizing, as for ``int8``); q_i = sign(x_i) with probability |x_i| / s, else 0, so
    E[s q] = x (unbiased). Wire: int8 (n bytes), which keeps the payload summable with MPI's
    SUM (in int8 itself up to 127 ranks); the paper's gradient clipping is not applied.
    """

    name: ClassVar[str] = "terngrad"
    summable: ClassVar[bool] = True
    needs_shared_scale: ClassVar[bool] = True
    unbiased: bool = True

    def wire_layout(self, n: int) -> tuple[ArraySpec, ...]:
        return ((np.dtype(np.int8), n),)

    def sum_dtypes(self, count: int) -> tuple[np.dtype, ...]:
        return (_int_dtype_for(count),)

    def local_scale(self, x: np.ndarray) -> np.float32:
        return max_abs(check_bucket(x, "terngrad.local_scale"))

    def compress(
        self,
        x: np.ndarray,
        rng: np.random.Generator | None = None,
        meta: Mapping[str, Any] | None = None,
    ) -> Payload:
        x = check_bucket(x, "terngrad.compress")
        rng = need_rng(rng, "terngrad.compress")
        scale = _shared_scale(self, x, meta)
        q = _quantize_into(self, x, scale, 1, rng, bounded=_own_scale(meta))
        return Payload((q,), {"scale": scale})

    def decompress(self, payload: Payload, n: int, out: np.ndarray | None = None) -> np.ndarray:
        check_payload(payload, self.wire_layout(n), "terngrad.decompress")
        return dequantize(payload.arrays[0], payload.meta["scale"], 1, out)


class QSGD(Compressor):
    """``qsgd:s``: Alistarh et al. 2017, s levels per sign under the bucket's L2 norm.

    q_i = sign(x_i) * xi_i with xi_i the stochastic rounding of s |x_i| / ||x||_2 to an
    integer, so E[||x|| q / s] = x (unbiased). Wire: the norm (float32) then the signed levels
    as int8 (4 + n bytes; s <= 127). The norm is the rank's own, so payloads are not summable.
    """

    name: ClassVar[str] = "qsgd"
    unbiased: bool = True

    def __init__(self, levels: int) -> None:
        if not 1 <= int(levels) <= 127 or int(levels) != levels:
            raise ValueError(f"qsgd: levels must be an integer in [1, 127], got {levels!r}")
        self.levels = int(levels)

    @property
    def spec(self) -> str:
        return f"qsgd:{self.levels}"

    def wire_layout(self, n: int) -> tuple[ArraySpec, ...]:
        return ((_F32, 1), (np.dtype(np.int8), n))

    def compress(
        self,
        x: np.ndarray,
        rng: np.random.Generator | None = None,
        meta: Mapping[str, Any] | None = None,
    ) -> Payload:
        x = check_bucket(x, f"{self.spec}.compress")
        rng = need_rng(rng, f"{self.spec}.compress")
        norm = np.float32(math.sqrt(float(np.dot(x, x))))
        q = _quantize_into(self, x, norm, self.levels, rng, bounded=False)
        return Payload((np.array([norm], np.float32), q))

    def decompress(self, payload: Payload, n: int, out: np.ndarray | None = None) -> np.ndarray:
        check_payload(payload, self.wire_layout(n), f"{self.spec}.decompress")
        return dequantize(payload.arrays[1], payload.arrays[0][0], self.levels, out)


def pack_signs(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """np.packbits(x >= 0) (uint8, ceil(n / 8)), computed block by block in cache."""
    out = np.empty((x.size + 7) // 8, np.uint8) if out is None else out
    mask = np.empty(min(x.size, BLOCK), bool)
    for s in block_slices(x.size):  # BLOCK is a multiple of 8, so blocks pack independently
        mb = mask[: s.stop - s.start]
        np.greater_equal(x[s], 0, out=mb)
        out[s.start // 8 : (s.stop + 7) // 8] = np.packbits(mb)
    return out


def unpack_signs(
    bits: np.ndarray,
    n: int,
    negative: np.float32,
    positive: np.float32,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Float32 (n,): ``positive`` where the packed bit is 1, ``negative`` where it is 0.

    A 256 x 8 table turns each byte into its 8 values with one gather (np.take), block by
    block so that numpy's index conversion stays small.
    """
    out = output_array(out, n, "unpack_signs")
    table = np.where(_BYTE_BITS, np.float32(positive), np.float32(negative)).astype(np.float32)
    _gather_bytes(table, bits, out)
    return out


def _gather_bytes(table: np.ndarray, bits: np.ndarray, out: np.ndarray) -> None:
    """out (float32, (n,)) = table[bits] flattened: 8 values per byte from a (256, 8) table."""
    n = out.size
    whole = n // 8
    rows = out[: 8 * whole].reshape(whole, 8)
    for s in block_slices(whole, BLOCK // 8):  # mode="clip": "raise" copies out twice
        np.take(table, bits[s], axis=0, out=rows[s], mode="clip")
    if whole * 8 < n:
        out[8 * whole :] = table[bits[whole]][: n - 8 * whole]


_BYTE_BITS = np.unpackbits(np.arange(256, dtype=np.uint8)).reshape(256, 8).astype(bool)
_BYTE_BITS_01 = _BYTE_BITS.astype(np.float32)


class Sign(Compressor):
    """``sign``: signSGD, 1 bit per element (bit 1 for x >= 0, so zeros send +1).

    Wire: ``np.packbits(x >= 0)`` (ceil(n / 8) bytes); decompresses to ±1. Its aggregation is
    the majority vote (Bernstein et al. 2018): the result is the sign of the sum of the ranks'
    signs, 0 on ties.
    """

    name: ClassVar[str] = "sign"
    majority_vote: ClassVar[bool] = True
    preferred_aggregation: ClassVar[str] = "majority"

    def wire_layout(self, n: int) -> tuple[ArraySpec, ...]:
        return ((np.dtype(np.uint8), (n + 7) // 8),)

    def compress(
        self,
        x: np.ndarray,
        rng: np.random.Generator | None = None,
        meta: Mapping[str, Any] | None = None,
    ) -> Payload:
        x = check_bucket(x, "sign.compress")
        return Payload((pack_signs(x, self.scratch("payload", (x.size + 7) // 8, np.uint8)),))

    def decompress(self, payload: Payload, n: int, out: np.ndarray | None = None) -> np.ndarray:
        check_payload(payload, self.wire_layout(n), "sign.decompress")
        return unpack_signs(payload.arrays[0], n, np.float32(-1), np.float32(1), out)


class EFSign(Compressor):
    """``efsign``: scaled sign, ||x||_1 / n * sign(x) (Karimireddy et al. 2019).

    Meant for error feedback (``efsign+ef``). Wire: the scale (float32) then the packed sign
    bits (4 + ceil(n / 8) bytes); zeros are sent as +scale.
    """

    name: ClassVar[str] = "efsign"

    def wire_layout(self, n: int) -> tuple[ArraySpec, ...]:
        return ((_F32, 1), (np.dtype(np.uint8), (n + 7) // 8))

    def compress(
        self,
        x: np.ndarray,
        rng: np.random.Generator | None = None,
        meta: Mapping[str, Any] | None = None,
    ) -> Payload:
        x = check_bucket(x, "efsign.compress")
        bits = self.scratch("payload", (x.size + 7) // 8, np.uint8)
        a = self.scratch("work", min(x.size, BLOCK), np.float32)
        mask = self.scratch("mask", a.size, bool)
        ones = np.ones_like(a)
        total = 0.0
        for s in block_slices(x.size):  # one pass: the signs, and the magnitudes' sum
            m = s.stop - s.start
            xb, ab, mb = x[s], a[:m], mask[:m]
            np.greater_equal(xb, 0, out=mb)
            bits[s.start // 8 : (s.stop + 7) // 8] = np.packbits(mb)
            np.abs(xb, out=ab)
            total += float(np.dot(ab, ones[:m]))  # BLAS: far faster than ndarray.sum
        scale = np.array([total / x.size], np.float32)
        return Payload((scale, bits))

    def decompress(self, payload: Payload, n: int, out: np.ndarray | None = None) -> np.ndarray:
        check_payload(payload, self.wire_layout(n), "efsign.decompress")
        s = payload.arrays[0][0]
        return unpack_signs(payload.arrays[1], n, -s, s, out)


class OneBit(Compressor):
    """``onebit`` / ``onebit:L``: Seide et al. 2014 1-bit SGD with per-column reconstruction.

    The bucket is read as consecutive columns of L elements (L = 1024 by default, a multiple of
    8): column j is x[j L : (j + 1) L], the last one possibly shorter, i.e. the bucket padded to
    an (L, ceil(n / L)) matrix in column-major order. Each element sends the bit x >= 0; each
    column sends the mean of its elements with bit 1 and the mean of those with bit 0 (0 for an
    empty group), and decompression puts that mean back in each place. Wire: the positive means,
    the negative means (float32, ceil(n / L) each), then the packed bits (ceil(n / 8) bytes).
    Biased; pair it with error feedback (``onebit+ef``) as in the paper.
    """

    name: ClassVar[str] = "onebit"

    def __init__(self, column: int = 1024) -> None:
        if int(column) != column or column < 8 or column % 8:
            raise ValueError(f"onebit: column length must be a multiple of 8, got {column!r}")
        self.column = int(column)

    @property
    def spec(self) -> str:
        return "onebit" if self.column == 1024 else f"onebit:{self.column}"

    def wire_layout(self, n: int) -> tuple[ArraySpec, ...]:
        cols = -(-n // self.column)
        return ((_F32, cols), (_F32, cols), (np.dtype(np.uint8), (n + 7) // 8))

    def compress(
        self,
        x: np.ndarray,
        rng: np.random.Generator | None = None,
        meta: Mapping[str, Any] | None = None,
    ) -> Payload:
        x = check_bucket(x, f"{self.spec}.compress")
        L, n = self.column, x.size
        cols = -(-n // L)
        bits = self.scratch("payload.bits", (n + 7) // 8, np.uint8)
        pos_sum = np.empty(cols, np.float32)
        total = np.empty(cols, np.float32)
        group = max(1, BLOCK // L) * L  # whole columns per block
        relu = self.scratch("work", min(n, group), np.float32)
        zeros = self.scratch("zeros", relu.size, np.float32)
        zeros.fill(0)  # np.maximum with an array: with a scalar it is not vectorised
        mask = self.scratch("mask", relu.size, bool)
        ones = np.ones(L, np.float32)
        for s in block_slices(n, group):  # one pass: bits, and per-column sums
            m = s.stop - s.start
            c0, full = s.start // L, m // L
            xb, rb, mb = x[s], relu[:m], mask[:m]
            np.greater_equal(xb, 0, out=mb)
            bits[s.start // 8 : (s.stop + 7) // 8] = np.packbits(mb)
            np.maximum(xb, zeros[:m], out=rb)
            if full:  # whole columns as rows of a (full, L) view; matvec sums are BLAS-fast
                np.matmul(rb[: full * L].reshape(full, L), ones, out=pos_sum[c0 : c0 + full])
                np.matmul(xb[: full * L].reshape(full, L), ones, out=total[c0 : c0 + full])
            if full * L < m:  # the bucket's last, shorter column
                pos_sum[-1], total[-1] = rb[full * L :].sum(), xb[full * L :].sum()
        # Set bits per column; a column's bits start on a byte boundary since L % 8 == 0,
        # and packbits pads the last byte with zeros.
        starts = np.arange(0, bits.size, L // 8)
        pos_count = np.add.reduceat(np.bitwise_count(bits), starts, dtype=np.int64)
        sizes = np.full(cols, L, np.int64)
        sizes[-1] = n - (cols - 1) * L
        neg_count = sizes - pos_count
        pos_mean = np.zeros(cols, np.float32)
        neg_mean = np.zeros(cols, np.float32)
        np.divide(pos_sum, pos_count, out=pos_mean, where=pos_count > 0, casting="unsafe")
        np.divide(total - pos_sum, neg_count, out=neg_mean, where=neg_count > 0, casting="unsafe")
        return Payload((pos_mean, neg_mean, bits))

    def decompress(self, payload: Payload, n: int, out: np.ndarray | None = None) -> np.ndarray:
        check_payload(payload, self.wire_layout(n), f"{self.spec}.decompress")
        pos_mean, neg_mean, bits = payload.arrays
        L = self.column
        step = (pos_mean - neg_mean).astype(np.float32)
        out = output_array(out, n, f"{self.spec}.decompress")
        group = max(1, BLOCK // L) * L
        for s in block_slices(n, group):  # 0.0 / 1.0 per bit, then neg + bit * step per column
            c0 = s.start // L
            full = (s.stop - s.start) // L
            ob = out[s]
            _gather_bytes(_BYTE_BITS_01, bits[s.start // 8 : (s.stop + 7) // 8], ob)
            if full:
                rows = ob[: full * L].reshape(full, L)
                rows *= step[c0 : c0 + full, None]
                rows += neg_mean[c0 : c0 + full, None]
            if full * L < ob.size:
                ob[full * L :] *= step[-1]
                ob[full * L :] += neg_mean[-1]
        return out
