"""Casts: the identity (``none``), IEEE half precision (``fp16``) and bfloat16 (``bf16``).

The casts keep every coordinate and only drop mantissa bits. fp16 is summable by MPI's
built-in SUM on MPI's half type (the allreduce divides by the rank count first, so the
half-precision sum cannot overflow); both fp16 and bf16 default to the two-phase exchange,
which sums the decoded chunks in float32 and re-rounds the mean once.
"""

from __future__ import annotations

import functools
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
    output_array,
)

_U32 = np.uint32
_F32 = np.float32


class Identity(Compressor):
    """``none``: the bucket itself goes on the wire (float32, 4n bytes); the baseline.

    The payload and the decompressed array are the input array itself, not copies (unless
    ``decompress`` is given an ``out`` to copy into).
    """

    name: ClassVar[str] = "none"
    summable: ClassVar[bool] = True
    unbiased: bool = True

    def wire_layout(self, n: int) -> tuple[ArraySpec, ...]:
        return ((np.dtype(np.float32), n),)

    def sum_dtypes(self, count: int) -> tuple[np.dtype, ...]:
        return (np.dtype(np.float32),)

    def compress(
        self,
        x: np.ndarray,
        rng: np.random.Generator | None = None,
        meta: Mapping[str, Any] | None = None,
    ) -> Payload:
        return Payload((check_bucket(x, "none.compress"),))

    def decompress(self, payload: Payload, n: int, out: np.ndarray | None = None) -> np.ndarray:
        check_payload(payload, self.wire_layout(n), "none.decompress")
        values = payload.arrays[0]
        if out is None:
            return values.astype(np.float32, copy=False)
        out = output_array(out, n, "none.decompress")
        if not np.shares_memory(out, values):
            np.copyto(out, values, casting="same_kind")
        return out

    def accumulate(self, payload: Payload, out: np.ndarray) -> None:
        check_payload(payload, self.wire_layout(out.size), "none.accumulate")
        out += payload.arrays[0]


class FP16(Compressor):
    """``fp16``: IEEE half precision, round to nearest even (2n bytes).

    Values beyond the half range (|x| >= 65520) become ±inf, so an overflow is visible
    rather than clipped away; magnitudes below 2**-24 flush to zero. The result is bit for bit
    numpy's ``astype(np.float16)`` (and back, numpy's cast to float32): encoded with integer
    and float32 operations on blocks in cache, decoded by looking each half up in a table of
    all 65,536 values. numpy's own casts convert one element at a time and are slowest on the
    small magnitudes gradients have (about 50 ns per half subnormal).
    """

    name: ClassVar[str] = "fp16"
    summable: ClassVar[bool] = True
    divide_before_sum: ClassVar[bool] = True
    preferred_aggregation: ClassVar[str] = "two_phase"

    def wire_layout(self, n: int) -> tuple[ArraySpec, ...]:
        return ((np.dtype(np.float16), n),)

    def sum_dtypes(self, count: int) -> tuple[np.dtype, ...]:
        return (np.dtype(np.float16),)

    def compress(
        self,
        x: np.ndarray,
        rng: np.random.Generator | None = None,
        meta: Mapping[str, Any] | None = None,
    ) -> Payload:
        x = check_bucket(x, "fp16.compress")
        out = self.scratch("payload", x.size, np.uint16)
        m = min(x.size, BLOCK)
        work = self.scratch("work", 2 * m, _U32)
        floor = self.scratch("floor", m, _F32)
        floor.fill(_F32(2.0**-14))
        with np.errstate(over="ignore", invalid="ignore"):  # inf, NaN: handled per block
            for s in block_slices(x.size):
                k = s.stop - s.start
                _half_bits(x[s], out[s], work[:k], work[m : m + k], floor)
        return Payload((out.view(np.float16),))

    def decompress(self, payload: Payload, n: int, out: np.ndarray | None = None) -> np.ndarray:
        check_payload(payload, self.wire_layout(n), "fp16.decompress")
        out = output_array(out, n, "fp16.decompress")
        halves, table = payload.arrays[0].view(np.uint16), _half_table()
        for s in block_slices(n):  # every half is an index into the table of their values
            np.take(table, halves[s], out=out[s], mode="wrap")
        return out


