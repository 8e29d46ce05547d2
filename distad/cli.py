"""The `distad` command: `distad train`, `distad bench <what>`, `distad study <what>`.

Each subcommand lives with the code it drives and exposes `main(argv) -> int`;
this module only dispatches, so `distad --help` stays fast and MPI-free.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "train": "distad.train.job",
    "bench engine": "distad.bench.engine",
    "bench collectives": "distad.bench.collectives",
    "bench compress": "distad.bench.compress",
    "bench pipeline": "distad.bench.pipeline",
    "bench scaling": "distad.bench.scaling",
    "bench optim": "distad.bench.optim",
    "study compress": "distad.train.study",
}

USAGE = """usage: distad <command> [options]

commands:
  train                 a (data-)parallel training job; run under mpiexec for several ranks
  bench engine          the autodiff engine against hand-written numpy
  bench collectives     MPI collectives and the DataParallel gradient sync
  bench compress        encode+decode throughput of every compressor
  bench pipeline        pipeline bubble vs (p-1)/(m+p-1); activation memory GPipe vs 1F1B
  bench scaling         weak/strong scaling sweeps with the cost model's predictions
  bench optim           one optimizer update against the same formulas on whole arrays
  study compress        the same training job for several compressors: table and plots

`distad <command> --help` describes each command's options."""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    for words in (2, 1):
        key = " ".join(argv[:words])
        if key in COMMANDS:
            try:
                module = importlib.import_module(COMMANDS[key])
            except ModuleNotFoundError as e:
                if e.name == COMMANDS[key]:
                    print(f"distad: '{key}' is not available in this version", file=sys.stderr)
                    return 2
                raise
            return int(module.main(argv[words:]) or 0)
    print(f"distad: unknown command {' '.join(argv[:2])!r}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
