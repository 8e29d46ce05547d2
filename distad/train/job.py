"""`distad train`: the data-parallel training job.

Every rank builds the same model from the same seed, trains on its shard of
each epoch (a DistributedSampler: disjoint, equal-sized, reshuffled per epoch
from one seed), and DataParallel averages the gradients during backward. Rank 0
shows the progress bar and writes metrics (JSON lines), a summary and the final
model; every rank writes its share of each checkpoint. Evaluation is sharded
and reduced. With the same seed, rank count and inputs the result is bitwise
the same, including across an interruption and `--resume`.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

import distad as ad

from ..comm import Communicator, failfast
from ..data import ArrayDataset, DataLoader, DistributedSampler
from ..parallel import DataParallel
from . import checkpoint as ckpt
from .config import TrainConfig, from_args, parser
from .loop import (
    FaultInjection,
    SynchronisedGC,
    checkpoint_due,
    elastic_position,
    largest_optimizer_state,
    progress_bar,
    resumable_batches,
)
from .timeline import Timeline

__all__ = ["main", "run", "build_model", "load_dataset"]


def load_dataset(cfg: TrainConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(X_train, X_test, y_train, y_test), identical on every rank (seeded split): the bundled
    digits, a synthetic set, or the arrays of an .npz file (`distad.data.load_npz`)."""
    if cfg.dataset == "digits":
        X, y = ad.data.load_digits(shape=(1, 8, 8) if cfg.model == "cnn" else (64,))
    elif cfg.dataset == "synthetic":
        X, y = ad.data.make_classification(cfg.samples, cfg.features, cfg.classes,
                                           seed=cfg.seed + 12345)
    else:
        try:
            arrays = ad.data.load_npz(cfg.dataset)
        except (OSError, ValueError) as e:
            raise SystemExit(f"distad train: --dataset {cfg.dataset}: {e}") from None
        if "X" not in arrays:
            return tuple(_images(arrays[k], cfg) if cfg.model == "cnn" else arrays[k]
                         for k in ("X_train", "X_test", "y_train", "y_test"))
        X, y = arrays["X"], arrays["y"]
    if cfg.model == "cnn":
        X = _images(X, cfg)
    return ad.data.train_test_split(X, y, test_size=cfg.test_size, seed=cfg.seed)


def _images(X: np.ndarray, cfg: TrainConfig) -> np.ndarray:
    """X as (n, channels, side, side) for the CNN: square rows become one-channel images."""
    if X.ndim == 4 and X.shape[2] == X.shape[3]:
        return X
    if X.ndim == 3 and X.shape[1] == X.shape[2]:
        return X[:, None]
    side = math.isqrt(int(np.prod(X.shape[1:])))
    if X.ndim == 2 and side * side == X.shape[1]:
        return X.reshape(-1, 1, side, side)
    raise SystemExit(f"distad train: --model cnn needs square images (n, c, s, s), (n, s, s) or "
                     f"(n, s*s), got samples of shape {X.shape[1:]} from --dataset {cfg.dataset}")


