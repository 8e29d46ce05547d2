"""The nn table: fused primitives for layers and losses, each forward next to its rules.

Same notation as `distad/autodiff/ops.py`: `g` is the output cotangent, `t` an
input tangent, `y` the output, then the inputs; parameters travel as keywords.
The rules are written with operators, shared array/Tensor methods and distad
ops, so they run on numpy arrays (first order) and on Tensors (higher order).

Convolution rests on a pair of linear maps that are each other's transpose,
`im2col` (patches as rows of a matrix, via `sliding_window_view`) and `col2im`;
average pooling likewise on `avg_pool2d`/`avg_unpool`. Max pooling routes each
window's cotangent to its argmax with the engine's `scatter_add`. Folds and
pools loop over the kh*kw kernel offsets, each a vectorised strided operation
(never a loop over pixels).
"""

from __future__ import annotations

import math

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from distad.autodiff import Primitive, Tensor, broadcast_to, erf, exp, scatter_add, softmax, tanh

__all__ = [
    "avg_pool2d", "col2im", "conv_output_size", "cross_entropy_p", "gelu_erf_p", "gelu_p", "im2col",
    "linear_p", "max_pool2d",
]

Pair = tuple[int, int]


def _v(a):
    """The raw value of a Tensor or array (for masks and targets, which have no gradient)."""
    return a.data if isinstance(a, Tensor) else a


# ---- linear: y = x @ w.T + b, one tape vertex instead of three ---------------------------

#: Few rows against a large weight: W @ x.T is 1.3-2x faster than x @ W.T in OpenBLAS
#: (measured for 8-32 rows and 2048-wide weights; slower for small weights or many rows).
_SKINNY_ROWS, _WIDE_OUT = 64, 256


def _linear_fwd(x, w, b):
    m = x.size // x.shape[-1] if x.ndim and x.shape[-1] else 0
    if 0 < m <= _SKINNY_ROWS and w.shape[0] >= _WIDE_OUT:
        rows = x.reshape(m, x.shape[-1])
        y = np.ascontiguousarray((w @ rows.T).T).reshape(*x.shape[:-1], w.shape[0])
    else:
        y = x @ w.T
    if b is not None:
        np.add(y, b, out=y)  # y is a fresh matmul result: add in place
    return y


def _weight_grad_into(out, scale, g, x, w):
    """out = scale * g^T x, the weight's gradient written where the caller wants it: the
    scale goes on the small (out, batch) factor, not on the (out, in) product."""
    gt = _rows(g, w.shape[0]).T
    if scale != 1:
        gt = gt * np.asarray(scale, dtype=gt.dtype)
    return np.matmul(gt, _rows(x, w.shape[1]), out=out)


def _rows(a, n: int):
    """a as a matrix of rows of length n (the batch axes flattened)."""
    return a.reshape(-1, n)


# ---- GELU, tanh approximation: 0.5 x (1 + tanh(c (x + 0.044715 x^3))) --------------------

_GELU_C = math.sqrt(2.0 / math.pi)
_GELU_A = 0.044715


def _gelu_fwd(x):
    return 0.5 * x * (1.0 + np.tanh(_GELU_C * (x + _GELU_A * x * x * x)))


def _gelu_slope(x):
    """d gelu / dx, written with distad ops so it is differentiable again."""
    th = tanh(_GELU_C * (x + _GELU_A * x * x * x))
    return 0.5 * (1.0 + th) + 0.5 * x * (1.0 - th * th) * (_GELU_C * (1.0 + 3 * _GELU_A * x * x))


# ---- GELU, exact: x Phi(x) = 0.5 x (1 + erf(x / sqrt 2)) -----------------------------------

_SQRT_HALF = math.sqrt(0.5)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def _gelu_erf_fwd(x):
    return 0.5 * x * (1.0 + erf(x * _SQRT_HALF))


