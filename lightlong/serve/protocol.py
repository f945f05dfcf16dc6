"""The OpenAI wire format of `lightlong serve`: request parsing and validation, error bodies,
response and stream-chunk builders, and server-sent-event framing.

Parsing turns a decoded JSON body into a `CompletionRequest` or `ChatRequest`, or raises an
`APIError` (400) whose `param` names the offending field (`temperature`, `stop[1]`,
`messages[0].content`) and whose message says what was expected and what was given. An
absent or null optional field takes its default (OpenAI's); fields this server does not know
are ignored, while known features it cannot honour (`suffix`, `tools`, ...) are rejected.

Builders are pure functions from what the app holds per choice (`Choice`: text or text
delta, logprob entries, finish reason) to the dicts OpenAI's clients parse.
"""

from __future__ import annotations

import json
import math
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from lightlong.infer.sampling import MAX_LOGPROBS, SamplingParams
from lightlong.model.image import IMAGE_PLACEHOLDER  # an image part's text in a message

DONE = b"data: [DONE]\n\n"
"""The event that ends every stream."""

COMPLETION_LOGPROBS = 5
"""Most alternatives per token `logprobs` may ask for on /v1/completions (OpenAI's limit)."""

MIN_LOGPROB = -9999.0
"""Log-probabilities are clamped to this (vLLM's choice): JSON has no -inf (or NaN)."""

CHAT_ROLES = ("system", "user", "assistant", "tool", "developer")
"""Roles a chat message may have; "developer" (OpenAI's newer name) is passed on as "system",
the role chat templates know."""

IMAGE_DETAILS = ("auto", "low", "high")
"""Values of an image part's `detail` (accepted; every image is tiled alike)."""

_SEED_RANGE = (-(2**63), 2**63)
_RESERVED_TEMPLATE_KWARGS = ("messages", "add_generation_prompt")


