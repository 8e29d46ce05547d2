"""Normalisation layers."""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import Any

import numpy as np

from distad.autodiff import Tensor

from . import functional as F
from . import init
from .module import Module, Parameter

__all__ = ["BatchNorm1d", "BatchNorm2d", "LayerNorm"]


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


class _BatchNorm(Module):
    """Batch normalisation over every axis but the channels (axis 1); see `F.batch_norm`.

    weight (ones) and bias (zeros) of shape (C,) when `affine`; buffers `running_mean`
    (zeros), `running_var` (ones) and `num_batches_tracked` (int64) when
    `track_running_stats`. Training normalises with the batch's statistics and updates the
    running ones; eval uses the running ones (without them, always the batch's). Under
    DataParallel each rank normalises with its own shard's statistics and the buffers are
    broadcast from rank 0 at every training forward, as in PyTorch's DDP.
    """

    _dims: tuple[int, ...] = ()  # the input ranks accepted
    #: A differentiable sum over a group of processes for the training statistics (None: this
    #: process's batch alone); distad.parallel.SyncBatchNorm sets an allreduce.
    _group_sum: Callable[[Any], Any] | None = None

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True,
                 dtype: Any = np.float32) -> None:
        super().__init__()
        self.num_features = int(num_features)
        self.eps, self.momentum = float(eps), momentum
        self.track_running_stats = bool(track_running_stats)
        if affine:
            self.weight = Parameter(init.ones((self.num_features,), dtype))
            self.bias = Parameter(init.zeros((self.num_features,), dtype))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if self.track_running_stats:
            self.register_buffer("running_mean", np.zeros(self.num_features, dtype))
            self.register_buffer("running_var", np.ones(self.num_features, dtype))
            self.register_buffer("num_batches_tracked", np.zeros((), np.int64))
        else:
            for name in ("running_mean", "running_var", "num_batches_tracked"):
                self.register_buffer(name, None)

    def forward(self, x: Any) -> Tensor:
        ndim = len(x.shape)
        if ndim not in self._dims:
            dims = " or ".join(f"{d}-d" for d in self._dims)
            raise ValueError(f"{type(self).__name__}: expected a {dims} input, got shape "
                             f"{tuple(x.shape)}")
        if self.training and self.track_running_stats:
            self.num_batches_tracked += 1  # in place: the buffer stays the same array
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                            training=self.training, momentum=self.momentum, eps=self.eps,
                            num_batches_tracked=int(self.num_batches_tracked)
                            if self.track_running_stats else 0,
                            group_sum=self._group_sum if self.training else None)

    def extra_repr(self) -> str:
        return (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
                f"affine={self.weight is not None}, "
                f"track_running_stats={self.track_running_stats}")


class BatchNorm1d(_BatchNorm):
    """Batch normalisation of (N, C) or (N, C, L) inputs per channel."""

    _dims = (2, 3)


class BatchNorm2d(_BatchNorm):
    """Batch normalisation of (N, C, H, W) images per channel."""

    _dims = (4,)

