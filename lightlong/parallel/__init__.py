"""Collectives over torch.distributed process groups: lightning attention with a row split
across ranks (LASP with decay)."""

from .lightning import SequenceSplit, lightning_attn_split

__all__ = ["SequenceSplit", "lightning_attn_split"]
