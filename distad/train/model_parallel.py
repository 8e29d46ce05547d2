"""`distad train --parallel pp|tp|dp,pp|dp,tp|pp,tp|dp,pp,tp`: training with model parallelism.

The ranks form a `grid`: with pipeline parallelism (pp) each pipeline cuts
the model into stages, one per rank, and trains with `--microbatches`
micro-batches per step (schedule 1F1B unless the config says otherwise);
with tensor parallelism (tp) every Linear pair of the MLP is split
Megatron-style over the tp ranks (within each stage, when both are used).
With dp, each pipeline (or tp group) is a data-parallel replica: it trains on
its shard of the epoch and DataParallel averages gradients over the replicas.
`--batch-size` is the batch of one replica, so the global batch is dp x batch-size.

Every rank builds the same model from the seed, keeps its part, and writes
its own share of each checkpoint (parameters and optimizer state of its
part). Rank 0 writes the metrics, the summary and, at the end, the whole
model gathered from the parts — the same files as the data-parallel job.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

import distad as ad

from ..comm import Communicator
from ..data import ArrayDataset, DataLoader, DistributedSampler
from ..parallel import (
    DataParallel,
    Grid,
    PipelineParallel,
    grid,
    tensor_parallel,
    tensor_parallel_state_dict,
)
from ..parallel.pipeline import partition_by_parameters
from . import checkpoint as ckpt
from .config import TrainConfig
from .job import (
    RESUME_KEYS,
    Metrics,
    build_model,
    load_dataset,
    make_optimizer,
    make_schedule,
)
from .loop import (
    FaultInjection,
    SynchronisedGC,
    checkpoint_due,
    largest_optimizer_state,
    progress_bar,
    resumable_batches,
)

__all__ = ["parse_parallel", "run_model_parallel"]

AXES = ("dp", "pp", "tp")


def parse_parallel(spec: str, world_size: int) -> dict[str, int]:
    """Grid sizes {"dp", "pp", "tp"} from a --parallel spec and the number of ranks.

    A spec names axes, optionally with sizes: "pp", "tp", "dp,pp", "pp,tp",
    "dp=2,pp=2,tp=2". Of the axes without a size, one takes what the sized
    ones leave — dp if named, else pp, else tp — and the others get 2 (so
    "dp,pp" on 8 ranks is dp=4 x pp=2, "pp,tp" is pp=4 x tp=2). Raises
    ValueError with the reason.
    """
    sizes: dict[str, int | None] = {}
    for part in (p.strip() for p in spec.split(",")):
        name, _, value = part.partition("=")
        if name not in AXES or name in sizes:
            raise ValueError(f"--parallel {spec!r}: expected a comma-separated subset of "
                             f"{', '.join(AXES)}, each at most once, optionally =size")
        if value and not (value.isdigit() and int(value) >= 1):
            raise ValueError(f"--parallel {spec!r}: size of {name} must be a positive integer")
        sizes[name] = int(value) if value else None
    free = [a for a in ("dp", "pp", "tp") if a in sizes and sizes[a] is None]
    for a in free[1:]:
        sizes[a] = 2
    if free:
        fixed = math.prod(v for v in sizes.values() if v is not None)
        sizes[free[0]] = max(1, world_size // fixed)
    out = {a: sizes.get(a) or 1 for a in AXES}
    if math.prod(out.values()) != world_size:
        raise ValueError(f"--parallel {spec!r}: dp={out['dp']} x pp={out['pp']} x tp={out['tp']}"
                         f" = {math.prod(out.values())} ranks, but the job has {world_size}")
    return out


class _Parts:
    """The model as this rank runs it, with what the loop needs to know about it."""

    def __init__(self, cfg: TrainConfig, g: Grid, model: ad.nn.Module) -> None:
        self.g = g
        # Names, shapes and dtypes of the whole model's state, in its order (for gathering).
        self.full_layout = {k: (v.shape, v.dtype) for k, v in model.state_dict().items()}
        dp_options = {"compressor": cfg.compress, "bucket_mb": cfg.bucket_mb,
                      "first_bucket_mb": cfg.first_bucket_mb, "overlap": cfg.overlap}
        self.pipe: PipelineParallel | None = None
        self.dp: DataParallel | None = None
        if g.pp_size > 1:
            # Stages from the whole model's parameter counts, so that every tp rank cuts the
            # model at the same layers (shards may differ by a row); tp splits within stages,
            # and each tp rank of a stage talks to the same tp rank of the next one.
            balance = partition_by_parameters(
                [sum(q.size for q in layer.parameters()) for layer in model], g.pp_size)
            self.pipe = PipelineParallel(
                tensor_parallel(model, g.tp) if g.tp_size > 1 else model, g.pp,
                microbatches=cfg.microbatches, balance=balance,
                schedule=getattr(cfg, "pipeline_schedule", "1f1b"),
                data_parallel=g.dp if g.dp_size > 1 else None,
                data_parallel_options=dp_options)
            self.dp = self.pipe.data_parallel
            self.module: ad.nn.Module = self.pipe
        else:
            self.module = tensor_parallel(model, g.tp) if g.tp_size > 1 else model
            if g.dp_size > 1:
                self.dp = DataParallel(self.module, g.dp, **dp_options)
        self.net = self.dp if (self.dp is not None and self.pipe is None) else self.module
        self.params = list(self.module.parameters())
        # The one rank per replica whose loss and predictions are reported (the others hold
        # a copy of them, or nothing, in a pipeline's earlier stages).
        self.reports = g.pp_rank == g.pp_size - 1 and g.tp_rank == 0
        # Parameters whose value (and gradient) every tp rank holds: counted once in norms.
        split = (ad.parallel.ColumnParallelLinear, ad.parallel.ShardedBatchNorm)
        sharded = {id(p) for m in self.module.modules() if isinstance(m, split)
                   for p in m.parameters()}
        sharded |= {id(m.weight) for m in self.module.modules()
                    if isinstance(m, ad.parallel.RowParallelLinear)}
        self.norm_weight = [1.0 if id(p) in sharded else 1.0 / g.tp_size for p in self.params]

    def step(self, xb: np.ndarray, yb: np.ndarray) -> tuple[float, np.ndarray | None]:
        """Forward and backward of one batch: (loss, logits on a reporting rank)."""
        ce = ad.nn.functional.cross_entropy
        if self.pipe is not None:
            loss = self.pipe.train_step(xb, yb, ce, keep_output=True)
            return loss, self.pipe.last_output
        out = self.net(xb)
        loss = ce(out, yb)
        loss.backward()
        return float(loss.data), out.data

    def predict(self, x: np.ndarray) -> np.ndarray | None:
        if self.pipe is not None:
            return self.pipe.predict(x)
        with ad.no_grad():
            return self.module(x).data

    def clip(self, max_norm: float, opt: Any) -> float:
        """Clip by the norm of the whole model's gradient (all stages, shards counted once)."""
        if isinstance(opt, ad.parallel.ZeroRedundancyOptimizer):  # each replica a slice
            weight = dict(zip(map(id, self.params), self.norm_weight))
            return opt.clip_grad_norm(max_norm, weight=lambda p: weight[id(p)], comm=self.g.world)
        local = sum(w * float(np.vdot(p.grad, p.grad))
                    for w, p in zip(self.norm_weight, self.params) if p.grad is not None)
        total = self.g.world.allreduce(np.array([local]))[0] / self.g.dp_size
        norm = math.sqrt(total)
        coef = max_norm / (norm + 1e-6)
        if coef < 1.0:
            for p in self.params:
                if p.grad is not None:
                    p.grad = p.grad * np.asarray(coef, dtype=p.grad.dtype)
        return norm

    def full_state_dict(self) -> dict[str, np.ndarray] | None:
        """The whole model's state dict on world rank 0 (None elsewhere). Collective."""
        if self.pipe is not None and self.g.tp_size > 1:  # each stage's shards made whole first
            sd = self.pipe.full_state_dict(tensor_parallel_state_dict(self.pipe.stage_module),
                                           self.full_layout)
        elif self.pipe is not None:
            sd = self.pipe.full_state_dict()
        elif self.g.tp_size > 1:
            sd = tensor_parallel_state_dict(self.module)
        else:
            sd = self.module.state_dict()
        return sd if self.g.world.rank == 0 else None

    def close(self) -> None:
        if self.pipe is not None:
            self.pipe.close()
        elif self.dp is not None:
            self.dp.close()


