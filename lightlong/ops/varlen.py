"""Packed sequences: checking `cu_seqlens` (FlashAttention's convention)."""

from __future__ import annotations

import itertools

import torch
from torch import Tensor


def check_cu_seqlens(cu_seqlens: Tensor, batch: int, total: int) -> list[int]:
    """Validates offsets [N + 1] of sequences packed along T (B == 1); returns them as ints."""
    if not isinstance(cu_seqlens, Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError("cu_seqlens must be a 1-D tensor [N + 1] of sequence offsets")
    if cu_seqlens.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"cu_seqlens must be int64 (or int32), got {cu_seqlens.dtype}")
    if batch != 1:
        raise ValueError(f"with cu_seqlens the batch must be packed into B == 1, got B={batch}")
    offsets = cu_seqlens.tolist()
    if offsets[0] != 0 or offsets[-1] != total:
        raise ValueError(
            f"cu_seqlens must start at 0 and end at T={total}, got {offsets[0]} ... {offsets[-1]}"
        )
    if any(b < a for a, b in itertools.pairwise(offsets)):
        raise ValueError(f"cu_seqlens must be non-decreasing, got {offsets}")
    return offsets
