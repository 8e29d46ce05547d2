"""The table of primitives: each forward next to its VJP and JVP rule per input.

Notation in the rules: `g` is the output cotangent, `t` an input tangent, `y`
the output, then the inputs in order. Rules use operators, methods that numpy
arrays and Tensors share (`.sum`, `.reshape`, `.mT`, indexing) and the distad
ops below, so one rule serves first-order backward on numpy arrays and
higher-order backward on recorded Tensors. Non-differentiable quantities
(masks, counts) are computed on raw values with `_v`.

Constants are Python scalars or arrays in the input's dtype, so float32 stays
float32 (numpy 2 treats Python scalars as weakly typed).
"""

from __future__ import annotations

import builtins

import numpy as np

from .engine import Primitive, Tensor, apply

_NOKW: dict = {}


def _v(a):
    """The raw value of a Tensor or array (for masks and counts, which have no gradient)."""
    return a.data if isinstance(a, Tensor) else a


def _norm_axes(axis, ndim: int) -> tuple[int, ...]:
    if axis is None:
        return tuple(range(ndim))
    if isinstance(axis, int):
        axis = (axis,)
    return tuple(a % ndim if ndim else 0 for a in axis)


def _keepdims_shape(shape: tuple, axis) -> tuple:
    axes = _norm_axes(axis, len(shape))
    return tuple(1 if i in axes else s for i, s in enumerate(shape))


def _expand(g, shape: tuple, axis, keepdims: bool):
    """Reshape a reduction's cotangent so it broadcasts against the reduced input."""
    return g if keepdims else g.reshape(_keepdims_shape(shape, axis))


# ---- forwards that numpy does not have as one call --------------------------------------

def _sum_to_fwd(x, shape):
    """Sum `x` down to `shape` (the reverse of numpy broadcasting)."""
    shape = tuple(shape)
    if x.shape == shape:
        return x
    lead = x.ndim - len(shape)
    if x.shape[lead:] == shape:  # only leading axes were broadcast (a bias): one reduction
        return np.sum(x, axis=tuple(range(lead)))
    axes = tuple(range(lead)) + tuple(
        lead + i for i, s in enumerate(shape) if s == 1 and x.shape[lead + i] != 1)
    return np.sum(x, axis=axes, keepdims=True).reshape(shape)


def _broadcast_fwd(x, shape):
    return x if np.shape(x) == tuple(shape) else np.broadcast_to(x, shape)


def _is_basic_index(idx) -> bool:
    """Basic (view) indexing: ints, slices, None, Ellipsis — no index arrays, no repeats."""
    parts = idx if isinstance(idx, tuple) else (idx,)
    return all(p is None or p is Ellipsis or isinstance(p, (int, np.integer, slice))
               for p in parts)


def _scatter_add_fwd(x, idx, shape):
    """zeros(shape)[idx] += x, accumulating repeated indices."""
    out = np.zeros(shape, dtype=x.dtype)
    if _is_basic_index(idx):
        out[idx] = x
    else:
        np.add.at(out, idx, x)
    return out


def _logsumexp_fwd(x, axis=None, keepdims=False):
    m = np.max(x, axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0).astype(x.dtype, copy=False)
    r = np.log(np.sum(np.exp(x - m), axis=axis, keepdims=True)) + m
    return r if keepdims else r.reshape(np.sum(x, axis=axis).shape)


def _log_softmax_fwd(x, axis=-1):
    return x - _logsumexp_fwd(x, axis=axis, keepdims=True)


def _softmax_fwd(x, axis=-1):
    e = np.exp(x - np.max(x, axis=axis, keepdims=True))
    return e / np.sum(e, axis=axis, keepdims=True)


def _sigmoid_fwd(x):
    # tanh form: no overflow warning for large |x|, and stays in the input dtype.
    return (np.tanh(x * 0.5) + 1) * 0.5


# erf: the rational approximations of Cephes (S. L. Moshier), as in scipy: x T(x^2) / U(x^2)
# for |x| < 1, else sign(x) (1 - exp(-x^2) P(|x|) / Q(|x|)) with |x| capped at 8, beyond which
# erf is +-1 to float64 precision. Evaluated in the input's dtype (float32 stays float32).
_ERF_T = (9.60497373987051638749e0, 9.00260197203842689217e1, 2.23200534594684319226e3,
          7.00332514112805075473e3, 5.55923013010394962768e4)
