"""Mixture-of-experts routing: top-k selection, grouped dispatch, combine, load-balancing loss.

# N tokens, D model dim, E experts, k experts per token, A = N·k assignments
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

ExpertFn = Callable[[int, Tensor], Tensor]
"""expert_fn(e, x_e [n_e, D]) -> [n_e, D]: expert e (its global index) on its tokens."""


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


def load_balancing_loss(r: Routing, reduce: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """Switch-style aux loss E · Σ_e f_e · P_e: f_e the share of assignments to expert e per
    token (sums to k), P_e the mean router probability of e. Equals k when balanced.

    reduce: sums a [2E + 1] tensor (assignments per expert, router probabilities summed per
    expert, tokens) over the ranks whose tokens make the batch, differentiably
    (`lightlong.parallel.global_load_balancing_loss`): f and P are then the whole batch's.
    None: this call's N tokens.
    """
    N, E = r.probs.shape
    counts_E = torch.tensor(r.counts, dtype=r.probs.dtype, device=r.probs.device)
    totals = torch.cat([counts_E, r.probs.sum(dim=0), counts_E.new_full((1,), N)])
    if reduce is not None:
        totals = reduce(totals)
    counts_E, prob_sum_E, n = totals.split([E, E, 1])
    n = n.clamp(min=1)
    return E * (counts_E / n * (prob_sum_E / n)).sum()


def grouped_experts(x: Tensor, r: Routing, expert_fn: ExpertFn) -> Tensor:
    """Runs each expert once over all its tokens and combines the weighted results.

    x [N, D]; expert_fn(e, x_e [n_e, D]) -> [n_e, D]. Returns [N, D] in x's dtype.
    """
    return mix_experts(x, r, lambda x_A: run_experts(x_A, r.counts, expert_fn))


def mix_experts(x: Tensor, r: Routing, run: Callable[[Tensor], Tensor]) -> Tensor:
    """Each token's k expert outputs, weighted and summed.

    x [N, D]; run(x_A [A, D]) -> y_A [A, D]: the outputs of the assignments, whose inputs
    x_A come sorted by expert (`Routing.order`). Returns [N, D] in x's dtype.
    """
    k = r.experts.shape[1]
    token_A = r.order // k
    x_A = x.index_select(0, token_A)
    w_A = r.weights.reshape(-1).index_select(0, r.order).to(x.dtype)
    y_A = run(x_A) * w_A[:, None]
    return torch.zeros_like(x).index_add_(0, token_A, y_A)


def run_experts(x_A: Tensor, counts: list[int], expert_fn: ExpertFn, first: int = 0) -> Tensor:
    """x_A [A, D] sorted by expert: counts[i] rows for expert first + i, each expert called
    once on its rows (none for an expert without rows). Returns [A, D]."""
    outs = [expert_fn(first + i, part) for i, part in enumerate(x_A.split(counts)) if counts[i]]
    return torch.cat(outs) if outs else x_A
