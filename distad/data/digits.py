"""The handwritten-digits data set shipped with distad (see files/README.md)."""

from __future__ import annotations

import functools
import gzip
from importlib import resources

import numpy as np
from numpy.typing import DTypeLike

__all__ = ["DIGITS_SHAPE", "load_digits"]

DIGITS_SHAPE = (1797, 64)
"""(samples, pixels) of the bundled data set; each image is 8x8, pixels 0..16."""


@functools.cache
def _digits_raw() -> tuple[np.ndarray, np.ndarray]:
    # Parsed once per process; read-only so no caller can corrupt the cache.
    source = resources.files("distad.data").joinpath("files").joinpath("digits.csv.gz")
    with source.open("rb") as raw, gzip.open(raw, "rt") as text:
        table = np.loadtxt(text, delimiter=",", dtype=np.int64, ndmin=2)
    n, pixels = DIGITS_SHAPE
    if table.shape != (n, pixels + 1):
        raise RuntimeError(
            f"digits.csv.gz is damaged: expected {n} rows of {pixels + 1} values, "
            f"got shape {table.shape}"
        )
    images, labels = table[:, :pixels].astype(np.uint8), table[:, pixels].copy()
    if images.max() > 16 or table.min() < 0 or labels.max() > 9:
        raise RuntimeError("digits.csv.gz is damaged: pixels must be 0..16 and labels 0..9")
    images.flags.writeable = False
    labels.flags.writeable = False
    return images, labels


def load_digits(
    *,
    dtype: DTypeLike = np.float32,
    normalize: bool = True,
    shape: tuple[int, ...] = (64,),
) -> tuple[np.ndarray, np.ndarray]:
    """Return the bundled handwritten digits as ``(X, y)``: 1,797 8x8 images, 10 classes.

    ``X`` has shape ``(1797, *shape)`` and the given ``dtype`` (float32 by default):
    ``shape=(64,)`` gives flat rows for an MLP, ``shape=(1, 8, 8)`` gives NCHW images
    for a CNN (``(8, 8)`` works too; the product must be 64). With ``normalize`` the
    pixels are divided by 16 into ``[0, 1]`` (needs a floating dtype); without it they
    are the raw integers 0..16 cast to ``dtype``. ``y`` is int64 of shape ``(1797,)``
    with labels 0..9. The file ships inside the package (scikit-learn's copy of the
    UCI set, BSD-3-Clause, citation in ``distad/data/files/README.md``), so nothing is
    downloaded; it is parsed once per process and every call returns fresh arrays.
    """
    dtype = np.dtype(dtype)
    shape = tuple(int(s) for s in shape)
    if int(np.prod(shape)) != DIGITS_SHAPE[1]:
        raise ValueError(f"load_digits: shape {shape} does not hold 64 pixels (8x8)")
    if normalize and not np.issubdtype(dtype, np.floating):
        raise ValueError(f"load_digits: normalize=True needs a floating dtype, got {dtype}")
    images, labels = _digits_raw()
    X = images.astype(dtype)
    if normalize:
        X /= dtype.type(16)
    return X.reshape(len(X), *shape), labels.copy()
