"""Large flat arrays: cache blocking for chains of numpy operations, and zeroing.

A chain of k numpy operations over an array of n elements reads and writes memory k times; run
on consecutive blocks of ``BLOCK`` elements, each block's temporaries stay in a core's L2
cache and the array crosses the memory bus once. Used by the compressors and the optimizers.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

#: Elements per block: 64 Ki float32 (256 KiB) keeps a few temporaries of that size in a core's
#: L2 cache, and the per-call overhead of numpy (about 1 us) stays small beside the work per call.
BLOCK = 1 << 16


def block_slices(n: int, size: int = BLOCK) -> Iterator[slice]:
    """Consecutive slices of at most ``size`` elements covering range(n)."""
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


#: Below this many bytes ``ndarray.fill`` is as fast: the array is in cache.
_ZERO_COPY_MIN = 1 << 20
#: Bytes that are never written: the kernel maps them all to its one zero page, so reading them
#: costs no memory traffic. Grown by replacement, never in place; read-only.
_zeros = np.zeros(0, np.uint8)


def zero_fill(out: np.ndarray) -> np.ndarray:
    """out[...] = 0 for a C-contiguous array, at the speed of a copy or faster; returns out.

    numpy's ``fill(0)`` writes with ordinary stores (each cache line read before it is
    written): 8.6 ms for 64 MB here. A copy from bytes that were never written is a memcpy,
    with streaming stores, from a source that is always in cache: 4.5 ms.
    """
    global _zeros
    if out.nbytes < _ZERO_COPY_MIN or not out.flags.c_contiguous:
        out.fill(0)
        return out
    zeros = _zeros
    if zeros.size < out.nbytes:
        zeros = np.zeros(max(out.nbytes, 2 * zeros.size), np.uint8)
        zeros.flags.writeable = False
        _zeros = zeros
    np.copyto(out.reshape(-1).view(np.uint8), zeros[: out.nbytes])
    return out
