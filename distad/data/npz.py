"""Classification data of your own, from a numpy ``.npz`` file (``distad train --dataset F``).

The file holds either ``X`` and ``y`` (split into train and test by ``train_test_split``) or
``X_train``, ``y_train``, ``X_test``, ``y_test`` (used as they are). ``X`` is any numeric array
of shape (n, ...) (cast to float32); ``y`` holds integer class labels 0..C-1, shape (n,).
Read with ``allow_pickle=False``: a file that needs pickle is refused, never executed.
"""

from __future__ import annotations

from os import PathLike

import numpy as np

__all__ = ["load_npz"]

_SPLIT = ("X_train", "y_train", "X_test", "y_test")


def load_npz(path: str | PathLike) -> dict[str, np.ndarray]:
    """The arrays of a classification ``.npz``, checked: {"X", "y"} or the four split ones.

    X arrays come back float32, y arrays int64. Raises ValueError naming the file and what
    is wrong (missing keys, lengths that differ, labels that are not integers >= 0, values
    that are not finite), FileNotFoundError if there is no such file.
    """
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except ValueError as e:  # object arrays need pickle
        raise ValueError(f"{path}: cannot be read without pickle ({e}); save plain numeric "
                         f"arrays with np.savez") from None
    keys = set(arrays)
    if set(_SPLIT) <= keys:
        pairs = [("X_train", "y_train"), ("X_test", "y_test")]
    elif {"X", "y"} <= keys:
        pairs = [("X", "y")]
    else:
        raise ValueError(f"{path}: expected arrays X and y, or {', '.join(_SPLIT)}; the file "
                         f"has {', '.join(sorted(keys)) or 'none'}")
    out: dict[str, np.ndarray] = {}
    for xk, yk in pairs:
        X, y = arrays[xk], arrays[yk]
        if X.ndim < 2 or y.ndim != 1 or len(X) != len(y) or not len(y):
            raise ValueError(f"{path}: {xk} must be (n, features...) and {yk} (n,) with the same "
                             f"n > 0, got {X.shape} and {y.shape}")
        if not np.issubdtype(X.dtype, np.number) or np.issubdtype(X.dtype, np.complexfloating):
            raise ValueError(f"{path}: {xk} must be real numbers, got dtype {X.dtype}")
        X = X.astype(np.float32, copy=False)
        if not np.isfinite(X).all():
            raise ValueError(f"{path}: {xk} holds NaN or infinite values")
        if np.issubdtype(y.dtype, np.floating) and np.array_equal(y, np.round(y)):
            y = y.astype(np.int64)
        if not np.issubdtype(y.dtype, np.integer) or (y < 0).any():
            raise ValueError(f"{path}: {yk} must hold class labels 0, 1, 2, ... (integers >= 0), "
                             f"got dtype {y.dtype} with minimum {y.min()}")
        out[xk], out[yk] = X, y.astype(np.int64, copy=False)
    if len(pairs) == 2 and out["X_train"].shape[1:] != out["X_test"].shape[1:]:
        raise ValueError(f"{path}: X_train and X_test samples differ in shape: "
                         f"{out['X_train'].shape[1:]} and {out['X_test'].shape[1:]}")
    return out
