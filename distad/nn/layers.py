"""Dense layers, activations, Flatten, Dropout and Embedding.

Layers with weights take `rng` (a numpy Generator, an int seed, or None for the
default Generator of `ad.nn.init`) and `dtype` (float32 by default).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from distad.autodiff import Tensor

from . import functional as F
from . import init
from .init import Rng
from .module import Module, Parameter

__all__ = ["Dropout", "Embedding", "Flatten", "GELU", "Identity", "Linear", "ReLU", "Sigmoid",
           "Tanh"]


class Linear(Module):
    """y = x @ weight.T + bias: (..., in_features) -> (..., out_features).

    weight has shape (out_features, in_features) as in PyTorch, initialised
    with kaiming_uniform(a=sqrt(5)) (that is U(-1/sqrt(in), 1/sqrt(in))); bias
    (out_features,) is U(-1/sqrt(in), 1/sqrt(in)). Both drawn from `rng`.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 rng: Rng = None, dtype: Any = np.float32) -> None:
        super().__init__()
        self.in_features, self.out_features = int(in_features), int(out_features)
        gen = init.as_generator(rng)
        shape = (self.out_features, self.in_features)
        self.weight = Parameter(init.kaiming_uniform(shape, gen, a=math.sqrt(5), dtype=dtype))
        if bias:
            bound = 1.0 / math.sqrt(self.in_features) if self.in_features else 0.0
            self.bias = Parameter(init.uniform((self.out_features,), gen, -bound, bound, dtype))
        else:
            self.register_parameter("bias", None)

    def forward(self, x: Any) -> Tensor:
        shape = np.shape(x.data if isinstance(x, Tensor) else x)
        if not shape or shape[-1] != self.in_features:
            raise ValueError(f"{self!r}: expected input of shape (..., {self.in_features}), "
                             f"got {shape}")
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}")


class Identity(Module):
    """Returns its input unchanged."""

    def forward(self, x: Any) -> Any:
        return x


class Flatten(Module):
    """Merge axes start_dim..end_dim into one: (N, C, H, W) -> (N, C*H*W) by default."""

    def __init__(self, start_dim: int = 1, end_dim: int = -1) -> None:
        super().__init__()
        self.start_dim, self.end_dim = start_dim, end_dim

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        start, end = self.start_dim % len(shape), self.end_dim % len(shape)
        return x.reshape(*shape[:start], -1, *shape[end + 1:])

    def extra_repr(self) -> str:
        return f"start_dim={self.start_dim}, end_dim={self.end_dim}"


class ReLU(Module):
    """max(x, 0) elementwise."""

    def forward(self, x: Any) -> Tensor:
        return F.relu(x)


class Tanh(Module):
    """tanh(x) elementwise."""

    def forward(self, x: Any) -> Tensor:
        return F.tanh(x)


class Sigmoid(Module):
    """1 / (1 + exp(-x)) elementwise."""

    def forward(self, x: Any) -> Tensor:
        return F.sigmoid(x)


class GELU(Module):
    """GELU, by default with the tanh approximation (PyTorch's `GELU(approximate="tanh")`);
    `approximate="none"` is the exact erf form, PyTorch's default."""

    def __init__(self, approximate: str = "tanh") -> None:
        super().__init__()
        if approximate not in ("tanh", "none"):
            raise ValueError(f"GELU: approximate must be 'tanh' or 'none', got {approximate!r}")
        self.approximate = approximate

    def forward(self, x: Any) -> Tensor:
        return F.gelu(x, self.approximate)

    def extra_repr(self) -> str:
        return f"approximate={self.approximate!r}"


class Dropout(Module):
    """Zero elements with probability p while training (survivors scaled by 1 / (1 - p)).

    The masks come from this layer's own Generator, `rng` (a Generator, a seed,
    or None for the default Generator): two layers built with the same seed
    draw the same masks. In eval mode the layer is the identity.
    """

    def __init__(self, p: float = 0.5, rng: Rng = None) -> None:
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"Dropout: probability must be in [0, 1], got {p}")
        self.p = float(p)
        self.rng = init.as_generator(rng)

    def forward(self, x: Any) -> Tensor:
        return F.dropout(x, self.p, self.training, self.rng)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class Embedding(Module):
    """A lookup table: integer indices of any shape -> rows of weight (num_embeddings, dim).

    weight is initialised N(0, 1) from `rng`, as in PyTorch.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, rng: Rng = None,
                 dtype: Any = np.float32) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = int(num_embeddings), int(embedding_dim)
        self.weight = Parameter(init.normal((self.num_embeddings, self.embedding_dim),
                                            rng, dtype=dtype))

    def forward(self, indices: Any) -> Tensor:
        return F.embedding(indices, self.weight)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}"
