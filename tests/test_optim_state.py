"""State round trips, gradient clipping and learning-rate schedules."""

import math

import numpy as np
import pytest

import distad as ad

nn, optim, F = ad.nn, ad.optim, ad.nn.functional
rng = np.random.default_rng(0)
X = rng.random((16, 1, 4, 4), dtype=np.float32)
Y = rng.integers(0, 3, 16)


def make_model(seed):
    r = np.random.default_rng(seed)
    return nn.Sequential(nn.Conv2d(1, 2, 3, padding=1, rng=r), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(8, 3, rng=r))


def train_step(model, opt, i):
    xb, yb = X[i % 4 * 4:(i % 4 + 1) * 4], Y[i % 4 * 4:(i % 4 + 1) * 4]
    opt.zero_grad()
    F.cross_entropy(model(ad.tensor(xb)), yb).backward()
    optim.clip_grad_norm(model.parameters(), 1.0)
    opt.step()


OPTIMIZERS = [
    ("SGD-nesterov", lambda ps: optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True,
                                          weight_decay=1e-3)),
    ("Adam", lambda ps: optim.Adam(ps, lr=0.01, amsgrad=True)),
    ("AdamW", lambda ps: optim.AdamW(ps, lr=0.01)),
]


@pytest.mark.parametrize("name,make_opt", OPTIMIZERS, ids=[o[0] for o in OPTIMIZERS])
def test_model_and_optimizer_state_dicts_reproduce_the_next_step_bit_for_bit(name, make_opt):
    model = make_model(0)
    opt = make_opt(model.parameters())
    for i in range(3):
        train_step(model, opt, i)
    model_sd, opt_sd = model.state_dict(), opt.state_dict()
    train_step(model, opt, 3)

    resumed = make_model(1)  # different initial weights, overwritten by the load
    opt2 = make_opt(resumed.parameters())
    resumed.load_state_dict(model_sd)
    opt2.load_state_dict(opt_sd)
    train_step(resumed, opt2, 3)
    for (k, a), b in zip(model.state_dict().items(), resumed.state_dict().values()):
        np.testing.assert_array_equal(a, b, err_msg=k)


@pytest.mark.parametrize("name,make_opt", OPTIMIZERS, ids=[o[0] for o in OPTIMIZERS])
def test_optimizer_state_dict_holds_only_arrays_and_plain_values(name, make_opt):
    model = make_model(0)
    opt = make_opt(model.parameters())
    train_step(model, opt, 0)
    sd = opt.state_dict()
    assert sorted(sd["state"]) == list(range(4))
    assert sd["param_groups"][0]["params"] == [0, 1, 2, 3]
    for s in sd["state"].values():
        for v in s.values():
            assert isinstance(v, (np.ndarray, int, float))
    for k, v in sd["param_groups"][0].items():
        assert isinstance(v, (int, float, bool, tuple, list)), k


def test_optimizer_state_dict_is_a_copy():
    model = make_model(0)
    opt = optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    train_step(model, opt, 0)
    sd = opt.state_dict()
    before = sd["state"][0]["momentum_buffer"].copy()
    train_step(model, opt, 1)
    np.testing.assert_array_equal(sd["state"][0]["momentum_buffer"], before)


def test_load_state_dict_rejects_a_different_parameter_layout():
    opt = optim.SGD(make_model(0).parameters(), lr=0.1)
    other = optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)
    with pytest.raises(ValueError, match="group 0 has 2 parameters in the state, 4 here"):
        opt.load_state_dict(other.state_dict())


def test_load_state_dict_rejects_a_buffer_of_the_wrong_shape():
    p = nn.Parameter(np.zeros(3))
    opt = optim.SGD([p], lr=0.1, momentum=0.9)
    sd = {"state": {0: {"momentum_buffer": np.zeros(4)}},
          "param_groups": [{**opt.state_dict()["param_groups"][0]}]}
    with pytest.raises(ValueError, match=r"'momentum_buffer'.*\(4,\).*\(3,\)"):
        opt.load_state_dict(sd)


# ---- clipping ----------------------------------------------------------------------------

def params_with_grads(*grads):
    ps = [nn.Parameter(np.zeros_like(g)) for g in grads]
    for p, g in zip(ps, grads):
        p.grad = g
    return ps


