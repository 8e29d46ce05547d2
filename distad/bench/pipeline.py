"""`distad bench pipeline`: measured bubble against GPipe's formula; activation memory per stage.

Run under a launcher with one stage per rank, e.g.
`OMP_NUM_THREADS=1 mpiexec -n 4 distad bench pipeline`. Two measurements:

Bubble. A model of p identical stages (each `--layers` blocks of
Linear(width, width) + Tanh on micro-batches of `--rows` rows: compute-bound
matmuls) runs `train_step` for each m in `--microbatches` and each schedule.
Each repeat starts after a Barrier; the step time T is the slowest rank's;
a stage's busy time is the sum of its forward and backward spans (waits
excluded); its measured bubble is 1 - busy / T (median over repeats). The
formula (p-1)/(m+p-1) assumes equal stages; where they are not (stage 0
computes no input gradient, the last one adds the loss), the lighter stages
idle longer for a reason that is not the schedule, so the table compares the
busiest stage's bubble with the formula and shows the mean and range over
stages beside it. `--compute sleep` replaces each matmul block by a layer that
sleeps for a fixed time forward and backward (an accelerator per stage: no
competition for CPU cores), which isolates the schedule and the messaging
from the machine; both kinds run by default.

Memory. With tracemalloc (numpy reports its buffers to it), the peak of
traced memory during one step above the memory held just before it (the
parameters and their gradients from a previous step) is the step's
activation memory: saved activations, received buffers, activation
gradients. It is measured per stage for GPipe and 1F1B, and for one
micro-batch alone (m=1), and checked against 1F1B <= (p/m) GPipe + one
micro-batch.
"""

from __future__ import annotations

import argparse
import gc
import os
import time
import tracemalloc
from typing import Any

import numpy as np

import distad as ad

from .timing import THREAD_VARS, machine, table

SCHEDULES = ("gpipe", "1f1b")


def _sleep_then(seconds: float, value: Any) -> Any:
    time.sleep(seconds)
    return value


def _sleep_mul_fwd(x: np.ndarray, w: np.ndarray, fwd_s: float, bwd_s: float) -> np.ndarray:
    time.sleep(fwd_s)
    return x * w


# y = x * w after sleeping fwd_s; the backward sleeps bwd_s (in w's rule: w always needs one).
sleep_mul = ad.Primitive(
    "sleep_mul", _sleep_mul_fwd,
    vjp=(lambda g, y, x, w, fwd_s, bwd_s: g * w,
         lambda g, y, x, w, fwd_s, bwd_s: _sleep_then(bwd_s, (g * x).sum(axis=0))))


class SleepLayer(ad.nn.Module):
    """(rows, width) -> (rows, width): x * w, taking `fwd_s` s forward and `bwd_s` s backward."""

    def __init__(self, width: int, fwd_s: float, bwd_s: float) -> None:
        super().__init__()
        self.weight = ad.nn.Parameter(np.ones(width, dtype=np.float32))
        self.fwd_s, self.bwd_s = float(fwd_s), float(bwd_s)

    def forward(self, x: Any) -> Any:
        return sleep_mul(x, self.weight, fwd_s=self.fwd_s, bwd_s=self.bwd_s)


def build_model(compute: str, stages: int, layers: int, width: int, fwd_ms: float,
                bwd_ms: float, seed: int = 0) -> ad.nn.Sequential:
    """`stages` identical stages of `layers` blocks each; every stage has 2*layers modules."""
    rng = np.random.default_rng(seed)
    blocks: list[ad.nn.Module] = []
    for _ in range(stages * layers):
        if compute == "matmul":
            blocks += [ad.nn.Linear(width, width, rng=rng), ad.nn.Tanh()]
        else:
            blocks += [SleepLayer(width, fwd_ms / 1e3 / layers, bwd_ms / 1e3 / layers),
                       ad.nn.Identity()]
    return ad.nn.Sequential(*blocks)


def _loss(out: Any, target: Any) -> Any:
    return (out * out).mean()


