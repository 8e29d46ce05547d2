"""Seeded synthetic data sets of any size, for tests and scaling runs."""

from __future__ import annotations

import math
from typing import Literal, overload

import numpy as np
from numpy.typing import DTypeLike

from distad.data.sampler import check_int

__all__ = ["make_classification", "make_regression"]


def _generator(seed: int | np.random.Generator) -> np.random.Generator:
    if isinstance(seed, np.random.Generator):
        return seed
    return np.random.default_rng(check_int("seed", seed, minimum=0))


def _float_dtype(dtype: DTypeLike, caller: str) -> np.dtype:
    dtype = np.dtype(dtype)
    if not np.issubdtype(dtype, np.floating):
        raise ValueError(f"{caller}: dtype must be a floating type, got {dtype}")
    return dtype


def _standard_normal(rng: np.random.Generator, shape: tuple[int, ...], dtype: np.dtype):
    # Draw directly in float32 where possible: half the memory and time of float64.
    draw = np.float64 if dtype.itemsize > 4 else np.float32
    return rng.standard_normal(shape, dtype=draw).astype(dtype, copy=False)


def make_classification(
    n_samples: int,
    n_features: int,
    n_classes: int = 2,
    *,
    seed: int | np.random.Generator = 0,
    class_sep: float = 3.0,
    dtype: DTypeLike = np.float32,
) -> tuple[np.ndarray, np.ndarray]:
    """Return Gaussian blobs ``(X, y)``: one unit-variance cluster per class.

    ``X`` has shape ``(n_samples, n_features)`` and ``dtype`` (float32 by default);
    ``y`` is int64 of shape ``(n_samples,)``, classes as balanced as ``n_samples``
    allows and in random order. Class centers have i.i.d. ``N(0, class_sep**2 /
    n_features)`` coordinates, so two centers lie about ``class_sep * sqrt(2)`` apart
    whatever ``n_features`` is and the task is equally hard at any width. ``seed`` is
    an int or a ``numpy.random.Generator``; the same int gives the same data.
    """
    n_samples = check_int("n_samples", n_samples, minimum=1)
    n_features = check_int("n_features", n_features, minimum=1)
    n_classes = check_int("n_classes", n_classes, minimum=2)
    if not class_sep >= 0:
        raise ValueError(f"make_classification: class_sep must be >= 0, got {class_sep}")
    dtype = _float_dtype(dtype, "make_classification")
    rng = _generator(seed)
    centers = _standard_normal(rng, (n_classes, n_features), dtype)
    centers *= dtype.type(class_sep / math.sqrt(n_features))
    y = rng.permutation(np.arange(n_samples, dtype=np.int64) % n_classes)
    X = _standard_normal(rng, (n_samples, n_features), dtype)
    X += centers[y]
    return X, y


@overload
def make_regression(
    n_samples: int,
    n_features: int,
    n_targets: int = ...,
    *,
    seed: int | np.random.Generator = ...,
    noise: float = ...,
    bias: float = ...,
    dtype: DTypeLike = ...,
    return_coef: Literal[False] = ...,
) -> tuple[np.ndarray, np.ndarray]: ...


@overload
def make_regression(
    n_samples: int,
    n_features: int,
    n_targets: int = ...,
    *,
    seed: int | np.random.Generator = ...,
    noise: float = ...,
    bias: float = ...,
    dtype: DTypeLike = ...,
    return_coef: Literal[True],
) -> tuple[np.ndarray, np.ndarray, np.ndarray]: ...


def make_regression(
    n_samples: int,
    n_features: int,
    n_targets: int = 1,
    *,
    seed: int | np.random.Generator = 0,
    noise: float = 0.1,
    bias: float = 0.0,
    dtype: DTypeLike = np.float32,
    return_coef: bool = False,
) -> tuple[np.ndarray, ...]:
    """Return ``(X, y)`` from a random linear teacher: ``y = X @ W + bias + noise * eps``.

    ``X`` is standard normal of shape ``(n_samples, n_features)``; the teacher ``W`` has
    shape ``(n_features, n_targets)`` with i.i.d. ``N(0, 1 / n_features)`` entries, so
    the clean targets have unit variance at any width; ``eps`` is standard normal.
    ``y`` has shape ``(n_samples, n_targets)`` even for one target, matching a
    ``Linear(n_features, n_targets)`` output (a ``(n,)`` target against ``(n, 1)``
    predictions would broadcast to ``(n, n)`` in a loss). All arrays have ``dtype``
    (float32 by default); ``return_coef=True`` also returns ``W``. ``seed`` is an int
    or a ``numpy.random.Generator``.
    """
    n_samples = check_int("n_samples", n_samples, minimum=1)
    n_features = check_int("n_features", n_features, minimum=1)
    n_targets = check_int("n_targets", n_targets, minimum=1)
    if not noise >= 0:
        raise ValueError(f"make_regression: noise must be >= 0, got {noise}")
    dtype = _float_dtype(dtype, "make_regression")
    rng = _generator(seed)
    W = _standard_normal(rng, (n_features, n_targets), dtype)
    W *= dtype.type(1.0 / math.sqrt(n_features))
    X = _standard_normal(rng, (n_samples, n_features), dtype)
    y = X @ W
    y += dtype.type(bias)
    if noise > 0:
        eps = _standard_normal(rng, (n_samples, n_targets), dtype)
        eps *= dtype.type(noise)
        y += eps
    return (X, y, W) if return_coef else (X, y)
