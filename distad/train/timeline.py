"""A timeline of training steps in Chrome's trace format (chrome://tracing, Perfetto).

Per rank: a "compute" span per step on the main thread (forward and backward,
including the gradient copies into buckets), "wait" where the main thread
waited for the last buckets, and per bucket the "compress", "communicate" and
"decompress" spans of the communication thread. Rank 0 gathers every rank's
events (as JSON bytes over MPI, no pickle) and writes one file.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from ..comm import Communicator

MAIN, COMM = 0, 1


class Timeline:
    """Collects trace events of one rank; `write` gathers and saves them on rank 0."""

    def __init__(self, comm: Communicator) -> None:
        self.comm = comm
        self.origin = time.perf_counter()
        self.events: list[dict] = [
            {"name": "thread_name", "ph": "M", "pid": comm.rank, "tid": t, "args": {"name": n}}
            for t, n in ((MAIN, "main (compute)"), (COMM, "communication"))]

    def span(self, name: str, start: float, end: float, tid: int = MAIN, **args) -> None:
        self.events.append({"name": name, "ph": "X", "pid": self.comm.rank, "tid": tid,
                            "ts": (start - self.origin) * 1e6, "dur": (end - start) * 1e6,
                            "args": args})

    def step(self, step: int, start: float, end: float, spans: list) -> None:
        """Record one training step from its start/end and DataParallel's stats.spans."""
        wait = [(s, e) for phase, _, s, e in spans if phase == "wait"]
        compute_end = wait[0][0] if wait else end
        self.span("compute", start, compute_end, step=step)
        for phase, bucket, s, e in spans:
            if phase == "wait":
                self.span("wait", s, e, step=step)
            else:
                self.span(phase, s, e, tid=COMM, step=step, bucket=bucket)

    def write(self, path: str | Path) -> None:
        """Collective: gather every rank's events; rank 0 writes the trace file."""
        mine = np.frombuffer(json.dumps(self.events).encode(), dtype=np.uint8)
        parts = self.comm.allgatherv(mine)
        if self.comm.rank == 0:
            events = [e for part in parts for e in json.loads(part.tobytes())]
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(json.dumps({"traceEvents": events,
                                              "displayTimeUnit": "ms"}))
