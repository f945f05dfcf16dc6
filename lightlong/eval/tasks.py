"""Evaluation tasks: seeded samples at a target token length, and their scores.

A task builds a `Sample` (prompt, the ideal answer, the strings scoring looks for) for a
tokenizer, a target prompt length in tokens, a seed and, for tasks with one target needle,
a depth; then scores a model's output for it in [0, 1]. Same arguments, same sample.

Needle tasks (re-implemented offline from the NIAH and RULER descriptions):

| task | haystack | what is asked | score |
|---|---|---|---|
| `niah` | generated text (or files) | the value of one key | match-all |
| `niah_single` | RULER noise | the value of one key | match-all |
| `niah_multikey` | generated text | one key's value among 4 keys | match-all |
| `niah_multivalue` | generated text | all 4 values of one key | match-all |
| `niah_multiquery` | generated text | the values of 4 keys | match-all |
| `variable_tracking` | RULER noise | every variable bound to a value through a chain | match-all |
| `common_words` | a numbered word list | its 10 most common words | match-all |
| `frequent_words` | coded words (Zipf) | its 3 most frequent words | match-all |

Scores (RULER's, case-insensitive substring tests on the output):
- **match-all**: the fraction of the references found (partial credit: 2 of 4 values → 0.5);
- **match-part**: 1 if any reference is found (for answers with alternatives), else 0.

Depth is the fraction of the haystack's tokens before the needle (0: first, 1: last).
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lightlong.eval import text
from lightlong.tokenizer import Tokenizer


@dataclass
class Sample:
    """One prompt and what a correct answer holds."""

    task: str
    prompt: str
    answer: str
    """The ideal output (what an oracle answers)."""
    references: list[str]
    """The strings scoring looks for in the output."""
    length: int
    """Target prompt length in tokens."""
    prompt_tokens: int
    """The prompt's actual length in tokens."""
    seed: int
    depth: float | None = None
    """Where the target needle is (fraction of the haystack before it), if the task has one."""
    meta: dict[str, Any] = field(default_factory=dict)


def string_match_all(output: str, references: Sequence[str]) -> float:
    """Fraction of the references found in the output (case-insensitive)."""
    out = output.lower()
    return sum(r.lower() in out for r in references) / len(references)


def string_match_part(output: str, references: Sequence[str]) -> float:
    """1.0 if any reference is found in the output (case-insensitive), else 0.0."""
    out = output.lower()
    return float(any(r.lower() in out for r in references))


METRICS = {"match_all": string_match_all, "match_part": string_match_part}


def sample_seed(*parts: object) -> int:
    """A stable 63-bit seed from any values (the same across runs and platforms)."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class Task(ABC):
    """A long-context task. Subclasses set `name`, `metric`, `uses_depth`, `max_new_tokens`
    and implement `build`."""

    name: str
    metric: str = "match_all"
    uses_depth: bool = False
    """Whether the task places one target needle at a requested depth."""
    max_new_tokens: int = 32
    """Tokens to generate for an answer."""
    stop: tuple[str, ...] = ("\n",)
    """Stop strings for generation."""

    def sample(
        self, tokenizer: Tokenizer, length: int, seed: int, depth: float | None = None
    ) -> Sample:
        """The sample for (tokenizer, length, seed, depth); depth only for `uses_depth` tasks
        (None there means 0.5)."""
        if length < 1:
            raise ValueError(f"length must be >= 1, got {length}")
        if depth is not None and not self.uses_depth:
            raise ValueError(f"task {self.name} does not take a depth")
        if self.uses_depth:
            depth = 0.5 if depth is None else float(depth)
            if not 0.0 <= depth <= 1.0:
                raise ValueError(f"depth must be in [0, 1], got {depth}")
        rng = np.random.default_rng(seed)
        prompt, answer, references, meta = self.build(tokenizer, length, rng, depth)
        return Sample(
            task=self.name, prompt=prompt, answer=answer, references=references, length=length,
            prompt_tokens=text.count_tokens(tokenizer, prompt), seed=seed, depth=depth, meta=meta,
        )  # fmt: skip

    @abstractmethod
    def build(
        self, tokenizer: Tokenizer, length: int, rng: np.random.Generator, depth: float | None
    ) -> tuple[str, str, list[str], dict[str, Any]]:
        """(prompt, ideal answer, references, metadata) for one sample."""

    def score(self, sample: Sample, output: str) -> float:
        """The output's score in [0, 1]."""
        return METRICS[self.metric](output, sample.references)


