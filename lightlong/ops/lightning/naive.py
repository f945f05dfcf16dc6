"""The quadratic reference: o = scale · ((Q Kᵀ) ⊙ M) V with M[t, j] = λ^(t−j) for j ≤ t.

Computed in the inputs' dtype (float64 makes it the oracle; bf16 shows what a plain bf16
implementation gets wrong). O(T²) time and memory: for tests and short sequences only.

# B batch, T tokens, H heads, K/V head dims, N sequences, S state [N, H, K, V]
"""

from __future__ import annotations

import itertools

import torch
from torch import Tensor

from ._inputs import check_inputs


def _naive_one(q: Tensor, k: Tensor, v: Tensor, s: Tensor, scale: float, state: Tensor | None):
    """One sequence. q, k [T, H, K]; v [T, H, V]; s [H]; state [H, K, V] or None."""
    T = q.shape[0]
    pos = torch.arange(T, device=q.device, dtype=s.dtype)
    gap = pos[:, None] - pos[None, :]  # [T, T] = t - j
    causal = gap >= 0
    # exponents are -s·(t-j) <= 0 where kept; the rest is masked before exp
    mask_HTT = torch.exp(-s[:, None, None] * gap.clamp(min=0)) * causal
    scores_HTT = torch.einsum("thk,jhk->htj", q, k) * mask_HTT.to(q.dtype)
    o_THV = torch.einsum("htj,jhv->thv", scores_HTT, v)
    if state is not None:
        q_decay_HT = torch.exp(-s[:, None] * (pos + 1)).to(q.dtype)
        o_THV = o_THV + torch.einsum("thk,ht,hkv->thv", q, q_decay_HT, state.to(q.dtype))
    k_decay_HT = torch.exp(-s[:, None] * (T - 1 - pos)).to(k.dtype)
    final_HKV = torch.einsum("thk,ht,thv->hkv", k, k_decay_HT, v)
    if state is not None:
        final_HKV = final_HKV + torch.exp(-s * T)[:, None, None].to(q.dtype) * state.to(q.dtype)
    return o_THV * scale, final_HKV


def lightning_attn_naive(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    decay: Tensor,
    *,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Quadratic-form lightning attention, computed in the inputs' dtype.

    Args:
        q, k: [B, T, H, K]; v: [B, T, H, V]; decay: [H] rates s_h >= 0.
        scale: None means K**-0.5.
        initial_state: [N, H, K, V], N = B (or the number of packed sequences).
        output_final_state: also return each sequence's final state.
        cu_seqlens: int64 [N + 1] offsets of packed sequences, with B == 1.

    Returns:
        o [B, T, H, V] in q's dtype, and final_state [N, H, K, V] (float32, or float64
        for float64 inputs) or None.
    """
    args = check_inputs(q, k, v, decay, scale, initial_state, cu_seqlens)
    B, T, H, _ = q.shape
    V = v.shape[-1]
    s = decay.to(torch.float64)
    q_, k_, v_ = (x.reshape(B * T, H, x.shape[-1]) for x in (q, k, v))
    outs, finals = [], []
    for n, (a, b) in enumerate(itertools.pairwise(args.offsets)):
        state = None if initial_state is None else initial_state[n]
        o, final = _naive_one(q_[a:b], k_[a:b], v_[a:b], s, args.scale, state)
        outs.append(o)
        finals.append(final)
    o = torch.cat(outs).reshape(B, T, H, V)
    final_state = torch.stack(finals).to(args.state_dtype) if output_final_state else None
    return o, final_state
