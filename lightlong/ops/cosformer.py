"""cosFormer (Qin et al., 2022, "cosFormer: Rethinking Softmax in Attention"), causal.

    o_i = Σ_{j≤i} a_ij w_ij v_j / max(Σ_{j≤i} a_ij w_ij, eps),
    a_ij = relu(q_i)·relu(k_j),   w_ij = cos(π/2 · (i − j) / M)

i, j are positions within the token's own sequence (offset by `start`), M = max_len; past a
distance of M the weights turn negative. With θ_i = π i / (2M), cos(θ_i − θ_j) =
cos θ_i cos θ_j + sin θ_i sin θ_j, so this is undecayed linear attention on the features

    q'_i = [relu(q_i) cos θ_i, relu(q_i) sin θ_i]  (2K),   k'_j likewise,   v'_j = [v_j, 1]  (V + 1)

whose last value column accumulates the denominator: `lightning_attn` with zero decay, on
features built in float32 (float64 for float64 inputs) whatever the inputs' dtype. The state
is lightning's state of that feature form, [N, H, 2K, V + 1]:

    S[:K, :V] = Σ_j relu(k_j) cos θ_j ⊗ v_j     S[:K, V] = Σ_j relu(k_j) cos θ_j
    S[K:, :V] = Σ_j relu(k_j) sin θ_j ⊗ v_j     S[K:, V] = Σ_j relu(k_j) sin θ_j

# B batch, T tokens, H heads, K/V head dims, N sequences, J key tokens
"""

from __future__ import annotations

import itertools
import math

import torch
from torch import Tensor

from .lightning import lightning_attn, lightning_attn_step
from .lightning._inputs import check_inputs, zero_rates


def _check_args(
    max_len: int, start: int | Tensor, eps: float, N: int, device, name: str = "start"
) -> Tensor:
    """Validates max_len, eps and the start positions `name`; returns those as int64 [N]."""
    if not isinstance(max_len, int) or isinstance(max_len, bool) or max_len < 1:
        raise ValueError(f"max_len must be a positive int, got {max_len!r}")
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not 0 < eps < math.inf:
        raise ValueError(f"eps must be a finite float > 0, got {eps!r}")
    if isinstance(start, Tensor):
        if start.shape != (N,) or start.dtype not in (torch.int64, torch.int32):
            raise ValueError(
                f"{name} must be an int or an int64 tensor [N] = [{N}] (one per sequence), "
                f"got {start.dtype} of shape {tuple(start.shape)}"
            )
        if start.device != device:
            raise ValueError(f"{name} must be on {device}, got {start.device}")
        if N and bool((start < 0).any()):
            raise ValueError(f"{name} must be >= 0, got {start.tolist()}")
        return start.to(torch.int64)
    if not isinstance(start, int) or isinstance(start, bool) or start < 0:
        raise ValueError(f"{name} must be an int >= 0 or an int64 tensor [N], got {start!r}")
    return torch.full((N,), start, dtype=torch.int64, device=device)


def _features(q: Tensor, k: Tensor, v: Tensor, pos: Tensor, max_len: int):
    """q, k [B, T, H, K]; v [B, T, H, V]; pos int64 [B, T] -> q', k' [B, T, H, 2K] and
    v' [B, T, H, V + 1], in float32 (float64 for float64 inputs)."""
    # Features in float32 even for bf16/fp16 inputs: with bf16 features each term a_ij·w_ij
    # errs by ~2^-8·a_ij however small w_ij is (the direct form: ~2^-8·a_ij·|w_ij|), and with
    # M < T a denominator can come near 0 (measured: o off by 0.15 relative where the naive
    # in bf16 is off by 3.5e-3; float32 features: 1.7e-3, one bf16 rounding). θ has period
    # 4M in the position: reduce exactly in int64, then take cos/sin in float64 (positions
    # reach 1M+).
    dt = torch.promote_types(q.dtype, torch.float32)
    theta_BT = torch.remainder(pos, 4 * max_len).to(torch.float64) * (math.pi / (2 * max_len))
    cos_BT11 = torch.cos(theta_BT)[..., None, None].to(dt)
    sin_BT11 = torch.sin(theta_BT)[..., None, None].to(dt)

    def lift(x: Tensor) -> Tensor:
        r = torch.relu(x.to(dt))
        return torch.cat([r * cos_BT11, r * sin_BT11], dim=-1)  # [B, T, H, 2K]

    v1 = torch.cat([v.to(dt), v.new_ones(*v.shape[:3], 1, dtype=dt)], dim=-1)  # [B, T, H, V + 1]
    return lift(q), lift(k), v1


def _divide(o1: Tensor, eps: float, dtype: torch.dtype) -> Tensor:
    """o1 [..., V + 1] = [numerator, denominator] (float32/64) -> num / max(den, eps) in dtype."""
    return (o1[..., :-1] / o1[..., -1:].clamp_min(eps)).to(dtype)


