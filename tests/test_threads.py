"""Ranks started by an MPI launcher get cores // local-ranks BLAS threads, unless told otherwise."""

import os
import subprocess
import sys

PROBE = "import distad, os; print(os.environ.get('OPENBLAS_NUM_THREADS'))"


def _run(extra):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PMI", "MPI_", "OMPI", "PMIX", "SLURM"))
           and k not in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}
    env.update(extra)
    r = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def test_a_rank_under_a_launcher_gets_its_share_of_the_cores():
    cores = len(os.sched_getaffinity(0))
    assert _run({"PMI_SIZE": "4", "MPI_LOCALNRANKS": "4"}) == str(max(1, cores // 4))


def test_the_users_setting_wins():
    assert _run({"PMI_SIZE": "4", "MPI_LOCALNRANKS": "4", "OPENBLAS_NUM_THREADS": "7"}) == "7"


def test_without_a_launcher_nothing_is_changed():
    assert _run({}) == "None"
