"""Top-k mixture of SwiGLU experts, dispatched grouped by expert (one matmul per expert)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from lightlong.ops.moe import grouped_experts, load_balancing_loss, route


class Expert(nn.Module):
    """SwiGLU: w2(silu(w1 x) · w3 x); names as in MiniMax's checkpoint."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.w1 = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.w2 = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.w3 = nn.Linear(hidden_size, intermediate_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class MoE(nn.Module):
    """Router (`gate`) + experts; returns the mixed output and the load-balancing loss."""

    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int, top_k: int):
        super().__init__()
        self.top_k = top_k
        self.gate = nn.Linear(hidden_size, num_experts, bias=False)
        self.experts = nn.ModuleList(
            Expert(hidden_size, intermediate_size) for _ in range(num_experts)
        )

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x [B, T, D] -> ([B, T, D], aux loss scalar fp32)."""
        x_ND = x.reshape(-1, x.shape[-1])
        r = route(self.gate(x_ND), self.top_k)
        y_ND = grouped_experts(x_ND, r, lambda e, xe: self.experts[e](xe))
        return y_ND.view_as(x), load_balancing_loss(r)
