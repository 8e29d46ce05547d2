"""`distad bench collectives`: latency and bandwidth of distad's collectives over MPI.

Run under a launcher, e.g. `mpiexec -n 4 distad bench collectives` (or
`mpiexec -n 4 python -m distad.bench.collectives`). For each operation and
message size it times the distad Communicator call and, beside it, the raw
mpi4py call on the same buffers, so the wrapper's overhead is visible in the
same run. Figures follow nccl-tests (doc/PERFORMANCE.md there):

  time   per repeat the slowest rank's time (each repeat starts after a
         Barrier), then the median over repeats
  algbw  = bytes / time, in GB/s (1e9 bytes per second)
  busbw  = algbw * 2(p-1)/p for allreduce, * (p-1)/p for allgather,
           reduce_scatter and alltoall, * 1 for bcast

`bytes` is the size of one rank's buffer for allreduce and bcast, and the
size of the whole gathered (or scattered, or exchanged) buffer for allgather,
reduce_scatter and alltoall, each rank contributing bytes/p, as in nccl-tests.
`time_collective` and `interleaved_times` are the reusable part: they time any
callable (or several, in alternation) across ranks.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from distad.comm import Communicator

DEFAULT_OPS = ("allreduce", "iallreduce", "allgather")
ALL_OPS = (*DEFAULT_OPS, "reduce_scatter", "alltoall", "bcast")
# Powers of 4 from 4 B to 64 MB.
DEFAULT_SIZES = tuple(4**k for k in range(1, 14))
_UNITS = {"": 1, "B": 1, "K": 1 << 10, "KB": 1 << 10, "M": 1 << 20, "MB": 1 << 20,
          "G": 1 << 30, "GB": 1 << 30}


def bus_factor(op: str, p: int) -> float:
    """nccl-tests' busbw/algbw ratio for `op` on `p` ranks: the fraction of the data
    each rank must move over its link in an optimal algorithm, so that busbw is
    comparable with the link bandwidth whatever the rank count."""
    if op in ("allreduce", "iallreduce"):
        return 2 * (p - 1) / p
    if op in ("allgather", "reduce_scatter", "alltoall"):
        return (p - 1) / p
    if op == "bcast":
        return 1.0
    raise ValueError(f"bus_factor: unknown op {op!r}")


def collective_times(comm: Communicator, fn: Callable[[], object], repeats: int,
                     warmup: int = 2) -> np.ndarray:
    """Time `fn()` on every rank: returns float64 seconds, shape (repeats,).

    Each repeat starts after a Barrier, so all ranks enter together; entry r is
    the slowest rank's time for repeat r (one Allreduce MAX at the end, so the
    measurement adds no collective between repeats). Collective: every rank
    must call it with the same `repeats` and `warmup`.
    """
    return interleaved_times(comm, [fn], repeats, warmup)[0]


def interleaved_times(comm: Communicator, fns: Sequence[Callable[[], object]], repeats: int,
                      warmup: int = 2) -> np.ndarray:
    """Time several callables in alternation: float64 seconds, shape (len(fns), repeats).

    Every repeat runs each callable once, each after a Barrier, so that drift
    in a shared machine's load hits every variant alike; the order rotates
    from repeat to repeat, so none is always first after the others. The way
    to compare a call with its reference (distad's allreduce with the raw MPI
    one; a DataParallel sync with one Allreduce of a flat buffer of the same
    size). Entries are the slowest rank's times, as in collective_times.
    """
    for _ in range(warmup):
        for fn in fns:
            fn()
    k = len(fns)
    times = np.empty((k, repeats), dtype=np.float64)
    for r in range(repeats):
        for i in ((r + j) % k for j in range(k)):
            comm.barrier()
            t0 = time.perf_counter()
            fns[i]()
            times[i, r] = time.perf_counter() - t0
    return comm.allreduce(times, op="max", out=times)


def time_collective(comm: Communicator, fn: Callable[[], object], repeats: int,
                    warmup: int = 2) -> float:
    """Median over `repeats` of the slowest rank's time for `fn()`, in seconds.

    The extension point for other rows of the benchmark (e.g. a DataParallel
    gradient sync): pass any callable that every rank runs collectively.
    """
    return float(np.median(collective_times(comm, fn, repeats, warmup)))


@dataclass
class Row:
    """One line of the table: an operation at one message size."""

    op: str
    bytes: int
    count: int  # elements in each rank's send buffer
    repeats: int
    time_s: float
    raw_mpi_s: float
    p10_s: float
    p90_s: float
    algbw_gbs: float
    busbw_gbs: float


def _buffers(op: str, comm: Communicator, nbytes: int, dtype: np.dtype
             ) -> tuple[int, int, Callable[[], object], Callable[[], object], Callable[[], bool]]:
    """(bytes, count, distad call, raw mpi4py call, correctness check) for one case."""
    from mpi4py import MPI

    p, mpi, item = comm.size, comm.mpi, dtype.itemsize
    if op in ("allreduce", "iallreduce", "bcast"):
        count = max(nbytes // item, 1)
        nbytes = count * item
        # Zeros, so that repeated in-place sums stay finite.
        buf, ref = np.zeros(count, dtype), np.zeros(count, dtype)
        if op == "allreduce":
            ours = lambda: comm.allreduce(buf, out=buf)
            raw = lambda: mpi.Allreduce(MPI.IN_PLACE, ref, MPI.SUM)
        elif op == "iallreduce":
            ours = lambda: comm.iallreduce(buf, out=buf).wait()
            raw = lambda: mpi.Iallreduce(MPI.IN_PLACE, ref, MPI.SUM).Wait()
        else:
            ours = lambda: comm.bcast(buf, root=0)
            raw = lambda: mpi.Bcast(ref, root=0)

        def check() -> bool:
            x = np.full(count, comm.rank + 1, dtype)
            if op == "bcast":
                return bool((comm.bcast(x, root=0) == 1).all())
            return bool((comm.allreduce(x) == p * (p + 1) // 2).all())

        return nbytes, count, ours, raw, check

    # Whole-buffer ops: each rank contributes (or receives) bytes/p.
    chunk = max(nbytes // (p * item), 1)
    nbytes = chunk * p * item
    rows = np.empty((p, chunk), dtype)  # p chunks: alltoall's send and receive layout
    ref = np.empty_like(rows)
    if op == "allgather":
        send = np.zeros(chunk, dtype)
        ours = lambda: comm.allgather(send, out=rows)
        raw = lambda: mpi.Allgather(send, ref)
        count = chunk

        def check() -> bool:
            got = comm.allgather(np.full(chunk, comm.rank, dtype))
            return bool((got == np.arange(p, dtype=dtype)[:, None]).all())
    elif op == "reduce_scatter":
        send, out = np.zeros(p * chunk, dtype), np.empty(chunk, dtype)
        ours = lambda: comm.reduce_scatter(send, out=out)
        raw = lambda: mpi.Reduce_scatter_block(send, ref[0], MPI.SUM)
        count = p * chunk

        def check() -> bool:
            return bool((comm.reduce_scatter(np.ones(p * chunk, dtype)) == p).all())
    elif op == "alltoall":
        send = np.zeros((p, chunk), dtype)
        ours = lambda: comm.alltoall(send, out=rows)
        raw = lambda: mpi.Alltoall(send, ref)
        count = p * chunk

        def check() -> bool:
            # Rank r sends r to everyone, so row j received comes from rank j.
            got = comm.alltoall(np.full((p, chunk), comm.rank, dtype))
            return bool((got == np.arange(p, dtype=dtype)[:, None]).all())
    else:
        raise ValueError(f"unknown op {op!r}; expected one of {', '.join(ALL_OPS)}")
    return nbytes, count, ours, raw, check


def repeats_for(nbytes: int, budget_bytes: int, lo: int, hi: int) -> int:
    """Adaptive repeat count: about `budget_bytes` moved per case, clamped to [lo, hi]."""
    return int(max(lo, min(hi, budget_bytes // max(nbytes, 1))))


def run(comm: Communicator, ops: Sequence[str], sizes: Sequence[int], dtype: np.dtype,
        repeats: int | None, warmup: int, budget_bytes: int, min_repeats: int,
        max_repeats: int) -> list[Row]:
    """Measure every (op, size) case on `comm`; collective. Returns the rows on every rank."""
    rows: list[Row] = []
    for op in ops:
        for size in sizes:
            nbytes, count, ours, raw, check = _buffers(op, comm, size, dtype)
            if any(r.op == op and r.bytes == nbytes for r in rows):
                continue  # sizes below one element per rank round up to the same case
            if not comm.allreduce(np.array([check()], dtype=np.int32), op="min")[0]:
                raise RuntimeError(f"{op} of {nbytes} bytes gave a wrong result")
            n = repeats or repeats_for(nbytes, budget_bytes, min_repeats, max_repeats)
            t, t_raw = interleaved_times(comm, [ours, raw], n, warmup)
            med = float(np.median(t))
            algbw = nbytes / med / 1e9
            rows.append(Row(op, nbytes, count, n, med, float(np.median(t_raw)),
                            float(np.percentile(t, 10)), float(np.percentile(t, 90)),
                            algbw, algbw * bus_factor(op, comm.size)))
    return rows


def format_table(rows: Sequence[Row]) -> str:
    """The rows as a markdown table (times in microseconds, bandwidths in GB/s)."""
    lines = ["| op | bytes | repeats | time (us) | raw MPI (us) | p10-p90 (us) "
             "| algbw (GB/s) | busbw (GB/s) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r.op} | {_human(r.bytes)} | {r.repeats} | {_us(r.time_s)} | "
                     f"{_us(r.raw_mpi_s)} | {_us(r.p10_s)}-{_us(r.p90_s)} | "
                     f"{r.algbw_gbs:.3f} | {r.busbw_gbs:.3f} |")
    return "\n".join(lines)


def parse_size(text: str) -> int:
    """'4', '64K', '1M', '64MB' -> bytes (binary units)."""
    t = text.strip().upper()
    digits = t.rstrip("BKMG")
    unit = t[len(digits):]
    if not digits.isdigit() or unit not in _UNITS:
        raise argparse.ArgumentTypeError(f"bad size {text!r}; use e.g. 4, 64K, 1M, 64MB")
    return int(digits) * _UNITS[unit]


def main(argv: list[str] | None = None) -> int:
    """Entry point of `distad bench collectives`; run it on every rank. Returns 0."""
    ap = argparse.ArgumentParser(prog="distad bench collectives",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--ops", default=",".join(DEFAULT_OPS),
                    help=f"comma-separated, from {', '.join(ALL_OPS)} (default: %(default)s)")
    ap.add_argument("--sizes", default=None,
                    help="comma-separated message sizes, e.g. 4,64K,1M (default: powers of 4 "
                         "from 4 B to 64 MB)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--repeats", type=int, default=None,
                    help="timed repeats per case (default: adaptive, see --budget-mb)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--budget-mb", type=float, default=256,
                    help="adaptive repeats move about this many MB per case (default: %(default)s)")
    ap.add_argument("--min-repeats", type=int, default=5)
    ap.add_argument("--max-repeats", type=int, default=100)
    ap.add_argument("--json", metavar="PATH", default=None, help="also write the rows as JSON")
    ap.add_argument("--model-params", type=float, default=0,
                    help="also time DataParallel's gradient sync of a model with about this many "
                         "float32 parameters (e.g. 5e6) against one raw Allreduce of the same "
                         "bytes, and a training step with and without overlap")
    ap.add_argument("--only-model", action="store_true",
                    help="skip the message-size sweep (with --model-params)")
    ap.add_argument("--busy-threads", type=int, default=0,
                    help="keep this many threads per rank busy with numpy arithmetic while "
                         "timing, as a training step's computation does: with more ranks than "
                         "cores a collective then waits for its peers to be scheduled")
    args = ap.parse_args(argv)

    ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    unknown = sorted(set(ops) - set(ALL_OPS))
    if unknown:
        ap.error(f"unknown op(s) {', '.join(unknown)}; choose from {', '.join(ALL_OPS)}")
    sizes = [parse_size(s) for s in args.sizes.split(",")] if args.sizes else list(DEFAULT_SIZES)
    if args.repeats is not None and args.repeats < 1:
        ap.error("--repeats must be >= 1")

    import mpi4py
    from mpi4py import MPI

    from distad.comm import Communicator

    comm = Communicator()
    if args.model_params:
        _bench_model_sync(comm, int(args.model_params), args.repeats or 20)
        if args.only_model:
            return 0
    with busy_threads(args.busy_threads):
        rows = run(comm, ops, sizes, np.dtype(args.dtype), args.repeats, args.warmup,
                   int(args.budget_mb * (1 << 20)), args.min_repeats, args.max_repeats)
    if comm.rank == 0:
        library = MPI.Get_library_version().splitlines()[0].strip()
        header = (f"distad bench collectives: P={comm.size}, {args.dtype}, {library}, "
                  f"mpi4py {mpi4py.__version__}, numpy {np.__version__}, host {platform.node()}"
                  + (f", {args.busy_threads} busy thread(s) per rank" if args.busy_threads
                     else ""))
        print(f"# {header}\n\n{format_table(rows)}", flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"header": header, "p": comm.size, "dtype": args.dtype,
                           "busy_threads": args.busy_threads,
                           "argv": sys.argv if argv is None else argv,
                           "rows": [asdict(r) for r in rows]}, f, indent=1)
    return 0


@contextmanager
def busy_threads(count: int) -> Iterator[None]:
    """Run `count` daemon threads of 256 x 256 float32 matrix products (numpy releases the GIL
    for them) for the duration of the block."""
    stop = threading.Event()

    def spin() -> None:
        a = np.full((256, 256), 0.5, np.float32)
        while not stop.is_set():
            a @ a

    threads = [threading.Thread(target=spin, daemon=True) for _ in range(count)]
    for t in threads:
        t.start()
    try:
        yield
    finally:
        stop.set()
        for t in threads:
            t.join()


def _bench_model_sync(comm: Communicator, n_params: int, repeats: int) -> None:
    """The DataParallel rows: sync vs one raw Allreduce, and overlap vs no overlap."""
    from .gradsync import bench_gloo, bench_overlap, bench_sync

    s = bench_sync(comm, n_params, repeats)
    o = bench_overlap(comm, n_params, repeats=max(3, repeats // 2))
    g = bench_gloo(comm, s["params"], repeats)
    if comm.rank == 0:
        mb = s["bytes"] / 2**20
        print(f"# DataParallel gradient sync, P={comm.size}, {s['params']:,} float32 parameters "
              f"({mb:.1f} MiB, {s['buckets']} buckets)\n\n"
              "| measurement | ms (median, slowest rank) | ratio |\n|---|---|---|\n"
              f"| one raw in-place Allreduce of {mb:.1f} MiB | {s['raw_allreduce_s'] * 1e3:.2f} | "
              "1.00 |\n"
              f"| DataParallel bucket reduction (gradients already in buckets, as after "
              f"backward's hooks) | {s['dp_buckets_s'] * 1e3:.2f} | {s['buckets_ratio']:.2f}x |\n"
              f"| DataParallel.sync_gradients() (copy into buckets + reduction) | "
              f"{s['dp_sync_s'] * 1e3:.2f} | {s['ratio']:.2f}x |\n"
              f"| training step (fwd+bwd+sync), no overlap | {o['no_overlap_s'] * 1e3:.1f} | "
              "1.00 |\n"
              f"| training step (fwd+bwd+sync), overlap | {o['overlap_s'] * 1e3:.1f} | "
              f"{o['ratio']:.2f}x |", flush=True)
        if g is not None:
            print(f"| torch {g['torch']} gloo all_reduce of the same {mb:.1f} MiB | "
                  f"{g['gloo_allreduce_s'] * 1e3:.2f} | "
                  f"{g['gloo_allreduce_s'] / s['raw_allreduce_s']:.2f}x of raw MPI |", flush=True)
        else:
            print("| torch gloo all_reduce | (torch not installed) | |", flush=True)
        print(flush=True)


def _us(seconds: float) -> str:
    us = seconds * 1e6
    return f"{us:,.1f}" if us < 1000 else f"{us:,.0f}"


def _human(n: int) -> str:
    for unit in ("B", "KB", "MB"):
        if n < 1024 or n % 1024:
            return f"{n} {unit}"
        n //= 1024
    return f"{n} GB"


if __name__ == "__main__":
    sys.exit(main())
