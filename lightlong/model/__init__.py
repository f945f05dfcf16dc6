"""The hybrid model: config, modules, checkpoints."""

from .config import PRESETS, HybridConfig
from .hybrid import HybridLM, LMOutput

__all__ = ["PRESETS", "HybridConfig", "HybridLM", "LMOutput"]