def gpipe_bubble(p: int, m: int) -> float:
    """GPipe's idle fraction of a step, (p-1)/(m+p-1), for uniform stage times."""
    return (p - 1) / (m + p - 1)


def measure_bubbles(comm: Any, compute: str, ms: list[int], args: argparse.Namespace
                    ) -> list[list[object]]:
    """Rows of the bubble table for one kind of stage compute (rank 0's copy is complete)."""
    p = comm.size
    model = build_model(compute, p, args.layers, args.width, args.fwd_ms, args.bwd_ms)
    balance = [2 * args.layers] * p
    cases = [(m, s) for m in ms for s in SCHEDULES]
    pipes = {case: ad.parallel.PipelineParallel(model, comm, microbatches=case[0],
                                                schedule=case[1], balance=balance, timeout=600)
             for case in cases}
    rng = np.random.default_rng(1)
    data = {m: (rng.standard_normal((m * args.rows, args.width)).astype(np.float32),
                np.zeros(m * args.rows, dtype=np.float32)) for m in ms}
    samples: dict[tuple, list[np.ndarray]] = {case: [] for case in cases}
    for rep in range(args.warmup + args.repeats):
        order = cases[rep % len(cases):] + cases[:rep % len(cases)]  # rotate against drift
        for case in order:
            pp = pipes[case]
            x, y = data[case[0]]
            pp.zero_grad()
            gc.collect()
            gc.disable()
            comm.barrier()
            t0 = time.perf_counter()
            pp.train_step(x, y, _loss)
            elapsed = time.perf_counter() - t0
            gc.enable()
            busy = sum(end - start for kind, _, start, end in pp.timeline if kind in "FB")
            both = comm.allgather(np.array([elapsed, busy]))  # (p, 2)
            if rep >= args.warmup:
                samples[case].append(both)
    rows = []
    for m, s in cases:
        runs = np.stack(samples[(m, s)])                     # (repeats, p, 2)
        step = runs[:, :, 0].max(axis=1)                     # the slowest rank, per repeat
        bubbles = 1.0 - runs[:, :, 1] / step[:, None]        # (repeats, p)
        per_stage = np.median(bubbles, axis=0)
        busiest = int(np.argmin(per_stage))
        busy_mb = np.median(runs[:, busiest, 1]) / m
        theory = gpipe_bubble(p, m)
        gap = per_stage[busiest] - theory
        rows.append([compute, s, m, f"{np.median(step) * 1e3:.1f}", f"{busy_mb * 1e3:.2f}",
                     f"{per_stage[busiest]:.3f} (stage {busiest})",
                     f"{per_stage.mean():.3f} ({per_stage.min():.3f}-{per_stage.max():.3f})",
                     f"{theory:.3f}", f"{gap:+.3f} ({gap / theory:+.0%})"])
    for pp in pipes.values():
        pp.close()
    return rows


def measure_memory(comm: Any, ms: list[int], args: argparse.Namespace
                   ) -> tuple[list[list[object]], bool]:
    """Rows of the memory table (per stage, MB) and whether every 1F1B peak is within the bound."""
    p = comm.size
    model = build_model("matmul", p, args.layers, args.width, 0, 0)
    balance = [2 * args.layers] * p
    rng = np.random.default_rng(2)
    tracemalloc.start()
    peaks: dict[tuple[int, str], np.ndarray] = {}
    try:
        for m in [1, *ms]:
            x = rng.standard_normal((m * args.rows, args.width)).astype(np.float32)
            y = np.zeros(m * args.rows, dtype=np.float32)
            for s in SCHEDULES if m > 1 else ("1f1b",):
                pp = ad.parallel.PipelineParallel(model, comm, microbatches=m, schedule=s,
                                                  balance=balance, timeout=600)
                pp.zero_grad()
                pp.train_step(x, y, _loss)        # plans, gradients: held before the measured step
                gc.collect()
                comm.barrier()
                base = tracemalloc.get_traced_memory()[0]
                tracemalloc.reset_peak()
                pp.train_step(x, y, _loss)
                peak = tracemalloc.get_traced_memory()[1] - base
                peaks[(m, s)] = comm.allgather(np.array([peak], dtype=np.float64)).ravel()
                pp.close()
    finally:
        tracemalloc.stop()
    one = peaks[(1, "1f1b")]
    rows, ok = [], True
    mb = 1 / (1 << 20)
    for m in ms:
        g, f = peaks[(m, "gpipe")], peaks[(m, "1f1b")]
        bound = p / m * g + one
        for stage in range(p):
            fits = bool(f[stage] <= bound[stage])
            ok &= fits
            rows.append([m, stage, f"{g[stage] * mb:.2f}", f"{f[stage] * mb:.2f}",
                         f"{f[stage] / g[stage]:.2f}", f"{one[stage] * mb:.2f}",
                         f"{bound[stage] * mb:.2f}", "yes" if fits else "NO",
                         min(p - stage, m)])
    return rows, ok


