"""The OpenAI-compatible HTTP API (FastAPI): /v1/models, /v1/completions,
/v1/chat/completions, /health, /metrics.

Handlers parse and check a request (`protocol`), turn prompts into token ids (the
tokenizer, the chat template), run it through the `AsyncEngine`, and answer with one JSON
body or a stream of server-sent events ending in `data: [DONE]`. Every failure is an
OpenAI error body; an accepted request gets its whole answer or an error, never silence.

A vision-language model's chat requests may hold `image_url` parts: each becomes the text
"<image>" where it stood (so any chat template places it), the prompt's "<image>" become
the image token, and the images are read and tiled (`images.ImageReader`) before the
request is queued; the engine expands each image token to the image's features.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from lightlong.infer import SamplingParams, StreamEvent
from lightlong.model import HybridVLM
from lightlong.model.image import ImageProcessor, ProcessedImage, encode_with_images
from lightlong.serve import protocol as api
from lightlong.serve.chat import ChatTemplate, ChatTemplateError, ReasoningParser
from lightlong.serve.engine import AsyncEngine, EngineStopped
from lightlong.serve.images import ImageReader, ImageSettings
from lightlong.serve.scheduler import QueueFull
from lightlong.serve.scheduler import Request as EngineRequest
from lightlong.tokenizer import Tokenizer

T = TypeVar("T")
_DISCONNECT_POLL_S = 0.25  # how often a non-streamed request checks that its client is there


@dataclass
class AppConfig:
    """What the app needs besides the engine."""

    model_name: str
    """The name clients pass as `model`."""
    max_model_len: int
    """Most tokens of prompt + output per choice."""
    api_key: str | None = None
    """Bearer token every /v1 request must carry; None: no authentication."""
    max_body_bytes: int = 8 << 20
    """Largest request body accepted (413 past it)."""
    reasoning_parser: Callable[[], ReasoningParser] | None = None
    """Splits chat output into reasoning_content and content (--reasoning-parser)."""
    image_reader: ImageReader | None = None
    """Reads chat requests' images for a vision-language model (None: one with its config's
    processor and default limits); a text model refuses image parts."""
    max_images: int = 8
    """Most images per chat request (a vision-language model)."""
    created: int = field(default_factory=lambda: int(time.time()))


def build_app(
    engine: AsyncEngine,
    tokenizer: Tokenizer | None,
    chat_template: ChatTemplate | None,
    config: AppConfig,
) -> FastAPI:
    """The FastAPI application serving `engine`."""
    app = FastAPI(title="lightlong", docs_url=None, redoc_url=None, openapi_url=None)
    vocab_size = engine.runner.lm.config.vocab_size  # the text model's (a VLM's too)
    max_n = engine.runner.max_num_seqs
    served = engine.runner.model
    image_token = served.config.image_token_id if isinstance(served, HybridVLM) else None
    image_reader = config.image_reader
    if image_token is not None and image_reader is None:  # the model config's processor
        image_reader = ImageReader(ImageProcessor.for_config(served.config), ImageSettings())
    limits = api.Limits(
        max_n=max_n, max_tokens=config.max_model_len, vocab_size=vocab_size,
        max_images=config.max_images if image_token is not None else 0,
    )  # fmt: skip

    @app.exception_handler(api.APIError)
    async def _api_error(_: Request, e: api.APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    async def _http_error(request: Request, e: Exception) -> JSONResponse:
        status = getattr(e, "status_code", 500)
        if status == 404:
            error = api.APIError(404, f"no route {request.url.path}", "not_found_error")
        else:
            message = f"{request.method} is not allowed on {request.url.path}"
            error = api.APIError(status, message, "invalid_request_error")
        return JSONResponse(error.body(), status_code=status)

    app.add_exception_handler(404, _http_error)
    app.add_exception_handler(405, _http_error)

    if config.api_key is not None:
        app.add_middleware(_BearerAuth, api_key=config.api_key)

    @app.get("/health")
    async def health() -> Response:
        if engine.draining or engine.stopped:
            status = "shutting down" if not engine.failure else f"failed: {engine.failure}"
            return JSONResponse({"status": status}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(engine.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models() -> Response:
        body = api.models_response([config.model_name], config.created,
                                   max_model_len=config.max_model_len)  # fmt: skip
        return JSONResponse(body)

    @app.get("/v1/models/{name:path}")
    async def model(name: str) -> Response:
        if name != config.model_name:
            raise api.APIError.not_found(f"model {name!r} does not exist", param=None)
        card = api.model_card(name, config.created, max_model_len=config.max_model_len)
        return JSONResponse(card)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        req = api.parse_completion_request(await _json_body(request, config), limits=limits)
        _check_model(req.model, config)
        prompts = [_encode(p, tokenizer, f"prompt[{i}]") for i, p in enumerate(req.prompts)]
        runs = [
            _Run(engine, p, _params(req, p, config, engine, "prompt")[0], req.n, req.seed)
            for p in prompts
        ]
        echoes = [
            _echo(req, p, ids, tokenizer) for p, ids in zip(req.prompts, prompts, strict=True)
        ]
        stream = _submit(runs)
        rid = api.new_id("cmpl")
        if req.stream:
            events = _completion_stream(rid, req, runs, stream, echoes, tokenizer, config)
            return _SSE(events, runs)
        choices = await _unless_gone(request, _collect(stream, sum(r.n for r in runs)))
        for c in choices:
            _prepend_echo(c, runs[c.index // req.n], echoes[c.index // req.n], req)
        body = api.completion_response(
            rid, config.model_name, int(time.time()), choices, _usage(runs),
            decode_token=_token_text(tokenizer),
        )  # fmt: skip
        return JSONResponse(body)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        req = api.parse_chat_request(await _json_body(request, config), limits=limits)
        _check_model(req.model, config)
        if tokenizer is None or chat_template is None:
            raise api.APIError.invalid(
                "this model has no tokenizer, so no chat template: use /v1/completions with "
                "token ids", "messages",
            )  # fmt: skip
        try:
            text = chat_template.render(
                req.messages, add_generation_prompt=req.add_generation_prompt,
                **req.chat_template_kwargs,
            )  # fmt: skip
        except ChatTemplateError as e:
            raise api.APIError.invalid(str(e), "messages") from None
        images: list[ProcessedImage] = []
        if image_token is None:
            ids = _encode(text, tokenizer, "messages")
        else:
            _check_placeholders(text, req.images)
            ids = encode_with_images(tokenizer, text, image_token)
            if not ids:
                raise api.APIError.invalid("the prompt is empty: it needs a token", "messages")
            if req.images:  # read (on worker threads) before the request is queued
                images = await image_reader.read_all(req.images)
        params, prompt_tokens = _params(req, ids, config, engine, "messages", images)
        run = _Run(engine, ids, params, req.n, req.seed, images, prompt_tokens)
        stream = _submit([run])
        rid = api.new_id("chatcmpl")
        parser = config.reasoning_parser
        if req.stream:
            return _SSE(_chat_stream(rid, req, run, stream, tokenizer, config), [run])
        choices = await _unless_gone(request, _collect(stream, req.n))
        if parser is not None:
            for c in choices:
                c.reasoning_content, c.text = parser().split(c.text)
        body = api.chat_response(
            rid, config.model_name, int(time.time()), choices, _usage([run]),
            decode_token=_token_text(tokenizer),
        )  # fmt: skip
        return JSONResponse(body)

    return app


class _BearerAuth:
    """ASGI middleware: /v1 requests without `Authorization: Bearer <api_key>` get 401. (A
    plain ASGI layer, not Starlette's BaseHTTPMiddleware, which hides client disconnects
    from the handlers.)"""

    def __init__(self, app: Callable, api_key: str):
        self.app, self.expected = app, f"Bearer {api_key}".encode()

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                error = api.APIError.unauthorized(
                    "invalid or missing API key: send the header 'Authorization: Bearer <key>'"
                )
                await JSONResponse(error.body(), status_code=401)(scope, receive, send)
                return
        await self.app(scope, receive, send)


# -- requests ------------------------------------------------------------------------------


async def _json_body(request: Request, config: AppConfig) -> object:
    """The decoded JSON body; 413 past the size limit, 400 when it is not JSON."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > config.max_body_bytes:
        raise _too_large(int(declared), config)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > config.max_body_bytes:
            raise _too_large(size, config)
        chunks.append(chunk)
    try:
        return json.loads(b"".join(chunks))
    except (ValueError, UnicodeDecodeError) as e:
        raise api.APIError.invalid(f"the request body is not valid JSON: {e}") from None


