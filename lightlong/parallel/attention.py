"""Causal softmax attention with one packed row split across ranks (LASP-2H's softmax
half): every rank all-gathers the row's keys and values (its GQA heads only, one
collective) and attends its own queries to them, causally and within documents.

The all-gather is differentiable: its backward sums every rank's dK, dV into the rank that
holds those tokens (a reduce-scatter). Chunks may differ in length; they travel padded to
the longest.

# T tokens of the row (C_r on rank r), H query heads, G key/value heads, D head dim
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F
from torch import Tensor

from lightlong.parallel.lightning import SequenceSplit

# Most bytes of boolean mask one SDPA call may build (queries go in slices under it).
_MASK_BYTES = 32 * 2**20


def softmax_attn_split(
    q: Tensor, k: Tensor, v: Tensor, split: SequenceSplit, *, output_kv: bool = False
) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
    """Causal softmax attention (GQA, scale 1/√D, none across documents) over a row whose
    tokens are split across the ranks of split.group; every rank calls it with its chunk.

    Args:
        q: [1, C_r, H, D]; k, v: [1, C_r, G, D]: this rank's tokens, rotated at their global
            positions.
        split: where the chunk sits (`SequenceSplit.of`).
        output_kv: also return the whole row's keys and values (the all-gathered ones).

    Returns:
        [1, C_r, H, D], equal to `causal_attention` over the whole row for these queries,
        and the row's keys and values [1, T, G, D] (the same on every rank) or None.
    """
    C_r = split.lengths[split.rank]
    if q.shape[0] != 1 or q.shape[1] != C_r or k.shape[:2] != q.shape[:2]:
        raise ValueError(
            f"q, k, v must be [1, {C_r}, heads, D] (this rank's chunk), got "
            f"{tuple(q.shape)}, {tuple(k.shape)}"
        )
    longest = max(split.lengths)
    kv_CG2D = F.pad(torch.cat([k, v], dim=-1)[0], (0, 0, 0, 0, 0, longest - C_r))
    group = split.group if split.group is not None else dist.group.WORLD
    everyone = funcol.all_gather_single_autograd(kv_CG2D.contiguous(), 0, group)
    held = torch.cat([
        torch.arange(r * longest, r * longest + n, device=q.device)
        for r, n in enumerate(split.lengths)
    ])  # fmt: skip
    k_TGD, v_TGD = everyone.index_select(0, held).chunk(2, dim=-1)
    T, D = held.numel(), q.shape[-1]
    # document of every key and of this rank's queries
    bounds = torch.tensor(split.offsets[1:-1], dtype=torch.int64, device=q.device)
    doc_T = torch.bucketize(torch.arange(T, device=q.device), bounds, right=True)
    key_T = torch.arange(T, device=q.device)
    q_1HCD = q.transpose(1, 2)
    k_1GTD, v_1GTD = k_TGD.transpose(0, 1)[None], v_TGD.transpose(0, 1)[None]
    step = max(1, _MASK_BYTES // T)
    outs = []
    for a in range(0, C_r, step):
        pos_t = split.start + torch.arange(a, min(a + step, C_r), device=q.device)
        mask_tT = (key_T <= pos_t[:, None]) & (doc_T == doc_T[pos_t][:, None])
        outs.append(
            F.scaled_dot_product_attention(
                q_1HCD[:, :, a : a + step],
                k_1GTD,
                v_1GTD,
                attn_mask=mask_tT,
                scale=D**-0.5,
                enable_gqa=True,
            )
        )
    kv = (k_TGD[None], v_TGD[None]) if output_kv else None
    return torch.cat(outs, dim=2).transpose(1, 2), kv