class _NoParameters:
    """The optimizer of a stage that has no parameters: nothing to update or save."""

    state_nbytes = 0

    def zero_grad(self) -> None:
        pass

    def step(self) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def evaluate(parts: _Parts, X: np.ndarray, y: np.ndarray, batch: int = 512
             ) -> tuple[float, float]:
    """(mean loss, accuracy) on (X, y): each replica evaluates a disjoint slice; reduced."""
    g = parts.g
    if parts.dp is not None:
        parts.dp.broadcast_buffers()  # every replica evaluates with replica 0's statistics
    idx = np.array_split(np.arange(len(X)), g.dp_size)[g.dp_rank]
    totals = np.zeros(3)
    parts.module.eval()
    for s in range(0, len(idx), batch):
        j = idx[s:s + batch]
        logits = parts.predict(X[j])
        if parts.reports:
            loss = ad.nn.functional.cross_entropy(ad.tensor(logits), y[j])
            totals[0] += float(loss.data) * len(j)
            totals[1] += int((logits.argmax(axis=1) == y[j]).sum())
            totals[2] += len(j)
    parts.module.train()
    g.world.allreduce(totals, out=totals)
    return totals[0] / totals[2], totals[1] / totals[2]


def run_model_parallel(cfg: TrainConfig, comm: Communicator | None = None) -> dict[str, Any]:
    """Train with pipeline and/or tensor parallelism as `cfg.parallel` says; summary on every rank.

    Returns the keys of the data-parallel job's summary: ranks, steps,
    test_loss, test_acc, seconds, median_step_s, samples_per_s (global
    samples), parameters (of the whole model), config.
    """
    comm = comm if comm is not None else Communicator()
    try:
        sizes = parse_parallel(cfg.parallel, comm.size)
    except ValueError as exc:
        raise SystemExit(f"distad train: {exc}") from None
    if cfg.optimizer == "lbfgs":
        raise SystemExit("distad train: --optimizer lbfgs needs every parameter on every rank; "
                         "use sgd, adam or adamw with --parallel " + cfg.parallel)
    if sizes["pp"] > 1 and cfg.batch_size < cfg.microbatches:
        raise SystemExit(f"distad train: --batch-size {cfg.batch_size} cannot be cut into "
                         f"--microbatches {cfg.microbatches}")
    g = grid(comm=comm, **sizes)
    Xtr, Xte, ytr, yte = load_dataset(cfg)
    n_classes = int(max(ytr.max(), yte.max())) + 1
    model = build_model(cfg, Xtr.shape[1:], n_classes, g.dp)  # SyncBatchNorm: over the replicas
    n_params = int(sum(p.size for p in model.parameters()))
    parts = _Parts(cfg, g, model)
    sampler = DistributedSampler(len(Xtr), g.dp_size, g.dp_rank, shuffle=True, seed=cfg.seed)
    # An epoch's last batch is dropped only if it is too small to cut into micro-batches.
    rest = len(sampler) % cfg.batch_size
    loader = DataLoader(ArrayDataset(Xtr, ytr), cfg.batch_size, sampler=sampler,
                        drop_last=sizes["pp"] > 1 and 0 < rest < cfg.microbatches)
    steps_per_epoch = len(loader)
    total_steps = steps_per_epoch * cfg.epochs
    if cfg.max_steps:
        total_steps = min(total_steps, cfg.max_steps)
    if parts.params:
        opt = make_optimizer(cfg, parts.params, g.dp, parts.dp)  # --zero: over the replicas
        sched = make_schedule(cfg, opt, total_steps)
    else:  # a pipeline stage of parameter-free layers only (e.g. Flatten)
        opt, sched = _NoParameters(), None
    step = restore(cfg, g, parts, opt, sched) if cfg.resume else 0
    metrics = Metrics(cfg.out, comm.rank, cfg.resume)
    shape = " x ".join(f"{a}={sizes[a]}" for a in AXES if sizes[a] > 1)
    bar = progress_bar(cfg, comm.rank, total_steps, step, f"train ({shape})")

    fault = FaultInjection(comm.rank)
    t_start, window = time.perf_counter(), []
    test_loss = test_acc = float("nan")
    with SynchronisedGC(cfg.gc_every) as collector:
        try:
            for epoch, xb, yb in resumable_batches(loader, step, steps_per_epoch, total_steps):
                t0 = time.perf_counter()
                opt.zero_grad()
                loss, logits = parts.step(xb, yb)
                if cfg.clip:
                    parts.clip(cfg.clip, opt)
                opt.step()
                if sched is not None:
                    sched.step()
                step += 1
                local = np.zeros(3)
                if parts.reports:
                    local[:] = (loss * len(yb), float((logits.argmax(1) == yb).sum()), len(yb))
                comm.allreduce(local, out=local)
                dt = time.perf_counter() - t0
                window.append((dt, local[2]))
                collector.after_step(step)
                record = {"step": step, "epoch": epoch, "loss": local[0] / local[2],
                          "train_acc": local[1] / local[2], "step_s": dt,
                          "samples_per_s": local[2] / dt}
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{record['loss']:.4f}", acc=f"{record['train_acc']:.3f}",
                                    refresh=False)
                if step % cfg.log_every == 0:
                    metrics.write(record)
                end_of_epoch = step % steps_per_epoch == 0 or step == total_steps
                if checkpoint_due(cfg, step, end_of_epoch):
                    save(cfg, g, step, parts, opt, sched)
                fault.after_step(step)
                if end_of_epoch:
                    test_loss, test_acc = evaluate(parts, Xte, yte)
                    metrics.write({"step": step, "epoch": epoch, "test_loss": test_loss,
                                   "test_acc": test_acc})
                    if bar is not None:
                        bar.write(f"epoch {epoch + 1}: test loss {test_loss:.4f}, "
                                  f"test accuracy {test_acc:.4f}")
            state = parts.full_state_dict()
        finally:
            if bar is not None:
                bar.close()
            parts.close()
    elapsed = time.perf_counter() - t_start
    steps_s = [w[0] for w in window]
    summary = {"ranks": comm.size, "steps": step, "test_loss": test_loss, "test_acc": test_acc,
               "seconds": elapsed, "median_step_s": float(np.median(steps_s)) if steps_s else 0,
               "samples_per_s": sum(w[1] for w in window) / max(sum(steps_s), 1e-12),
               "parameters": n_params, "config": cfg.as_dict(),
               "optimizer_state_bytes": largest_optimizer_state(opt, comm)}
    if cfg.out and comm.rank == 0:
        Path(cfg.out).mkdir(parents=True, exist_ok=True)
        (Path(cfg.out) / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        ckpt.save_state(Path(cfg.out) / "model.npz", {"model": state})
    g.free()
    return summary


# ---- checkpoints: every rank writes (and reads) its own part -------------------------------------

def _identity(cfg: TrainConfig, g: Grid) -> dict[str, Any]:
    keep = (*RESUME_KEYS, "parallel", "microbatches")
    return {"ranks": g.world.size, "grid": [g.dp_size, g.pp_size, g.tp_size],
            **{k: getattr(cfg, k) for k in keep}}


def save(cfg: TrainConfig, g: Grid, step: int, parts: _Parts, opt, sched) -> None:
    """Each rank writes its part's state for `step`; rank 0 then commits the checkpoint."""
    d = ckpt.step_dir(cfg.checkpoint_dir, step)
    state: dict[str, Any] = {"step": step, "identity": _identity(cfg, g),
                             "model": parts.module.state_dict(), "optimizer": opt.state_dict(),
                             "scheduler": sched.state_dict() if sched is not None else {},
                             "sync": parts.dp.sync_state_dict() if parts.dp is not None else {}}
    ckpt.save_state(ckpt.rank_file(d, g.world.rank), state)
    g.world.barrier()
    if g.world.rank == 0:
        ckpt.commit_latest(cfg.checkpoint_dir, step)
    g.world.barrier()


def restore(cfg: TrainConfig, g: Grid, parts: _Parts, opt, sched) -> int:
    """Load this rank's part of the newest complete checkpoint; its step (0 if none)."""
    d = ckpt.latest_step_dir(cfg.checkpoint_dir)
    if d is None:
        return 0
    mine = ckpt.load_state(ckpt.rank_file(d, g.world.rank))
    ckpt.check_identity(d, mine["identity"], _identity(cfg, g))
    parts.module.load_state_dict(mine["model"])
    opt.load_state_dict(mine["optimizer"])
    if sched is not None:
        sched.load_state_dict(mine["scheduler"])
    if parts.dp is not None:
        parts.dp.load_sync_state_dict(mine["sync"])
    return int(mine["step"])
