"""Every primitive's VJP and JVP rule against finite differences, on several shapes.

The table below is the specification: one entry per op, with inputs that stay
inside the op's domain. Each entry is checked in float64 (VJP against central
differences, JVP against VJP) and in float32 (every gradient keeps its input's
dtype and is finite).
"""

import numpy as np
import pytest

import distad as ad

rng = np.random.default_rng(0)


def pos(*s):
    return rng.uniform(0.5, 2.0, s)


def any_(*s):
    return rng.standard_normal(s)


def away0(*s):
    """Values with |x| >= 0.2, so kinks (relu, abs, max ties) are not straddled by FD."""
    x = rng.uniform(0.2, 1.5, s)
    return x * rng.choice([-1.0, 1.0], s)


CASES = [
    # name, function, input factories
    ("add", lambda a, b: a + b, [any_(3, 4), any_(3, 4)]),
    ("add-broadcast", lambda a, b: a + b, [any_(2, 3, 4), any_(4)]),
    ("add-broadcast-keepdim", lambda a, b: a + b, [any_(3, 1), any_(1, 4)]),
    ("radd-scalar", lambda a: 2.5 + a, [any_(3)]),
    ("sub", lambda a, b: a - b, [any_(3, 4), any_(3, 1)]),
    ("rsub-scalar", lambda a: 1.0 - a, [any_(2, 2)]),
    ("mul", lambda a, b: a * b, [any_(3, 4), any_(3, 4)]),
    ("mul-broadcast", lambda a, b: a * b, [any_(5, 1, 3), any_(4, 1)]),
    ("div", lambda a, b: a / b, [any_(3, 4), pos(4)]),
    ("rdiv-scalar", lambda a: 2.0 / a, [pos(3)]),
    ("neg", lambda a: -a, [any_(3)]),
    ("pow-scalar", lambda a: a ** 3, [any_(3, 2)]),
    ("pow-fractional", lambda a: a ** 1.5, [pos(4)]),
    ("pow-tensor", lambda a, b: a ** b, [pos(3), any_(3)]),
    ("rpow", lambda b: 2.0 ** b, [any_(3)]),
    ("matmul-2d", lambda a, b: a @ b, [any_(3, 4), any_(4, 5)]),
    ("matmul-batched", lambda a, b: a @ b, [any_(2, 3, 4), any_(4, 5)]),
    ("matmul-batched-both", lambda a, b: a @ b, [any_(2, 3, 4), any_(2, 4, 2)]),
    ("matmul-vec-mat", lambda a, b: a @ b, [any_(4), any_(4, 3)]),
    ("matmul-mat-vec", lambda a, b: a @ b, [any_(3, 4), any_(4)]),
    ("matmul-vec-vec", lambda a, b: a @ b, [any_(4), any_(4)]),
    ("exp", ad.exp, [any_(3, 4)]),
    ("log", ad.log, [pos(3, 4)]),
    ("sqrt", ad.sqrt, [pos(5)]),
    ("abs", ad.abs, [away0(3, 3)]),
    ("sin", ad.sin, [any_(4)]),
    ("cos", ad.cos, [any_(4)]),
    ("tanh", ad.tanh, [any_(2, 3)]),
    ("erf", ad.erf, [any_(3, 4) * 1.5]),
    ("sigmoid", ad.sigmoid, [any_(2, 3)]),
    ("relu", ad.relu, [away0(3, 4)]),
    ("maximum", ad.maximum, [any_(3, 4), any_(4)]),
    ("minimum", ad.minimum, [any_(3, 4), any_(3, 1)]),
    ("where", lambda a, b: ad.where(np.arange(12).reshape(3, 4) % 3 == 0, a, b),
     [any_(3, 4), any_(4)]),
    ("clip", lambda a: ad.clip(a, -0.5, 0.7), [np.array([-1.2, -0.3, 0.1, 0.5, 1.4])]),
    ("sum-all", lambda a: ad.sum(a), [any_(3, 4)]),
    ("sum-axis", lambda a: a.sum(axis=1), [any_(3, 4, 2)]),
    ("sum-axes-keepdims", lambda a: a.sum(axis=(0, 2), keepdims=True), [any_(3, 4, 2)]),
    ("mean-axis", lambda a: a.mean(axis=-1), [any_(3, 4)]),
    ("mean-all", lambda a: ad.mean(a), [any_(2, 5)]),
    ("max-axis", lambda a: a.max(axis=1), [np.arange(12.0).reshape(3, 4) % 5 + any_(3, 4) * .01]),
    ("min-all", lambda a: a.min(), [np.arange(6.0) * 0.3 - 1]),
    ("max-keepdims", lambda a: ad.max(a, axis=0, keepdims=True), [np.arange(6.0).reshape(2, 3)]),
    ("logsumexp", lambda a: ad.logsumexp(a, axis=1), [any_(3, 5)]),
    ("logsumexp-all", lambda a: ad.logsumexp(a), [any_(2, 3)]),
    ("log_softmax", lambda a: ad.log_softmax(a, axis=-1), [any_(3, 5)]),
    ("log_softmax-axis0", lambda a: ad.log_softmax(a, axis=0), [any_(3, 5)]),
    ("softmax", lambda a: ad.softmax(a), [any_(4, 3)]),
    ("reshape", lambda a: a.reshape(6, 2), [any_(3, 4)]),
    ("reshape-fn", lambda a: ad.reshape(a, (2, -1)), [any_(3, 4)]),
    ("transpose", lambda a: a.T, [any_(3, 4)]),
    ("transpose-axes", lambda a: ad.transpose(a, (1, 2, 0)), [any_(2, 3, 4)]),
    ("broadcast_to", lambda a: ad.broadcast_to(a, (3, 2, 4)), [any_(2, 1)]),
    ("index-basic", lambda a: a[1:, ::2], [any_(4, 5)]),
    ("index-int", lambda a: a[2], [any_(4, 3)]),
    ("index-advanced-repeats", lambda a: a[np.array([0, 2, 2, 0, 3])], [any_(4, 3)]),
    ("index-pairs", lambda a: a[np.arange(3), np.array([1, 1, 0])], [any_(3, 2)]),
    ("index-bool", lambda a: a[np.array([True, False, True])], [any_(3, 2)]),
    ("concatenate", lambda a, b: ad.concatenate([a, b], axis=1), [any_(2, 3), any_(2, 4)]),
    ("stack", lambda a, b: ad.stack([a, b], axis=-1), [any_(2, 3), any_(2, 3)]),
    ("cast", lambda a: ad.cast(a, np.float64) * 2, [any_(3)]),
]
IDS = [c[0] for c in CASES]