def _half_bits(x: np.ndarray, out: np.ndarray, c: np.ndarray, a: np.ndarray, floor) -> None:
    """IEEE half bits (uint16) of float32 x, round to nearest even, into ``out``; c, a: uint32
    scratch of x's size; ``floor``: float32 2**-14, at least x's size.

    With E = max(exponent of x, -14) and c = 2**(E + 13) * (1 + 2**-12), the float32 sum
    a = |x| + c rounds |x| to a multiple of 2**(E - 10), the spacing of halves near x, to
    nearest even, so bits(a) = bits(c) + m with m = |x| / 2**(E - 10) rounded, and the half's
    magnitude bits are m + (E + 14) * 2**10, which is bits(a) + (bits(a) >> 13) modulo 2**16
    (the 2**-12 in c supplies the constant). Blocks with |x| >= 2**16, inf or NaN (a >= 2**29)
    use numpy's cast instead.
    """
    bits = x.view(_U32)
    cf, af = c.view(_F32), a.view(_F32)
    np.bitwise_and(bits, _U32(0x7F800000), out=c)  # 2**exponent, as a float32
    np.maximum(cf, floor[: x.size], out=cf)  # an array: numpy's maximum with a scalar is slow
    c += _U32((13 << 23) | 2048)
    np.abs(x, out=af)
    af += cf
    if not af.max() < _F32(2.0**29):
        np.copyto(out, x.astype(np.float16).view(np.uint16))
        return
    np.right_shift(a, _U32(13), out=c)
    c += a
    np.right_shift(bits, _U32(16), out=a)
    a &= _U32(0x8000)
    c |= a
    np.copyto(out, c, casting="unsafe")  # keeps the low 16 bits


@functools.cache
def _half_table() -> np.ndarray:
    """The float32 value of each of the 65,536 IEEE half bit patterns (256 KiB: it stays in a
    core's L2 cache), made by numpy's own cast, so decoding by lookup is bit for bit numpy's
    cast, subnormals, inf and NaN payloads included. A lookup took half the time of the
    arithmetic decoding it replaced (docs/benchmarks.md), and less than numpy's cast of the
    array, which converts one element at a time."""
    table = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16)
    table = table.astype(np.float32)
    table.flags.writeable = False
    return table


class BF16(Compressor):
    """``bf16``: bfloat16, the top 16 bits of the float32, round to nearest even (2n bytes).

    The wire array is uint16 (the bfloat16 bit patterns). Rounding adds 0x7FFF plus the lowest
    kept bit to the float32 bits before truncating; NaN stays NaN (quiet, sign kept), and values
    that round past the largest bfloat16 become ±inf. MPI has no bfloat16 type, so bf16 is not
    summable: its default aggregation is the two-phase exchange, which sums in float32.
    """

    name: ClassVar[str] = "bf16"
    preferred_aggregation: ClassVar[str] = "two_phase"

    def wire_layout(self, n: int) -> tuple[ArraySpec, ...]:
        return ((np.dtype(np.uint16), n),)

    def compress(
        self,
        x: np.ndarray,
        rng: np.random.Generator | None = None,
        meta: Mapping[str, Any] | None = None,
    ) -> Payload:
        x = check_bucket(x, "bf16.compress")
        bits = x.view(_U32)
        out = self.scratch("payload", x.size, np.uint16)
        t = self.scratch("work", min(x.size, BLOCK), _U32)
        for s in block_slices(x.size):
            u, tb = bits[s], t[: s.stop - s.start]
            np.right_shift(u, _U32(16), out=tb)
            np.bitwise_and(tb, _U32(1), out=tb)
            tb += u  # wraps only for NaN bit patterns, which are fixed below
            tb += _U32(0x7FFF)
            tb >>= _U32(16)
            np.copyto(out[s], tb, casting="unsafe")
            xb = x[s]
            if np.isnan(xb.max()):  # one cheap reduction: max propagates NaN
                nan = np.isnan(xb)
                out[s][nan] = (u[nan] >> _U32(16)).astype(np.uint16) | np.uint16(0x7FC0)
        return Payload((out,))

    def decompress(self, payload: Payload, n: int, out: np.ndarray | None = None) -> np.ndarray:
        check_payload(payload, self.wire_layout(n), "bf16.decompress")
        out = output_array(out, n, "bf16.decompress")
        bits, words = payload.arrays[0], out.view(_U32)
        for s in block_slices(n):  # the 16 bits into the high half of each float32
            np.copyto(words[s], bits[s])
            words[s] <<= _U32(16)
        return out
