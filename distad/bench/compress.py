"""``distad bench compress``: encode + decode throughput of every compressor.

For each compressor and bucket size, times ``decompress(compress(x), n, out=buf)`` on a float32
bucket of standard normal values and, right before and after it in the same round,
``np.copyto`` of the same buffer into a preallocated one (the reference: the cheapest pass over
the data numpy can make). Both measure the steady state of a training run: the output buffer,
like a DataParallel bucket, is allocated once and reused every round, and so are the
compressor's payload and scratch arrays (its ``ArrayCache``), after one untimed warm-up round.
GB/s of float32 input processed is from the median time over the rounds; "vs copy" is the
median over rounds of copy time / encode+decode time, which cancels most of the drift of a
shared machine. Single process, no MPI.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence

import numpy as np

from distad.compress import get

#: One spec per compressor (and per option that changes its kernel).
DEFAULT_SPECS = (
    "none",
    "fp16",
    "bf16",
    "int8",
    "int8:stochastic",
    "qsgd:16",
    "terngrad",
    "sign",
    "efsign",
    "onebit",
    "topk:0.01",
    "randk:0.01",
    "threshold:0.001",
    "powersgd:2",
)


def parse_size(text: str) -> int:
    """'16M' -> 16 * 2**20, '64K' -> 64 * 2**10, '1000' -> 1000 (elements)."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper()
    try:
        if text and text[-1] in units:
            return int(float(text[:-1]) * units[text[-1]])
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 1M, 4M, 16M)") from None


def format_size(n: int) -> str:
    for unit, size in (("M", 1 << 20), ("K", 1 << 10)):
        if n % size == 0:
            return f"{n // size}{unit}"
    return str(n)


def _seconds(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(
    spec: str, n: int, repeats: int, seed: int = 0, scale: float = 1.0
) -> dict[str, float | int | str]:
    """Median seconds of encode+decode of ``spec`` and of np.copyto on the same n floats, drawn
    from N(0, scale^2).

    Both write into a preallocated float32 buffer of n elements (the steady state of training).
    """
    compressor = get(spec).compressor
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(n, dtype=np.float32)
    x *= np.float32(scale)
    dst = np.empty_like(x)
    np.copyto(dst, x)  # fault the destination's pages in before timing
    decoded = np.empty_like(x)
    np.copyto(decoded, x)

    def round_trip() -> np.ndarray:
        return compressor.decompress(compressor.compress(x, rng), n, out=decoded)

    round_trip()  # warm-up
    copies, codecs, ratios = [], [], []
    for _ in range(repeats):
        before = _seconds(lambda: np.copyto(dst, x))
        codecs.append(_seconds(round_trip))
        copies.append((before + _seconds(lambda: np.copyto(dst, x))) / 2)
        ratios.append(copies[-1] / codecs[-1])
    return {
        "spec": spec,
        "n": n,
        "wire_bytes": compressor.wire_bytes(n),
        "codec_s": statistics.median(codecs),
        "copy_s": statistics.median(copies),
        "vs_copy": statistics.median(ratios),
    }


def markdown_table(rows: Sequence[dict[str, float | int | str]]) -> str:
    """The measurements as a markdown table, with the copy reference beside every figure."""
    lines = [
        "| compressor | floats | wire bytes | size ratio | encode+decode ms | GB/s "
        "| copy GB/s | vs copy |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        n, codec, copy = int(r["n"]), float(r["codec_s"]), float(r["copy_s"])
        ratio = float(r["vs_copy"])
        gbs, copy_gbs = 4 * n / codec / 1e9, 4 * n / copy / 1e9
        lines.append(
            f"| {r['spec']} | {format_size(n)} | {int(r['wire_bytes']):,} "
            f"| {4 * n / int(r['wire_bytes']):.1f}x | {codec * 1e3:.1f} | {gbs:.2f} "
            f"| {copy_gbs:.1f} | {ratio:.2f}x |"
        )
    return "\n".join(lines)


def machine() -> str:
    """CPU model, core count, Python and numpy versions, BLAS thread settings."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        pass
    threads = os.environ.get("OPENBLAS_NUM_THREADS", "unset")
    return (
        f"{model}, {os.cpu_count()} cores; Python {platform.python_version()}, "
        f"numpy {np.__version__}; OPENBLAS_NUM_THREADS={threads}"
    )


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print a markdown table; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="distad bench compress",
        description="Encode+decode throughput of each compressor, beside np.copyto.",
    )
    parser.add_argument(
        "--sizes",
        default="1M,4M,16M",
        help="comma-separated bucket sizes in float32 elements (default: 1M,4M,16M)",
    )
    parser.add_argument(
        "--specs",
        default=",".join(DEFAULT_SPECS),
        help="comma-separated compressor specs (default: one per compressor)",
    )
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (default: 5)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--scale",
        type=float,
        default=1.0,
        help="standard deviation of the normal input (default: 1; gradients are often "
        "1e-3 or smaller, where half precision has subnormals)",
    )
    args = parser.parse_args(argv)
    sizes = [parse_size(s) for s in args.sizes.split(",") if s.strip()]
    specs = [s.strip() for s in args.specs.split(",") if s.strip()]
    if args.repeats < 1 or not sizes or not specs:
        parser.error("need at least one size, one spec and one repeat")
    for spec in specs:  # reject a bad spec before spending time on the others
        try:
            get(spec)
        except ValueError as e:
            parser.error(str(e))
    rows = [
        measure(spec, n, args.repeats, args.seed, args.scale) for n in sizes for spec in specs
    ]
    print(f"machine: {machine()}")
    print(
        f"input N(0, {args.scale:g}^2); median of {args.repeats} interleaved rounds; steady"
        " state: decompress(..., out=) into a reused buffer, payload and scratch arrays reused,"
        " copy = np.copyto into a reused buffer\n"
    )
    print(markdown_table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
