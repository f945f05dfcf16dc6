"""`AsyncEngine`: the scheduler on a thread of its own, fed by asyncio request handlers.

The model runs on one thread (`lightlong-engine`) that owns the scheduler, the runner and
the cache; handlers talk to it through a command queue and receive each request's tokens
on an asyncio queue of their own. A handler that stops listening (its client went away)
aborts its request, which frees the request's rows before the next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator

from lightlong.infer import Runner
from lightlong.serve.metrics import Metrics
from lightlong.serve.scheduler import QueueFull, Request, Scheduler, Update

log = logging.getLogger("lightlong.serve")


class EngineStopped(Exception):
    """The server is shutting down: the request was not run, or was cut short."""


class AsyncEngine:
    """Runs requests through a `Scheduler` on a background thread.

    Args:
        runner: the model runner (its rows are the batch).
        max_prefill_tokens: prompt tokens prefilled per iteration.
        max_waiting: requests that may wait; more get `QueueFull`.
        metrics: where counts and latencies go.
    """

    def __init__(
        self, runner: Runner, *, max_prefill_tokens: int, max_waiting: int, metrics: Metrics
    ):
        self.runner, self.metrics = runner, metrics
        self.scheduler = Scheduler(
            runner, max_prefill_tokens=max_prefill_tokens, max_waiting=max_waiting
        )
        self.max_waiting = max_waiting
        self.draining = False
        self._commands: queue.SimpleQueue[tuple] = queue.SimpleQueue()
        self._sinks: dict[Request, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._pending = 0  # requests submitted and not yet admitted (or dropped)
        self._unadmitted: set[Request] = set()  # the engine thread's view of the same
        self._lock = threading.Lock()
        self._closed = False  # the engine thread has ended: submit refuses, nothing waits
        self.failure: str | None = None
        """Why the engine thread ended, if it broke (the server then answers 503)."""
        self._last_token: dict[tuple[Request, int], float] = {}  # per choice, for ITL
        self._answered: set[Request] = set()  # requests that have their first token
        self._thread = threading.Thread(target=self._loop, name="lightlong-engine", daemon=True)
        self._stop = threading.Event()

    # -- the handlers' side ----------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def submit(self, request: Request) -> AsyncIterator[list[Update]]:
        """Queues a request (QueueFull when the queue is full, EngineStopped while shutting
        down; both raised here, before anything runs). Returns the stream of its new
        tokens, a list per engine step, until every choice has finished; the stream raises
        ValueError (a prompt or parameters the runner refuses) or EngineStopped. Iterate it
        to the end, or stop early (the request is then aborted), or call `abort`."""
        if self.draining:
            raise EngineStopped("the server is shutting down")
        sink: asyncio.Queue = asyncio.Queue()
        with self._lock:  # no add slips in after the engine thread has answered its last
            if self._closed:
                raise EngineStopped(
                    "the engine has stopped" + (f": {self.failure}" if self.failure else "")
                )
            if self._pending >= self.max_waiting:
                raise QueueFull(
                    f"the server is at capacity: {self._pending} requests are waiting "
                    f"(--max-waiting {self.max_waiting}); retry later"
                )
            self._pending += 1
            self._commands.put(("add", request, (asyncio.get_running_loop(), sink)))
        return self._stream(request, sink)

    async def _stream(self, request: Request, sink: asyncio.Queue) -> AsyncIterator[list[Update]]:
        finished = False
        try:
            while True:
                item = await sink.get()
                if item is None:
                    finished = True
                    return
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                yield item
        finally:
            if not finished:  # the caller stopped listening: free the rows
                self.abort(request)

    def abort(self, request: Request) -> None:
        """Drops a submitted request (no-op once it finished); its rows are freed before the
        next step."""
        self._commands.put(("abort", request))

    def drain(self, grace_s: float) -> None:
        """Stops admitting; requests still running after grace_s seconds are aborted with
        EngineStopped."""
        if self.draining:
            return
        self.draining = True
        timer = threading.Timer(grace_s, lambda: self._commands.put(("abort_all",)))
        timer.daemon = True
        timer.start()

    def stop(self) -> None:
        """Ends the engine thread; whatever still runs or waits gets EngineStopped."""
        self._stop.set()
        self._commands.put(("wake",))
        if self._thread.is_alive():
            self._thread.join(timeout=30)

    @property
    def stopped(self) -> bool:
        """The engine thread has ended (stopped, or broken: see `failure`)."""
        return self._closed

    @property
    def num_waiting(self) -> int:
        return self._pending

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    # -- the engine thread -----------------------------------------------------------------

    def _loop(self) -> None:
        try:
            while not self._stop.is_set():
                self._iteration()
        except Exception as e:  # the engine itself broke (e.g. a device that fails again)
            log.exception("the engine thread failed; the server can no longer generate")
            self.failure = f"{type(e).__name__}: {e}"
        finally:
            self._close()

    def _close(self) -> None:
        """Answers every request still open or queued with EngineStopped, touching neither
        the scheduler nor the device."""
        with self._lock:
            self._closed = True
        why = "the server stopped" + (
            f" (the engine failed: {self.failure})" if self.failure else ""
        )
        for sink in self._sinks.values():
            self._send(sink, EngineStopped(f"{why} before this request finished"))
        self._sinks.clear()
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                break
            if command[0] == "add":
                self._send(command[2], EngineStopped(f"{why} before this request started"))
        with self._lock:
            self._pending = 0

    def _iteration(self) -> None:
        self._take_commands(block=not self.scheduler.has_work)
        if not self.scheduler.has_work:
            return
        prefilled = self.runner.stats.prefill_tokens
        try:
            admitted, updates = self.scheduler.step()
        except Exception as e:  # a failed step must not leave any request waiting
            log.exception("engine step failed; aborting the requests in flight")
            self._abort_all(RuntimeError(f"the engine failed: {type(e).__name__}: {e}"))
            return
        self.metrics.prefill_tokens.inc(self.runner.stats.prefill_tokens - prefilled)
        for request in admitted:
            self._admitted(request)
            # scored only (max_tokens 0): nothing to generate. A request that its first
            # token ended is done too, but ends in _send_updates, with that token.
            if request.params.max_new_tokens == 0:
                self.metrics.e2e.observe(time.monotonic() - request.arrival)
                sink = self._sinks.get(request)
                self._forget(request, "finished")
                if sink is not None:
                    self._send(sink, None)
        self._send_updates(updates)
        self._gauges()

    def _take_commands(self, block: bool) -> None:
        try:
            command = self._commands.get(timeout=0.5) if block else self._commands.get_nowait()
        except queue.Empty:
            return
        while True:
            self._run_command(command)
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                break
        self._gauges()

    def _run_command(self, command: tuple) -> None:
        kind = command[0]
        if kind == "add":
            _, request, sink = command
            try:
                self.scheduler.add(request)
            except (ValueError, QueueFull) as e:
                self._unpend()
                self._send(sink, e)
                return
            self._sinks[request] = sink
            self._unadmitted.add(request)
        elif kind == "abort":
            request = command[1]
            if request in self._sinks:
                self._drop(request, "aborted")
        elif kind == "abort_all":  # the drain's grace period is over
            self._abort_all(EngineStopped("the server shut down before this request finished"))

    def _admitted(self, request: Request) -> None:
        self._settle(request)
        m = self.metrics
        m.prompt_tokens.inc(request.prompt_tokens)
        if self.runner.prefix_cache is not None:
            m.prefix_queries.inc()
            m.prefix_bytes.set(self.runner.prefix_cache.nbytes)
            if request.reused:
                m.prefix_hits.inc()
                m.prefix_hit_tokens.inc(request.reused)

    def _send_updates(self, updates: list[Update]) -> None:
        now = time.monotonic()
        by_request: dict[Request, list[Update]] = {}
        for u in updates:
            by_request.setdefault(u.request, []).append(u)
            key = (u.request, u.choice)
            last = self._last_token.get(key)
            if last is not None:
                self.metrics.itl.observe(now - last)
            elif u.request not in self._answered:
                self._answered.add(u.request)
                self.metrics.ttft.observe(now - u.request.arrival)
            self._last_token[key] = now
        self.metrics.generation_tokens.inc(len(updates))
        for request, items in by_request.items():
            sink = self._sinks.get(request)
            if sink is not None:
                self._send(sink, items)
            if request.done:
                self.metrics.e2e.observe(now - request.arrival)
                self._forget(request, "finished")
                if sink is not None:
                    self._send(sink, None)

    def _drop(self, request: Request, status: str) -> None:
        """Aborts a request in the scheduler (freeing its rows), then forgets it. When
        freeing fails the request stays known, so the closing engine still answers it."""
        self._settle(request)
        self.scheduler.abort(request)
        self._forget(request, status)

    def _abort_all(self, error: BaseException) -> None:
        """Ends every open request with error, each told once its rows are free (so a
        client that sees the error sees the engine without it)."""
        for request in list(self._sinks):
            sink = self._sinks[request]
            try:
                self._drop(request, "error")
            except Exception:  # freeing failed (the engine is breaking): still tell it
                self._sinks.pop(request, None)
                self._send(sink, error)
                raise
            self._send(sink, error)

    def _settle(self, request: Request) -> None:
        """A request leaves the waiting count, once: at admission, or when dropped before."""
        if request in self._unadmitted:
            self._unadmitted.discard(request)
            self._unpend()

    def _forget(self, request: Request, status: str) -> None:
        self._sinks.pop(request, None)
        self._answered.discard(request)
        for i in range(request.n):
            self._last_token.pop((request, i), None)
        self.metrics.requests.labels(status=status).inc()

    def _unpend(self) -> None:
        with self._lock:
            self._pending -= 1

    def _gauges(self) -> None:
        self.metrics.running.set(len(self.scheduler.running))
        self.metrics.waiting.set(len(self.scheduler.waiting))

    @staticmethod
    def _send(sink: tuple[asyncio.AbstractEventLoop, asyncio.Queue], item: object) -> None:
        loop, q = sink
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody is listening
            loop.call_soon_threadsafe(q.put_nowait, item)
