"""Softmax attention pieces: partial rotary embeddings and causal SDPA over packed sequences.

# B batch, T tokens, H query heads, G key/value heads, D head dim, R rotary dims, N sequences
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import Tensor


def positions_in_sequence(T: int, cu_seqlens: Tensor | None, device: torch.device) -> Tensor:
    """int64 [T]: each token's position within its own sequence (restarts at each offset)."""
    pos = torch.arange(T, device=device)
    if cu_seqlens is None:
        return pos
    starts = cu_seqlens[:-1].to(device)
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).to(device)
    return pos - torch.repeat_interleave(starts, lengths, output_size=T)


def rotary_cos_sin(
    positions: Tensor, rotary_dim: int, theta: float, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """cos, sin [..., T, R] for RoPE on the first R dims (GPT-NeoX halves layout), for
    positions [..., T] ([T] shared by the batch, or [B, T] per sequence).

    Angles are computed in fp32 (fp64 for fp64 models), then cast to dtype.
    """
    wide = torch.float64 if dtype == torch.float64 else torch.float32
    inv_freq = theta ** -(
        torch.arange(0, rotary_dim, 2, device=positions.device, dtype=wide) / rotary_dim
    )
    angles_TR2 = positions.to(wide)[..., None] * inv_freq
    angles_TR = torch.cat([angles_TR2, angles_TR2], dim=-1)
    return angles_TR.cos().to(dtype), angles_TR.sin().to(dtype)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotates the first R dims of x [B, T, H, D] by cos, sin [T, R] or [B, T, R]
    (R = cos.shape[-1]); the rest pass through."""
    R = cos.shape[-1]
    if R == 0:
        return x
    rot, rest = x[..., :R], x[..., R:]
    x1, x2 = rot.chunk(2, dim=-1)
    cos_BT1R, sin_BT1R = cos.unsqueeze(-2), sin.unsqueeze(-2)
    rotated = rot * cos_BT1R + torch.cat([-x2, x1], dim=-1) * sin_BT1R
    return torch.cat([rotated, rest], dim=-1)


def causal_attention(
    q: Tensor, k: Tensor, v: Tensor, *, cu_seqlens: Tensor | None = None
) -> Tensor:
    """Causal softmax attention with GQA, scale 1/√D, no attention across packed sequences.

    q [B, T, H, D], k/v [B, T, G, D] with G dividing H; cu_seqlens int64 [N + 1] with B == 1.
    Returns [B, T, H, D]. Each packed sequence is one SDPA call: no [T, T] mask is built.
    """
    group = q.shape[2] // k.shape[2]
    q_BHTD, k_BGTD, v_BGTD = (x.transpose(1, 2) for x in (q, k, v))
    if group > 1:
        k_BGTD = k_BGTD.repeat_interleave(group, dim=1)
        v_BGTD = v_BGTD.repeat_interleave(group, dim=1)
    if cu_seqlens is None:
        out = F.scaled_dot_product_attention(q_BHTD, k_BGTD, v_BGTD, is_causal=True)
        return out.transpose(1, 2)
    outs = [
        F.scaled_dot_product_attention(
            q_BHTD[:, :, a:b], k_BGTD[:, :, a:b], v_BGTD[:, :, a:b], is_causal=True
        )
        for a, b in itertools.pairwise(cu_seqlens.tolist())
    ]
    return torch.cat(outs, dim=2).transpose(1, 2)


# Most bytes of boolean mask one SDPA call of `cached_attention` may build.
_MASK_BYTES = 32 * 2**20


def cached_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, *, start: int | Tensor) -> Tensor:
    """Causal softmax attention (GQA, scale 1/√D) of new queries over a KV cache.

    q [B, T, H, D] are the tokens at cache slots start … start + T − 1; k_cache/v_cache
    [B, G, L, D] hold slots 0 … L − 1 (L >= start + T, the new tokens included). `start` is
    one slot for every row, or int64 [B], one per row (rows of different lengths): then a
    row's slots past start_b + T − 1 are not its own and no query of it sees them.
    Returns [B, T, H, D].
    """
    B, T = q.shape[:2]
    L = k_cache.shape[2]
    q_BHTD = q.transpose(1, 2)
    per_row = isinstance(start, Tensor)
    if not per_row and T == 1 and start + 1 == L:  # decoding: every cached slot is visible
        out = F.scaled_dot_product_attention(q_BHTD, k_cache, v_cache, enable_gqa=True)
        return out.transpose(1, 2)
    if not per_row and start + T == L and q.device.type == "cpu":
        return _past_and_causal(q_BHTD, k_cache, v_cache, start).transpose(1, 2)
    slot_L = torch.arange(L, device=q.device)
    start_B1 = start.to(q.device)[:, None] if per_row else torch.tensor([[start]], device=q.device)
    step = max(1, _MASK_BYTES // (B * L))
    outs = []
    for a in range(0, T, step):
        query_Bt = start_B1 + torch.arange(a, min(a + step, T), device=q.device)
        mask_B1tL = (slot_L <= query_Bt[..., None])[:, None]
        outs.append(
            F.scaled_dot_product_attention(
                q_BHTD[:, :, a : a + step], k_cache, v_cache, attn_mask=mask_B1tL, enable_gqa=True
            )
        )
    return torch.cat(outs, dim=2).transpose(1, 2)


def _past_and_causal(q: Tensor, k: Tensor, v: Tensor, start: int) -> Tensor:
    """`cached_attention` without padding on the CPU, with no mask: the queries [B, H, T, D]
    see every cached slot before `start` (one unmasked flash call, the query heads of each
    KV head folded into its rows) and their own T slots causally (a second call); the two
    are merged by their log-sum-exps. k, v [B, G, start + T, D]. Returns [B, H, T, D]."""
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    B, H, T, D = q.shape
    G = k.shape[1]
    group = H // G
    k_new, v_new = k[:, :, start:], v[:, :, start:]
    if group > 1:
        k_new, v_new = k_new.repeat_interleave(group, 1), v_new.repeat_interleave(group, 1)
    o_new, lse_new = flash(q, k_new, v_new, 0.0, True)
    if start == 0:
        return o_new
    q_BGXD = q.reshape(B, G, group * T, D)  # X = group·T rows per KV head
    o_past, lse_past = flash(q_BGXD, k[:, :, :start], v[:, :, :start], 0.0, False)
    o_past, lse_past = o_past.reshape(B, H, T, D), lse_past.reshape(B, H, T)
    lse = torch.logaddexp(lse_past, lse_new)
    w_past = torch.exp(lse_past - lse)[..., None]
    w_new = torch.exp(lse_new - lse)[..., None]
    wide = torch.promote_types(q.dtype, torch.float32)
    return (o_past.to(wide) * w_past + o_new.to(wide) * w_new).to(q.dtype)
