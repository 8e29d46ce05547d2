"""Functional transforms, forward mode, higher order, checkpointing, custom rules, anomalies."""

import numpy as np
import pytest

import distad as ad

rng = np.random.default_rng(1)


def rosenbrock(x):
    return (100.0 * (x[1:] - x[:-1] ** 2) ** 2 + (1.0 - x[:-1]) ** 2).sum()


def rosenbrock_hessian(x):
    """Closed form of the Rosenbrock Hessian."""
    n = x.size
    H = np.zeros((n, n))
    for i in range(n - 1):
        H[i, i] += 1200 * x[i] ** 2 - 400 * x[i + 1] + 2
        H[i, i + 1] -= 400 * x[i]
        H[i + 1, i] -= 400 * x[i]
        H[i + 1, i + 1] += 200
    return H


def mlp_loss(w1, w2, x, y):
    h = ad.tanh(x @ w1)
    return ((h @ w2 - y) ** 2).mean()


def test_grad_returns_numpy_with_the_argument_shape_and_dtype():
    x = rng.standard_normal((3, 2)).astype(np.float32)
    g = ad.grad(lambda x: (x ** 2).sum())(x)
    assert isinstance(g, np.ndarray) and g.dtype == np.float32
    np.testing.assert_allclose(g, 2 * x)


def test_value_and_grad_with_argnums_tuple_and_pytrees():
    params = {"w": rng.standard_normal(3), "b": np.array(0.5)}
    x = rng.standard_normal((4, 3))

    def f(p, x):
        return ((x @ p["w"] + p["b"]) ** 2).sum()

    v, (gp, gx) = ad.value_and_grad(f, argnums=(0, 1))(params, x)
    r = x @ params["w"] + 0.5
    assert v == pytest.approx((r ** 2).sum())
    np.testing.assert_allclose(gp["w"], 2 * x.T @ r)
    np.testing.assert_allclose(gp["b"], 2 * r.sum())
    np.testing.assert_allclose(gx, 2 * np.outer(r, params["w"]))


def test_grad_of_a_non_scalar_function_says_so():
    with pytest.raises(ValueError, match=r"scalar, got shape \(3,\)"):
        ad.grad(lambda x: x * 2)(np.ones(3))


def test_vjp_function_can_be_called_repeatedly():
    x = rng.standard_normal(4)
    out, vjp_fn = ad.vjp(lambda x: ad.sin(x) * 2, x)
    for _ in range(2):
        (g,) = vjp_fn(np.ones(4))
        np.testing.assert_allclose(g, 2 * np.cos(x))


def test_jvp_matches_closed_form():
    x, v = rng.standard_normal(5), rng.standard_normal(5)
    out, t = ad.jvp(lambda x: ad.exp(ad.sin(x)), (x,), (v,))
    np.testing.assert_allclose(t, np.exp(np.sin(x)) * np.cos(x) * v)


@pytest.mark.parametrize("mode", ["rev", "fwd"])
def test_jacobian_matches_finite_differences(mode):
    A = rng.standard_normal((3, 4))

    def f(x):
        return ad.tanh(A @ x) * x[:3]

    x = rng.standard_normal(4)
    J = ad.jacobian(f, mode=mode)(x)
    eps, fd = 1e-6, np.zeros((3, 4))
    for j in range(4):
        e = np.zeros(4)
        e[j] = eps
        fd[:, j] = (np.tanh(A @ (x + e)) * (x + e)[:3]
                    - np.tanh(A @ (x - e)) * (x - e)[:3]) / 2 / eps
    np.testing.assert_allclose(J, fd, rtol=1e-6, atol=1e-8)


def test_jacobian_modes_agree_on_matrix_input():
    W = rng.standard_normal((2, 3))
    f = lambda W: ad.softmax(W @ np.arange(3.0))
    np.testing.assert_allclose(ad.jacobian(f, mode="rev")(W), ad.jacobian(f, mode="fwd")(W),
                               rtol=1e-10, atol=1e-12)


