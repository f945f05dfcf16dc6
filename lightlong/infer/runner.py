"""`Runner`: one model step at a time over a pool of rows, for batched and continuous
generation.

A `Seq` is one sequence to generate: its prompt is prefilled alone into a single-row cache
(`Runner.prefill`, a few tokens per call, so a caller can interleave it with decoding),
then `admit`ted as a row of the runner's pool. Each `step` samples one token for every
row, drops the rows that finished, and runs the rest through the model in one batched
forward. Rows have their own lengths and sampling parameters, so sequences can join and
leave between any two steps; `Engine` drives a runner for one batch, the server's
scheduler for a stream of requests.

# B rows, V vocabulary
"""

from __future__ import annotations

import numbers
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from lightlong.infer.cache import HybridCache
from lightlong.infer.prefix import PrefixCache
from lightlong.infer.sampling import SamplingParams, process_logits, sample, token_logprobs
from lightlong.model import HybridLM, HybridVLM
from lightlong.model.image import ProcessedImage, expand_image_tokens, grid_shape
from lightlong.model.vision import text_model
from lightlong.nn.decode import decode_layout
from lightlong.tokenizer import IncrementalDecoder, Tokenizer

Prefilled = tuple[HybridCache, Tensor]
"""A prompt run elsewhere: its single-row cache and the logits [1, V] for the next token."""


@dataclass(frozen=True)
class StreamEvent:
    """One generated token of one row."""

    row: int
    """Index of the prompt in the request (`Seq.index`)."""
    token_id: int
    text: str
    """Text this token completes (may be empty while a character or stop string is pending)."""
    finish_reason: str | None = None
    """'stop' (stop token or string), 'length' (max_new_tokens), or None while running."""
    logprob: float | None = None
    """log p(token) under the model, when `SamplingParams.logprobs` is set."""
    top_logprobs: tuple[tuple[int, float], ...] = ()
    """The `SamplingParams.logprobs` most likely (token id, log p), most likely first."""


@dataclass
class GenerationStats:
    """Counts and times of a runner (for `Engine`, of its last request)."""

    prefill_tokens: int = 0
    """Prompt tokens run through the model (prefix-cache hits not counted)."""
    reused_tokens: int = 0
    """Prompt tokens restored from prefix snapshots."""
    prefill_seconds: float = 0.0
    decode_tokens: int = 0
    decode_seconds: float = 0.0
    cache_bytes: dict[str, int] = field(default_factory=dict)
    """`HybridCache.memory_bytes()` of the pool (for `Engine`, once every row is admitted)."""

    @property
    def prefill_tok_s(self) -> float:
        return self.prefill_tokens / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tok_s(self) -> float:
        return self.decode_tokens / self.decode_seconds if self.decode_seconds else 0.0


class Seq:
    """One sequence: its prompt, sampling parameters and generator, its prefill progress
    and its output. Made by `Runner.new_seq`."""

    def __init__(
        self,
        index: int,
        prompt: list[int],
        params: SamplingParams,
        stop_ids: set[int],
        generator: torch.Generator,
        tokenizer: Tokenizer | None,
    ):
        self.index, self.prompt, self.params = index, prompt, params
        self.stop_ids, self.generator = stop_ids, generator
        self.output: list[int] = []
        self.done = False
        self.reused = 0  # prompt tokens restored from a prefix snapshot
        self.prefilled = 0  # prompt tokens in the cache (restored or run)
        self.prompt_logprobs: list[tuple[float, tuple[tuple[int, float], ...]]] = []
        """With `params.prompt_logprobs`: (log p, alternatives) of prompt tokens 1, 2, …"""
        self.cache: HybridCache | None = None  # the prefill's single-row cache
        self.logits: Tensor | None = None  # fp32 [1, V] for the first token, once prefilled
        self.images: list[ProcessedImage | None] = []
        """The prompt's images, in the order of their `<image>` runs (None once the ViT has
        run on it, or the prefill is past it)."""
        self.image_spans: list[tuple[int, int]] = []
        """(start, length) of each image's run of `<image>` tokens in the prompt."""
        self.image_marks: list[tuple[int, bytes]] = []
        """(start, content digest) per image: what prefix-cache keys hash besides tokens."""
        self.image_features: dict[int, Tensor] = {}
        """Features [length, D] of the images the prefill is inside, by image index."""
        self._out = _Output(index, tokenizer, params.stop)

    @property
    def ready(self) -> bool:
        """The whole prompt is prefilled: the sequence can be admitted."""
        return self.logits is not None

    def __repr__(self) -> str:
        return f"Seq(index={self.index}, prompt={len(self.prompt)}, output={len(self.output)})"


