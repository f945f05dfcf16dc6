"""Sampling parameters and the logits processors: repetition penalty, temperature, top-k,
top-p, then greedy or seeded multinomial sampling.

# B rows, V vocabulary
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

MAX_LOGPROBS = 20
"""Most alternatives per token `SamplingParams.logprobs` may ask for (OpenAI's limit)."""


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
    presence_penalty: float = 0.0
    """OpenAI's: subtracted from the logit of every token already generated, in [-2, 2]."""
    frequency_penalty: float = 0.0
    """OpenAI's: subtracted once per earlier occurrence in the output, in [-2, 2]."""
    logprobs: int | None = None
    """Return the chosen token's log-probability and this many most likely alternatives
    (0 ... 20), from the model's distribution before any processing; None returns none."""
    prompt_logprobs: int | None = None
    """Also score the prompt: each prompt token's log-probability (from the second on) and
    this many alternatives (0 ... 20); the prompt is then prefilled in full (no prefix
    reuse). With it, max_new_tokens may be 0 (score only)."""
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
        least = 0 if self.prompt_logprobs is not None else 1
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < least:
            raise ValueError(
                f"max_new_tokens must be an int >= 1 (0 only with prompt_logprobs), got "
                f"{self.max_new_tokens!r}"
            )
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0 (0 is greedy), got {self.temperature}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an int >= 0 (0 is off), got {self.top_k!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(self, name)
            if k is not None and (not isinstance(k, int) or not 0 <= k <= MAX_LOGPROBS):
                raise ValueError(f"{name} must be an int in [0, {MAX_LOGPROBS}], got {k!r}")
        bad = [t for t in self.stop_token_ids if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"stop_token_ids must be in [0, vocab_size={vocab_size}), got {bad}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop must be non-empty strings, got {self.stop!r}")
        return self


def process_logits(
    logits: Tensor,
    params: SamplingParams | Sequence[SamplingParams],
    presence: Tensor | None = None,
    counts: Tensor | None = None,
) -> Tensor:
    """Applies the repetition, presence and frequency penalties, temperature, top-k and
    top-p to logits [B, V], each row with its own parameters.

    params: one for every row, or one per row.
    presence: bool [B, V], tokens already in each row's prompt or output (repetition penalty).
    counts: int [B, V], times each token was generated in each row (presence and frequency
        penalties).
    Returns fp32 logits with removed tokens at -inf (greedy rows only penalized).
    """
    B = logits.shape[0]
    rows = [params] * B if isinstance(params, SamplingParams) else list(params)
    if len(rows) != B:
        raise ValueError(f"params must be one SamplingParams or one per row ({B}), got {len(rows)}")
    logits = logits.float()

    def column(name: str) -> Tensor:
        return logits.new_tensor([getattr(p, name) for p in rows])[:, None]  # [B, 1]

    if presence is not None and any(p.repetition_penalty != 1.0 for p in rows):
        rep_B1 = column("repetition_penalty")
        penalized = torch.where(logits > 0, logits / rep_B1, logits * rep_B1)
        logits = torch.where(presence, penalized, logits)
    if counts is not None and any(p.presence_penalty or p.frequency_penalty for p in rows):
        counts = counts.float()
        logits = (
            logits
            - column("presence_penalty") * (counts > 0)
            - column("frequency_penalty") * counts
        )
    greedy = [p.temperature == 0 for p in rows]
    if all(greedy):
        return logits
    temperature_B1 = column("temperature")
    sampled = logits / torch.where(temperature_B1 > 0, temperature_B1, 1.0)
    V = logits.shape[-1]
    top_k = [p.top_k if 0 < p.top_k < V else V for p in rows]
    if min(top_k) < V:
        largest = torch.topk(sampled, max(top_k), dim=-1).values
        kth_B1 = largest.gather(-1, torch.tensor(top_k, device=logits.device)[:, None] - 1)
        sampled = sampled.masked_fill(sampled < kth_B1, float("-inf"))
    if any(p.top_p < 1.0 for p in rows):
        top_p_B1 = column("top_p")
        sorted_logits, order = torch.sort(sampled, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the tokens before it already reach p (the first always stays).
        drop_sorted = ((probs.cumsum(dim=-1) - probs) >= top_p_B1) & (top_p_B1 < 1.0)
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        sampled = sampled.masked_fill(drop, float("-inf"))
    greedy_B1 = torch.tensor(greedy, device=logits.device)[:, None]
    return torch.where(greedy_B1, logits, sampled)


def sample(
    logits: Tensor,
    params: SamplingParams | Sequence[SamplingParams],
    generators: Sequence[torch.Generator],
) -> Tensor:
    """Next tokens int64 [B] from processed logits [B, V]: argmax for greedy rows, else one
    draw per row from softmax(logits) with that row's generator."""
    B = logits.shape[0]
    rows = [params] * B if isinstance(params, SamplingParams) else list(params)
    next_B = logits.argmax(dim=-1)
    drawn = [b for b, p in enumerate(rows) if p.temperature != 0]
    if drawn:
        probs = torch.softmax(logits[drawn], dim=-1)
        draws = [
            torch.multinomial(probs[i], 1, generator=generators[b]) for i, b in enumerate(drawn)
        ]
        next_B[drawn] = torch.cat(draws)
    return next_B


def token_logprobs(logits: Tensor, chosen: Tensor, top: int) -> tuple[Tensor, Tensor, Tensor]:
    """Log-probabilities from logits [B, V]: of the chosen tokens int64 [B] (fp32 [B]), and
    the `top` most likely tokens' ids and log-probabilities (int64 / fp32 [B, top])."""
    logp_BV = torch.log_softmax(logits.float(), dim=-1)
    chosen_B = logp_BV.gather(-1, chosen[:, None])[:, 0]
    top_lp, top_ids = torch.topk(logp_BV, top, dim=-1)
    return chosen_B, top_ids, top_lp