# -- needles -------------------------------------------------------------------------------


def _keys(rng: np.random.Generator, n: int) -> list[str]:
    """n distinct keys like 'golden-harbor'."""
    keys: list[str] = []
    while len(keys) < n:
        key = f"{rng.choice(text.ADJECTIVES)}-{rng.choice(text.NOUNS)}"
        if key not in keys:
            keys.append(key)
    return keys


def _values(rng: np.random.Generator, n: int) -> list[str]:
    """n distinct 7-digit numbers, none a substring of another."""
    values: list[str] = []
    while len(values) < n:
        v = str(int(rng.integers(1_000_000, 10_000_000)))
        if v not in values:
            values.append(v)
    return values


def _needle(key: str, value: str) -> str:
    return f"One of the special magic numbers for {key} is: {value}."


def _join(items: Sequence[str]) -> str:
    return ", ".join(items)


class NeedleTask(Task):
    """Needles 'One of the special magic numbers for KEY is: VALUE.' in a haystack.

    Args:
        haystack: 'generated', 'noise' or text files (see `lightlong.eval.text`).
        num_keys: keys in the haystack (the first is asked for, the others distract).
        num_values: values per asked key.
        num_queries: keys asked for (the first num_queries keys).
    """

    def __init__(
        self,
        name: str,
        haystack: str | Sequence[str | Path] = "generated",
        *,
        num_keys: int = 1,
        num_values: int = 1,
        num_queries: int = 1,
    ):
        if not 1 <= num_queries <= num_keys or num_values < 1:
            raise ValueError("need 1 <= num_queries <= num_keys and num_values >= 1")
        self.name, self.haystack = name, text.haystack_source(haystack)
        self.num_keys, self.num_values, self.num_queries = num_keys, num_values, num_queries
        self.uses_depth = num_values == 1 and num_queries == 1
        self.max_new_tokens = 16 * num_values * num_queries

    def build(self, tokenizer, length, rng, depth):
        keys = _keys(rng, self.num_keys)
        values = _values(rng, self.num_values * self.num_keys)
        per_key = {k: values[i * self.num_values : (i + 1) * self.num_values] for i, k in
                   enumerate(keys)}  # fmt: skip
        needles = [(float(rng.random()), _needle(k, v)) for k in keys for v in per_key[k]]
        if self.uses_depth:
            needles[0] = (depth, needles[0][1])
        order = rng.permutation(len(needles))
        if self.uses_depth:  # the target first among needles sharing its boundary
            order = [0, *(i for i in order if i != 0)]
        needles = [needles[i] for i in order]
        asked = keys[: self.num_queries]
        wanted = [v for k in asked for v in per_key[k]]
        what = "numbers" if len(wanted) > 1 else "number"
        head = (
            f"{'Some' if len(wanted) > 1 else 'A'} special magic {what} "
            f"{'are' if len(wanted) > 1 else 'is'} hidden within the following text. Make sure "
            f"to memorize {'them' if len(wanted) > 1 else 'it'}. I will quiz you about the "
            f"{what} afterwards."
        )
        tail = (
            f"What {'are all' if len(wanted) > 1 else 'is'} the special magic {what} for "
            f"{_join(asked)} mentioned in the provided text? The special magic {what} for "
            f"{_join(asked)} mentioned in the provided text {'are' if len(wanted) > 1 else 'is'}:"
        )
        prompt = text.fit_prompt(tokenizer, length, head, tail, needles, self.haystack(rng))
        meta = {"needles": [n for _, n in needles], "keys": asked}
        return prompt, " " + _join(wanted), wanted, meta