_ERF_U = (3.35617141647503099647e1, 5.21357949780152679795e2, 4.59432382970980127987e3,
          2.26290000613890934246e4, 4.92673942608635921086e4)
_ERFC_P = (2.46196981473530512524e-10, 5.64189564831068821977e-1, 7.46321056442269912687e0,
           4.86371970985681366614e1, 1.96520832956077098242e2, 5.26445194995477358631e2,
           9.34528527171957607540e2, 1.02755188689515710272e3, 5.57535335369399327526e2)
_ERFC_Q = (1.32281951154744992508e1, 8.67072140885989742329e1, 3.54937778887819891062e2,
           9.75708501743205489753e2, 1.82390916687909736289e3, 2.24633760818710981792e3,
           1.65666309194161350182e3, 5.57535340817727675546e2)
_TWO_OVER_SQRT_PI = float(2.0 / np.sqrt(np.pi))  # a Python float: weakly typed


def _ratio(z, num, den):
    """num(z) / den(z) by Horner's rule; den has an implied leading coefficient 1."""
    p, q = num[0], z + den[0]
    for c in num[1:]:
        p = p * z + c
    for c in den[1:]:
        q = q * z + c
    return p / q


def _erf_fwd(x):
    x = x if x.dtype.kind == "f" else x.astype(np.float64)
    inner = np.clip(x, -1, 1)
    inner = inner * _ratio(inner * inner, _ERF_T, _ERF_U)
    a = np.minimum(np.abs(x), 8)
    outer = np.copysign(1 - np.exp(-a * a) * _ratio(a, _ERFC_P, _ERFC_Q), x)
    return np.where(np.abs(x) < 1, inner, outer)


def _clip_mask(x, lo, hi):
    x = _v(x)
    m = np.ones(x.shape, dtype=bool)
    if lo is not None:
        m &= x >= _v(lo)
    if hi is not None:
        m &= x <= _v(hi)
    return m


def _maxmin_vjp(g, y, x, axis=None, keepdims=False):
    """Split g equally among the elements that attain the max (or min)."""
    xv = _v(x)
    hit = xv == _v(_expand(y, xv.shape, axis, keepdims))
    w = (hit / np.sum(hit, axis=axis, keepdims=True)).astype(xv.dtype, copy=False)
    return _expand(g, xv.shape, axis, keepdims) * w


def _maxmin_jvp(t, y, x, axis=None, keepdims=False):
    return (t * _maxmin_vjp(np.ones_like(_v(y)), y, x, axis, keepdims)).sum(axis, keepdims=keepdims)


def _mT(x):
    return x.mT if x.ndim > 2 else x.T


def _matmul_vjp_a(g, y, a, b):
    if b.ndim == 1:
        return g * b if a.ndim == 1 else sum_to(g[..., None] * b, a.shape)
    if a.ndim == 1:
        return sum_to((b @ g[..., None])[..., 0], a.shape)
    return sum_to(g @ _mT(b), a.shape)


def _matmul_vjp_b(g, y, a, b):
    if a.ndim == 1:
        return g * a if b.ndim == 1 else sum_to(a[..., None] * g[..., None, :], b.shape)
    if b.ndim == 1:
        return sum_to((_mT(a) @ g[..., None])[..., 0], b.shape)
    return sum_to(_mT(a) @ g, b.shape)


def _concat_slice(i, xs, axis, ndim):
    ax = axis % ndim
    start = builtins.sum(x.shape[ax] for x in xs[:i])
    return (slice(None),) * ax + (slice(start, start + xs[i].shape[ax]),)


def _stack_index(i, axis, ndim):
    return (slice(None),) * (axis % ndim) + (i,)


def _safe_log(a):
    """log(a) where a > 0, else 0: the exponent's gradient of a ** b (undefined for a <= 0)."""
    if not isinstance(a, (np.ndarray, np.generic, Tensor)):
        return float(np.log(a)) if a > 0 else 0.0  # a Python scalar stays weakly typed
    av = _v(a)
    return log(where(av > 0, a, np.ones_like(av)))


# ---- the table --------------------------------------------------------------------------
# name            forward          VJP per input                                                JVP per input

add = Primitive("add", np.add,
    vjp=(lambda g, y, a, b: sum_to(g, a.shape),          lambda g, y, a, b: sum_to(g, b.shape)),
    jvp=(lambda t, y, a, b: broadcast_to(t, y.shape),    lambda t, y, a, b: broadcast_to(t, y.shape)))
