"""Quantizers: every coordinate is sent, with fewer bits each.

``int8`` (a scale shared by all ranks), ``qsgd:s`` (s levels under the bucket's L2 norm),
``terngrad`` (three levels under a shared max scaler), ``sign`` (1 bit, majority vote),
``efsign`` (1 bit scaled by the mean magnitude) and ``onebit`` (Seide's 1-bit SGD with a
reconstruction value per column and sign).

Stochastic rounding draws 16 random bits per element: q = floor(y + u) with u uniform on the
grid k / 2**16, which rounds y up with probability floor(2**16 frac(y)) / 2**16. The rounding
is therefore unbiased up to 2**-16 of one quantization step; that resolution halves the cost of
the random numbers compared with 32-bit uniforms, the dominant cost of these compressors.
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
    need_rng,
)

_F32 = np.dtype(np.float32)
_DITHER_STEP = np.float32(2.0**-16)


def quantize(
    x: np.ndarray, scale: np.float32, levels: int, rng: np.random.Generator | None
) -> np.ndarray:
    """Map x (float32, (n,)) to int8 levels in [-levels, levels] (levels <= 127) under ``scale``.

    Level l stands for l * scale / levels. With ``rng`` the rounding is stochastic (unbiased to
    2**-16 of a step), otherwise to nearest; values beyond the scale saturate. A zero scale
    gives zeros; a non-finite scale gives zeros too, and ``dequantize`` then returns NaN
    everywhere, so a NaN or inf in the bucket stays visible after decompression on every rank.
    Works block by block so the temporaries stay in cache.
    """
    out = np.zeros(x.size, np.int8)
    if not (math.isfinite(scale) and scale > 0):
        return out
    mult = np.float32(levels) / np.float32(scale)
    hi, lo = np.float32(levels), np.float32(-levels)
    y = np.empty(min(x.size, BLOCK), np.float32)
    u = np.empty_like(y) if rng is not None else None
    for s in block_slices(x.size):
        m = s.stop - s.start
        yb = y[:m]
        np.multiply(x[s], mult, out=yb)
        if rng is None:
            np.rint(yb, out=yb)
        else:
            bits = rng.bit_generator.random_raw((m + 3) // 4).view(np.uint16)[:m]
            np.multiply(bits, _DITHER_STEP, out=u[:m])
            yb += u[:m]
            np.floor(yb, out=yb)
        # |x| * levels / scale can pass `levels` by an ulp, and a mean re-quantized under the
        # scale of its parts by a few: saturate so the int8 cast cannot wrap around.
        np.minimum(yb, hi, out=yb)
        np.maximum(yb, lo, out=yb)
        out[s] = yb
    return out


def dequantize(q: np.ndarray, scale: np.float32, levels: int) -> np.ndarray:
    """Float32 values q * scale / levels for integer levels q (any int dtype, e.g. a sum)."""
    if not math.isfinite(scale):
        return np.full(q.size, np.nan, np.float32)
    return np.multiply(q, np.float32(scale) / np.float32(levels), dtype=np.float32)


def max_abs(x: np.ndarray) -> np.float32:
    """max |x| as float32 (NaN if x holds a NaN), from two reductions without a temporary."""
    hi, lo = x.max(), x.min()
    return np.float32(max(hi, -lo)) if not (np.isnan(hi) or np.isnan(lo)) else np.float32("nan")


def _shared_scale(compressor: Compressor, x: np.ndarray, meta: Mapping[str, Any] | None):
    if meta and "scale" in meta:
        return np.float32(meta["scale"])
    return compressor.local_scale(x)


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
        return Payload((quantize(x, scale, self.levels, rng),), {"scale": scale})

    def decompress(self, payload: Payload, n: int) -> np.ndarray:
        check_payload(payload, self.wire_layout(n), f"{self.spec}.decompress")
        return dequantize(payload.arrays[0], payload.meta["scale"], self.levels)


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
        return Payload((quantize(x, scale, 1, rng),), {"scale": scale})

    def decompress(self, payload: Payload, n: int) -> np.ndarray:
        check_payload(payload, self.wire_layout(n), "terngrad.decompress")
        return dequantize(payload.arrays[0], payload.meta["scale"], 1)


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
        return Payload((np.array([norm], np.float32), quantize(x, norm, self.levels, rng)))

    def decompress(self, payload: Payload, n: int) -> np.ndarray:
        check_payload(payload, self.wire_layout(n), f"{self.spec}.decompress")
        return dequantize(payload.arrays[1], payload.arrays[0][0], self.levels)


def pack_signs(x: np.ndarray) -> np.ndarray:
    """np.packbits(x >= 0) (uint8, ceil(n / 8)), computed block by block in cache."""
    out = np.empty((x.size + 7) // 8, np.uint8)
    mask = np.empty(min(x.size, BLOCK), bool)
    for s in block_slices(x.size):  # BLOCK is a multiple of 8, so blocks pack independently
        mb = mask[: s.stop - s.start]
        np.greater_equal(x[s], 0, out=mb)
        out[s.start // 8 : (s.stop + 7) // 8] = np.packbits(mb)
    return out


def unpack_signs(
    bits: np.ndarray, n: int, negative: np.float32, positive: np.float32
) -> np.ndarray:
    """Float32 (n,): ``positive`` where the packed bit is 1, ``negative`` where it is 0.

    A 256 x 8 table turns each byte into its 8 values with one gather.
    """
    table = np.where(_BYTE_BITS, np.float32(positive), np.float32(negative)).astype(np.float32)
    return np.take(table, bits, axis=0).reshape(-1)[:n]


_BYTE_BITS = np.unpackbits(np.arange(256, dtype=np.uint8)).reshape(256, 8).astype(bool)


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
        return Payload((pack_signs(check_bucket(x, "sign.compress")),))

    def decompress(self, payload: Payload, n: int) -> np.ndarray:
        check_payload(payload, self.wire_layout(n), "sign.decompress")
        return unpack_signs(payload.arrays[0], n, np.float32(-1), np.float32(1))


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
        a = np.empty(min(x.size, BLOCK), np.float32)
        ones = np.ones_like(a)
        total = 0.0
        for s in block_slices(x.size):
            m = s.stop - s.start
            np.abs(x[s], out=a[:m])
            total += float(np.dot(a[:m], ones[:m]))  # BLAS: far faster than ndarray.sum
        scale = np.array([total / x.size], np.float32)
        return Payload((scale, pack_signs(x)))

    def decompress(self, payload: Payload, n: int) -> np.ndarray:
        check_payload(payload, self.wire_layout(n), "efsign.decompress")
        s = payload.arrays[0][0]
        return unpack_signs(payload.arrays[1], n, -s, s)


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
        bits = pack_signs(x)
        pos_sum = np.empty(cols, np.float32)
        total = np.empty(cols, np.float32)
        # Set bits per column; a column's bits start on a byte boundary since L % 8 == 0,
        # and packbits pads the last byte with zeros.
        starts = np.arange(0, bits.size, L // 8)
        pos_count = np.add.reduceat(np.bitwise_count(bits), starts, dtype=np.int64)
        group = max(1, BLOCK // L) * L  # whole columns per block
        relu = np.empty(min(n, group), np.float32)
        ones = np.ones(L, np.float32)
        for s in block_slices(n, group):
            m = s.stop - s.start
            c0, full = s.start // L, m // L
            xb, rb = x[s], relu[:m]
            np.maximum(xb, 0, out=rb)
            if full:  # whole columns as rows of a (full, L) view; matvec sums are BLAS-fast
                np.matmul(rb[: full * L].reshape(full, L), ones, out=pos_sum[c0 : c0 + full])
                np.matmul(xb[: full * L].reshape(full, L), ones, out=total[c0 : c0 + full])
            if full * L < m:  # the bucket's last, shorter column
                pos_sum[-1], total[-1] = rb[full * L :].sum(), xb[full * L :].sum()
        sizes = np.full(cols, L, np.int64)
        sizes[-1] = n - (cols - 1) * L
        neg_count = sizes - pos_count
        pos_mean = np.zeros(cols, np.float32)
        neg_mean = np.zeros(cols, np.float32)
        np.divide(pos_sum, pos_count, out=pos_mean, where=pos_count > 0, casting="unsafe")
        np.divide(total - pos_sum, neg_count, out=neg_mean, where=neg_count > 0, casting="unsafe")
        return Payload((pos_mean, neg_mean, bits))

    def decompress(self, payload: Payload, n: int) -> np.ndarray:
        check_payload(payload, self.wire_layout(n), f"{self.spec}.decompress")
        pos_mean, neg_mean, bits = payload.arrays
        L = self.column
        step = (pos_mean - neg_mean).astype(np.float32)
        out = np.empty(n, np.float32)
        group = max(1, BLOCK // L) * L
        for s in block_slices(n, group):
            c0 = s.start // L
            u = np.unpackbits(bits[s.start // 8 : (s.stop + 7) // 8], count=s.stop - s.start)
            full = (s.stop - s.start) // L
            ob = out[s]
            if full:
                rows = ob[: full * L].reshape(full, L)
                np.multiply(u[: full * L].reshape(full, L), step[c0 : c0 + full, None], out=rows)
                rows += neg_mean[c0 : c0 + full, None]
            if full * L < ob.size:
                np.multiply(u[full * L :], step[-1], out=ob[full * L :])
                ob[full * L :] += neg_mean[-1]
        return out
