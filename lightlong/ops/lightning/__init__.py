"""Lightning attention: causal linear attention with per-head exponential decay.

`lightning_attn` is the fast tiled op (a torch path on any device, Triton kernels on CUDA:
`triton/`); `lightning_attn_naive` (quadratic) and `lightning_attn_recurrent` (token loop;
`lightning_attn_step` decodes) are its references.
"""

from .api import lightning_attn, release_workspace, workspace_bytes
from .decay import alibi_slopes, decay_rates
from .naive import lightning_attn_naive
from .recurrent import lightning_attn_recurrent, lightning_attn_step

__all__ = [
    "alibi_slopes",
    "decay_rates",
    "lightning_attn",
    "lightning_attn_naive",
    "lightning_attn_recurrent",
    "lightning_attn_step",
    "release_workspace",
    "workspace_bytes",
]