def _gelu_erf_slope(x):
    """d gelu / dx = Phi(x) + x phi(x), written with distad ops so it is differentiable again."""
    return 0.5 * (1.0 + erf(x * _SQRT_HALF)) + x * _INV_SQRT_2PI * exp(-0.5 * x * x)


# ---- cross-entropy with integer labels: log-softmax + NLL (+ label smoothing) ------------

def _ce_target(x, labels, smoothing: float):
    """The target distribution q: (1 - s) one-hot + s / C, in x's dtype (a constant)."""
    xv = _v(x)
    n, c = xv.shape
    q = np.full(xv.shape, smoothing / c, dtype=xv.dtype)
    q[np.arange(n), labels] += 1.0 - smoothing
    return q


def _ce_reduce(per_row, reduction: str):
    if reduction == "mean":
        return per_row.mean()
    return per_row.sum() if reduction == "sum" else per_row


def _ce_fwd(x, labels, smoothing, reduction):
    """(loss, log-probabilities): the log-probabilities are the residual backward reuses."""
    z = x - x.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    per_row = -logp[np.arange(len(labels)), labels]
    if smoothing:
        per_row = (1.0 - smoothing) * per_row - (smoothing / x.shape[1]) * logp.sum(axis=1)
    return _ce_reduce(per_row, reduction), logp


def _ce_dlogits(x, labels, smoothing: float, res=None):
    """d loss_i / d logits_i = softmax(x_i) - q_i (before the reduction).

    First order, it comes from the forward's log-probabilities in three numpy
    calls; on Tensors (higher order) it is recomputed differentiably from x.
    """
    if res is None or isinstance(x, Tensor):
        return softmax(x, axis=-1) - _ce_target(x, labels, smoothing)
    d = np.exp(res)
    if smoothing:
        d -= smoothing / d.shape[1]
    d[np.arange(len(labels)), labels] -= 1.0 - smoothing
    return d


def _ce_row_scale(g, n: int, reduction: str):
    """The cotangent of each row's loss, shaped to broadcast against (n, C)."""
    if reduction == "none":
        return g.reshape(-1, 1)
    return g * (1.0 / n) if reduction == "mean" else g


# ---- patches: im2col / col2im (convolution) and the pooling windows ----------------------
# Patches are gathered channels-last: an NCHW input is read through its NHWC view,
# so every copy moves runs of C contiguous values, and the conv output (a matrix
# product, NHWC in memory) feeds the next layer without a transposing copy.

def conv_output_size(size: int, kernel: int, stride: int, padding: int, dilation: int = 1
                     ) -> int:
    """Output length along one axis: floor((size + 2 padding - dilation (kernel - 1) - 1) /
    stride) + 1."""
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def _extent(kernel: Pair, dilation: Pair) -> Pair:
    """The input span of a dilated kernel: dilation (kernel - 1) + 1 per axis."""
    return (dilation[0] * (kernel[0] - 1) + 1, dilation[1] * (kernel[1] - 1) + 1)


def _offsets(kernel: Pair, stride: Pair, out_hw: Pair, dilation: Pair = (1, 1)):
    """(i, j, slice of rows, slice of cols) for each kernel offset: the pixels it reads."""
    (kh, kw), (sh, sw), (oh, ow), (dh, dw) = kernel, stride, out_hw, dilation
    for i in range(kh):
        for j in range(kw):
            r, c = i * dh, j * dw
            yield i, j, slice(r, r + sh * (oh - 1) + 1, sh), slice(c, c + sw * (ow - 1) + 1, sw)


def _out_hw(shape: tuple, kernel: Pair, stride: Pair, padding: Pair) -> Pair:
    return (conv_output_size(shape[2], kernel[0], stride[0], padding[0]),
            conv_output_size(shape[3], kernel[1], stride[1], padding[1]))


def _pad_nchw(x, padding: Pair, value: float = 0.0):
    ph, pw = padding
    if not (ph or pw):
        return x
    return np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)), constant_values=value)


