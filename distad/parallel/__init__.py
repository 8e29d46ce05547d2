"""Parallelism over MPI: data, pipeline and tensor parallelism, and process grids."""

from .data_parallel import DataParallel, StepStats
from .functional import value_and_grad
from .grid import Grid, grid
from .pipeline import PipelineParallel, partition_by_parameters, pipeline_schedule
from .sync import AllreduceMean, GradientSync, make_sync
from .sync_batch_norm import SyncBatchNorm
from .tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    ShardedBatchNorm,
    TensorParallelMLP,
    tensor_parallel,
    tensor_parallel_state_dict,
)
from .zero import ZeroRedundancyOptimizer

__all__ = ["DataParallel", "StepStats", "value_and_grad", "AllreduceMean", "GradientSync",
           "make_sync", "SyncBatchNorm"]
__all__ += ["PipelineParallel", "partition_by_parameters", "pipeline_schedule", "Grid", "grid",
            "ColumnParallelLinear", "RowParallelLinear", "ShardedBatchNorm", "TensorParallelMLP",
            "tensor_parallel", "tensor_parallel_state_dict", "ZeroRedundancyOptimizer"]
