"""`lightning_attn`: the public op. Checks inputs, fills defaults, picks a backend.

# B batch, T tokens, H heads, K/V head dims, C block, N sequences
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor

from ._inputs import TRITON_BLOCK_SIZES, check_inputs, resolve_backend
from .chunk import LightningChunkFn, make_plan, release_workspace, workspace_bytes

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_BLOCK_SIZE", "lightning_attn", "release_workspace", "workspace_bytes"]

# Bytes of q, k, v (as float32) per group of blocks per torch thread. A group's working set
# is ~3.5x this (q, k, [P | q ⊙ a], [v ; S], the state contributions, o) and must stay in
# the caches, while each group costs ~15 op calls (~40 us of Python and dispatch). At H=8,
# K=V=128, C=64 (768 KiB per block; 2-core EPYC): 1 thread, 1 block per group ran 1.1x
# faster than 2 and 1.3x faster than 4; 2 threads, 2 blocks ran ~1.1x faster than 1.
_GROUP_BYTES = 2**20


def group_blocks(H: int, K: int, V: int, C: int) -> int:
    """Blocks per group: _GROUP_BYTES of float32 q, k, v per torch thread, at least one."""
    return max(1, _GROUP_BYTES * torch.get_num_threads() // (4 * H * (2 * K + V) * C))


# Block size C when the caller passes None. Measured at T=64K, H=8, K=V=128, fp32 on a
# 2-core Xeon (tok/s forward / forward+backward): C=32 160K/43K, C=64 173K/51K,
# C=128 154K/46K, C=256 121K/36K; again with the fused output matmul at T=16K on a 2-core
# EPYC (forward tok/s, 1 thread): C=32 85K, C=64 86K, C=128 64K; bf16 C=64 109K, C=128 97K.
# Smaller blocks waste less of the masked intra-block product, larger ones make bigger
# matmuls; 64 balances the two.
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

    On the torch path, bfloat16 inputs run the block matmuls of the output in bfloat16
    (float32 accumulation; states, decay factors and the state matmuls in float32). The
    torch path keeps its block buffers between calls, and on the CPU reuses the memory of
    a large output the caller has dropped, so repeated calls do not allocate afresh
    (bounded; `release_workspace()` frees it, `workspace_bytes()` tells how much is kept).
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

    group = group_blocks(H, K, V, block_size)
    # bf16 inputs: the output matmuls in bf16 (float32 accumulation); the states stay float32
    mm_dtype = torch.bfloat16 if q.dtype == torch.bfloat16 else args.state_dtype
    plan = make_plan(args.offsets, decay, args.scale, block_size, group, args.state_dtype, mm_dtype)
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
