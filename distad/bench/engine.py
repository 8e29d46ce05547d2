"""`distad bench engine`: the engine against hand-written numpy, measured in the same run.

Rows (the hand-written code is the anchors' numpy-hand, ../shared/bench/anchors):
- mlp: training step of an MLP 784-1024-1024-10, ReLU, softmax cross-entropy,
  batch 256, float32, SGD update (matmul-bound: target <= 1.05x);
- small: the same for an MLP 64-128-10, batch 32 (overhead-bound: target <= 2x);
- ops: a chain of 6,000 tiny elementwise ops, forward+backward (target <= 4 us/op);
- memory: one forward+backward of 64 x (Linear(256,256)+ReLU), batch 2048, plain
  against checkpoint_sequential with 8 segments (peak traced memory and time);
- cnn: a training step of a small CNN on 8x8 digits, batch 64, against a
  hand-written numpy im2col implementation (target <= 1.3x).
"""

from __future__ import annotations

import argparse
import gc
import json
import time
import tracemalloc

import numpy as np

import distad as ad

from .timing import ensure_threads, interleaved, machine, table

CONFIGS = {"mlp": ((784, 1024, 1024, 10), 256, 0.01, 10, 5),
           "small": ((64, 128, 10), 32, 0.05, 20, 10)}


def init_params(sizes, seed=0):
    rng = np.random.default_rng(seed)
    ps = []
    for i, o in zip(sizes[:-1], sizes[1:]):
        ps.append((rng.standard_normal((i, o)) * np.sqrt(2.0 / i)).astype(np.float32))
        ps.append(np.zeros(o, np.float32))
    return ps


def make_data(batch, d_in, n_cls, seed=1):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((batch, d_in)).astype(np.float32),
            rng.integers(0, n_cls, size=batch).astype(np.int64))


def numpy_hand_step(params, X, y, lr):
    """The anchors' hand-written forward/backward/SGD step, in place on `params`."""
    ps, L, B = params, len(params) // 2, X.shape[0]
    rows = np.arange(B)

    def step():
        hs, h = [X], X
        for i in range(L):
            z = h @ ps[2 * i]
            z += ps[2 * i + 1]
            if i < L - 1:
                np.maximum(z, 0, out=z)
                hs.append(z)
            h = z
        z -= z.max(axis=1, keepdims=True)
        e = np.exp(z)
        s = e.sum(axis=1, keepdims=True)
        loss = float(np.mean(np.log(s[:, 0]) - z[rows, y]))
        g = e
        g /= s
        g[rows, y] -= 1.0
        g /= B
        for i in reversed(range(L)):
            W, b, hin = ps[2 * i], ps[2 * i + 1], hs[i]
            dW = hin.T @ g
            db = g.sum(axis=0)
            if i > 0:
                g = g @ W.T
                g *= (hin > 0)
            W -= lr * dW
            b -= lr * db
        return loss

    return step


def distad_step(params, X, y, lr):
    """The same step written with distad: forward on Tensors, backward(), SGD in place.

    Layers use `ad.nn.functional.linear` (what `nn.Linear` runs), so weights are
    stored (out, in) as in PyTorch: the same numbers, transposed.
    """
    ps = [ad.tensor(np.ascontiguousarray(p.T) if p.ndim == 2 else p, requires_grad=True)
          for p in params]
    L = len(ps) // 2
    F = ad.nn.functional
    cross_entropy = F.cross_entropy

    def step():
        h = X
        for i in range(L):
            h = F.linear(h, ps[2 * i], ps[2 * i + 1])
            if i < L - 1:
                h = ad.relu(h)
        loss = cross_entropy(h, y)
        loss.backward()
        for p in ps:
            p.data -= lr * p.grad
            p.grad = None
        return float(loss.data)

    return step


def bench_mlp(name: str, rounds: int | None) -> list:
    sizes, batch, lr, default_rounds, per_round = CONFIGS[name]
    params = init_params(sizes)
    X, y = make_data(batch, sizes[0], sizes[-1])
    hand = numpy_hand_step([p.copy() for p in params], X, y, lr)
    eng = distad_step([p.copy() for p in params], X, y, lr)
    l_hand, l_eng = hand(), eng()
    if abs(l_hand - l_eng) > 1e-4 * max(1.0, abs(l_hand)):
        raise AssertionError(f"bench {name}: losses differ: numpy {l_hand} vs distad {l_eng}")
    t = interleaved({"numpy-hand": hand, "distad": eng}, rounds or default_rounds, per_round)
    label = f"MLP {'-'.join(map(str, sizes))}, batch {batch}, ms/step"
    return _ratio_row(label, t, scale=1e3)


