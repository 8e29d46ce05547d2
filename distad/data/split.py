"""Deterministic, optionally stratified train/test splits."""

from __future__ import annotations

import math
import numbers

import numpy as np
from numpy.typing import ArrayLike

from distad.data.sampler import check_int

__all__ = ["split_indices", "train_test_split"]


def _test_count(n: int, test_size: float | int) -> int:
    if isinstance(test_size, bool) or not isinstance(test_size, numbers.Real):
        raise TypeError(f"test_size must be a fraction or a count, got {test_size!r}")
    if isinstance(test_size, numbers.Integral):
        n_test = int(test_size)
    elif 0.0 < test_size < 1.0:
        n_test = math.ceil(float(test_size) * n)  # as scikit-learn rounds
    else:
        raise ValueError(f"test_size as a fraction must lie in (0, 1), got {test_size}")
    if not 0 < n_test < n:
        raise ValueError(
            f"test_size={test_size} gives {n_test} test samples out of {n}; "
            "both the train and the test part need at least one"
        )
    return n_test


def split_indices(
    labels: ArrayLike,
    *,
    test_size: float | int = 0.2,
    seed: int = 0,
    stratify: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(train_idx, test_idx)``, disjoint int64 arrays that cover ``range(n)``.

    ``labels`` has length ``n`` (1-D class labels to stratify by; any targets of
    shape ``(n, ...)`` with ``stratify=False``). ``test_size`` is a fraction in ``(0, 1)``
    (rounded up to a count, as scikit-learn does) or a count. With ``stratify`` each
    class contributes ``test_size`` of its samples to the test part, counts rounded by
    largest remainder so they add up exactly and each is within one of the exact
    share; without it the test part is a uniform random subset. Both parts come in a
    random order (never sorted by class). A pure function of its arguments: the same
    ``seed`` always gives the same split.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1 and (stratify or labels.ndim == 0):
        raise ValueError(
            f"split_indices: labels must be 1-D to stratify by class, got shape {labels.shape}"
        )
    n = len(labels)
    n_test = _test_count(n, test_size)
    seed = check_int("seed", seed, minimum=0)
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n).astype(np.int64, copy=False)
    if not stratify:
        test, train = perm[:n_test], perm[n_test:]
        return train, test
    _, klass, counts = np.unique(labels, return_inverse=True, return_counts=True)
    klass = klass.reshape(-1)
    # Largest remainder in exact integer arithmetic: floor shares, then one more for
    # the classes with the largest fractional parts (ties to the lower class).
    numerators = n_test * counts
    per_class = numerators // n
    extra = n_test - int(per_class.sum())
    per_class[np.argsort(-(numerators % n), kind="stable")[:extra]] += 1
    # A random order within each class: stable sort of a random permutation by class.
    by_class = perm[np.argsort(klass[perm], kind="stable")]
    starts = np.cumsum(counts) - counts
    rank_in_class = np.arange(n) - starts[klass[by_class]]
    is_test = rank_in_class < per_class[klass[by_class]]
    train, test = by_class[~is_test], by_class[is_test]
    return rng.permutation(train), rng.permutation(test)


def train_test_split(
    X: ArrayLike,
    y: ArrayLike,
    *,
    test_size: float | int = 0.2,
    seed: int = 0,
    stratify: bool = True,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Split ``(X, y)`` into ``(X_train, X_test, y_train, y_test)``, as scikit-learn does.

    ``X`` has shape ``(n, ...)`` and ``y`` shape ``(n,)`` (or ``(n, ...)`` targets with
    ``stratify=False``); the parts keep their dtypes
    and trailing shapes. The split is :func:`split_indices` of ``y`` (stratified by
    class by default, deterministic in ``seed``), so the test part has about
    ``test_size`` of every class.
    """
    X, y = np.asarray(X), np.asarray(y)
    if X.ndim == 0 or len(X) != len(y):
        raise ValueError(
            f"train_test_split: X and y need the same first axis, got {X.shape} and {y.shape}"
        )
    train, test = split_indices(y, test_size=test_size, seed=seed, stratify=stratify)
    return X[train], X[test], y[train], y[test]