def test_clip_grad_norm_scales_to_max_norm_and_returns_the_total_norm():
    g1, g2 = np.array([3.0, 0.0]), np.array([[0.0], [4.0]])
    ps = params_with_grads(g1, g2)
    total = optim.clip_grad_norm(ps, max_norm=1.0)
    assert total == pytest.approx(5.0)  # sqrt(3^2 + 4^2)
    scale = 1.0 / (5.0 + 1e-6)
    np.testing.assert_allclose(ps[0].grad, g1 * scale)
    np.testing.assert_allclose(ps[1].grad, g2 * scale)
    np.testing.assert_array_equal(g1, [3.0, 0.0])  # replaced, not mutated


def test_clip_grad_norm_below_the_threshold_leaves_gradients_alone():
    ps = params_with_grads(np.array([0.3, 0.4]))
    g = ps[0].grad
    assert optim.clip_grad_norm(ps, 1.0) == pytest.approx(0.5)
    assert ps[0].grad is g


def test_clip_grad_norm_with_inf_norm_uses_the_largest_entry():
    ps = params_with_grads(np.array([1.0, -7.0]), np.array([2.0]))
    assert optim.clip_grad_norm(ps, 3.5, norm_type=math.inf) == 7.0
    np.testing.assert_allclose(ps[0].grad, np.array([1.0, -7.0]) * 3.5 / (7.0 + 1e-6))


def test_clip_grad_norm_keeps_float32():
    ps = params_with_grads(np.full(4, 10.0, np.float32))
    optim.clip_grad_norm(ps, 1.0)
    assert ps[0].grad.dtype == np.float32


def test_clip_grad_value_clamps_each_entry():
    g = np.array([-3.0, 0.2, 5.0])
    ps = params_with_grads(g)
    optim.clip_grad_value(ps, 1.0)
    np.testing.assert_array_equal(ps[0].grad, [-1.0, 0.2, 1.0])
    np.testing.assert_array_equal(g, [-3.0, 0.2, 5.0])


# ---- schedules ---------------------------------------------------------------------------

def lrs(sched, n):
    out = [sched.get_last_lr()[0]]
    for _ in range(n - 1):
        sched.step()
        out.append(sched.get_last_lr()[0])
    return out


def sgd(lr=1.0):
    return optim.SGD([nn.Parameter(np.zeros(1))], lr=lr)


def test_step_lr_decays_by_gamma_every_step_size_epochs():
    opt = sgd()
    assert lrs(optim.StepLR(opt, step_size=2, gamma=0.5), 7) == [1, 1, .5, .5, .25, .25, .125]
    assert opt.param_groups[0]["lr"] == 0.125


def test_cosine_annealing_follows_the_closed_form():
    got = lrs(optim.CosineAnnealingLR(sgd(2.0), T_max=4, eta_min=0.5), 5)
    expected = [0.5 + 1.5 * (1 + math.cos(math.pi * e / 4)) / 2 for e in range(5)]
    assert got == pytest.approx(expected)
    assert got[-1] == pytest.approx(0.5)


def test_linear_warmup_rises_linearly_then_hands_over():
    opt = sgd(1.0)
    after = optim.CosineAnnealingLR(opt, T_max=2)
    got = lrs(optim.LinearWarmup(opt, warmup_steps=4, after=after), 7)
    assert got == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0, 0.5, 0.0])


def test_schedule_seek_sets_the_rates_that_stepping_reaches():
    opt = sgd()
    stepped = optim.LinearWarmup(opt, 4, after=optim.CosineAnnealingLR(opt, T_max=10))
    for _ in range(9):
        stepped.step()
    opt = sgd()
    sought = optim.LinearWarmup(opt, 4, after=optim.CosineAnnealingLR(opt, T_max=10))
    sought.seek(9)
    assert sought.get_last_lr() == stepped.get_last_lr()
    assert opt.param_groups[0]["lr"] == sought.get_last_lr()[0] < 1.0


def test_schedule_state_dict_round_trip_resumes_the_schedule():
    a = optim.LinearWarmup(sgd(), warmup_steps=3, start_factor=0.1)
    for _ in range(2):
        a.step()
    opt_b = sgd()
    b = optim.LinearWarmup(opt_b, warmup_steps=3, start_factor=0.1)
    b.load_state_dict(a.state_dict())
    a.step()
    b.step()
    assert b.get_last_lr() == a.get_last_lr() == [1.0]
    assert opt_b.param_groups[0]["lr"] == 1.0
