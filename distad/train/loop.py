"""What every training loop here shares, whatever one step does.

The data-parallel job (`job.py`) and the model-parallel one (`model_parallel.py`)
differ in their step; the way they walk the data (resumably), keep the garbage
collector in step across ranks, show progress and decide when to checkpoint
is the same, and lives here once.
"""

from __future__ import annotations

import gc
import os
import signal
import sys
from collections.abc import Iterator
from typing import Any

import numpy as np

from ..data import DataLoader, DistributedSampler
from .config import TrainConfig


def resumable_batches(loader: Any, step: int, steps_per_epoch: int, total_steps: int,
                      start: int = 0) -> Iterator[tuple[int, Any, Any]]:
    """(epoch, xb, yb) for the steps after `step`, up to `total_steps`.

    Each epoch's order is the sampler's for that epoch, so a run resumed at
    step k skips exactly the k mod steps_per_epoch batches it had already done.
    `start` (from `elastic_position`): the entries of the first epoch's order that a run on
    another number of ranks used; that epoch then gives only the batches of the rest.
    """
    while step < total_steps:
        epoch, skip = divmod(step, steps_per_epoch)
        loader.set_epoch(epoch)
        if start:
            loader.sampler.set_epoch(epoch, start)
            skip = start = 0
        for i, (xb, yb) in enumerate(loader):
            if i < skip:
                continue
            yield epoch, xb, yb
            step += 1
            if step >= total_steps:
                return


def elastic_position(loader: Any, step: int, ranks: int) -> tuple[int, int]:
    """Where a run that stopped after `step` steps on `ranks` ranks continues on the ranks of
    `loader` (a DataLoader over a DistributedSampler): (step, start).

    Step k on p ranks of b samples used entries [k p b, (k + 1) p b) of its epoch's order
    (`distad.data.shard_indices`); the new run skips the `start` entries the old one used of
    the epoch it stopped in and counts its steps as if it had always run on its ranks, so
    that epochs still end at multiples of its steps per epoch and a schedule over its total
    steps stands at the same fraction of the epoch. Returns (step, 0) at an epoch boundary.
    """
    sampler = loader.sampler
    if ranks == sampler.num_replicas:
        return step, 0

    def batches(p: int, start: int = 0) -> int:
        """Batches per rank in a pass over the order from `start` on p ranks."""
        shard = DistributedSampler(sampler.n, p, 0, drop_last=sampler.drop_last)
        shard.set_epoch(0, start)
        return len(DataLoader(loader.dataset, loader.batch_size, sampler=shard,
                              drop_last=loader.drop_last))

    epoch, done = divmod(step, batches(ranks))
    start = done * loader.batch_size * ranks
    if start == 0:
        return epoch * len(loader), 0
    return (epoch + 1) * len(loader) - batches(sampler.num_replicas, start), start


class SynchronisedGC:
    """Python's cyclic collector, frozen for the loop and run by hand at step boundaries.

    Collections that fire at different moments on different ranks stall the
    collectives the others wait in; the engine makes no reference cycles, so
    collecting every `every` steps, on every rank at the same step, is enough.
    """

    def __init__(self, every: int) -> None:
        self.every = every

    def __enter__(self) -> SynchronisedGC:
        gc.collect()
        gc.freeze()
        gc.disable()
        return self

    def __exit__(self, *exc: object) -> None:
        gc.enable()
        gc.unfreeze()

    def after_step(self, step: int) -> None:
        if self.every and step % self.every == 0:
            gc.collect()


def progress_bar(cfg: TrainConfig, rank: int, total: int, initial: int, desc: str):
    """Rank 0's tqdm bar on stderr (None elsewhere, or with --no-progress)."""
    if rank != 0 or not cfg.progress:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="step", file=sys.stderr,
                mininterval=0.5, dynamic_ncols=True)


def checkpoint_due(cfg: TrainConfig, step: int, end_of_epoch: bool) -> bool:
    """Every --checkpoint-every steps, or at the end of every epoch when that is 0."""
    if not cfg.checkpoint_dir:
        return False
    if cfg.checkpoint_every:
        return step % cfg.checkpoint_every == 0
    return end_of_epoch


def largest_optimizer_state(opt: Any, comm: Any) -> int:
    """The bytes of optimizer state the rank that keeps most keeps (with --zero, a shard).
    Collective over `comm`."""
    return int(comm.allreduce(np.array([opt.state_nbytes], np.int64), op="max")[0])


class FaultInjection:
    """DISTAD_KILL_AT_STEP=N: rank 0 kills itself (SIGKILL, no cleanup) right after step N
    and its checkpoint, so the tests can resume a run that really died."""

    def __init__(self, rank: int) -> None:
        self.step = int(os.environ.get("DISTAD_KILL_AT_STEP", "0")) if rank == 0 else 0

    def after_step(self, step: int) -> None:
        if step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)
