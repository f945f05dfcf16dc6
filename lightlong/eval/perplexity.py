"""Perplexity by position: mean loss as a function of token position over long documents.

A model that uses its context has a loss that falls (or stays flat) with position; one that
breaks past its training length has a loss that turns up there. Positions are grouped in
bins of equal width on a log scale (4 per octave), so the curve reads from the first
tokens to the last.

# N documents, T tokens
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from lightlong.eval.logprobs import token_logprobs
from lightlong.eval.text import generated_sentences, take_tokens
from lightlong.model import HybridLM
from lightlong.tokenizer import Tokenizer
from lightlong.train.data import read_documents


def documents(
    tokenizer: Tokenizer,
    length: int,
    count: int,
    *,
    files: Sequence[str | Path] = (),
    seed: int = 0,
) -> list[list[int]]:
    """`count` documents of at most `length` tokens: from files (`.txt` or `.jsonl` "text"),
    longest first, else generated text (seeded) of exactly `length` tokens."""
    if length < 2 or count < 1:
        raise ValueError(f"need length >= 2 and count >= 1, got {length}, {count}")
    if files:
        docs = [tokenizer.encode(d)[:length] for d in read_documents(files)]
        docs = sorted((d for d in docs if len(d) >= 2), key=len, reverse=True)[:count]
        if not docs:
            raise ValueError(f"no document of 2 tokens or more in {list(map(str, files))}")
        return docs
    out = []
    for i in range(count):
        stream = generated_sentences(np.random.default_rng([seed, i]))
        ids = tokenizer.encode(" ".join(take_tokens(tokenizer, stream, length)[0]))[:length]
        out.append(ids)
    return out


def position_bins(length: int, per_octave: int = 4) -> np.ndarray:
    """Bin edges over positions 1 .. length − 1 (position t predicts token t): int64 [n + 1],
    log-spaced, first edge 1, last edge `length`."""
    n = max(1, int(np.ceil(per_octave * np.log2(max(length, 2)))))
    return np.unique(np.round(np.geomspace(1, length, n + 1)).astype(np.int64))


def perplexity_by_position(
    model: HybridLM,
    docs: Sequence[Sequence[int]],
    *,
    chunk: int = 4096,
    progress: Callable[[int], None] | None = None,
) -> dict:
    """Mean loss per position bin over the documents.

    Returns a dict: `bins` (list of [start, end) positions; position t is the prediction of
    token t from tokens < t), `loss` (mean nats per bin, None where no document reaches),
    `tokens` (predictions per bin), `loss_all` and `perplexity` (over every prediction).
    """
    longest = max(len(d) for d in docs)
    total = np.zeros(longest, dtype=np.float64)  # summed loss at each position 1 .. T − 1
    count = np.zeros(longest, dtype=np.int64)
    for d in docs:
        logprobs, _ = token_logprobs(model, d, chunk=chunk, progress=progress)
        total[1 : len(d)] -= logprobs.double().numpy()
        count[1 : len(d)] += 1
    edges = position_bins(longest)
    bins, loss, tokens = [], [], []
    for a, b in itertools.pairwise(edges):
        n = int(count[a:b].sum())
        bins.append([int(a), int(b)])
        tokens.append(n)
        loss.append(float(total[a:b].sum() / n) if n else None)
    loss_all = float(total.sum() / count.sum())
    return {
        "bins": bins,
        "loss": loss,
        "tokens": tokens,
        "loss_all": loss_all,
        "perplexity": float(np.exp(loss_all)),
    }