def cosformer_attn(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    max_len: int,
    start: int | Tensor = 0,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: Tensor | None = None,
    eps: float = 1e-6,
    block_size: int | None = None,
    backend: str = "auto",
) -> tuple[Tensor, Tensor | None]:
    """Causal cosFormer attention, as tiled lightning attention on its cos/sin features.

    Args:
        q, k: [B, T, H, K]; v: [B, T, H, V]; float16, bfloat16, float32 or float64.
        max_len: M in w_ij = cos(π/2 · (i − j) / M), >= 1; weights go negative past distance M.
        start: position of each sequence's first token: an int, or an int64 tensor [N] (one
            per row, or per packed sequence with cu_seqlens). Set it when continuing from
            `initial_state` (chunked prefill): a chunk starts where the previous one ended.
        initial_state: [N, H, 2K, V + 1] (layout in the module docstring), the state before
            each sequence's first token.
        output_final_state: also return each sequence's state after its last token.
        cu_seqlens: int64 [N + 1] offsets of sequences packed along T, with B == 1.
        eps: > 0, the floor of the denominator.
        block_size, backend: as for `lightning_attn`.

    Returns:
        o [B, T, H, V] in q's dtype (features, accumulation and division in float32);
        final_state [N, H, 2K, V + 1] float32 (float64 for float64 inputs) or None. N is B,
        or the number of packed sequences.
    """
    args = check_inputs(q, k, v, zero_rates(q), 1.0, None, cu_seqlens)
    _, T, H, K = q.shape
    V = v.shape[-1]
    N = args.num_seqs
    start_N = _check_args(max_len, start, eps, N, q.device)
    if initial_state is not None and (
        not isinstance(initial_state, Tensor) or initial_state.shape != (N, H, 2 * K, V + 1)
    ):
        shape = tuple(initial_state.shape) if isinstance(initial_state, Tensor) else None
        raise ValueError(
            f"initial_state must be [N, H, 2K, V + 1] = [{N}, {H}, {2 * K}, {V + 1}], got {shape}"
        )
    if cu_seqlens is None:
        pos_BT = start_N[:, None] + torch.arange(T, device=q.device)
    else:
        offsets_N1 = torch.tensor(args.offsets, device=q.device)
        seq_T = torch.repeat_interleave(
            torch.arange(N, device=q.device), offsets_N1.diff(), output_size=T
        )
        pos_BT = (start_N[seq_T] + torch.arange(T, device=q.device) - offsets_N1[seq_T])[None]
    qf, kf, v1 = _features(q, k, v, pos_BT, max_len)
    o1, final = lightning_attn(
        qf,
        kf,
        v1,
        zero_rates(q),
        scale=1.0,
        initial_state=initial_state,
        output_final_state=output_final_state,
        cu_seqlens=cu_seqlens,
        block_size=block_size,
        backend=backend,
    )
    return _divide(o1, eps, q.dtype), final


@torch.no_grad()
def cosformer_step(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    state: Tensor,
    *,
    max_len: int,
    position: Tensor,
    eps: float = 1e-6,
    backend: str = "auto",
) -> Tensor:
    """One decode token per row, updating `state` in place: O(1) in the context length.

    Args:
        q, k: [B, 1, H, K]; v: [B, 1, H, V].
        state: [B, H, 2K, V + 1] float32 (float64 for float64 inputs), contiguous, as returned
            by `cosformer_attn`; overwritten with the state after this token.
        max_len: M, as for `cosformer_attn`.
        position: int64 [B], each row's position of this token (the previous call's start
            plus its length).
        eps: > 0, the floor of the denominator.
        backend: as for `lightning_attn_step`.

    Returns:
        o [B, 1, H, V] in q's dtype. Not differentiable (inference only).
    """
    check_inputs(q, k, v, zero_rates(q), 1.0, None, None)
    B, T, H, K = q.shape
    V = v.shape[-1]
    if T != 1:
        raise ValueError(f"q must hold one token per sequence [B, 1, H, K], got T={T}")
    if not isinstance(position, Tensor):
        raise ValueError(f"position must be an int64 tensor [B] = [{B}], got {position!r}")
    pos_B = _check_args(max_len, position, eps, B, q.device, name="position")
    if not isinstance(state, Tensor) or state.shape != (B, H, 2 * K, V + 1):
        shape = tuple(state.shape) if isinstance(state, Tensor) else None
        raise ValueError(
            f"state must be [B, H, 2K, V + 1] = [{B}, {H}, {2 * K}, {V + 1}], got {shape}"
        )
    qf, kf, v1 = _features(q, k, v, pos_B[:, None], max_len)
    o1 = lightning_attn_step(qf, kf, v1, zero_rates(q), state, scale=1.0, backend=backend)
    return _divide(o1, eps, q.dtype)


def cosformer_attn_naive(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    max_len: int,
    start: int | Tensor = 0,
    cu_seqlens: Tensor | None = None,
    eps: float = 1e-6,
) -> Tensor:
    """The quadratic reference, from the definition, computed in the inputs' dtype.

    Builds w_ij and the masked weights a_ij w_ij per sequence explicitly: O(T²) time and
    memory, for tests and short sequences. Arguments as for `cosformer_attn`.

    Returns:
        o [B, T, H, V] in q's dtype.
    """
    args = check_inputs(q, k, v, zero_rates(q), 1.0, None, cu_seqlens)
    B, T, H, _ = q.shape
    V = v.shape[-1]
    start_N = _check_args(max_len, start, eps, args.num_seqs, q.device).tolist()
    q_, k_, v_ = (x.reshape(B * T, H, x.shape[-1]) for x in (q, k, v))
    outs = []
    for n, (a, b) in enumerate(itertools.pairwise(args.offsets)):
        pos = start_N[n] + torch.arange(b - a, device=q.device)  # int64 [T]
        gap_TJ = pos[:, None] - pos[None, :]  # i − j, exact
        w_TJ = torch.cos((math.pi / 2) * gap_TJ.to(torch.float64) / max_len).to(q.dtype)
        a_HTJ = torch.einsum("thk,jhk->htj", torch.relu(q_[a:b]), torch.relu(k_[a:b]))
        weights_HTJ = a_HTJ * (w_TJ * (gap_TJ >= 0))
        num_THV = torch.einsum("htj,jhv->thv", weights_HTJ, v_[a:b])
        den_TH1 = weights_HTJ.sum(-1).transpose(0, 1)[..., None]
        outs.append(num_THV / den_TH1.clamp_min(eps))
    return torch.cat(outs).reshape(B, T, H, V)
