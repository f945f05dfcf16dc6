"""Lightning attention with one packed row split across ranks (LASP with decay).

Rank r holds tokens [a_r, b_r) of the row. Its tokens need only the state S_r entering
its chunk, one fp32 [H, K, V] per head, whatever the length before it:

1. each rank computes the state after its chunk from a zero state, M_r (from the chunk's
   last document start, if one starts in it): a state-only pass, one contraction
   (`chunk_state`), no outputs;
2. one all-gather of the M_r;
3. S_r = λ^{C_{r−1}} S_{r−1} + M_{r−1}, restarting (S_r = M_{r−1}) after a chunk in which a
   document starts, with λ^C = exp(−s·C) per head and S_0 the row's initial state;
4. the chunk runs again from S_r (the first document only, if it continues from before).

The state after the row's last token (what an inference cache keeps) is the same scan
carried on to S_R: every rank holds it after step 2.

The all-gather is differentiable (its backward sends each rank the gradient of its M_r),
and the op's own backward gives the gradients through both passes, so dq, dk, dv and
d(initial state) equal the single-process op's. Communication per call: H·K·V state
values per rank forward, the same backward, whatever the sequence length.

# T tokens (C_r on rank r), H heads, K/V head dims, N documents in the chunk, R ranks
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import Tensor

from lightlong.ops.lightning import lightning_attn


@dataclass(frozen=True)
class SequenceSplit:
    """Where this rank's chunk of one packed row sits, and where documents start.

    Build it with `SequenceSplit.of(lengths, cu_seqlens, group)`."""

    group: dist.ProcessGroup | None
    """The sequence-parallel group (None: the default group)."""
    rank: int
    """This rank's position in the group (its chunk is the rank-th)."""
    lengths: tuple[int, ...]
    """Tokens of each rank's chunk, in rank order."""
    starts_document: tuple[bool, ...]
    """Whether a document (other than the row's first) starts in each rank's chunk, its first
    token included."""
    cu_seqlens: Tensor
    """int64 [N + 1] offsets of this chunk's pieces of documents (local positions)."""
    first_continues: bool
    """This chunk's first token continues a document begun on an earlier rank."""
    offsets: tuple[int, ...]
    """The row's document offsets (global cu_seqlens), 0 … T."""

    @property
    def start(self) -> int:
        """Global position of this rank's first token."""
        return sum(self.lengths[: self.rank])

    @property
    def span(self) -> slice:
        """This rank's tokens of the row (`row[:, split.span]` is its chunk)."""
        return slice(self.start, self.start + self.lengths[self.rank])

    @classmethod
    def of(
        cls,
        lengths: Sequence[int],
        cu_seqlens: Tensor | Sequence[int] | None = None,
        group: dist.ProcessGroup | None = None,
    ) -> SequenceSplit:
        """The split of a row of sum(lengths) tokens into chunks of `lengths` (one per rank
        of `group`, in rank order), with documents at global offsets `cu_seqlens` (None:
        one document)."""
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        if len(lengths) != world or any(n < 1 for n in lengths):
            raise ValueError(
                f"lengths must give each of the {world} ranks >= 1 token, got {list(lengths)}"
            )
        T = sum(lengths)
        offsets = [0, T] if cu_seqlens is None else [int(x) for x in cu_seqlens]
        if (
            offsets[0] != 0
            or offsets[-1] != T
            or any(a >= b for a, b in itertools.pairwise(offsets))
        ):
            raise ValueError(
                f"cu_seqlens must rise strictly from 0 to the row's {T} tokens, got {offsets}"
            )
        bounds = [sum(lengths[:r]) for r in range(world + 1)]
        starts = offsets[1:-1]  # the row's first document continues from its initial state
        a, b = bounds[rank], bounds[rank + 1]
        local = [0, *(s - a for s in starts if a < s < b), b - a]
        return cls(
            group=group, rank=rank, lengths=tuple(lengths),
            starts_document=tuple(any(bounds[r] <= s < bounds[r + 1] for s in starts)
                                  for r in range(world)),
            cu_seqlens=torch.tensor(local, dtype=torch.int64),
            first_continues=a not in starts, offsets=tuple(offsets),
        )  # fmt: skip

    @classmethod
    def even(
        cls,
        num_tokens: int,
        cu_seqlens: Tensor | Sequence[int] | None = None,
        group: dist.ProcessGroup | None = None,
    ) -> SequenceSplit:
        """`of` with chunks as even as the group allows: the first num_tokens % R ranks of
        the R take one token more."""
        world = dist.get_world_size(group)
        if num_tokens < world:
            raise ValueError(
                f"num_tokens must give each of the {world} ranks >= 1 token, got {num_tokens}"
            )
        share, extra = divmod(num_tokens, world)
        return cls.of([share + (r < extra) for r in range(world)], cu_seqlens, group)