def _too_large(size: int, config: AppConfig) -> api.APIError:
    return api.APIError(
        413, f"the request body ({size} bytes) is over the limit of {config.max_body_bytes} bytes",
        "invalid_request_error", None, "request_too_large",
    )  # fmt: skip


def _check_model(name: str, config: AppConfig) -> None:
    if name != config.model_name:
        raise api.APIError.not_found(
            f"the model {name!r} does not exist; this server serves {config.model_name!r}"
        )


def _check_placeholders(text: str, images: list[api.ImagePart]) -> None:
    """400 unless the rendered prompt holds one "<image>" per image part (a text part that
    writes "<image>" itself, or a template that drops a message with an image, breaks it)."""
    found = text.count(api.IMAGE_PLACEHOLDER)
    if found != len(images):
        raise api.APIError.invalid(
            f"the prompt holds {found} {api.IMAGE_PLACEHOLDER!r} but the messages have "
            f"{len(images)} image{'' if len(images) == 1 else 's'}: each image_url part "
            f"becomes one {api.IMAGE_PLACEHOLDER!r}, so text must not write "
            f"{api.IMAGE_PLACEHOLDER!r} itself",
            "messages",
        )


def _encode(prompt: str | list[int], tokenizer: Tokenizer | None, param: str) -> list[int]:
    if isinstance(prompt, list):
        return prompt
    if tokenizer is None:
        raise api.APIError.invalid(
            "this model has no tokenizer: send the prompt as token ids", param
        )
    ids = tokenizer.encode(prompt)
    if not ids:
        raise api.APIError.invalid("the prompt is empty: it needs at least one token", param)
    return ids


