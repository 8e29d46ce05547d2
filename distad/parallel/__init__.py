"""Parallelism over MPI: data parallelism (pipeline and tensor parallelism are on the way)."""

from .data_parallel import DataParallel, StepStats
from .functional import value_and_grad
from .sync import AllreduceMean, GradientSync, make_sync

__all__ = ["DataParallel", "StepStats", "value_and_grad", "AllreduceMean", "GradientSync",
           "make_sync"]
