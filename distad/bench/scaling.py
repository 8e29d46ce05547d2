"""`distad bench scaling`: weak and strong scaling sweeps, with the cost model beside each point.

A driver, run as one ordinary process (not under mpiexec): for every link ("shm", the
machine's shared memory, or a rate such as "1gbit" on the emulated cluster of
launch/emulated-cluster), every compressor and every rank count it launches a short
`distad train` job, reads its per-step metrics and reports, per point:

- samples/s and the efficiency against ideal scaling from the one-rank run
  (weak: per-rank batch fixed, ideal = P x one rank's samples/s; strong: global batch fixed);
- the time per step split into compute (step - wait), compress, communicate and wait
  (exposed communication), as DataParallel reports them (medians over the steps after warm-up);
- the bytes each rank's link carried per second of communication (busbw, nccl-tests'
  convention) and, on the emulated cluster, the bytes its per-link counters saw;
- the cost model's prediction of the same step (distad.comm.costmodel), calibrated from
  a one-core timing of this model's forward/backward/update and compressor, and from
  `distad bench collectives --json` run on the same link at the same rank counts.

With `--epochs` the runs train to the end and the report adds test accuracy and the
wall-clock training time to reach a target accuracy (default: the uncompressed run's final
accuracy), i.e. the compression study of docs/scaling.md. Outputs under --out: scaling.csv,
scaling.json, calibration.json, predictions.csv (the model at --predict-ranks x
--predict-rates), the runs/ folders, and plots (scaling.png, breakdown.png, and
time_to_accuracy.png with --epochs).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from ..comm.costmodel import CollectiveModel, StepModel

WARMUP_STEPS = 3
LINK_BUS = {"allreduce": lambda p: 2 * (p - 1) / p}


# ---- machine state -------------------------------------------------------------------------

def cpu_idle_fraction(seconds: float = 1.0) -> float:
    """Fraction of all cores' time spent idle over the next `seconds` (from /proc/stat)."""
    def read() -> tuple[int, int]:
        with open("/proc/stat") as f:
            vals = [int(v) for v in f.readline().split()[1:]]
        return vals[3] + vals[4], sum(vals)  # idle + iowait, total
    i0, t0 = read()
    time.sleep(seconds)
    i1, t1 = read()
    return (i1 - i0) / max(t1 - t0, 1)


def wait_for_idle(min_idle: float = 0.85, consecutive: int = 3, timeout: float = 120) -> bool:
    """Block until the machine was at least `min_idle` idle for `consecutive` seconds in a row
    (other jobs on a shared machine distort every timing), or `timeout` seconds passed.
    Returns whether it became idle. A no-op returning True where /proc/stat is missing."""
    if not os.path.exists("/proc/stat"):
        return True
    t_end, ok = time.monotonic() + timeout, 0
    while time.monotonic() < t_end:
        ok = ok + 1 if cpu_idle_fraction(1.0) >= min_idle else 0
        if ok >= consecutive:
            return True
    return False


def machine_line() -> str:
    """One line naming the machine and its load, for every record."""
    cpu = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return f"{platform.node()}: {cpu}, {os.cpu_count()} cores, loadavg {load}"


# ---- calibration (runs in a one-rank subprocess with one BLAS thread) ------------------------

def typical(xs: Sequence[float]) -> float:
    """The median of a calibration's repeats: the statistic each measured point uses for its
    steps, so that model and measurement summarise their samples alike (a lower quantile made
    every prediction 5-15% too fast). Disturbance by other jobs is handled as for the points:
    the driver runs the calibration `--repeats` times and keeps the fastest (`fastest_of`)."""
    return float(statistics.median(xs))


