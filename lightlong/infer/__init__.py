"""Inference: the hybrid cache, chunked prefill, sampling, batched generation, prefix reuse,
prefill split across ranks."""

from .cache import CacheSnapshot, HybridCache
from .engine import Engine, Generation
from .prefix import PrefixCache
from .runner import GenerationStats, Runner, Seq, StreamEvent
from .sampling import SamplingParams
from .split import prefill_split

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
    "prefill_split",
]
