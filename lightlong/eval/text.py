"""Haystack text and prompts of a given token length.

Haystacks are streams of sentences:

- `generated` (default): seeded pseudo-English sentences from built-in word lists; no files
  and no downloads, and different for every seed.
- `noise`: RULER's repeated filler ("The grass is green. The sky is blue. ...").
- files: the user's UTF-8 text, split into sentences, read from a seeded starting sentence
  and wrapped around.

`fit_prompt` assembles fixed text (instructions, question) around a haystack with needles
inserted at given depths, so that the whole prompt has the target number of tokens for a
given tokenizer (within a word; the last haystack sentence may be cut between words).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lightlong.tokenizer import Tokenizer

ADJECTIVES = (
    "quiet", "bright", "ancient", "narrow", "gentle", "heavy", "distant", "golden", "silent",
    "crowded", "patient", "hollow", "curious", "steady", "frozen", "restless", "humble",
    "broad", "pale", "busy", "sudden", "careful", "wild", "tired", "polished", "faded",
    "sharp", "warm", "empty", "modest",
)  # fmt: skip
NOUNS = (
    "river", "teacher", "lantern", "village", "engine", "garden", "merchant", "bridge",
    "harbor", "painter", "library", "mountain", "farmer", "window", "valley", "sailor",
    "market", "forest", "doctor", "castle", "orchard", "student", "tower", "kitchen",
    "traveler", "meadow", "factory", "musician", "island", "carpenter", "station", "poet",
)  # fmt: skip
VERBS = (
    "watched", "followed", "painted", "remembered", "crossed", "repaired", "visited",
    "described", "carried", "admired", "measured", "ignored", "guarded", "answered",
    "studied", "opened", "welcomed", "questioned", "built", "cleaned",
)  # fmt: skip
PLACES = (
    "near the old mill", "after the long winter", "before sunrise", "along the coast",
    "in the late afternoon", "beside the railway", "during the festival", "under grey skies",
    "at the edge of town", "through the narrow streets", "without a word", "every spring",
)  # fmt: skip
CONNECTIVES = ("Meanwhile,", "Later,", "Once again,", "By then,", "In the end,", "Still,")

NOISE = (
    "The grass is green.",
    "The sky is blue.",
    "The sun is yellow.",
    "Here we go.",
    "There and back again.",
)

_SENTENCE_END = re.compile(r"(?<=[.!?。！？])\s+")


def generated_sentences(rng: np.random.Generator) -> Iterator[str]:
    """An endless stream of seeded pseudo-English sentences (no two runs of a seed differ)."""
    while True:
        a, b = rng.choice(ADJECTIVES, 2)
        n1, n2 = rng.choice(NOUNS, 2, replace=False)
        verb, place = rng.choice(VERBS), rng.choice(PLACES)
        sentence = f"the {a} {n1} {verb} the {b} {n2} {place}."
        if rng.random() < 0.2:
            sentence = f"{rng.choice(CONNECTIVES)} {sentence}"
        yield sentence[0].upper() + sentence[1:]


def noise_sentences(rng: np.random.Generator) -> Iterator[str]:
    """RULER's filler, repeated (the seed does not matter)."""
    while True:
        yield from NOISE


@dataclass(frozen=True)
class FileText:
    """Sentences of UTF-8 text files, read from a seeded start and wrapped around."""

    sentences: tuple[str, ...]

    @classmethod
    def load(cls, files: Sequence[str | Path]) -> FileText:
        """Reads and splits the files; raises ValueError naming a file that cannot be used."""
        sentences: list[str] = []
        for f in files:
            try:
                text = Path(f).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise ValueError(f"haystack file {f}: {e}") from None
            found = [s.strip() for s in _SENTENCE_END.split(" ".join(text.split()))]
            found = [s for s in found if s]
            if not found:
                raise ValueError(f"haystack file {f}: no text")
            sentences += found
        if not sentences:
            raise ValueError("haystack files: none given")
        return cls(tuple(sentences))

    def __call__(self, rng: np.random.Generator) -> Iterator[str]:
        i = int(rng.integers(len(self.sentences)))
        while True:
            yield self.sentences[i]
            i = (i + 1) % len(self.sentences)