def lightning_attn_split(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    decay: Tensor,
    split: SequenceSplit,
    *,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    block_size: int | None = None,
) -> tuple[Tensor, Tensor | None]:
    """`lightning_attn` over a row whose tokens are split across the ranks of split.group.

    Every rank of the group calls it (it all-gathers) with its own chunk.

    Args:
        q, k: [1, C_r, H, K]; v: [1, C_r, H, V]: this rank's tokens of the row.
        decay: [H] rates s_h >= 0. scale: None means K**-0.5.
        split: where the chunk sits (`SequenceSplit.of`).
        initial_state: [H, K, V], the state before the row's first token, the same on every
            rank (its gradient is this rank's share: sum it over the group).
        output_final_state: also return the state after the row's last token (the scan
            carried on over the later ranks' end states: no further communication).

    Returns:
        o [1, C_r, H, V], equal to the single-process op's output for these tokens, and
        the state [H, K, V] after the row's last token (of its last document; float32,
        float64 for float64 inputs; the same on every rank) or None.
    """
    if q.shape[0] != 1 or q.shape[1] != split.lengths[split.rank]:
        raise ValueError(
            f"q must be [1, {split.lengths[split.rank]}, H, K] (this rank's chunk), got "
            f"{tuple(q.shape)}"
        )
    cu = split.cu_seqlens.to(q.device)
    group = split.group if split.group is not None else dist.group.WORLD
    mine = chunk_state(k, v, decay, int(split.cu_seqlens[-2]))
    gathered = funcol.all_gather_single_autograd(mine[None].contiguous(), 0, group)
    # waited for here: the final state returned may be one of the ranks' own, and must be a
    # plain tensor, not a view of the collective's pending buffer
    ranks = funcol.wait_tensor(gathered).unbind(0)
    # the scan over the ranks before this one (ranks[0] * 0 keeps every rank's result
    # depending on the all-gather, so that each rank takes part in its backward)
    state = ranks[0] * 0
    if initial_state is not None:
        state = state + initial_state.to(state.dtype)
    state = _scan(state, ranks, decay, split, range(split.rank))
    final = None
    if output_final_state:
        final = _scan(state, ranks, decay, split, range(split.rank, len(ranks)))
    N = cu.numel() - 1
    first = state if split.first_continues else state * 0
    init = torch.cat([first[None], first.new_zeros(N - 1, *first.shape)])
    o, _ = lightning_attn(
        q, k, v, decay, scale=scale, initial_state=init, cu_seqlens=cu, block_size=block_size
    )
    return o, final


def chunk_state(k: Tensor, v: Tensor, decay: Tensor, start: int = 0) -> Tensor:
    """The state after a chunk's last token, from a zero state at token `start` (its last
    document's first): M = Σ_t exp(−s·(C − 1 − t)) k_tᵀ v_t over t >= start, without the
    outputs (one contraction, differentiable).

    k: [1, C, H, K]; v: [1, C, H, V]; decay: [H]. Returns [H, K, V] in float32 (float64
    for float64 inputs), as `lightning_attn(..., output_final_state=True)` gives it."""
    dtype = torch.promote_types(k.dtype, torch.float32)
    age = torch.arange(k.shape[1] - start - 1, -1, -1, device=k.device, dtype=dtype)
    weight = torch.exp(-decay.to(dtype)[None, :] * age[:, None])  # [C − start, H]
    k_TH = k[0, start:].to(dtype) * weight[..., None]
    return torch.einsum("thk,thv->hkv", k_TH, v[0, start:].to(dtype))


def _scan(
    state: Tensor, ranks: Sequence[Tensor], decay: Tensor, split: SequenceSplit, over: range
) -> Tensor:
    """The state [H, K, V] after the chunks of ranks `over` (in order), from `state` before
    them: λ^C · state + M_r, or M_r alone after a chunk in which a document starts."""
    for r in over:
        if split.starts_document[r]:
            state = ranks[r]
        else:
            carry = torch.exp(-decay.to(state.dtype) * split.lengths[r])[:, None, None]
            state = carry * state + ranks[r]
    return state


def split_next_token_targets(labels: Tensor, split: SequenceSplit, ignore: int = -100) -> Tensor:
    """int64 [C_r]: the label each of this rank's positions predicts. The last one predicts
    the next rank's first label (one all-gather of the ranks' first labels); a document's
    last token and the row's last predict nothing (`ignore`). labels: [1, C_r]."""
    firsts = labels.new_empty(len(split.lengths))
    dist.all_gather_single(firsts, labels[0, :1].contiguous(), group=split.group)
    after = firsts[split.rank + 1 : split.rank + 2]
    if split.rank + 1 == len(split.lengths):
        after = labels.new_full((1,), ignore)
    targets = torch.cat([labels[0, 1:], after])
    a, C = split.start, targets.numel()
    for s in split.offsets[1:-1]:  # the token before a document's first predicts nothing
        if a <= s - 1 < a + C:
            targets[s - 1 - a] = ignore
    return targets
