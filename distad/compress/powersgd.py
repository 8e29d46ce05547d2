"""PowerSGD (Vogels et al. 2019): a rank-r approximation M ~ P Q^T from one power iteration.

This module holds the local linear algebra: how a bucket is read as matrices, which of them are
worth compressing, and the orthogonalisation. The exchange itself (allreduce P, orthogonalise,
Q = M^T P, allreduce Q) is a multi-round scheme and lives in ``aggregate.powersgd``, which
keeps the warm-started Q between steps as run state.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from distad._blocked import BLOCK

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


@dataclass(frozen=True)
class MatrixBlock:
    """One tensor of a bucket: elements [start, start + size) read as a (rows, cols) matrix.

    ``compressed`` says whether a rank-r approximation pays; if not, the block is sent as is.
    For the default flat view ``rows * cols`` may exceed ``size``; the tail is zero padding.
    """

    start: int
    size: int
    rows: int
    cols: int
    compressed: bool


def orthogonalise(p: np.ndarray) -> np.ndarray:
    """Orthonormal columns spanning P's columns (float32, P's shape), from a reduced QR."""
    return np.linalg.qr(p)[0].astype(np.float32, copy=False)


# The products with the big matrix M run on bands of rows of about BLOCK elements: BLAS's gemm
# on a (rows, cols) @ (cols, r) or (rows, r) @ (r, cols) product with r of 1 to 4 spends more
# time packing panels than multiplying, and on bands that fit in cache it runs 2-3x faster.


def _band(cols: int) -> int:
    return max(1, BLOCK // max(cols, 1))


def matmul_rows(m: np.ndarray, q: np.ndarray, out: np.ndarray) -> np.ndarray:
    """out = M Q for M (rows, cols) and Q (cols, r), band by band (float32)."""
    step = _band(m.shape[1])
    for i in range(0, m.shape[0], step):
        np.matmul(m[i : i + step], q, out=out[i : i + step])
    return out


def matmul_transposed(m: np.ndarray, p: np.ndarray, out: np.ndarray) -> np.ndarray:
    """out = M^T P for M (rows, cols) and P (rows, r): the sum over bands of M_b^T P_b."""
    step = _band(m.shape[1])
    if step >= m.shape[0]:
        return np.matmul(m.T, p, out=out)
    out.fill(0)
    for i in range(0, m.shape[0], step):
        out += m[i : i + step].T @ p[i : i + step]
    return out


def low_rank_into(p: np.ndarray, q: np.ndarray, out: np.ndarray, subtract: bool = False
                  ) -> np.ndarray:
    """The first out.size elements of P Q^T (P (rows, r), Q (cols, r)), row-major, into the
    flat float32 ``out`` (``subtract``: out -= them), band by band."""
    cols = q.shape[0]
    qt = np.ascontiguousarray(q.T)
    full = out.size // cols
    rows = out[: full * cols].reshape(full, cols)
    step = _band(cols)
    band = np.empty((min(step, full), cols), np.float32) if subtract else None
    for i in range(0, full, step):
        j = min(i + step, full)
        if band is None:
            np.matmul(p[i:j], qt, out=rows[i:j])
        else:
            rows[i:j] -= np.matmul(p[i:j], qt, out=band[: j - i])
    if full * cols < out.size:  # a last, partial row (the rest is zero padding)
        last = (p[full] @ qt)[: out.size - full * cols]
        if subtract:
            out[full * cols :] -= last
        else:
            out[full * cols :] = last
    return out


@dataclass(frozen=True)
class LowRankVector:
    """What one rank's PowerSGD contribution decompresses to, without the dense array: P Q^T
    on each compressed block, the block's own values (``dense``) on the others.

    Error feedback subtracts it from the compensated bucket band by band, in cache, instead of
    writing a dense copy and reading it back. ``np.asarray`` gives the dense vector.
    """

    blocks: tuple[MatrixBlock, ...]
    factors: tuple[tuple[np.ndarray, np.ndarray], ...]  # (P, Q) per compressed block
    dense: tuple[np.ndarray, ...]  # the values of each uncompressed block
    n: int

    def subtract_from(self, out: np.ndarray) -> None:
        """``out -= self`` in place (float32, (n,))."""
        self._apply(out, subtract=True)

    def write_into(self, out: np.ndarray) -> np.ndarray:
        """The dense vector, written into ``out`` (float32, (n,)), which is returned."""
        return self._apply(out, subtract=False)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = self.write_into(np.empty(self.n, np.float32))
        return out if dtype is None else out.astype(dtype, copy=False)

    def _apply(self, out: np.ndarray, subtract: bool) -> np.ndarray:
        factors, dense = iter(self.factors), iter(self.dense)
        for b in self.blocks:
            part = out[b.start : b.start + b.size]
            if b.compressed:
                low_rank_into(*next(factors), part, subtract=subtract)
            elif subtract:
                part -= next(dense)
            else:
                part[...] = next(dense)
        return out


class PowerSGD(Compressor):
    """``powersgd:r``: rank-r PowerSGD, as a compressor for one bucket and as an exchange plan.

    ``plan(n, shapes)`` reads the bucket as matrices: each tensor of ``shapes`` (their sizes
    must add up to n) becomes (shape[0], prod(shape[1:])); without shapes the whole bucket is
    one (ceil(sqrt n), ceil(n / rows)) matrix, zero-padded. A matrix is compressed when
    (rows + cols) r * min_compression_rate < rows * cols; vectors and small matrices go
    uncompressed (float32). Alone (``compress``), one power iteration from a Q drawn from
    ``rng`` (or ``meta["q"]``): P = orth(M Q), Q' = M^T P; payload (P, Q') flattened, float32,
    4 r (rows + cols) bytes; ``decompress`` returns P Q'^T, which equals M when rank(M) <= r.
    """

    name: ClassVar[str] = "powersgd"
    multi_round: ClassVar[bool] = True
    needs_shared_seed: ClassVar[bool] = True
    preferred_aggregation: ClassVar[str] = "powersgd"

    def __init__(self, rank: int, min_compression_rate: float = 2.0) -> None:
        if int(rank) != rank or rank < 1:
            raise ValueError(f"powersgd: rank must be a positive integer, got {rank!r}")
        self.rank = int(rank)
        self.min_compression_rate = float(min_compression_rate)

    @property
    def spec(self) -> str:
        return f"powersgd:{self.rank}"

    def worth_compressing(self, rows: int, cols: int) -> bool:
        """Whether a rank-r approximation of a (rows, cols) matrix saves enough bytes."""
        return (rows + cols) * self.rank * self.min_compression_rate < rows * cols

    def plan(
        self, n: int, shapes: Sequence[Sequence[int]] | None = None
    ) -> tuple[MatrixBlock, ...]:
        """The matrices a bucket of n elements is read as (see the class docstring)."""
        if shapes is None:
            rows = math.isqrt(n - 1) + 1 if n > 1 else 1
            cols = -(-n // rows)
            return (MatrixBlock(0, n, rows, cols, self.worth_compressing(rows, cols)),)
        blocks, start = [], 0
        for shape in shapes:
            size = math.prod(shape)
            rows, cols = (shape[0], size // shape[0]) if len(shape) >= 2 and size else (size, 1)
            ok = len(shape) >= 2 and self.worth_compressing(rows, cols)
            blocks.append(MatrixBlock(start, size, rows, cols, ok))
            start += size
        if start != n:
            raise ValueError(
                f"powersgd.plan: shapes {list(shapes)} hold {start} elements, bucket {n}"
            )
        return tuple(blocks)

    def q_size(self, blocks: Sequence[MatrixBlock]) -> int:
        """Elements of the flat Q state (cols * r per compressed block)."""
        return sum(b.cols * self.rank for b in blocks if b.compressed)

    def wire_layout(self, n: int) -> tuple[ArraySpec, ...]:
        (b,) = self.plan(n)
        if not b.compressed:
            return ((_F32, n),)
        return ((_F32, b.rows * self.rank), (_F32, b.cols * self.rank))

    def compress(
        self,
        x: np.ndarray,
        rng: np.random.Generator | None = None,
        meta: Mapping[str, Any] | None = None,
    ) -> Payload:
        x = check_bucket(x, f"{self.spec}.compress")
        (b,) = self.plan(x.size)
        if not b.compressed:
            return Payload((x,))
        m = as_matrix(x, b, self.scratch("padded", b.rows * b.cols, np.float32))
        if meta and "q" in meta:
            q = np.asarray(meta["q"], np.float32).reshape(b.cols, self.rank)
        else:
            rng = need_rng(rng, f"{self.spec}.compress")
            q = rng.standard_normal((b.cols, self.rank), dtype=np.float32)
        p = orthogonalise(matmul_rows(m, q, np.empty((b.rows, self.rank), np.float32)))
        q = matmul_transposed(m, p, np.empty((b.cols, self.rank), np.float32))
        return Payload((p.reshape(-1), q.reshape(-1)))

    def decompress(self, payload: Payload, n: int, out: np.ndarray | None = None) -> np.ndarray:
        check_payload(payload, self.wire_layout(n), f"{self.spec}.decompress")
        (b,) = self.plan(n)
        if not b.compressed:
            if out is None:
                return payload.arrays[0].astype(np.float32, copy=False)
            np.copyto(output_array(out, n, f"{self.spec}.decompress"), payload.arrays[0])
            return out
        p = payload.arrays[0].reshape(b.rows, self.rank)
        q = payload.arrays[1].reshape(b.cols, self.rank)
        return low_rank_into(p, q, output_array(out, n, f"{self.spec}.decompress"))


def as_matrix(x: np.ndarray, block: MatrixBlock, scratch: np.ndarray | None = None) -> np.ndarray:
    """The block's elements of the flat x as a (rows, cols) float32 matrix (a zero-padded copy,
    in ``scratch`` if given, only when rows * cols exceeds the block's size)."""
    part = x[block.start : block.start + block.size]
    if block.rows * block.cols == block.size:
        return part.reshape(block.rows, block.cols)
    padded = np.empty(block.rows * block.cols, np.float32) if scratch is None else scratch
    padded[: block.size] = part
    padded[block.size :] = 0
    return padded.reshape(block.rows, block.cols)
