"""Collectives over torch.distributed process groups: lightning attention (LASP with decay)
and softmax attention with a packed row split across ranks; MoE experts spread over ranks
(all-to-all dispatch) and the load-balancing loss over every rank's tokens; joining a
torchrun launch."""

from .attention import softmax_attn_split
from .expert import (
    ExpertParallel,
    apply_expert_parallel,
    expert_parameters,
    full_state_dict,
    global_load_balancing_loss,
    grouped_experts_parallel,
)
from .launch import init_torchrun
from .lightning import SequenceSplit, lightning_attn_split, split_next_token_targets

__all__ = [
    "ExpertParallel",
    "SequenceSplit",
    "apply_expert_parallel",
    "expert_parameters",
    "full_state_dict",
    "global_load_balancing_loss",
    "grouped_experts_parallel",
    "init_torchrun",
    "lightning_attn_split",
    "softmax_attn_split",
    "split_next_token_targets",
]
