"""Adam and AdamW (decoupled weight decay), with bias correction, as in PyTorch."""

from __future__ import annotations

import math

import numpy as np

from distad.autodiff import Tensor

from .optimizer import Optimizer, ParamsT

__all__ = ["Adam", "AdamW"]


class Adam(Optimizer):
    """Adam (Kingma & Ba) with PyTorch's semantics, per parameter p with gradient g, step t:

        g = g + weight_decay * p                 (L2 penalty; see AdamW for decoupled decay)
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g**2       (amsgrad: v_max = max(v_max, v), used below)
        p = p - lr / (1 - beta1**t) * m / (sqrt(v) / sqrt(1 - beta2**t) + eps)

    State per parameter: "step" (int), "exp_avg" m and "exp_avg_sq" v (and
    "max_exp_avg_sq" with amsgrad), arrays of p's shape and dtype.
    """

    per_param_state = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
    _decoupled = False

    def __init__(self, params: ParamsT, lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, amsgrad: bool = False) -> None:
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps,
                                      weight_decay=weight_decay, amsgrad=amsgrad))

    def _check_group(self, group: dict) -> None:
        b1, b2 = group["betas"]
        name = type(self).__name__
        if not (0.0 <= b1 < 1.0 and 0.0 <= b2 < 1.0):
            raise ValueError(f"{name}: betas must lie in [0, 1), got {group['betas']}")
        if group["lr"] < 0 or group["eps"] < 0 or group["weight_decay"] < 0:
            raise ValueError(f"{name}: lr, eps and weight_decay must be >= 0")

    def _update(self, p: Tensor, grad: np.ndarray, state: dict, group: dict) -> None:
        lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
        b1, b2 = group["betas"]
        if not state:
            state["step"] = 0
            state["exp_avg"] = np.zeros_like(p.data)
            state["exp_avg_sq"] = np.zeros_like(p.data)
            if group["amsgrad"]:
                state["max_exp_avg_sq"] = np.zeros_like(p.data)
        state["step"] += 1
        t = state["step"]
        decay = 1.0 - lr * wd if wd and self._decoupled else None  # AdamW's, else L2's wd
        consts = (decay, b1, b2, 0.0 if decay is not None else wd, eps,
                  math.sqrt(1.0 - b2**t), lr / (1.0 - b1**t))
        self._blocked(_adam_kernel, (p.data, np.asarray(grad), state["exp_avg"],
                                     state["exp_avg_sq"], state.get("max_exp_avg_sq")), consts)


def _adam_kernel(w: np.ndarray, g: np.ndarray, m: np.ndarray, v: np.ndarray,
                 vmax: np.ndarray | None, consts: tuple[float, ...], t1: np.ndarray,
                 t2: np.ndarray) -> None:
    """One Adam update of the weights ``w`` in place (the formulas of :class:`Adam`; the
    moments m, v and, with amsgrad, vmax updated too), with two scratch arrays of w's shape.
    Applied block by block, so that the chain of operations stays in cache. ``consts``:
    AdamW's decay factor 1 - lr * weight_decay (None for Adam), beta1, beta2, Adam's L2
    weight decay (0 for AdamW), eps, sqrt(1 - beta2**t) and lr / (1 - beta1**t)."""
    decay, b1, b2, wd, eps, c2, step_size = consts
    if decay is not None:
        w *= decay
    if wd:
        np.multiply(w, wd, out=t1)
        t1 += g
        g = t1
    m *= b1
    np.multiply(g, 1.0 - b1, out=t2)
    m += t2
    v *= b2
    np.multiply(g, g, out=t2)
    t2 *= 1.0 - b2
    v += t2
    if vmax is not None:
        np.maximum(vmax, v, out=vmax)
        v = vmax
    np.sqrt(v, out=t2)
    t2 /= c2
    t2 += eps
    np.divide(m, t2, out=t2)
    t2 *= step_size
    w -= t2


class AdamW(Adam):
    """Adam with decoupled weight decay (Loshchilov & Hutter), PyTorch's semantics:

        p = p * (1 - lr * weight_decay), then the Adam step without the L2 term.

    weight_decay defaults to 0.01, as in PyTorch.
    """

    _decoupled = True

    def __init__(self, params: ParamsT, lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.01, amsgrad: bool = False) -> None:
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad)
