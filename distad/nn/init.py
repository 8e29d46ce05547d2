"""Initialisers: arrays drawn from an explicit numpy Generator, so every run is reproducible.

Each function returns a new array of the given shape (float32 unless `dtype`
says otherwise); assign it to a parameter with
`layer.weight.data = init.xavier_uniform(layer.weight.shape, rng)`.

Where randomness comes from: pass `rng` as a `np.random.Generator` (used and
advanced) or an int seed (a fresh Generator). With `rng=None` the package's
default Generator is used; it starts from seed 0 and `manual_seed(s)` resets
it, so a program that builds its model in the same order gets the same
weights on every run (as `torch.manual_seed` does). Layers take the same
`rng=` argument.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = [
    "as_generator", "calculate_gain", "default_generator", "fan_in_and_fan_out",
    "kaiming_normal", "kaiming_uniform", "manual_seed", "normal", "ones", "uniform",
    "xavier_normal", "xavier_uniform", "zeros",
]

Rng = np.random.Generator | int | None

_default = np.random.default_rng(0)


def manual_seed(seed: int) -> np.random.Generator:
    """Reset the default Generator (used when `rng=None`) to `seed`; returns it."""
    global _default
    _default = np.random.default_rng(seed)
    return _default


def default_generator() -> np.random.Generator:
    """The Generator that initialisers and layers use when given `rng=None`."""
    return _default


def as_generator(rng: Rng) -> np.random.Generator:
    """A Generator from a Generator (itself), an int seed (a new one), or None (the default)."""
    if rng is None:
        return _default
    if isinstance(rng, np.random.Generator):
        return rng
    if isinstance(rng, (int, np.integer)) and not isinstance(rng, bool):
        return np.random.default_rng(int(rng))
    raise TypeError(f"rng must be a numpy Generator, an int seed or None, got {type(rng).__name__}")


def fan_in_and_fan_out(shape: tuple[int, ...]) -> tuple[int, int]:
    """(fan_in, fan_out) of a weight of `shape` = (out, in, *kernel), as PyTorch computes them."""
    shape = tuple(shape)
    if len(shape) < 1:
        raise ValueError("fan_in_and_fan_out: a scalar has no fan in or out")
    if len(shape) == 1:
        return shape[0], shape[0]
    receptive = math.prod(shape[2:])
    return shape[1] * receptive, shape[0] * receptive


def calculate_gain(nonlinearity: str, param: float | None = None) -> float:
    """The recommended gain for a nonlinearity (PyTorch's table)."""
    if nonlinearity in ("linear", "conv1d", "conv2d", "conv3d", "sigmoid"):
        return 1.0
    if nonlinearity == "tanh":
        return 5.0 / 3
    if nonlinearity == "relu":
        return math.sqrt(2.0)
    if nonlinearity == "leaky_relu":
        slope = 0.01 if param is None else float(param)
        return math.sqrt(2.0 / (1 + slope**2))
    if nonlinearity == "selu":
        return 3.0 / 4
    raise ValueError(f"calculate_gain: unsupported nonlinearity {nonlinearity!r}")


def _fan(shape: tuple[int, ...], mode: str) -> int:
    fan_in, fan_out = fan_in_and_fan_out(shape)
    if mode not in ("fan_in", "fan_out"):
        raise ValueError(f"mode must be 'fan_in' or 'fan_out', got {mode!r}")
    return fan_in if mode == "fan_in" else fan_out


def uniform(shape: tuple[int, ...], rng: Rng = None, low: float = 0.0, high: float = 1.0,
            dtype: Any = np.float32) -> np.ndarray:
    """Samples of U(low, high) with `shape` and `dtype`."""
    return as_generator(rng).uniform(low, high, size=tuple(shape)).astype(dtype)


def normal(shape: tuple[int, ...], rng: Rng = None, mean: float = 0.0, std: float = 1.0,
           dtype: Any = np.float32) -> np.ndarray:
    """Samples of N(mean, std**2) with `shape` and `dtype`."""
    return as_generator(rng).normal(mean, std, size=tuple(shape)).astype(dtype)


def kaiming_uniform(shape: tuple[int, ...], rng: Rng = None, a: float = 0.0,
                    mode: str = "fan_in", nonlinearity: str = "leaky_relu",
                    dtype: Any = np.float32) -> np.ndarray:
    """He et al. (2015): U(-b, b) with b = gain * sqrt(3 / fan); PyTorch's Linear uses a=sqrt(5)."""
    gain = calculate_gain(nonlinearity, a)
    bound = math.sqrt(3.0) * gain / math.sqrt(_fan(shape, mode))
    return uniform(shape, rng, -bound, bound, dtype)


def kaiming_normal(shape: tuple[int, ...], rng: Rng = None, a: float = 0.0,
                   mode: str = "fan_in", nonlinearity: str = "leaky_relu",
                   dtype: Any = np.float32) -> np.ndarray:
    """He et al. (2015): N(0, std**2) with std = gain / sqrt(fan)."""
    std = calculate_gain(nonlinearity, a) / math.sqrt(_fan(shape, mode))
    return normal(shape, rng, 0.0, std, dtype)


def xavier_uniform(shape: tuple[int, ...], rng: Rng = None, gain: float = 1.0,
                   dtype: Any = np.float32) -> np.ndarray:
    """Glorot & Bengio (2010): U(-b, b) with b = gain * sqrt(6 / (fan_in + fan_out))."""
    fan_in, fan_out = fan_in_and_fan_out(shape)
    bound = gain * math.sqrt(6.0 / (fan_in + fan_out))
    return uniform(shape, rng, -bound, bound, dtype)


def xavier_normal(shape: tuple[int, ...], rng: Rng = None, gain: float = 1.0,
                  dtype: Any = np.float32) -> np.ndarray:
    """Glorot & Bengio (2010): N(0, std**2) with std = gain * sqrt(2 / (fan_in + fan_out))."""
    fan_in, fan_out = fan_in_and_fan_out(shape)
    return normal(shape, rng, 0.0, gain * math.sqrt(2.0 / (fan_in + fan_out)), dtype)


def zeros(shape: tuple[int, ...], dtype: Any = np.float32) -> np.ndarray:
    return np.zeros(tuple(shape), dtype=dtype)


def ones(shape: tuple[int, ...], dtype: Any = np.float32) -> np.ndarray:
    return np.ones(tuple(shape), dtype=dtype)