class Runner:
    """Prefill, admission and batched decode steps over a pool of `max_num_seqs` rows.

    Args:
        model: the model (put in eval mode, its projections in the decode layout:
            `lightlong.nn.decode_layout`, same weights).
        tokenizer: for stop strings, text output and the end-of-text token.
        max_num_seqs: rows of the pool (sequences decoding at once).
        prefill_chunk: most tokens per prefill forward pass (bounds activation memory).
        prefix_cache: snapshots to restore prompt prefixes from; each prefill stores one at
            its last `prefix_cache.chunk_size` boundary.
        capacity: KV slots per row to allocate up front (grows by doubling past it).
        stop_token_ids: tokens that end every sequence unless it ignores end-of-text (a
            checkpoint's generation_config eos ids), besides the tokenizer's end-of-text.
    """

    def __init__(
        self,
        model: HybridLM | HybridVLM,
        tokenizer: Tokenizer | None = None,
        *,
        max_num_seqs: int,
        prefill_chunk: int = 4096,
        prefix_cache: PrefixCache | None = None,
        capacity: int = 0,
        stop_token_ids: Sequence[int] = (),
    ):
        if max_num_seqs < 1 or prefill_chunk < 1:
            raise ValueError(
                f"max_num_seqs and prefill_chunk must be >= 1, got {max_num_seqs}, {prefill_chunk}"
            )
        check_tokenizer(model, tokenizer)
        self.model, self.tokenizer = model.eval(), tokenizer
        self.lm = text_model(model)
        """The text model (the model itself, or a vision-language model's)."""
        decode_layout(self.lm)  # same weights, laid out for few-row products
        self.prefill_chunk, self.prefix_cache = prefill_chunk, prefix_cache
        eos = None if tokenizer is None else tokenizer.eos_token_id
        self.eos_ids = set(stop_token_ids) | ({eos} if eos is not None else set())
        self.cache = HybridCache.for_model(self.lm, 0, capacity, max_batch_size=max_num_seqs)
        self.running: list[Seq] = []  # in the cache's row order
        self.stats = GenerationStats()
        V = self.lm.config.vocab_size
        self._device = self.lm.model.embed_tokens.weight.device
        # A vision-language model's <image> token stands for features: never sampled.
        self._image_token = model.config.image_token_id if isinstance(model, HybridVLM) else None
        self._logits_BV = torch.zeros(max_num_seqs, V, device=self._device)
        # Tokens seen per row (repetition penalty) and generated per row (presence and
        # frequency penalties): allocated when a row first needs them.
        self._presence_BV: Tensor | None = None
        self._counts_BV: Tensor | None = None
        # A model may have more ids than its tokenizer (padded or untrained rows): never
        # sample one that cannot be decoded.
        self._usable = V if tokenizer is None else tokenizer.vocab_size

    @property
    def max_num_seqs(self) -> int:
        return self.cache.max_batch_size

    # -- sequences -------------------------------------------------------------------------

    def check(
        self,
        prompt: Sequence[int],
        params: SamplingParams,
        name: str = "prompt",
        images: Sequence[ProcessedImage] = (),
    ) -> list[int]:
        """Validates a prompt, its images and its parameters (ValueError naming the problem);
        returns the prompt as a list of ints, each image's `<image>` token expanded to its
        run of feature positions (`HybridVLM`: one `<image>` token per image is given)."""
        c = self.lm.config
        params.validate(c.vocab_size)
        if images and params.prompt_logprobs is not None:
            raise ValueError(f"{name}: prompt_logprobs are not reported for prompts with images")
        ids = self.expand(prompt, images, name)
        if len(ids) + params.max_new_tokens > c.max_position_embeddings:
            raise ValueError(
                f"{name} ({len(ids)} tokens) + max_new_tokens ({params.max_new_tokens}) exceeds "
                f"the model's max_position_embeddings={c.max_position_embeddings}"
            )
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer")
        return ids

    def expand(
        self, prompt: Sequence[int], images: Sequence[ProcessedImage] = (), name: str = "prompt"
    ) -> list[int]:
        """The prompt as the model runs it: its ids checked, each `<image>` token (one per
        image, in order) expanded to its image's run of features; ValueError naming the
        problem (a text model given images, a count mismatch, malformed images)."""
        ids = check_prompt(prompt, self.lm.config.vocab_size, name)
        if self._image_token is None:
            if images:
                raise ValueError(f"{name}: this model takes no images (not vision-language)")
            return ids
        for j, im in enumerate(images):
            self._check_image(im, f"{name} image {j}")
        counts = [self._image_tokens(im) for im in images]
        try:
            return expand_image_tokens(ids, self._image_token, counts)
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None

    def _image_tokens(self, image: ProcessedImage) -> int:
        return self.model.config.num_image_tokens(image.image_size)

    def _check_image(self, image: ProcessedImage, name: str) -> None:
        """ValueError unless image is a ProcessedImage with the tiles the model expects."""
        if not isinstance(image, ProcessedImage):
            raise ValueError(
                f"{name} must be a ProcessedImage (lightlong.model.image.ImageProcessor), got "
                f"{type(image).__name__}"
            )
        c = self.model.config
        S = c.vision.image_size
        rows, cols = grid_shape(image.image_size, c.image_grid_pinpoints, S)
        want = (1 + rows * cols, 3, S, S)
        if tuple(image.pixel_values.shape) != want:
            raise ValueError(
                f"{name}: pixel_values must be {list(want)} for an image of {image.image_size} "
                f"(height, width), got {list(image.pixel_values.shape)}"
            )

    def new_seq(
        self,
        prompt: Sequence[int],
        params: SamplingParams,
        *,
        seed: int,
        index: int = 0,
        prefilled: Prefilled | None = None,
        images: Sequence[ProcessedImage] = (),
    ) -> Seq:
        """A sequence to prefill and admit; `seed` seeds its sampler (the same seed gives
        the same tokens whatever else runs beside it). With `prefilled`, the prompt was run
        elsewhere (`Engine.prefill`, `lightlong.infer.prefill_split`): a single-row cache
        holding its tokens and the logits [1, V] for the next token; the sequence is ready
        to admit. `images` (a `HybridVLM`): one per `<image>` token of the prompt, in order
        (`lightlong.model.image.ImageProcessor`); their features enter in the prefill."""
        ids = self.check(prompt, params, images=images)
        stop_ids = set(params.stop_token_ids)
        if not params.ignore_eos:
            stop_ids |= self.eos_ids
        generator = torch.Generator(self._device).manual_seed(seed)
        seq = Seq(index, ids, params, stop_ids, generator, self.tokenizer)
        if images:
            raw = check_prompt(prompt, self.lm.config.vocab_size, "prompt")
            given = [i for i, t in enumerate(raw) if t == self._image_token]
            counts = [self._image_tokens(im) for im in images]
            # the i-th <image> moved by the runs the i before it became
            starts = [j + sum(counts[:i]) - i for i, j in enumerate(given)]
            seq.image_spans = list(zip(starts, counts, strict=True))
            seq.image_marks = [(a, im.digest) for a, im in zip(starts, images, strict=True)]
            seq.images = [None] * len(images) if prefilled is not None else list(images)
        if prefilled is not None:
            seq.cache, seq.logits = self._check_prefilled(prefilled, seq)
            seq.prefilled = len(ids)
        return seq

    def _check_prefilled(self, prefilled: Prefilled, seq: Seq) -> Prefilled:
        """prefilled, or ValueError saying how it does not fit seq."""
        cache, logits = prefilled
        n, V = len(seq.prompt), self.lm.config.vocab_size
        if seq.params.prompt_logprobs is not None:
            raise ValueError("prompt_logprobs score the prompt as it runs: pass no prefilled")
        if cache.config != self.lm.config or cache.lengths != [n]:
            raise ValueError(
                f"prefilled must be a single-row cache of this model holding the prompt's {n} "
                f"tokens, got rows of lengths {cache.lengths}"
            )
        if tuple(logits.shape) != (1, V):
            raise ValueError(f"prefilled logits must be [1, {V}], got {tuple(logits.shape)}")
        return cache, logits

    # -- prefill ---------------------------------------------------------------------------

    @torch.no_grad()
    def prefill(self, seq: Seq, max_tokens: int) -> int:
        """Runs up to `max_tokens` more of seq's prompt into its single-row cache (a first
        call restores the longest stored prefix first). After the last prompt token the
        logits for the first output token are kept and seq is `ready`.

        Returns the prompt tokens run by this call (restored ones not counted).
        """
        if seq.done:
            raise ValueError("seq was released; make a new one")
        if seq.ready:
            return 0
        n, scored = len(seq.prompt), seq.params.prompt_logprobs
        t0 = time.perf_counter()
        if seq.cache is None:
            seq.cache = HybridCache.for_model(self.lm, 1, capacity=n)
            if self.prefix_cache is not None and scored is None:
                seq.reused, snap = self.prefix_cache.lookup(seq.prompt, seq.image_marks)
                if snap is not None:
                    seq.cache.restore(snap)
                seq.prefilled = seq.reused
                self.stats.reused_tokens += seq.reused
                for i, (start, length) in enumerate(seq.image_spans):
                    if start + length <= seq.reused:  # in the snapshot: no ViT, no pixels
                        seq.images[i] = None
        boundary = None
        if self.prefix_cache is not None:
            boundary = (n - 1) // self.prefix_cache.chunk_size * self.prefix_cache.chunk_size
        ran = 0
        while ran < max_tokens and seq.prefilled < n:
            a = seq.prefilled
            chunk = self.prefill_chunk if scored is None else min(self.prefill_chunk, 1024)
            b = min(n, a + chunk, a + max_tokens - ran)
            if boundary is not None and a < boundary < b:
                b = boundary  # stop there to store the snapshot
            ids_1T = torch.tensor(seq.prompt[a:b], dtype=torch.int64, device=self._device)
            keep = int(b == n) if scored is None else None  # scoring needs every position's
            extra = {}
            if seq.image_spans:
                extra["image_features"] = self._image_features(seq, a, b)
            out = self.model(ids_1T[None], cache=seq.cache, logits_to_keep=keep, **extra)
            if scored is not None:
                self._score_prompt(seq, a, out.logits[0])
            if b == boundary:
                snapshot = seq.cache.snapshot()
                self.prefix_cache.insert(seq.prompt[:b], snapshot, seq.image_marks)
            seq.prefilled, ran = b, ran + b - a
            if b == n:  # a copy: a scored prompt's logits are [1, T, V] and must not stay
                seq.logits = out.logits[:, -1].float().clone()
        self.stats.prefill_seconds += time.perf_counter() - t0
        self.stats.prefill_tokens += ran
        return ran

    def _image_features(self, seq: Seq, a: int, b: int) -> Tensor | None:
        """The features of prompt positions [a, b)'s `<image>` tokens, in order, [M, D]. The
        ViT runs on an image when the prefill first reaches it (not for images a prefix
        snapshot covers); its pixels are dropped then, its features once the prefill is
        past it."""
        parts = []
        for i, (start, length) in enumerate(seq.image_spans):
            if start >= b or start + length <= a:
                continue
            if i not in seq.image_features:
                im = seq.images[i]
                pixels = im.pixel_values.to(self._device)
                seq.image_features[i] = self.model.image_features(pixels, [im.image_size])[0]
                seq.images[i] = None
            parts.append(seq.image_features[i][max(a - start, 0) : min(b - start, length)])
            if start + length <= b:
                del seq.image_features[i]
        return torch.cat(parts) if parts else None

    def _score_prompt(self, seq: Seq, a: int, logits_TV: Tensor) -> None:
        """Appends the log-probabilities of prompt tokens a + 1 … a + T from the logits
        [T, V] of positions a … a + T − 1."""
        targets = seq.prompt[a + 1 : a + 1 + logits_TV.shape[0]]
        if not targets:
            return
        logits = logits_TV[: len(targets)].float()
        logits[:, self._usable :] = float("-inf")
        chosen = torch.tensor(targets, dtype=torch.int64, device=logits.device)
        lp, top_ids, top_lp = token_logprobs(logits, chosen, seq.params.prompt_logprobs)
        for p, ids, lps in zip(lp.tolist(), top_ids.tolist(), top_lp.tolist(), strict=True):
            seq.prompt_logprobs.append((p, tuple(zip(ids, lps, strict=True))))

    # -- the pool --------------------------------------------------------------------------

    def admit(self, seq: Seq, source: Seq | None = None) -> None:
        """Makes a prefilled seq a row of the pool. With `source` (a ready seq of the same
        prompt, e.g. another of a request's n choices) its prefill is copied instead."""
        src = seq if source is None else source
        if not src.ready:
            raise ValueError("seq must be prefilled (ready) before it is admitted")
        if seq.params.max_new_tokens == 0:
            raise ValueError("a seq with max_new_tokens=0 only scores its prompt: release it")
        if source is not None and (
            source.prompt != seq.prompt or source.image_marks != seq.image_marks
        ):
            raise ValueError("source must be a sequence of the same prompt and images")
        b = self.cache.insert(src.cache)
        self.running.append(seq)
        self._logits_BV[b] = src.logits[0]
        seq.reused, seq.prefilled = src.reused, src.prefilled
        seq.prompt_logprobs = src.prompt_logprobs
        self._set_history(b, seq)
        seq.logits = src.logits
        if source is None:
            seq.cache = None  # copied into the pool: the single-row cache is no longer needed

    def release(self, seq: Seq) -> None:
        """Drops seq: frees its row at once if it is running, and its prefill cache."""
        seq.done, seq.cache = True, None
        if seq in self.running:
            self._remove(self.running.index(seq))

    @torch.no_grad()
    def step(self) -> list[tuple[Seq, StreamEvent]]:
        """Samples one token for every running row, frees the rows that finished, and runs
        the others' tokens through the model (one batched forward). Returns each row's
        event, in row order."""
        rows = list(self.running)
        if not rows:
            return []
        t0 = time.perf_counter()
        B = len(rows)
        logits_BV = self._logits_BV[:B]
        logits_BV[:, self._usable :] = float("-inf")
        if self._image_token is not None:
            logits_BV[:, self._image_token] = float("-inf")
        params = [s.params for s in rows]
        presence = None if self._presence_BV is None else self._presence_BV[:B]
        counts = None if self._counts_BV is None else self._counts_BV[:B]
        processed_BV = process_logits(logits_BV, params, presence, counts)
        next_B = sample(processed_BV, params, [s.generator for s in rows])
        top = max((p.logprobs for p in params if p.logprobs is not None), default=None)
        if top is not None:
            chosen_lp, top_ids, top_lp = (
                t.tolist() for t in token_logprobs(logits_BV, next_B, top)
            )
        if presence is not None:
            presence[torch.arange(B), next_B] = True
        if counts is not None:
            counts[torch.arange(B), next_B] += 1
        events = []
        for b, (seq, tok) in enumerate(zip(rows, next_B.tolist(), strict=True)):
            seq.output.append(tok)
            last = len(seq.output) == seq.params.max_new_tokens
            ev = seq._out.push(tok, tok in seq.stop_ids, last)
            if seq.params.logprobs is not None:
                k = seq.params.logprobs
                alternatives = tuple(zip(top_ids[b][:k], top_lp[b][:k], strict=True))
                ev = _with_logprobs(ev, chosen_lp[b], alternatives)
            seq.done = ev.finish_reason is not None
            events.append((seq, ev))
        self.stats.decode_tokens += B
        for b in reversed(range(B)):
            if rows[b].done:
                self._remove(b)
        if self.running:  # the survivors' tokens, in their (possibly moved) rows' order
            tokens = [s.output[-1] for s in self.running]
            tokens_B1 = torch.tensor(tokens, dtype=torch.int64, device=self._device)[:, None]
            out = self.model(tokens_B1, cache=self.cache, logits_to_keep=1)
            self._logits_BV[: len(tokens)] = out.logits[:, -1].float()
        self.stats.decode_seconds += time.perf_counter() - t0
        return events

    def _remove(self, b: int) -> None:
        """Frees row b; the last row moves into it (the cache, logits and histories alike)."""
        last = len(self.running) - 1
        self.cache.remove(b)
        if b != last:
            for buf in (self._logits_BV, self._presence_BV, self._counts_BV):
                if buf is not None:
                    buf[b] = buf[last]
        self.running[b] = self.running[last]
        self.running.pop()

    def _set_history(self, b: int, seq: Seq) -> None:
        """Row b's penalty buffers from seq's prompt and output (allocated on first need)."""
        p = seq.params
        V, S = self._logits_BV.shape[1], self.max_num_seqs
        if p.repetition_penalty != 1.0 and self._presence_BV is None:
            self._presence_BV = torch.zeros(S, V, dtype=torch.bool, device=self._device)
            for r, s in enumerate(self.running[:b]):
                self._presence_BV[r, s.prompt + s.output] = True
        if (p.presence_penalty or p.frequency_penalty) and self._counts_BV is None:
            self._counts_BV = torch.zeros(S, V, dtype=torch.int32, device=self._device)
            for r, s in enumerate(self.running[:b]):
                _count(self._counts_BV[r], s.output)
        if self._presence_BV is not None:
            self._presence_BV[b] = False
            self._presence_BV[b, seq.prompt + seq.output] = True
        if self._counts_BV is not None:
            self._counts_BV[b] = 0
            _count(self._counts_BV[b], seq.output)


