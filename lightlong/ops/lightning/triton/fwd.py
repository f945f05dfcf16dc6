"""Forward kernels: the state entering every chunk, then every chunk's output.

    stage 1 (sequential over a sequence's chunks, parallel over N·H and K×V tiles):
        h[c] = S_c;   S_{c+1} = λ^L · S_c + (K_c ⊙ b)ᵀ V_c
    stage 2 (parallel over chunks, heads and V tiles):
        O_c = scale · [ (Q_c K_cᵀ ⊙ D) V_c + (Q_c ⊙ a) h[c] ]

with D[i, j] = λ^(i−j) (j <= i), a[i] = λ^(i+1), b[j] = λ^(L−1−j) and L the chunk's length.
Every exponent spans at most one chunk; the carry λ^L·S is `decay_state` (exact near λ^L = 1).

# T tokens, H heads, K/V head dims, BT chunk, N sequences, NT chunks, BK/BV tiles
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import (
    Chunks,
    autotune_configs,
    decay_state,
    dot_precisions,
    intra_decay,
    key_decay,
    load_rows,
    query_decay,
    state_tile,
    store_rows,
    tile,
)


@triton.autotune(configs=autotune_configs(), key=["H", "K", "V", "BT", "BK", "BV"])
@triton.jit
def lightning_fwd_kernel_state(
    k, v, decay, h0, h, ht, cu, first,
    stride_kt, stride_kh, stride_vt, stride_vh,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    USE_H0: tl.constexpr, STORE_FINAL: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """Grid (N·H, K/BK, V/BV). Writes h [NT, H, K, V] (state entering each chunk) and, if
    STORE_FINAL, ht [N, H, K, V] (state leaving each sequence); h0 [N, H, K, V] or unused."""
    i_nh, i_k, i_v = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_n, i_h = i_nh // H, i_nh % H
    bos, eos = tl.load(cu + i_n), tl.load(cu + i_n + 1)
    c0 = tl.load(first + i_n)
    s = tl.load(decay + i_h)
    k += i_h * stride_kh
    v += i_h * stride_vh

    b_h = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_H0:
        p_h0, m_kv = state_tile(h0, i_n * H + i_h, i_k, i_v, K, V, BK, BV)
        b_h += tl.load(p_h0, mask=m_kv, other=0.0).to(tl.float32)
    for i_t in range(0, tl.cdiv(eos - bos, BT)):
        t0 = bos + i_t * BT
        L = tl.minimum(eos - t0, BT)
        p_h, m_kv = state_tile(h, (c0 + i_t) * H + i_h, i_k, i_v, K, V, BK, BV)
        tl.store(p_h, b_h, mask=m_kv)
        b_k = load_rows(k, t0, L, stride_kt, i_k * BK, K, BT, BK)
        b_v = load_rows(v, t0, L, stride_vt, i_v * BV, V, BT, BV)
        b_kd = b_k * key_decay(s, L, BT)[:, None]
        b_h = decay_state(b_h, s * L.to(tl.float32))
        b_h += tl.dot(tl.trans(b_kd), b_v, input_precision=PREC)
    if STORE_FINAL:
        p_ht, m_kv = state_tile(ht, i_n * H + i_h, i_k, i_v, K, V, BK, BV)
        tl.store(p_ht, b_h, mask=m_kv)


@triton.autotune(configs=autotune_configs(), key=["H", "K", "V", "BT", "BK", "BV"])
@triton.jit
def lightning_fwd_kernel_output(
    q, k, v, h, o, decay, spans, scale,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """Grid (NT, V/BV, H). o [T, H, V] contiguous; h [NT, H, K, V] from stage 1."""
    i_c, i_v, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    t0, eos = tl.load(spans + 2 * i_c), tl.load(spans + 2 * i_c + 1)
    L = tl.minimum(eos - t0, BT)
    s = tl.load(decay + i_h)
    q += i_h * stride_qh
    k += i_h * stride_kh
    v += i_h * stride_vh

    b_inter = tl.zeros([BT, BV], dtype=tl.float32)
    b_s = tl.zeros([BT, BT], dtype=tl.float32)
    for i_k in range(0, tl.cdiv(K, BK)):
        b_q = load_rows(q, t0, L, stride_qt, i_k * BK, K, BT, BK)
        b_k = load_rows(k, t0, L, stride_kt, i_k * BK, K, BT, BK)
        p_h, m_kv = state_tile(h, i_c * H + i_h, i_k, i_v, K, V, BK, BV)
        b_h = tl.load(p_h, mask=m_kv, other=0.0)
        b_inter += tl.dot(b_q, b_h, input_precision=PREC)
        b_s += tl.dot(b_q, tl.trans(b_k), input_precision=PREC)
    b_v = load_rows(v, t0, L, stride_vt, i_v * BV, V, BT, BV)
    b_o = tl.dot(b_s * intra_decay(s, BT), b_v, input_precision=PREC)
    b_o += b_inter * query_decay(s, BT)[:, None]
    store_rows(o + i_h * V, t0, L, H * V, i_v * BV, b_o * scale, V, BT, BV)


def chunk_fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    decay: Tensor,
    init: Tensor | None,
    scale: float,
    chunks: Chunks,
    BT: int,
    output_final_state: bool,
) -> tuple[Tensor, Tensor | None, Tensor]:
    """q, k [T, H, K], v [T, H, V] (unit stride along K/V), decay [H] float32, init
    [N, H, K, V] or None. Returns o [T, H, V] (q's dtype), final [N, H, K, V] float32 or
    None, and h [NT, H, K, V] float32, the state entering each chunk."""
    T, H, K = q.shape
    V = v.shape[-1]
    N = chunks.cu.numel() - 1
    BK, BV = tile(K), tile(V)
    h = q.new_empty((chunks.num_chunks, H, K, V), dtype=torch.float32)
    final = q.new_empty((N, H, K, V), dtype=torch.float32) if output_final_state else None
    prec_out, prec_state = dot_precisions(q.dtype)
    lightning_fwd_kernel_state[(N * H, triton.cdiv(K, BK), triton.cdiv(V, BV))](
        k, v, decay, init, h, final, chunks.cu, chunks.first,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        H=H, K=K, V=V, BT=BT, BK=BK, BV=BV,
        USE_H0=init is not None, STORE_FINAL=output_final_state, PREC=prec_state,
    )  # fmt: skip
    o = q.new_empty((T, H, V))
    if chunks.num_chunks:
        lightning_fwd_kernel_output[(chunks.num_chunks, triton.cdiv(V, BV), H)](
            q, k, v, h, o, decay, chunks.spans, scale,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            H=H, K=K, V=V, BT=BT, BK=BK, BV=BV, PREC=prec_out,
        )  # fmt: skip
    return o, final, h
