"""Finite-difference checking of derivative rules."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from .engine import Tensor
from .transforms import value_and_grad

__all__ = ["gradcheck", "GradcheckError"]


class GradcheckError(AssertionError):
    """Autodiff and finite differences disagree beyond tolerance."""


def _as_float64(a: Any) -> Any:
    v = a.data if isinstance(a, Tensor) else a
    if isinstance(v, (np.ndarray, float, np.floating)) and np.issubdtype(np.asarray(v).dtype,
                                                                         np.inexact):
        return np.array(v, dtype=np.float64)
    return v


def gradcheck(f: Callable, *args: Any, argnums: int | tuple[int, ...] | None = None,
              eps: float = 1e-6, atol: float = 1e-6, rtol: float = 1e-5, seed: int = 0) -> bool:
    """Compare f's reverse-mode gradient with central differences, in float64.

    Every floating-point argument (or those in argnums) is checked. A
    non-scalar output is reduced to a scalar with a fixed random projection,
    so every output element is exercised. Raises GradcheckError naming the
    argument, the worst element and both values; returns True otherwise.
    """
    args64 = [_as_float64(a) for a in args]
    if argnums is None:
        argnums = tuple(i for i, a in enumerate(args64) if isinstance(a, np.ndarray))
    elif isinstance(argnums, int):
        argnums = (argnums,)
    probe = f(*args64)
    shape = probe.shape if isinstance(probe, Tensor) else np.shape(probe)
    u = np.random.default_rng(seed).standard_normal(shape)

    def scalar_f(*a):
        out = f(*a)
        return out if out.size == 1 and shape == () else (out * u).sum()

    def value(*a):
        out = scalar_f(*a)
        return float(out.data if isinstance(out, Tensor) else out)

    _, grads = value_and_grad(scalar_f, argnums=argnums)(*args64)
    for k, i in enumerate(argnums):
        x = args64[i]
        ad = np.asarray(grads[k], dtype=np.float64)
        fd = np.empty_like(x)
        for j in range(x.size):  # one pair of evaluations per element: a test tool, not a hot path
            xp, xm = x.copy(), x.copy()
            xp.flat[j] += eps
            xm.flat[j] -= eps
            a_p, a_m = list(args64), list(args64)
            a_p[i], a_m[i] = xp, xm
            fd.flat[j] = (value(*a_p) - value(*a_m)) / (2 * eps)
        excess = np.abs(ad - fd) - (atol + rtol * np.abs(fd))
        if excess.size and excess.max() > 0:
            w = np.unravel_index(int(np.argmax(excess)), x.shape)
            raise GradcheckError(
                f"gradcheck: argument {i} (shape {x.shape}), worst element {tuple(map(int, w))}: "
                f"autodiff {ad[w]:.8g} vs finite differences {fd[w]:.8g} "
                f"(|diff| {abs(ad[w] - fd[w]):.3g}, tolerance {atol + rtol * abs(fd[w]):.3g})")
    return True
