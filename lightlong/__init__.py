"""lightlong: MiniMax-01-style long-context language models (lightning attention, hybrid MoE)."""

from lightlong.model import HybridConfig, HybridLM, HybridVLM, VLConfig

__all__ = ["HybridConfig", "HybridLM", "HybridVLM", "VLConfig"]