def main(argv: list[str] | None = None) -> int:
    """Entry point of `distad bench pipeline`; run it on every rank (one stage each). Returns 0."""
    ap = argparse.ArgumentParser(prog="distad bench pipeline",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--microbatches", default="1,4,16",
                    help="comma-separated micro-batch counts m (default: %(default)s)")
    ap.add_argument("--compute", default="matmul,sleep",
                    help="stage compute for the bubble table: matmul, sleep or both "
                         "(default: %(default)s)")
    ap.add_argument("--layers", type=int, default=2, help="blocks per stage (default: 2)")
    ap.add_argument("--width", type=int, default=512, help="features (default: 512)")
    ap.add_argument("--rows", type=int, default=128, help="rows per micro-batch (default: 128)")
    ap.add_argument("--fwd-ms", type=float, default=4.0,
                    help="sleep stages: forward ms per micro-batch and stage (default: 4)")
    ap.add_argument("--bwd-ms", type=float, default=8.0,
                    help="sleep stages: backward ms per micro-batch and stage (default: 8)")
    ap.add_argument("--repeats", type=int, default=5, help="timed steps per case (default: 5)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps per case (default: 1)")
    ap.add_argument("--memory-microbatches", default="4,16",
                    help="m values of the memory table (default: %(default)s; empty: skip)")
    args = ap.parse_args(argv)
    ms = [int(v) for v in args.microbatches.split(",") if v]
    kinds = [k for k in args.compute.split(",") if k]
    if any(k not in ("matmul", "sleep") for k in kinds):
        ap.error("--compute takes matmul, sleep or both")

    from distad.comm import Communicator

    comm = Communicator()
    p = comm.size
    bubble_rows = [row for kind in kinds for row in measure_bubbles(comm, kind, ms, args)]
    mem_ms = [int(v) for v in args.memory_microbatches.split(",") if v]
    mem_rows, ok = measure_memory(comm, mem_ms, args) if mem_ms else ([], True)
    if comm.rank == 0:
        threads = ", ".join(f"{v}={os.environ.get(v, 'unset')}" for v in THREAD_VARS)
        print(f"distad bench pipeline: p={p} stages (one per rank), {args.layers} blocks of "
              f"{args.width}x{args.width} per stage, {args.rows} rows per micro-batch; "
              f"sleep stages {args.fwd_ms:g} ms forward + {args.bwd_ms:g} ms backward; "
              f"{args.repeats} repeats (median)\n{machine()}; {threads}\n")
        print(table(["compute", "schedule", "m", "step (ms)",
                     "busiest stage: busy per micro-batch (ms)", "bubble of the busiest stage",
                     "bubble: mean (min-max) over stages", "GPipe (p-1)/(m+p-1)",
                     "busiest - formula"], bubble_rows))
        if mem_rows:
            print("\nPeak activation memory per stage (tracemalloc, MB)\n")
            print(table(["m", "stage", "GPipe", "1F1B", "1F1B / GPipe", "one micro-batch",
                         "bound (p/m) GPipe + one", "1F1B within bound",
                         "1F1B in flight"], mem_rows))
            print(f"\n1F1B within (p/m) x GPipe + one micro-batch on every stage: "
                  f"{'yes' if ok else 'NO'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
