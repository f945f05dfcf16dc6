"""Training: synthetic tasks and packed text, the loop, checkpoints, several processes."""

from .config import ParallelConfig, TrainConfig
from .data import Batch, SyntheticData, SyntheticTask, TextData
from .loop import NonFiniteLossError, Trainer

__all__ = [
    "Batch",
    "NonFiniteLossError",
    "ParallelConfig",
    "SyntheticData",
    "SyntheticTask",
    "TextData",
    "TrainConfig",
    "Trainer",
]
