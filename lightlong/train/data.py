"""Training data: seeded synthetic tasks and packed text, with a resumable position.

Every batch is one packed row: `input_ids` and `labels` int64 [1, B·T] with `cu_seqlens`
int64 [N + 1] at sample (or document) boundaries, so no attention and no lightning state
crosses from one sample into the next. Labels are aligned with input_ids (the model shifts
them); -100 marks tokens without loss. Sample i depends only on (seed, i): the data's
position is one integer, saved in checkpoints.

Synthetic vocabularies (any vocab_size >= 64): id 0 is padding / start, the rest is split
into keys, values and filler (see `_ranges`).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

IGNORE = -100
TASKS = ("recall", "passkey", "copy", "selective_copy", "retrieval")


@dataclass(frozen=True)
class Batch:
    """One packed training batch."""

    input_ids: Tensor
    """int64 [1, B·T]."""
    labels: Tensor
    """int64 [1, B·T]; -100 where there is no loss."""
    cu_seqlens: Tensor
    """int64 [N + 1] offsets of the samples (documents) in the row."""

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[1]


def _ranges(vocab_size: int) -> tuple[range, range, range]:
    """Key, value and filler id ranges: a third each of ids 1 … vocab_size − 1."""
    if vocab_size < 64:
        raise ValueError(f"synthetic tasks need vocab_size >= 64, got {vocab_size}")
    third = (vocab_size - 1) // 3
    return range(1, 1 + third), range(1 + third, 1 + 2 * third), range(1 + 2 * third, vocab_size)


@dataclass(frozen=True)
class SyntheticTask:
    """A seeded synthetic task.

    - "recall" (multi-query associative recall): `num_pairs` key-value pairs, filler, then
      `num_queries` queries (a key, then its value; loss on the value). Filler fills the
      middle, so a longer sequence means a longer distance from pair to query. With
      `min_pairs`, each sample draws its number of pairs from min_pairs … num_pairs (a
      curriculum mixed into every batch: few pairs are solved by copying any value first).
    - "passkey": filler with a needle (a marker key, then `num_pairs` value tokens) at a
      random depth; at the end the marker again, then the same value tokens (loss on them).
    - "copy": `num_pairs` random tokens, a separator, the same tokens again (loss on them),
      after filler in between.
    - "selective_copy": `num_pairs` value tokens scattered among filler, a separator, then
      the value tokens in order (loss on them).
    - "retrieval": each sample is "recall" or "passkey", by a seeded coin (the two retrieval
      probes, MQAR and a needle in a haystack, learned together).
    """

    name: str
    vocab_size: int
    num_pairs: int = 16
    num_queries: int = 16
    min_pairs: int = 0
    """recall: pairs per sample drawn uniformly from min_pairs … num_pairs (0: num_pairs)."""

    def __post_init__(self):
        if self.name not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.name!r}")
        keys, values, _ = _ranges(self.vocab_size)
        if not 1 <= self.num_pairs <= min(len(keys), len(values)):
            raise ValueError(
                f"num_pairs must be in [1, {min(len(keys), len(values))}] for vocab_size "
                f"{self.vocab_size}, got {self.num_pairs}"
            )
        if self.num_queries < 1:
            raise ValueError(f"num_queries must be >= 1, got {self.num_queries}")
        if not 0 <= self.min_pairs <= self.num_pairs:
            raise ValueError(
                f"min_pairs must be in [0, num_pairs={self.num_pairs}], got {self.min_pairs}"
            )

    def min_length(self) -> int:
        """Shortest sequence that holds the task."""
        n = self.num_pairs
        recall, passkey = 2 * n + 2 * self.num_queries + 1, 2 * n + 4
        return {"recall": recall, "passkey": passkey, "copy": 2 * n + 2,
                "selective_copy": 2 * n + 2,
                "retrieval": max(recall, passkey)}[self.name]  # fmt: skip

    def sample(self, rng: np.random.Generator, length: int) -> tuple[np.ndarray, np.ndarray]:
        """input_ids, labels int64 [length] (labels -100 outside the answers)."""
        if length < self.min_length():
            raise ValueError(
                f"seq_len {length} is too short for {self.name} with num_pairs="
                f"{self.num_pairs}: needs >= {self.min_length()}"
            )
        if self.name == "retrieval":
            kind = "recall" if rng.random() < 0.5 else "passkey"
            return dataclasses.replace(self, name=kind).sample(rng, length)
        keys, values, filler = _ranges(self.vocab_size)
        ids = rng.integers(filler.start, filler.stop, size=length)
        ids[0] = 0
        labels = np.full(length, IGNORE, dtype=np.int64)
        n = self.num_pairs
        if self.name == "recall" and self.min_pairs:
            n = int(rng.integers(self.min_pairs, self.num_pairs + 1))
        if self.name == "recall":
            k = rng.choice(len(keys), size=n, replace=False) + keys.start
            v = rng.integers(values.start, values.stop, size=n)
            ids[1 : 1 + 2 * n : 2], ids[2 : 2 + 2 * n : 2] = k, v
            q = rng.integers(0, n, size=self.num_queries)
            start = length - 2 * self.num_queries
            ids[start::2], ids[start + 1 :: 2] = k[q], v[q]
            labels[start + 1 :: 2] = v[q]
        elif self.name == "passkey":
            marker = keys.start
            v = rng.integers(values.start, values.stop, size=n)
            at = int(rng.integers(1, length - 2 * n - 2))
            ids[at], ids[at + 1 : at + 1 + n] = marker, v
            ids[length - n - 1], ids[length - n :] = marker, v
            labels[length - n :] = v
        elif self.name == "copy":
            v = rng.integers(values.start, values.stop, size=n)
            ids[1 : 1 + n] = v
            ids[length - n - 1], ids[length - n :] = keys.start, v
            labels[length - n :] = v
        else:  # selective_copy
            v = rng.integers(values.start, values.stop, size=n)
            at = np.sort(rng.choice(np.arange(1, length - n - 1), size=n, replace=False))
            ids[at] = v
            ids[length - n - 1], ids[length - n :] = keys.start, v
            labels[length - n :] = v
        return ids.astype(np.int64), labels


class SyntheticData:
    """Batches of `batch_size` samples of `seq_len` tokens; sample i is seeded by (seed, i).

    `position` (samples consumed) is the whole state; set it to resume. Ranks of a
    distributed run take disjoint samples of each global batch (`rank`, `world_size`).
    """

    def __init__(self, task: SyntheticTask, seq_len: int, batch_size: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1):  # fmt: skip
        task.sample(np.random.default_rng(0), seq_len)  # validates seq_len
        if batch_size % world_size:
            raise ValueError(f"batch_size {batch_size} must divide by world_size {world_size}")
        self.task, self.seq_len, self.batch_size, self.seed = task, seq_len, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.position = 0

    def sample(self, i: int, length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Sample i (at another length for evaluation)."""
        return self.task.sample(np.random.default_rng([self.seed, i]), length or self.seq_len)

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        local = self.batch_size // self.world_size
        first = self.position + self.rank * local
        samples = [self.sample(i) for i in range(first, first + local)]
        self.position += self.batch_size
        return _pack([s[0] for s in samples], [s[1] for s in samples])

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = int(state["position"])


