"""The CNN row of `distad bench engine`: a training step on 8x8 digits-shaped input, batch 64.

Network: Conv2d(1,16,3,p=1) - ReLU - Conv2d(16,32,3,p=1) - ReLU - MaxPool2d(2) -
Flatten - Linear(512,10), softmax cross-entropy, SGD with momentum. The
reference is the same network hand-written in numpy with NHWC im2col (the
fastest layout for numpy here), with the same weights.
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

import distad as ad

from .timing import interleaved

B, C1, C2 = 64, 16, 32


def _model(rng):
    nn = ad.nn
    return nn.Sequential(nn.Conv2d(1, C1, 3, padding=1, rng=rng), nn.ReLU(),
                         nn.Conv2d(C1, C2, 3, padding=1, rng=rng), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(C2 * 16, 10, rng=rng))


def _im2col(xh):
    """NHWC, 3x3 kernel, padding 1 -> (N*H*W, 9*C), columns ordered (i, j, c)."""
    xp = np.pad(xh, ((0, 0), (1, 1), (1, 1), (0, 0)))
    n, h, w, c = xh.shape
    return sliding_window_view(xp, (3, 3), axis=(1, 2)).transpose(0, 1, 2, 4, 5, 3).reshape(
        n * h * w, 9 * c)


def _col2im(g, shape):
    n, h, w, c = shape
    g = g.reshape(n, h, w, 3, 3, c)
    out = np.zeros((n, h + 2, w + 2, c), g.dtype)
    for i in range(3):          # one strided add per kernel offset, not per pixel
        for j in range(3):
            out[:, i:i + h, j:j + w, :] += g[:, :, :, i, j, :]
    return out[:, 1:1 + h, 1:1 + w, :]


def hand_step(state, xb, yb, lr=0.01, momentum=0.9):
    """One SGD-momentum step of the network in hand-written numpy; returns the loss."""
    W1 = state["0.weight"].transpose(0, 2, 3, 1).reshape(C1, -1)
    W2 = state["2.weight"].transpose(0, 2, 3, 1).reshape(C2, -1)
    params = [W1, state["0.bias"].copy(), W2, state["2.bias"].copy(), state["6.weight"].copy(),
              state["6.bias"].copy()]
    bufs = [np.zeros_like(p) for p in params]
    rows = np.arange(B)

    def step():
        W1, b1, W2, b2, W3, b3 = params
        x = xb.transpose(0, 2, 3, 1)
        c1 = _im2col(x)
        z1 = c1 @ W1.T + b1
        a1 = np.maximum(z1, 0).reshape(B, 8, 8, C1)
        c2 = _im2col(a1)
        z2 = c2 @ W2.T + b2
        a2 = np.maximum(z2, 0).reshape(B, 8, 8, C2)
        win = a2.reshape(B, 4, 2, 4, 2, C2)
        p = win.max(axis=(2, 4))
        mask = win == p[:, :, None, :, None, :]
        flat = p.transpose(0, 3, 1, 2).reshape(B, -1)
        z3 = flat @ W3.T + b3
        z = z3 - z3.max(1, keepdims=True)
        e = np.exp(z)
        s = e.sum(1, keepdims=True)
        loss = float(np.mean(np.log(s[:, 0]) - z[rows, yb]))
        g3 = e / s
        g3[rows, yb] -= 1
        g3 /= B
        gW3, gb3, gflat = g3.T @ flat, g3.sum(0), g3 @ W3
        gp = gflat.reshape(B, C2, 4, 4).transpose(0, 2, 3, 1)
        ga2 = (mask * gp[:, :, None, :, None, :]).reshape(B, 8, 8, C2)
        gz2 = (ga2 * (z2.reshape(B, 8, 8, C2) > 0)).reshape(-1, C2)
        gW2, gb2, gc2 = gz2.T @ c2, gz2.sum(0), gz2 @ W2
        ga1 = _col2im(gc2, (B, 8, 8, C1))
        gz1 = (ga1 * (z1.reshape(B, 8, 8, C1) > 0)).reshape(-1, C1)
        gW1, gb1 = gz1.T @ c1, gz1.sum(0)
        for p_, g_, m_ in zip(params, [gW1, gb1, gW2, gb2, gW3, gb3], bufs):
            m_ *= momentum
            m_ += g_
            p_ -= lr * m_
        return loss

    return step


def distad_step(model, xb, yb, lr=0.01, momentum=0.9):
    opt = ad.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    F = ad.nn.functional

    def step():
        opt.zero_grad()
        loss = F.cross_entropy(model(xb), yb)
        loss.backward()
        opt.step()
        return float(loss.data)

    return step


def bench_cnn(rounds: int | None) -> list:
    rng = np.random.default_rng(0)
    model = _model(rng)
    xb = rng.random((B, 1, 8, 8), dtype=np.float32)
    yb = rng.integers(0, 10, B)
    hand = hand_step(model.state_dict(), xb, yb)
    eng = distad_step(model, xb, yb)
    l_hand, l_eng = hand(), eng()
    if abs(l_hand - l_eng) > 1e-4:
        raise AssertionError(f"bench cnn: losses differ: numpy {l_hand} vs distad {l_eng}")
    t = interleaved({"numpy-hand": hand, "distad": eng}, rounds or 10, 10)
    ref, e = t["numpy-hand"], t["distad"]
    return [f"CNN 2 conv + pool + linear, batch {B} of 1x8x8, ms/step",
            f"{ref['cpu'] * 1e3:.3f}", f"{e['cpu'] * 1e3:.3f}",
            f"{e['cpu'] / ref['cpu']:.2f}x (wall {e['wall'] / ref['wall']:.2f}x)"]
