"""Mixture-of-experts routing: top-k selection, grouped dispatch, combine, load-balancing loss.

# N tokens, D model dim, E experts, k experts per token, A = N·k assignments
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Routing:
    """Which experts each token goes to, and the tokens grouped by expert."""

    weights: Tensor  # [N, k] fp32 (fp64 for fp64 logits), normalised over the k chosen
    experts: Tensor  # [N, k] int64 chosen experts
    probs: Tensor  # [N, E] router softmax in the weights' dtype (for the aux loss)
    order: Tensor  # [A] assignment ids sorted by expert (assignment a = token a // k)
    counts: list[int]  # [E] assignments per expert


def top_k_gates(logits: Tensor, top_k: int) -> tuple[Tensor, Tensor, Tensor]:
    """Softmax over experts in (at least) fp32, then the top k renormalised to sum to 1.

    logits [N, E] -> weights [N, k] fp32, experts [N, k] int64, probs [N, E].
    """
    probs = torch.softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
    top_w, top_e = torch.topk(probs, top_k, dim=-1)
    return top_w / top_w.sum(dim=-1, keepdim=True), top_e, probs


def route(logits: Tensor, top_k: int) -> Routing:
    """`top_k_gates`, with the assignments grouped by expert.

    logits [N, E]. Assignments are sorted by expert (a stable sort keeps token order), so each
    expert's tokens are one contiguous run: `counts[e]` assignments starting at sum(counts[:e]).
    """
    weights, top_e, probs = top_k_gates(logits, top_k)
    order = torch.sort(top_e.reshape(-1), stable=True).indices
    counts = torch.bincount(top_e.reshape(-1), minlength=logits.shape[-1]).tolist()
    return Routing(weights, top_e, probs, order, counts)


def load_balancing_loss(r: Routing) -> Tensor:
    """Switch-style aux loss E · Σ_e f_e · P_e: f_e the share of assignments to expert e per
    token (sums to k), P_e the mean router probability of e. Equals k when balanced."""
    N, E = r.probs.shape
    f_E = torch.tensor(r.counts, dtype=r.probs.dtype, device=r.probs.device) / max(N, 1)
    return E * (f_E * r.probs.mean(dim=0)).sum()


def grouped_experts(x: Tensor, r: Routing, expert_fn) -> Tensor:
    """Runs each expert once over all its tokens and combines the weighted results.

    x [N, D]; expert_fn(e, x_e [n_e, D]) -> [n_e, D]. Returns [N, D] in x's dtype.
    """
    k = r.experts.shape[1]
    token_A = r.order // k
    x_A = x.index_select(0, token_A)
    w_A = r.weights.reshape(-1).index_select(0, r.order).to(x.dtype)
    outs = [expert_fn(e, part) for e, part in enumerate(x_A.split(r.counts)) if r.counts[e]]
    y_A = torch.cat(outs) * w_A[:, None] if outs else x_A
    return torch.zeros_like(x).index_add_(0, token_A, y_A)