def _im2col_fwd(x, kernel: Pair, stride: Pair, padding: Pair, dilation: Pair = (1, 1)):
    """(N, C, H, W) -> (N*OH*OW, kh*kw*C): one row per output pixel, columns ordered (i, j, c).
    A dilated kernel reads every dilation-th pixel of its extent."""
    (ph, pw), (sh, sw), (dh, dw) = padding, stride, dilation
    xh = np.pad(x.transpose(0, 2, 3, 1), ((0, 0), (ph, ph), (pw, pw), (0, 0)))
    v = sliding_window_view(xh, _extent(kernel, dilation), axis=(1, 2))
    v = v[:, ::sh, ::sw, :, ::dh, ::dw]  # (N, OH, OW, C, kh, kw)
    n, oh, ow, c, kh, kw = v.shape
    return v.transpose(0, 1, 2, 4, 5, 3).reshape(n * oh * ow, kh * kw * c)


def _col2im_fwd(cols, shape: tuple, kernel: Pair, stride: Pair, padding: Pair,
                dilation: Pair = (1, 1)):
    """(N*OH*OW, kh*kw*C) -> (N, C, H, W): the transpose of im2col (overlaps accumulate)."""
    n, c, h, w = shape
    (ph, pw), (oh, ow) = padding, _out_hw(shape, _extent(kernel, dilation), stride, padding)
    g = cols.reshape(n, oh, ow, kernel[0], kernel[1], c)
    out = np.zeros((n, h + 2 * ph, w + 2 * pw, c), dtype=cols.dtype)
    for i, j, rows, cols_ in _offsets(kernel, stride, (oh, ow), dilation):
        out[:, rows, cols_, :] += g[:, :, :, i, j, :]
    return out[:, ph:ph + h, pw:pw + w, :].transpose(0, 3, 1, 2)


def _tiled(shape: tuple, kernel: Pair, stride: Pair, padding: Pair) -> bool:
    """Windows tile the input exactly (stride = kernel, no padding, sizes divisible): the
    common pooling case, where a reshape replaces all per-offset work."""
    return (tuple(kernel) == tuple(stride) and not any(padding)
            and shape[2] % kernel[0] == 0 and shape[3] % kernel[1] == 0)


