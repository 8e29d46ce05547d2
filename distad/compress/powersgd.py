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

from .base import ArraySpec, Compressor, Payload, check_bucket, check_payload, need_rng

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
        m = as_matrix(x, b)
        if meta and "q" in meta:
            q = np.asarray(meta["q"], np.float32).reshape(b.cols, self.rank)
        else:
            rng = need_rng(rng, f"{self.spec}.compress")
            q = rng.standard_normal((b.cols, self.rank), dtype=np.float32)
        p = orthogonalise(m @ q)
        return Payload(((p.reshape(-1)), (m.T @ p).reshape(-1)))

    def decompress(self, payload: Payload, n: int) -> np.ndarray:
        check_payload(payload, self.wire_layout(n), f"{self.spec}.decompress")
        (b,) = self.plan(n)
        if not b.compressed:
            return payload.arrays[0].astype(np.float32, copy=False)
        p = payload.arrays[0].reshape(b.rows, self.rank)
        q = payload.arrays[1].reshape(b.cols, self.rank)
        return (p @ q.T).reshape(-1)[:n]


def as_matrix(x: np.ndarray, block: MatrixBlock) -> np.ndarray:
    """The block's elements of the flat x as a (rows, cols) float32 matrix (zero-padded copy
    only when rows * cols exceeds the block's size)."""
    part = x[block.start : block.start + block.size]
    if block.rows * block.cols == block.size:
        return part.reshape(block.rows, block.cols)
    padded = np.zeros(block.rows * block.cols, np.float32)
    padded[: block.size] = part
    return padded.reshape(block.rows, block.cols)
