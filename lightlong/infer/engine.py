"""`Engine`: chunked prefill, prefix reuse and batched, streamed generation.

Each prompt is prefilled alone, in chunks of `prefill_chunk` tokens (memory bounded by one
chunk's activations plus the cache), from the longest stored prefix snapshot when there
is one. The single-row caches are then stacked, right-aligned, into one batch that decodes
one token per step: lightning layers through their O(1) recurrent step, softmax layers over
their KV cache. Finished rows leave the batch.

# B rows, T tokens, V vocabulary
"""

from __future__ import annotations

import numbers
import secrets
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from lightlong.infer.cache import HybridCache
from lightlong.infer.prefix import PrefixCache
from lightlong.infer.sampling import SamplingParams, process_logits, sample
from lightlong.model import HybridLM
from lightlong.tokenizer import IncrementalDecoder, Tokenizer

Prompt = str | Sequence[int]


@dataclass(frozen=True)
class StreamEvent:
    """One generated token of one row."""

    row: int
    """Index of the prompt in the request."""
    token_id: int
    text: str
    """Text this token completes (may be empty while a character or stop string is pending)."""
    finish_reason: str | None = None
    """'stop' (stop token or string), 'length' (max_new_tokens), or None while running."""


@dataclass
class Generation:
    """Everything generated for one prompt."""

    prompt_tokens: int
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None


@dataclass
class GenerationStats:
    """Counts and times of the last request."""

    prefill_tokens: int = 0
    """Prompt tokens run through the model (prefix-cache hits not counted)."""
    reused_tokens: int = 0
    """Prompt tokens restored from prefix snapshots."""
    prefill_seconds: float = 0.0
    decode_tokens: int = 0
    decode_seconds: float = 0.0
    cache_bytes: dict[str, int] = field(default_factory=dict)
    """`HybridCache.memory_bytes()` at the end of the prefill of the whole batch."""

    @property
    def prefill_tok_s(self) -> float:
        return self.prefill_tokens / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tok_s(self) -> float:
        return self.decode_tokens / self.decode_seconds if self.decode_seconds else 0.0