def fastest_of(cals: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Several calibrations merged: the smallest value of every timing, as the fastest of a
    point's runs is its figure (other jobs only ever add time)."""
    def merge(values: list[Any]) -> Any:
        first = values[0]
        if isinstance(first, dict):
            return {k: merge([v[k] for v in values]) for k in first}
        if isinstance(first, float):
            return min(values)
        return first
    return merge(list(cals))


def calibrate(cfg: dict[str, Any], compressors: Sequence[str], repeats: int = 20
              ) -> dict[str, Any]:
    """Time one rank's forward, backward and optimizer step of the training job's model at
    cfg's per-rank batch on this process's core (DataParallel on one rank, so the hooks'
    copies count), the bucket plan, and each compressor's per-element costs: the same step
    with the compressor minus without (memory, compression, its own decompression, copies,
    in place and with the caches as training leaves them), and the decoding of one more
    rank's payload. Medians of `repeats` steps, the specs in rotating order.
    Returns a JSON-ready dict (seconds, elements)."""
    import numpy as np
    from mpi4py import MPI

    import distad as ad
    from distad.comm import Communicator
    from distad.comm.buckets import plan_buckets
    from distad.parallel import DataParallel
    from distad.train.config import from_args, parser
    from distad.train.job import build_model, make_optimizer

    # The configuration the runs get, --train-args included (an optimizer, --zero).
    tc = from_args(parser().parse_args(train_args(cfg, cfg["batch_size"], 1, 0, "none",
                                                  Path("unused"))))
    rng = np.random.default_rng(0)
    in_shape = (tc.features,) if tc.model == "mlp" else (1, int(tc.features ** 0.5),
                                                          int(tc.features ** 0.5))
    self_comm = Communicator(MPI.COMM_SELF)
    specs = ["none", *[c for c in compressors if c != "none"]]
    # One model, DataParallel (on one rank: backward includes the hooks' copies into the
    # buckets, and the compressor's whole path after backward) and optimizer per spec.
    jobs = {}
    for spec in specs:
        model = build_model(tc, in_shape, tc.classes)
        dp = DataParallel(model, self_comm, compressor=spec, bucket_mb=tc.bucket_mb,
                          first_bucket_mb=tc.first_bucket_mb)
        opt = make_optimizer(replace(tc, compress=spec), list(model.parameters()), self_comm, dp)
        jobs[spec] = (model, dp, opt)
    X = rng.standard_normal((tc.batch_size, *in_shape)).astype(np.float32)
    y = rng.integers(0, tc.classes, tc.batch_size)
    ce = ad.nn.functional.cross_entropy
    times: dict[str, dict[str, list[float]]] = {
        s: {"forward": [], "backward": [], "update": [], "extra": [], "step": []} for s in specs}
    for r in range(repeats + 3):
        for spec in specs[r % len(specs):] + specs[:r % len(specs)]:  # rotating order
            model, dp, opt = jobs[spec]
            opt.zero_grad()
            t0 = time.perf_counter()
            out = dp(X)
            loss = ce(out, y)
            t1 = time.perf_counter()
            loss.backward()
            t2 = time.perf_counter()
            opt.step()
            t3 = time.perf_counter()
            # What the training loop adds per step: accuracy, a 3-number allreduce, a record.
            local = np.array([float(loss.data) * len(y),
                              float((out.data.argmax(1) == y).sum()), len(y)])
            self_comm.allreduce(local, out=local)
            json.dumps({"step": r, "loss": local[0], **dp.stats.as_dict()})
            t4 = time.perf_counter()
            if r >= 3:
                for k, v in (("forward", t1 - t0), ("backward", t2 - t1), ("update", t3 - t2),
                             ("extra", t4 - t3), ("step", t4 - t0)):
                    times[spec][k].append(v)
    for _, dp, _ in jobs.values():
        dp.close()
    model = jobs["none"][0]
    params = list(model.parameters())
    buckets = plan_buckets(params, cap_mb=tc.bucket_mb, first_mb=tc.first_bucket_mb)
    n = int(sum(p.size for p in params))
    base = times["none"]
    out: dict[str, Any] = {
        "forward_s": typical(base["forward"]),
        "backward_s": typical(base["backward"]),
        "update_s": typical(base["update"]), "fixed_s": typical(base["extra"]),
        "batch": tc.batch_size, "bucket_elems": [int(b.buffer.size) for b in buckets],
        "parameters": n, "optimizer": tc.optimizer, "zero": tc.zero, "compressors": {},
        "phases_s": {spec: {k: typical(times[spec][k])
                            for k in ("forward", "backward", "update", "step")}
                     for spec in specs}}
    for spec in specs[1:]:
        # The compressor's cost in situ: the same one-rank step with it, minus without it.
        extra_s = max(typical(times[spec]["step"]) - typical(base["step"]), 0.0)
        gc = ad.compress.get(spec)
        grads = [rng.standard_normal(b.buffer.size).astype(np.float32) for b in buckets]
        # Allgather aggregation decodes every other rank's payload too.
        strategies = [gc.strategy_for(int(g.size), 2) for g in grads]
        gathers = any(s in ("allgather", "majority") for s in strategies)
        acc = ([_accumulate_seconds(gc.compressor, grads, r) for r in range(repeats)]
               if gathers else [0.0])
        out["compressors"][spec] = {"compress_s_per_elem": extra_s / n,
                                    "accumulate_s_per_elem": typical(acc) / n,
                                    "strategies": strategies}
    return out


def format_calibration(cal: dict[str, Any]) -> str:
    """The one-rank step of each spec as a markdown table (medians, ms)."""
    rows = ["| compressor | forward ms | backward ms (incl. compression) | update ms | step ms |",
            "|---|---:|---:|---:|---:|"]
    for spec, ph in cal["phases_s"].items():
        rows.append(f"| {spec} | " + " | ".join(f"{ph[k] * 1e3:.1f}" for k in
                                                 ("forward", "backward", "update", "step"))
                    + " |")
    return "\n".join(rows)


def _accumulate_seconds(comp: Any, grads: Sequence[Any], seed: int) -> float:
    """Seconds to decode and add one payload per bucket (what each extra rank costs)."""
    import numpy as np

    payloads = [comp.compress(g, np.random.default_rng(seed)) for g in grads]
    outs = [np.zeros_like(g) for g in grads]
    t0 = time.perf_counter()
    for pl, o in zip(payloads, outs):
        comp.accumulate(pl, o)
    return time.perf_counter() - t0


# ---- one point -----------------------------------------------------------------------------

@dataclass
class Point:
    """One measured (link, compressor, ranks) point and the model's prediction of it."""

    mode: str
    link: str
    compress: str
    ranks: int
    batch_per_rank: int
    steps: int
    step_s: float = 0.0
    compute_s: float = 0.0
    compress_s: float = 0.0
    communicate_s: float = 0.0
    wait_s: float = 0.0
    samples_per_s: float = 0.0
    efficiency: float = float("nan")
    bytes_sent: float = 0.0
    link_gbit_s: float = float("nan")
    counter_bytes_per_step: float = float("nan")
    pred_step_s: float = float("nan")
    pred_compute_s: float = float("nan")
    pred_wait_s: float = float("nan")
    pred_error: float = float("nan")
    test_acc: float = float("nan")
    train_s: float = float("nan")
    time_to_target_s: float = float("nan")
    load: str = ""
    run_dir: str = ""
    command: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def read_metrics(run_dir: Path) -> tuple[list[dict], list[dict]]:
    """(step records, test records) of a run's metrics.jsonl (a resume's record is neither)."""
    steps, tests = [], []
    with open(run_dir / "metrics.jsonl") as f:
        for line in f:
            rec = json.loads(line)
            if "test_acc" in rec:
                tests.append(rec)
            elif "step_s" in rec:
                steps.append(rec)
    return steps, tests


def summarise(point: Point, steps: list[dict], tests: list[dict], target: float | None) -> None:
    """Fill the measured fields of `point` from a run's records (medians after warm-up)."""
    body = steps[WARMUP_STEPS:] if len(steps) > WARMUP_STEPS + 2 else steps
    med = lambda k: statistics.median(float(r.get(k, 0.0)) for r in body)
    point.step_s, point.wait_s = med("step_s"), med("wait_s")
    point.compress_s = med("compress_s") + med("decompress_s")
    point.communicate_s, point.bytes_sent = med("communicate_s"), med("bytes_sent")
    point.compute_s = point.step_s - point.wait_s
    point.samples_per_s = point.batch_per_rank * point.ranks / point.step_s
    if point.ranks > 1 and point.communicate_s > 0 and point.compress == "none":
        # nccl-tests' busbw: what one rank's link carried per second of allreduce.
        point.link_gbit_s = (point.bytes_sent * LINK_BUS["allreduce"](point.ranks) * 8
                             / point.communicate_s / 1e9)
    if tests:
        point.test_acc = float(tests[-1]["test_acc"])
        point.train_s = sum(float(r["step_s"]) for r in steps)
        if target is not None:
            point.time_to_target_s = time_to_accuracy(steps, tests, target)


def smoothed_accuracy(tests: list[dict], window: int = 1) -> list[float]:
    """Test accuracy at each evaluation, averaged over it and the `window` - 1 before it (fewer
    at the start): the iterates of small-batch SGD scatter by a few points between
    evaluations, and a mean over a window is what a run can be said to have reached."""
    accs = [float(t["test_acc"]) for t in tests]
    return [statistics.fmean(accs[max(0, i + 1 - window) : i + 1]) for i in range(len(accs))]


def time_to_accuracy(steps: list[dict], tests: list[dict], target: float,
                     window: int = 1) -> float:
    """Training wall-clock seconds (sum of step times, evaluation excluded) until the first
    evaluation whose test accuracy, averaged over it and the `window` - 1 evaluations before it
    (see `smoothed_accuracy`), is at least `target`; inf if none reaches it."""
    at = evaluation_times(steps, tests)
    for i, (t_s, acc) in enumerate(zip(at, smoothed_accuracy(tests, window))):
        if i + 1 >= window and acc >= target - 1e-12:
            return t_s
    return float("inf")


def evaluation_times(steps: list[dict], tests: list[dict]) -> list[float]:
    """Training wall-clock seconds (sum of step times) at each evaluation's step."""
    elapsed, total = {}, 0.0
    for r in steps:
        total += float(r["step_s"])
        elapsed[int(r["step"])] = total
    return [elapsed.get(int(t["step"]), total) for t in tests]


def link_counters(cluster: Path) -> dict[str, tuple[int, int]]:
    """{host: (bytes host->switch, bytes switch->host)} from `emulated-cluster status --raw`."""
    out = subprocess.run([str(cluster), "status", "--raw"], capture_output=True, text=True,
                         check=True).stdout.splitlines()
    rows = [ln.split("\t") for ln in out[1:] if ln.strip()]
    return {r[0]: (int(r[4]), int(r[5])) for r in rows}


# ---- the driver ------------------------------------------------------------------------------

def repo_launch_dir() -> Path:
    """launch/ of the source tree this package was imported from."""
    return Path(__file__).resolve().parents[2] / "launch"


def train_args(cfg: dict[str, Any], batch: int, steps: int, epochs: int, compress: str,
               out: Path, log_every: int = 1) -> list[str]:
    """The `distad train` arguments for one point."""
    args = ["--model", cfg["model"], "--hidden", cfg["hidden"], "--dataset", "synthetic",
            "--samples", str(cfg["samples"]), "--features", str(cfg["features"]),
            "--classes", str(cfg["classes"]), "--batch-size", str(batch), "--lr", str(cfg["lr"]),
            "--compress", compress, "--log-every", str(log_every), "--no-progress",
            "--seed", str(cfg["seed"]), "--out", str(out), "--bucket-mb", str(cfg["bucket_mb"]),
            "--first-bucket-mb", str(cfg["first_bucket_mb"]), "--schedule", cfg["schedule"],
            "--epochs", str(max(epochs, 1))]
    if not epochs:
        args += ["--max-steps", str(steps)]
    return args + list(cfg.get("train_extra", []))


def launcher(link: str, ranks: int, launch_dir: Path, python: str) -> list[str]:
    """The command prefix that starts `ranks` ranks on `link`."""
    if link == "shm" or ranks == 1:
        return [str(launch_dir / "distad-run"), "-q", "-n", str(ranks), "--", python]
    return [str(launch_dir / "emulated-cluster"), "run", str(ranks), python]


def run_point(point: Point, cmd: list[str], env: dict[str, str], timeout: float) -> None:
    """Run one job; raise with its output tail if it fails."""
    point.command = shlex.join(cmd)
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if res.returncode != 0:
        tail = "\n".join((res.stdout + res.stderr).splitlines()[-25:])
        raise RuntimeError(f"run failed ({res.returncode}): {point.command}\n{tail}")


def collectives_json(link: str, ranks: int, sizes: str, out: Path, launch_dir: Path,
                     python: str, env: dict[str, str], timeout: float, reuse: bool = False,
                     busy: int = 0, ops: str = "allreduce,allgather") -> Path:
    """Run `distad bench collectives --json` on `link` with `ranks` ranks; return the path
    (with `reuse`, an existing file is kept). `busy`: that many busy threads per rank, and
    only the allreduce."""
    path = out / f"collectives-{link}-p{ranks}{'-busy' if busy else ''}.json"
    if reuse and path.exists():
        return path
    cmd = launcher(link, ranks, launch_dir, python) + [
        "-m", "distad.bench.collectives", "--ops", "allreduce" if busy else ops,
        "--sizes", sizes, "--budget-mb", "64", "--min-repeats", "5", "--max-repeats", "30",
        "--json", str(path)] + (["--busy-threads", str(busy)] if busy else [])
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if res.returncode != 0 or not path.exists():
        raise RuntimeError(f"collectives calibration failed: {shlex.join(cmd)}\n"
                           f"{res.stdout[-2000:]}{res.stderr[-2000:]}")
    return path


def step_model(cal: dict[str, Any], compress: str) -> StepModel:
    """The calibrated StepModel for one compressor."""
    c = cal["compressors"].get(compress, {})
    return StepModel(forward_s=cal["forward_s"], backward_s=cal["backward_s"],
                     update_s=cal["update_s"], fixed_s=cal.get("fixed_s", 0.0),
                     batch=cal["batch"],
                     bucket_elems=tuple(cal["bucket_elems"]),
                     compress_s_per_elem=c.get("compress_s_per_elem", 0.0),
                     accumulate_s_per_elem=c.get("accumulate_s_per_elem", 0.0),
                     zero=bool(cal.get("zero", False)))


def busy_latency(path: Path) -> float:
    """The smallest message's allreduce time (median of the slowest rank's) from a
    `--busy-threads` run of `distad bench collectives`: one synchronisation of busy ranks."""
    rows = json.loads(path.read_text())["rows"]
    return float(min(rows, key=lambda r: r["bytes"])["time_s"])


def predict(point: Point, cal: dict[str, Any], net: CollectiveModel | None, cores: int,
            compressor_obj: Any, strategy: str | None, sync_s: float = 0.0) -> None:
    """Fill the predicted fields of `point`."""
    model = step_model(cal, point.compress)
    if net is None:
        net = CollectiveModel()
    pred = model.predict(net, point.ranks, batch=point.batch_per_rank,
                         compressor=compressor_obj, strategy=strategy,
                         cores_per_rank=min(1.0, cores / point.ranks), sync_s=sync_s)
    point.extra["sync_s"] = sync_s
    point.pred_step_s, point.pred_compute_s, point.pred_wait_s = pred.step, pred.compute, pred.wait
    if point.step_s:
        point.pred_error = pred.step / point.step_s - 1


def compressor_and_strategy(spec: str, n: int, p: int) -> tuple[Any, str | None]:
    """(Compressor object or None, aggregation strategy) that `distad train --compress spec`
    uses for buckets of about n elements on p ranks."""
    if spec == "none":
        return None, None
    import distad as ad

    gc = ad.compress.get(spec)
    return gc.compressor, gc.strategy_for(n, max(p, 2))


def main(argv: list[str] | None = None) -> int:
    """Entry point of `distad bench scaling`. Returns 0 on success."""
    ap = argparse.ArgumentParser(prog="distad bench scaling", description=__doc__.split("\n\n")[0])
    ap.add_argument("--mode", choices=("weak", "strong"), default="weak",
                    help="weak: --batch-size per rank; strong: --batch-size is the global batch")
    ap.add_argument("--ranks", default="1,2,4", help="rank counts (default: %(default)s)")
    ap.add_argument("--links", default="shm",
                    help="comma-separated: shm (this machine's shared memory) and/or tc rates "
                         "for the emulated cluster, e.g. shm,1gbit (default: %(default)s)")
    ap.add_argument("--compress", default="none",
                    help="comma-separated compressor specs (default: %(default)s)")
    ap.add_argument("--model", default="mlp", choices=("mlp", "cnn"))
    ap.add_argument("--hidden", default="2048,2048")
    ap.add_argument("--features", type=int, default=512)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--samples", type=int, default=16384)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--schedule", default="none")
    ap.add_argument("--bucket-mb", type=float, default=25.0)
    ap.add_argument("--first-bucket-mb", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=25, help="steps per point (default: %(default)s)")
    ap.add_argument("--repeats", type=int, default=1,
                    help="runs per point; the point is the fastest run (each run's figure is "
                         "the median of its steps): other jobs only ever add time")
    ap.add_argument("--epochs", type=int, default=0,
                    help="train whole epochs instead, with test accuracy and time to --target")
    ap.add_argument("--epochs-compressed", type=int, default=None,
                    help="epochs for the compressed runs (default: --epochs), so that they can "
                         "reach the uncompressed run's accuracy even if they need more epochs")
    ap.add_argument("--target", type=float, default=None,
                    help="test accuracy to time (default: the uncompressed run's final one)")
    ap.add_argument("--accuracy-window", type=int, default=1,
                    help="average the test accuracy over this many evaluations (each run's, "
                         "and the uncompressed run's final one that sets the target)")
    ap.add_argument("--train-args", default="", help="more `distad train` arguments")
    ap.add_argument("--predict-ranks", default="64,128,256,512,1024")
    ap.add_argument("--predict-rates", default="1,10,100", help="Gbit/s")
    ap.add_argument("--predict-alpha", type=float, default=None,
                    help="latency (s) for the predictions (default: the fitted one)")
    ap.add_argument("--no-calibrate", action="store_true",
                    help="skip `bench collectives` on each link (predictions use nominal links)")
    ap.add_argument("--wait-idle", type=float, default=60,
                    help="wait up to this many seconds for an idle machine before each run")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per run")
    ap.add_argument("--out", default="runs/scaling")
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--reuse", action="store_true",
                    help="keep the runs (and collectives JSON) already in --out and only run "
                         "the missing ones; delete a run's folder to measure it again")
    ap.add_argument("--recalibrate", action="store_true",
                    help="with --reuse: time the compute and compressors again instead of "
                         "reading --out/calibration.json")
    ap.add_argument("--calibrate-each", action="store_true",
                    help="calibrate the model just before each run, for that run's compressor, "
                         "and predict each point from the fastest of its runs' calibrations "
                         "(as the point is the fastest of its runs): on a machine whose load "
                         "drifts, the model is then compared with the state it was measured "
                         "in, not the sweep's start")
    ap.add_argument("--calibrate", action="store_true",
                    help="only time one rank's step (forward, backward with the hooks' "
                         "compression path, optimizer update) for each --compress spec at "
                         "--batch-size, on this process's core, and print the table")
    ap.add_argument("--calibrate-only", metavar="JSON", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.calibrate_only:
        spec = json.loads(args.calibrate_only)
        print(json.dumps(calibrate(spec["cfg"], spec["compressors"])))
        return 0

    ranks = sorted({int(r) for r in args.ranks.split(",")})
    links = [s.strip() for s in args.links.split(",") if s.strip()]
    specs = [s.strip() for s in args.compress.split(",") if s.strip()]
    launch_dir = repo_launch_dir()
    python = sys.executable
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    cores = os.cpu_count() or 1
    cfg = {"model": args.model, "hidden": args.hidden, "features": args.features,
           "classes": args.classes, "samples": args.samples, "lr": args.lr, "seed": args.seed,
           "bucket_mb": args.bucket_mb, "first_bucket_mb": args.first_bucket_mb,
           "schedule": args.schedule, "train_extra": shlex.split(args.train_args)}
    if args.calibrate:
        print(f"# one rank, batch {args.batch_size}: {machine_line()}")
        print(format_calibration(calibrate({**cfg, "batch_size": args.batch_size}, specs)))
        return 0
    out = Path(args.out)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    cluster = launch_dir / "emulated-cluster"
    shaped: set[str] = set()

    def use_link(link: str) -> None:
        """Shape the emulated cluster's links to `link` once, before its first new run."""
        if link == "shm" or link in shaped:
            return
        try:
            link_counters(cluster)
        except (subprocess.CalledProcessError, OSError) as e:
            ap.error(f"link {link} needs the emulated cluster: run `sudo {cluster} up "
                     f"{max(ranks)}` first ({e})")
        subprocess.run([str(cluster), "shape", link], check=True, capture_output=True)
        shaped.clear()
        shaped.add(link)

    def epochs_for(spec: str) -> int:
        if spec != "none" and args.epochs and args.epochs_compressed:
            return args.epochs_compressed
        return args.epochs

    def per_rank_batch(p: int) -> int:
        return args.batch_size if args.mode == "weak" else max(1, args.batch_size // p)

    # Calibrate the compute and the compressors at each per-rank batch, on one core.
    cals: dict[int, dict[str, Any]] = {}
    if args.reuse and not args.recalibrate and (out / "calibration.json").exists():
        cals = {int(k): v for k, v in
                json.loads((out / "calibration.json").read_text()).items()}
    def calibration(b: int, compressors: Sequence[str]) -> dict[str, Any]:
        """One calibration at per-rank batch b, in a subprocess with one BLAS thread."""
        wait_for_idle(timeout=args.wait_idle)
        spec = {"cfg": {**cfg, "batch_size": b}, "compressors": list(compressors)}
        res = subprocess.run([python, "-m", "distad.bench.scaling", "--calibrate-only",
                              json.dumps(spec)], env=env, capture_output=True, text=True,
                             check=True, timeout=args.timeout)
        return json.loads(res.stdout.strip().splitlines()[-1])

    for b in sorted({per_rank_batch(p) for p in ranks} - set(cals)):
        cals[b] = fastest_of([calibration(b, specs) for _ in range(max(1, args.repeats))])
    (out / "calibration.json").write_text(json.dumps(cals, indent=1) + "\n")

    nets: dict[tuple[str, int], CollectiveModel | None] = {}
    points: list[Point] = []
    header = machine_line()
    print(f"# distad bench scaling ({args.mode}): {header}", flush=True)
    first_cal = next(iter(cals.values()))
    print(f"# model: {first_cal['parameters']:,} parameters, buckets "
          f"{first_cal['bucket_elems']}", flush=True)
    syncs: dict[tuple[str, int], float] = {}
    for link in links:
        for p in ranks:
            net = None
            if p > 1 and not args.no_calibrate:
                # The bucket sizes themselves besides the usual ladder: a collective's time
                # is not linear between two sizes (MPICH and TCP change protocol; at 2 ranks
                # over the emulated link a 16 MiB allreduce runs at 0.6 of the rate of the
                # 4 and 32 MiB ones), so the model reads the buckets' time, not a line.
                sizes = ",".join(["4,256,1K,64K,256K,1M,4M,16M,32M"] + [
                    str(4 * n) for n in sorted(set(first_cal["bucket_elems"]))])
                if not (args.reuse and (out / f"collectives-{link}-p{p}.json").exists()
                        and (out / f"collectives-{link}-p{p}-busy.json").exists()):
                    use_link(link)
                wait_for_idle(timeout=args.wait_idle)
                ops = "allreduce,allgather" + (",reduce_scatter" if first_cal.get("zero")
                                               else "")
                path = collectives_json(link, p, sizes, out, launch_dir, python, env,
                                        args.timeout, reuse=args.reuse, ops=ops)
                # p10 of each size's repeats: other jobs only ever add time (as for the runs).
                net = CollectiveModel.from_bench([path], name=link, cpu_bound=(link == "shm"),
                                                 stat="p10_s")
                # One synchronisation of ranks that each keep a thread busy, as in training
                # (main thread and communication thread): with more threads than cores the
                # ranks wait for each other to be scheduled.
                wait_for_idle(timeout=args.wait_idle)
                syncs[(link, p)] = busy_latency(collectives_json(
                    link, p, "4", out, launch_dir, python, env, args.timeout,
                    reuse=args.reuse, busy=1))
            elif p > 1:
                net = (CollectiveModel.link(float(link[:-4]) / (1000 if "mbit" in link else 1))
                       if link.endswith("bit") else
                       CollectiveModel(alpha=5e-6, beta=1 / 2.5e9, cpu_bound=True, name="shm"))
            nets[(link, p)] = net
            for spec in specs:
                b = per_rank_batch(p)
                run_dir = out / "runs" / f"{link}-{spec.replace(':', '_').replace('+', '_')}-p{p}"
                runs, beside = [], []
                for r in range(max(1, args.repeats)):
                    rdir = run_dir if r == 0 else run_dir.with_name(f"{run_dir.name}-r{r}")
                    cal_path = rdir / "calibration.json"
                    if args.calibrate_each and args.reuse and cal_path.exists():
                        beside.append(json.loads(cal_path.read_text()))
                    elif args.calibrate_each and not (args.reuse and
                                                      (rdir / "point.json").exists()):
                        # just before the run, in the machine's state of the run
                        beside.append(calibration(b, ["none", spec]))
                        rdir.mkdir(parents=True, exist_ok=True)
                        cal_path.write_text(json.dumps(beside[-1], indent=1) + "\n")
                    cmd = launcher(link, p, launch_dir, python) + ["-m", "distad", "train"] + \
                        train_args(cfg, b, args.steps, epochs_for(spec), spec, rdir)
                    point = Point(args.mode, link, spec, p, b, args.steps, run_dir=str(rdir))
                    before = None
                    if args.reuse and (rdir / "point.json").exists():
                        kept = json.loads((rdir / "point.json").read_text())
                        point.load, point.command = kept["load"], kept["command"]
                        point.counter_bytes_per_step = kept["counter_bytes_per_step"]
                    else:
                        if (rdir / "metrics.jsonl").exists():
                            (rdir / "metrics.jsonl").unlink()
                        wait_for_idle(timeout=args.wait_idle)
                        point.load = " ".join(f"{x:.2f}" for x in os.getloadavg())
                        if link != "shm" and p > 1:
                            use_link(link)
                            before = link_counters(cluster)
                        run_point(point, cmd, env, args.timeout)
                    steps, tests = read_metrics(rdir)
                    point.steps = len(steps)
                    if before is not None:
                        after = link_counters(cluster)
                        h0 = next(iter(after))
                        point.counter_bytes_per_step = (after[h0][0] - before[h0][0]) / len(steps)
                    summarise(point, steps, tests, None)
                    (rdir / "point.json").write_text(json.dumps(
                        {"load": point.load, "command": point.command,
                         "counter_bytes_per_step": point.counter_bytes_per_step}) + "\n")
                    runs.append(point)
                # Other jobs on a shared machine only ever add time: the fastest run (each
                # run's own figure being the median of its steps) is the least disturbed.
                runs.sort(key=lambda q: q.step_s)
                point = runs[0]
                point.extra["run_step_s"] = [q.step_s for q in runs]
                point.extra["run_loads"] = [q.load for q in runs]
                comp, strategy = compressor_and_strategy(spec, max(first_cal["bucket_elems"]), p)
                predict(point, fastest_of(beside) if beside else cals[b], net, cores, comp,
                        strategy, syncs.get((link, p), 0.0))
                point.extra["calibrated"] = "beside each run" if beside else "at the start"
                points.append(point)
                print(_row_line(point), flush=True)

    _efficiency(points, args.mode)
    if args.epochs:
        _time_to_target(points, args.target, args.accuracy_window)
    _write(out, points, args, header, nets, cals, cores)
    print("\n" + format_table(points, with_accuracy=bool(args.epochs)))
    print("\n" + model_fit(points))
    print(f"\nwrote {out}/scaling.csv, scaling.json, predictions.csv, calibration.json")
    return 0


def _row_line(p: Point) -> str:
    return (f"{p.link:>6} {p.compress:>16} P={p.ranks}: step {p.step_s * 1e3:.1f} ms "
            f"(model {p.pred_step_s * 1e3:.1f} ms, {p.pred_error:+.0%}), "
            f"{p.samples_per_s:.0f} samples/s, wait {p.wait_s * 1e3:.1f} ms")


def _efficiency(points: list[Point], mode: str) -> None:
    """Efficiency against ideal scaling of the link's uncompressed run at its smallest rank
    count (compressing on one rank is overhead, not a better baseline); without one, of the
    compressor's own smallest-P point."""
    for link in {p.link for p in points}:
        group = [p for p in points if p.link == link]
        dense = sorted((p for p in group if p.compress == "none"), key=lambda p: p.ranks)
        for spec in {p.compress for p in group}:
            own = sorted((p for p in group if p.compress == spec), key=lambda p: p.ranks)
            base = dense[0] if dense else own[0]
            for p in own:
                p.efficiency = p.samples_per_s / (base.samples_per_s * p.ranks / base.ranks)


def _time_to_target(points: list[Point], target: float | None, window: int = 1) -> None:
    """Time to `target` accuracy (default: each link's uncompressed run's final accuracy,
    averaged over its last `window` evaluations), every run's accuracy averaged the same way."""
    for key in {(p.link, p.ranks) for p in points}:
        group = [p for p in points if (p.link, p.ranks) == key]
        ref = next((p for p in group if p.compress == "none"), None)
        tgt = target
        if tgt is None and ref is not None:
            tgt = smoothed_accuracy(read_metrics(Path(ref.run_dir))[1], window)[-1]
        if tgt is None:
            continue
        for p in group:
            steps, tests = read_metrics(Path(p.run_dir))
            p.time_to_target_s = time_to_accuracy(steps, tests, tgt, window)
            p.extra["target_acc"] = tgt
            p.extra["accuracy_window"] = window


def model_fit(points: Sequence[Point], tolerance: float = 0.15) -> str:
    """One line: how many multi-rank points the model predicts within `tolerance`, the mean
    absolute error, and the worst point (the check docs/scaling.md reports per sweep)."""
    scored = [p for p in points if p.ranks > 1 and math.isfinite(p.pred_error)]
    if not scored:
        return "model: no multi-rank point to compare"
    worst = max(scored, key=lambda p: abs(p.pred_error))
    within = sum(abs(p.pred_error) <= tolerance for p in scored)
    mean = sum(abs(p.pred_error) for p in scored) / len(scored)
    return (f"model: {within} of {len(scored)} multi-rank points within {tolerance:.0%}, "
            f"mean |error| {mean:.1%}, worst {worst.link} {worst.compress} P={worst.ranks} "
            f"{worst.pred_error:+.1%}")


def format_table(points: Sequence[Point], with_accuracy: bool = False) -> str:
    """The points as a markdown table (milliseconds per step)."""
    head = ["link", "compress", "P", "batch/rank", "samples/s", "eff.", "step ms", "compute ms",
            "compress ms", "comm ms", "wait ms", "link Gbit/s", "model ms", "model err"]
    if with_accuracy:
        head += ["test acc", "train s", "to target s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for p in points:
        row = [p.link, p.compress, str(p.ranks), str(p.batch_per_rank), f"{p.samples_per_s:.0f}",
               f"{p.efficiency:.2f}", f"{p.step_s * 1e3:.1f}", f"{p.compute_s * 1e3:.1f}",
               f"{p.compress_s * 1e3:.1f}", f"{p.communicate_s * 1e3:.1f}",
               f"{p.wait_s * 1e3:.1f}", f"{p.link_gbit_s:.2f}", f"{p.pred_step_s * 1e3:.1f}",
               f"{p.pred_error:+.1%}"]
        if with_accuracy:
            row += [f"{p.test_acc:.4f}", f"{p.train_s:.1f}", f"{p.time_to_target_s:.1f}"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def predictions(cal: dict[str, Any], specs: Sequence[str], ranks: Sequence[int],
                rates: Sequence[float], alpha: float, efficiency: float = 1.0
                ) -> list[dict[str, Any]]:
    """Weak-scaling predictions at rank counts and link rates that are not at hand: one rank
    per host with a whole core, links of `rates` Gbit/s at `efficiency`, latency `alpha`."""
    rows = []
    for rate in rates:
        net = CollectiveModel.link(rate, alpha=alpha, efficiency=efficiency)
        for spec in specs:
            model = step_model(cal, spec)
            base = model.predict(net, 1).step
            for p in ranks:
                comp, strategy = compressor_and_strategy(spec, max(cal["bucket_elems"]), p)
                pr = model.predict(net, p, compressor=comp, strategy=strategy)
                rows.append({"gbit_s": rate, "compress": spec, "ranks": p,
                             "strategy": strategy or "allreduce", **pr.as_dict(),
                             "efficiency": base / pr.step})
    return rows


def break_even_gbit(cal: dict[str, Any], spec: str, p: int, alpha: float,
                    cores_per_rank: float = 1.0, lo: float = 1e-3, hi: float = 1e4) -> float:
    """The link rate (Gbit/s) below which `spec` makes the modelled step faster than the
    exact float32 allreduce on p ranks: bisection on log(rate). inf if it pays at every rate
    up to `hi`, 0 if at none down to `lo`."""
    import math

    if spec == "none":
        return float("nan")
    dense, comp_model = step_model(cal, "none"), step_model(cal, spec)
    comp, strategy = compressor_and_strategy(spec, max(cal["bucket_elems"]), p)

    def gain(rate: float) -> float:
        net = CollectiveModel.link(rate, alpha=alpha)
        a = dense.predict(net, p, cores_per_rank=cores_per_rank).step
        b = comp_model.predict(net, p, compressor=comp, strategy=strategy,
                               cores_per_rank=cores_per_rank).step
        return a - b  # > 0: compression pays

    if gain(hi) > 0:
        return float("inf")
    if gain(lo) <= 0:
        return 0.0
    a, b = math.log(lo), math.log(hi)
    for _ in range(60):
        m = (a + b) / 2
        a, b = (m, b) if gain(math.exp(m)) > 0 else (a, m)
    return math.exp(a)


def _write(out: Path, points: list[Point], args: argparse.Namespace, header: str,
           nets: dict[tuple[str, int], CollectiveModel | None], cals: dict[int, dict],
           cores: int) -> None:
    rows = [asdict(p) for p in points]
    fields = [k for k in rows[0] if k != "extra"] if rows else []
    with open(out / "scaling.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    cal = cals[max(cals)]
    fitted = [n for n in nets.values() if n is not None and not n.cpu_bound]
    alpha = args.predict_alpha if args.predict_alpha is not None else (
        fitted[0].alpha if fitted else 20e-6)
    specs = [s.strip() for s in args.compress.split(",") if s.strip()]
    preds = predictions(cal, specs, [int(r) for r in args.predict_ranks.split(",")],
                        [float(r) for r in args.predict_rates.split(",")], alpha)
    if preds:
        with open(out / "predictions.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(preds[0]))
            w.writeheader()
            w.writerows(preds)
    break_even = [{"compress": spec, "ranks": p, "cores_per_rank": cpr,
                   "gbit_s": break_even_gbit(cal, spec, p, alpha, cpr)}
                  for spec in specs if spec != "none"
                  for p in sorted({q.ranks for q in points if q.ranks > 1} | {64, 1024})
                  for cpr in sorted({1.0, min(1.0, cores / p)}, reverse=True)
                  if cpr == 1.0 or p <= 4 * cores]
    (out / "scaling.json").write_text(json.dumps({
        "command": "distad bench scaling " + shlex.join(sys.argv[3:] if sys.argv[1:3] == [
            "bench", "scaling"] else sys.argv[1:]),
        "machine": header, "cores": cores, "points": rows,
        "networks": {f"{k[0]}@{k[1]}": v.to_dict() for k, v in nets.items() if v is not None},
        "predictions": preds, "break_even": break_even}, indent=1, default=str) + "\n")
    if break_even:
        print("\nlink rate below which each compressor beats the float32 allreduce (model):")
        for row in break_even:
            print(f"  {row['compress']:>16} P={row['ranks']:<5} {row['cores_per_rank']:.2f} "
                  f"core/rank: {row['gbit_s']:.3g} Gbit/s")
    if not args.no_plot:
        try:
            plot(out, points, args.mode, bool(args.epochs))
        except ImportError:
            print("(matplotlib not installed: no plots)", file=sys.stderr)


def plot(out: Path, points: Sequence[Point], mode: str, accuracy: bool) -> None:
    """scaling.png (samples/s and efficiency vs ranks, ideal and model beside them),
    breakdown.png (time per step: compute / compress / wait, model marked), and with
    accuracy time_to_accuracy.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({(p.link, p.compress) for p in points})
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for key in groups:
        g = sorted((p for p in points if (p.link, p.compress) == key), key=lambda p: p.ranks)
        xs = [p.ranks for p in g]
        line, = ax1.plot(xs, [p.samples_per_s for p in g], "o-", label=f"{key[0]} {key[1]}")
        ax1.plot(xs, [p.batch_per_rank * p.ranks / p.pred_step_s for p in g], "x--",
                 color=line.get_color(), alpha=0.6)
        if key[1] == "none":
            ax1.plot(xs, [g[0].samples_per_s * r / g[0].ranks for r in xs], ":",
                     color=line.get_color(), alpha=0.5)
        ax2.plot(xs, [p.efficiency for p in g], "o-", color=line.get_color())
    ax1.set(xlabel="ranks", ylabel="samples/s", title=f"{mode} scaling (o measured, x model, "
            "dotted: ideal)")
    ax1.legend(fontsize=7)
    ax2.set(xlabel="ranks", ylabel="samples/s / (P x uncompressed one-rank samples/s)",
            ylim=(0, 1.1), title="efficiency against ideal")
    for ax in (ax1, ax2):
        ax.set_xticks(sorted({p.ranks for p in points}))
    fig.tight_layout()
    fig.savefig(out / "scaling.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(max(6, 0.7 * len(points) + 2), 4.2))
    labels = [f"{p.link}\n{p.compress}\nP={p.ranks}" for p in points]
    x = range(len(points))
    # compute: the main thread's time outside the final wait; the wait holds the compression
    # of the last buckets (on the communication thread) and the communication not hidden.
    compute = [p.compute_s * 1e3 for p in points]
    compress = [min(p.compress_s, p.wait_s) * 1e3 for p in points]
    wait = [(p.wait_s - min(p.compress_s, p.wait_s)) * 1e3 for p in points]
    ax.bar(x, compute, label="compute (main thread)")
    ax.bar(x, compress, bottom=compute, label="compress + decompress, waited for")
    ax.bar(x, wait, bottom=[a + b for a, b in zip(compute, compress)],
           label="communication, waited for")
    ax.scatter(x, [p.communicate_s * 1e3 for p in points], marker="_", s=300, color="k",
               label="communicate (total, overlapped)", zorder=3)
    ax.scatter(x, [p.pred_step_s * 1e3 for p in points], marker="x", color="r", label="model",
               zorder=3)
    ax.set_xticks(list(x), labels, fontsize=7)
    ax.set(ylabel="ms per step", title="time per step")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "breakdown.png", dpi=110)
    plt.close(fig)

    if accuracy:
        fig, ax = plt.subplots(figsize=(7, 4.2))
        window = max((int(p.extra.get("accuracy_window", 1)) for p in points), default=1)
        for p in points:
            steps, tests = read_metrics(Path(p.run_dir))
            t_s = evaluation_times(steps, tests)
            label = f"{p.link} {p.compress} P={p.ranks}"
            if window > 1:  # each evaluation faint, the windowed mean as the line
                line, = ax.plot(t_s[window - 1:], smoothed_accuracy(tests, window)[window - 1:],
                                "-", label=f"{label} (mean of {window})")
                ax.plot(t_s, [t["test_acc"] for t in tests], ".", color=line.get_color(),
                        alpha=0.35)
            else:
                line, = ax.plot(t_s, [t["test_acc"] for t in tests], "o-", label=label)
            if math.isfinite(p.time_to_target_s):
                ax.axvline(p.time_to_target_s, color=line.get_color(), ls=":", lw=1)
        targets = {p.extra.get("target_acc") for p in points} - {None}
        for tgt in targets:
            ax.axhline(tgt, color="gray", ls="--", lw=0.8)
        ax.set(xlabel="training wall-clock s (evaluation excluded)", ylabel="test accuracy",
               title="time to accuracy (dashed: target; dotted: when each run reaches it)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "time_to_accuracy.png", dpi=110)
        plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