sub = Primitive("sub", np.subtract,
    vjp=(lambda g, y, a, b: sum_to(g, a.shape),          lambda g, y, a, b: sum_to(-g, b.shape)),
    jvp=(lambda t, y, a, b: broadcast_to(t, y.shape),    lambda t, y, a, b: broadcast_to(-t, y.shape)))
mul = Primitive("mul", np.multiply,
    vjp=(lambda g, y, a, b: sum_to(g * b, a.shape),      lambda g, y, a, b: sum_to(g * a, b.shape)),
    jvp=(lambda t, y, a, b: broadcast_to(t * b, y.shape), lambda t, y, a, b: broadcast_to(a * t, y.shape)))
div = Primitive("div", np.true_divide,
    vjp=(lambda g, y, a, b: sum_to(g / b, a.shape),      lambda g, y, a, b: sum_to(-g * y / b, b.shape)),
    jvp=(lambda t, y, a, b: broadcast_to(t / b, y.shape), lambda t, y, a, b: broadcast_to(-t * y / b, y.shape)))
power = Primitive("power", np.power,
    vjp=(lambda g, y, a, b: sum_to(g * b * a ** (b - 1), a.shape),
         lambda g, y, a, b: sum_to(g * y * _safe_log(a), b.shape)),
    jvp=(lambda t, y, a, b: broadcast_to(t * b * a ** (b - 1), y.shape),
         lambda t, y, a, b: broadcast_to(t * y * _safe_log(a), y.shape)))
neg = Primitive("neg", np.negative, vjp=(lambda g, y, x: -g,),          jvp=(lambda t, y, x: -t,))
matmul = Primitive("matmul", np.matmul, vjp=(_matmul_vjp_a, _matmul_vjp_b),
    jvp=(lambda t, y, a, b: t @ b,                       lambda t, y, a, b: a @ t))

exp = Primitive("exp", np.exp,         vjp=(lambda g, y, x: g * y,),                jvp=(lambda t, y, x: t * y,))
log = Primitive("log", np.log,         vjp=(lambda g, y, x: g / x,),                jvp=(lambda t, y, x: t / x,))
sqrt = Primitive("sqrt", np.sqrt,      vjp=(lambda g, y, x: g * 0.5 / y,),          jvp=(lambda t, y, x: t * 0.5 / y,))
sin = Primitive("sin", np.sin,         vjp=(lambda g, y, x: g * cos(x),),           jvp=(lambda t, y, x: t * cos(x),))
cos = Primitive("cos", np.cos,         vjp=(lambda g, y, x: -g * sin(x),),          jvp=(lambda t, y, x: -t * sin(x),))
erf = Primitive("erf", _erf_fwd,
    vjp=(lambda g, y, x: g * _TWO_OVER_SQRT_PI * exp(-(x * x)),),
    jvp=(lambda t, y, x: t * _TWO_OVER_SQRT_PI * exp(-(x * x)),))
tanh = Primitive("tanh", np.tanh,      vjp=(lambda g, y, x: g * (1 - y * y),),      jvp=(lambda t, y, x: t * (1 - y * y),))
sigmoid = Primitive("sigmoid", _sigmoid_fwd,
                                       vjp=(lambda g, y, x: g * y * (1 - y),),      jvp=(lambda t, y, x: t * y * (1 - y),))
relu = Primitive("relu", lambda x: np.maximum(x, x.dtype.type(0)),
                                       vjp=(lambda g, y, x: g * (_v(y) > 0),),      jvp=(lambda t, y, x: t * (_v(y) > 0),))
abs = Primitive("abs", np.abs,         vjp=(lambda g, y, x: g * np.sign(_v(x)),),   jvp=(lambda t, y, x: t * np.sign(_v(x)),))
maximum = Primitive("maximum", np.maximum,
    vjp=(lambda g, y, a, b: sum_to(g * (_v(a) >= _v(b)), a.shape),
         lambda g, y, a, b: sum_to(g * (_v(a) < _v(b)), b.shape)),
    jvp=(lambda t, y, a, b: broadcast_to(t * (_v(a) >= _v(b)), y.shape),
         lambda t, y, a, b: broadcast_to(t * (_v(a) < _v(b)), y.shape)))
minimum = Primitive("minimum", np.minimum,
    vjp=(lambda g, y, a, b: sum_to(g * (_v(a) <= _v(b)), a.shape),
         lambda g, y, a, b: sum_to(g * (_v(a) > _v(b)), b.shape)),
    jvp=(lambda t, y, a, b: broadcast_to(t * (_v(a) <= _v(b)), y.shape),
         lambda t, y, a, b: broadcast_to(t * (_v(a) > _v(b)), y.shape)))