class APIError(Exception):
    """An error answered as OpenAI does: HTTP `status` and `{"error": {...}}`."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str,
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        """"invalid_request_error", "authentication_error", "not_found_error", ..."""
        self.param = param
        """The request field at fault, e.g. "messages[0].content"; None if no one field is."""
        self.code = code

    @classmethod
    def invalid(cls, message: str, param: str | None = None) -> APIError:
        """400: the request is malformed or asks for something unsupported."""
        return cls(400, message, "invalid_request_error", param)

    @classmethod
    def unauthorized(cls, message: str = "invalid or missing API key") -> APIError:
        """401: a missing or wrong `Authorization: Bearer` key."""
        return cls(401, message, "authentication_error", None, "invalid_api_key")

    @classmethod
    def not_found(cls, message: str, param: str | None = "model") -> APIError:
        """404: e.g. a model this server does not serve."""
        return cls(404, message, "not_found_error", param, "model_not_found")

    @classmethod
    def rate_limited(cls, message: str) -> APIError:
        """429: too many requests queued or running."""
        return cls(429, message, "rate_limit_exceeded", None, "rate_limit_exceeded")

    @classmethod
    def server_error(cls, message: str) -> APIError:
        """500: the server failed; the request may be fine."""
        return cls(500, message, "server_error")

    def body(self) -> dict[str, Any]:
        """The JSON body: `{"error": {"message", "type", "param", "code"}}`."""
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


class ImagePart(NamedTuple):
    """One `image_url` content part of a chat request."""

    url: str
    """A `data:image/...;base64,...` URL, or an http(s) URL."""
    detail: str
    """"auto", "low" or "high" (OpenAI's; every image is tiled alike here)."""
    param: str
    """Where it is in the request, e.g. "messages[0].content[1].image_url"."""


@dataclass(frozen=True)
class Limits:
    """What the server allows per request."""

    max_n: int
    """Most choices per request (prompts × n)."""
    max_tokens: int
    """Most tokens to generate per choice; a larger max_tokens is rejected."""
    vocab_size: int
    """Token ids (prompts, stop_token_ids) must be in [0, vocab_size)."""
    max_stop: int = 8
    """Most stop strings."""
    max_images: int = 0
    """Most images per chat request; 0: the model takes none (image parts are refused)."""


# -- field readers ----------------------------------------------------------------------------


def _show(value: Any) -> str:
    """A value as the client wrote it (JSON, strings quoted), cut to a readable length."""
    text = repr(value) if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 60 else text[:57] + "..."


def _bad(param: str, expected: str, value: Any) -> APIError:
    return APIError.invalid(f"{param} must be {expected}, got {_show(value)}", param)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _as_number(v: Any) -> float | None:
    """`v` as a finite float; None for non-numbers (booleans included), inf, NaN, 1e400."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    try:
        x = float(v)
    except OverflowError:
        return None
    return x if math.isfinite(x) else None


def _bool(body: dict[str, Any], name: str, default: bool, param: str | None = None) -> bool:
    """A boolean; absent or null gives `default`. `param` names it in errors (default name)."""
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise _bad(param or name, "a boolean", v)
    return v


def _int(
    body: dict[str, Any], name: str, lo: int, hi: int | None, default: int | None
) -> int | None:
    """An int in [lo, hi] (hi None: no bound); absent or null gives `default`."""
    v = body.get(name)
    if v is None:
        return default
    if not _is_int(v) or v < lo or (hi is not None and v > hi):
        expected = f"an integer >= {lo}" if hi is None else f"an integer in [{lo}, {hi}]"
        raise _bad(name, expected, v)
    return v


def _number(
    body: dict[str, Any],
    name: str,
    default: float,
    ok: Callable[[float], bool],
    expected: str,
) -> float:
    v = body.get(name)
    if v is None:
        return default
    x = _as_number(v)
    if x is None or not ok(x):
        raise _bad(name, f"a number {expected}", v)
    return x


def _token_ids(v: Any, param: str, vocab_size: int, *, allow_empty: bool) -> list[int]:
    expected = f"a {'' if allow_empty else 'non-empty '}list of token ids in [0, {vocab_size})"
    if not isinstance(v, list) or (not v and not allow_empty):
        raise _bad(param, expected, v)
    for i, t in enumerate(v):
        if not _is_int(t) or not 0 <= t < vocab_size:
            raise _bad(f"{param}[{i}]", f"a token id in [0, {vocab_size})", t)
    return v


def _model(body: dict[str, Any]) -> str:
    v = body.get("model")
    if not isinstance(v, str) or not v:
        raise _bad("model", "a non-empty string (the served model's name)", v)
    return v


def _stop(body: dict[str, Any], max_stop: int) -> list[str]:
    v = body.get("stop")
    if v is None:
        return []
    expected = f"a non-empty string or a list of at most {max_stop} non-empty strings"
    if isinstance(v, str) and v:
        return [v]
    if not isinstance(v, list) or len(v) > max_stop:
        raise _bad("stop", expected, v)
    for i, s in enumerate(v):
        if not isinstance(s, str) or not s:
            raise _bad(f"stop[{i}]", "a non-empty string", s)
    return v


def _reject_unsupported(body: dict[str, Any], names: Sequence[str]) -> None:
    """Features this server cannot honour are refused rather than silently ignored; null,
    [], {} and a "text" response_format ask for nothing and pass."""
    for name in names:
        v = body.get(name)
        if v not in (None, [], {}, {"type": "text"}):
            raise APIError.invalid(f"{name} is not supported by this server, got {_show(v)}", name)


# -- requests ---------------------------------------------------------------------------------


@dataclass(kw_only=True)
class _Request:
    """Fields shared by completions and chat completions (OpenAI's names)."""

    model: str
    n: int
    """Choices per prompt."""
    stream: bool
    include_usage: bool
    """stream_options.include_usage: send a last chunk with the usage."""
    max_tokens: int | None
    """Tokens to generate at most per choice; None: up to the context limit."""
    temperature: float
    top_p: float
    top_k: int
    """0 is off (the request's -1 is mapped to 0)."""
    seed: int | None
    stop: list[str]
    stop_token_ids: list[int]
    presence_penalty: float
    frequency_penalty: float
    repetition_penalty: float
    ignore_eos: bool

    def _sampling_params(self, max_new_tokens: int, logprobs: int | None) -> SamplingParams:
        return SamplingParams(
            max_new_tokens=max_new_tokens,
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            repetition_penalty=self.repetition_penalty,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            logprobs=logprobs,
            seed=self.seed,
            stop_token_ids=list(self.stop_token_ids),
            stop=list(self.stop),
            ignore_eos=self.ignore_eos,
        )


@dataclass(kw_only=True)
class CompletionRequest(_Request):
    """A parsed POST /v1/completions body."""

    prompts: list[str | list[int]]
    """One entry per prompt: text or token ids; each runs with `n` choices."""
    echo: bool
    """Put the prompt before each choice's text."""
    logprobs: int | None
    """Alternatives per token to return (0 ... 5); None returns no logprobs."""

    def sampling_params(self, max_new_tokens: int) -> SamplingParams:
        """The engine's parameters, generating at most `max_new_tokens` per choice; with
        echo and logprobs (or max_tokens 0) the prompt is scored too."""
        params = self._sampling_params(max_new_tokens, self.logprobs)
        if self.echo and (self.logprobs is not None or max_new_tokens == 0):
            params.prompt_logprobs = self.logprobs or 0
        return params


@dataclass(kw_only=True)
class ChatRequest(_Request):
    """A parsed POST /v1/chat/completions body."""

    messages: list[dict[str, str]]
    """`{"role", "content"}` with content as one string: text parts joined, each image part
    written as `IMAGE_PLACEHOLDER` where it stood."""
    images: list[ImagePart] = field(default_factory=list)
    """The image parts of every message, in the order their placeholders appear."""
    add_generation_prompt: bool
    chat_template_kwargs: dict[str, Any]
    """Extra variables for the chat template."""
    logprobs: bool
    top_logprobs: int | None
    """Alternatives per token (0 ... 20) when `logprobs`; None means 0."""

    def sampling_params(self, max_new_tokens: int) -> SamplingParams:
        """The engine's parameters, generating at most `max_new_tokens` per choice."""
        return self._sampling_params(
            max_new_tokens, (self.top_logprobs or 0) if self.logprobs else None
        )


def _object(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        kind = "an array" if isinstance(body, list) else _show(body)
        raise APIError.invalid(f"the request body must be a JSON object, got {kind}")
    return body


def _common(body: dict[str, Any], limits: Limits, max_tokens: int | None) -> dict[str, Any]:
    """The `_Request` fields; `max_tokens` is already read (its name differs by endpoint)."""
    stream = _bool(body, "stream", False)
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not stream:
            raise APIError.invalid(
                "stream_options is only allowed when stream is true", "stream_options"
            )
        if not isinstance(options, dict):
            raise _bad("stream_options", "an object or null", options)
        include_usage = _bool(options, "include_usage", False, "stream_options.include_usage")
    top_k = _int(body, "top_k", -1, None, 0)
    stop_ids = body.get("stop_token_ids")
    return dict(
        model=_model(body),
        n=_int(body, "n", 1, limits.max_n, 1),
        stream=stream,
        include_usage=include_usage,
        max_tokens=max_tokens,
        temperature=_number(body, "temperature", 1.0, lambda x: 0 <= x <= 2, "in [0, 2]"),
        top_p=_number(body, "top_p", 1.0, lambda x: 0 < x <= 1, "in (0, 1]"),
        top_k=max(top_k, 0),
        seed=_int(body, "seed", _SEED_RANGE[0], _SEED_RANGE[1] - 1, None),
        stop=_stop(body, limits.max_stop),
        stop_token_ids=(
            []
            if stop_ids is None
            else _token_ids(stop_ids, "stop_token_ids", limits.vocab_size, allow_empty=True)
        ),
        presence_penalty=_number(
            body, "presence_penalty", 0.0, lambda x: -2 <= x <= 2, "in [-2, 2]"
        ),
        frequency_penalty=_number(
            body, "frequency_penalty", 0.0, lambda x: -2 <= x <= 2, "in [-2, 2]"
        ),
        repetition_penalty=_number(body, "repetition_penalty", 1.0, lambda x: x > 0, "> 0"),
        ignore_eos=_bool(body, "ignore_eos", False),
    )


def _prompts(v: Any, vocab_size: int) -> list[str | list[int]]:
    """The prompts; the first element of a list says which kind of list it is."""
    if isinstance(v, str) and v:
        return [v]
    if not isinstance(v, list) or not v or not isinstance(v[0], (str, int, list)):
        expected = (
            "a non-empty string, a non-empty list of strings, a non-empty list of token ids "
            "or a list of token-id lists"
        )
        raise _bad("prompt", expected, v)
    if _is_int(v[0]):
        return [_token_ids(v, "prompt", vocab_size, allow_empty=False)]
    prompts: list[str | list[int]] = []
    for i, p in enumerate(v):
        if isinstance(v[0], str):
            if not isinstance(p, str) or not p:
                raise _bad(f"prompt[{i}]", "a non-empty string (as prompt[0] is)", p)
            prompts.append(p)
        else:
            prompts.append(_token_ids(p, f"prompt[{i}]", vocab_size, allow_empty=False))
    return prompts


def parse_completion_request(body: Any, *, limits: Limits) -> CompletionRequest:
    """Validates a /v1/completions body; raises `APIError` (400) naming the bad field."""
    body = _object(body)
    _reject_unsupported(body, ("suffix", "logit_bias"))
    prompts = _prompts(body.get("prompt"), limits.vocab_size)
    request = CompletionRequest(
        **_common(body, limits, _int(body, "max_tokens", 0, limits.max_tokens, None)),
        prompts=prompts,
        echo=_bool(body, "echo", False),
        logprobs=_int(body, "logprobs", 0, COMPLETION_LOGPROBS, None),
    )
    if request.max_tokens == 0 and not request.echo:
        raise APIError.invalid(
            "max_tokens must be >= 1 (0 only with echo, to score the prompt), got 0", "max_tokens"
        )
    best_of = body.get("best_of")
    if best_of is not None and (not _is_int(best_of) or best_of != request.n):
        raise APIError.invalid(
            f"best_of is not supported by this server (only best_of == n), got {_show(best_of)}",
            "best_of",
        )
    if len(prompts) * request.n > limits.max_n:
        raise APIError.invalid(
            f"{len(prompts)} prompts with n={request.n} make {len(prompts) * request.n} "
            f"choices, more than the {limits.max_n} allowed per request",
            "n",
        )
    return request


def _image_part(part: dict[str, Any], param: str) -> ImagePart:
    """An `{"type": "image_url", "image_url": {"url": ..., "detail": ...}}` part, its fields
    checked (the URL itself is read later, by `lightlong.serve.images`)."""
    image_url = part.get("image_url")
    where = f"{param}.image_url"
    if not isinstance(image_url, dict) or not isinstance(image_url.get("url"), str):
        raise _bad(where, 'an object {"url": "data:image/...;base64,..." or "https://..."}',
                   image_url)  # fmt: skip
    if not image_url["url"]:
        raise _bad(where, "an object with a non-empty url", image_url)
    detail = image_url.get("detail")
    if detail is not None and detail not in IMAGE_DETAILS:
        raise _bad(f"{where}.detail", f"one of {', '.join(IMAGE_DETAILS)}", detail)
    return ImagePart(image_url["url"], detail or "auto", where)


def _content(v: Any, param: str, role: str, images: list[ImagePart], max_images: int) -> str:
    """A message's content: a string, or its parts' texts joined, each image part written as
    `IMAGE_PLACEHOLDER` (its image appended to `images`)."""
    if isinstance(v, str):
        return v
    if v is None and role == "assistant":  # OpenAI allows it (a turn with only tool calls)
        return ""
    if max_images:
        expected = 'a string or a list of {"type": "text"} and {"type": "image_url"} parts'
    else:
        expected = 'a string or a list of {"type": "text", "text": ...} parts'
    if not isinstance(v, list):
        raise _bad(param, expected, v)
    texts = []
    for j, part in enumerate(v):
        kind = part.get("type") if isinstance(part, dict) else part
        if kind == "image_url" and not max_images:
            raise APIError.invalid(
                f"{param}[{j}] is an image, but this model takes no images (it is not a "
                "vision-language model): send text parts only",
                param,
            )
        if kind == "image_url" and role != "user":  # as OpenAI: images come from the user
            raise APIError.invalid(
                f"{param}[{j}] is an image in a {role!r} message; images go in user messages",
                f"{param}[{j}]",
            )
        if kind == "image_url":
            images.append(_image_part(part, f"{param}[{j}]"))
            texts.append(IMAGE_PLACEHOLDER)
            continue
        if kind != "text":
            supported = "text and image_url parts are" if max_images else "only text parts are"
            raise APIError.invalid(
                f"{param} must be {expected}; {supported} supported, got {_show(kind)}", param
            )
        if not isinstance(part.get("text"), str):
            raise _bad(param, "text parts with a string text", part)
        texts.append(part["text"])
    return "".join(texts)


def _messages(v: Any, max_images: int = 0) -> tuple[list[dict[str, str]], list[ImagePart]]:
    """The messages, and their image parts in order (at most `max_images`)."""
    if not isinstance(v, list) or not v:
        raise _bad("messages", "a non-empty list of message objects", v)
    messages: list[dict[str, str]] = []
    images: list[ImagePart] = []
    for i, m in enumerate(v):
        if not isinstance(m, dict):
            raise _bad(f"messages[{i}]", "an object with role and content", m)
        role = m.get("role")
        if role not in CHAT_ROLES:
            raise _bad(f"messages[{i}].role", f"one of {', '.join(CHAT_ROLES)}", role)
        content = _content(m.get("content"), f"messages[{i}].content", role, images, max_images)
        messages.append({"role": "system" if role == "developer" else role, "content": content})
    if len(images) > max_images:
        raise APIError.invalid(
            f"the messages hold {len(images)} images, more than the {max_images} allowed per "
            "request (--max-images-per-request)",
            images[max_images].param,
        )
    return messages, images


def parse_chat_request(body: Any, *, limits: Limits) -> ChatRequest:
    """Validates a /v1/chat/completions body; raises `APIError` (400) naming the bad field.

    `max_completion_tokens` wins over the older `max_tokens` when both are given.
    """
    body = _object(body)
    _reject_unsupported(body, ("tools", "functions", "logit_bias", "response_format"))
    messages, images = _messages(body.get("messages"), limits.max_images)
    max_tokens = _int(body, "max_tokens", 1, limits.max_tokens, None)
    max_completion = _int(body, "max_completion_tokens", 1, limits.max_tokens, None)
    kwargs = body.get("chat_template_kwargs")
    if kwargs is None:
        kwargs = {}
    elif not isinstance(kwargs, dict):
        raise _bad("chat_template_kwargs", "an object", kwargs)
    reserved = [k for k in _RESERVED_TEMPLATE_KWARGS if k in kwargs]
    if reserved:
        raise APIError.invalid(
            f"chat_template_kwargs must not set {reserved[0]!r} (a request field of its own)",
            "chat_template_kwargs",
        )
    logprobs = _bool(body, "logprobs", False)
    top_logprobs = _int(body, "top_logprobs", 0, MAX_LOGPROBS, None)
    if top_logprobs is not None and not logprobs:
        raise APIError.invalid(
            f"top_logprobs needs logprobs to be true, got top_logprobs={top_logprobs} "
            f"with logprobs={_show(body.get('logprobs'))}",
            "top_logprobs",
        )
    return ChatRequest(
        **_common(body, limits, max_completion if max_completion is not None else max_tokens),
        messages=messages,
        images=images,
        add_generation_prompt=_bool(body, "add_generation_prompt", True),
        chat_template_kwargs=kwargs,
        logprobs=logprobs,
        top_logprobs=top_logprobs,
    )


# -- responses --------------------------------------------------------------------------------


class TokenLogprob(NamedTuple):
    """One token's log-probability and the most likely alternatives at its step (None and
    none for an echoed prompt's first token, which nothing predicts)."""

    token_id: int
    logprob: float | None
    top: Sequence[tuple[int, float]]
    """(token_id, logprob) of the most likely tokens, most likely first."""


@dataclass
class Choice:
    """What the app holds for one choice: the whole output, or the delta of one chunk."""

    index: int
    text: str = ""
    """The text (a response) or the text added since the last chunk."""
    finish_reason: str | None = None
    """'stop' or 'length' when the choice ended; None while it runs."""
    logprobs: Sequence[TokenLogprob] | None = None
    """One entry per token of `text`; None when the request asked for none."""
    reasoning_content: str | None = None
    """Chat only: reasoning split off by a reasoning parser (or its delta)."""
    text_offset: int = 0
    """Completions only: characters of this choice's text before `text` (for text_offset)."""


def new_id(prefix: str) -> str:
    """A request id: "cmpl-<hex>" for completions, "chatcmpl-<hex>" for chat."""
    return f"{prefix}-{secrets.token_hex(12)}"


def _lp(x: float) -> float:
    return x if x >= MIN_LOGPROB else MIN_LOGPROB  # also maps NaN


def _completion_logprobs(
    choice: Choice, decode_token: Callable[[int], str]
) -> dict[str, Any] | None:
    if choice.logprobs is None:
        return None
    tokens, offsets, offset = [], [], choice.text_offset
    for entry in choice.logprobs:
        tokens.append(decode_token(entry.token_id))
        offsets.append(offset)
        offset += len(tokens[-1])
    top: list[dict[str, float] | None] = []
    for entry in choice.logprobs:
        alternatives: dict[str, float] = {}
        for token_id, lp in entry.top:  # ids decoding alike keep the most likely
            alternatives.setdefault(decode_token(token_id), _lp(lp))
        if entry.logprob is not None:  # OpenAI's: the k most likely and the chosen token
            alternatives.setdefault(decode_token(entry.token_id), _lp(entry.logprob))
        top.append(None if entry.logprob is None else alternatives)
    return {
        "tokens": tokens,
        "token_logprobs": [None if e.logprob is None else _lp(e.logprob) for e in choice.logprobs],
        "top_logprobs": top,
        "text_offset": offsets,
    }


def _chat_token(
    token_id: int, logprob: float, decode_token: Callable[[int], str]
) -> dict[str, Any]:
    token = decode_token(token_id)
    return {"token": token, "logprob": _lp(logprob), "bytes": list(token.encode("utf-8"))}


def _chat_logprobs(choice: Choice, decode_token: Callable[[int], str]) -> dict[str, Any] | None:
    if choice.logprobs is None:
        return None
    content = []
    for entry in choice.logprobs:
        item = _chat_token(entry.token_id, entry.logprob, decode_token)
        item["top_logprobs"] = [_chat_token(t, lp, decode_token) for t, lp in entry.top]
        content.append(item)
    return {"content": content}


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict[str, Any]:
    """The `usage` object; `cached_tokens` are prompt tokens restored from the prefix cache."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def completion_response(
    request_id: str,
    model: str,
    created: int,
    choices: Sequence[Choice],
    usage: dict[str, Any] | None,
    *,
    decode_token: Callable[[int], str],
) -> dict[str, Any]:
    """A /v1/completions response ("text_completion"); `decode_token` gives the token strings
    of logprobs."""
    return {
        "id": request_id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": c.index,
                "text": c.text,
                "logprobs": _completion_logprobs(c, decode_token),
                "finish_reason": c.finish_reason,
            }
            for c in choices
        ],
        "usage": usage,
    }


def completion_chunk(
    request_id: str,
    model: str,
    created: int,
    choices: Sequence[Choice],
    *,
    decode_token: Callable[[int], str],
    usage: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One streamed /v1/completions event: each choice's text delta, in the response's shape
    (OpenAI streams "text_completion" objects too). The usage chunk of
    stream_options.include_usage has no choices and a usage; other chunks have usage null."""
    return completion_response(
        request_id, model, created, choices, usage, decode_token=decode_token
    )


def _message(choice: Choice) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": choice.text}
    if choice.reasoning_content is not None:
        message["reasoning_content"] = choice.reasoning_content
    return message


def chat_response(
    request_id: str,
    model: str,
    created: int,
    choices: Sequence[Choice],
    usage: dict[str, Any],
    *,
    decode_token: Callable[[int], str],
) -> dict[str, Any]:
    """A /v1/chat/completions response ("chat.completion"): one assistant message per
    choice, with `reasoning_content` when the choice has it."""
    return _chat_body(
        request_id, model, created, choices, usage, decode_token, "chat.completion",
        "message", _message,
    )  # fmt: skip


def _chat_body(
    request_id: str, model: str, created: int, choices: Sequence[Choice],
    usage: dict[str, Any] | None, decode_token: Callable[[int], str], kind: str, key: str,
    content: Callable[[Choice], dict[str, Any]],
) -> dict[str, Any]:  # fmt: skip
    """A chat response or chunk: each choice's `key` ("message" or "delta") is content(c)."""
    return {
        "id": request_id,
        "object": kind,
        "created": created,
        "model": model,
        "choices": [
            {
                "index": c.index,
                key: content(c),
                "logprobs": _chat_logprobs(c, decode_token),
                "finish_reason": c.finish_reason,
            }
            for c in choices
        ],
        "usage": usage,
    }


def _delta(choice: Choice, role: bool) -> dict[str, Any]:
    delta: dict[str, Any] = {"role": "assistant"} if role else {}
    if choice.reasoning_content:
        delta["reasoning_content"] = choice.reasoning_content
    if choice.text or role:
        delta["content"] = choice.text
    return delta


def chat_chunk(
    request_id: str,
    model: str,
    created: int,
    choices: Sequence[Choice],
    *,
    decode_token: Callable[[int], str],
    role: bool = False,
    usage: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One streamed /v1/chat/completions event ("chat.completion.chunk").

    Each choice becomes a `delta` holding what is new: `role` (pass role=True for each
    choice's first chunk), `reasoning_content` and `content` when non-empty; a last chunk
    with only a finish_reason has an empty delta. The usage chunk of
    stream_options.include_usage has no choices and a usage; other chunks have usage null.
    """
    return _chat_body(
        request_id, model, created, choices, usage, decode_token, "chat.completion.chunk",
        "delta", lambda c: _delta(c, role),
    )  # fmt: skip


def model_card(
    name: str, created: int, owned_by: str = "lightlong", max_model_len: int | None = None
) -> dict[str, Any]:
    """One model ("model"), as GET /v1/models/{name} answers."""
    card: dict[str, Any] = {"id": name, "object": "model", "created": created, "owned_by": owned_by}
    if max_model_len is not None:
        card["max_model_len"] = max_model_len
    return card


def models_response(
    names: Sequence[str],
    created: int,
    owned_by: str = "lightlong",
    max_model_len: int | None = None,
) -> dict[str, Any]:
    """GET /v1/models: the served model names ("list" of "model")."""
    return {
        "object": "list",
        "data": [model_card(n, created, owned_by, max_model_len) for n in names],
    }


def sse(data: dict[str, Any] | str) -> bytes:
    """One server-sent event: `data: <json>\\n\\n` (a string is sent as is, one `data:` line
    per line of it)."""
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return ("".join(f"data: {line}\n" for line in text.split("\n")) + "\n").encode("utf-8")
