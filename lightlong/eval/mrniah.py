"""MR-NIAH: multi-round needle in a haystack (MiniMax-01's long-context chat evaluation).

A long multi-turn chat history holds three short "needle" exchanges — two answers to the
same request and one answer to a similar request — at 25 %, 50 % and 75 % of it; the last
user turn asks the model to repeat one of the two ("Please repeat the first poem you wrote
about penguins"). Generated here from seeded templates (English), or read from MiniMax's
published JSONL files (`MRNIAH.from_files`), which are run as they are.

Chats are rendered as plain text, the way a base model reads them::

    User: <content>

    Assistant: <content>

    ...
    User: <the recall request>

    Assistant:

Scoring is adjusted recall:
1. The key items of the expected answer are its lines with list markers ("1.", "-", "*")
   removed, each split into clauses at , ; . ! ? : and their CJK forms (，；。！？：、);
   items are stripped of spaces and empty ones dropped. "1. Apple\\n2. Banana" has two
   items; "Vast and blue, waves surging, cradle of life." has three.
2. The score is the fraction of key items found verbatim in the output (case-insensitive,
   runs of whitespace compared as one space): half the lines of a poem score 0.5.
3. An output that refuses — "sorry", "no previous conversation", "抱歉", "没有之前的对话"
   (case-insensitive) — scores 0 whatever else it holds.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lightlong.eval import text
from lightlong.eval.tasks import Sample, Task
from lightlong.tokenizer import Tokenizer

REFUSALS = ("sorry", "no previous conversation", "抱歉", "没有之前的对话")
NEEDLE_DEPTHS = (0.25, 0.5, 0.75)
STOP = "\n\nUser:"

_MARKER = re.compile(r"^\s*(?:\d+[.)、]|[-*•])\s*")
_CLAUSE = re.compile(r"[,;.!?:，；。！？：、]")
_SPACE = re.compile(r"\s+")


def key_items(answer: str) -> list[str]:
    """The key items of an expected answer (the rule in the module docstring)."""
    items = []
    for line in answer.splitlines():
        line = _MARKER.sub("", line)
        items += [c.strip() for c in _CLAUSE.split(line) if c.strip()]
    return items


def _normalize(s: str) -> str:
    return _SPACE.sub(" ", s).strip().lower()


def adjusted_recall(output: str, answer: str) -> float:
    """Fraction of the answer's key items in the output; 0 for a refusal."""
    out = _normalize(output)
    if any(r in out for r in REFUSALS):
        return 0.0
    items = key_items(answer)
    if not items:
        raise ValueError(f"the expected answer has no key items: {answer!r}")
    return sum(_normalize(i) in out for i in items) / len(items)


def render(messages: Sequence[dict[str, str]]) -> str:
    """The chat as plain text, ending with the assistant's cue (see the module docstring)."""
    names = {"user": "User", "assistant": "Assistant", "system": "System"}
    turns = [f"{names[m['role']]}: {m['content']}" for m in messages]
    return "\n\n".join([*turns, "Assistant:"])


# -- synthetic chats -------------------------------------------------------------------------

TOPICS = (
    "penguins", "swans", "lighthouses", "autumn rain", "the desert", "a harbor town",
    "winter mornings", "old libraries", "mountain rivers", "city lights", "bamboo forests",
    "thunderstorms", "sunflowers", "the night market", "glaciers", "fireflies",
)  # fmt: skip
_KINDS = ("poem", "list of three words", "description")


def _answer(kind: str, rng: np.random.Generator) -> str:
    """A short answer whose key items are distinct word sequences."""
    if kind == "list of three words":
        words = rng.choice(text.NOUNS, 3, replace=False)
        return "\n".join(f"{i + 1}. {w.capitalize()}" for i, w in enumerate(words))
    lines = 4 if kind == "poem" else 1
    parts = []
    for _ in range(lines):
        a, n, v = rng.choice(text.ADJECTIVES), rng.choice(text.NOUNS), rng.choice(text.VERBS)
        b, place = rng.choice(text.NOUNS), rng.choice(text.PLACES)
        parts.append(f"The {a} {n} {v} the {b}, {place}")
    return ",\n".join(parts) + "." if kind == "poem" else parts[0] + "."


def _filler(rng: np.random.Generator) -> str:
    """One ordinary exchange (user request, assistant answer) of generated text."""
    topic = rng.choice(TOPICS)
    request = rng.choice(
        [f"Tell me about {topic}.", f"Write a short story about {topic}.",
         f"What do you think of {topic}?", f"Describe {topic} in a few sentences."]
    )  # fmt: skip
    sentences = text.generated_sentences(rng)
    reply = " ".join(next(sentences) for _ in range(int(rng.integers(3, 9))))
    return f"User: {request}\n\nAssistant: {reply}"


