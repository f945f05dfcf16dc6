"""Backward kernels, given the forward's per-chunk states h[c] (the state entering chunk c).

    stage 1 (sequential, in reverse over a sequence's chunks; parallel over N·H, K×V tiles):
        dh[c] = ∂/∂S_{c+1} (the state leaving chunk c; dfinal for a sequence's last chunk)
        ∂/∂S_c = λ^L · dh[c] + scale · (Q_c ⊙ a)ᵀ dO_c      (for a first chunk: d initial)
    stage 2 (parallel over chunks and heads), with dP = dO Vᵀ and P = Q Kᵀ:
        dQ = scale · [ (dP ⊙ D) K + a ⊙ (dO h[c]ᵀ) ]
        dK = scale · (dP ⊙ D)ᵀ Q + b ⊙ (V dh[c]ᵀ)
        dV = scale · (P ⊙ D)ᵀ dO + b ⊙ (K dh[c])

D, a, b as in `fwd`. dQ and dK contract over V, dV over K: two kernels, each looping over
the dimension it contracts.

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
def lightning_bwd_kernel_dstate(
    q, do, decay, dht, dh, dh0, cu, first, scale,
    stride_qt, stride_qh, stride_dot, stride_doh,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    USE_DHT: tl.constexpr, STORE_DH0: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """Grid (N·H, K/BK, V/BV). Writes dh [NT, H, K, V] and, if STORE_DH0, dh0 [N, H, K, V];
    dht [N, H, K, V] (gradient of the final state) or unused."""
    i_nh, i_k, i_v = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_n, i_h = i_nh // H, i_nh % H
    bos, eos = tl.load(cu + i_n), tl.load(cu + i_n + 1)
    c0 = tl.load(first + i_n)
    s = tl.load(decay + i_h)
    q += i_h * stride_qh
    do += i_h * stride_doh

    b_dh = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_DHT:
        p_dht, m_kv = state_tile(dht, i_n * H + i_h, i_k, i_v, K, V, BK, BV)
        b_dh += tl.load(p_dht, mask=m_kv, other=0.0).to(tl.float32)
    n_chunks = tl.cdiv(eos - bos, BT)
    for j in range(0, n_chunks):
        i_t = n_chunks - 1 - j
        t0 = bos + i_t * BT
        L = tl.minimum(eos - t0, BT)
        p_dh, m_kv = state_tile(dh, (c0 + i_t) * H + i_h, i_k, i_v, K, V, BK, BV)
        tl.store(p_dh, b_dh, mask=m_kv)
        b_q = load_rows(q, t0, L, stride_qt, i_k * BK, K, BT, BK)
        b_do = load_rows(do, t0, L, stride_dot, i_v * BV, V, BT, BV)
        b_qa = b_q * (query_decay(s, BT) * scale)[:, None]
        b_dh = decay_state(b_dh, s * L.to(tl.float32))
        b_dh += tl.dot(tl.trans(b_qa), b_do, input_precision=PREC)
    if STORE_DH0:
        p_dh0, m_kv = state_tile(dh0, i_n * H + i_h, i_k, i_v, K, V, BK, BV)
        tl.store(p_dh0, b_dh, mask=m_kv)


@triton.autotune(configs=autotune_configs(), key=["H", "K", "V", "BT", "BK", "BV"])
@triton.jit
def lightning_bwd_kernel_dqk(
    q, k, v, h, do, dh, dq, dk, decay, spans, scale,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """Grid (NT, K/BK, H). dq, dk [T, H, K] contiguous."""
    i_c, i_k, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    t0, eos = tl.load(spans + 2 * i_c), tl.load(spans + 2 * i_c + 1)
    L = tl.minimum(eos - t0, BT)
    s = tl.load(decay + i_h)
    q += i_h * stride_qh
    k += i_h * stride_kh
    v += i_h * stride_vh
    do += i_h * stride_doh

    b_dp = tl.zeros([BT, BT], dtype=tl.float32)
    b_dq = tl.zeros([BT, BK], dtype=tl.float32)
    b_dk = tl.zeros([BT, BK], dtype=tl.float32)
    for i_v in range(0, tl.cdiv(V, BV)):
        b_v = load_rows(v, t0, L, stride_vt, i_v * BV, V, BT, BV)
        b_do = load_rows(do, t0, L, stride_dot, i_v * BV, V, BT, BV)
        p_h, m_kv = state_tile(h, i_c * H + i_h, i_k, i_v, K, V, BK, BV)
        p_dh, m_kv = state_tile(dh, i_c * H + i_h, i_k, i_v, K, V, BK, BV)
        b_h = tl.load(p_h, mask=m_kv, other=0.0)
        b_dh = tl.load(p_dh, mask=m_kv, other=0.0)
        b_dp += tl.dot(b_do, tl.trans(b_v), input_precision=PREC)
        b_dq += tl.dot(b_do, tl.trans(b_h), input_precision=PREC)
        b_dk += tl.dot(b_v, tl.trans(b_dh), input_precision=PREC)
    b_q = load_rows(q, t0, L, stride_qt, i_k * BK, K, BT, BK)
    b_k = load_rows(k, t0, L, stride_kt, i_k * BK, K, BT, BK)
    b_dp = b_dp * intra_decay(s, BT) * scale
    b_dq = tl.dot(b_dp, b_k, input_precision=PREC) + b_dq * (query_decay(s, BT) * scale)[:, None]
    b_dk = tl.dot(tl.trans(b_dp), b_q, input_precision=PREC) + b_dk * key_decay(s, L, BT)[:, None]
    store_rows(dq + i_h * K, t0, L, H * K, i_k * BK, b_dq, K, BT, BK)
    store_rows(dk + i_h * K, t0, L, H * K, i_k * BK, b_dk, K, BT, BK)


@triton.autotune(configs=autotune_configs(), key=["H", "K", "V", "BT", "BK", "BV"])
@triton.jit
def lightning_bwd_kernel_dv(
    q, k, do, dh, dv, decay, spans, scale,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_dot, stride_doh,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """Grid (NT, V/BV, H). dv [T, H, V] contiguous."""
    i_c, i_v, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    t0, eos = tl.load(spans + 2 * i_c), tl.load(spans + 2 * i_c + 1)
    L = tl.minimum(eos - t0, BT)
    s = tl.load(decay + i_h)
    q += i_h * stride_qh
    k += i_h * stride_kh
    do += i_h * stride_doh

    b_pt = tl.zeros([BT, BT], dtype=tl.float32)  # Pᵀ: [j, i] = k_j · q_i
    b_dv = tl.zeros([BT, BV], dtype=tl.float32)
    for i_k in range(0, tl.cdiv(K, BK)):
        b_q = load_rows(q, t0, L, stride_qt, i_k * BK, K, BT, BK)
        b_k = load_rows(k, t0, L, stride_kt, i_k * BK, K, BT, BK)
        p_dh, m_kv = state_tile(dh, i_c * H + i_h, i_k, i_v, K, V, BK, BV)
        b_dh = tl.load(p_dh, mask=m_kv, other=0.0)
        b_pt += tl.dot(b_k, tl.trans(b_q), input_precision=PREC)
        b_dv += tl.dot(b_k, b_dh, input_precision=PREC)
    b_do = load_rows(do, t0, L, stride_dot, i_v * BV, V, BT, BV)
    b_pt = b_pt * tl.trans(intra_decay(s, BT)) * scale
    b_dv = tl.dot(b_pt, b_do, input_precision=PREC) + b_dv * key_decay(s, L, BT)[:, None]
    store_rows(dv + i_h * V, t0, L, H * V, i_v * BV, b_dv, V, BT, BV)


def chunk_bwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    decay: Tensor,
    h: Tensor,
    do: Tensor,
    dfinal: Tensor | None,
    scale: float,
    chunks: Chunks,
    BT: int,
    need_dinit: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """Gradients of `fwd.chunk_fwd`. q, k [T, H, K], v, do [T, H, V] (unit stride along
    K/V); h [NT, H, K, V] the forward's chunk states; dfinal [N, H, K, V] or None.

    Returns dq, dk [T, H, K], dv [T, H, V] in the inputs' dtype, and d initial_state
    [N, H, K, V] float32 if need_dinit, else None.
    """
    _, H, K = q.shape
    V = v.shape[-1]
    N = chunks.cu.numel() - 1
    BK, BV = tile(K), tile(V)
    prec_out, prec_state = dot_precisions(q.dtype)
    dh = q.new_empty((chunks.num_chunks, H, K, V), dtype=torch.float32)
    dinit = q.new_empty((N, H, K, V), dtype=torch.float32) if need_dinit else None
    lightning_bwd_kernel_dstate[(N * H, triton.cdiv(K, BK), triton.cdiv(V, BV))](
        q, do, decay, dfinal, dh, dinit, chunks.cu, chunks.first, scale,
        q.stride(0), q.stride(1), do.stride(0), do.stride(1),
        H=H, K=K, V=V, BT=BT, BK=BK, BV=BV,
        USE_DHT=dfinal is not None, STORE_DH0=need_dinit, PREC=prec_state,
    )  # fmt: skip
    dq, dk, dv = q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)
    if chunks.num_chunks:
        lightning_bwd_kernel_dqk[(chunks.num_chunks, triton.cdiv(K, BK), H)](
            q, k, v, h, do, dh, dq, dk, decay, chunks.spans, scale,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            do.stride(0), do.stride(1),
            H=H, K=K, V=V, BT=BT, BK=BK, BV=BV, PREC=prec_out,
        )  # fmt: skip
        lightning_bwd_kernel_dv[(chunks.num_chunks, triton.cdiv(V, BV), H)](
            q, k, do, dh, dv, decay, chunks.spans, scale,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), do.stride(0), do.stride(1),
            H=H, K=K, V=V, BT=BT, BK=BK, BV=BV, PREC=prec_out,
        )  # fmt: skip
    return dq, dk, dv, dinit
