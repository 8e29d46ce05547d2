"""Max pooling sends each window's gradient to its first maximum (PyTorch's tie rule)."""

import numpy as np

import distad as ad


def first_max_oracle(x, g, k):
    """Loop over windows: the cotangent goes to the first maximum in row-major order."""
    out = np.zeros_like(x)
    n, c, h, w = x.shape
    for i in range(n):
        for j in range(c):
            for a in range(h // k):
                for b in range(w // k):
                    win = x[i, j, a * k:(a + 1) * k, b * k:(b + 1) * k]
                    r, s = np.unravel_index(np.argmax(win), win.shape)
                    out[i, j, a * k + r, b * k + s] = g[i, j, a, b]
    return out


def test_ties_send_the_gradient_to_the_first_maximum():
    rng = np.random.default_rng(0)
    x = np.maximum(rng.standard_normal((2, 3, 6, 6)), 0).astype(np.float32)   # many tied zeros
    x[0, 0, :2, :2] = 1.0                                                       # a full tie
    g = rng.standard_normal((2, 3, 3, 3)).astype(np.float32)
    xt = ad.tensor(x, requires_grad=True)
    ad.nn.functional.max_pool2d(xt, 2).backward(g)
    np.testing.assert_array_equal(xt.grad, first_max_oracle(x, g, 2))


def test_forward_mode_picks_the_same_elements():
    rng = np.random.default_rng(1)
    x = np.maximum(rng.standard_normal((1, 2, 4, 4)), 0)
    t = rng.standard_normal(x.shape)
    _, jt = ad.jvp(lambda x: ad.nn.functional.max_pool2d(x, 2), (x,), (t,))
    _, vjp_fn = ad.vjp(lambda x: ad.nn.functional.max_pool2d(x, 2), x)
    u = rng.standard_normal(jt.shape)
    assert np.isclose(np.sum(jt * u), np.sum(vjp_fn(u)[0] * t))
