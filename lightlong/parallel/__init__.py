"""Collectives over torch.distributed process groups: lightning attention (LASP with decay)
and softmax attention with a packed row split across ranks."""

from .attention import softmax_attn_split
from .lightning import SequenceSplit, lightning_attn_split, split_next_token_targets

__all__ = [
    "SequenceSplit",
    "lightning_attn_split",
    "softmax_attn_split",
    "split_next_token_targets",
]
