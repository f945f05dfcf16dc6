"""Pure tensor functions: no modules, no config."""

from .cosformer import cosformer_attn, cosformer_attn_naive, cosformer_step
from .lightning import (
    alibi_slopes,
    decay_rates,
    lightning_attn,
    lightning_attn_naive,
    lightning_attn_recurrent,
    lightning_attn_step,
    release_workspace,
    workspace_bytes,
)
from .local import (
    block_attention,
    block_attention_naive,
    empty_local_cache,
    local_attention_cached,
    window_attention,
    window_attention_naive,
)
from .loss import linear_cross_entropy, linear_cross_entropy_reference
from .norm_linear import norm_linear_attn, norm_linear_attn_naive

__all__ = [
    "alibi_slopes",
    "block_attention",
    "block_attention_naive",
    "cosformer_attn",
    "cosformer_attn_naive",
    "cosformer_step",
    "decay_rates",
    "empty_local_cache",
    "lightning_attn",
    "lightning_attn_naive",
    "lightning_attn_recurrent",
    "lightning_attn_step",
    "linear_cross_entropy",
    "linear_cross_entropy_reference",
    "local_attention_cached",
    "norm_linear_attn",
    "norm_linear_attn_naive",
    "release_workspace",
    "window_attention",
    "window_attention_naive",
    "workspace_bytes",
]
