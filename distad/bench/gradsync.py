"""The DataParallel gradient sync against one raw Allreduce of the same bytes.

Bucketing should make synchronising a model's gradients cost about one
Allreduce of a flat buffer as large as the model (Horovod's tensor fusion):
this measures both in the same run, interleaved, on every rank, plus a full
training step with and without overlapping communication with backward.
Used by `distad bench collectives --model-params N`.
"""

from __future__ import annotations

import numpy as np

import distad as ad

from ..comm import Communicator
from .collectives import interleaved_times


def model_with(n_params: int, seed: int = 0) -> ad.nn.Module:
    """An MLP of about n_params float32 parameters in 4 layers (many tensors, as in real models)."""
    w = int(np.sqrt(n_params / 4.5))  # 2w^2 + 2w^2 + w^2/2 weights
    sizes = [w, 2 * w, w, w // 2, 10]
    rng = np.random.default_rng(seed)
    layers = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [ad.nn.Linear(a, b, rng=rng), ad.nn.ReLU()]
    return ad.nn.Sequential(*layers[:-1])


def bench_sync(comm: Communicator, n_params: int, repeats: int = 20,
               bucket_mb: float = 25.0) -> dict:
    """Median seconds (slowest rank) of dp.sync_gradients() and of one in-place Allreduce of a
    flat float32 buffer with the same number of elements, measured in alternation."""
    model = model_with(n_params)
    dp = ad.parallel.DataParallel(model, comm, bucket_mb=bucket_mb, overlap=True)
    params = list(model.parameters())
    n = sum(p.size for p in params)
    rng = np.random.default_rng(comm.rank)
    grads = [rng.standard_normal(p.shape).astype(np.float32) for p in params]
    flat = np.concatenate([g.ravel() for g in grads])

    def sync():
        for p, g in zip(params, grads):
            p.grad = g
        dp.sync_gradients()

    def buckets_only():
        # The fusion layer alone: gradients already in the buckets (as after backward's
        # hooks), then launch in order on the comm thread, wait, publish the averaged views.
        dp._arm()
        for b in dp.buckets:
            b.ready[:] = True
            b.pending = 0
        dp._launch_in_order()
        dp._finish()

    def raw():
        from mpi4py import MPI

        comm.mpi.Allreduce(MPI.IN_PLACE, flat)

    times = interleaved_times(comm, [raw, buckets_only, sync], repeats)
    med = np.median(times, axis=1)
    dp.close()
    return {"params": int(n), "bytes": int(n * 4), "buckets": len(dp.buckets),
            "raw_allreduce_s": float(med[0]), "dp_buckets_s": float(med[1]),
            "dp_sync_s": float(med[2]), "buckets_ratio": float(med[1] / med[0]),
            "ratio": float(med[2] / med[0])}


def bench_overlap(comm: Communicator, n_params: int, batch: int = 64, repeats: int = 10) -> dict:
    """Median seconds of one training step (forward, backward, sync) with overlap on and off."""
    steps = {}
    for overlap in (True, False):
        model = model_with(n_params)
        dp = ad.parallel.DataParallel(model, comm, overlap=overlap, bucket_mb=4.0)
        d_in = model[0].weight.shape[1]
        X = np.random.default_rng(comm.rank).standard_normal((batch, d_in)).astype(np.float32)
        y = np.arange(batch) % 10

        def step(dp=dp, X=X, y=y):
            dp.zero_grad()
            ad.nn.functional.cross_entropy(dp(X), y).backward()

        steps[overlap] = (step, dp)
    times = interleaved_times(comm, [steps[True][0], steps[False][0]], repeats)
    for _, dp in steps.values():
        dp.close()
    med = np.median(times, axis=1)
    return {"overlap_s": float(med[0]), "no_overlap_s": float(med[1]),
            "ratio": float(med[0] / med[1])}


def bench_gloo(comm: Communicator, n_params: int, repeats: int = 20) -> dict | None:
    """PyTorch's gloo all_reduce of the same float32 bytes, for comparison (None without torch).

    The process group is formed from the MPI ranks over TCP on the loopback
    (rank 0 picks a free port and broadcasts it), so it measures gloo on the
    same machine and ranks as the MPI rows.
    """
    try:
        import torch
        import torch.distributed as dist
    except ImportError:
        return None
    import os
    import socket

    port = np.zeros(1, np.int64)
    if comm.rank == 0:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port[0] = s.getsockname()[1]
    comm.bcast(port)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ["MASTER_PORT"] = str(int(port[0]))
    dist.init_process_group("gloo", rank=comm.rank, world_size=comm.size)
    try:
        t = torch.from_numpy(np.random.default_rng(comm.rank).standard_normal(n_params)
                             .astype(np.float32))
        times = interleaved_times(comm, [lambda: dist.all_reduce(t)], repeats)
    finally:
        dist.destroy_process_group()
    return {"gloo_allreduce_s": float(np.median(times[0])), "torch": torch.__version__}
