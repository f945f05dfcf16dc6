"""Decode: one token for each of B sequences, the state updated in place.

    S ← λ · S + kᵀ v   (λ · S by `decay_state`, exact near λ = 1),   o = scale · q S

Memory-bound: each [K, V] float32 state is read and written once; q, k, v, o are B·H
vectors. One program per (sequence, head, V tile) holds a [K, BV] tile (K padded to a power
of two); no autotuning, since the kernel writes its input.

# B sequences, H heads, K/V head dims, BK K padded, BV tile of V
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from ._common import decay_state, state_tile

_BV = 32  # [128, 32] float32 tiles: 16 KiB per program, B·H·V/32 programs


@triton.jit
def lightning_decode_kernel_step(
    q, k, v, state, o, decay, scale,
    stride_qb, stride_qh, stride_kb, stride_kh, stride_vb, stride_vh,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
):  # fmt: skip
    """Grid (B·H, V/BV). q, k [B, H, K], v [B, H, V] (strided), state [B, H, K, V] float32
    contiguous, o [B, H, V] contiguous."""
    i_bh, i_v = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    b_q = tl.load(q + i_b * stride_qb + i_h * stride_qh + o_k, mask=o_k < K, other=0.0)
    b_k = tl.load(k + i_b * stride_kb + i_h * stride_kh + o_k, mask=o_k < K, other=0.0)
    b_v = tl.load(v + i_b * stride_vb + i_h * stride_vh + o_v, mask=o_v < V, other=0.0)
    s = tl.load(decay + i_h)

    p_s, m_kv = state_tile(state, i_bh, 0, i_v, K, V, BK, BV)
    b_s = tl.load(p_s, mask=m_kv, other=0.0)
    b_s = decay_state(b_s, s)
    b_s += b_k.to(tl.float32)[:, None] * b_v.to(tl.float32)[None, :]
    tl.store(p_s, b_s, mask=m_kv)
    b_o = tl.sum(b_q.to(tl.float32)[:, None] * b_s, axis=0) * scale
    tl.store(o + i_bh.to(tl.int64) * V + o_v, b_o.to(o.dtype.element_ty), mask=o_v < V)


def decode_step(
    q: Tensor, k: Tensor, v: Tensor, decay: Tensor, state: Tensor, scale: float
) -> Tensor:
    """q, k [B, 1, H, K], v [B, 1, H, V] (unit stride along K/V), decay [H] float32, state
    [B, H, K, V] float32 contiguous (updated in place). Returns o [B, 1, H, V] in q's dtype."""
    B, _, H, K = q.shape
    V = v.shape[-1]
    o = q.new_empty((B, 1, H, V))
    BV = min(_BV, max(16, triton.next_power_of_2(V)))
    lightning_decode_kernel_step[(B * H, triton.cdiv(V, BV))](
        q, k, v, state, o, decay, scale,
        q.stride(0), q.stride(2), k.stride(0), k.stride(2), v.stride(0), v.stride(2),
        H=H, K=K, V=V, BK=max(16, triton.next_power_of_2(K)), BV=BV, num_warps=4,
    )  # fmt: skip
    return o
