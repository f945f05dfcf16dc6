"""Top-k mixture of SwiGLU experts, dispatched grouped by expert (one matmul per expert)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightlong.nn.decode import linear_group
from lightlong.ops.moe import grouped_experts, load_balancing_loss, route, top_k_gates
from lightlong.parallel import (
    ExpertParallel,
    SequenceSplit,
    global_load_balancing_loss,
    grouped_experts_parallel,
)


class Expert(nn.Module):
    """SwiGLU: w2(silu(w1 x) · w3 x); names as in MiniMax's checkpoint."""

    FUSED_INPUTS = (("w1", "w3"),)
    """Projections of one input (`lightlong.nn.decode_layout` lays them side by side)."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.w1 = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.w2 = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.w3 = nn.Linear(hidden_size, intermediate_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        h1, h3 = linear_group(x, self.w1, self.w3)
        return self.w2(F.silu(h1) * h3)


class SharedMLP(nn.Module):
    """The released shared expert's SwiGLU: down_proj(silu(gate_proj x) · up_proj x)."""

    FUSED_INPUTS = (("gate_proj", "up_proj"),)
    """Projections of one input (`lightlong.nn.decode_layout` lays them side by side)."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = linear_group(x, self.gate_proj, self.up_proj)
        return self.down_proj(F.silu(gate) * up)


class MoE(nn.Module):
    """Router (`gate`) + experts; returns the mixed output and the load-balancing loss.

    Under expert parallelism (`lightlong.parallel.apply_expert_parallel`) `experts` holds
    this rank's experts only, keyed by their global index (a ModuleDict: the state dict keeps
    the checkpoint's names), and tokens reach the experts of every rank by all-to-all.
    """

    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int, top_k: int):
        super().__init__()
        self.top_k = top_k
        self.gate = nn.Linear(hidden_size, num_experts, bias=False)
        self.experts = nn.ModuleList(
            Expert(hidden_size, intermediate_size) for _ in range(num_experts)
        )
        self.expert_parallel: ExpertParallel | None = None
        """Where the experts live when spread over ranks; None: all here."""
        self.decode_experts: list[nn.Module] | None = None
        """The experts a decoded token runs (`HybridLM.compile_decode`: compiled); None:
        `experts` themselves."""

    def forward(
        self, x: Tensor, with_aux: bool = True, split: SequenceSplit | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """x [B, T, D] -> ([B, T, D], aux loss scalar fp32, or None without `with_aux`).

        The aux loss is over the tokens of every rank of split.group given `split` (x is
        this rank's chunk of a row), else of the expert-parallel group, else over x's.
        """
        ep = self.expert_parallel
        x_ND = x.reshape(-1, x.shape[-1])
        if x_ND.shape[0] == 1 and not with_aux and ep is None:  # one decoded token: k experts
            weights, experts, _ = top_k_gates(self.gate(x_ND), self.top_k)
            return self._one_token(x_ND, weights[0].to(x.dtype), experts[0]).view_as(x), None
        r = route(self.gate(x_ND), self.top_k)
        if ep is None:
            y_ND = grouped_experts(x_ND, r, lambda e, xe: self.experts[e](xe))
        else:
            y_ND = grouped_experts_parallel(x_ND, r, lambda e, xe: self.experts[str(e)](xe), ep)
        if not with_aux:
            return y_ND.view_as(x), None
        batch = split if split is not None else ep  # the ranks whose tokens make the batch
        aux = (
            load_balancing_loss(r) if batch is None else global_load_balancing_loss(r, batch.group)
        )
        return y_ND.view_as(x), aux

    @torch.compiler.disable  # expert ids become Python ints: compiled, each pair would recompile
    def _one_token(self, x_1D: Tensor, weights_k: Tensor, experts_k: Tensor) -> Tensor:
        """Σ_i weights_k[i] · expert_{experts_k[i]}(x_1D) for one token x_1D [1, D] -> [1, D],
        accumulated in place (each expert itself may be compiled)."""
        y_1D = None
        compiled = self.decode_experts is not None and not torch.is_grad_enabled()
        experts = self.decode_experts if compiled else self.experts
        for w, e in zip(weights_k, experts_k.tolist(), strict=True):
            out = experts[e](x_1D).mul_(w)
            y_1D = out if y_1D is None else y_1D.add_(out)
        return y_1D
