"""The minimal data set protocol and its in-memory implementation."""

from __future__ import annotations

from typing import Protocol

import numpy as np
from numpy.typing import ArrayLike

__all__ = ["ArrayDataset", "Dataset"]


class Dataset(Protocol):
    """What :class:`~distad.data.DataLoader` needs: a length and a batch gather.

    ``dataset[index]`` takes a 1-D int64 array of sample indices and returns a tuple
    of arrays whose first axis is that batch (one array per field, e.g. ``(X, y)``).
    Gathering a whole batch at once keeps batching vectorised; a data set that can
    only fetch one sample at a time does not fit this protocol.
    """

    def __len__(self) -> int: ...

    def __getitem__(self, index: np.ndarray) -> tuple[np.ndarray, ...]: ...


class ArrayDataset:
    """In-memory data set over arrays that share their first (sample) axis.

    ``ArrayDataset(X, y)`` holds ``X`` of shape ``(n, ...)`` and ``y`` of shape
    ``(n, ...)`` without copying or changing their dtypes (float32 stays float32);
    ``dataset[idx]`` returns ``(X[idx], y[idx])`` by numpy fancy indexing, so an int64
    index array of length ``b`` gives arrays with first axis ``b``. Raises if no array
    is given, if an array is 0-d, or if the first axes differ.
    """

    def __init__(self, *arrays: ArrayLike) -> None:
        if not arrays:
            raise ValueError("ArrayDataset needs at least one array")
        self.arrays: tuple[np.ndarray, ...] = tuple(np.asarray(a) for a in arrays)
        for i, a in enumerate(self.arrays):
            if a.ndim == 0:
                raise ValueError(f"ArrayDataset: array {i} is 0-d; it needs a sample axis")
        lengths = [len(a) for a in self.arrays]
        if len(set(lengths)) != 1:
            shapes = ", ".join(str(a.shape) for a in self.arrays)
            raise ValueError(f"ArrayDataset: arrays differ in their first axis: {shapes}")

    def __len__(self) -> int:
        return len(self.arrays[0])

    def __getitem__(self, index: np.ndarray | int | slice) -> tuple[np.ndarray, ...]:
        return tuple(a[index] for a in self.arrays)

    def __repr__(self) -> str:
        fields = ", ".join(f"{a.dtype}{list(a.shape)}" for a in self.arrays)
        return f"ArrayDataset({fields})"
