"""`distad bench collectives` in one process: the nccl-tests figures and the timing helpers."""

from __future__ import annotations

import argparse
import json
import time

import pytest
from mpi4py import MPI

from distad.bench.collectives import (
    bus_factor,
    interleaved_times,
    main,
    parse_size,
    time_collective,
)
from distad.comm import Communicator


def test_bus_factors_are_those_of_nccl_tests():
    # nccl-tests doc/PERFORMANCE.md: allreduce 2(n-1)/n, allgather and
    # reduce_scatter (n-1)/n, broadcast 1.
    assert bus_factor("allreduce", 4) == 1.5
    assert bus_factor("iallreduce", 2) == 1.0
    assert bus_factor("allgather", 4) == 0.75
    assert bus_factor("reduce_scatter", 8) == 0.875
    assert bus_factor("bcast", 4) == 1.0
    with pytest.raises(ValueError, match="unknown op 'gather'"):
        bus_factor("gather", 4)


def test_parse_size_reads_binary_units():
    assert [parse_size(s) for s in ["4", "64K", "1M", "64MB", "1g"]] == [
        4, 65536, 1 << 20, 64 << 20, 1 << 30]
    with pytest.raises(argparse.ArgumentTypeError, match="bad size '1.5M'"):
        parse_size("1.5M")


def test_time_collective_is_the_median_of_the_slowest_rank():
    comm = Communicator(MPI.COMM_SELF)
    seconds = time_collective(comm, lambda: time.sleep(0.002), repeats=5, warmup=0)
    assert 0.002 <= seconds < 0.1


def test_interleaved_times_keep_one_row_per_callable():
    comm = Communicator(MPI.COMM_SELF)
    calls = []
    times = interleaved_times(comm, [lambda: calls.append("a"),
                                     lambda: (calls.append("b"), time.sleep(0.002))],
                              repeats=3, warmup=1)
    assert times.shape == (2, 3)
    assert calls == ["a", "b"] + ["a", "b", "b", "a", "a", "b"]  # warmup, then rotating order
    assert (times[1] >= 0.002).all() and (times[0] < times[1]).all()


def test_main_prints_a_markdown_table_and_writes_json(tmp_path, capsys):
    path = tmp_path / "collectives.json"
    assert main(["--sizes", "4,8,1K", "--repeats", "2", "--dtype", "float64",
                 "--ops", "allreduce,allgather,reduce_scatter,alltoall,bcast",
                 "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "| op | bytes | repeats | time (us) | raw MPI (us) |" in out
    data = json.loads(path.read_text())
    assert data["dtype"] == "float64"
    # 4 B is less than one float64: it rounds up to the 8 B case, measured once.
    assert [(r["op"], r["bytes"]) for r in data["rows"]] == [
        (op, n) for op in ["allreduce", "allgather", "reduce_scatter", "alltoall", "bcast"]
        for n in (8, 1024)]
    for r in data["rows"]:
        assert r["algbw_gbs"] == pytest.approx(r["bytes"] / r["time_s"] / 1e9)


def test_main_rejects_an_unknown_op():
    with pytest.raises(SystemExit) as exc:
        main(["--ops", "allreduce,gather"])
    assert exc.value.code == 2
