"""Sampling parameters and the logits processors: repetition penalty, temperature, top-k,
top-p, then greedy or seeded multinomial sampling.

# B rows, V vocabulary
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class SamplingParams:
    """How to pick each next token, and when to stop (vLLM's names where they exist)."""

    max_new_tokens: int = 64
    """Tokens to generate at most per prompt."""
    temperature: float = 0.0
    """Softmax temperature; 0 is greedy (argmax)."""
    top_k: int = 0
    """Sample among the k most likely tokens; 0 keeps all."""
    top_p: float = 1.0
    """Sample among the smallest set of tokens whose probability reaches p; 1 keeps all."""
    repetition_penalty: float = 1.0
    """CTRL's penalty on tokens already in the prompt or output (>1 discourages); 1 is off."""
    seed: int | None = None
    """Seed of each row's sampler (a row gives the same tokens alone or in a batch)."""
    stop_token_ids: list[int] = field(default_factory=list)
    """Tokens that end a sequence (kept in token_ids, not in text)."""
    stop: list[str] = field(default_factory=list)
    """Strings that end a sequence (cut from the text); needs a tokenizer."""
    ignore_eos: bool = False
    """Keep going past the tokenizer's end-of-text token."""

    def validate(self, vocab_size: int) -> SamplingParams:
        """Raises ValueError naming the parameter and its allowed range; returns self."""
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1, got {self.max_new_tokens!r}")
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0 (0 is greedy), got {self.temperature}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an int >= 0 (0 is off), got {self.top_k!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        bad = [t for t in self.stop_token_ids if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"stop_token_ids must be in [0, vocab_size={vocab_size}), got {bad}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop must be non-empty strings, got {self.stop!r}")
        return self


def process_logits(logits: Tensor, params: SamplingParams, presence: Tensor | None) -> Tensor:
    """Applies the repetition penalty, temperature, top-k and top-p to logits [B, V].

    presence: bool [B, V], tokens already seen per row (for the repetition penalty).
    Returns fp32 logits with removed tokens at -inf (unchanged when greedy).
    """
    logits = logits.float()
    p = params.repetition_penalty
    if p != 1.0 and presence is not None:
        penalized = torch.where(logits > 0, logits / p, logits * p)
        logits = torch.where(presence, penalized, logits)
    if params.temperature == 0:
        return logits
    logits = logits / params.temperature
    if 0 < params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the tokens before it already reach p (the first always stays).
        drop_sorted = (probs.cumsum(dim=-1) - probs) >= params.top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample(logits: Tensor, params: SamplingParams, generators: list[torch.Generator]) -> Tensor:
    """Next tokens int64 [B] from processed logits [B, V]: argmax when greedy, else one draw
    per row from softmax(logits) with that row's generator."""
    if params.temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits, dim=-1)
    return torch.cat(
        [torch.multinomial(probs[b], 1, generator=g) for b, g in enumerate(generators)]
    )
