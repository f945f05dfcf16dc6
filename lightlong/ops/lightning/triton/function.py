"""`lightning_attn`'s Triton backend: the autograd Function around the fwd and bwd kernels.

What the forward saves for the backward: q, k, v, the initial state and h [NT, H, K, V]
float32, the state entering every chunk, which the output kernel needs anyway. Keeping it
saves the backward a sequential pass (recomputing h) at the cost of K·V·4/BT bytes per token
and head (1.3x bf16 q, k, v at K = V = 128, BT = 64); under activation checkpointing it
lives only while its layer runs backward. Nothing is saved when no input requires grad.

# B batch, T tokens, H heads, K/V head dims, BT chunk, N sequences, NT chunks
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ._common import CHUNK_SIZES, Chunks, chunk_tables, flat
from .bwd import chunk_bwd
from .fwd import chunk_fwd


class LightningTritonFn(torch.autograd.Function):
    """Autograd for the chunked Triton kernels: `chunk_fwd` and the hand-written `chunk_bwd`."""

    @staticmethod
    def forward(ctx, q, k, v, init, decay, scale, chunks, BT, output_final_state, needs_grad):
        o, final, h = chunk_fwd(q, k, v, decay, init, scale, chunks, BT, output_final_state)
        if needs_grad:
            ctx.save_for_backward(q, k, v, init, decay, h)
        ctx.scale, ctx.chunks, ctx.BT = scale, chunks, BT
        ctx.set_materialize_grads(False)
        return o, final

    @staticmethod
    @once_differentiable
    def backward(ctx, do, dfinal):
        q, k, v, init, decay, h = ctx.saved_tensors
        # no gradient reached o (only the final state is used): a zero cotangent
        do = v.new_zeros(v.shape) if do is None else do
        do = do if do.stride(-1) == 1 else do.contiguous()
        dfinal = None if dfinal is None else dfinal.contiguous()
        need_dinit = init is not None and ctx.needs_input_grad[3]
        dq, dk, dv, dinit = chunk_bwd(
            q, k, v, decay, h, do, dfinal, ctx.scale, ctx.chunks, ctx.BT, need_dinit
        )
        dinit = dinit.to(init.dtype) if need_dinit else None
        return dq, dk, dv, dinit, None, None, None, None, None, None


def lightning_attn_triton(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    decay: Tensor,
    scale: float,
    offsets: list[int],
    initial_state: Tensor | None,
    output_final_state: bool,
    block_size: int,
) -> tuple[Tensor, Tensor | None]:
    """The checked arguments of `lightning_attn` (see `_inputs.check_inputs`) on the kernels.

    q, k [B, T, H, K], v [B, T, H, V] float16/bfloat16/float32; offsets: N + 1 sequence
    boundaries on the flattened B·T axis; block_size: the chunk BT, one of CHUNK_SIZES.
    Returns o [B, T, H, V] and final [N, H, K, V] float32 or None.
    """
    B, T, H, _ = q.shape
    V = v.shape[-1]
    BT = block_size
    assert BT in CHUNK_SIZES, BT
    chunks: Chunks = chunk_tables(offsets, BT, q.device)
    inputs = (q, k, v, initial_state)
    needs_grad = torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in inputs)
    init = None if initial_state is None else initial_state.contiguous()
    o, final = LightningTritonFn.apply(
        flat(q), flat(k), flat(v), init, decay.to(torch.float32).contiguous(),
        scale, chunks, BT, output_final_state, needs_grad,
    )  # fmt: skip
    return o.view(B, T, H, V), final