where = Primitive("where", np.where,
    vjp=(lambda g, y, c, a, b: 0 * c,
         lambda g, y, c, a, b: sum_to(g * _v(c), a.shape),
         lambda g, y, c, a, b: sum_to(g * ~_v(c), b.shape)),
    jvp=(lambda t, y, c, a, b: 0 * y,
         lambda t, y, c, a, b: broadcast_to(t * _v(c), y.shape),
         lambda t, y, c, a, b: broadcast_to(t * ~_v(c), y.shape)))
clip_p = Primitive("clip", lambda x, lo=None, hi=None: np.clip(x, lo, hi),
    vjp=(lambda g, y, x, lo=None, hi=None: g * _clip_mask(x, lo, hi),),
    jvp=(lambda t, y, x, lo=None, hi=None: t * _clip_mask(x, lo, hi),))
cast_p = Primitive("cast", lambda x, dtype: x.astype(dtype, copy=False),
    vjp=(lambda g, y, x, dtype: cast(g, x.dtype),),      jvp=(lambda t, y, x, dtype: cast(t, dtype),))

# Reductions (axis=None reduces everything; keepdims as in numpy)
sum_p = Primitive("sum", lambda x, axis=None, keepdims=False: np.sum(x, axis=axis, keepdims=keepdims),
    vjp=(lambda g, y, x, axis=None, keepdims=False: broadcast_to(_expand(g, x.shape, axis, keepdims), x.shape),),
    jvp=(lambda t, y, x, axis=None, keepdims=False: t.sum(axis, keepdims=keepdims),))
mean_p = Primitive("mean", lambda x, axis=None, keepdims=False: np.mean(x, axis=axis, keepdims=keepdims),
    vjp=(lambda g, y, x, axis=None, keepdims=False:
         broadcast_to(_expand(g, x.shape, axis, keepdims) * (y.size / x.size), x.shape),),
    jvp=(lambda t, y, x, axis=None, keepdims=False: t.mean(axis, keepdims=keepdims),))
max_p = Primitive("max", lambda x, axis=None, keepdims=False: np.max(x, axis=axis, keepdims=keepdims),
    vjp=(_maxmin_vjp,), jvp=(_maxmin_jvp,))
min_p = Primitive("min", lambda x, axis=None, keepdims=False: np.min(x, axis=axis, keepdims=keepdims),
    vjp=(_maxmin_vjp,), jvp=(_maxmin_jvp,))

# Fused, numerically stable (finite for logits of 1e4)
logsumexp_p = Primitive("logsumexp", _logsumexp_fwd,
    vjp=(lambda g, y, x, axis=None, keepdims=False:
         _expand(g, x.shape, axis, keepdims) * exp(x - _expand(y, x.shape, axis, keepdims)),),
    jvp=(lambda t, y, x, axis=None, keepdims=False:
         (t * exp(x - _expand(y, x.shape, axis, keepdims))).sum(axis, keepdims=keepdims),))
log_softmax_p = Primitive("log_softmax", _log_softmax_fwd,
    vjp=(lambda g, y, x, axis=-1: g - exp(y) * g.sum(axis, keepdims=True),),
    jvp=(lambda t, y, x, axis=-1: t - (exp(y) * t).sum(axis, keepdims=True),))
softmax_p = Primitive("softmax", _softmax_fwd,
    vjp=(lambda g, y, x, axis=-1: y * (g - (g * y).sum(axis, keepdims=True)),),
    jvp=(lambda t, y, x, axis=-1: y * (t - (t * y).sum(axis, keepdims=True)),))

# Shapes and indexing
reshape_p = Primitive("reshape", lambda x, shape: np.reshape(x, shape),
    vjp=(lambda g, y, x, shape: g.reshape(x.shape),),    jvp=(lambda t, y, x, shape: t.reshape(y.shape),))
transpose_p = Primitive("transpose", lambda x, axes=None: np.transpose(x, axes),
    vjp=(lambda g, y, x, axes=None: transpose(g, None if axes is None else tuple(np.argsort(axes))),),
    jvp=(lambda t, y, x, axes=None: transpose(t, axes),))
