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
        if wd and self._decoupled:
            p.data *= 1.0 - lr * wd
        elif wd:
            grad = grad + wd * p.data
        m, v = state["exp_avg"], state["exp_avg_sq"]
        m *= b1
        m += (1.0 - b1) * grad
        v *= b2
        v += (1.0 - b2) * (grad * grad)
        if group["amsgrad"]:
            np.maximum(state["max_exp_avg_sq"], v, out=state["max_exp_avg_sq"])
            v = state["max_exp_avg_sq"]
        denom = np.sqrt(v)
        denom /= math.sqrt(1.0 - b2**t)
        denom += eps
        p.data -= (lr / (1.0 - b1**t)) * (m / denom)


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