def bench_ops(rounds: int | None, iters: int = 2000) -> list:
    x0 = np.linspace(-1, 1, 4).astype(np.float32)

    def hand():
        xs, x = [], x0
        for _ in range(iters):
            xs.append(x)
            x = np.sin(x) * 1.0001 + 0.1
        g = np.ones_like(x)
        for xi in reversed(xs):
            g = g * 1.0001 * np.cos(xi)
        return g

    def eng():
        x = ad.tensor(x0, requires_grad=True)
        h = x
        for _ in range(iters):
            h = ad.sin(h) * 1.0001 + 0.1
        h.sum().backward()
        return x.grad

    np.testing.assert_allclose(hand(), eng(), rtol=1e-4)
    t = interleaved({"numpy-hand": hand, "distad": eng}, rounds or 10, 1)
    n_ops = 3 * iters
    row = _ratio_row(f"chain of {n_ops} tiny ops, us/op fwd+bwd", t, scale=1e6 / n_ops)
    return row


def deep_mlp(depth=64, width=256, seed=0):
    rng = np.random.default_rng(seed)
    ws = [ad.tensor((rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32),
                    requires_grad=True) for _ in range(depth)]
    bs = [ad.tensor(np.zeros(width, np.float32), requires_grad=True) for _ in range(depth)]
    return [lambda h, w=w, b=b: ad.relu(h @ w + b) for w, b in zip(ws, bs)], ws + bs


def bench_memory(rounds: int | None, segments: int = 8, batch: int = 2048) -> list:
    layers, params = deep_mlp()
    x = np.random.default_rng(1).standard_normal((batch, 256)).astype(np.float32)

    def run(ckpt: bool):
        def step():
            for p in params:
                p.grad = None
            h = ad.checkpoint_sequential(layers, segments, x) if ckpt else _seq(layers, x)
            (h * h).mean().backward()
        return step

    plain, ckpt = run(False), run(True)
    peaks = {}
    for name, fn in (("plain", plain), ("checkpoint", ckpt)):
        fn()                                  # grads allocated once, outside the measurement
        gc.collect()
        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
        fn()
        peaks[name] = tracemalloc.get_traced_memory()[1] - base
        tracemalloc.stop()
    t = interleaved({"plain": plain, "checkpoint": ckpt}, rounds or 5, 1, warmup=1)
    mib = 2.0 ** 20
    return [f"64 x (Linear(256,256)+ReLU), batch {batch}: peak MiB above baseline / ms",
            f"{peaks['plain'] / mib:.0f} MiB / {t['plain']['wall'] * 1e3:.0f} ms",
            f"{peaks['checkpoint'] / mib:.0f} MiB / {t['checkpoint']['wall'] * 1e3:.0f} ms",
            f"memory {peaks['checkpoint'] / peaks['plain']:.2f}x, "
            f"time {t['checkpoint']['wall'] / t['plain']['wall']:.2f}x"]


def _seq(layers, x):
    for f in layers:
        x = f(x)
    return x


def _ratio_row(label: str, t: dict, scale: float) -> list:
    ref, eng = t[list(t)[0]], t[list(t)[1]]
    return [label, f"{ref['cpu'] * scale:.3f}", f"{eng['cpu'] * scale:.3f}",
            f"{eng['cpu'] / ref['cpu']:.2f}x (wall {eng['wall'] / ref['wall']:.2f}x)"]


ROWS = {"mlp": lambda r: bench_mlp("mlp", r), "small": lambda r: bench_mlp("small", r),
        "ops": bench_ops, "memory": bench_memory}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="distad bench engine", description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1, help="BLAS threads and pinned cores")
    p.add_argument("--rows", default="mlp,small,ops,memory,cnn",
                   help=f"comma-separated subset of {','.join(ROWS)},cnn")
    p.add_argument("--rounds", type=int, default=None, help="timing rounds (default per row)")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = p.parse_args(argv)
    ensure_threads(args.threads, ["bench", "engine", *(argv if argv is not None else [])])
    rows = []
    for name in args.rows.split(","):
        if name == "cnn":
            from .cnn import bench_cnn  # needs ad.nn; kept apart from the engine rows
            rows.append(bench_cnn(args.rounds))
        elif name in ROWS:
            rows.append(ROWS[name](args.rounds))
        else:
            p.error(f"unknown row {name!r}")
        print(f"  done: {rows[-1][0]}", flush=True)
    print(f"\n{machine()}; BLAS threads {args.threads}; medians of CPU time, GC frozen\n")
    print(table(["benchmark", "reference (numpy hand-written)", "distad", "distad / reference"],
                rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine(), "threads": args.threads, "rows": rows,
                       "time": time.strftime("%Y-%m-%d %H:%M")}, f, indent=1)
    return 0
