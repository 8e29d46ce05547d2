"""Normalisation layers."""

from __future__ import annotations

import numbers
from typing import Any

import numpy as np

from distad.autodiff import Tensor

from . import functional as F
from . import init
from .module import Module, Parameter

__all__ = ["LayerNorm"]


class LayerNorm(Module):
    """Normalise over the trailing `normalized_shape` axes, then scale and shift.

    y = (x - mean) / sqrt(var + eps) * weight + bias, statistics per sample
    (biased variance); weight (ones) and bias (zeros) have `normalized_shape`
    and exist when `elementwise_affine`. Same in training and eval.
    """

    def __init__(self, normalized_shape: int | tuple[int, ...], eps: float = 1e-5,
                 elementwise_affine: bool = True, dtype: Any = np.float32) -> None:
        super().__init__()
        if isinstance(normalized_shape, numbers.Integral):
            normalized_shape = (int(normalized_shape),)
        self.normalized_shape = tuple(int(s) for s in normalized_shape)
        self.eps = float(eps)
        if elementwise_affine:
            self.weight = Parameter(init.ones(self.normalized_shape, dtype))
            self.bias = Parameter(init.zeros(self.normalized_shape, dtype))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    def forward(self, x: Any) -> Tensor:
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return (f"{self.normalized_shape}, eps={self.eps}, "
                f"elementwise_affine={self.weight is not None}")
