"""The hybrid model: config, modules, checkpoints; the vision-language model on top."""

from .config import PRESETS, HybridConfig
from .hybrid import HybridLM, LMOutput
from .vision import VL_PRESETS, HybridVLM, VisionConfig, VLConfig

__all__ = [
    "PRESETS",
    "VL_PRESETS",
    "HybridConfig",
    "HybridLM",
    "HybridVLM",
    "LMOutput",
    "VLConfig",
    "VisionConfig",
]
