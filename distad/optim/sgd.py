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
        buf = state.get("momentum_buffer")
        first = buf is None
        if group["momentum"] and first:
            buf = state["momentum_buffer"] = np.empty_like(p.data)
        self._blocked(_sgd_kernel, (p.data, np.asarray(grad), buf), first, group)


def _sgd_kernel(w: np.ndarray, g: np.ndarray, buf: np.ndarray | None, first: bool,
                group: dict, t1: np.ndarray, t2: np.ndarray) -> None:
    """One SGD update of the weights ``w`` in place (the formulas of :class:`SGD`), with the
    momentum buffer ``buf`` (None without momentum) and two scratch arrays of w's shape.
    Applied block by block, so that the chain of operations stays in cache."""
    lr, mu, wd, damp = group["lr"], group["momentum"], group["weight_decay"], group["dampening"]
    d = g
    if wd:
        np.multiply(w, wd, out=t1)
        t1 += g
        d = t1
    if mu:
        if first:
            np.copyto(buf, d)
        else:
            buf *= mu
            if damp:
                np.multiply(d, 1.0 - damp, out=t2)
                buf += t2
            else:
                buf += d
        if group["nesterov"]:
            np.multiply(buf, mu, out=t2)
            t2 += d
            d = t2
        else:
            d = buf
    np.multiply(d, lr, out=t2)
    w -= t2
