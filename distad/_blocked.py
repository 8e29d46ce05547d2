"""Cache blocking for chains of numpy operations over large flat arrays.

A chain of k numpy operations over an array of n elements reads and writes memory k times; run
on consecutive blocks of ``BLOCK`` elements, each block's temporaries stay in a core's L2
cache and the array crosses the memory bus once. Used by the compressors and the optimizers.
"""

from __future__ import annotations

from collections.abc import Iterator

#: Elements per block: 64 Ki float32 (256 KiB) keeps a few temporaries of that size in a core's
#: L2 cache, and the per-call overhead of numpy (about 1 us) stays small beside the work per call.
BLOCK = 1 << 16


def block_slices(n: int, size: int = BLOCK) -> Iterator[slice]:
    """Consecutive slices of at most ``size`` elements covering range(n)."""
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))