def _params(
    req: api.CompletionRequest | api.ChatRequest,
    prompt: list[int],
    config: AppConfig,
    engine: AsyncEngine,
    param: str,
    images: list[ProcessedImage] | None = None,
) -> tuple[SamplingParams, int]:
    """The request's sampling parameters for one prompt (with its images, one image token
    each), checked against the context; and the prompt's length once each image token is
    expanded to the image's features."""
    images = images or []
    length = len(prompt)
    if images:  # the length the model sees: each image token becomes its image's features
        try:
            length = len(engine.runner.expand(prompt, images, param))
        except ValueError as e:
            raise api.APIError.invalid(str(e), param) from None
    room = config.max_model_len - length
    if room < 1 or (req.max_tokens is not None and req.max_tokens > room):
        asked = "" if req.max_tokens is None else f" + max_tokens ({req.max_tokens})"
        raise api.APIError.invalid(
            f"the prompt has {length} tokens{asked}: over this model's context of "
            f"{config.max_model_len} tokens (--max-model-len)",
            param if room < 1 or req.max_tokens is None else "max_tokens",
        )
    params = req.sampling_params(req.max_tokens if req.max_tokens is not None else room)
    try:
        engine.runner.check(prompt, params, name=param, images=images)
    except ValueError as e:
        raise api.APIError.invalid(str(e), param) from None
    return params, length


# -- running -------------------------------------------------------------------------------


class _Run:
    """One prompt's request in the engine, with what its answer needs."""

    def __init__(
        self, engine: AsyncEngine, prompt: list[int], params: SamplingParams, n: int,
        seed: int | None, images: list[ProcessedImage] | None = None,
        prompt_tokens: int | None = None,
    ):  # fmt: skip
        self.engine, self.n = engine, n
        self.request = EngineRequest(prompt, params, n=n, seed=seed, images=images or [])
        self.completion_tokens = 0
        self.prompt_tokens = len(prompt) if prompt_tokens is None else prompt_tokens
        """Tokens of the prompt as the model sees it (each image's features counted)."""


