"""NormAttention (Qin et al., 2022, "The Devil in Linear Transformer", TransNormer).

Linear attention without the softmax-like denominator, its output normalised instead; an
optional per-head decay makes it lightning attention without the output gate:

    o_raw = lightning_attn(q, k, v, decay, scale=1),   o = o_raw / sqrt(mean(o_raw²) + eps) · w

the mean taken over all heads' outputs of a token (H·V values), w = norm_weight [H·V].

# B batch, T tokens, H heads, K/V head dims, N sequences
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .lightning import lightning_attn, lightning_attn_naive
from .lightning._inputs import check_inputs, zero_rates


def _check_norm(q: Tensor, v: Tensor, norm_weight: Tensor | None, eps: float) -> None:
    """q [B, T, H, K], v [B, T, H, V] already checked; norm_weight [H·V] or None; eps > 0."""
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not 0 < eps < math.inf:
        raise ValueError(f"eps must be a finite float > 0, got {eps!r}")
    if norm_weight is None:
        return
    HV = q.shape[2] * v.shape[-1]
    if not isinstance(norm_weight, Tensor) or norm_weight.shape != (HV,):
        shape = tuple(norm_weight.shape) if isinstance(norm_weight, Tensor) else None
        raise ValueError(f"norm_weight must be [H·V] = [{HV}], got {shape}")
    if not norm_weight.is_floating_point() or norm_weight.device != q.device:
        raise ValueError(
            f"norm_weight must be a floating tensor on {q.device}, "
            f"got {norm_weight.dtype} on {norm_weight.device}"
        )


def _norm_heads(o_BTHV: Tensor, norm_weight: Tensor | None, eps: float) -> Tensor:
    """RMSNorm over each token's H·V outputs, times norm_weight, in (at least) float32."""
    B, T, H, V = o_BTHV.shape
    wide = torch.promote_types(o_BTHV.dtype, torch.float32)
    w = None if norm_weight is None else norm_weight.to(wide)
    o_BTX = F.rms_norm(o_BTHV.to(wide).reshape(B, T, H * V), (H * V,), w, eps)  # X = H·V
    return o_BTX.view(B, T, H, V).to(o_BTHV.dtype)


def norm_linear_attn(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    decay: Tensor | None,
    *,
    norm_weight: Tensor | None = None,
    eps: float = 1e-6,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: Tensor | None = None,
    block_size: int | None = None,
    backend: str = "auto",
) -> tuple[Tensor, Tensor | None]:
    """Causal NormAttention: tiled lightning attention (scale 1), then RMSNorm over heads.

    Args:
        q, k: [B, T, H, K]; v: [B, T, H, V]; float16, bfloat16, float32 or float64.
        decay: [H] rates s_h >= 0, or None for none (plain linear attention).
        norm_weight: [H·V] scale of the normalised output (head-major, as o.reshape(B, T,
            H·V)), or None for ones; differentiable.
        eps: > 0, added to the mean square.
        initial_state, output_final_state, cu_seqlens, block_size, backend: as for
            `lightning_attn`; states are [N, H, K, V] float32 (float64 for float64 inputs).

    Returns:
        o [B, T, H, V] in q's dtype (normalised in float32); final_state [N, H, K, V] or None.
    """
    return _normed(
        lightning_attn, q, k, v, decay, norm_weight, eps, initial_state=initial_state,
        output_final_state=output_final_state, cu_seqlens=cu_seqlens, block_size=block_size,
        backend=backend,
    )  # fmt: skip


def norm_linear_attn_naive(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    decay: Tensor | None,
    *,
    norm_weight: Tensor | None = None,
    eps: float = 1e-6,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """`norm_linear_attn` on `lightning_attn_naive` (quadratic, in the inputs' dtype).

    Arguments and returns as for `norm_linear_attn`.
    """
    return _normed(
        lightning_attn_naive, q, k, v, decay, norm_weight, eps, initial_state=initial_state,
        output_final_state=output_final_state, cu_seqlens=cu_seqlens,
    )  # fmt: skip


def _normed(attn, q, k, v, decay, norm_weight, eps, **kw) -> tuple[Tensor, Tensor | None]:
    """Checks the arguments, runs `attn` (the tiled op or its reference) with scale 1 and
    zero decay for None, then normalises its output over each token's heads."""
    decay = zero_rates(q) if decay is None else decay
    check_inputs(q, k, v, decay, 1.0, kw.get("initial_state"), kw.get("cu_seqlens"))
    _check_norm(q, v, norm_weight, eps)
    o_raw, final = attn(q, k, v, decay, scale=1.0, **kw)
    return _norm_heads(o_raw, norm_weight, eps), final