@pytest.mark.parametrize("name,fn,inputs", CASES, ids=IDS)
def test_vjp_matches_finite_differences_float64(name, fn, inputs):
    assert ad.gradcheck(fn, *[x.astype(np.float64) for x in inputs])


@pytest.mark.parametrize("name,fn,inputs", CASES, ids=IDS)
def test_jvp_is_the_transpose_of_vjp(name, fn, inputs):
    """<J v, u> == <v, J^T u> for random v and u: forward and reverse rules agree."""
    xs = tuple(x.astype(np.float64) for x in inputs)
    vs = tuple(rng.standard_normal(x.shape) for x in xs)
    out, jv = ad.jvp(fn, xs, vs)
    u = rng.standard_normal(np.shape(out))
    _, vjp_fn = ad.vjp(fn, *xs)
    jtu = vjp_fn(u)
    lhs = float(np.sum(np.asarray(jv) * u))
    rhs = sum(float(np.sum(v * g)) for v, g in zip(vs, jtu))
    assert lhs == pytest.approx(rhs, rel=1e-9, abs=1e-9)


@pytest.mark.parametrize("name,fn,inputs", CASES, ids=IDS)
def test_reverse_over_forward_matches_finite_differences(name, fn, inputs):
    """grad of x -> <u, J(x) v> (a JVP differentiated by reverse mode: every JVP rule runs on
    recorded Tensors) against central differences of the same JVP."""
    xs = tuple(x.astype(np.float64) for x in inputs)
    vs = tuple(rng.standard_normal(x.shape) for x in xs)
    u = rng.standard_normal(np.shape(ad.jvp(fn, xs, vs)[1]))

    def directional(*a):
        return (ad.jvp(fn, a, vs)[1] * u).sum()

    assert ad.gradcheck(directional, *xs, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name,fn,inputs", CASES, ids=IDS)
def test_forward_over_forward_matches_reverse_over_forward(name, fn, inputs):
    """The derivative of x -> <u, J(x) v> along w, by jvp of jvp (every JVP rule runs on
    Tensors that carry the outer tangent), against its gradient by reverse over forward and
    against central differences of the inner jvp."""
    xs = tuple(x.astype(np.float64) for x in inputs)
    vs = tuple(rng.standard_normal(x.shape) for x in xs)
    ws = tuple(rng.standard_normal(x.shape) for x in xs)
    u = rng.standard_normal(np.shape(ad.jvp(fn, xs, vs)[1]))

    def directional(*a):
        return (ad.jvp(fn, a, vs)[1] * u).sum()

    nested = float(ad.jvp(directional, xs, ws)[1])
    grads = ad.grad(directional, argnums=tuple(range(len(xs))))(*xs)
    assert nested == pytest.approx(sum(float((w * g).sum()) for w, g in zip(ws, grads)),
                                   rel=1e-9, abs=1e-9)
    h = 1e-6
    fd = (float(directional(*(x + h * w for x, w in zip(xs, ws))))
          - float(directional(*(x - h * w for x, w in zip(xs, ws))))) / (2 * h)
    assert nested == pytest.approx(fd, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("name,fn,inputs", CASES, ids=IDS)
def test_every_rule_keeps_float32(name, fn, inputs):
    xs = [ad.tensor(x.astype(np.float32), requires_grad=True) for x in inputs]
    out = fn(*xs)
    if name != "cast":
        assert out.dtype == np.float32, f"{name}: forward gave {out.dtype}"
    out.backward(np.ones(out.shape, dtype=out.dtype))
    for x in xs:
        assert x.grad.dtype == np.float32, f"{name}: gradient is {x.grad.dtype}"
        assert x.grad.shape == x.shape
        assert np.all(np.isfinite(x.grad))


@pytest.mark.parametrize("name,fn,inputs", CASES, ids=IDS)
def test_jvp_keeps_float32(name, fn, inputs):
    xs = tuple(x.astype(np.float32) for x in inputs)
    out, t = ad.jvp(fn, xs, tuple(np.ones_like(x) for x in xs))
    if name != "cast":
        assert np.asarray(t).dtype == np.float32


def test_erf_matches_math_erf_in_float64_and_float32_and_at_the_edges():
    import math

    x = np.concatenate([np.linspace(-9, 9, 20001), [1e-300, 1e-10, 0.999999, 1.0, 1.000001]])
    ref = np.array([math.erf(v) for v in x])
    np.testing.assert_allclose(ad.erf(x), ref, rtol=2e-15, atol=1e-300)
    x32 = x.astype(np.float32)
    y32 = ad.erf(x32)
    assert y32.dtype == np.float32
    np.testing.assert_allclose(y32, [math.erf(float(v)) for v in x32], rtol=0, atol=3e-7)
    edges = ad.erf(np.array([np.inf, -np.inf, 1e300, -1e300, -0.0, np.nan]))
    np.testing.assert_array_equal(edges[:5], [1, -1, 1, -1, 0])
    assert np.signbit(edges[4]) and np.isnan(edges[5])