class VariableTracking(Task):
    """RULER's variable tracking: 'VAR AAAAA = 12345' then 'VAR BBBBB = VAR AAAAA', ... in
    noise; asks for every variable that ends up holding the value.

    Args:
        hops: assignments after the first (chain length − 1).
        chains: chains in the text (the first is asked about).
    """

    name = "variable_tracking"

    def __init__(self, haystack: str | Sequence[str | Path] = "noise", *, hops: int = 4,
                 chains: int = 1):  # fmt: skip
        if hops < 1 or chains < 1:
            raise ValueError("hops and chains must be >= 1")
        self.haystack, self.hops, self.chains = text.haystack_source(haystack), hops, chains
        self.max_new_tokens = 8 * (hops + 1) + 8

    def build(self, tokenizer, length, rng, depth):
        names: list[str] = []
        while len(names) < self.chains * (self.hops + 1):
            n = "".join(rng.choice(list("ABCDEFGHIJKLMNOPQRSTUVWXYZ"), 5))
            if n not in names:
                names.append(n)
        values = [str(int(rng.integers(10_000, 100_000))) for _ in range(self.chains)]
        needles: list[tuple[float, str]] = []
        for c in range(self.chains):
            chain = names[c * (self.hops + 1) : (c + 1) * (self.hops + 1)]
            depths = np.sort(rng.random(len(chain)))  # in order: each after the one it uses
            needles.append((float(depths[0]), f"VAR {chain[0]} = {values[c]}."))
            needles += [
                (float(d), f"VAR {b} = VAR {a}.")
                for d, a, b in zip(depths[1:], chain[:-1], chain[1:], strict=True)
            ]
        wanted = names[: self.hops + 1]
        head = (
            "Memorize and track the chain(s) of variable assignments hidden in the following text."
        )
        tail = (
            f"Question: Find all variables that are assigned the value {values[0]} in the text "
            f"above. Answer: According to the chain(s) of variable assignment in the text "
            f"above, {len(wanted)} variables are assigned the value {values[0]}, they are:"
        )
        prompt = text.fit_prompt(tokenizer, length, head, tail, needles, self.haystack(rng))
        return prompt, " " + " ".join(wanted), wanted, {"value": values[0]}


def _distinct_words(rng: np.random.Generator, n: int, letters: int | None = None) -> list[str]:
    """n distinct words, none a substring of another: random lowercase letters, `letters`
    long (default 4-8)."""
    words: list[str] = []
    parts: set[str] = set()  # every substring of a chosen word
    alphabet = list("abcdefghijklmnopqrstuvwxyz")
    while len(words) < n:
        size = letters or int(rng.integers(4, 9))
        w = "".join(rng.choice(alphabet, size))
        subs = {w[i:j] for i in range(size) for j in range(i + 1, size + 1)}
        if w not in parts and not subs & set(words):
            words.append(w)
            parts |= subs
    return words


