"""L-BFGS: the Rosenbrock benchmark, the line search and the interpolation it rests on."""

import numpy as np
import pytest

import distad as ad
from distad.optim.lbfgs import cubic_interpolate, strong_wolfe

nn, optim = ad.nn, ad.optim


def rosenbrock_closure(x, opt):
    def closure():
        opt.zero_grad()
        a, b = x[0], x[1]
        loss = (1 - a) ** 2 + 100 * (b - a * a) ** 2
        loss.backward()
        return loss
    return closure


def test_lbfgs_minimises_2d_rosenbrock_to_1e8_in_under_100_iterations():
    x = nn.Parameter(np.array([-1.5, 2.0]))
    opt = optim.LBFGS([x], lr=1, max_iter=100, history_size=10, line_search_fn="strong_wolfe",
                      tolerance_grad=1e-10, tolerance_change=1e-14)
    closure = rosenbrock_closure(x, opt)
    opt.step(closure)
    assert float(closure().data) < 1e-8
    assert opt.state[x]["n_iter"] < 100
    np.testing.assert_allclose(x.data, [1.0, 1.0], atol=1e-4)


def test_lbfgs_with_fixed_steps_minimises_a_convex_quadratic():
    A = np.array([[3.0, 0.5], [0.5, 1.0]])
    bvec = np.array([1.0, -2.0])
    x = nn.Parameter(np.zeros(2))
    opt = optim.LBFGS([x], lr=0.5, max_iter=200, tolerance_grad=1e-10, tolerance_change=0.0)

    def closure():
        opt.zero_grad()
        loss = 0.5 * (x @ (A @ x)) - (bvec * x).sum()
        loss.backward()
        return loss

    opt.step(closure)
    np.testing.assert_allclose(x.data, np.linalg.solve(A, bvec), atol=1e-6)


def test_lbfgs_keeps_float32_parameters_float32():
    x = nn.Parameter(np.array([0.5, 0.5], np.float32))
    opt = optim.LBFGS([x], max_iter=5, line_search_fn="strong_wolfe")
    opt.step(rosenbrock_closure(x, opt))
    assert x.dtype == np.float32 and opt.state[x]["d"].dtype == np.float32


def test_cubic_interpolate_returns_the_minimiser_of_a_cubic():
    # f(x) = x^3 - 3x has its local minimum at x = 1; the cubic through two points
    # with their derivatives is f itself.
    f, df = (lambda x: x**3 - 3 * x), (lambda x: 3 * x**2 - 3)
    assert cubic_interpolate(0.0, f(0.0), df(0.0), 2.0, f(2.0), df(2.0)) == pytest.approx(1.0)
    assert cubic_interpolate(2.0, f(2.0), df(2.0), 0.0, f(0.0), df(0.0)) == pytest.approx(1.0)


def test_strong_wolfe_step_satisfies_both_wolfe_conditions():
    # f(z) = sum(cosh(z)) along d from z0: smooth, convex, minimum at 0.
    z0 = np.array([2.0, -1.0])
    d = -np.sinh(z0)
    f0, g0 = float(np.cosh(z0).sum()), np.sinh(z0)

    def obj(x, t, d):
        z = x + t * d
        return float(np.cosh(z).sum()), np.sinh(z)

    gtd = float(g0 @ d)
    f_new, g_new, t, _ = strong_wolfe(obj, z0, 5.0, d, f0, g0, gtd)
    assert f_new <= f0 + 1e-4 * t * gtd                # sufficient decrease
    assert abs(float(g_new @ d)) <= 0.9 * abs(gtd)     # curvature (strong)


def test_lbfgs_state_dict_round_trip_reproduces_the_next_step_bit_for_bit():
    def fresh(start):
        x = nn.Parameter(start)
        opt = optim.LBFGS([x], max_iter=4, line_search_fn="strong_wolfe")
        return x, opt

    x, opt = fresh(np.array([-1.5, 2.0]))
    opt.step(rosenbrock_closure(x, opt))
    saved_x, saved_opt = x.data.copy(), opt.state_dict()
    assert isinstance(saved_opt["state"][0]["old_dirs"], np.ndarray)
    opt.step(rosenbrock_closure(x, opt))

    y, opt2 = fresh(np.zeros(2))
    y.data[...] = saved_x
    opt2.load_state_dict(saved_opt)
    opt2.step(rosenbrock_closure(y, opt2))
    np.testing.assert_array_equal(y.data, x.data)


def test_lbfgs_needs_a_closure():
    opt = optim.LBFGS([nn.Parameter(np.zeros(2))])
    with pytest.raises(RuntimeError, match="closure"):
        opt.step()
