"""Fail fast: one rank's exception takes the whole job down, with its traceback.

pytest catches exceptions itself, so these launch tests/scripts/rank1_raises.py
in real `mpiexec -n 2` jobs, where rank 1 raises while rank 0 waits in a Barrier.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from distad.comm import failfast

SCRIPT = Path(__file__).parent / "scripts" / "rank1_raises.py"
TIMEOUT_S = 30


def launch(mpiexec: Path, env: dict[str, str], mode: str, timeout: float = TIMEOUT_S
           ) -> tuple[subprocess.CompletedProcess | None, float, str]:
    """Run the script under `mpiexec -n 2`; (result or None if it hung, seconds, output)."""
    start = time.monotonic()
    # A session of its own, so that a hung job can be killed with all its ranks.
    proc = subprocess.Popen([str(mpiexec), "-n", "2", sys.executable, str(SCRIPT), mode],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        return None, time.monotonic() - start, out
    return (subprocess.CompletedProcess(proc.args, proc.returncode, out),
            time.monotonic() - start, out)


@pytest.mark.parametrize("mode", ["hook", "thread", "context", "early"])
def test_an_exception_on_rank_1_aborts_the_job_with_its_traceback(mpiexec, launch_env, mode):
    res, seconds, out = launch(mpiexec, launch_env, mode)
    assert res is not None, f"job still running after {seconds:.0f} s:\n{out}"
    assert res.returncode != 0, out
    assert seconds < TIMEOUT_S
    assert "[rank 1/2] Traceback (most recent call last):" in out
    assert "[rank 1/2] RuntimeError: rank 1 failed on purpose" in out
    assert "passed the barrier" not in out
    if mode == "thread":
        assert "[rank 1/2] Exception in thread grad-sync:" in out
    # The hook aborts instead of falling through to Python's own, unprefixed traceback.
    assert "RuntimeError: rank 1 failed on purpose" not in out.splitlines(), out


def test_without_fail_fast_the_job_hangs(mpiexec, launch_env):
    # The negative control: the same job with no hook never finishes by itself
    # (rank 1 blocks in MPI_Finalize, rank 0 in the Barrier).
    res, _, out = launch(mpiexec, launch_env, "none", timeout=3)
    assert res is None, f"expected a hang, got exit code {res.returncode}:\n{out}"


def test_one_process_gets_the_normal_traceback_and_exit_code(launch_env):
    res = subprocess.run([sys.executable, str(SCRIPT), "hook"], capture_output=True,
                         text=True, timeout=TIMEOUT_S, env=launch_env)
    assert res.returncode == 1
    assert res.stderr.startswith("Traceback (most recent call last):")
    assert "RuntimeError: rank 0 failed on purpose" in res.stderr
    assert "[rank" not in res.stderr


def test_install_is_idempotent_and_uninstall_restores_the_hooks():
    before_sys, before_thread = sys.excepthook, threading.excepthook
    try:
        failfast.install()
        hooks = sys.excepthook, threading.excepthook
        failfast.install()
        assert (sys.excepthook, threading.excepthook) == hooks
        assert failfast.installed() and hooks != (before_sys, before_thread)
    finally:
        failfast.uninstall()
    assert (sys.excepthook, threading.excepthook) == (before_sys, before_thread)
    assert not failfast.installed()


def test_abort_on_exception_re_raises_in_one_process():
    with pytest.raises(KeyError, match="x"), failfast.abort_on_exception():
        raise KeyError("x")

    @failfast.abort_on_exception()
    def exits_cleanly() -> None:
        sys.exit(0)

    with pytest.raises(SystemExit):
        exits_cleanly()
