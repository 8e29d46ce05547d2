"""Gradient clipping: rescale by the global norm, or clamp each entry.

Both replace `p.grad` with a new array (never modify it in place: the engine
may share one gradient array between two leaves) and keep its dtype.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np

from distad.autodiff import Tensor

__all__ = ["clip_grad_norm", "clip_grad_value"]


def _with_grads(params: Tensor | Iterable[Tensor]) -> list[Tensor]:
    ps = [params] if isinstance(params, Tensor) else list(params)
    return [p for p in ps if p.grad is not None]


def clip_grad_norm(params: Tensor | Iterable[Tensor], max_norm: float,
                   norm_type: float = 2.0, error_if_nonfinite: bool = False) -> float:
    """Scale all gradients by min(1, max_norm / (total_norm + 1e-6)); return total_norm.

    total_norm is the `norm_type`-norm (2 by default, `math.inf` for the max)
    of all gradients concatenated into one vector, computed before clipping,
    as a Python float (per-parameter sums added in float64). Parameters without a gradient
    are skipped. A NaN/Inf norm raises with `error_if_nonfinite`, else the
    gradients are left as they are.
    """
    ps = _with_grads(params)
    if not ps:
        return 0.0
    total = total_norm(norm_terms([p.grad for p in ps], norm_type), norm_type)
    scale_grads(ps, max_norm, total, error_if_nonfinite)
    return total


def norm_terms(grads: list[np.ndarray], norm_type: float) -> list[float]:
    """Each gradient's part of the total norm (its max |g|, sum g^2 or sum |g|^p), in order."""
    norm_type = float(norm_type)
    if norm_type == math.inf:
        return [float(np.abs(g).max()) if g.size else 0.0 for g in grads]
    if norm_type == 2.0:
        return [float(np.vdot(g, g)) for g in grads]  # BLAS dot
    return [float(np.sum(np.abs(g.astype(np.float64)) ** norm_type)) for g in grads]


def total_norm(terms: list[float], norm_type: float) -> float:
    """The norm from `norm_terms` of all gradients (added in the order given)."""
    norm_type = float(norm_type)
    if norm_type == math.inf:
        return max(terms, default=0.0)
    if norm_type == 2.0:
        return math.sqrt(sum(terms))
    return sum(terms) ** (1.0 / norm_type)


def scale_grads(params: list[Tensor], max_norm: float, total: float,
                error_if_nonfinite: bool = False) -> None:
    """Clip `params`' gradients, whose total norm is `total`, to `max_norm`."""
    if not math.isfinite(total):
        if error_if_nonfinite:
            raise FloatingPointError(f"clip_grad_norm: the total gradient norm is {total}")
        return
    coef = float(max_norm) / (total + 1e-6)
    if coef < 1.0:
        for p in params:
            p.grad = p.grad * coef


def clip_grad_value(params: Tensor | Iterable[Tensor], clip_value: float) -> None:
    """Clamp every gradient entry to [-clip_value, clip_value]."""
    c = float(clip_value)
    if c < 0:
        raise ValueError(f"clip_grad_value: clip_value must be >= 0, got {clip_value}")
    for p in _with_grads(params):
        p.grad = np.clip(p.grad, -c, c).astype(p.grad.dtype, copy=False)
