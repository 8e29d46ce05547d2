"""``distad bench optim``: one optimizer update against the same formulas on whole arrays.

For SGD with momentum, Adam and AdamW, times ``opt.step()`` on one float32 parameter of n
elements (default: the 5.27 M parameters of docs/scaling.md's MLP) beside, in the same
rotating rounds, the reference: the optimizer's formulas written as one numpy expression per
line over the whole arrays (what PyTorch's single-tensor loop does, and distad did before its
updates ran block by block), and ``np.copyto`` of the parameter (one pass over memory).
Reports milliseconds (median wall time) and the ratio to the reference. Single process.
"""

from __future__ import annotations

import argparse
import functools
import math

import numpy as np

import distad as ad

from .compress import format_size, parse_size
from .timing import ensure_threads, interleaved, machine, table

LR, MOMENTUM, BETAS, EPS, WD = 1e-3, 0.9, (0.9, 0.999), 1e-8, 1e-2


def _sgd_reference(w, g, state):
    buf = state.setdefault("buf", np.zeros_like(w))
    buf *= MOMENTUM
    buf += g
    w -= LR * buf


def _adam_reference(w, g, state, decoupled=False):
    m = state.setdefault("m", np.zeros_like(w))
    v = state.setdefault("v", np.zeros_like(w))
    t = state["t"] = state.get("t", 0) + 1
    if decoupled:
        w *= 1.0 - LR * WD
    m *= BETAS[0]
    m += (1.0 - BETAS[0]) * g
    v *= BETAS[1]
    v += (1.0 - BETAS[1]) * (g * g)
    denom = np.sqrt(v)
    denom /= math.sqrt(1.0 - BETAS[1] ** t)
    denom += EPS
    w -= (LR / (1.0 - BETAS[0] ** t)) * (m / denom)


OPTIMIZERS = {
    "sgd": (lambda ps: ad.optim.SGD(ps, lr=LR, momentum=MOMENTUM), _sgd_reference),
    "adam": (lambda ps: ad.optim.Adam(ps, lr=LR, betas=BETAS, eps=EPS), _adam_reference),
    "adamw": (lambda ps: ad.optim.AdamW(ps, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD),
              lambda w, g, s: _adam_reference(w, g, s, decoupled=True)),
}


def run(n: int, names: list[str], rounds: int) -> list[list[object]]:
    """One row per optimizer: ms of distad, of the reference and of a copy; the ratio."""
    rng = np.random.default_rng(0)
    g = rng.standard_normal(n).astype(np.float32)
    rows = []
    for name in names:
        make, reference = OPTIMIZERS[name]
        p = ad.Tensor(rng.standard_normal(n).astype(np.float32), requires_grad=True)
        p.grad = g
        opt = make([p])
        w, state = p.data.copy(), {}
        dst = np.empty_like(w)
        t = interleaved({"distad": opt.step,
                         "reference": functools.partial(reference, w, g, state),
                         "copy": functools.partial(np.copyto, dst, w)},
                        rounds=rounds, per_round=3)
        ms = {k: 1e3 * v["wall"] for k, v in t.items()}
        rows.append([name, f"{ms['distad']:.1f}", f"{ms['reference']:.1f}",
                     f"{ms['copy']:.1f}", f"{ms['distad'] / ms['reference']:.2f}x",
                     f"{ms['distad'] / ms['copy']:.1f}"])
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="distad bench optim", description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=parse_size, default=5_267_466,
                    help="elements of the parameter, e.g. 1M, 16M (default: 5267466)")
    ap.add_argument("--optimizers", default="sgd,adam,adamw",
                    help=f"comma-separated, from {', '.join(OPTIMIZERS)} (default: %(default)s)")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1, help="BLAS threads (default 1)")
    args = ap.parse_args(argv)
    names = [s.strip() for s in args.optimizers.split(",") if s.strip()]
    unknown = sorted(set(names) - set(OPTIMIZERS))
    if unknown:
        ap.error(f"unknown optimizer(s) {', '.join(unknown)}; choose from {', '.join(OPTIMIZERS)}")
    ensure_threads(args.threads, ["bench", "optim", *(argv if argv is not None else [])])
    print(f"# distad bench optim: one float32 parameter of {format_size(args.size)} elements; "
          f"{machine()}")
    print(table(["optimizer", "distad ms", "whole-array numpy ms", "copy ms", "vs numpy",
                 "copies"], run(args.size, names, args.rounds)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
