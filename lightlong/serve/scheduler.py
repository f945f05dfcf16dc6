"""Continuous batching: which prompts to prefill, when to admit them, one decode step each
iteration. Plain Python over an `lightlong.infer.Runner`: no asyncio, no HTTP.

Every `step`:
1. prefills waiting requests first come, first served, at most `max_prefill_tokens` prompt
   tokens in all (a long prompt is split over several iterations, so running streams wait
   for at most one budget's worth of prefill between two tokens); a request starts its
   prefill only when rows are free for all of its `n` choices, and is admitted (its
   choices become rows of the pool, copies of one prefill) as soon as its prompt is done;
2. decodes every running row one token in one batched forward; finished and aborted rows
   leave the pool at once.
"""

from __future__ import annotations

import secrets
import time
from collections import deque
from dataclasses import dataclass, field

from lightlong.infer import Runner, SamplingParams, Seq, StreamEvent
from lightlong.model.image import ProcessedImage


class QueueFull(Exception):
    """The waiting queue holds `max_waiting` requests already."""


@dataclass(eq=False)
class Request:
    """One prompt with `n` choices. `seed` (None: random) seeds choice i with seed + i."""

    prompt: list[int]
    params: SamplingParams
    n: int = 1
    seed: int | None = None
    arrival: float = field(default_factory=time.monotonic)
    seqs: list[Seq] = field(default_factory=list)
    """One per choice, made by `Scheduler.add`."""
    admitted: float | None = None
    """When its prefill finished (time.monotonic)."""
    finished: int = 0
    """Choices that ended."""
    images: list[ProcessedImage] = field(default_factory=list)
    """A vision-language model's images, one per image token of `prompt`, in order."""

    @property
    def prompt_tokens(self) -> int:
        """Tokens of the prompt as the model runs it: each image token expanded to its
        image's features once the seqs are made."""
        return len(self.seqs[0].prompt) if self.seqs else len(self.prompt)

    @property
    def reused(self) -> int:
        """Prompt tokens restored from the prefix cache."""
        return self.seqs[0].reused if self.seqs else 0

    @property
    def done(self) -> bool:
        return self.finished == self.n


@dataclass(frozen=True)
class Update:
    """One generated token of one choice of a request."""

    request: Request
    choice: int
    event: StreamEvent


class Scheduler:
    """Owns a runner's pool: admits requests into its rows, steps it.

    Args:
        runner: the model runner (its `max_num_seqs` rows are the pool).
        max_prefill_tokens: prompt tokens prefilled per iteration, over all requests.
        max_waiting: requests that may wait for rows; `add` raises QueueFull past it.
    """

    def __init__(self, runner: Runner, *, max_prefill_tokens: int, max_waiting: int):
        if max_prefill_tokens < 1 or max_waiting < 1:
            raise ValueError(
                f"max_prefill_tokens and max_waiting must be >= 1, got {max_prefill_tokens}, "
                f"{max_waiting}"
            )
        self.runner = runner
        self.max_prefill_tokens, self.max_waiting = max_prefill_tokens, max_waiting
        self.waiting: deque[Request] = deque()
        self.running: set[Request] = set()
        self._prefilling: set[Request] = set()  # waiting requests whose rows are reserved
        self._request_of: dict[Seq, Request] = {}

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, request: Request) -> None:
        """Queues a request (its seqs are made here; ValueError for a bad prompt or
        parameters, QueueFull when the queue is full)."""
        if not 1 <= request.n <= self.runner.max_num_seqs:
            raise ValueError(f"n must be in [1, {self.runner.max_num_seqs}], got {request.n}")
        if len(self.waiting) >= self.max_waiting:
            raise QueueFull(f"{len(self.waiting)} requests are waiting already")
        seed = request.seed if request.seed is not None else secrets.randbits(62)
        request.seqs = [
            self.runner.new_seq(
                request.prompt, request.params, seed=seed + i, index=i, images=request.images
            )
            for i in range(request.n)
        ]
        for seq in request.seqs:
            self._request_of[seq] = request
        self.waiting.append(request)

    def abort(self, request: Request) -> None:
        """Drops a request wherever it is; its rows are free at once."""
        if request in self.waiting:
            self.waiting.remove(request)
        self._prefilling.discard(request)
        self.running.discard(request)
        for seq in request.seqs:
            self.runner.release(seq)
            self._request_of.pop(seq, None)

    def step(self) -> tuple[list[Request], list[Update]]:
        """One iteration: prefill under the budget, then one decode step of every row.
        Returns the requests admitted in it and every row's new token."""
        admitted = self._prefill()
        updates = []
        for seq, event in self.runner.step():
            request = self._request_of[seq]
            updates.append(Update(request, seq.index, event))
            if event.finish_reason is not None:
                request.finished += 1
                del self._request_of[seq]
                if request.done:
                    self.running.discard(request)
        return admitted, updates

    def _prefill(self) -> list[Request]:
        budget, admitted = self.max_prefill_tokens, []
        runner = self.runner
        for request in list(self.waiting):
            if budget <= 0:
                break
            if request not in self._prefilling:
                reserved = sum(_rows(r) for r in self._prefilling)
                if len(runner.running) + reserved + _rows(request) > runner.max_num_seqs:
                    break  # first come, first served: later requests wait too
                self._prefilling.add(request)
            lead = request.seqs[0]
            budget -= runner.prefill(lead, budget)
            if lead.ready:
                self.waiting.remove(request)
                self._prefilling.discard(request)
                request.admitted = time.monotonic()
                admitted.append(request)
                if request.params.max_new_tokens == 0:  # scored only: done already
                    for seq in request.seqs:
                        seq.prompt_logprobs = lead.prompt_logprobs
                        runner.release(seq)
                        del self._request_of[seq]
                    request.finished = request.n
                    continue
                for seq in request.seqs[1:]:
                    runner.admit(seq, source=lead)
                runner.admit(lead)
                self.running.add(request)
        return admitted


def _rows(request: Request) -> int:
    """Rows a request takes once admitted: one per choice, none to score a prompt only."""
    return request.n if request.params.max_new_tokens else 0
