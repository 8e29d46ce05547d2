"""Casts: the identity (``none``), IEEE half precision (``fp16``) and bfloat16 (``bf16``).

The casts keep every coordinate and only drop mantissa bits. fp16 is summable by MPI's
built-in SUM on MPI's half type (the allreduce divides by the rank count first, so the
half-precision sum cannot overflow); both fp16 and bf16 default to the two-phase exchange,
which sums the decoded chunks in float32 and re-rounds the mean once.
"""

from __future__ import annotations

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
)

_U32 = np.uint32


class Identity(Compressor):
    """``none``: the bucket itself goes on the wire (float32, 4n bytes); the baseline.

    The payload and the decompressed array are the input array itself, not copies.
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

    def decompress(self, payload: Payload, n: int) -> np.ndarray:
        check_payload(payload, self.wire_layout(n), "none.decompress")
        return payload.arrays[0].astype(np.float32, copy=False)


class FP16(Compressor):
    """``fp16``: IEEE half precision, round to nearest even (2n bytes).

    Values beyond the half range (|x| >= 65520) become ±inf, so an overflow is visible
    rather than clipped away; magnitudes below 2**-24 flush to zero.
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
        with np.errstate(over="ignore"):
            return Payload((x.astype(np.float16),))

    def decompress(self, payload: Payload, n: int) -> np.ndarray:
        check_payload(payload, self.wire_layout(n), "fp16.decompress")
        return payload.arrays[0].astype(np.float32)


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
        out = np.empty(x.size, np.uint16)
        t = np.empty(min(x.size, BLOCK), _U32)
        for s in block_slices(x.size):
            u, tb = bits[s], t[: s.stop - s.start]
            np.right_shift(u, _U32(16), out=tb)
            np.bitwise_and(tb, _U32(1), out=tb)
            tb += _U32(0x7FFF)
            tb += u  # wraps only for NaN bit patterns, which are fixed below
            np.right_shift(tb, _U32(16), out=tb)
            out[s] = tb
            xb = x[s]
            if np.isnan(xb.max()):  # one cheap reduction: max propagates NaN
                nan = np.isnan(xb)
                out[s][nan] = (u[nan] >> _U32(16)).astype(np.uint16) | np.uint16(0x7FC0)
        return Payload((out,))

    def decompress(self, payload: Payload, n: int) -> np.ndarray:
        check_payload(payload, self.wire_layout(n), "bf16.decompress")
        # Write the 16 bits into the high half of each zeroed float32: one strided copy.
        out = np.zeros(n, np.float32)
        high = 1 if np.little_endian else 0
        out.view(np.uint16)[high::2] = payload.arrays[0]
        return out
