"""The configuration of a training job and its command line (`distad train --help`)."""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass, fields


@dataclass
class TrainConfig:
    """Everything that determines a run; the same config and seed give the same result."""

    model: str = "mlp"
    hidden: str = "128"
    norm: str = "none"           # none, batch or sync: BatchNorm after every hidden layer
    dataset: str = "digits"
    samples: int = 4096          # synthetic data set size
    features: int = 64           # synthetic data set width
    classes: int = 10            # synthetic data set classes
    test_size: float = 0.2
    epochs: int = 10
    batch_size: int = 32         # per rank
    accumulate: int = 1          # micro-batches per batch, gradients synchronised once
    optimizer: str = "sgd"
    zero: bool = False           # shard the optimizer state and gradients over the ranks (ZeRO)
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 0.0
    schedule: str = "cosine"
    warmup_steps: int = 0
    clip: float = 0.0
    compress: str = "none"
    grad_error_every: int = 0    # steps; also average the exact gradient, log the error
    bucket_mb: float = 25.0
    first_bucket_mb: float = 1.0
    overlap: bool = True
    parallel: str = "dp"
    microbatches: int = 1
    pipeline_schedule: str = "1f1b"
    checkpoint_dir: str = ""
    checkpoint_every: int = 0    # steps; 0: at the end of every epoch
    resume: bool = False
    out: str = ""
    seed: int = 0
    gc_every: int = 50
    log_every: int = 10
    max_steps: int = 0           # stop after this many steps (0: run all epochs)
    trace: str = ""              # write a Chrome trace (timeline) of the run here
    eval_every: int = 0          # steps between evaluations (0: at the end of every epoch)
    progress: bool = True

    def as_dict(self) -> dict:
        return asdict(self)

    @property
    def hidden_sizes(self) -> list[int]:
        return [int(h) for h in self.hidden.split(",") if h]


HELP = {
    "model": "mlp or cnn", "hidden": "hidden layer widths of the MLP, e.g. 128 or 512,512",
    "norm": "none, batch or sync: BatchNorm after every hidden Linear (mlp) or convolution "
    "(cnn); batch normalises each rank's shard alone and uses rank 0's running statistics, "
    "sync (SyncBatchNorm) the statistics of all ranks' batches together (not with pp)",
    "dataset": "digits (bundled, 1,797 8x8 images), synthetic, or a .npz file of your own "
    "(arrays X and y, or X_train, y_train, X_test, y_test; y: class labels 0..C-1)",
    "samples": "size of the synthetic data set", "features": "width of the synthetic data set",
    "classes": "classes of the synthetic data set", "test_size": "held-out fraction",
    "batch_size": "samples per rank per step (global batch = ranks x this)",
    "optimizer": "sgd, adam, adamw or lbfgs",
    "zero": "shard the optimizer state over the ranks, each updating its shard of the "
    "parameters (ZeRO: Adam's moments take 1/ranks of the memory; uncompressed gradients are "
    "reduce-scattered, so a step moves one allreduce's bytes; over the dp replicas of "
    "--parallel, not lbfgs)",
    "schedule": "none, step or cosine (per step)",
    "clip": "clip the global gradient norm to this (0: off)",
    "compress": "gradient compression spec, e.g. none, fp16, topk:0.01+ef, powersgd:2+ef",
    "grad_error_every": "every N steps also average the exact gradient (one more float32 "
    "allreduce) and log the relative error and cosine of the compressed average against it "
    "(grad_error, grad_cosine; 0: never)",
    "parallel": "dp (data parallel), pp (pipeline: one stage per rank), tp (tensor-parallel "
    "Linear pairs), or any combination (dp,pp; dp,tp; pp,tp: tensor-parallel stages; "
    "dp,pp,tp); an axis without a size gets 2, the first of dp, pp, tp the rest; sized specs "
    "like dp=2,pp=2 also work",
    "microbatches": "micro-batches per step (pipeline parallelism)",
    "accumulate": "cut each rank's batch into this many micro-batches and accumulate their "
    "gradients, synchronising once per step (less activation memory, the same gradient; "
    "--parallel dp)",
    "pipeline_schedule": "gpipe or 1f1b (with pp in --parallel)",
    "checkpoint_dir": "write checkpoints here", "checkpoint_every": "steps between checkpoints "
    "(0: every epoch)", "resume": "continue from the newest checkpoint in --checkpoint-dir "
    "(data-parallel: also on another number of ranks, from the sample it stopped at)",
    "out": "write metrics.jsonl, summary.json and model.npz here (rank 0)",
    "gc_every": "run Python's cyclic GC on every rank at once every N steps (0: never)",
    "max_steps": "stop after this many steps in total (0: all epochs)",
    "overlap": "overlap gradient communication with backward", "progress": "progress bar",
    "eval_every": "evaluate on the held-out split every N steps as well as at the end of "
    "every epoch (0: per epoch only); for time-to-accuracy curves",
    "trace": "write a timeline of every step (Chrome trace JSON: compute, compress, "
    "communicate, wait per bucket and rank) to this file",
}

