"""SGD, Adam and AdamW updates against their formulas, written out here for a few steps.

The gradients are prescribed (assigned to `.grad`), so each test checks the
optimizer alone. Parameters are float64 so the comparison can be tight.
"""

import math

import numpy as np
import pytest

import distad as ad

nn, optim = ad.nn, ad.optim
rng = np.random.default_rng(0)
P0 = rng.standard_normal((3, 2))
GRADS = [rng.standard_normal((3, 2)) for _ in range(4)]


def trajectory(make_opt, p0=P0, grads=GRADS):
    """Parameter values after each step, the gradients being `grads` in turn."""
    p = nn.Parameter(p0)
    opt = make_opt([p])
    out = []
    for g in grads:
        p.grad = g
        opt.step()
        out.append(p.data.copy())
    return out


def assert_trajectories_equal(got, expected):
    for k, (a, b) in enumerate(zip(got, expected)):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14, err_msg=f"step {k + 1}")


# ---- SGD ---------------------------------------------------------------------------------

def sgd_formula(lr, momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0,
                p0=P0, grads=GRADS):
    p, buf, out = p0.copy(), None, []
    for g in grads:
        d = g + weight_decay * p
        if momentum:
            buf = d.copy() if buf is None else momentum * buf + (1 - dampening) * d
            d = d + momentum * buf if nesterov else buf
        p = p - lr * d
        out.append(p)
    return out


def test_sgd_without_momentum_steps_minus_lr_times_gradient():
    assert_trajectories_equal(trajectory(lambda ps: optim.SGD(ps, lr=0.1)),
                              sgd_formula(lr=0.1))


def test_sgd_momentum_with_dampening_matches_the_formula():
    assert_trajectories_equal(
        trajectory(lambda ps: optim.SGD(ps, lr=0.05, momentum=0.9, dampening=0.3)),
        sgd_formula(lr=0.05, momentum=0.9, dampening=0.3))


def test_sgd_nesterov_with_weight_decay_matches_the_formula():
    assert_trajectories_equal(
        trajectory(lambda ps: optim.SGD(ps, lr=0.05, momentum=0.8, nesterov=True,
                                        weight_decay=0.1)),
        sgd_formula(lr=0.05, momentum=0.8, nesterov=True, weight_decay=0.1))


@pytest.mark.parametrize("options", [
    dict(momentum=0.9, dampening=0.3, weight_decay=0.01),
    dict(momentum=0.8, nesterov=True, weight_decay=0.1),
    dict(),
])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sgd_on_parameters_larger_than_a_cache_block_matches_the_formula(options, dtype):
    """The update runs block by block over large parameters: every block, the last partial
    one included, gets the formula; float32 stays float32; a transposed (non-contiguous)
    gradient takes the unblocked path to the same result."""
    from distad._blocked import BLOCK

    r = np.random.default_rng(1)
    shape = (3, BLOCK + 7)
    p0 = r.standard_normal(shape).astype(dtype)
    grads = [r.standard_normal(shape).astype(dtype) for _ in range(3)]
    grads[1] = np.ascontiguousarray(grads[1].T).T  # same values, Fortran order
    got = trajectory(lambda ps: optim.SGD(ps, lr=0.05, **options), p0=p0, grads=grads)
    wide = [g.astype(np.float64) for g in grads]
    want = sgd_formula(lr=0.05, p0=p0.astype(np.float64), grads=wide, **options)
    tol = 1e-5 if dtype == np.float32 else 1e-12
    for k, (a, b) in enumerate(zip(got, want)):
        assert a.dtype == dtype
        np.testing.assert_allclose(a, b, rtol=tol, atol=tol, err_msg=f"step {k + 1}")


def test_sgd_nesterov_needs_momentum_and_no_dampening():
    with pytest.raises(ValueError, match="Nesterov"):
        optim.SGD([nn.Parameter(np.zeros(2))], lr=0.1, nesterov=True)


# ---- Adam and AdamW ----------------------------------------------------------------------

def adam_formula(lr, b1, b2, eps, weight_decay=0.0, decoupled=False, amsgrad=False):
    p, m, v, vmax, out = P0.copy(), 0.0, 0.0, 0.0, []
    for t, g in enumerate(GRADS, start=1):
        if decoupled:
            p = p * (1 - lr * weight_decay)
        else:
            g = g + weight_decay * p
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        vmax = np.maximum(vmax, v)
        m_hat = m / (1 - b1**t)
        v_hat = (vmax if amsgrad else v) / (1 - b2**t)
        p = p - lr * m_hat / (np.sqrt(v_hat) + eps)
        out.append(p)
    return out


def test_adam_matches_the_bias_corrected_formula():
    assert_trajectories_equal(
        trajectory(lambda ps: optim.Adam(ps, lr=0.01, betas=(0.8, 0.9), eps=1e-3)),
        adam_formula(0.01, 0.8, 0.9, 1e-3))


def test_adam_weight_decay_is_an_l2_term_in_the_gradient():
    assert_trajectories_equal(
        trajectory(lambda ps: optim.Adam(ps, lr=0.01, weight_decay=0.5)),
        adam_formula(0.01, 0.9, 0.999, 1e-8, weight_decay=0.5))


def test_adam_amsgrad_normalises_by_the_running_maximum():
    assert_trajectories_equal(
        trajectory(lambda ps: optim.Adam(ps, lr=0.01, betas=(0.5, 0.6), amsgrad=True)),
        adam_formula(0.01, 0.5, 0.6, 1e-8, amsgrad=True))


