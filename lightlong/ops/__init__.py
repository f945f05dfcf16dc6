"""Pure tensor functions: no modules, no config."""

from .lightning import (
    alibi_slopes,
    decay_rates,
    lightning_attn,
    lightning_attn_naive,
    lightning_attn_recurrent,
    lightning_attn_step,
)
from .loss import linear_cross_entropy, linear_cross_entropy_reference

__all__ = [
    "alibi_slopes",
    "decay_rates",
    "lightning_attn",
    "lightning_attn_naive",
    "lightning_attn_recurrent",
    "lightning_attn_step",
    "linear_cross_entropy",
    "linear_cross_entropy_reference",
]