class MRNIAH(Task):
    """Synthetic MR-NIAH (see the module docstring): depth places the asked-for answer."""

    name = "mr_niah"
    metric = "adjusted_recall"
    uses_depth = True
    max_new_tokens = 128
    stop = (STOP,)

    def build(self, tokenizer, length, rng, depth):
        kind = str(rng.choice(_KINDS))
        topic, other = rng.choice(TOPICS, 2, replace=False)
        request = f"Write a {kind} about {topic}"
        answers = [_answer(kind, rng) for _ in range(3)]
        # The target at `depth`; its sibling (same request) and the distractor at the other
        # standard depths, or at seeded random ones for a non-standard depth.
        rest = [d for d in NEEDLE_DEPTHS if d != depth]
        if len(rest) == len(NEEDLE_DEPTHS):
            rest = sorted(rng.random(2).tolist())
        sibling, distractor = (rest[0], rest[1]) if rng.random() < 0.5 else (rest[1], rest[0])
        ordinal = "first" if depth < sibling or (depth == sibling and rng.random() < 0.5) else (
            "second"
        )  # fmt: skip
        exchanges = [
            (depth, f"User: {request}\n\nAssistant: {answers[0]}"),
            (sibling, f"User: {request}\n\nAssistant: {answers[1]}"),
            (distractor, f"User: Write a {kind} about {other}\n\nAssistant: {answers[2]}"),
        ]
        needles = [e for _, e in exchanges]  # the target first
        exchanges.sort(key=lambda e: e[0])  # same-boundary needles keep chat order
        query = f"Please repeat the {ordinal} {kind} you wrote about {topic}."
        head = "The following is a conversation between a user and an assistant."
        tail = f"User: {query}\n\nAssistant:"

        def chat():
            while True:
                yield _filler(rng)

        prompt = text.fit_prompt(
            tokenizer, length, head, tail, exchanges, chat(), sep="\n\n", frame="\n\n"
        )
        meta = {"query": query, "ordinal": ordinal, "needles": needles}
        return prompt, " " + answers[0], key_items(answers[0]), meta

    def score(self, sample: Sample, output: str) -> float:
        return adjusted_recall(output, sample.answer)


@dataclass(frozen=True)
class MRNIAHRow:
    """One row of a published MR-NIAH file."""

    messages: list[dict[str, str]]
    label: str
    length_class: int
    file: str
    line: int


def load_rows(path: str | Path) -> list[MRNIAHRow]:
    """Reads and checks an MR-NIAH JSONL file; errors name the file and line."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"MR-NIAH file {path}: {e}") from None
    m = re.match(r"(\d+)_tokens", path.stem)
    default_length = int(m.group(1)) if m else None
    rows = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
        messages, label = row.get("messages"), row.get("label")
        if not isinstance(messages, list) or not messages:
            raise ValueError(f"{where}: 'messages' must be a non-empty list")
        for i, msg in enumerate(messages):
            ok = isinstance(msg, dict) and msg.get("role") in ("user", "assistant", "system")
            if not ok or not isinstance(msg.get("content"), str):
                raise ValueError(
                    f"{where}: messages[{i}] must be {{'role': 'user'|'assistant'|'system', "
                    f"'content': str}}"
                )
        if messages[-1]["role"] != "user":
            raise ValueError(f"{where}: the last message must be the user's recall request")
        if not isinstance(label, str) or not key_items(label):
            raise ValueError(f"{where}: 'label' must be a string with at least one key item")
        length = row.get("length_class", default_length)
        if not isinstance(length, int) or isinstance(length, bool) or length < 1:
            raise ValueError(
                f"{where}: 'length_class' must be a positive integer (or the file named "
                f"N_tokens.jsonl), got {length!r}"
            )
        rows.append(MRNIAHRow(messages, label, length, str(path), n))
    if not rows:
        raise ValueError(f"MR-NIAH file {path}: no rows")
    return rows


def file_samples(files: Sequence[str | Path], tokenizer: Tokenizer) -> list[Sample]:
    """The rows of published MR-NIAH files as samples, run as they are.

    `length` is the file's nominal length (in MiniMax's tokens); `prompt_tokens` is this
    tokenizer's count. `depth` is the needle's standard position (25/50/75 %): the rank of
    the label's turn among the distinct turns that hold a label in that file (the published
    files cycle the target through three needle slots); `meta["measured_depth"]` is the
    fraction of prompt tokens before that turn.
    """
    samples = []
    for f in files:
        rows = load_rows(f)
        turns = [_label_turn(r) for r in rows]
        slots = sorted({t for t in turns if t is not None})
        for r, turn in zip(rows, turns, strict=True):
            prompt = render(r.messages)
            meta: dict[str, Any] = {"file": r.file, "line": r.line}
            depth = None
            if turn is not None:
                before = render(r.messages[:turn]) if turn else ""
                meta["measured_depth"] = text.count_tokens(tokenizer, before) / text.count_tokens(
                    tokenizer, prompt
                )
                if len(slots) == len(NEEDLE_DEPTHS):
                    depth = NEEDLE_DEPTHS[slots.index(turn)]
            sample = Sample(
                task=MRNIAH.name, prompt=prompt, answer=r.label, references=key_items(r.label),
                length=r.length_class, prompt_tokens=text.count_tokens(tokenizer, prompt),
                seed=r.line, depth=depth, meta=meta,
            )  # fmt: skip
            samples.append(sample)
    return samples


def _label_turn(row: MRNIAHRow) -> int | None:
    """Index of the first assistant message that is the label, if any."""
    want = _normalize(row.label)
    for i, m in enumerate(row.messages[:-1]):
        if m["role"] == "assistant" and _normalize(m["content"]) == want:
            return i
    return None
