"""Inference: the hybrid cache, chunked prefill, sampling, batched generation, prefix reuse."""

from .cache import CacheSnapshot, HybridCache
from .engine import Engine, Generation
from .prefix import PrefixCache
from .runner import GenerationStats, Runner, Seq, StreamEvent
from .sampling import SamplingParams

__all__ = [
    "CacheSnapshot",
    "Engine",
    "Generation",
    "GenerationStats",
    "HybridCache",
    "PrefixCache",
    "Runner",
    "SamplingParams",
    "Seq",
    "StreamEvent",
]
