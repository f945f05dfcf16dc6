"""`Engine`: chunked prefill, prefix reuse and batched, streamed generation.

Each prompt is prefilled alone, in chunks of `prefill_chunk` tokens (memory bounded by one
chunk's activations plus the cache), from the longest stored prefix snapshot when there
is one. The rows then decode together, one token per step: lightning layers through their
O(1) recurrent step, softmax layers over their KV cache. Finished rows leave the batch.
The steps are a `lightlong.infer.Runner`'s, the same the server's continuous batching runs.

# B rows, T tokens, V vocabulary
"""

from __future__ import annotations

import numbers
import secrets
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from lightlong.infer.cache import HybridCache
from lightlong.infer.prefix import PrefixCache
from lightlong.infer.runner import (
    GenerationStats,
    Prefilled,
    Runner,
    Seq,
    StreamEvent,
    check_prompt,
    check_tokenizer,
)
from lightlong.infer.sampling import SamplingParams
from lightlong.model import HybridLM
from lightlong.tokenizer import Tokenizer

Prompt = str | Sequence[int]


@dataclass
class Generation:
    """Everything generated for one prompt."""

    prompt_tokens: int
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None


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
        check_tokenizer(model, tokenizer)
        self.model, self.tokenizer = model.eval(), tokenizer
        self.prefill_chunk = prefill_chunk
        self.prefix_cache = (
            PrefixCache(prefill_chunk, prefix_cache_bytes) if prefix_cache_bytes else None
        )
        self.stats = GenerationStats()

    # -- prefill ---------------------------------------------------------------------------

    def _runner(self, rows: int, capacity: int = 0) -> Runner:
        runner = Runner(
            self.model, self.tokenizer, max_num_seqs=rows, prefill_chunk=self.prefill_chunk,
            prefix_cache=self.prefix_cache, capacity=capacity,
        )  # fmt: skip
        self.stats = runner.stats
        return runner

    def _prefill(self, runner: Runner, seq: Seq, progress: Callable[[int], None] | None) -> None:
        first = True
        while not seq.ready:
            ran = runner.prefill(seq, self.prefill_chunk)
            if progress is not None:
                if first and seq.reused:
                    progress(seq.reused)
                progress(ran)
            first = False

    def prefill(
        self, prompt: Sequence[int], *, progress: Callable[[int], None] | None = None
    ) -> tuple[HybridCache, Tensor]:
        """Runs one prompt into a fresh single-row cache, chunk by chunk.

        Only the last position's logits are computed. With a prefix cache, starts from the
        longest stored prefix and stores a snapshot at the last chunk boundary.

        Args:
            prompt: token ids (at least one).
            progress: called with the number of tokens each chunk adds.

        Returns:
            the cache after the prompt, and fp32 logits [1, V] for the next token.
        """
        runner = self._runner(1)
        seq = runner.new_seq(prompt, SamplingParams(max_new_tokens=1), seed=0)
        self._prefill(runner, seq, progress)
        return seq.cache, seq.logits

    # -- generation ------------------------------------------------------------------------

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        params: SamplingParams | None = None,
        *,
        progress: Callable[[int], None] | None = None,
        prefilled: Sequence[Prefilled | None] | None = None,
    ) -> list[Generation]:
        """Generates for one prompt or a batch; returns one `Generation` per prompt.

        prefilled: per prompt, its (cache, logits) from `prefill` or
        `lightlong.infer.prefill_split` (the prompt is not run again), or None."""
        batch = self._as_batch(prompts)
        results = [Generation(prompt_tokens=len(p)) for p in batch]
        for ev in self.stream(batch, params, progress=progress, prefilled=prefilled):
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
        prefilled: Sequence[Prefilled | None] | None = None,
    ) -> Iterator[StreamEvent]:
        """Like `generate`, yielding each token as it is sampled (rows interleaved).
        Arguments are checked here, before the first token is asked for."""
        batch, params = self._as_batch(prompts), params or SamplingParams()
        params.validate(self.model.config.vocab_size)  # before sizing the cache by it
        prefilled = [None] * len(batch) if prefilled is None else list(prefilled)
        if len(prefilled) != len(batch):
            raise ValueError(
                f"prefilled must have one entry per prompt ({len(batch)}), got {len(prefilled)}"
            )
        longest = max(len(p) for p in batch)
        runner = self._runner(len(batch), capacity=longest + params.max_new_tokens)
        # one seed for every row: a row gives the same tokens alone or in a batch
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        seqs = [
            runner.new_seq(p, params, seed=seed, index=b, prefilled=pre)
            for b, (p, pre) in enumerate(zip(batch, prefilled, strict=True))
        ]
        return self._run(runner, seqs, progress)

    @torch.no_grad()
    def _run(
        self, runner: Runner, seqs: list[Seq], progress: Callable[[int], None] | None
    ) -> Iterator[StreamEvent]:
        for seq in seqs:
            self._prefill(runner, seq, progress)
            if seq.params.max_new_tokens:  # 0: the prompt is only scored
                runner.admit(seq)
        runner.stats.cache_bytes = runner.cache.memory_bytes()
        while runner.running:
            for _, ev in runner.step():
                yield ev

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
            batch.append(check_prompt(p, self.model.config.vocab_size, f"prompts[{i}]"))
        return batch
