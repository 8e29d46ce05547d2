"""Parallelism over MPI: data parallelism (and, later, pipeline and tensor parallelism)."""

from .data_parallel import DataParallel, StepStats
from .functional import value_and_grad
from .pipeline import PipelineParallel, partition_by_parameters, pipeline_schedule
from .sync import AllreduceMean, GradientSync, make_sync

__all__ = ["DataParallel", "StepStats", "value_and_grad", "AllreduceMean", "GradientSync",
           "make_sync"]
__all__ += ["PipelineParallel", "partition_by_parameters", "pipeline_schedule"]