class CommonWords(Task):
    """RULER's common-words extraction: a numbered list of words where `num_common` words
    appear `freq_common` times and the rest `freq_uncommon` times; asks for the common ones.
    Frequencies shrink for short lengths (common ≥ 2 × uncommon always)."""

    name = "common_words"

    def __init__(self, num_common: int = 10, freq_common: int = 30, freq_uncommon: int = 3):
        if num_common < 1 or freq_common <= freq_uncommon or freq_uncommon < 1:
            raise ValueError("need num_common >= 1 and freq_common > freq_uncommon >= 1")
        self.num_common, self.freq_common, self.freq_uncommon = (
            num_common, freq_common, freq_uncommon,
        )  # fmt: skip
        self.max_new_tokens = 12 * num_common

    def build(self, tokenizer, length, rng, depth):
        head = (
            "Below is a numbered list of words. In these words, some appear more often than "
            "others. Memorize the ones that appear most often."
        )
        tail = (
            f"Question: What are the {self.num_common} most common words in the above list? "
            f"Answer: The top {self.num_common} words that appear most often in the list are:"
        )
        fixed = text.count_tokens(tokenizer, f"{head}\n\n{tail}")
        trial = self._listing(_distinct_words(np.random.default_rng(0), 64) * 16)
        per_word = text.count_tokens(tokenizer, " " + trial) / (64 * 16)
        slots = int((length - fixed) / per_word)
        fc, fu = self.freq_common, self.freq_uncommon
        while self.num_common * fc > slots // 2 and fc > 2:  # keep room for uncommon words
            fc, fu = max(2, fc // 2), max(1, min(fu, fc // 4))
        if slots < self.num_common * fc:
            raise ValueError(
                f"length {length} is too short for {self.name}: it needs about "
                f"{fixed + int(self.num_common * 2 * per_word)} tokens"
            )
        num_uncommon = (slots - self.num_common * fc) // fu
        words = _distinct_words(rng, self.num_common + 2 * num_uncommon + 16)
        common, pool = words[: self.num_common], words[self.num_common :]
        order_seed = int(rng.integers(2**63))
        # Estimate, measure, correct the number of uncommon words (the list's numbers make
        # items grow with the list), then drop words from the end to fit.
        for _ in range(4):
            items = [w for w in common for _ in range(fc)]
            items += [w for w in pool[:num_uncommon] for _ in range(fu)]
            items = [items[i] for i in np.random.default_rng(order_seed).permutation(len(items))]
            listing = self._listing(items)
            n = text.count_tokens(tokenizer, f"{head}\n{listing}\n{tail}")
            if 0 <= length - n <= length // 200:
                break
            item_tokens = (n - fixed) / len(items)
            num_uncommon += int((length - n) / (item_tokens * fu)) - (n > length)
            num_uncommon = min(max(0, num_uncommon), len(pool))
        while n > length and any(w not in common for w in items):
            items.pop(max(i for i, w in enumerate(items) if w not in common))
            listing = self._listing(items)
            n = text.count_tokens(tokenizer, f"{head}\n{listing}\n{tail}")
        prompt = f"{head}\n{listing}\n{tail}"
        meta = {"freq_common": fc, "freq_uncommon": fu, "num_words": len(items)}
        return prompt, " " + " ".join(common), common, meta

    @staticmethod
    def _listing(items: Sequence[str]) -> str:
        return " ".join(f"{i + 1}. {w}" for i, w in enumerate(items))


class FrequentWords(Task):
    """RULER's frequent-words extraction: coded words drawn with Zipf frequencies (rank r has
    weight r^-alpha); asks for the `top` most frequent. Counts are set, not sampled, so the
    top words are strictly more frequent than the rest."""

    name = "frequent_words"

    def __init__(self, alpha: float = 2.0, top: int = 3, vocab: int = 200):
        if alpha <= 0 or top < 1 or vocab <= top:
            raise ValueError("need alpha > 0, top >= 1 and vocab > top")
        self.alpha, self.top, self.vocab = alpha, top, vocab
        self.max_new_tokens = 12 * top

    def build(self, tokenizer, length, rng, depth):
        head = (
            "Read the following coded text and track the frequency of each coded word. Find "
            f"the {self.top} most frequently appearing coded words."
        )
        tail = (
            "Question: Do not provide any explanation. Please ignore the dots '....'. What "
            f"are the {self.top} most frequently appearing words in the above coded text? "
            f"Answer: According to the coded text above, the {self.top} most frequently "
            "appearing words are:"
        )
        fixed = text.count_tokens(tokenizer, f"{head}\n\n{tail}")
        words = _distinct_words(rng, self.vocab, letters=5)
        per_word = text.count_tokens(tokenizer, " " + " ".join(words)) / self.vocab
        total = max(0, int((length - fixed) / per_word))
        weights = np.arange(1, self.vocab + 1, dtype=np.float64) ** -self.alpha
        counts = np.floor(total * weights / weights.sum()).astype(int)
        if counts[self.top - 1] <= counts[self.top]:
            raise ValueError(
                f"length {length} is too short for {self.name}: its top {self.top} words "
                "would not be more frequent than the rest"
            )
        items = [w for w, c in zip(words, counts, strict=True) for _ in range(c)]
        items = [items[i] for i in rng.permutation(len(items))]
        filler = text.count_tokens(tokenizer, f"{head}\n{' '.join(items)}\n{tail}")
        pad = max(0, (length - filler) // text.count_tokens(tokenizer, " ...."))
        items += ["...."] * pad  # dots fill the remainder, as in RULER
        items = [items[i] for i in rng.permutation(len(items))]
        prompt = f"{head}\n{' '.join(items)}\n{tail}"
        top = words[: self.top]
        return prompt, " " + " ".join(top), top, {"counts": counts[: self.top + 1].tolist()}


def niah_tasks(haystack: str | Sequence[str | Path] = "generated") -> dict[str, Task]:
    """The needle tasks (see the module docstring); `haystack` for those on text."""
    return {
        "niah": NeedleTask("niah", haystack),
        "niah_single": NeedleTask("niah_single", "noise"),
        "niah_multikey": NeedleTask("niah_multikey", haystack, num_keys=4),
        "niah_multivalue": NeedleTask("niah_multivalue", haystack, num_values=4),
        "niah_multiquery": NeedleTask("niah_multiquery", haystack, num_keys=4, num_queries=4),
        "variable_tracking": VariableTracking(),
        "common_words": CommonWords(),
        "frequent_words": FrequentWords(),
    }