def check_prompt(ids: Sequence[int] | Tensor, vocab_size: int, name: str) -> list[int]:
    """ids as a list of ints; ValueError naming `name` if empty or outside the vocabulary."""
    ids = ids.tolist() if isinstance(ids, Tensor) else list(ids)
    if not ids:
        raise ValueError(f"{name} is empty: a prompt needs at least one token")
    if any(not isinstance(t, numbers.Integral) or not 0 <= t < vocab_size for t in ids):
        raise ValueError(f"{name} must be token ids in [0, vocab_size={vocab_size})")
    return [int(t) for t in ids]


def check_tokenizer(model: HybridLM | HybridVLM, tokenizer: Tokenizer | None) -> None:
    """ValueError when the tokenizer has ids the model does not."""
    V = text_model(model).config.vocab_size
    if tokenizer is not None and tokenizer.vocab_size > V:
        raise ValueError(
            f"tokenizer has {tokenizer.vocab_size} tokens, more than the model's vocab_size={V}"
        )


def _count(counts_V: Tensor, ids: list[int]) -> None:
    """Adds one to counts_V (int32 [V]) per occurrence of each id."""
    if ids:
        idx = torch.tensor(ids, dtype=torch.int64, device=counts_V.device)
        counts_V.index_add_(0, idx, torch.ones_like(idx, dtype=counts_V.dtype))


def _with_logprobs(
    ev: StreamEvent, logprob: float, alternatives: tuple[tuple[int, float], ...]
) -> StreamEvent:
    return StreamEvent(ev.row, ev.token_id, ev.text, ev.finish_reason, logprob, alternatives)


class _Output:
    """One row's output: text decoding, stop strings and the stop decision."""

    def __init__(self, index: int, tokenizer: Tokenizer | None, stop: Sequence[str]):
        self.index, self.stop = index, list(stop)
        self.decoder = IncrementalDecoder(tokenizer) if tokenizer is not None else None
        self.longest_stop = max((len(s) for s in self.stop), default=0)
        self.text = ""  # everything decoded so far
        self.emitted = 0  # characters of text already sent

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
        return StreamEvent(self.index, token, delta, reason)

    def _pending_stop_prefix(self) -> int:
        """Length of the longest end of text that could begin a stop string (held back)."""
        return max(
            (n for s in self.stop for n in range(1, len(s)) if self.text.endswith(s[:n])),
            default=0,
        )
