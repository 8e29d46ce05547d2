"""distad: a distributed data- and model-parallel gradient service on numpy and MPI.

`import distad as ad` gives the per-rank autodiff engine (`ad.tensor`, the ops,
`ad.grad` and friends); `ad.nn`, `ad.optim`, `ad.data`, `ad.comm`,
`ad.compress` and `ad.parallel` are the layers built on it.
"""

from ._threads import limit_blas_threads

limit_blas_threads()  # before numpy loads (see _threads.py)

from .autodiff import *  # noqa: E402, F403 — the engine's public API is distad's top level
from .autodiff import __all__ as _engine_all  # noqa: E402

__version__ = "0.1.0"
__all__ = list(_engine_all)


def __getattr__(name: str):
    # Subpackages load on first use, so `import distad` stays light and MPI-free.
    import importlib

    if name in {"nn", "optim", "data", "comm", "compress", "parallel", "train", "bench"}:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'distad' has no attribute {name!r}")
