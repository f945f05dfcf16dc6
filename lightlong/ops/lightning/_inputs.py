"""Validation and defaults shared by every lightning-attention backend.

# B batch, T tokens, H heads, K/V head dims, N sequences
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import math
import os
from dataclasses import dataclass

import torch
from torch import Tensor

from lightlong.ops.varlen import check_cu_seqlens

logger = logging.getLogger(__name__)

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

BACKENDS = ("auto", "torch", "triton")
TRITON_BLOCK_SIZES = (16, 32, 64, 128)
"""Block sizes the Triton kernels take: powers of two of at least tl.dot's minimum, 16."""


@dataclass(frozen=True)
class LightningInputs:
    """Checked arguments of a lightning-attention call, with defaults filled in."""

    scale: float
    offsets: list[int]
    """Sequence boundaries on the flattened [B·T] token axis, N + 1 entries."""
    state_dtype: torch.dtype
    """float64 for float64 inputs (the oracle), float32 otherwise."""

    @property
    def num_seqs(self) -> int:
        return len(self.offsets) - 1


def check_inputs(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    decay: Tensor,
    scale: float | None,
    initial_state: Tensor | None,
    cu_seqlens: Tensor | None,
) -> LightningInputs:
    """Validates the arguments of `lightning_attn` and its references; raises ValueError.

    q, k: [B, T, H, K]; v: [B, T, H, V]; decay: [H]; initial_state: [N, H, K, V];
    cu_seqlens: int64 [N + 1] with B == 1.
    """
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"{name} must be 4-D [B, T, H, D], got shape {tuple(x.shape)}")
        if x.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype}")
    if k.shape != q.shape:
        raise ValueError(
            f"k must have q's shape {tuple(q.shape)} [B, T, H, K], got {tuple(k.shape)}"
        )
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(
            f"v must be [B, T, H, V] with B, T, H = {tuple(q.shape[:3])} as in q, "
            f"got {tuple(v.shape)}"
        )
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    B, T, H, K = q.shape
    V = v.shape[-1]
    if K == 0 or V == 0 or H == 0:
        raise ValueError(f"head count and head dims must be positive, got H={H}, K={K}, V={V}")

    if not isinstance(decay, Tensor) or decay.shape != (H,):
        shape = tuple(decay.shape) if isinstance(decay, Tensor) else type(decay).__name__
        raise ValueError(f"decay must be a tensor of shape [H] = [{H}], got {shape}")
    if not (q.device == k.device == v.device == decay.device):
        raise ValueError(
            f"q, k, v, decay must be on one device, got {q.device}, {k.device}, {v.device}, "
            f"{decay.device}"
        )
    if not decay.is_floating_point():
        raise ValueError(f"decay must be a floating tensor, got {decay.dtype}")
    if not bool(torch.isfinite(decay).all()) or bool((decay < 0).any()):
        raise ValueError(f"decay rates must be finite and >= 0, got {decay.tolist()}")

    if scale is None:
        scale = K**-0.5
    elif not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite float or None, got {scale!r}")

    if cu_seqlens is None:
        offsets = [b * T for b in range(B + 1)]
    else:
        offsets = check_cu_seqlens(cu_seqlens, B, T)

    state_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    N = len(offsets) - 1
    if initial_state is not None:
        if not isinstance(initial_state, Tensor) or initial_state.shape != (N, H, K, V):
            shape = tuple(initial_state.shape) if isinstance(initial_state, Tensor) else None
            raise ValueError(
                f"initial_state must be [N, H, K, V] = [{N}, {H}, {K}, {V}], got {shape}"
            )
        if not initial_state.is_floating_point():
            raise ValueError(f"initial_state must be floating, got {initial_state.dtype}")
        if initial_state.device != q.device:
            raise ValueError(f"initial_state must be on {q.device}, got {initial_state.device}")
    return LightningInputs(scale=float(scale), offsets=offsets, state_dtype=state_dtype)


def zero_rates(q: Tensor) -> Tensor:
    """Decay rates 0 [H] for q [B, T, H, K] (plain linear attention); empty for a malformed q,
    which `check_inputs` then rejects with its own message."""
    ok = isinstance(q, Tensor) and q.dim() == 4
    return torch.zeros(q.shape[2] if ok else 0, device=q.device if ok else None)


@functools.cache
def triton_installed() -> bool:
    """Whether triton can be imported (checked without importing it)."""
    return importlib.util.find_spec("triton") is not None


def resolve_backend(backend: str, x: Tensor, op: str) -> str:
    """The backend an op runs on `x` (its q), for backend = "auto", "torch" or "triton".

    "auto" is "triton" for float16/bfloat16/float32 CUDA tensors when triton is installed,
    "torch" otherwise, and logs its choice. "triton" needs triton, float16/bfloat16/float32
    and a CUDA tensor, or TRITON_INTERPRET=1 (set before triton is imported) to run the
    kernels on the CPU interpreter. Raises ValueError naming the backend otherwise.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        fits = x.device.type == "cuda" and x.dtype != torch.float64
        chosen = "triton" if fits and triton_installed() else "torch"
        logger.debug("%s: backend 'auto' -> %r for %s on %s", op, chosen, x.dtype, x.device)
        return chosen
    if backend == "triton":
        if not triton_installed():
            raise ValueError(
                "backend='triton' needs the triton package: pip install 'lightlong[triton]'"
            )
        if x.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(
                f"backend='triton' expects CUDA tensors, got q on {x.device}; use "
                "backend='torch' (or 'auto'), or set TRITON_INTERPRET=1 before triton is "
                "imported to run the kernels on the CPU interpreter"
            )
        if x.dtype == torch.float64:
            raise ValueError(
                "backend='triton' expects float16, bfloat16 or float32 inputs, got "
                "torch.float64 (the reference dtype: use backend='torch')"
            )
    return backend