class TextData:
    """Documents from .txt files (one document per file) or .jsonl files (one per line,
    text under `field`), tokenized, joined with the end-of-text id, cut into windows of
    `seq_len` tokens; each batch packs `batch_size` windows with cu_seqlens at document
    boundaries. Windows are taken in order, cycling; `position` counts windows consumed."""

    def __init__(self, files: Sequence[str | Path], tokenizer, seq_len: int, batch_size: int,
                 field: str = "text", rank: int = 0, world_size: int = 1):  # fmt: skip
        if not files:
            raise ValueError("data files: give at least one .txt or .jsonl file")
        if batch_size % world_size:
            raise ValueError(f"batch_size {batch_size} must divide by world_size {world_size}")
        eos = tokenizer.eos_token_id
        stream, starts = [], []
        for doc in read_documents(files, field):
            starts.append(len(stream))
            stream.extend(tokenizer.encode(doc))
            if eos is not None:
                stream.append(eos)
        if len(stream) < seq_len:
            raise ValueError(f"data files hold {len(stream)} tokens, fewer than seq_len {seq_len}")
        self.tokens = np.asarray(stream, dtype=np.int64)
        self.doc_starts = np.asarray(starts, dtype=np.int64)
        self.seq_len, self.batch_size = seq_len, batch_size
        self.rank, self.world_size = rank, world_size
        self.num_windows = len(self.tokens) // seq_len
        self.position = 0

    def window(self, i: int) -> tuple[np.ndarray, list[int]]:
        """Tokens of window i (mod the number of windows) and where documents start in it."""
        a = (i % self.num_windows) * self.seq_len
        b = a + self.seq_len
        inner = self.doc_starts[(self.doc_starts > a) & (self.doc_starts < b)] - a
        return self.tokens[a:b], inner.tolist()

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        local = self.batch_size // self.world_size
        first = self.position + self.rank * local
        pieces = []
        for i in range(first, first + local):
            tokens, starts = self.window(i)
            cuts = [0, *starts, len(tokens)]
            pieces += [tokens[a:b] for a, b in itertools.pairwise(cuts) if b > a]
        self.position += self.batch_size
        return _pack(pieces, [p.copy() for p in pieces])

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = int(state["position"])


def read_documents(files: Sequence[str | Path], field: str = "text") -> Iterator[str]:
    """The documents of text files: a whole `.txt` file, or each line's `field` of a `.jsonl`
    file. Errors name the file (and line)."""
    for f in map(Path, files):
        if not f.is_file():
            raise FileNotFoundError(f"data file {f} does not exist")
        try:
            yield from _documents(f, field)
        except UnicodeDecodeError as e:
            raise ValueError(
                f"data file {f}: not UTF-8 (byte {e.object[e.start]:#04x} at offset {e.start}); "
                "convert it, e.g. iconv -f latin1 -t utf-8"
            ) from None


def _documents(f: Path, field: str) -> Iterator[str]:
    if f.suffix == ".txt":
        yield f.read_text(encoding="utf-8")
    elif f.suffix == ".jsonl":
        with f.open(encoding="utf-8") as lines:
            for n, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{f}:{n}: not valid JSON: {e.msg}") from None
                if not isinstance(record, dict) or not isinstance(record.get(field), str):
                    raise ValueError(f"{f}:{n}: expected an object with a string {field!r}")
                yield record[field]
    else:
        raise ValueError(f"data file {f}: expected .txt or .jsonl")


def _pack(ids: list[np.ndarray], labels: list[np.ndarray]) -> Batch:
    """Concatenates samples into one row with cu_seqlens at their boundaries."""
    lengths = [len(x) for x in ids]
    cu = torch.tensor(np.concatenate([[0], np.cumsum(lengths)]), dtype=torch.int64)
    return Batch(
        torch.from_numpy(np.concatenate(ids))[None],
        torch.from_numpy(np.concatenate(labels))[None],
        cu,
    )
