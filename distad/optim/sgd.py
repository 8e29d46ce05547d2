"""Stochastic gradient descent with momentum, Nesterov momentum and weight decay."""

from __future__ import annotations

import numpy as np

from distad.autodiff import Tensor

from .optimizer import Optimizer, ParamsT

__all__ = ["SGD"]


class SGD(Optimizer):
    """SGD with PyTorch's semantics, per parameter p with gradient g:

        d = g + weight_decay * p
        b = d                                   (first step)
        b = momentum * b + (1 - dampening) * d  (later steps)
        d = d + momentum * b if nesterov else b (when momentum != 0)
        p = p - lr * d

    The momentum buffer b (same shape and dtype as p) is the only state.
    """

    per_param_state = ("momentum_buffer",)

    def __init__(self, params: ParamsT, lr: float, momentum: float = 0.0,
                 dampening: float = 0.0, nesterov: bool = False,
                 weight_decay: float = 0.0) -> None:
        super().__init__(params, dict(lr=lr, momentum=momentum, dampening=dampening,
                                      nesterov=nesterov, weight_decay=weight_decay))

    def _check_group(self, group: dict) -> None:
        if group["lr"] < 0 or group["momentum"] < 0 or group["weight_decay"] < 0:
            raise ValueError(f"SGD: lr, momentum and weight_decay must be >= 0, got lr="
                             f"{group['lr']}, momentum={group['momentum']}, "
                             f"weight_decay={group['weight_decay']}")
        if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
            raise ValueError("SGD: Nesterov momentum needs momentum > 0 and dampening = 0")

    def _update(self, p: Tensor, grad: np.ndarray, state: dict, group: dict) -> None:
        lr, mu, wd = group["lr"], group["momentum"], group["weight_decay"]
        d = grad + wd * p.data if wd else grad
        if mu:
            buf = state.get("momentum_buffer")
            if buf is None:
                buf = state["momentum_buffer"] = np.array(d, dtype=p.dtype, copy=True)
            else:
                buf *= mu
                buf += (1.0 - group["dampening"]) * d
            d = d + mu * buf if group["nesterov"] else buf
        p.data -= lr * d
