"""Local softmax attention: a causal sliding window, and causal blocks (TransNormer's
DiagAttention), with GQA and scale 1/√D, over packed sequences and over a rolling cache.

Window W: the query at position p sees keys at positions p − W < j ≤ p.
Block b:  the query at position p sees keys at positions j ≤ p with j // b == p // b.
Positions count from each sequence's start (they restart at every cu_seqlens offset).

The fast paths cost O(T·W) (O(T·b)): no [T, T] mask is built. The `_naive` references
build that mask from positions and run an explicit softmax, in the inputs' dtype (float64
makes them the oracle; bf16 shows what a plain bf16 implementation gets wrong).

# B batch, T tokens, H query heads, G key/value heads, D head dim, W window, b block,
# C chunks (of W tokens) or blocks (of b tokens), S cache slots, N sequences
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import Tensor

from .attention import positions_in_sequence
from .varlen import check_cu_seqlens


def _check_size(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return value


def _check_qkv(q: Tensor, k: Tensor, v: Tensor) -> None:
    if q.dim() != 4:
        raise ValueError(f"q must be [B, T, H, D], got shape {tuple(q.shape)}")
    if k.dim() != 4 or k.shape != v.shape:
        raise ValueError(
            f"k and v must both be [B, T, G, D], got k {tuple(k.shape)} and v {tuple(v.shape)}"
        )
    B, T, H, D = q.shape
    if k.shape[:2] != (B, T) or k.shape[3] != D:
        raise ValueError(
            f"k/v {tuple(k.shape)} must match q {tuple(q.shape)} in B, T and D ([B, T, G, D])"
        )
    if H % k.shape[2] != 0:
        raise ValueError(f"k/v heads G={k.shape[2]} must divide q heads H={H}")


def _offsets(q: Tensor, cu_seqlens: Tensor | None) -> list[int]:
    B, T = q.shape[:2]
    return [0, T] if cu_seqlens is None else check_cu_seqlens(cu_seqlens, B, T)


# ------------------------------------------------------------------------ fast paths


def window_attention(
    q: Tensor, k: Tensor, v: Tensor, *, window: int, cu_seqlens: Tensor | None = None
) -> Tensor:
    """Causal sliding-window softmax attention: position p sees keys p − W < j ≤ p.

    q [B, T, H, D], k/v [B, T, G, D] with G dividing H; window W >= 1 (the query itself
    included); cu_seqlens int64 [N + 1] with B == 1 (no attention across sequences).
    Returns [B, T, H, D] in q's dtype.

    Each sequence is cut into chunks of W' = min(W, its length) queries; chunk c sees the
    2W' keys of chunks c − 1 and c under a [W', 2W'] band mask: one SDPA call per sequence.
    """
    _check_qkv(q, k, v)
    window = _check_size(window, "window")
    offsets = _offsets(q, cu_seqlens)
    outs = [
        _window_one(q[:, a:e], k[:, a:e], v[:, a:e], min(window, e - a))
        for a, e in itertools.pairwise(offsets)
        if e > a
    ]
    return torch.cat(outs, dim=1) if outs else torch.zeros_like(q)


def _window_one(q: Tensor, k: Tensor, v: Tensor, W: int) -> Tensor:
    """One sequence per batch row: q [B, L, H, D], k/v [B, L, G, D], 1 <= W <= L."""
    B, L, H, D = q.shape
    G = k.shape[2]
    C = -(-L // W)
    tail = C * W - L
    q_BCWHD = F.pad(q, (0, 0, 0, 0, 0, tail)).reshape(B, C, W, H, D)
    # keys padded by one empty chunk in front (the first chunk's missing predecessor)
    k_pad, v_pad = (F.pad(x, (0, 0, 0, 0, W, tail)) for x in (k, v))  # [B, (C + 1)·W, G, D]

    def band(x: Tensor) -> Tensor:  # [B, (C + 1)·W, G, D] -> [B·C, G, 2W, D]
        prev, cur = x[:, : C * W], x[:, W:]
        x_BC2WGD = torch.cat([prev.reshape(B, C, W, G, D), cur.reshape(B, C, W, G, D)], dim=2)
        return x_BC2WGD.reshape(B * C, 2 * W, G, D).transpose(1, 2)

    # query i of a chunk (position cW + i) and key j (position cW − W + j): i < j <= i + W
    i = torch.arange(W, device=q.device)[:, None]
    j = torch.arange(2 * W, device=q.device)[None, :]
    band_W2W = (j > i) & (j <= i + W)
    first_chunk_C11 = (torch.arange(C, device=q.device) == 0)[:, None, None]
    mask_CW2W = band_W2W & ~(first_chunk_C11 & (j < W))
    mask = mask_CW2W[None, :, None].expand(B, C, 1, W, 2 * W).reshape(B * C, 1, W, 2 * W)

    q_XHWD = q_BCWHD.reshape(B * C, W, H, D).transpose(1, 2)  # X = B·C chunks
    o_XHWD = F.scaled_dot_product_attention(
        q_XHWD, band(k_pad), band(v_pad), attn_mask=mask, enable_gqa=True
    )
    return o_XHWD.transpose(1, 2).reshape(B, C * W, H, D)[:, :L]


def block_attention(
    q: Tensor, k: Tensor, v: Tensor, *, block: int, cu_seqlens: Tensor | None = None
) -> Tensor:
    """Block-diagonal causal softmax attention (TransNormer's DiagAttention): position p
    sees keys j <= p in its own block of b tokens, j // b == p // b, counted from each
    sequence's start.

    q [B, T, H, D], k/v [B, T, G, D] with G dividing H; block b >= 1; cu_seqlens int64
    [N + 1] with B == 1. Returns [B, T, H, D] in q's dtype.

    Every sequence is padded at its end to whole blocks of b' = min(b, longest sequence)
    and all blocks of all sequences go through one causal SDPA call.
    """
    _check_qkv(q, k, v)
    block = _check_size(block, "block")
    offsets = _offsets(q, cu_seqlens)
    B, T, H, D = q.shape
    lengths = [e - a for a, e in itertools.pairwise(offsets)]
    if T == 0:
        return torch.zeros_like(q)
    b = min(block, max(lengths))  # a block longer than every sequence is plain causal
    spans = []  # (start, length, real) along T: each sequence, then its padding to whole blocks
    for a, e in itertools.pairwise(offsets):
        spans.append((a, e - a, True))
        if (e - a) % b:
            spans.append((0, b - (e - a) % b, False))

    def blocks(x: Tensor) -> Tensor:  # [B, T, h, D] -> [B·C, h, b, D]
        zeros = x.new_zeros(B, b, x.shape[2], D)
        parts = [x[:, a : a + n] if real else zeros[:, :n] for a, n, real in spans]
        x_BPhD = torch.cat(parts, dim=1)  # P = C·b padded tokens
        return x_BPhD.reshape(-1, b, x.shape[2], D).transpose(1, 2)

    o_XHbD = F.scaled_dot_product_attention(
        blocks(q), blocks(k), blocks(v), is_causal=True, enable_gqa=True
    )
    o_BPHD = o_XHbD.transpose(1, 2).reshape(B, -1, H, D)
    outs, at = [], 0
    for _, n, real in spans:
        if real:
            outs.append(o_BPHD[:, at : at + n])
        at += n
    return torch.cat(outs, dim=1)


# ------------------------------------------------------------------------ references


def _visible_naive(T: int, cu_seqlens: Tensor | None, device: torch.device, rule) -> Tensor:
    """bool [T, T]: query t sees key s (same sequence, causal, and rule(pos_t, pos_s))."""
    pos = positions_in_sequence(T, cu_seqlens, device)
    if cu_seqlens is None:
        seq = torch.zeros_like(pos)
    else:
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).to(device)
        seq = torch.repeat_interleave(torch.arange(len(lengths), device=device), lengths)
    p, j = pos[:, None], pos[None, :]
    return (seq[:, None] == seq[None, :]) & (j <= p) & rule(p, j)


def _softmax_naive(q: Tensor, k: Tensor, v: Tensor, visible_TT: Tensor) -> Tensor:
    """Explicit softmax attention in the inputs' dtype under a [T, T] mask."""
    group = q.shape[2] // k.shape[2]
    k_BTHD, v_BTHD = k.repeat_interleave(group, 2), v.repeat_interleave(group, 2)
    scores_BHTT = torch.einsum("bthd,bshd->bhts", q, k_BTHD) * q.shape[3] ** -0.5
    scores_BHTT = scores_BHTT.masked_fill(~visible_TT, float("-inf"))
    return torch.einsum("bhts,bshd->bthd", scores_BHTT.softmax(dim=-1), v_BTHD)


def window_attention_naive(
    q: Tensor, k: Tensor, v: Tensor, *, window: int, cu_seqlens: Tensor | None = None
) -> Tensor:
    """`window_attention` from its definition: a dense [T, T] mask, explicit softmax.
    Same arguments and shapes; O(T²) time and memory, for tests."""
    _check_qkv(q, k, v)
    window = _check_size(window, "window")
    _offsets(q, cu_seqlens)
    visible = _visible_naive(q.shape[1], cu_seqlens, q.device, lambda p, j: j > p - window)
    return _softmax_naive(q, k, v, visible)


def block_attention_naive(
    q: Tensor, k: Tensor, v: Tensor, *, block: int, cu_seqlens: Tensor | None = None
) -> Tensor:
    """`block_attention` from its definition: a dense [T, T] mask, explicit softmax.
    Same arguments and shapes; O(T²) time and memory, for tests."""
    _check_qkv(q, k, v)
    block = _check_size(block, "block")
    _offsets(q, cu_seqlens)
    visible = _visible_naive(
        q.shape[1],
        cu_seqlens,
        q.device,
        lambda p, j: (
            torch.div(j, block, rounding_mode="floor") == torch.div(p, block, rounding_mode="floor")
        ),
    )
    return _softmax_naive(q, k, v, visible)


# ----------------------------------------------------------------------- inference


def empty_local_cache(
    B: int, G: int, S: int, D: int, dtype: torch.dtype, device: torch.device | str | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """An empty rolling cache for `local_attention_cached`: k_cache, v_cache [B, G, S, D]
    zeros in dtype, pos_cache int64 [B, S] all −1 (empty slots)."""
    k_cache = torch.zeros(B, G, S, D, dtype=dtype, device=device)
    pos_cache = torch.full((B, S), -1, dtype=torch.int64, device=device)
    return k_cache, torch.zeros_like(k_cache), pos_cache


def local_attention_cached(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    pos_cache: Tensor,
    positions: Tensor,
    *,
    window: int | None = None,
    block: int | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Window or block attention of new tokens over a rolling cache (chunked prefill and
    decode alike). Exactly one of window, block is given.

    q [B, T, H, D], k/v [B, T, G, D]: the new tokens, at positions int64 [B, T] within their
    sequences (rows may differ, e.g. left-padded batches; a position < 0 marks a pad: its
    key is never visible and its output is zeros). k_cache/v_cache [B, G, S, D] and
    pos_cache int64 [B, S] hold each row's most recent S keys and their positions (−1: empty
    slot), S >= window (or block), oldest first, as returned by `empty_local_cache` or by
    the previous call.

    Returns o [B, T, H, D] and the new k_cache, v_cache, pos_cache (new tensors of the
    given shapes): the last S slots of cache and new keys concatenated.
    """
    if (window is None) == (block is None):
        raise ValueError(
            f"give exactly one of window and block, got window={window!r}, block={block!r}"
        )
    size = _check_size(window, "window") if block is None else _check_size(block, "block")
    _check_qkv(q, k, v)
    B, T, _, D = q.shape
    G = k.shape[2]
    if k_cache.dim() != 4 or k_cache.shape[:2] != (B, G) or k_cache.shape[3] != D:
        raise ValueError(f"k_cache must be [B={B}, G={G}, S, D={D}], got {tuple(k_cache.shape)}")
    S = k_cache.shape[2]
    if v_cache.shape != k_cache.shape:
        raise ValueError(
            f"v_cache must match k_cache {tuple(k_cache.shape)}, got {tuple(v_cache.shape)}"
        )
    if k_cache.dtype != k.dtype or v_cache.dtype != v.dtype:
        raise ValueError(
            f"k_cache/v_cache dtypes ({k_cache.dtype}, {v_cache.dtype}) must match k/v ({k.dtype})"
        )
    if size > S:
        name = "window" if block is None else "block"
        raise ValueError(f"k_cache holds S={S} slots, fewer than {name}={size}")
    if pos_cache.shape != (B, S) or pos_cache.dtype != torch.int64:
        raise ValueError(
            f"pos_cache must be int64 [B={B}, S={S}], "
            f"got {pos_cache.dtype} {tuple(pos_cache.shape)}"
        )
    if positions.shape != (B, T) or positions.dtype != torch.int64:
        raise ValueError(
            f"positions must be int64 [B={B}, T={T}], "
            f"got {positions.dtype} {tuple(positions.shape)}"
        )

    k_all, v_all = (
        torch.cat([k_cache, k.transpose(1, 2)], 2),
        torch.cat([v_cache, v.transpose(1, 2)], 2),
    )
    pos_all = torch.cat([pos_cache, positions], dim=1)  # [B, S + T]
    p_BT1, j_B1L = positions[:, :, None], pos_all[:, None, :]  # L = S + T
    if block is None:
        rule = j_B1L > p_BT1 - window
    else:
        rule = torch.div(j_B1L, block, rounding_mode="floor") == torch.div(
            p_BT1, block, rounding_mode="floor"
        )
    visible_BTL = (j_B1L >= 0) & (j_B1L <= p_BT1) & rule
    # a query seeing nothing (a pad) attends everywhere, then is zeroed: never NaN
    seen_BT1 = visible_BTL.any(dim=-1, keepdim=True)
    mask_B1TL = (visible_BTL | ~seen_BT1)[:, None]
    o_BHTD = F.scaled_dot_product_attention(
        q.transpose(1, 2), k_all, v_all, attn_mask=mask_B1TL, enable_gqa=True
    )
    o = o_BHTD.transpose(1, 2) * seen_BT1[:, :, :, None].to(q.dtype)

    # clone: the kept slots own their storage, not the whole S + T concatenation
    return o, k_all[:, :, -S:].clone(), v_all[:, :, -S:].clone(), pos_all[:, -S:].clone()