CHOICES = {"model": ("mlp", "cnn"), "norm": ("none", "batch", "sync"),
           "optimizer": ("sgd", "adam", "adamw", "lbfgs"), "schedule": ("none", "step", "cosine"),
           "pipeline_schedule": ("gpipe", "1f1b")}


def parser(prog: str = "distad train") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Train a model with data, pipeline or "
                                "tensor parallelism over MPI (run under mpiexec for several "
                                "ranks).")
    add_arguments(p)
    return p


def add_arguments(p: argparse.ArgumentParser) -> None:
    defaults = TrainConfig()
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        if isinstance(default, bool):
            p.add_argument(flag, default=default, action=argparse.BooleanOptionalAction,
                           help=HELP.get(f.name))
        else:
            p.add_argument(flag, type=type(default), default=default, choices=CHOICES.get(f.name),
                           help=f"{HELP.get(f.name, f.name.replace('_', ' '))} (default {default})")


def from_args(args: argparse.Namespace) -> TrainConfig:
    cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)})
    if cfg.resume and not cfg.checkpoint_dir:
        raise SystemExit("distad train: --resume needs --checkpoint-dir")
    if cfg.dataset not in ("digits", "synthetic") and not cfg.dataset.endswith(".npz"):
        raise SystemExit(f"distad train: --dataset must be digits, synthetic or a .npz file, "
                         f"got {cfg.dataset!r}")
    if cfg.accumulate < 1 or (cfg.accumulate > 1 and cfg.parallel != "dp"):
        raise SystemExit("distad train: --accumulate must be >= 1, and above 1 only with "
                         "--parallel dp (a pipeline cuts batches with --microbatches)")
    if cfg.zero and ("dp" not in cfg.parallel.split(",") or cfg.optimizer == "lbfgs"):
        raise SystemExit("distad train: --zero shards over the data-parallel replicas: it "
                         "needs dp in --parallel, and sgd, adam or adamw")
    if cfg.grad_error_every < 0 or (cfg.grad_error_every and cfg.parallel != "dp"):
        raise SystemExit("distad train: --grad-error-every must be >= 0, and above 0 only with "
                         "--parallel dp (the data-parallel job logs it)")
    if cfg.grad_error_every and cfg.zero and cfg.compress == "none":
        raise SystemExit("distad train: --grad-error-every measures a compressor's error; with "
                         "--zero and no --compress each rank has only its slice of the exact "
                         "average, with nothing to compare")
    if cfg.batch_size < 1 or cfg.epochs < 1:
        raise SystemExit("distad train: --batch-size and --epochs must be at least 1")
    if cfg.norm != "none" and "pp" in cfg.parallel:
        raise SystemExit(f"distad train: --norm {cfg.norm} does not work with pipeline "
                         f"parallelism (--parallel {cfg.parallel}): its statistics would be "
                         f"those of micro-batches, not batches")
    return cfg