broadcast_to_p = Primitive("broadcast_to", _broadcast_fwd,
    vjp=(lambda g, y, x, shape: sum_to(g, x.shape),),    jvp=(lambda t, y, x, shape: broadcast_to(t, shape),))
sum_to_p = Primitive("sum_to", _sum_to_fwd,
    vjp=(lambda g, y, x, shape: broadcast_to(g, x.shape),), jvp=(lambda t, y, x, shape: sum_to(t, shape),))
getitem_p = Primitive("getitem", lambda x, idx: x[idx],
    vjp=(lambda g, y, x, idx: scatter_add(g, idx, x.shape),), jvp=(lambda t, y, x, idx: t[idx],))
scatter_add_p = Primitive("scatter_add", _scatter_add_fwd,
    vjp=(lambda g, y, x, idx, shape: g[idx],),            jvp=(lambda t, y, x, idx, shape: scatter_add(t, idx, shape),))
concatenate_p = Primitive("concatenate", lambda *xs, axis=0: np.concatenate(xs, axis=axis),
    vjp=lambda i, g, y, *xs, axis=0: g[_concat_slice(i, xs, axis, y.ndim)],
    jvp=lambda i, t, y, *xs, axis=0: scatter_add(t, _concat_slice(i, xs, axis, y.ndim), y.shape))
stack_p = Primitive("stack", lambda *xs, axis=0: np.stack(xs, axis=axis),
    vjp=lambda i, g, y, *xs, axis=0: g[_stack_index(i, axis, y.ndim)],
    jvp=lambda i, t, y, *xs, axis=0: scatter_add(t, _stack_index(i, axis, y.ndim), y.shape))


# ---- public functions for the primitives that take parameters ---------------------------
# Parameters travel as keywords, so they are never mistaken for differentiable inputs.

def clip(x, lo=None, hi=None):
    """Limit values to [lo, hi] (either may be None); gradient 1 inside, 0 outside."""
    return clip_p(x, lo=lo, hi=hi)


def cast(x, dtype):
    """x in another floating dtype; the gradient is cast back."""
    return cast_p(x, dtype=np.dtype(dtype))


def sum(x, axis=None, keepdims=False):
    return sum_p(x, axis=axis, keepdims=keepdims)


def mean(x, axis=None, keepdims=False):
    return mean_p(x, axis=axis, keepdims=keepdims)


def max(x, axis=None, keepdims=False):
    """Maximum along axis; ties share the gradient equally."""
    return max_p(x, axis=axis, keepdims=keepdims)


def min(x, axis=None, keepdims=False):
    """Minimum along axis; ties share the gradient equally."""
    return min_p(x, axis=axis, keepdims=keepdims)


def logsumexp(x, axis=None, keepdims=False):
    """log(sum(exp(x))) along axis, shifted by the max so it is finite for large logits."""
    return logsumexp_p(x, axis=axis, keepdims=keepdims)


def log_softmax(x, axis=-1):
    """x - logsumexp(x) along axis, computed stably."""
    return log_softmax_p(x, axis=axis)


def softmax(x, axis=-1):
    """exp(x) / sum(exp(x)) along axis, computed stably."""
    return softmax_p(x, axis=axis)


def reshape(x, shape):
    return reshape_p(x, shape=tuple(shape) if not isinstance(shape, int) else (shape,))


def transpose(x, axes=None):
    """Permute axes (reverse them when axes is None)."""
    return transpose_p(x, axes=None if axes is None else tuple(axes))


def broadcast_to(x, shape):
    if x.shape == shape:  # the common case in rules: nothing to do, nothing to record
        return x
    return broadcast_to_p(x, shape=tuple(shape))


def sum_to(x, shape):
    """Sum x down to `shape`, undoing numpy broadcasting (the VJP of broadcast_to)."""
    if x.shape == shape:
        return x
    if type(x) is np.ndarray:  # first-order backward: no dispatch needed
        return _sum_to_fwd(x, shape)
    return sum_to_p(x, shape=tuple(shape))


def scatter_add(x, idx, shape):
    """zeros(shape) with x added at [idx]; repeated indices accumulate (the VJP of indexing)."""
    return scatter_add_p(x, idx=idx, shape=tuple(shape))


def concatenate(tensors, axis: int = 0):
    """Join a sequence of arrays along an existing axis (numpy semantics)."""
    return concatenate_p(*tensors, axis=axis)


def stack(tensors, axis: int = 0):
    """Join a sequence of same-shape arrays along a new axis (numpy semantics)."""
    return stack_p(*tensors, axis=axis)


