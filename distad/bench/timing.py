"""Timing discipline shared by the benchmarks: pinned threads, interleaved rounds, medians.

On a shared machine only a comparison made in the same run holds, so every
benchmark runs the reference and distad side by side in rounds whose order
rotates, and reports medians of process CPU time (robust at one thread) and
wall time.
"""

from __future__ import annotations

import gc
import os
import platform
import sys
import time
from collections.abc import Callable

import numpy as np

from .._threads import THREAD_VARS


def ensure_threads(threads: int, argv: list[str]) -> None:
    """Re-execute this benchmark with BLAS limited to `threads` threads and pinned cores.

    BLAS reads its thread count when numpy loads, so setting it afterwards
    does nothing; re-executing with the variables set is the reliable way.
    """
    if all(os.environ.get(v) == str(threads) for v in THREAD_VARS):
        if hasattr(os, "sched_setaffinity"):
            cores = sorted(os.sched_getaffinity(0))[:threads]
            os.sched_setaffinity(0, cores)
        return
    env = dict(os.environ, **{v: str(threads) for v in THREAD_VARS})
    os.execve(sys.executable, [sys.executable, "-m", "distad", *argv], env)


def interleaved(fns: dict[str, Callable[[], object]], rounds: int, per_round: int,
                warmup: int = 2) -> dict[str, dict[str, float]]:
    """Median seconds per call (cpu and wall) of each fn, measured in rotating rounds.

    Python's cyclic collector is frozen during timing, as in the anchor
    benchmarks, so no framework pays for another's garbage.
    """
    names = list(fns)
    for name in names:
        for _ in range(warmup):
            fns[name]()
    cpu: dict[str, list[float]] = {n: [] for n in names}
    wall: dict[str, list[float]] = {n: [] for n in names}
    gc.collect()
    gc.freeze()
    try:
        for r in range(rounds):
            order = names[r % len(names):] + names[:r % len(names)]
            for name in order:
                fn = fns[name]
                for _ in range(per_round):
                    c0, w0 = time.process_time(), time.perf_counter()
                    fn()
                    cpu[name].append(time.process_time() - c0)
                    wall[name].append(time.perf_counter() - w0)
    finally:
        gc.unfreeze()
    return {n: {"cpu": float(np.median(cpu[n])), "wall": float(np.median(wall[n]))}
            for n in names}


def machine() -> str:
    """One line naming the machine, Python, numpy and the load, for the record."""
    load = os.getloadavg() if hasattr(os, "getloadavg") else ("?",)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, "
            f"numpy {np.__version__}, loadavg {' '.join(f'{x:.2f}' for x in load)}")


def table(headers: list[str], rows: list[list[object]]) -> str:
    """A markdown table."""
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)
