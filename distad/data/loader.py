"""Batching with seeded, reproducible shuffling."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np

from distad.data.dataset import Dataset
from distad.data.sampler import check_int, epoch_permutation

__all__ = ["DataLoader"]


class DataLoader:
    """Iterate a :class:`~distad.data.Dataset` in batches: tuples of numpy arrays.

    Each batch is ``dataset[idx]`` for an int64 index array ``idx`` of at most
    ``batch_size`` entries, e.g. ``(X[idx], y[idx])`` with dtypes unchanged; the last,
    smaller batch is kept unless ``drop_last``. The order is ``0..n-1``, or with
    ``shuffle=True`` the permutation seeded by ``(seed, epoch)`` (the one
    :class:`~distad.data.DistributedSampler` uses too), or with ``sampler`` the
    sampler's indices (``sampler.indices()`` if it has it, else iterating it).
    Without a sampler each pass advances the epoch by one, so consecutive passes
    reshuffle as in PyTorch; ``set_epoch(e)`` makes the next pass use epoch ``e``
    exactly (call it every epoch to make a resumed run reproduce the original). With a
    sampler the loader never advances the sampler's epoch on its own: call
    ``loader.set_epoch(e)`` (which forwards to the sampler) or ``sampler.set_epoch(e)``.
    ``len(loader)`` is the number of batches per pass.
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        *,
        shuffle: bool = False,
        seed: int = 0,
        drop_last: bool = False,
        sampler: Iterable[int] | None = None,
    ) -> None:
        self.dataset = dataset
        self.batch_size = check_int("batch_size", batch_size, minimum=1)
        self.seed = check_int("seed", seed, minimum=0)
        if sampler is not None and shuffle:
            raise ValueError(
                "DataLoader: shuffle=True and a sampler are mutually exclusive; the "
                "sampler decides the order (e.g. DistributedSampler(..., shuffle=True))"
            )
        self.shuffle = bool(shuffle)
        self.drop_last = bool(drop_last)
        self.sampler = sampler
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Use ``epoch`` for the next pass; also forwarded to the sampler if it has one."""
        self.epoch = check_int("epoch", epoch, minimum=0)
        set_sampler_epoch = getattr(self.sampler, "set_epoch", None)
        if set_sampler_epoch is not None:
            set_sampler_epoch(self.epoch)

    def _order(self) -> np.ndarray:
        if self.sampler is not None:
            indices = getattr(self.sampler, "indices", None)
            if indices is not None:
                return np.asarray(indices(), dtype=np.int64)
            return np.fromiter(self.sampler, dtype=np.int64)
        if self.shuffle:
            return epoch_permutation(len(self.dataset), self.seed, self.epoch)
        return np.arange(len(self.dataset), dtype=np.int64)

    def _num_indices(self) -> int:
        if self.sampler is None:
            return len(self.dataset)
        if hasattr(self.sampler, "__len__"):
            return len(self.sampler)  # type: ignore[arg-type]
        return len(self._order())

    def __iter__(self) -> Iterator[tuple[np.ndarray, ...]]:
        order = self._order()
        if self.sampler is None:
            self.epoch += 1
        stop = len(order) - len(order) % self.batch_size if self.drop_last else len(order)
        starts = range(0, stop, self.batch_size)
        return (self._batch(order[i : i + self.batch_size]) for i in starts)

    def _batch(self, index: np.ndarray) -> tuple[np.ndarray, ...]:
        batch = self.dataset[index]
        return batch if isinstance(batch, tuple) else (batch,)

    def __len__(self) -> int:
        n = self._num_indices()
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __repr__(self) -> str:
        return (
            f"DataLoader({self.dataset!r}, batch_size={self.batch_size}, "
            f"shuffle={self.shuffle}, seed={self.seed}, drop_last={self.drop_last}, "
            f"sampler={self.sampler!r})"
        )