# ---- Tensor operators and methods -------------------------------------------------------

def _unwrap_index(idx):
    if isinstance(idx, Tensor):
        return idx.data
    if isinstance(idx, tuple):
        return tuple(i.data if isinstance(i, Tensor) else i for i in idx)
    return idx


def _compare(ufunc):
    return lambda self, other: Tensor(ufunc(self.data, _v(other)))


def _reduction(prim):
    def method(self, axis=None, keepdims=False):
        return apply(prim, (self,), {"axis": axis, "keepdims": keepdims})
    method.__name__ = prim.name
    return method


def _install_tensor_methods() -> None:
    T = Tensor
    T.__add__ = lambda self, other: apply(add, (self, other), _NOKW)
    T.__radd__ = lambda self, other: apply(add, (other, self), _NOKW)
    T.__sub__ = lambda self, other: apply(sub, (self, other), _NOKW)
    T.__rsub__ = lambda self, other: apply(sub, (other, self), _NOKW)
    T.__mul__ = lambda self, other: apply(mul, (self, other), _NOKW)
    T.__rmul__ = lambda self, other: apply(mul, (other, self), _NOKW)
    T.__truediv__ = lambda self, other: apply(div, (self, other), _NOKW)
    T.__rtruediv__ = lambda self, other: apply(div, (other, self), _NOKW)
    T.__pow__ = lambda self, other: apply(power, (self, other), _NOKW)
    T.__rpow__ = lambda self, other: apply(power, (other, self), _NOKW)
    T.__matmul__ = lambda self, other: apply(matmul, (self, other), _NOKW)
    T.__rmatmul__ = lambda self, other: apply(matmul, (other, self), _NOKW)
    T.__neg__ = lambda self: apply(neg, (self,), _NOKW)
    T.__pos__ = lambda self: self
    T.__abs__ = lambda self: apply(abs, (self,), _NOKW)
    T.__getitem__ = lambda self, idx: apply(getitem_p, (self,), {"idx": _unwrap_index(idx)})
    T.__lt__ = _compare(np.less)
    T.__le__ = _compare(np.less_equal)
    T.__gt__ = _compare(np.greater)
    T.__ge__ = _compare(np.greater_equal)
    T.__eq__ = _compare(np.equal)
    T.__ne__ = _compare(np.not_equal)
    T.__invert__ = lambda self: Tensor(~self.data)
    T.__bool__ = lambda self: bool(self.data)
    T.__float__ = lambda self: float(self.data)
    T.__array__ = lambda self, dtype=None, copy=None: np.asarray(self.data, dtype=dtype)
    T.__array_ufunc__ = None  # numpy operators defer to Tensor's reflected operators
    T.sum = _reduction(sum_p)
    T.mean = _reduction(mean_p)
    T.max = _reduction(max_p)
    T.min = _reduction(min_p)
    T.logsumexp = _reduction(logsumexp_p)

    def _reshape(self, *shape):
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = tuple(shape[0])
        return apply(reshape_p, (self,), {"shape": shape})

    def _transpose(self, *axes):
        if len(axes) == 1 and isinstance(axes[0], (tuple, list)):
            axes = tuple(axes[0])
        return apply(transpose_p, (self,), {"axes": axes or None})

    T.reshape = _reshape
    T.transpose = _transpose
    T.T = property(lambda self: apply(transpose_p, (self,), {"axes": None}))
    T.mT = property(lambda self: apply(
        transpose_p, (self,), {"axes": (*range(self.ndim - 2), self.ndim - 1, self.ndim - 2)}))
    T.flatten = lambda self: _reshape(self, -1)
    T.astype = lambda self, dtype: apply(cast_p, (self,), {"dtype": np.dtype(dtype)})
    for name, prim in [("exp", exp), ("log", log), ("sqrt", sqrt), ("abs", abs), ("sin", sin),
                       ("cos", cos), ("tanh", tanh), ("sigmoid", sigmoid), ("relu", relu)]:
        setattr(T, name, (lambda p: lambda self: apply(p, (self,), _NOKW))(prim))
    T.clip = lambda self, lo=None, hi=None: apply(clip_p, (self,), {"lo": lo, "hi": hi})
    T.softmax = lambda self, axis=-1: apply(softmax_p, (self,), {"axis": axis})
    T.log_softmax = lambda self, axis=-1: apply(log_softmax_p, (self,), {"axis": axis})


_install_tensor_methods()