def _max_pool_fwd(x, kernel: Pair, stride: Pair, padding: Pair):
    """Window maxima (N, C, OH, OW): a running maximum over the kh*kw offsets."""
    if _tiled(x.shape, kernel, stride, padding):
        n, c, h, w = x.shape
        (kh, kw) = kernel
        return x.reshape(n, c, h // kh, kh, w // kw, kw).max(axis=(3, 5))
    xp = _pad_nchw(x, padding, float(np.finfo(x.dtype).min))  # padding never wins
    y = None
    for _, _, rows, cols in _offsets(kernel, stride, _out_hw(x.shape, kernel, stride, padding)):
        y = xp[:, :, rows, cols].copy() if y is None else np.maximum(y, xp[:, :, rows, cols],
                                                                      out=y)
    return y


def _max_pool_argmax(x, y, kernel: Pair, stride: Pair, padding: Pair):
    """Flat index into x of each window's maximum (the first in row-major window order).

    For windows that overlap or pad; tiling windows use `_first_max_mask` instead."""
    x, y = _v(x), _v(y)
    n, c, h, w = x.shape
    (ph, pw), (sh, sw), (oh, ow) = padding, stride, y.shape[2:]
    plane = np.arange(n * c, dtype=np.int64).reshape(n, c, 1, 1) * (h * w)
    xp = _pad_nchw(x, padding, float(np.finfo(x.dtype).min))
    arg = np.full(y.shape, -1, dtype=np.int64)
    for i, j, rows, cols in _offsets(kernel, stride, (oh, ow)):
        r = np.arange(oh, dtype=np.int64) * sh + (i - ph)
        q = np.arange(ow, dtype=np.int64) * sw + (j - pw)
        inside = ((r >= 0) & (r < h))[:, None] & ((q >= 0) & (q < w))[None, :]
        hit = (xp[:, :, rows, cols] == y) & (arg < 0) & inside
        np.copyto(arg, plane + (r[:, None] * w + q[None, :]), where=hit)
    return arg


def _first_max_mask(x, y, kernel: Pair):
    """For tiling windows: a (N, C, OH, kh, OW, kw) boolean mask of each window's first
    maximum in row-major order (PyTorch's tie rule), built on the strided 6-D view of x.

    One comparison per kernel offset (kh*kw of them, a loop over offsets, not elements):
    numpy's argmax along a short strided axis is several times slower.
    """
    n, c, h, w = x.shape
    kh, kw = kernel
    win = x.reshape(n, c, h // kh, kh, w // kw, kw)
    mask = np.empty(win.shape, dtype=bool)
    taken = np.zeros(y.shape, dtype=bool)
    for i in range(kh):
        for j in range(kw):
            hit = np.equal(win[:, :, :, i, :, j], y)
            hit &= ~taken
            mask[:, :, :, i, :, j] = hit
            taken |= hit
    return mask


def _max_pool_vjp(g, y, x, **geo):
    """Each window's cotangent goes to its (first) maximum."""
    if _tiled(x.shape, **geo):
        n, c, oh, ow = y.shape
        mask = _first_max_mask(_v(x), _v(y), geo["kernel"])
        return (g.reshape(n, c, oh, 1, ow, 1) * mask).reshape(x.shape)
    arg = _max_pool_argmax(x, y, **geo)
    if not isinstance(g, Tensor) and all(s >= k for s, k in zip(geo["stride"], geo["kernel"])):
        # Windows do not overlap: every input receives from at most one window, so a
        # plain assignment does what the scatter-add does, without np.add.at.
        out = np.zeros(x.size, dtype=g.dtype)
        out[arg.ravel()] = g.ravel()
        return out.reshape(x.shape)
    return scatter_add(g, (arg,), (x.size,)).reshape(x.shape)


def _max_pool_jvp(t, y, x, **geo):
    if _tiled(x.shape, **geo):
        n, c, h, w = x.shape
        kh, kw = geo["kernel"]
        mask = _first_max_mask(_v(x), _v(y), geo["kernel"])
        picked = t.reshape(n, c, h // kh, kh, w // kw, kw) * mask
        return picked.sum(axis=(3, 5))
    return t.reshape(-1)[_max_pool_argmax(x, y, **geo)]


def _avg_pool_fwd(x, kernel: Pair, stride: Pair, padding: Pair):
    """Window means (N, C, OH, OW); zero padding counts (PyTorch's count_include_pad)."""
    xp = _pad_nchw(x, padding)
    y = None
    for _, _, rows, cols in _offsets(kernel, stride, _out_hw(x.shape, kernel, stride, padding)):
        y = xp[:, :, rows, cols].copy() if y is None else np.add(y, xp[:, :, rows, cols], out=y)
    y *= 1.0 / (kernel[0] * kernel[1])
    return y


def _avg_unpool_fwd(g, shape: tuple, kernel: Pair, stride: Pair, padding: Pair):
    """The transpose of avg_pool: each window's value / (kh*kw) added over the window."""
    n, c, h, w = shape
    ph, pw = padding
    out = np.zeros((n, c, h + 2 * ph, w + 2 * pw), dtype=g.dtype)
    share = g * (1.0 / (kernel[0] * kernel[1]))
    for _, _, rows, cols in _offsets(kernel, stride, g.shape[2:]):
        out[:, :, rows, cols] += share
    return out[:, :, ph:ph + h, pw:pw + w]


# ---- the table ---------------------------------------------------------------------------
# Geometry keywords (kernel, stride, padding) pass straight through as **geo.

linear_p = Primitive("linear", _linear_fwd,
    vjp=(lambda g, y, x, w, b: g @ w,
         lambda g, y, x, w, b: _rows(g, w.shape[0]).T @ _rows(x, w.shape[1]),
         lambda g, y, x, w, b: _rows(g, w.shape[0]).sum(0)),
    vjp_into={1: lambda out, scale, g, y, x, w, b: _weight_grad_into(out, scale, g, x, w)},
    jvp=(lambda t, y, x, w, b: t @ w.T,
         lambda t, y, x, w, b: x @ t.T,
         lambda t, y, x, w, b: broadcast_to(t, y.shape)))
gelu_p = Primitive("gelu", _gelu_fwd,
    vjp=(lambda g, y, x: g * _gelu_slope(x),),
    jvp=(lambda t, y, x: t * _gelu_slope(x),))
gelu_erf_p = Primitive("gelu_erf", _gelu_erf_fwd,
    vjp=(lambda g, y, x: g * _gelu_erf_slope(x),),
    jvp=(lambda t, y, x: t * _gelu_erf_slope(x),))
cross_entropy_p = Primitive("cross_entropy", _ce_fwd, residual=True,
    vjp=(lambda g, y, x, labels, smoothing, reduction, res=None:
         _ce_row_scale(g, len(labels), reduction) * _ce_dlogits(x, labels, smoothing, res),),
    jvp=(lambda t, y, x, labels, smoothing, reduction:
         _ce_reduce((_ce_dlogits(x, labels, smoothing) * t).sum(-1), reduction),))
im2col_p = Primitive("im2col", _im2col_fwd,
    vjp=(lambda g, y, x, **geo: col2im_p(g, shape=x.shape, **geo),),
    jvp=(lambda t, y, x, **geo: im2col_p(t, **geo),))
col2im_p = Primitive("col2im", _col2im_fwd,
    vjp=(lambda g, y, x, shape, **geo: im2col_p(g, **geo),),
    jvp=(lambda t, y, x, **kw: col2im_p(t, **kw),))
max_pool2d_p = Primitive("max_pool2d", _max_pool_fwd,
    vjp=(_max_pool_vjp,),
    jvp=(_max_pool_jvp,))
avg_pool2d_p = Primitive("avg_pool2d", _avg_pool_fwd,
    vjp=(lambda g, y, x, **geo: avg_unpool_p(g, shape=x.shape, **geo),),
    jvp=(lambda t, y, x, **geo: avg_pool2d_p(t, **geo),))
avg_unpool_p = Primitive("avg_unpool", _avg_unpool_fwd,
    vjp=(lambda g, y, x, shape, **geo: avg_pool2d_p(g, **geo),),
    jvp=(lambda t, y, x, **kw: avg_unpool_p(t, **kw),))


# ---- public functions for the primitives that take parameters ----------------------------

def _geo(kernel: Pair, stride: Pair, padding: Pair) -> dict:
    return {"kernel": tuple(kernel), "stride": tuple(stride), "padding": tuple(padding)}


def im2col(x, kernel: Pair, stride: Pair, padding: Pair = (0, 0), dilation: Pair = (1, 1)):
    """NCHW x -> patch matrix (N*OH*OW, kh*kw*C): rows ordered (n, oh, ow), columns (i, j, c)."""
    return im2col_p(x, **_geo(kernel, stride, padding), dilation=tuple(dilation))


def col2im(cols, shape: tuple, kernel: Pair, stride: Pair, padding: Pair = (0, 0),
           dilation: Pair = (1, 1)):
    """The transpose of `im2col`: patch matrix -> NCHW `shape`, overlapping patches summed."""
    return col2im_p(cols, shape=tuple(shape), **_geo(kernel, stride, padding),
                    dilation=tuple(dilation))


def max_pool2d(x, kernel: Pair, stride: Pair, padding: Pair = (0, 0)):
    """Window maxima of NCHW x; the gradient goes to the first maximum of each window."""
    return max_pool2d_p(x, **_geo(kernel, stride, padding))


def avg_pool2d(x, kernel: Pair, stride: Pair, padding: Pair = (0, 0)):
    """Window means of NCHW x (zero padding included in the count)."""
    return avg_pool2d_p(x, **_geo(kernel, stride, padding))
