"""`lightning_attn`: the public op. Checks inputs, fills defaults, picks a backend.

# B batch, T tokens, H heads, K/V head dims, C block, N sequences
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor

from ._inputs import TRITON_BLOCK_SIZES, check_inputs, resolve_backend
from .chunk import LightningChunkFn, make_plan

logger = logging.getLogger(__name__)

# Bytes of q, k, v per group of blocks processed together: small enough that a group's
# working set stays in the CPU's caches (measured: 8 MiB is ~1.4x faster than 32 MiB at
# H=8, K=V=128 on a 2-core Xeon), large enough that Python overhead per group is noise.
_GROUP_BYTES = 8 * 2**20


# Block size C when the caller passes None. Measured at T=64K, H=8, K=V=128, fp32 on a
# 2-core Xeon (tok/s forward / forward+backward): C=32 160K/43K, C=64 173K/51K,
# C=128 154K/46K, C=256 121K/36K. Smaller blocks waste less of the masked intra-block
# product, larger ones make bigger matmuls; 64 balances the two.
DEFAULT_BLOCK_SIZE = 64


def lightning_attn(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    decay: Tensor,
    *,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: Tensor | None = None,
    block_size: int | None = None,
    backend: str = "auto",
) -> tuple[Tensor, Tensor | None]:
    """Causal linear attention with per-head exponential decay, computed in blocks.

        S_t = λ_h S_{t−1} + k_tᵀ v_t,   o_t = scale · q_t S_t,   λ_h = exp(−decay[h])

    Args:
        q, k: [B, T, H, K]; v: [B, T, H, V]; float16, bfloat16, float32 or float64.
        decay: [H] rates s_h >= 0 (0 is plain linear attention); not differentiated.
        scale: None means K**-0.5 (MiniMax's layers pass 1.0).
        initial_state: [N, H, K, V], the state before each sequence's first token.
        output_final_state: also return each sequence's state after its last token.
        cu_seqlens: int64 [N + 1] offsets of sequences packed along T, with B == 1.
        block_size: tokens per block C; None means DEFAULT_BLOCK_SIZE (64). The Triton
            kernels take 16, 32, 64 or 128 (others are an error for backend "triton"; "auto"
            runs them with 64 and logs it: the result does not depend on C).
        backend: "torch" (the tiled torch path, any device), "triton" (fused kernels, CUDA;
            float16/bfloat16/float32) or "auto" (triton on CUDA when installed, else torch).

    Returns:
        o [B, T, H, V] in q's dtype; final_state [N, H, K, V] float32 (float64 for float64
        inputs) or None. N is B, or the number of packed sequences. Accumulation is float32.
    """
    args = check_inputs(q, k, v, decay, scale, initial_state, cu_seqlens)
    chosen = resolve_backend(backend, q, "lightning_attn")
    if decay.requires_grad and torch.is_grad_enabled():
        raise ValueError("decay must not require grad: the op treats decay rates as constants")
    B, T, H, K = q.shape
    V = v.shape[-1]
    if block_size is None:
        block_size = DEFAULT_BLOCK_SIZE
    elif not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < 1:
        raise ValueError(f"block_size must be a positive int or None, got {block_size!r}")
    if chosen == "triton":
        if block_size not in TRITON_BLOCK_SIZES and backend == "triton":
            raise ValueError(
                f"block_size for backend='triton' must be one of {TRITON_BLOCK_SIZES} or None, "
                f"got {block_size!r}"
            )
        if block_size not in TRITON_BLOCK_SIZES:  # "auto": the result does not depend on C
            logger.debug(
                "lightning_attn: block_size %d -> %d for triton", block_size, DEFAULT_BLOCK_SIZE
            )
            block_size = DEFAULT_BLOCK_SIZE
        from .triton import lightning_attn_triton

        return lightning_attn_triton(
            q, k, v, decay, args.scale, args.offsets, initial_state, output_final_state, block_size
        )

    group = max(1, _GROUP_BYTES // (4 * H * (2 * K + V) * block_size))
    plan = make_plan(args.offsets, decay, args.scale, block_size, group, args.state_dtype)
    inputs = (q, k, v, initial_state)
    o, final = LightningChunkFn.apply(
        q.reshape(B * T, H, K),
        k.reshape(B * T, H, K),
        v.reshape(B * T, H, V),
        initial_state,
        plan,
        args.num_seqs,
        torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in inputs),
    )
    return o.view(B, T, H, V), (final if output_final_state else None)
