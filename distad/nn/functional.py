"""Functional forms of the layers and the losses (`ad.nn.functional`, imported as F).

Every function takes and returns Tensors (numpy arrays are accepted as
constants) and keeps the input dtype: float32 in, float32 out. Shapes follow
PyTorch: images are NCHW, logits (N, C), integer labels (N,).
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import Any

import numpy as np

from distad.autodiff import Tensor, mean, reshape, sigmoid, sqrt, tanh
from distad.autodiff import relu as _relu

from . import primitives as P
from .init import Rng, as_generator
from .primitives import conv_output_size, cross_entropy_p, gelu_erf_p, gelu_p, im2col, linear_p

__all__ = [
    "avg_pool2d", "batch_norm", "conv2d", "cross_entropy", "dropout", "embedding", "gelu",
    "layer_norm",
    "linear", "max_pool2d", "mse_loss", "nll_loss", "relu", "sigmoid", "tanh",
]

Size2 = int | tuple[int, int]


def as_pair(v: Size2, name: str) -> tuple[int, int]:
    pair = (v, v) if isinstance(v, numbers.Integral) else tuple(v)
    if len(pair) != 2 or not all(isinstance(p, numbers.Integral) for p in pair):
        raise ValueError(f"{name} must be an int or a pair of ints, got {v!r}")
    return int(pair[0]), int(pair[1])


def _shape(a: Any) -> tuple[int, ...]:
    return tuple(a.shape) if isinstance(a, (Tensor, np.ndarray)) else np.shape(a)


# ---- activations -------------------------------------------------------------------------

def relu(x: Any) -> Tensor:
    """max(x, 0) elementwise."""
    return _relu(x)


def gelu(x: Any, approximate: str = "tanh") -> Tensor:
    """GELU as one vertex. ``approximate="tanh"`` (the default here):
    0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))); ``"none"``: the exact x Phi(x) =
    0.5 x (1 + erf(x / sqrt 2)), PyTorch's default. The two differ by up to 5e-4.
    """
    if approximate == "tanh":
        return gelu_p(x)
    if approximate == "none":
        return gelu_erf_p(x)
    raise ValueError(f"gelu: approximate must be 'tanh' or 'none', got {approximate!r}")


def dropout(x: Any, p: float = 0.5, training: bool = True, rng: Rng = None) -> Tensor:
    """Zero each element with probability p and scale the rest by 1 / (1 - p).

    The mask is drawn from `rng` (a Generator, a seed, or None for the default
    Generator), so the same seed gives the same mask. Identity when not
    training or p == 0; zeros when p == 1.
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout: probability must be in [0, 1], got {p}")
    if not training or p == 0.0:
        return x
    xv = x.data if isinstance(x, Tensor) else np.asarray(x)
    if p == 1.0:
        return x * np.zeros(xv.shape, dtype=xv.dtype)
    keep = as_generator(rng).random(xv.shape, dtype=np.float32) >= p
    return x * (keep.astype(xv.dtype) * (1.0 / (1.0 - p)))


# ---- linear and convolution --------------------------------------------------------------

def linear(x: Any, weight: Any, bias: Any = None) -> Tensor:
    """x @ weight.T + bias for x (..., in), weight (out, in), bias (out,) -> (..., out)."""
    xs, ws = _shape(x), _shape(weight)
    if len(ws) != 2 or not xs or xs[-1] != ws[1]:
        raise ValueError(f"linear: input of shape {xs} does not match weight of shape {ws} "
                         f"(the input's last dimension must be {ws[1] if len(ws) == 2 else '?'})")
    if bias is not None and _shape(bias) != (ws[0],):
        raise ValueError(f"linear: bias of shape {_shape(bias)}, expected ({ws[0]},)")
    return linear_p(x, weight, bias)


