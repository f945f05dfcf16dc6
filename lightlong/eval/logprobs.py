"""Log-probabilities of given tokens, computed chunk by chunk through the inference cache.

Memory is bounded by one chunk's activations and [chunk, V] logits plus the cache, so a
million-token document is scored like a short one (`perplexity` and the lm-eval adapter
use this).

# T tokens, V vocabulary
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from lightlong.infer.cache import HybridCache
from lightlong.model import HybridLM


@torch.no_grad()
def token_logprobs(
    model: HybridLM,
    ids: Sequence[int] | Tensor,
    *,
    chunk: int = 4096,
    progress: Callable[[int], None] | None = None,
) -> tuple[Tensor, Tensor]:
    """Scores a token sequence under the model.

    Args:
        model: the model (run as is; call `.eval()` first).
        ids: token ids [T], T >= 2.
        chunk: tokens per forward pass.
        progress: called with the number of tokens each chunk adds.

    Returns:
        logprobs: fp32 [T − 1], log p(ids[t + 1] | ids[: t + 1]).
        greedy: bool [T − 1], whether ids[t + 1] is the argmax at position t.
    """
    ids_T = torch.as_tensor(ids, dtype=torch.int64).flatten()
    T, V = ids_T.numel(), model.config.vocab_size
    if T < 2:
        raise ValueError(f"ids must hold at least 2 tokens to score, got {T}")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    if int(ids_T.min()) < 0 or int(ids_T.max()) >= V:
        raise ValueError(f"ids must be token ids in [0, vocab_size={V})")
    if model.config.max_position_embeddings < T - 1:  # the last token is only predicted
        raise ValueError(
            f"ids hold {T} tokens: scoring reads {T - 1} positions, more than the model's "
            f"max_position_embeddings={model.config.max_position_embeddings}"
        )
    device = model.lm_head.weight.device
    ids_T = ids_T.to(device)
    cache = HybridCache.for_model(model, 1, capacity=T)
    logprobs, greedy = [], []
    for a in range(0, T - 1, chunk):
        b = min(a + chunk, T - 1)  # positions a..b-1 predict tokens a+1..b
        logits_CV = model(ids_T[None, a:b], cache=cache).logits[0].float()
        target_C = ids_T[a + 1 : b + 1]
        logprobs.append(
            torch.log_softmax(logits_CV, -1).gather(-1, target_C[:, None]).squeeze(-1).cpu()
        )
        greedy.append((logits_CV.argmax(-1) == target_C).cpu())
        if progress is not None:
            progress(b - a)
    return torch.cat(logprobs), torch.cat(greedy)
