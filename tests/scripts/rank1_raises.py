"""Rank 1 raises while rank 0 blocks in a collective; launched by tests/test_comm_failfast.py.

Usage: mpiexec -n 2 python tests/scripts/rank1_raises.py MODE
MODE says how fail-fast is set up and where the exception comes from:
  hook      failfast.install(); rank 1 raises in the main thread
  thread    failfast.install(); rank 1 raises in a worker thread, its main
            thread then waits for a message that never comes
  context   `with failfast.abort_on_exception():` around the work
  early     failfast.install(); rank 1 raises before MPI is initialised
  none      no fail-fast at all (the job hangs: the test's negative control)
Run without mpiexec (one rank), rank 0 raises instead, to show the size-1 path.
Rank 0 prints "rank 0 passed the barrier" if it ever gets through (it must not).
"""

import os
import sys
import threading
import time

MODE = sys.argv[1] if len(sys.argv) > 1 else "hook"
# The launcher's rank, known before MPI is initialised (needed by "early").
LAUNCHER_RANK = int(os.environ.get("PMI_RANK", os.environ.get("OMPI_COMM_WORLD_RANK", "0")))
LAUNCHER_SIZE = int(os.environ.get("PMI_SIZE", os.environ.get("OMPI_COMM_WORLD_SIZE", "1")))
FAILING_RANK = 1 if LAUNCHER_SIZE > 1 else 0


def fail() -> None:
    time.sleep(0.3)  # let rank 0 get into its collective first
    raise RuntimeError(f"rank {FAILING_RANK} failed on purpose")


def work() -> None:
    import numpy as np

    from distad.comm import Communicator

    comm = Communicator()
    if comm.rank == FAILING_RANK:
        if MODE == "thread":
            worker = threading.Thread(target=fail, name="grad-sync")
            worker.start()
            worker.join()
            comm.recv(np.empty(1), source=0, tag=7)  # never sent: blocks without fail-fast
        else:
            fail()
    comm.barrier()
    print(f"rank {comm.rank} passed the barrier", flush=True)


def main() -> None:
    from distad.comm import failfast

    if MODE == "early":
        failfast.install()
        if LAUNCHER_RANK == FAILING_RANK:
            fail()  # before anything imported mpi4py.MPI
        work()
    elif MODE == "context":
        with failfast.abort_on_exception():
            work()
    elif MODE in ("hook", "thread"):
        failfast.install()
        failfast.install()  # idempotent: must not chain the hook twice
        work()
    else:
        work()


if __name__ == "__main__":
    main()
