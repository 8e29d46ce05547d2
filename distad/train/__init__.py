"""The training job behind `distad train`: config, loop, metrics, checkpoints."""

from .checkpoint import CheckpointError, load_state, save_state
from .config import TrainConfig
from .job import build_model, load_dataset, run

__all__ = ["CheckpointError", "TrainConfig", "build_model", "load_dataset", "load_state", "run",
           "save_state"]