def test_adamw_decays_the_weights_before_the_adam_step():
    assert_trajectories_equal(
        trajectory(lambda ps: optim.AdamW(ps, lr=0.02, weight_decay=0.3)),
        adam_formula(0.02, 0.9, 0.999, 1e-8, weight_decay=0.3, decoupled=True))


def test_adam_first_step_moves_every_coordinate_by_about_lr():
    """With m_hat = g and v_hat = g**2 after one step, the update is lr * sign(g)."""
    (p1,) = trajectory(lambda ps: optim.Adam(ps, lr=0.01), grads=GRADS[:1])
    np.testing.assert_allclose(P0 - p1, 0.01 * np.sign(GRADS[0]), rtol=1e-6)


# ---- shared behaviour --------------------------------------------------------------------

OPTIMIZERS = [
    ("SGD", lambda ps: optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01)),
    ("Adam", lambda ps: optim.Adam(ps, lr=0.1, weight_decay=0.01, amsgrad=True)),
    ("AdamW", lambda ps: optim.AdamW(ps, lr=0.1)),
]


@pytest.mark.parametrize("name,make", OPTIMIZERS, ids=[o[0] for o in OPTIMIZERS])
def test_updates_keep_float32_parameters_and_state_float32(name, make):
    p = nn.Parameter(P0.astype(np.float32))
    opt = make([p])
    for g in GRADS:
        p.grad = g.astype(np.float32)
        opt.step()
    assert p.dtype == np.float32
    for v in opt.state[p].values():
        assert not isinstance(v, np.ndarray) or v.dtype == np.float32


@pytest.mark.parametrize("name,make", OPTIMIZERS, ids=[o[0] for o in OPTIMIZERS])
def test_step_reads_gradients_without_modifying_them(name, make):
    p = nn.Parameter(P0)
    opt = make([p])
    for g in GRADS[:2]:
        p.grad = g.copy()
        opt.step()
        np.testing.assert_array_equal(p.grad, g)


def test_parameters_without_gradient_are_left_alone():
    a, b = nn.Parameter(P0), nn.Parameter(P0)
    opt = optim.Adam([a, b], lr=0.1)
    a.grad = GRADS[0]
    opt.step()
    np.testing.assert_array_equal(b.data, P0)
    assert b not in opt.state


def test_parameter_groups_override_the_defaults():
    a, b = nn.Parameter(np.zeros(2)), nn.Parameter(np.zeros(2))
    opt = optim.SGD([{"params": [a]}, {"params": [b], "lr": 1.0}], lr=0.1)
    a.grad = b.grad = np.ones(2)
    opt.step()
    np.testing.assert_allclose(a.data, -0.1)
    np.testing.assert_allclose(b.data, -1.0)


def test_zero_grad_clears_gradients():
    p = nn.Parameter(P0)
    opt = optim.SGD([p], lr=0.1)
    p.grad = GRADS[0]
    opt.zero_grad()
    assert p.grad is None


def test_step_with_closure_returns_its_loss():
    p = nn.Parameter(np.array([3.0]))
    opt = optim.SGD([p], lr=0.25)

    def closure():
        opt.zero_grad()
        loss = (p * p).sum()
        loss.backward()
        return loss

    assert float(opt.step(closure).data) == 9.0
    assert p.data[0] == pytest.approx(3.0 - 0.25 * 6.0)


def test_a_parameter_twice_or_an_empty_list_is_an_error():
    p = nn.Parameter(np.zeros(2))
    with pytest.raises(ValueError, match="more than once"):
        optim.SGD([p, p], lr=0.1)
    with pytest.raises(ValueError, match="empty"):
        optim.Adam([], lr=0.1)


def test_training_reduces_a_least_squares_loss():
    """Smoke test of the full loop: model, loss, backward, clip, step."""
    X = rng.standard_normal((64, 3)).astype(np.float32)
    y = (X @ np.array([[1.0], [-2.0], [0.5]], np.float32)).astype(np.float32)
    model = nn.Linear(3, 1, rng=0)
    opt = optim.SGD(model.parameters(), lr=0.1, momentum=0.5)
    losses = []
    for _ in range(100):
        opt.zero_grad()
        loss = ad.nn.functional.mse_loss(model(ad.tensor(X)), y)
        loss.backward()
        optim.clip_grad_norm(model.parameters(), 10.0)
        opt.step()
        losses.append(float(loss.data))
    assert losses[-1] < 1e-3 * losses[0]
    assert math.isfinite(losses[-1])


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw"])
def test_bench_optim_reference_computes_the_same_update_on_whole_arrays(name):
    """`distad bench optim` compares each blocked update with the same formulas on whole
    arrays: both must give the same parameters (bit for bit), else the timing is moot."""
    from distad.bench.optim import OPTIMIZERS

    make, reference = OPTIMIZERS[name]
    rng = np.random.default_rng(3)
    w0 = rng.standard_normal(200_003).astype(np.float32)
    p = ad.Tensor(w0.copy(), requires_grad=True)
    opt, w, state = make([p]), w0.copy(), {}
    for _ in range(3):
        g = rng.standard_normal(w0.size).astype(np.float32)
        p.grad = g
        opt.step()
        reference(w, g, state)
    np.testing.assert_array_equal(p.data, w)
    assert not np.array_equal(w, w0)