def test_hessian_of_rosenbrock_matches_closed_form():
    x = np.array([1.2, -0.7, 0.3, 2.0])
    np.testing.assert_allclose(ad.hessian(rosenbrock)(x), rosenbrock_hessian(x), rtol=1e-10)


def test_hvp_matches_hessian_times_vector():
    x, v = rng.standard_normal(5), rng.standard_normal(5)
    (hv,) = ad.hvp(rosenbrock, (x,), (v,))
    np.testing.assert_allclose(hv, rosenbrock_hessian(x) @ v, rtol=1e-10)


def test_mlp_loss_hessian_matches_finite_differences_of_gradients():
    w1, w2 = rng.standard_normal((3, 4)), rng.standard_normal((4, 2))
    x, y = rng.standard_normal((5, 3)), rng.standard_normal((5, 2))
    H = ad.hessian(lambda w1: mlp_loss(w1, w2, x, y))(w1).reshape(12, 12)
    g = ad.grad(mlp_loss)
    eps, fd = 1e-6, np.zeros((12, 12))
    for j in range(12):
        e = np.zeros(12)
        e[j] = eps
        fd[:, j] = ((g(w1 + e.reshape(3, 4), w2, x, y) - g(w1 - e.reshape(3, 4), w2, x, y))
                    .ravel() / (2 * eps))
    np.testing.assert_allclose(H, fd, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(H, H.T, atol=1e-12)


def test_third_derivative_matches_closed_form():
    f = lambda x: ad.sin(x) * x ** 3
    # d3/dx3 [x^3 sin x] = 6 sin x + 18 x cos x - 9 x^2 sin x - x^3 cos x
    x = 0.9
    expected = 6 * np.sin(x) + 18 * x * np.cos(x) - 9 * x ** 2 * np.sin(x) - x ** 3 * np.cos(x)
    assert float(ad.grad(ad.grad(ad.grad(f)))(x)) == pytest.approx(expected, rel=1e-12)


def test_inner_grad_closing_over_an_outer_variable_stays_differentiable():
    # d/dx [ d/dy (x*y^2) at y=3 ] = d/dx [6x] = 6
    outer = ad.grad(lambda x: ad.grad(lambda y: x * y ** 2)(3.0))
    assert float(outer(2.0)) == pytest.approx(6.0)


def derivative(f):
    """f' by forward mode, for a scalar function of one variable."""
    return lambda x: ad.jvp(f, (x,), (np.ones_like(np.asarray(x, dtype=np.float64)),))[1]


def test_jvp_of_jvp_keeps_the_levels_apart():
    """Siskind and Pearlmutter's perturbation-confusion example: d/dx [x * d/dy (x + y)] = 1
    at x = 1. An engine that mixes the two calls' tangents gives 2."""
    inner = lambda x: x * derivative(lambda y: x + y)(np.array(1.0))
    assert float(derivative(inner)(np.array(1.0))) == 1.0


def test_jvp_of_jvp_of_jvp_matches_closed_form():
    f = lambda x: ad.sin(x) * x ** 3
    x = np.array(0.9)
    expected = 6 * np.sin(x) + 18 * x * np.cos(x) - 9 * x ** 2 * np.sin(x) - x ** 3 * np.cos(x)
    d2 = 6 * x * np.sin(x) + 6 * x ** 2 * np.cos(x) - x ** 3 * np.sin(x)
    assert float(derivative(derivative(f))(x)) == pytest.approx(d2, rel=1e-12)
    assert float(derivative(derivative(derivative(f)))(x)) == pytest.approx(expected, rel=1e-12)


def test_jvp_of_jvp_is_the_hessian_between_two_directions():
    w1, w2 = rng.standard_normal((3, 4)), rng.standard_normal((4, 2))
    x, y = rng.standard_normal((5, 3)), rng.standard_normal((5, 2))
    u, v = rng.standard_normal(w1.shape), rng.standard_normal(w1.shape)
    loss = lambda w: mlp_loss(w, w2, x, y)
    second = ad.jvp(lambda w: ad.jvp(loss, (w,), (v,))[1], (w1,), (u,))[1]
    H = ad.hessian(lambda w: loss(w.reshape(w1.shape)))(w1.ravel())
    assert float(second) == pytest.approx(u.ravel() @ H @ v.ravel(), rel=1e-10)
    # and forward over forward agrees with forward over reverse (hvp)
    (hv,) = ad.hvp(loss, (w1,), (v,))
    assert float(second) == pytest.approx(float((u * hv).sum()), rel=1e-10)


def test_inner_tangent_that_depends_on_the_outer_primal():
    """d/dx [f'(x) x] = f''(x) x + f'(x): the inner call's tangent is the outer variable."""
    x = np.array(0.7)
    g = lambda x: ad.jvp(ad.sin, (x,), (x,))[1]  # cos(x) x
    assert float(derivative(g)(x)) == pytest.approx(-np.sin(x) * x + np.cos(x), rel=1e-12)


def test_reverse_over_forward_over_forward_matches_closed_form():
    """grad of x -> f''(x) by nested jvp, for f = x^5: 60 x^2."""
    f = lambda x: x ** 5
    x = 1.3
    d3 = ad.grad(lambda x: derivative(derivative(f))(x))(x)
    assert float(d3) == pytest.approx(60 * x ** 2, rel=1e-12)


def test_backward_create_graph_gives_a_differentiable_gradient():
    x = ad.tensor(np.array([0.5, 1.5]), requires_grad=True)
    (g,) = ad.backprop((x ** 3).sum(), inputs=[x], create_graph=True)
    g.sum().backward()
    np.testing.assert_allclose(x.grad, 6 * x.data)


def test_checkpointed_and_plain_gradients_are_identical():
    ws = [ad.tensor(rng.standard_normal((6, 6)).astype(np.float32) * 0.5, requires_grad=True)
          for _ in range(4)]
    layers = [lambda h, w=w: ad.tanh(h @ w) for w in ws]
    x = ad.tensor(rng.standard_normal((3, 6)).astype(np.float32), requires_grad=True)

    def run(checkpointed):
        for t in [*ws, x]:
            t.grad = None
        out = ad.checkpoint_sequential(layers, 2, x) if checkpointed else x
        if not checkpointed:
            for f in layers:
                out = f(out)
        (out ** 2).sum().backward()
        return [t.grad.copy() for t in [*ws, x]]

    for a, b in zip(run(False), run(True)):
        np.testing.assert_array_equal(a, b)


def test_forward_mode_and_hvp_go_through_a_checkpointed_segment():
    """Under forward mode the segment runs as is: jvp and hvp (forward over reverse) through
    checkpoint equal the plain function's, and the closed form."""
    w = rng.standard_normal((3, 3))
    f = lambda h: ad.tanh(h @ w) * h  # noqa: E731
    x, v = rng.standard_normal((2, 3)), rng.standard_normal((2, 3))
    for a, b in zip(ad.jvp(ad.checkpoint(f), (x,), (v,)), ad.jvp(f, (x,), (v,))):
        np.testing.assert_array_equal(a, b)
    g = lambda h: (ad.checkpoint(lambda z: ad.sin(z) * z ** 3)(h)).sum()  # noqa: E731
    xs = np.array([0.7, 1.3])
    exact = -np.sin(xs) * xs ** 3 + 6 * xs ** 2 * np.cos(xs) + 6 * xs * np.sin(xs)
    np.testing.assert_allclose(ad.hvp(g, (xs,), (np.ones(2),))[0], exact, rtol=1e-12)


def test_checkpoint_keeps_only_its_inputs_and_the_tensors_it_closes_over():
    w = ad.tensor(np.ones((4, 4), np.float32), requires_grad=True)
    x = ad.tensor(np.ones((2, 4), np.float32))
    y = ad.checkpoint(lambda h: ad.tanh(ad.tanh(h @ w) @ w))(x)
    assert y._prim.name == "checkpoint"
    assert len(y._inputs) == 2 and y._inputs[0] is x and y._inputs[1] is w


def plain_and_checkpointed(make_loss):
    """make_loss(checkpoint) -> loss, run with checkpoint as the identity and as itself."""
    return make_loss(lambda fn: fn), make_loss(ad.checkpoint)


def test_grad_reaches_a_variable_the_checkpointed_function_closes_over():
    """ad.grad (functional: the walk stops at the watched tensors) with respect to w, which
    the segment reads from its closure rather than its arguments."""
    x0 = rng.standard_normal((2, 3))
    w0 = rng.standard_normal((3, 2))
    plain, ckpt = plain_and_checkpointed(
        lambda c: lambda w: (c(lambda x: ad.tanh(x @ w) * w.sum())(x0) ** 2).sum())
    g = ad.grad(plain)(w0)
    assert np.abs(g).max() > 0.1
    np.testing.assert_array_equal(ad.grad(ckpt)(w0), g)


def test_higher_order_through_a_checkpointed_segment():
    """grad of grad, and hessian, through checkpoint equal the plain function's and the
    closed form (x^3 sin x: its second derivative 6x sin x + 6x^2 cos x - x^3 sin x)."""
    xs = np.array([0.7, 1.3])
    plain, ckpt = plain_and_checkpointed(
        lambda c: lambda v: c(lambda z: ad.sin(z) * z ** 3)(v).sum())
    d2 = 6 * xs * np.sin(xs) + 6 * xs ** 2 * np.cos(xs) - xs ** 3 * np.sin(xs)
    for f in (plain, ckpt):
        np.testing.assert_allclose(ad.hessian(f)(xs), np.diag(d2), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(ad.grad(lambda v, f=f: ad.grad(f)(v).sum())(xs), d2,
                                   rtol=1e-12)
    # a parameter inside the segment: d/dw of |grad_x L|^2, the gradient-penalty pattern
    w0 = rng.standard_normal((3, 3))
    x0 = rng.standard_normal((2, 3))
    penalty = [lambda w, c=c: (ad.grad(lambda x: c(lambda h: ad.tanh(h @ w))(x).sum())(x0)
                               ** 2).sum() for c in (lambda fn: fn, ad.checkpoint)]
    np.testing.assert_allclose(ad.grad(penalty[1])(w0), ad.grad(penalty[0])(w0), rtol=1e-12)


def test_checkpoint_with_retain_graph_recomputes_for_each_cotangent():
    w = ad.tensor(rng.standard_normal((3, 3)), requires_grad=True)
    x = ad.tensor(rng.standard_normal((2, 3)))
    y = ad.checkpoint(lambda h: ad.tanh(h @ w))(x)
    grads = []
    for seed in (np.ones((2, 3)), 2 * np.ones((2, 3))):
        w.grad = None
        y.backward(seed, retain_graph=True)
        grads.append(w.grad.copy())
    np.testing.assert_allclose(grads[1], 2 * grads[0], rtol=1e-12)


def test_a_parameters_hook_sees_its_whole_gradient_once_through_checkpoint():
    """w is read inside the segment and after it: its hook (where data parallelism starts the
    reduction) fires once, with the sum, as without checkpointing."""
    def run(c):
        w = ad.tensor(np.linspace(-1, 1, 9).reshape(3, 3), requires_grad=True)
        seen = []
        w.register_hook(lambda g: seen.append(np.array(g)))
        x = ad.tensor(np.linspace(0, 1, 6).reshape(2, 3))
        h = c(lambda h: ad.tanh(h @ w))(x)
        ((h @ w) ** 2).sum().backward()
        return seen, w.grad
    (seen_p, grad_p), (seen_c, grad_c) = run(lambda fn: fn), run(ad.checkpoint)
    assert len(seen_c) == len(seen_p) == 1
    np.testing.assert_allclose(seen_c[0], seen_p[0], rtol=1e-12)
    np.testing.assert_allclose(grad_c, grad_p, rtol=1e-12)


def test_nested_checkpoints_reach_the_outer_closure():
    w0 = rng.standard_normal((3, 3))
    x0 = rng.standard_normal((2, 3))
    def make(c):
        def loss(w):
            inner = c(lambda h: ad.tanh(h @ w))
            return c(lambda h: inner(inner(h)) * 2)(x0).sum()
        return loss
    np.testing.assert_allclose(ad.grad(make(ad.checkpoint))(w0), ad.grad(make(lambda f: f))(w0),
                               rtol=1e-12)


def test_a_deliberately_wrong_custom_rule_is_caught_by_gradcheck():
    wrong = ad.custom_vjp(np.sin, lambda g, y, x: (g * np.sin(x),), name="bad_sin")
    right = ad.custom_vjp(np.sin, lambda g, y, x: (g * np.cos(x),), name="good_sin")
    x = rng.standard_normal(3)
    assert ad.gradcheck(lambda x: right(x).sum(), x)
    with pytest.raises(ad.GradcheckError, match="argument 0.*autodiff.*finite differences"):
        ad.gradcheck(lambda x: wrong(x).sum(), x)


def test_custom_jvp_enables_forward_mode():
    cube = ad.custom_jvp(lambda x: x ** 3, lambda ts, y, x: 3 * x ** 2 * ts[0])
    _, t = ad.jvp(lambda x: cube(x), (np.array([2.0]),), (np.array([1.0]),))
    np.testing.assert_allclose(t, [12.0])


def test_anomaly_mode_names_the_op_that_made_a_nan():
    x = ad.tensor(np.array([-1.0, 4.0]), requires_grad=True)
    with np.errstate(invalid="ignore"), ad.detect_anomaly(), \
            pytest.raises(FloatingPointError, match=r"'sqrt'.*test_autodiff"):
        ad.sqrt(x).sum()


def test_anomaly_mode_names_the_op_whose_backward_made_an_inf():
    x = ad.tensor(np.array([0.0, 4.0]), requires_grad=True)
    with np.errstate(divide="ignore"), ad.detect_anomaly():
        y = ad.sqrt(x).sum()          # finite forward, infinite derivative at 0
        with pytest.raises(FloatingPointError, match="backward of 'sqrt'"):
            y.backward()


@pytest.mark.parametrize("outer", ["rev", "fwd"])
@pytest.mark.parametrize("inner", ["rev", "fwd"])
def test_jacobian_of_jacobian_is_the_hessian_in_every_mode(outer, inner):
    """jacfwd(jacfwd), jacfwd(jacrev), ... of Rosenbrock against its closed-form Hessian."""
    x = rng.uniform(-1.5, 1.5, 5)
    H = ad.jacobian(ad.jacobian(rosenbrock, mode=inner), mode=outer)(x)
    np.testing.assert_allclose(H, rosenbrock_hessian(x), rtol=1e-12, atol=1e-9)


def test_a_jacobian_inside_grad_is_differentiable():
    """d/dx sum(J(x)) for J the Jacobian of tanh(x) * sum(x), against central differences."""
    g = lambda x: ad.tanh(x) * x.sum()  # noqa: E731
    assert ad.gradcheck(lambda x: ad.jacobian(g, mode="fwd")(x).sum(), rng.standard_normal(3))
    assert ad.gradcheck(lambda x: ad.jacobian(g, mode="rev")(x).sum(), rng.standard_normal(3))