def haystack_source(haystack: str | Sequence[str | Path]):
    """'generated', 'noise', or a list of text files -> a function rng -> sentence stream."""
    if isinstance(haystack, str):
        sources = {"generated": generated_sentences, "noise": noise_sentences}
        if haystack not in sources:
            raise ValueError(
                f"haystack must be 'generated', 'noise' or a list of files, got {haystack!r}"
            )
        return sources[haystack]
    return FileText.load(haystack)


def count_tokens(tokenizer: Tokenizer, text: str) -> int:
    """Number of tokens of `text`."""
    return len(tokenizer.encode(text))


def take_tokens(
    tokenizer: Tokenizer, sentences: Iterator[str], budget: int, sep: str = " "
) -> tuple[list[str], list[int]]:
    """Sentences whose `sep`-joined text has about `budget` tokens (at most, within a word).

    Returns the sentences and each one's token count (as sep + sentence; the first as is).
    The last sentence is cut between words to fill the budget.
    """
    out: list[str] = []
    counts: list[int] = []
    total = 0
    while total < budget:
        s = next(sentences)
        n = count_tokens(tokenizer, s if not out else sep + s)
        if total + n > budget:
            words = s.split(" ")
            while words:
                cut = " ".join(words)
                n = count_tokens(tokenizer, cut if not out else sep + cut)
                if total + n <= budget:
                    out.append(cut)
                    counts.append(n)
                    total += n
                    break
                words.pop()
            break
        out.append(s)
        counts.append(n)
        total += n
    return out, counts


def insert_at_depths(
    sentences: list[str], counts: list[int], needles: Sequence[tuple[float, str]]
) -> list[str]:
    """Inserts each (depth, needle) between sentences, at the boundary nearest to `depth`
    times the haystack's tokens (0: before everything, 1: after everything). Needles at the
    same boundary keep their given order."""
    total = sum(counts)
    bounds = np.concatenate([[0], np.cumsum(counts)])  # tokens before each boundary
    slots: dict[int, list[str]] = {}
    for depth, needle in needles:
        if not 0.0 <= depth <= 1.0:
            raise ValueError(f"depth must be in [0, 1], got {depth}")
        i = int(np.argmin(np.abs(bounds - depth * total)))
        slots.setdefault(i, []).append(needle)
    out: list[str] = []
    for i in range(len(sentences) + 1):
        out += slots.get(i, [])
        if i < len(sentences):
            out.append(sentences[i])
    return out


def fit_prompt(
    tokenizer: Tokenizer,
    length: int,
    head: str,
    tail: str,
    needles: Sequence[tuple[float, str]],
    sentences: Iterator[str],
    *,
    sep: str = " ",
    frame: str = "\n",
) -> str:
    """`head` + haystack with needles + `tail`, `length` tokens long (within a word).

    Args:
        tokenizer: counts tokens.
        length: target prompt length in tokens.
        head, tail: fixed text before and after the haystack (joined with newlines).
        needles: (depth in [0, 1], text) pairs placed inside the haystack.
        sentences: the haystack stream.
        sep: joins haystack sentences and needles.
        frame: joins head, haystack and tail.
    """
    fixed = count_tokens(tokenizer, head + frame + frame + tail) + sum(
        count_tokens(tokenizer, sep + n) for _, n in needles
    )
    budget = length - fixed
    if budget < 1:
        raise ValueError(
            f"length {length} is too short for this task with this tokenizer: its fixed text "
            f"alone has {fixed} tokens"
        )
    # Counting parts separately can differ from counting the whole at the joins; correct
    # the budget by the measured difference (twice at most: it converges at once in practice).
    seen: list[str] = []

    def replay() -> Iterator[str]:  # the same sentences again on each try
        yield from seen
        for s in sentences:
            seen.append(s)
            yield s

    for _ in range(3):
        body, counts = take_tokens(tokenizer, replay(), budget, sep)
        context = sep.join(insert_at_depths(body, counts, needles))
        prompt = frame.join([head, context, tail])
        error = count_tokens(tokenizer, prompt) - length
        if abs(error) <= max(1, length // 200):
            break
        budget -= error
    return prompt
