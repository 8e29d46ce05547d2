"""Conv2d and the 2-D pooling layers (NCHW)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from distad.autodiff import Tensor

from . import functional as F
from . import init
from .functional import Size2, as_pair
from .init import Rng
from .module import Module, Parameter

__all__ = ["AvgPool2d", "Conv2d", "MaxPool2d"]


class Conv2d(Module):
    """2-D convolution (cross-correlation): (N, in_channels, H, W) -> (N, out_channels, OH, OW).

    weight (out_channels, in_channels / groups, kh, kw) and bias (out_channels,) are
    initialised as PyTorch does (kaiming_uniform(a=sqrt(5)); bias
    U(-1/sqrt(fan_in), 1/sqrt(fan_in)) with fan_in = in_channels / groups * kh * kw) from
    `rng`. OH = (H + 2 padding - dilation (kh - 1) - 1) // stride + 1. `groups` splits the
    channels into independent convolutions (groups = in_channels: depthwise). Vectorised
    with im2col.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: Size2,
                 stride: Size2 = 1, padding: Size2 = 0, dilation: Size2 = 1, groups: int = 1,
                 bias: bool = True, rng: Rng = None, dtype: Any = np.float32) -> None:
        super().__init__()
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.groups = int(groups)
        if self.groups < 1 or self.in_channels % self.groups or self.out_channels % self.groups:
            raise ValueError(f"Conv2d: groups={groups} must divide in_channels="
                             f"{in_channels} and out_channels={out_channels}")
        self.kernel_size = as_pair(kernel_size, "kernel_size")
        self.stride, self.padding = as_pair(stride, "stride"), as_pair(padding, "padding")
        self.dilation = as_pair(dilation, "dilation")
        gen = init.as_generator(rng)
        shape = (self.out_channels, self.in_channels // self.groups, *self.kernel_size)
        self.weight = Parameter(init.kaiming_uniform(shape, gen, a=math.sqrt(5), dtype=dtype))
        if bias:
            bound = 1.0 / math.sqrt(init.fan_in_and_fan_out(shape)[0])
            self.bias = Parameter(init.uniform((self.out_channels,), gen, -bound, bound, dtype))
        else:
            self.register_parameter("bias", None)

    def forward(self, x: Any) -> Tensor:
        shape = np.shape(x.data if isinstance(x, Tensor) else x)
        if len(shape) != 4 or shape[1] != self.in_channels:
            raise ValueError(f"{self!r}: expected input of shape (N, {self.in_channels}, H, W), "
                             f"got {shape}")
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation,
                        self.groups)

    def extra_repr(self) -> str:
        s = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
             f"stride={self.stride}")
        if any(self.padding):
            s += f", padding={self.padding}"
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        return s + ("" if self.bias is not None else ", bias=False")


class MaxPool2d(Module):
    """Maximum over kernel_size windows every `stride` pixels (stride defaults to kernel_size)."""

    def __init__(self, kernel_size: Size2, stride: Size2 | None = None, padding: Size2 = 0
                 ) -> None:
        super().__init__()
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding

    def forward(self, x: Any) -> Tensor:
        return F.max_pool2d(x, self.kernel_size, self.stride, self.padding)

    def extra_repr(self) -> str:
        return (f"kernel_size={self.kernel_size}, stride={self.stride or self.kernel_size}, "
                f"padding={self.padding}")


class AvgPool2d(Module):
    """Mean over kernel_size windows every `stride` pixels (stride defaults to kernel_size)."""

    def __init__(self, kernel_size: Size2, stride: Size2 | None = None, padding: Size2 = 0
                 ) -> None:
        super().__init__()
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding

    def forward(self, x: Any) -> Tensor:
        return F.avg_pool2d(x, self.kernel_size, self.stride, self.padding)

    def extra_repr(self) -> str:
        return (f"kernel_size={self.kernel_size}, stride={self.stride or self.kernel_size}, "
                f"padding={self.padding}")
