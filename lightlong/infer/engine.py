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
from PIL.Image import Image as PILImage
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
from lightlong.model import HybridLM, HybridVLM
from lightlong.model.image import ImageProcessor, ProcessedImage, encode_with_images
from lightlong.model.vision import text_model
from lightlong.nn.decode import decode_layout
from lightlong.tokenizer import Tokenizer

Prompt = str | Sequence[int]
Image = ProcessedImage | PILImage
"""An image for a `HybridVLM`: a Pillow image, or one the model's processor has prepared."""


@dataclass
class Generation:
    """Everything generated for one prompt."""

    prompt_tokens: int
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None


class Engine:
    """Generation with a `HybridLM`, or a `HybridVLM` with images.

    Args:
        model: the model (put in eval mode and its projections in the decode layout,
            `lightlong.nn.decode_layout`, by the engine: same weights).
        tokenizer: turns text prompts into ids and ids into text; needed for text prompts,
            stop strings and text output. With a `HybridVLM`, "<image>" in a text prompt is
            its image token.
        prefill_chunk: tokens per prefill forward pass.
        prefix_cache_bytes: budget for prefix snapshots; 0 turns prefix reuse off.
        image_processor: prepares Pillow images for a `HybridVLM` (default: its config's,
            `ImageProcessor.for_config`).
    """

    def __init__(
        self,
        model: HybridLM | HybridVLM,
        tokenizer: Tokenizer | None = None,
        *,
        prefill_chunk: int = 4096,
        prefix_cache_bytes: int = 0,
        image_processor: ImageProcessor | None = None,
    ):
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
        check_tokenizer(model, tokenizer)
        self.model, self.tokenizer = model.eval(), tokenizer
        decode_layout(text_model(model))
        self.prefill_chunk = prefill_chunk
        self.prefix_cache = (
            PrefixCache(prefill_chunk, prefix_cache_bytes) if prefix_cache_bytes else None
        )
        self.stats = GenerationStats()
        self.image_processor = image_processor
        if isinstance(model, HybridVLM) and image_processor is None:
            self.image_processor = ImageProcessor.for_config(model.config)

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
        self,
        prompt: Sequence[int],
        *,
        images: Sequence[Image] = (),
        progress: Callable[[int], None] | None = None,
    ) -> tuple[HybridCache, Tensor]:
        """Runs one prompt into a fresh single-row cache, chunk by chunk.

        Only the last position's logits are computed. With a prefix cache, starts from the
        longest stored prefix and stores a snapshot at the last chunk boundary.

        Args:
            prompt: token ids (at least one); one image token per image.
            images: the prompt's images, in order (`HybridVLM`).
            progress: called with the number of tokens each chunk adds.

        Returns:
            the cache after the prompt (its `<image>` tokens expanded), and fp32 logits
            [1, V] for the next token.
        """
        runner = self._runner(1)
        params = SamplingParams(max_new_tokens=1)
        seq = runner.new_seq(prompt, params, seed=0, images=self._processed(images))
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
        images: Sequence[Sequence[Image]] | None = None,
    ) -> list[Generation]:
        """Generates for one prompt or a batch; returns one `Generation` per prompt.

        prefilled: per prompt, its (cache, logits) from `prefill` or
        `lightlong.infer.prefill_split` (the prompt is not run again), or None.
        images: per prompt, its images in the order of its image tokens (`HybridVLM`; one
        `<image>` token per image, which the engine expands to the image's features)."""
        seqs, events = self._start(prompts, params, progress, prefilled, images)
        results = [Generation(prompt_tokens=len(s.prompt)) for s in seqs]
        for ev in events:
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
        images: Sequence[Sequence[Image]] | None = None,
    ) -> Iterator[StreamEvent]:
        """Like `generate`, yielding each token as it is sampled (rows interleaved).
        Arguments are checked here, before the first token is asked for."""
        return self._start(prompts, params, progress, prefilled, images)[1]

    def _start(
        self,
        prompts: Prompt | Sequence[Prompt],
        params: SamplingParams | None,
        progress: Callable[[int], None] | None,
        prefilled: Sequence[Prefilled | None] | None,
        images: Sequence[Sequence[Image]] | None,
    ) -> tuple[list[Seq], Iterator[StreamEvent]]:
        """The checked sequences of a request (prompts expanded) and its event stream."""
        batch, params = self._as_batch(prompts), params or SamplingParams()
        params.validate(text_model(self.model).config.vocab_size)  # before sizing the cache
        prefilled = [None] * len(batch) if prefilled is None else list(prefilled)
        if len(prefilled) != len(batch):
            raise ValueError(
                f"prefilled must have one entry per prompt ({len(batch)}), got {len(prefilled)}"
            )
        images = [()] * len(batch) if images is None else list(images)
        if any(isinstance(ims, (PILImage, ProcessedImage)) for ims in images):
            raise ValueError("images must hold one list of images per prompt (e.g. [[image]])")
        if len(images) != len(batch):
            raise ValueError(
                f"images must have one list per prompt ({len(batch)}), got {len(images)}"
            )
        runner = self._runner(len(batch))
        # one seed for every row: a row gives the same tokens alone or in a batch
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        seqs = [
            runner.new_seq(
                p,
                params,
                seed=seed,
                index=b,
                prefilled=pre,
                images=self._processed(ims, f"images[{b}]"),
            )
            for b, (p, pre, ims) in enumerate(zip(batch, prefilled, images, strict=True))
        ]
        runner.cache.reserve(max(len(s.prompt) for s in seqs) + params.max_new_tokens)
        return seqs, self._run(runner, seqs, progress)

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
                if isinstance(self.model, HybridVLM):
                    p = encode_with_images(self.tokenizer, p, self.model.config.image_token_id)
                else:
                    p = self.tokenizer.encode(p)
            V = text_model(self.model).config.vocab_size
            batch.append(check_prompt(p, V, f"prompts[{i}]"))
        return batch

    def _processed(self, images: Sequence[Image], name: str = "images") -> list[ProcessedImage]:
        """Images prepared by the model's processor (Pillow images are processed here)."""
        if images and self.image_processor is None:
            raise ValueError(f"{name}: this model takes no images (not a vision-language model)")
        out = []
        for j, im in enumerate(images):
            if isinstance(im, PILImage):
                im = self.image_processor(im)
            elif not isinstance(im, ProcessedImage):
                raise ValueError(
                    f"{name}[{j}] must be a PIL image or a ProcessedImage, got {type(im).__name__}"
                )
            out.append(im)
        return out