def build_model(cfg: TrainConfig, in_shape: tuple[int, ...], n_classes: int,
                comm: Communicator | None = None) -> ad.nn.Module:
    """The MLP (hidden widths from --hidden) or the small CNN, initialised from cfg.seed;
    with --norm batch or sync, BatchNorm or SyncBatchNorm (over `comm`) after every hidden
    layer."""
    rng = np.random.default_rng(cfg.seed)
    nn = ad.nn
    def norm(kind: type, width: int) -> list[ad.nn.Module]:
        if cfg.norm == "sync":
            return [ad.parallel.SyncBatchNorm(width, comm=comm)]
        return [kind(width)] if cfg.norm == "batch" else []

    if cfg.model == "mlp":
        layers, width = [], int(np.prod(in_shape))
        for h in cfg.hidden_sizes:
            layers += [nn.Linear(width, h, rng=rng), *norm(nn.BatchNorm1d, h), nn.ReLU()]
            width = h
        return nn.Sequential(nn.Flatten(), *layers, nn.Linear(width, n_classes, rng=rng))
    c, side = in_shape[0], in_shape[-1]
    return nn.Sequential(
        nn.Conv2d(c, 16, 3, padding=1, rng=rng), *norm(nn.BatchNorm2d, 16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1, rng=rng), *norm(nn.BatchNorm2d, 32), nn.ReLU(),
        nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(32 * (side // 2) ** 2, 64, rng=rng), *norm(nn.BatchNorm1d, 64), nn.ReLU(),
        nn.Linear(64, n_classes, rng=rng))


def make_optimizer(cfg: TrainConfig, params: list, comm: Communicator | None = None,
                   dp: DataParallel | None = None) -> ad.optim.Optimizer:
    """The --optimizer over `params`; with --zero, its state sharded over `comm`'s ranks, and
    `dp`'s exact gradient averaging turned into a reduce-scatter (ZeRO stage 2's exchange;
    stage 1 when the gradients are compressed)."""
    o = ad.optim
    if cfg.optimizer == "sgd":
        cls, kw = o.SGD, {"lr": cfg.lr, "momentum": cfg.momentum,
                          "weight_decay": cfg.weight_decay}
    elif cfg.optimizer == "adam":
        cls, kw = o.Adam, {"lr": cfg.lr, "weight_decay": cfg.weight_decay}
    elif cfg.optimizer == "adamw":
        cls, kw = o.AdamW, {"lr": cfg.lr, "weight_decay": cfg.weight_decay or 1e-2}
    else:
        return o.LBFGS(params, lr=cfg.lr, max_iter=5, history_size=10,
                       line_search_fn="strong_wolfe")
    if cfg.zero:
        exact = dp is not None and cfg.compress in (None, "none")
        return ad.parallel.ZeroRedundancyOptimizer(params, cls, comm,
                                                   data_parallel=dp if exact else None, **kw)
    return cls(params, **kw)


def make_schedule(cfg: TrainConfig, opt: ad.optim.Optimizer, total_steps: int):
    o = ad.optim
    sched = None
    if cfg.schedule == "cosine":
        sched = o.CosineAnnealingLR(opt, T_max=max(1, total_steps - cfg.warmup_steps))
    elif cfg.schedule == "step":
        sched = o.StepLR(opt, step_size=max(1, total_steps // 3), gamma=0.1)
    if cfg.warmup_steps:
        sched = o.LinearWarmup(opt, warmup_steps=cfg.warmup_steps, after=sched)
    return sched


class Metrics:
    """Rank 0's record of the run: JSON lines, one per log interval and per epoch."""

    def __init__(self, out: str, rank: int, resume: bool) -> None:
        self.path = Path(out) / "metrics.jsonl" if out and rank == 0 else None
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if not resume and self.path.exists():
                self.path.unlink()

    def write(self, record: dict[str, Any]) -> None:
        if self.path:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


def accumulated_backward(dp: DataParallel, xb: np.ndarray, yb: np.ndarray, parts: int,
                         loss_fn: Any) -> tuple[np.ndarray, float]:
    """Forward and backward of one batch in `parts` micro-batches: gradients accumulate
    locally (`no_sync`) and are synchronised once, with the last; each micro-batch's mean loss
    is weighted by its share of the batch, so the gradient is the whole batch's (BatchNorm
    aside: its statistics are the micro-batches'). Returns (logits, the batch's mean loss)."""
    chunks = np.array_split(np.arange(len(yb)), max(1, min(parts, len(yb))))
    logits, total = [], 0.0
    for k, idx in enumerate(chunks):
        with dp.no_sync() if k < len(chunks) - 1 else contextlib.nullcontext():
            out = dp(xb[idx])
            loss = loss_fn(out, yb[idx])
            if len(chunks) > 1:
                loss = loss * np.asarray(len(idx) / len(yb), dtype=out.dtype)
            loss.backward()
        logits.append(out.data)
        total += float(loss.data)
    return (logits[0] if len(logits) == 1 else np.concatenate(logits)), total


def evaluate(model: ad.nn.Module, X: np.ndarray, y: np.ndarray, comm: Communicator,
             batch: int = 512) -> tuple[float, float]:
    """(mean loss, accuracy) on (X, y), each rank evaluating a disjoint slice; reduced."""
    idx = np.array_split(np.arange(len(X)), comm.size)[comm.rank]
    totals = np.zeros(3)
    model.eval()
    with ad.no_grad():
        for s in range(0, len(idx), batch):
            j = idx[s:s + batch]
            logits = model(X[j])
            totals[0] += float(ad.nn.functional.cross_entropy(logits, y[j]).data) * len(j)
            totals[1] += int((logits.data.argmax(axis=1) == y[j]).sum())
            totals[2] += len(j)
    model.train()
    comm.allreduce(totals, out=totals)
    return totals[0] / totals[2], totals[1] / totals[2]


def run(cfg: TrainConfig, comm: Communicator | None = None) -> dict[str, Any]:
    """Train as configured; return the summary (same on every rank)."""
    comm = comm if comm is not None else Communicator()
    if cfg.parallel != "dp":
        from .model_parallel import run_model_parallel  # it imports this module

        return run_model_parallel(cfg, comm)
    Xtr, Xte, ytr, yte = load_dataset(cfg)
    n_classes = int(max(ytr.max(), yte.max())) + 1
    model = build_model(cfg, Xtr.shape[1:], n_classes, comm)
    dp = DataParallel(model, comm, compressor=cfg.compress, bucket_mb=cfg.bucket_mb,
                      first_bucket_mb=cfg.first_bucket_mb, overlap=cfg.overlap,
                      measure_every=cfg.grad_error_every)
    sampler = DistributedSampler(len(Xtr), comm.size, comm.rank, shuffle=True, seed=cfg.seed)
    loader = DataLoader(ArrayDataset(Xtr, ytr), cfg.batch_size, sampler=sampler)
    steps_per_epoch = len(loader)
    total_steps = steps_per_epoch * cfg.epochs
    if cfg.max_steps:
        total_steps = min(total_steps, cfg.max_steps)
    opt = make_optimizer(cfg, list(model.parameters()), comm, dp)
    sched = make_schedule(cfg, opt, total_steps)
    step = start = 0
    resumed = None
    if cfg.resume:
        step, start, resumed = restore(cfg, comm, model, opt, sched, dp, loader)
    metrics = Metrics(cfg.out, comm.rank, cfg.resume)
    if resumed:
        metrics.write(resumed)
    bar = progress_bar(cfg, comm.rank, total_steps, step,
                       f"train ({comm.size} rank{'s' if comm.size > 1 else ''})")
    cross_entropy = ad.nn.functional.cross_entropy
    params = list(model.parameters())
    fault = FaultInjection(comm.rank)
    dense_bytes = sum(b.nbytes for b in dp.buckets)  # what an uncompressed allreduce sends
    timeline = Timeline(comm) if cfg.trace else None

    t_start, window = time.perf_counter(), []
    phases = dict.fromkeys(("bytes_sent", "compress_s", "communicate_s", "decompress_s",
                            "wait_s"), 0.0)
    test_loss = test_acc = float("nan")
    fidelity: list[tuple[float, float]] = []  # (grad_error, grad_cosine) of measured steps
    with SynchronisedGC(cfg.gc_every) as collector:
        try:
            for epoch, xb, yb in resumable_batches(loader, step, steps_per_epoch, total_steps,
                                                   start):
                t0 = time.perf_counter()

                def closure(xb=xb, yb=yb):
                    opt.zero_grad()
                    closure.logits, closure.loss = accumulated_backward(
                        dp, xb, yb, cfg.accumulate, cross_entropy)
                    if cfg.clip:  # with --zero, each rank has its shard's gradients
                        (opt.clip_grad_norm(cfg.clip) if cfg.zero
                         else ad.optim.clip_grad_norm(params, cfg.clip))
                    return closure.loss

                if cfg.optimizer == "lbfgs":
                    opt.step(closure)
                else:
                    closure()
                    opt.step()
                if sched is not None:
                    sched.step()
                step += 1
                local = np.array([closure.loss * len(yb),
                                  float((closure.logits.argmax(1) == yb).sum()), len(yb)])
                comm.allreduce(local, out=local)
                t1 = time.perf_counter()
                dt = t1 - t0
                window.append((dt, local[2]))
                if timeline is not None:
                    timeline.step(step, t0, t1, dp.stats.spans)
                for k in phases:
                    phases[k] += getattr(dp.stats, k)
                if dp.stats.grad_error is not None:
                    fidelity.append((dp.stats.grad_error, dp.stats.grad_cosine))
                collector.after_step(step)
                record = {"step": step, "epoch": epoch, "loss": local[0] / local[2],
                          "train_acc": local[1] / local[2], "step_s": dt,
                          "samples_per_s": local[2] / dt, **dp.stats.as_dict(),
                          "compression_ratio": dense_bytes / max(dp.stats.bytes_sent, 1)}
                if bar is not None:
                    bar.update(1)
                    recent = window[-20:]
                    sps = sum(w[1] for w in recent) / sum(w[0] for w in recent)
                    bar.set_postfix(loss=f"{record['loss']:.4f}", acc=f"{record['train_acc']:.3f}",
                                    samples_s=f"{sps:.0f}", refresh=False)
                if step % cfg.log_every == 0:
                    metrics.write(record)
                end_of_epoch = step % steps_per_epoch == 0 or step == total_steps
                if checkpoint_due(cfg, step, end_of_epoch):
                    save(cfg, comm, step, model, opt, sched, dp)
                fault.after_step(step)
                if end_of_epoch or (cfg.eval_every and step % cfg.eval_every == 0):
                    dp.broadcast_buffers()  # every rank evaluates with rank 0's statistics
                    test_loss, test_acc = evaluate(model, Xte, yte, comm)
                    metrics.write({"step": step, "epoch": epoch, "test_loss": test_loss,
                                   "test_acc": test_acc,
                                   "elapsed_s": time.perf_counter() - t_start})
                if end_of_epoch and bar is not None:
                    bar.write(f"epoch {epoch + 1}: test loss {test_loss:.4f}, "
                              f"test accuracy {test_acc:.4f}")
        finally:
            if bar is not None:
                bar.close()
            dp.close()
    elapsed = time.perf_counter() - t_start
    if timeline is not None:
        timeline.write(cfg.trace)
    steps_s = [w[0] for w in window]
    n_steps = max(len(window), 1)
    per_step = {k: v / n_steps for k, v in phases.items()}
    dense = dense_bytes if comm.size > 1 else 0
    summary = {"ranks": comm.size, "steps": step, "test_loss": test_loss, "test_acc": test_acc,
               "seconds": elapsed, "median_step_s": float(np.median(steps_s)) if steps_s else 0,
               "mean_step_s": float(np.mean(steps_s)) if steps_s else 0,
               "samples_per_s": sum(w[1] for w in window) / max(sum(steps_s), 1e-12),
               "parameters": int(sum(p.size for p in params)), "compress": cfg.compress,
               "bytes_per_step": per_step.pop("bytes_sent"), "dense_bytes_per_step": dense,
               **{f"{k}_per_step": v for k, v in per_step.items()}, "config": cfg.as_dict()}
    if fidelity:
        summary["grad_error"], summary["grad_cosine"] = map(float, np.mean(fidelity, axis=0))
    summary["optimizer_state_bytes"] = largest_optimizer_state(opt, comm)
    if cfg.out and comm.rank == 0:
        Path(cfg.out).mkdir(parents=True, exist_ok=True)
        (Path(cfg.out) / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        ckpt.save_state(Path(cfg.out) / "model.npz", {"model": model.state_dict()})
    return summary


# ---- checkpoints ----------------------------------------------------------------------------

#: Settings a checkpoint must share with the run that resumes it.
RESUME_KEYS = ("model", "hidden", "dataset", "samples", "features", "classes", "batch_size",
               "optimizer", "compress", "seed", "test_size", "zero")


def _identity(cfg: TrainConfig, comm: Communicator) -> dict[str, Any]:
    """What must match for a checkpoint to be resumed by this run."""
    return {"ranks": comm.size, **{k: getattr(cfg, k) for k in RESUME_KEYS}}


def save(cfg: TrainConfig, comm: Communicator, step: int, model, opt, sched, dp) -> None:
    """Each rank writes its share of the checkpoint of `step`; rank 0 then commits it."""
    d = ckpt.step_dir(cfg.checkpoint_dir, step)
    state: dict[str, Any] = {"step": step, "identity": _identity(cfg, comm),
                             "sync": dp.sync_state_dict()}
    if cfg.zero or comm.rank == 0:  # with --zero, every rank has a shard of the optimizer
        state["optimizer"] = opt.state_dict()
    if comm.rank == 0:
        state.update(model=model.state_dict(),
                     scheduler=sched.state_dict() if sched is not None else {})
    ckpt.save_state(ckpt.rank_file(d, comm.rank), state)
    comm.barrier()
    if comm.rank == 0:
        ckpt.commit_latest(cfg.checkpoint_dir, step)
    comm.barrier()


def restore(cfg: TrainConfig, comm: Communicator, model, opt, sched, dp, loader
            ) -> tuple[int, int, dict[str, int] | None]:
    """Load the newest complete checkpoint; return where to go on, (step, start) as
    `resumable_batches` takes them, and a record of the resume for the metrics ((0, 0, None)
    if there is no checkpoint yet).

    A checkpoint written on another number of ranks resumes too (elastic): every rank reads
    every rank's file; the compression memory is regrouped (`GradientSync.regroup`), a
    sharded optimizer state (--zero) put back together and re-sliced, and the data continues
    at the sample where the old run stopped (`elastic_position`)."""
    d = ckpt.latest_step_dir(cfg.checkpoint_dir)
    if d is None:
        return 0, 0, None
    shared = ckpt.load_state(ckpt.rank_file(d, 0))
    saved = shared["identity"]
    ranks = int(saved["ranks"])
    ckpt.check_identity(d, {**saved, "ranks": comm.size}, _identity(cfg, comm))
    model.load_state_dict(shared["model"])
    step, start = elastic_position(loader, int(shared["step"]), ranks)
    record = {"step": step, "ranks": comm.size, "resumed_from_step": int(shared["step"]),
              "resumed_from_ranks": ranks}
    if ranks == comm.size:
        mine = shared if comm.rank == 0 else ckpt.load_state(ckpt.rank_file(d, comm.rank))
        opt.load_state_dict((mine if cfg.zero else shared)["optimizer"])
        dp.load_sync_state_dict(mine["sync"])
        if sched is not None:
            sched.load_state_dict(shared["scheduler"])
        return step, start, record
    files = [shared] + [ckpt.load_state(ckpt.rank_file(d, r)) for r in range(1, ranks)]
    if cfg.zero:
        opt.load_shards([f["optimizer"] for f in files])
    else:
        opt.load_state_dict(shared["optimizer"])
    dp.load_sync_state_dict(dp.sync.regroup([f["sync"] for f in files]))
    if sched is not None:  # this run's schedule (over its total steps), at its step
        sched.seek(step)
    return step, start, record


def main(argv: list[str] | None = None) -> int:
    failfast.install()
    cfg = from_args(parser().parse_args(argv))
    summary = run(cfg)
    comm = Communicator()
    if comm.rank == 0:
        print(f"final test accuracy {summary['test_acc']:.4f} (test loss "
              f"{summary['test_loss']:.4f}) after {summary['steps']} steps on {summary['ranks']} "
              f"rank{'s' if summary['ranks'] > 1 else ''} in {summary['seconds']:.1f} s "
              f"({summary['samples_per_s']:.0f} samples/s; optimizer state "
              f"{summary['optimizer_state_bytes'] / 2**20:.2f} MiB per rank)")
    return 0