class Engine:
    """Generation with a `HybridLM`.

    Args:
        model: the model (put in eval mode by the engine).
        tokenizer: turns text prompts into ids and ids into text; needed for text prompts,
            stop strings and text output.
        prefill_chunk: tokens per prefill forward pass.
        prefix_cache_bytes: budget for prefix snapshots; 0 turns prefix reuse off.
    """

    def __init__(
        self,
        model: HybridLM,
        tokenizer: Tokenizer | None = None,
        *,
        prefill_chunk: int = 4096,
        prefix_cache_bytes: int = 0,
    ):
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
        if tokenizer is not None and tokenizer.vocab_size > model.config.vocab_size:
            raise ValueError(
                f"tokenizer has {tokenizer.vocab_size} tokens, more than the model's "
                f"vocab_size={model.config.vocab_size}"
            )
        self.model, self.tokenizer = model.eval(), tokenizer
        self.prefill_chunk = prefill_chunk
        self.prefix_cache = (
            PrefixCache(prefill_chunk, prefix_cache_bytes) if prefix_cache_bytes else None
        )
        self.stats = GenerationStats()

    # -- prefill ---------------------------------------------------------------------------

    @torch.no_grad()
    def prefill(
        self,
        prompt: Sequence[int],
        *,
        capacity: int = 0,
        progress: Callable[[int], None] | None = None,
    ) -> tuple[HybridCache, Tensor]:
        """Runs one prompt into a fresh single-row cache, chunk by chunk.

        Only the last position's logits are computed. With a prefix cache, starts from the
        longest stored prefix and stores a snapshot at the last chunk boundary.

        Args:
            prompt: token ids (at least one).
            capacity: KV slots to allocate up front (prompt + tokens to come).
            progress: called with the number of tokens each chunk adds.

        Returns:
            the cache after the prompt, and fp32 logits [1, V] for the next token.
        """
        ids = self._check_ids(prompt, "prompt")
        n, C = len(ids), self.prefill_chunk
        cache = HybridCache.for_model(self.model, 1, capacity=max(capacity, n))
        start = 0
        if self.prefix_cache is not None:
            start, snap = self.prefix_cache.lookup(prompt)
            if snap is not None:
                cache.restore(snap)
                if progress is not None:
                    progress(start)
        last_boundary = (n - 1) // C * C
        device = self.model.lm_head.weight.device
        ids_1T = torch.tensor(ids, dtype=torch.int64, device=device)[None]
        t0 = time.perf_counter()
        for a in range(start, n, C):
            b = min(a + C, n)
            out = self.model(ids_1T[:, a:b], cache=cache, logits_to_keep=int(b == n))
            if self.prefix_cache is not None and b == last_boundary:
                self.prefix_cache.insert(ids[:b], cache.snapshot())
            if progress is not None:
                progress(b - a)
        self.stats.prefill_seconds += time.perf_counter() - t0
        self.stats.prefill_tokens += n - start
        self.stats.reused_tokens += start
        return cache, out.logits[:, -1].float()

    # -- generation ------------------------------------------------------------------------

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        params: SamplingParams | None = None,
        *,
        progress: Callable[[int], None] | None = None,
    ) -> list[Generation]:
        """Generates for one prompt or a batch; returns one `Generation` per prompt."""
        batch = self._as_batch(prompts)
        results = [Generation(prompt_tokens=len(p)) for p in batch]
        for ev in self.stream(batch, params, progress=progress):
            r = results[ev.row]
            r.token_ids.append(ev.token_id)
            r.text += ev.text
            r.finish_reason = ev.finish_reason
        return results

    def stream(
        self,
        prompts: Prompt | Sequence[Prompt],
        params: SamplingParams | None = None,
        *,
        progress: Callable[[int], None] | None = None,
    ) -> Iterator[StreamEvent]:
        """Like `generate`, yielding each token as it is sampled (rows interleaved).
        Arguments are checked here, before the first token is asked for."""
        batch, params = self._as_batch(prompts), params or SamplingParams()
        stop_ids = self._check_request(batch, params)
        return self._run(batch, params, stop_ids, progress)

    def _check_request(self, batch: list[list[int]], params: SamplingParams) -> set[int]:
        """Validates a request; returns the token ids that end a row."""
        c = self.model.config
        params.validate(c.vocab_size)
        longest = max(len(p) for p in batch)
        if longest + params.max_new_tokens > c.max_position_embeddings:
            raise ValueError(
                f"prompt ({longest} tokens) + max_new_tokens ({params.max_new_tokens}) exceeds "
                f"the model's max_position_embeddings={c.max_position_embeddings}"
            )
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer")
        stop_ids = set(params.stop_token_ids)
        eos = None if self.tokenizer is None else self.tokenizer.eos_token_id
        if eos is not None and not params.ignore_eos:
            stop_ids.add(eos)
        return stop_ids

    @torch.no_grad()
    def _run(
        self,
        batch: list[list[int]],
        params: SamplingParams,
        stop_ids: set[int],
        progress: Callable[[int], None] | None,
    ) -> Iterator[StreamEvent]:
        c = self.model.config
        longest = max(len(p) for p in batch)
        self.stats = GenerationStats()
        capacity = longest + params.max_new_tokens
        caches, logits = zip(
            *(self.prefill(p, capacity=capacity, progress=progress) for p in batch), strict=True
        )
        cache = caches[0] if len(caches) == 1 else HybridCache.stack(caches, capacity)
        del caches
        logits_BV = torch.cat(logits)
        self.stats.cache_bytes = cache.memory_bytes()

        device = logits_BV.device
        presence_BV = None
        if params.repetition_penalty != 1.0:
            presence_BV = torch.zeros(len(batch), c.vocab_size, dtype=torch.bool, device=device)
            for b, p in enumerate(batch):
                presence_BV[b, p] = True
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        generators = [torch.Generator(device).manual_seed(seed) for _ in batch]
        rows = [_Row(b, self.tokenizer, params.stop) for b in range(len(batch))]

        # A model may have more ids than its tokenizer (padded or untrained rows): never
        # sample one that cannot be decoded.
        usable = c.vocab_size if self.tokenizer is None else self.tokenizer.vocab_size
        t0 = time.perf_counter()
        for step in range(params.max_new_tokens):
            logits_BV[:, usable:] = float("-inf")
            next_B = sample(process_logits(logits_BV, params, presence_BV), params, generators)
            if presence_BV is not None:
                presence_BV[torch.arange(len(rows)), next_B] = True
            keep = []
            for i, (row, tok) in enumerate(zip(rows, next_B.tolist(), strict=True)):
                last = step + 1 == params.max_new_tokens
                yield row.push(tok, tok in stop_ids, last)
                if not row.done:
                    keep.append(i)
            self.stats.decode_tokens += len(rows)
            if not keep:
                break
            if len(keep) < len(rows):
                rows = [rows[i] for i in keep]
                generators = [generators[i] for i in keep]
                next_B = next_B[keep]
                cache.select(keep)
                if presence_BV is not None:
                    presence_BV = presence_BV[keep]
            out = self.model(next_B[:, None], cache=cache, logits_to_keep=1)
            logits_BV = out.logits[:, -1].float()
        self.stats.decode_seconds = time.perf_counter() - t0

    # -- inputs ----------------------------------------------------------------------------

    def _as_batch(self, prompts: Prompt | Sequence[Prompt]) -> list[list[int]]:
        """One prompt (text or ids) or a list of them -> lists of ids, checked."""
        if isinstance(prompts, Tensor):
            single = prompts.dim() == 1
        else:
            single = isinstance(prompts, str) or (
                len(prompts) > 0 and isinstance(prompts[0], numbers.Integral)
            )
        items = [prompts] if single else list(prompts)
        if not items:
            raise ValueError("prompts must hold at least one prompt")
        batch = []
        for i, p in enumerate(items):
            if isinstance(p, str):
                if self.tokenizer is None:
                    raise ValueError("text prompts need a tokenizer; pass token ids or one")
                p = self.tokenizer.encode(p)
            batch.append(self._check_ids(p, f"prompts[{i}]"))
        return batch

    def _check_ids(self, ids: Sequence[int] | Tensor, name: str) -> list[int]:
        ids = ids.tolist() if isinstance(ids, Tensor) else list(ids)
        V = self.model.config.vocab_size
        if not ids:
            raise ValueError(f"{name} is empty: a prompt needs at least one token")
        if any(not isinstance(t, numbers.Integral) or not 0 <= t < V for t in ids):
            raise ValueError(f"{name} must be token ids in [0, vocab_size={V})")
        return [int(t) for t in ids]


