"""One BLAS thread pool per core, not per rank: set before numpy loads.

Several ranks on one node each starting a BLAS thread pool the size of the
node oversubscribes the cores, and OpenBLAS's spinning workers then make every
matmul crawl (measured here: a 64-512-512-10 MLP step went from 7 ms to 170 ms
with 2 threads per rank under load). Under an MPI launcher, and only when the
user set none of the usual variables, each rank gets cores // local ranks
threads (at least 1) — what torchrun does with OMP_NUM_THREADS. This must run
before numpy is imported; a script that imports numpy first keeps its setting.
"""

from __future__ import annotations

import os
import sys

THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
# Local rank count as MPICH (hydra), Open MPI, PMIx and Slurm publish it.
_LOCAL_SIZE_VARS = ("MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE", "PMIX_LOCAL_SIZE",
                    "SLURM_NTASKS_PER_NODE")
_WORLD_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "SLURM_NTASKS")


def limit_blas_threads() -> int | None:
    """Set the BLAS thread variables for a rank started by an MPI launcher; return the count
    set, or None if nothing was changed (no launcher, user setting, or numpy already loaded)."""
    if "numpy" in sys.modules or any(v in os.environ for v in THREAD_VARS):
        return None
    if not any(v in os.environ for v in _WORLD_VARS):
        return None
    local = next((os.environ[v] for v in _LOCAL_SIZE_VARS if os.environ.get(v, "").isdigit()),
                 "1")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    threads = max(1, (cores or 1) // max(1, int(local)))
    for v in THREAD_VARS:
        os.environ[v] = str(threads)
    return threads
