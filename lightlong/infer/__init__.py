"""Inference: the hybrid cache, chunked prefill, sampling, batched generation, prefix reuse."""

from .cache import CacheSnapshot, HybridCache
from .engine import Engine, Generation, GenerationStats, StreamEvent
from .prefix import PrefixCache
from .sampling import SamplingParams

__all__ = [
    "CacheSnapshot",
    "Engine",
    "Generation",
    "GenerationStats",
    "HybridCache",
    "PrefixCache",
    "SamplingParams",
    "StreamEvent",
]