def _submit(runs: list[_Run]) -> AsyncIterator[tuple[int, list]]:
    """Queues every run's request in the engine (all or none: a refusal aborts the ones
    queued before it and raises the HTTP error) and returns their merged stream."""
    streams = []
    try:
        for run in runs:
            streams.append(run.engine.submit(run.request))
    except (QueueFull, EngineStopped) as e:
        for run in runs[: len(streams)]:
            run.engine.abort(run.request)
        raise _api_error(e) from None
    return _merge(runs, streams)


async def _merge(runs: list[_Run], streams: list) -> AsyncIterator[tuple[int, list]]:
    """(run index, its updates) as they come, the runs side by side in the engine."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, run: _Run, stream: AsyncIterator[list]) -> None:
        try:
            async for updates in stream:
                run.completion_tokens += len(updates)
                await queue.put((i, updates))
            await queue.put((i, None))
        except BaseException as e:  # handed to the consumer, which raises it
            await queue.put((i, e))

    tasks = [
        asyncio.create_task(pump(i, *rs)) for i, rs in enumerate(zip(runs, streams, strict=True))
    ]
    try:
        open_runs = len(runs)
        while open_runs:
            i, item = await queue.get()
            if item is None:
                open_runs -= 1
            elif isinstance(item, BaseException):
                raise _api_error(item)
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()


def _api_error(e: BaseException) -> BaseException:
    if isinstance(e, QueueFull):
        return api.APIError.rate_limited(str(e))
    if isinstance(e, EngineStopped):
        return api.APIError(503, str(e), "server_error", None, "shutting_down")
    if isinstance(e, ValueError):
        return api.APIError.invalid(str(e))
    if isinstance(e, Exception):
        return api.APIError.server_error(str(e))
    return e


async def _collect(stream: AsyncIterator[tuple[int, list]], total: int) -> list[api.Choice]:
    """Every choice's whole output (choice index = run index · n + the run's choice)."""
    choices: dict[int, api.Choice] = {}
    async for i, updates in stream:
        for u in updates:
            index = i * u.request.n + u.choice
            c = choices.setdefault(index, api.Choice(index))
            _add(c, u.event)
    return [choices.get(i, api.Choice(i)) for i in range(total)]


async def _unless_gone(request: Request, work: Awaitable[T]) -> T:
    """Awaits work (a whole non-streamed answer), cancelling it if the client disconnects
    first: its rows are then freed at once, as a streamed request's are."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=_DISCONNECT_POLL_S)
            if done:
                return task.result()
            if await request.is_disconnected():
                raise api.APIError(499, "the client closed the connection", "client_closed")
    finally:
        task.cancel()


def _add(choice: api.Choice, ev: StreamEvent) -> None:
    """Appends one generated token's text, logprobs and finish reason to a choice."""
    choice.text += ev.text
    if ev.logprob is not None:
        lp = api.TokenLogprob(ev.token_id, ev.logprob, ev.top_logprobs)
        choice.logprobs = [*(choice.logprobs or []), lp]
    if ev.finish_reason is not None:
        choice.finish_reason = ev.finish_reason


def _usage(runs: list[_Run]) -> dict:
    """OpenAI's usage: each prompt counted once, whatever its n."""
    return api.usage(
        sum(r.prompt_tokens for r in runs),
        sum(r.completion_tokens for r in runs),
        sum(r.request.reused for r in runs),
    )


def _echo(
    req: api.CompletionRequest, prompt: str | list[int], ids: list[int], tokenizer: Tokenizer | None
) -> str:
    """The text echo puts before a choice: the prompt as sent, or its ids decoded."""
    if not req.echo:
        return ""
    if isinstance(prompt, str):
        return prompt
    return tokenizer.decode(ids) if tokenizer is not None else ""


def _prepend_echo(c: api.Choice, run: _Run, echo: str, req: api.CompletionRequest) -> None:
    """Puts the echoed prompt before choice c's text (a whole output, or its first chunk),
    with the prompt's log-probabilities when they were asked for; a choice that generated
    nothing (max_tokens 0) ends there."""
    if not req.echo:
        return
    c.text = echo + c.text
    if req.logprobs is not None:
        prompt = run.request.prompt
        scored = run.request.seqs[0].prompt_logprobs
        entries = [api.TokenLogprob(prompt[0], None, ())]
        entries += [
            api.TokenLogprob(t, lp, top) for t, (lp, top) in zip(prompt[1:], scored, strict=True)
        ]
        c.logprobs = entries + list(c.logprobs or [])
    if c.finish_reason is None and run.request.params.max_new_tokens == 0:
        c.finish_reason = "length"


