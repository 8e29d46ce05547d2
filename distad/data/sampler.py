"""Seeded epoch orderings and the per-rank shards of a data set.

Every ordering in ``distad.data`` comes from :func:`epoch_permutation`, a pure
function of ``(n, seed, epoch)``. The single-process :class:`~distad.data.DataLoader`
and :class:`DistributedSampler` therefore agree: with ``p`` ranks, a per-rank batch
size ``b`` and no padding, the ``p`` rank batches of step ``k`` together are exactly
the single-process batch ``k`` of size ``p * b`` (the shards are strided, as in
PyTorch), which is what lets a data-parallel run reproduce the one-process gradient.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterator

import numpy as np

__all__ = ["DistributedSampler", "epoch_permutation", "shard_indices"]


def check_int(name: str, value: object, *, minimum: int) -> int:
    """Return ``value`` as a Python int, or raise naming the argument.

    Accepts Python and numpy integers (not bools, not floats such as ``2.0``), so a
    typo never silently truncates a size or a rank.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
    value = int(value)
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    """Return the shuffled order of ``range(n)`` for one epoch: int64, shape ``(n,)``.

    The generator is seeded with ``SeedSequence([seed, epoch])``, so the order is a
    pure function of ``(n, seed, epoch)`` (the same on every rank and every call) and
    distinct ``(seed, epoch)`` pairs never alias the way ``seed + epoch`` would.
    """
    n = check_int("n", n, minimum=0)
    seed = check_int("seed", seed, minimum=0)
    epoch = check_int("epoch", epoch, minimum=0)
    rng = np.random.default_rng(np.random.SeedSequence([seed, epoch]))
    return rng.permutation(n).astype(np.int64, copy=False)