def conv2d(x: Any, weight: Any, bias: Any = None, stride: Size2 = 1, padding: Size2 = 0,
           dilation: Size2 = 1, groups: int = 1) -> Tensor:
    """2-D cross-correlation, NCHW: x (N, C, H, W), weight (O, C / groups, kh, kw), bias (O,).

    Returns (N, O, OH, OW) with OH = (H + 2 ph - dh (kh - 1) - 1) // sh + 1 (and so OW).
    ``dilation`` spaces the kernel's taps; ``groups`` splits the channels into that many
    independent convolutions (C / groups inputs to O / groups outputs each; groups = C is a
    depthwise convolution). Computed as im2col (patch matrix) @ weight (as a matrix).T + bias,
    one batched product over the groups; the backward is matrix products and col2im. The
    result is an NCHW view of NHWC memory, which the next convolution reads without a
    transposing copy.
    """
    stride, padding = as_pair(stride, "stride"), as_pair(padding, "padding")
    dilation = as_pair(dilation, "dilation")
    xs, ws = _shape(x), _shape(weight)
    if len(ws) != 4:
        raise ValueError(f"conv2d: weight must be (out_channels, in_channels / groups, kh, kw), "
                         f"got {ws}")
    o, cg, kh, kw = ws
    g = int(groups)
    if g < 1 or o % g:
        raise ValueError(f"conv2d: groups must be >= 1 and divide the {o} output channels, "
                         f"got groups={groups}")
    c = cg * g
    if len(xs) != 4 or xs[1] != c:
        raise ValueError(f"conv2d: expected input of shape (N, {c}, H, W) for weight {ws} and "
                         f"groups={g}, got {xs}")
    n, _, h, w = xs
    oh = conv_output_size(h, kh, stride[0], padding[0], dilation[0])
    ow = conv_output_size(w, kw, stride[1], padding[1], dilation[1])
    if oh < 1 or ow < 1 or min(stride) < 1 or min(padding) < 0 or min(dilation) < 1:
        raise ValueError(f"conv2d: kernel {(kh, kw)} with stride {stride}, padding {padding} "
                         f"and dilation {dilation} does not fit an input of spatial size "
                         f"{(h, w)}")
    cols = im2col(x, (kh, kw), stride, padding, dilation)        # (N*OH*OW, kh*kw*C)
    if g == 1:
        w2 = weight.transpose(0, 2, 3, 1).reshape(o, kh * kw * c)  # columns ordered (i, j, c)
        out = linear_p(cols, w2, bias)                             # (N*OH*OW, O): NHWC memory
    else:  # per group: its C / g columns of every tap, times its O / g filters
        m = n * oh * ow
        cols = cols.reshape(m, kh * kw, g, cg).transpose(2, 0, 1, 3).reshape(g, m, kh * kw * cg)
        w3 = weight.reshape(g, o // g, cg, kh, kw).transpose(0, 3, 4, 2, 1)
        out = (cols @ w3.reshape(g, kh * kw * cg, o // g)).transpose(1, 0, 2).reshape(m, o)
        if bias is not None:
            out = out + bias
    return out.reshape(n, oh, ow, o).transpose(0, 3, 1, 2)


def _pool_geometry(x: Any, kernel_size: Size2, stride: Size2 | None, padding: Size2,
                   op: str) -> tuple:
    kernel = as_pair(kernel_size, "kernel_size")
    stride = kernel if stride is None else as_pair(stride, "stride")
    padding = as_pair(padding, "padding")
    xs = _shape(x)
    if len(xs) != 4:
        raise ValueError(f"{op}: expected an NCHW input of 4 dimensions, got shape {xs}")
    if min(stride) < 1 or min(padding) < 0 or padding[0] * 2 > kernel[0] or \
            padding[1] * 2 > kernel[1]:
        raise ValueError(f"{op}: need stride >= 1 and 0 <= padding <= kernel_size / 2, got "
                         f"kernel {kernel}, stride {stride}, padding {padding}")
    if conv_output_size(xs[2], kernel[0], stride[0], padding[0]) < 1 or \
            conv_output_size(xs[3], kernel[1], stride[1], padding[1]) < 1:
        raise ValueError(f"{op}: kernel {kernel} does not fit an input of spatial size "
                         f"{xs[2:]} with padding {padding}")
    return kernel, stride, padding


def max_pool2d(x: Any, kernel_size: Size2, stride: Size2 | None = None, padding: Size2 = 0
               ) -> Tensor:
    """Maximum over (kh, kw) windows of an NCHW input; stride defaults to the kernel size.

    Padding never wins the max. The gradient of each window goes to its first
    maximum in row-major order (as PyTorch's CPU kernel).
    """
    kernel, stride, padding = _pool_geometry(x, kernel_size, stride, padding, "max_pool2d")
    return P.max_pool2d(x, kernel, stride, padding)


def avg_pool2d(x: Any, kernel_size: Size2, stride: Size2 | None = None, padding: Size2 = 0
               ) -> Tensor:
    """Mean over (kh, kw) windows of an NCHW input (zero padding counted, as PyTorch's default)."""
    kernel, stride, padding = _pool_geometry(x, kernel_size, stride, padding, "avg_pool2d")
    return P.avg_pool2d(x, kernel, stride, padding)


# ---- normalisation and lookup ------------------------------------------------------------

def layer_norm(x: Any, normalized_shape: tuple[int, ...], weight: Any = None, bias: Any = None,
               eps: float = 1e-5) -> Tensor:
    """(x - mean) / sqrt(var + eps) * weight + bias over the trailing `normalized_shape` axes.

    The variance is the biased one (divide by the count), as in PyTorch.
    """
    normalized_shape = tuple(normalized_shape)
    xs = _shape(x)
    k = len(normalized_shape)
    if xs[len(xs) - k:] != normalized_shape:
        raise ValueError(f"layer_norm: input of shape {xs} does not end in the normalized "
                         f"shape {normalized_shape}")
    axes = tuple(range(-k, 0))
    centred = x - mean(x, axis=axes, keepdims=True)
    var = mean(centred * centred, axis=axes, keepdims=True)
    y = centred / sqrt(var + eps)
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y


def batch_norm(x: Any, running_mean: np.ndarray | None = None,
               running_var: np.ndarray | None = None, weight: Any = None, bias: Any = None,
               training: bool = False, momentum: float | None = 0.1, eps: float = 1e-5,
               num_batches_tracked: int = 0,
               group_sum: Callable[[Any], Any] | None = None) -> Tensor:
    """Batch normalisation of x (N, C, *spatial) per channel, then scale and shift (PyTorch's).

    ``training`` (or no running statistics): normalise with the batch's mean and biased
    variance over every axis but the channel axis, and update ``running_mean`` and
    ``running_var`` in place with the batch's mean and unbiased variance:
    r = (1 - momentum) r + momentum s (``momentum=None``: the cumulative average over
    ``num_batches_tracked`` batches, this one included). Otherwise normalise with the running
    statistics, which are constants. The statistics' update is outside the tape: no gradient
    flows into them. ``group_sum`` (training only): a differentiable sum over a group of
    processes (``distad.parallel.SyncBatchNorm`` passes an allreduce), applied to the element
    count and the per-channel sums: the batch is then the group's batches together, and each
    process's gradient includes what its inputs did to the others' outputs.
    """
    xs = _shape(x)
    if len(xs) < 2:
        raise ValueError(f"batch_norm: input must be (N, C, *spatial), got shape {xs}")
    c = xs[1]
    axes = (0,) + tuple(range(2, len(xs)))
    shape = (1, c) + (1,) * (len(xs) - 2)
    for name, a in (("running_mean", running_mean), ("running_var", running_var),
                    ("weight", weight), ("bias", bias)):
        if a is not None and _shape(a) != (c,):
            raise ValueError(f"batch_norm: {name} of shape {_shape(a)} does not match the "
                             f"{c} channels of an input of shape {xs}")
    if training or running_mean is None or running_var is None:
        count = int(np.prod(xs)) // c
        total = group_sum if group_sum is not None else (lambda a: a)
        if group_sum is not None:
            count = int(np.asarray(group_sum(np.array([count], np.int64)))[0])
        if training and count < 2:
            raise ValueError(f"batch_norm: expected more than 1 value per channel when "
                             f"training, got input of shape {xs}"
                             + (f" ({count} over the group)" if group_sum else ""))
        mu = total(x.sum(axis=axes, keepdims=True)) / count
        centred = x - mu
        var = total((centred * centred).sum(axis=axes, keepdims=True)) / count
        if training and running_mean is not None and running_var is not None:
            m = momentum if momentum is not None else 1.0 / max(num_batches_tracked, 1)
            for r, stat in ((running_mean, P._v(mu)),
                            (running_var, P._v(var) * (count / (count - 1)))):
                r *= 1.0 - m
                r += (m * stat).reshape(c).astype(r.dtype, copy=False)
        y = centred / sqrt(var + eps)
    else:
        scale = 1.0 / np.sqrt(running_var.reshape(shape) + eps)
        y = (x - running_mean.reshape(shape)) * scale.astype(running_var.dtype, copy=False)
    if weight is not None:
        y = y * reshape(weight, shape)
    if bias is not None:
        y = y + reshape(bias, shape)
    return y


def embedding(indices: Any, weight: Any) -> Tensor:
    """Rows of `weight` (num_embeddings, dim) at integer `indices` of any shape -> (*shape, dim)."""
    idx = np.asarray(indices.data if isinstance(indices, Tensor) else indices)
    num = _shape(weight)[0]
    if not np.issubdtype(idx.dtype, np.integer):
        raise TypeError(f"embedding: indices must be integers, got dtype {idx.dtype}")
    if idx.size and (idx.min() < 0 or idx.max() >= num):
        bad = idx[(idx < 0) | (idx >= num)].flat[0]
        raise IndexError(f"embedding: index {bad} is out of range for {num} embeddings")
    return weight[idx]


# ---- losses ------------------------------------------------------------------------------

_REDUCTIONS = ("mean", "sum", "none")


def _check_labels(op: str, logits_shape: tuple, labels: Any) -> np.ndarray:
    y = np.asarray(labels.data if isinstance(labels, Tensor) else labels)
    if len(logits_shape) != 2:
        raise ValueError(f"{op}: expected (N, C) scores, got shape {logits_shape}")
    n, c = logits_shape
    if not np.issubdtype(y.dtype, np.integer):
        raise TypeError(f"{op}: labels must be integer class indices, got dtype {y.dtype}")
    if y.shape != (n,):
        raise ValueError(f"{op}: labels of shape {y.shape} do not match scores of shape "
                         f"{logits_shape} (expected ({n},))")
    if n and (y.min() < 0 or y.max() >= c):
        bad = y[(y < 0) | (y >= c)][0]
        raise IndexError(f"{op}: label {bad} is out of range for {c} classes (0..{c - 1})")
    return y


def _check_reduction(op: str, reduction: str) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"{op}: reduction must be one of {_REDUCTIONS}, got {reduction!r}")


def cross_entropy(logits: Any, labels: Any, label_smoothing: float = 0.0,
                  reduction: str = "mean") -> Tensor:
    """Softmax cross-entropy of logits (N, C) against integer labels (N,), one fused vertex.

    loss_i = -sum_c q_ic log softmax(logits_i)_c with q = (1 - s) onehot + s / C
    (s = label_smoothing, as PyTorch). Computed from a max-shifted log-softmax, so
    it is finite for logits of any size; the gradient is (softmax - q) / N for
    "mean". reduction: "mean" (scalar), "sum" (scalar) or "none" (N,).
    """
    _check_reduction("cross_entropy", reduction)
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"cross_entropy: label_smoothing must be in [0, 1], got {label_smoothing}")
    y = _check_labels("cross_entropy", _shape(logits), labels)
    return cross_entropy_p(logits, labels=y, smoothing=float(label_smoothing),
                           reduction=reduction)


def nll_loss(log_probs: Any, labels: Any, reduction: str = "mean") -> Tensor:
    """Negative log-likelihood: -log_probs[i, labels[i]] for (N, C) log-probabilities."""
    _check_reduction("nll_loss", reduction)
    y = _check_labels("nll_loss", _shape(log_probs), labels)
    picked = -log_probs[np.arange(len(y)), y]
    if reduction == "mean":
        return picked.mean()
    return picked.sum() if reduction == "sum" else picked


def mse_loss(prediction: Any, target: Any, reduction: str = "mean") -> Tensor:
    """Squared error (prediction - target)**2, averaged ("mean"), summed, or kept ("none")."""
    _check_reduction("mse_loss", reduction)
    if _shape(prediction) != _shape(target):
        raise ValueError(f"mse_loss: prediction of shape {_shape(prediction)} and target of "
                         f"shape {_shape(target)} differ")
    d = prediction - target
    sq = d * d
    if reduction == "mean":
        return sq.mean()
    return sq.sum() if reduction == "sum" else sq
