"""launch/emulated-cluster: argument checks anywhere; with root, ip netns and tc, the whole
up 2 / shape / run / status / down cycle, which must leave no namespace behind."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

CLUSTER = Path(__file__).resolve().parents[1] / "launch" / "emulated-cluster"
PREFIX = f"t{os.getpid() % 100000}"  # a cluster of its own, whatever else is up


def cluster(*args: str, env: dict[str, str], timeout: float = 120
            ) -> subprocess.CompletedProcess:
    return subprocess.run([str(CLUSTER), *args], env={**env, "DISTAD_CLUSTER": PREFIX},
                          capture_output=True, text=True, timeout=timeout)


def namespaces() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [ln.split()[0] for ln in out.splitlines() if ln.strip()]


def why_no_cluster() -> str | None:
    """The reason the cluster cannot be built here, or None if it can."""
    if os.geteuid() != 0:
        return "needs root (network namespaces and tc)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"needs {tool} (iproute2)"
    probe = f"{PREFIX}-probe"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"cannot create a network namespace: {made.stderr.strip()}"
    try:
        qdisc = subprocess.run(["ip", "netns", "exec", probe, "tc", "qdisc", "add", "dev", "lo",
                                "root", "handle", "1:", "htb"], capture_output=True, text=True)
        if qdisc.returncode != 0:
            return f"tc cannot add an HTB qdisc: {qdisc.stderr.strip()}"
    finally:
        subprocess.run(["ip", "netns", "delete", probe], capture_output=True)
    return None


def test_usage_lists_the_five_commands(launch_env):
    res = cluster("--help", env=launch_env)
    assert res.returncode == 0
    for word in ("up N", "shape RATE", "status", "run NP CMD", "down"):
        assert word in res.stdout


@pytest.mark.parametrize("args, message", [
    (["up", "0"], "N must be 1..250"),
    (["up", "many"], "N must be 1..250"),
    (["shape", "fast"], "RATE is a tc rate"),
    (["run", "x", "true"], "NP must be a positive integer"),
    (["frobnicate"], "usage"),
])
def test_bad_arguments_are_refused_before_anything_is_touched(launch_env, args, message):
    res = cluster(*args, env=launch_env)
    assert res.returncode != 0
    assert message in res.stderr


def test_a_bad_cluster_name_is_refused(launch_env):
    res = subprocess.run([str(CLUSTER), "status"], env={**launch_env, "DISTAD_CLUSTER": "Bad/1"},
                         capture_output=True, text=True)
    assert res.returncode == 2 and "DISTAD_CLUSTER must be" in res.stderr


REASON = why_no_cluster()
needs_cluster = pytest.mark.skipif(REASON is not None, reason=f"emulated cluster: {REASON}")

ALLREDUCE = """
import numpy as np
from mpi4py import MPI
c = MPI.COMM_WORLD
x = np.full(1 << 20, c.rank + 1, np.float32)      # 4 MiB per rank
c.Allreduce(MPI.IN_PLACE, x)
print(f"rank {c.rank}/{c.size} sum {x[0]:.0f}", flush=True)
"""


@needs_cluster
def test_up_shape_run_status_down_leaves_no_namespace(launch_env, mpiexec):
    env = {**launch_env, "MPIEXEC": str(mpiexec)}
    try:
        up = cluster("up", "2", env=env)
        assert up.returncode == 0, up.stderr
        assert {f"{PREFIX}-sw", f"{PREFIX}-h0", f"{PREFIX}-h1"} <= set(namespaces())
        again = cluster("up", "2", env=env)
        assert again.returncode != 0 and "already up" in again.stderr

        shaped = cluster("shape", "1gbit", env=env)
        assert shaped.returncode == 0, shaped.stderr

        run = cluster("run", "2", sys.executable, "-c", ALLREDUCE, env=env, timeout=60)
        assert run.returncode == 0, run.stdout + run.stderr
        # Ranks' lines may interleave on the way through hydra: match, do not split.
        assert sorted(re.findall(r"rank (\d)/2 sum 3", run.stdout)) == ["0", "1"], run.stdout

        too_many = cluster("run", "3", "true", env=env)
        assert too_many.returncode != 0 and "the cluster has 2" in too_many.stderr

        status = cluster("status", "--raw", env=env)
        assert status.returncode == 0, status.stderr
        rows = [ln.split("\t") for ln in status.stdout.splitlines()[1:]]
        assert [r[0] for r in rows] == ["h0", "h1"] and all(r[3] == "1gbit" for r in rows)
        # Each rank sent its 4 MiB to the other over its shaped link, and received as much.
        for r in rows:
            assert int(r[4]) > 4 << 20 and int(r[5]) > 4 << 20, rows

        human = cluster("status", env=env)
        assert "198.18.0.1" in human.stdout and "bytes host->sw" in human.stdout

        # No route leaves the cluster.
        routes = subprocess.run(["ip", "-n", f"{PREFIX}-h0", "route"], capture_output=True,
                                text=True).stdout
        assert "default" not in routes and "198.18.0.0/24" in routes
    finally:
        down = cluster("down", env=env)
    assert down.returncode == 0, down.stderr
    assert not [ns for ns in namespaces() if ns.startswith(f"{PREFIX}-")]


@needs_cluster
def test_down_without_a_cluster_is_harmless_and_status_says_none_is_up(launch_env):
    assert cluster("down", env=launch_env).returncode == 0
    res = cluster("status", env=launch_env)
    assert res.returncode != 0 and "no cluster" in res.stderr
