"""The token-by-token recurrence, and the O(1)-per-token decode step.

    S_t = λ · S_{t−1} + k_tᵀ v_t,    o_t = scale · q_t S_t      (λ = exp(−s) per head)

The state is kept in float32 (float64 for float64 inputs) whatever the inputs' dtype.
Differentiable through autograd; a reference for the tiled form, built on a different
algorithm so that the two cannot share a mistake.

# B batch, T tokens, H heads, K/V head dims, N sequences, S state [N, H, K, V]
"""

from __future__ import annotations

import itertools

import torch
from torch import Tensor

from ._inputs import check_inputs, resolve_backend


def _recur(q: Tensor, k: Tensor, v: Tensor, s: Tensor, scale: float, S: Tensor):
    """q, k [R, T, H, K]; v [R, T, H, V]; s [H] rates; S [R, H, K, V] -> o [R, T, H, V], S."""
    dt = S.dtype
    # λ·S as S + (λ − 1)·S with λ − 1 = expm1(−s): for slow heads (s ~ 4e-8 in MiniMax's last
    # layer) λ itself rounds to 1 − 6e-8 in float32, a 50% error in the rate that compounds
    # over long sequences; expm1(−s) keeps the rate exact.
    lam_m1_H11 = torch.expm1(-s.to(dt))[:, None, None]
    outs = []
    for t in range(q.shape[1]):
        kv_RHKV = torch.einsum("rhk,rhv->rhkv", k[:, t].to(dt), v[:, t].to(dt))
        S = torch.addcmul(S + kv_RHKV, S, lam_m1_H11)
        outs.append(torch.einsum("rhk,rhkv->rhv", q[:, t].to(dt), S) * scale)
    o = torch.stack(outs, dim=1) if outs else q.new_zeros(*q.shape[:3], v.shape[-1])
    return o.to(q.dtype), S


def lightning_attn_recurrent(
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
    """Lightning attention as a recurrence over tokens; T = 1 with a state is a decode step.

    Args:
        q, k: [B, T, H, K]; v: [B, T, H, V]; decay: [H] rates s_h >= 0.
        scale: None means K**-0.5.
        initial_state: [N, H, K, V]; None starts from zeros.
        output_final_state: also return each sequence's final state.
        cu_seqlens: int64 [N + 1] offsets of packed sequences, with B == 1.

    Returns:
        o [B, T, H, V] in q's dtype, and final_state [N, H, K, V] (float32; float64 for
        float64 inputs) or None.
    """
    args = check_inputs(q, k, v, decay, scale, initial_state, cu_seqlens)
    _, _, H, K = q.shape
    V = v.shape[-1]
    if initial_state is None:
        state = q.new_zeros((args.num_seqs, H, K, V), dtype=args.state_dtype)
    else:
        state = initial_state.to(args.state_dtype)
    if cu_seqlens is None:
        o, final = _recur(q, k, v, decay, args.scale, state)
    else:
        outs, finals = [], []
        for n, (a, b) in enumerate(itertools.pairwise(args.offsets)):
            o_n, s_n = _recur(q[:, a:b], k[:, a:b], v[:, a:b], decay, args.scale, state[n : n + 1])
            outs.append(o_n)
            finals.append(s_n)
        o, final = torch.cat(outs, dim=1), torch.cat(finals)
    return o, (final if output_final_state else None)


@torch.no_grad()
def lightning_attn_step(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    decay: Tensor,
    state: Tensor,
    *,
    scale: float | None = None,
    backend: str = "auto",
) -> Tensor:
    """One decode step for B sequences, updating `state` in place: O(1) in the context length.

    Args:
        q, k: [B, 1, H, K]; v: [B, 1, H, V]; decay: [H] rates s_h >= 0.
        state: [B, H, K, V] float32 (float64 for float64 inputs), overwritten with S_t.
        scale: None means K**-0.5.
        backend: "torch", "triton" (one fused kernel, CUDA) or "auto" (triton on CUDA
            when installed, else torch), as for `lightning_attn`.

    Returns:
        o [B, 1, H, V] in q's dtype. Not differentiable (inference only).
    """
    args = check_inputs(q, k, v, decay, scale, state, None)
    T = q.shape[1]
    if T != 1:
        raise ValueError(f"q must hold one token per sequence [B, 1, H, K], got T={T}")
    if state.dtype != args.state_dtype:
        raise ValueError(
            f"state must be {args.state_dtype} for {q.dtype} inputs, got {state.dtype}"
        )
    if not state.is_contiguous():
        raise ValueError("state must be contiguous: it is updated in place")
    if resolve_backend(backend, q, "lightning_attn_step") == "triton":
        from .triton import decode_step

        q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
        return decode_step(q, k, v, decay.to(torch.float32).contiguous(), state, args.scale)
    return decode_step_(q, k, v, torch.expm1(-decay.to(state.dtype)), state, args.scale)


@torch.no_grad()
def decode_step_(
    q: Tensor, k: Tensor, v: Tensor, lam_m1: Tensor, state: Tensor, scale: float
) -> Tensor:
    """`lightning_attn_step` on the torch backend without its checks, for a caller that
    checked once (the model's decode path): the state's update and output in three kernels.

    q, k [B, 1, H, K]; v [B, 1, H, V]; lam_m1 [H] = expm1(−decay) in the state's dtype;
    state [B, H, K, V] contiguous, updated in place. Returns o [B, 1, H, V] in q's dtype.
    """
    B, _, H, K = q.shape
    V = v.shape[-1]
    dt = state.dtype
    # S ← S + expm1(−s)·S + kᵀv: the exact-rate form of `_recur`.
    state.addcmul_(state, lam_m1[:, None, None])
    S_XKV = state.view(B * H, K, V)  # X = B·H
    S_XKV.baddbmm_(k.reshape(B * H, K, 1).to(dt), v.reshape(B * H, 1, V).to(dt))
    o_X1V = torch.bmm(q.reshape(B * H, 1, K).to(dt), S_XKV)
    if scale != 1.0:
        o_X1V.mul_(scale)
    return o_X1V.view(B, 1, H, V).to(q.dtype)