class _Row:
    """One row's output: text decoding, stop strings and the stop decision."""

    def __init__(self, index: int, tokenizer: Tokenizer | None, stop: Sequence[str]):
        self.index, self.stop = index, list(stop)
        self.decoder = IncrementalDecoder(tokenizer) if tokenizer is not None else None
        self.longest_stop = max((len(s) for s in self.stop), default=0)
        self.text = ""  # everything decoded so far
        self.emitted = 0  # characters of text already sent
        self.done = False

    def push(self, token: int, is_stop_token: bool, is_last: bool) -> StreamEvent:
        """Adds a sampled token; returns its event (with a finish reason if the row ends)."""
        reason = "stop" if is_stop_token else ("length" if is_last else None)
        if self.decoder is not None and not is_stop_token:
            self.text += self.decoder.push(token)
        end = len(self.text)
        # A stop string not found before `emitted` can only end in the new text.
        start = max(0, self.emitted - self.longest_stop)
        hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        if hits:
            end, reason = min(hits), "stop"
        elif reason is None:
            end -= self._pending_stop_prefix()
        elif self.decoder is not None:
            self.text += self.decoder.flush()
            end = len(self.text)
        delta = self.text[self.emitted : end]
        self.emitted = max(self.emitted, end)
        self.done = reason is not None
        return StreamEvent(self.index, token, delta, reason)

    def _pending_stop_prefix(self) -> int:
        """Length of the longest end of text that could begin a stop string (held back)."""
        return max(
            (n for s in self.stop for n in range(1, len(s)) if self.text.endswith(s[:n])),
            default=0,
        )
