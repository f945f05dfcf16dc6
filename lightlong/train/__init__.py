"""Training: synthetic tasks and packed text, the loop, checkpoints, several processes."""

from .config import TrainConfig
from .data import Batch, SyntheticData, SyntheticTask, TextData
from .loop import NonFiniteLossError, Trainer

__all__ = [
    "Batch",
    "NonFiniteLossError",
    "SyntheticData",
    "SyntheticTask",
    "TextData",
    "TrainConfig",
    "Trainer",
]