def shard_indices(
    n: int,
    num_replicas: int,
    rank: int,
    *,
    shuffle: bool = True,
    seed: int = 0,
    epoch: int = 0,
    drop_last: bool = False,
    start: int = 0,
) -> np.ndarray:
    """Return the indices into a data set of size ``n`` that ``rank`` owns this epoch.

    The epoch's order (:func:`epoch_permutation` if ``shuffle``, else ``0..n-1``) is
    made a multiple of ``num_replicas`` long, by wrapping around to its start
    (``drop_last=False``: the first ``ceil(n/p)*p - n`` samples of the order are seen
    twice) or by cutting the tail (``drop_last=True``: the last ``n mod p`` samples of
    the order are skipped this epoch), and rank ``r`` takes every ``p``-th entry
    starting at ``r``. Result: int64, shape ``(ceil(n/p),)`` or ``(n // p,)``, the same
    size on every rank. This is the pure function behind :class:`DistributedSampler`.

    ``start``: the first ``start`` entries of the epoch's order were already used (by a run
    on another number of ranks that this one resumes): the rest of the order, ``n - start``
    entries, is shared out as above instead. Step k of a run with ``p`` ranks and ``b``
    samples per rank uses entries ``[k p b, (k + 1) p b)`` of the order, so a run stopped
    after k steps continues on any number of ranks from ``start = k p b``.
    """
    n, num_replicas, rank, start = _check_shard(n, num_replicas, rank, drop_last, start)
    order = epoch_permutation(n, seed, epoch) if shuffle else np.arange(n, dtype=np.int64)
    order, n = order[start:], n - start
    if drop_last:
        total = (n // num_replicas) * num_replicas
        order = order[:total]
    else:
        total = -(-n // num_replicas) * num_replicas
        order = np.resize(order, total)  # repeats cyclically: pads by wrapping around
    return order[rank::num_replicas]


def _check_shard(n: int, num_replicas: int, rank: int, drop_last: bool, start: int
                 ) -> tuple[int, int, int, int]:
    """`shard_indices`'s arguments checked (naming the bad one) and made ints:
    (n, num_replicas, rank, start)."""
    n = check_int("n", n, minimum=1)
    num_replicas = check_int("num_replicas", num_replicas, minimum=1)
    rank = check_int("rank", rank, minimum=0)
    if rank >= num_replicas:
        raise ValueError(f"rank {rank} is out of range for num_replicas={num_replicas}")
    if drop_last and n < num_replicas:
        raise ValueError(
            f"drop_last=True with n={n} < num_replicas={num_replicas} would leave every "
            "rank with no samples; use drop_last=False (pad by wrapping) or fewer ranks"
        )
    start = check_int("start", start, minimum=0)
    if start >= n:
        raise ValueError(f"start {start} leaves nothing of an epoch of n={n} samples")
    if start and drop_last and n - start < num_replicas:
        raise ValueError(f"drop_last=True with {n - start} samples left after start={start} < "
                         f"num_replicas={num_replicas} would leave every rank with none")
    return n, num_replicas, rank, start


class DistributedSampler:
    """Each rank's disjoint shard of ``range(n)``, reshuffled every epoch from one seed.

    All ranks build the same epoch order from ``(seed, epoch)`` and take strided,
    disjoint shards of it, so they need no communication. Shards have the same size
    on every rank, which keeps the number of steps (and collectives) equal:

    - ``drop_last=False`` (default, as in PyTorch): the order is padded by wrapping
      around to its start, so every sample is seen and ``ceil(n/p)*p - n`` samples are
      seen twice per epoch; ``len(self) == ceil(n / p)``.
    - ``drop_last=True``: the last ``n mod p`` samples of the epoch's order are skipped
      (a different few each epoch when shuffling); ``len(self) == n // p``.

    Call :meth:`set_epoch` at the start of every epoch (as with PyTorch's sampler);
    without it every epoch repeats the same order. :meth:`indices` gives the shard as
    an int64 array; iterating yields its elements as Python ints. Arguments are
    validated at construction, naming the bad one (e.g. a rank outside
    ``[0, num_replicas)``).
    """

    def __init__(
        self,
        n: int,
        num_replicas: int,
        rank: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
    ) -> None:
        self.n = check_int("n", n, minimum=1)
        self.num_replicas = check_int("num_replicas", num_replicas, minimum=1)
        self.rank = check_int("rank", rank, minimum=0)
        self.seed = check_int("seed", seed, minimum=0)
        self.shuffle = bool(shuffle)
        self.drop_last = bool(drop_last)
        self.epoch = self.start = 0
        # Validates the combination (rank range, drop_last with n < num_replicas).
        _check_shard(self.n, self.num_replicas, self.rank, self.drop_last, self.start)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select the epoch whose order :meth:`indices` and iteration will use, and how many
        entries of its order to skip (``start``, see :func:`shard_indices`: resuming a run
        of another rank count mid-epoch); ``len(self)`` follows."""
        epoch = check_int("epoch", epoch, minimum=0)
        *_, start = _check_shard(self.n, self.num_replicas, self.rank, self.drop_last, start)
        self.epoch, self.start = epoch, start

    @property
    def num_samples(self) -> int:
        """This rank's shard size this epoch (``len(self)``), without building the order."""
        left, p = self.n - self.start, self.num_replicas
        return left // p if self.drop_last else -(-left // p)

    @property
    def total_size(self) -> int:
        """Entries of the epoch's order that the ranks take together (padded or cut)."""
        return self.num_samples * self.num_replicas

    def indices(self) -> np.ndarray:
        """Return this rank's shard for the current epoch: int64, shape ``(len(self),)``."""
        return shard_indices(
            self.n,
            self.num_replicas,
            self.rank,
            shuffle=self.shuffle,
            seed=self.seed,
            epoch=self.epoch,
            drop_last=self.drop_last,
            start=self.start,
        )

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices().tolist())

    def __len__(self) -> int:
        return self.num_samples

    def __repr__(self) -> str:
        return (
            f"DistributedSampler(n={self.n}, num_replicas={self.num_replicas}, "
            f"rank={self.rank}, shuffle={self.shuffle}, seed={self.seed}, "
            f"drop_last={self.drop_last}, epoch={self.epoch}, start={self.start})"
        )