def _token_text(tokenizer: Tokenizer | None) -> Callable[[int], str]:
    if tokenizer is None:
        return lambda t: f"<{t}>"
    return lambda t: tokenizer.decode([t])


# -- streaming -----------------------------------------------------------------------------


class _SSE(StreamingResponse):
    """A server-sent event stream that aborts its requests however it ends: a client gone
    before the first event never starts the body's generators, whose own cleanup would
    otherwise never run (aborting a finished request does nothing)."""

    def __init__(self, events: AsyncIterator[bytes], runs: list[_Run]):
        super().__init__(
            events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )
        self.runs = runs

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            for run in self.runs:
                run.engine.abort(run.request)


async def _completion_stream(
    rid: str, req: api.CompletionRequest, runs: list[_Run], stream, echoes: list[str],
    tokenizer: Tokenizer | None, config: AppConfig,
) -> AsyncIterator[bytes]:  # fmt: skip
    created, decode = int(time.time()), _token_text(tokenizer)
    offsets: dict[int, int] = {}  # characters sent per choice

    def chunk(choices: list[api.Choice], usage: dict | None = None) -> bytes:
        body = api.completion_chunk(
            rid, config.model_name, created, choices, decode_token=decode, usage=usage
        )
        return api.sse(body)

    try:
        async for i, updates in stream:
            choices = []
            for u in updates:
                index = i * req.n + u.choice
                c = api.Choice(index, text_offset=offsets.get(index, 0))
                _add(c, u.event)
                if index not in offsets:
                    _prepend_echo(c, runs[i], echoes[i], req)
                offsets[index] = c.text_offset + len(c.text)
                choices.append(c)
            yield chunk(choices)
        # choices that generated nothing (max_tokens 0) still send their echo
        silent = [i for i in range(len(runs) * req.n) if i not in offsets]
        for index in silent:
            c = api.Choice(index)
            _prepend_echo(c, runs[index // req.n], echoes[index // req.n], req)
            yield chunk([c])
        if req.include_usage:
            yield chunk([], _usage(runs))
    except api.APIError as e:
        yield api.sse(e.body())
    yield api.DONE


async def _chat_stream(
    rid: str, req: api.ChatRequest, run: _Run, stream, tokenizer: Tokenizer | None,
    config: AppConfig,
) -> AsyncIterator[bytes]:  # fmt: skip
    created, decode = int(time.time()), _token_text(tokenizer)
    parsers: dict[int, ReasoningParser] = {}
    started: set[int] = set()

    def chunk(choices: list[api.Choice], role: bool) -> bytes:
        body = api.chat_chunk(rid, config.model_name, created, choices, decode_token=decode,
                              role=role)  # fmt: skip
        return api.sse(body)

    try:
        async for _, updates in stream:
            for u in updates:
                c = api.Choice(u.choice)
                _add(c, u.event)
                if config.reasoning_parser is not None:
                    p = parsers.setdefault(u.choice, config.reasoning_parser())
                    reasoning, c.text = p.push(c.text)
                    if c.finish_reason is not None:
                        more_reasoning, more_text = p.finish()
                        reasoning, c.text = reasoning + more_reasoning, c.text + more_text
                    c.reasoning_content = reasoning or None
                first = u.choice not in started
                if first or c.text or c.reasoning_content or c.finish_reason or c.logprobs:
                    yield chunk([c], role=first)  # nothing to say yet: no empty delta
                started.add(u.choice)
        if req.include_usage:
            usage = api.chat_chunk(rid, config.model_name, created, [], decode_token=decode,
                                   usage=_usage([run]))  # fmt: skip
            yield api.sse(usage)
    except api.APIError as e:
        yield api.sse(e.body())
    yield api.DONE
