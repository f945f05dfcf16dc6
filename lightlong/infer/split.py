"""Prefill of one prompt split across ranks (sequence parallelism), decoded on one rank.

Every rank of a group runs its contiguous chunk of the prompt through the model at once
(`HybridLM.forward(split=...)`: LASP for lightning layers, all-gathered K/V for softmax
layers). The scan and the all-gather already leave the whole prompt's lightning states and
softmax keys and values on every rank; the destination rank keeps them in a cache, and the
last rank sends it the logits of the prompt's last token. Decoding then goes on there alone
(`Engine.generate(prompt, params, prefilled=[...])`): a decode step needs only the states
and the KV, not the other ranks.

# T prompt tokens (C_r on rank r), V vocabulary
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from lightlong.infer.cache import HybridCache
from lightlong.infer.runner import Prefilled
from lightlong.model import HybridLM
from lightlong.parallel import SequenceSplit


@torch.no_grad()
def prefill_split(
    model: HybridLM, input_ids: Tensor, split: SequenceSplit, *, dst: int = 0
) -> Prefilled | None:
    """Prefills one prompt whose tokens are split across the ranks of split.group; every
    rank calls it with its chunk.

    Args:
        model: the same weights on every rank.
        input_ids: int64 [1, C_r], this rank's chunk of the prompt (`SequenceSplit.even`
            splits it evenly; one document).
        split: where the chunk sits.
        dst: the rank of split.group that receives the cache.

    Returns:
        On rank dst: a single-row cache holding the whole prompt (each lightning layer's
        state after its last token, each softmax layer's T keys and values), and the logits
        [1, V] for the next token (fp32; fp64 for an fp64 model), as `Engine.prefill` of the
        whole prompt gives. None on the other ranks.
    """
    R = len(split.lengths)
    if not 0 <= dst < R:
        raise ValueError(f"dst must be a rank of the split's group, in [0, {R}), got {dst}")
    mine = split.rank == dst
    cache = HybridCache.for_model(model, 1, capacity=split.offsets[-1]) if mine else None
    logits = model(input_ids, split=split, cache=cache, logits_to_keep=1).logits
    last_1V = logits[:, -1].to(torch.promote_types(logits.dtype, torch.float32))
    dist.broadcast(last_1V, group=split.group, group_src=R - 1)  # the prompt's last token
    return (cache, last_1V) if mine else None
