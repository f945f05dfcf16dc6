"""OpenAI protocol of `lightlong serve`: request validation (every rule, the field named in
the error), the mapping onto SamplingParams, response shapes, SSE framing."""

from __future__ import annotations

import json

import pytest

from lightlong.infer import SamplingParams
from lightlong.serve.protocol import (
    DONE,
    MIN_LOGPROB,
    APIError,
    ChatRequest,
    Choice,
    CompletionRequest,
    Limits,
    TokenLogprob,
    chat_chunk,
    chat_response,
    completion_chunk,
    completion_response,
    model_card,
    models_response,
    new_id,
    parse_chat_request,
    parse_completion_request,
    sse,
    usage,
)

LIMITS = Limits(max_n=4, max_tokens=100, vocab_size=300, max_stop=2)
MSGS = [{"role": "user", "content": "hi"}]


def completion(**fields) -> dict:
    return {"model": "m", "prompt": "hello", **fields}


def chat(**fields) -> dict:
    return {"model": "m", "messages": MSGS, **fields}


def error_of(parse, body) -> APIError:
    with pytest.raises(APIError) as info:
        parse(body, limits=LIMITS)
    err = info.value
    assert err.status == 400 and err.type == "invalid_request_error"
    return err


# Rules shared by both endpoints: (field, bad value, param named in the error).
COMMON_BAD = [
    ("model", None, "model"),
    ("model", "", "model"),
    ("model", 3, "model"),
    ("max_tokens", 0, "max_tokens"),
    ("max_tokens", 101, "max_tokens"),
    ("max_tokens", True, "max_tokens"),
    ("max_tokens", 5.0, "max_tokens"),
    ("max_tokens", "5", "max_tokens"),
    ("temperature", "hot", "temperature"),
    ("temperature", -0.1, "temperature"),
    ("temperature", 2.5, "temperature"),
    ("temperature", True, "temperature"),
    ("temperature", float("nan"), "temperature"),
    ("top_p", 0, "top_p"),
    ("top_p", 1.01, "top_p"),
    ("top_p", [1], "top_p"),
    ("top_k", -2, "top_k"),
    ("top_k", 1.5, "top_k"),
    ("top_k", False, "top_k"),
    ("seed", "7", "seed"),
    ("seed", 2**63, "seed"),
    ("seed", 1.0, "seed"),
    ("stop", "", "stop"),
    ("stop", 3, "stop"),
    ("stop", ["a", "b", "c"], "stop"),
    ("stop", ["a", ""], "stop[1]"),
    ("stop", [None], "stop[0]"),
    ("n", 0, "n"),
    ("n", 5, "n"),
    ("n", True, "n"),
    ("stream", "yes", "stream"),
    ("stream", 1, "stream"),
    ("presence_penalty", 2.1, "presence_penalty"),
    ("presence_penalty", "0", "presence_penalty"),
    ("frequency_penalty", -3, "frequency_penalty"),
    ("frequency_penalty", 10**400, "frequency_penalty"),
    ("repetition_penalty", 0, "repetition_penalty"),
    ("repetition_penalty", float("inf"), "repetition_penalty"),
    ("ignore_eos", "false", "ignore_eos"),
    ("stop_token_ids", 3, "stop_token_ids"),
    ("stop_token_ids", [1, 300], "stop_token_ids[1]"),
    ("stop_token_ids", [-1], "stop_token_ids[0]"),
    ("stop_token_ids", [True], "stop_token_ids[0]"),
    ("logit_bias", {"1": 5}, "logit_bias"),
]


def _id(case) -> str:
    field, value, _ = case
    return f"{field}={value!r}"[:40]


@pytest.mark.parametrize("case", COMMON_BAD, ids=_id)
@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_common_field_rejected(endpoint, case):
    field, value, param = case
    make, parse = (
        (completion, parse_completion_request)
        if endpoint == "completions"
        else (chat, parse_chat_request)
    )
    err = error_of(parse, make(**{field: value}))
    assert err.param == param
    # the message says what was given (JSON spelling, strings quoted); for stop[1], value[1]
    if param.endswith("]"):
        value = value[int(param[param.rindex("[") + 1 : -1])]
    given = repr(value) if isinstance(value, str) else json.dumps(value)[:57]
    assert given in err.message, err.message
    assert err.body() == {
        "error": {
            "message": err.message,
            "type": "invalid_request_error",
            "param": param,
            "code": None,
        }
    }


@pytest.mark.parametrize(
    "field, value, param",
    [
        ("prompt", None, "prompt"),
        ("prompt", "", "prompt"),
        ("prompt", [], "prompt"),
        ("prompt", 5, "prompt"),
        ("prompt", [{"text": "a"}], "prompt"),
        ("prompt", ["a", ""], "prompt[1]"),
        ("prompt", ["a", 3], "prompt[1]"),
        ("prompt", [1, 300], "prompt[1]"),
        ("prompt", [1, -1], "prompt[1]"),
        ("prompt", [1, "a"], "prompt[1]"),
        ("prompt", [[1], []], "prompt[1]"),
        ("prompt", [[1], [2, 999]], "prompt[1][1]"),
        ("prompt", [[1], "a"], "prompt[1]"),
        ("echo", "no", "echo"),
        ("suffix", "tail", "suffix"),
        ("logprobs", 6, "logprobs"),
        ("logprobs", -1, "logprobs"),
        ("logprobs", True, "logprobs"),
        ("best_of", 3, "best_of"),
    ],
    ids=lambda v: repr(v)[:30],
)
def test_completion_field_rejected(field, value, param):
    assert error_of(parse_completion_request, completion(**{field: value})).param == param


@pytest.mark.parametrize(
    "body, param",
    [
        ({"messages": None}, "messages"),
        ({"messages": []}, "messages"),
        ({"messages": {"role": "user", "content": "x"}}, "messages"),
        ({"messages": ["hi"]}, "messages[0]"),
        ({"messages": [*MSGS, {"role": "robot", "content": "x"}]}, "messages[1].role"),
        ({"messages": [{"content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "user"}]}, "messages[0].content"),
        ({"messages": [{"role": "user", "content": 3}]}, "messages[0].content"),
        ({"messages": [{"role": "user", "content": None}]}, "messages[0].content"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
            "messages[0].content",
        ),
        ({"messages": [{"role": "user", "content": [{"type": "text"}]}]}, "messages[0].content"),
        ({"messages": [{"role": "user", "content": ["hi"]}]}, "messages[0].content"),
        ({"max_completion_tokens": 101}, "max_completion_tokens"),
        ({"max_completion_tokens": 0}, "max_completion_tokens"),
        ({"add_generation_prompt": "true"}, "add_generation_prompt"),
        ({"chat_template_kwargs": "x"}, "chat_template_kwargs"),
        ({"chat_template_kwargs": {"messages": []}}, "chat_template_kwargs"),
        ({"logprobs": 1}, "logprobs"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"logprobs": True, "top_logprobs": -1}, "top_logprobs"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"logprobs": False, "top_logprobs": 2}, "top_logprobs"),
        ({"tools": [{"type": "function"}]}, "tools"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
    ],
    ids=lambda v: json.dumps(v)[:40] if isinstance(v, dict) else v,
)
def test_chat_field_rejected(body, param):
    assert error_of(parse_chat_request, chat(**body)).param == param


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"stream": False, "stream_options": {}}, "stream_options"),
        ({"stream": True, "stream_options": "usage"}, "stream_options"),
        (
            {"stream": True, "stream_options": {"include_usage": "yes"}},
            "stream_options.include_usage",
        ),
        (
            {"stream": True, "stream_options": {"include_usage": 0}},
            "stream_options.include_usage",
        ),
    ],
)
@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_stream_options_rules(endpoint, fields, param):
    make, parse = (
        (completion, parse_completion_request)
        if endpoint == "completions"
        else (chat, parse_chat_request)
    )
    assert error_of(parse, make(**fields)).param == param


@pytest.mark.parametrize("body", [None, [], "x", 3, True], ids=repr)
@pytest.mark.parametrize("parse", [parse_completion_request, parse_chat_request])
def test_body_must_be_an_object(parse, body):
    err = error_of(parse, body)
    assert err.param is None and "JSON object" in err.message


def test_error_message_says_expected_and_given():
    err = error_of(parse_chat_request, chat(temperature="hot"))
    assert err.message == "temperature must be a number in [0, 2], got 'hot'"
    err = error_of(parse_completion_request, completion(max_tokens=True))
    assert err.message == "max_tokens must be an integer in [0, 100], got true"
    # a huge given value is cut, not echoed whole
    err = error_of(parse_completion_request, completion(prompt={"ids": [5] * 10_000}))
    given = err.message.split(", got ")[1]
    assert err.param == "prompt" and given.startswith('{"ids": [5, 5,') and given.endswith("...")
    assert len(given) == 60


def test_too_many_choices_over_prompts():
    body = completion(prompt=["a", "b", "c"], n=2)  # 6 choices, max_n 4
    err = error_of(parse_completion_request, body)
    assert err.param == "n" and "6 choices" in err.message
    assert (
        len(parse_completion_request(completion(prompt=["a", "b"], n=2), limits=LIMITS).prompts)
        == 2
    )


@pytest.mark.parametrize(
    "prompt, expected",
    [
        ("hi", ["hi"]),
        (["a", "b"], ["a", "b"]),
        ([1, 2, 299], [[1, 2, 299]]),
        ([[1], [0, 2]], [[1], [0, 2]]),
    ],
    ids=["string", "strings", "token-ids", "token-id-lists"],
)
def test_completion_prompt_forms(prompt, expected):
    assert parse_completion_request(completion(prompt=prompt), limits=LIMITS).prompts == expected


def test_defaults_are_openai_and_nulls_take_them():
    for body in (
        completion(),
        completion(
            **dict.fromkeys(
                [
                    "n",
                    "temperature",
                    "top_p",
                    "stop",
                    "max_tokens",
                    "seed",
                    "stream",
                    "echo",
                    "logprobs",
                    "stream_options",
                ]
            )
        ),
    ):
        r = parse_completion_request(body, limits=LIMITS)
        assert isinstance(r, CompletionRequest)
        assert (r.n, r.stream, r.include_usage, r.echo, r.max_tokens, r.logprobs) == (
            1,
            False,
            False,
            False,
            None,
            None,
        )
        assert r.sampling_params(7) == SamplingParams(max_new_tokens=7, temperature=1.0)
    r = parse_chat_request(chat(user="u", extra_unknown={"x": 1}), limits=LIMITS)
    assert isinstance(r, ChatRequest)
    assert (r.add_generation_prompt, r.chat_template_kwargs, r.logprobs, r.top_logprobs) == (
        True,
        {},
        False,
        None,
    )
    assert r.sampling_params(3) == SamplingParams(max_new_tokens=3, temperature=1.0)


def test_completion_maps_to_sampling_params():
    body = completion(
        prompt=[[5, 6]],
        max_tokens=50,
        temperature=0.5,
        top_p=0.9,
        top_k=-1,
        seed=-3,
        stop="END",
        n=2,
        stream=True,
        stream_options={"include_usage": True},
        logprobs=3,
        presence_penalty=0.5,
        frequency_penalty=-1,
        repetition_penalty=1.2,
        ignore_eos=True,
        stop_token_ids=[7],
        echo=True,
        best_of=2,
        user="me",
        suffix=None,
    )
    r = parse_completion_request(body, limits=LIMITS)
    assert (r.model, r.prompts, r.n, r.stream, r.include_usage, r.echo, r.max_tokens) == (
        "m",
        [[5, 6]],
        2,
        True,
        True,
        True,
        50,
    )
    params = r.sampling_params(40)
    assert params == SamplingParams(
        max_new_tokens=40,
        temperature=0.5,
        top_k=0,
        top_p=0.9,
        repetition_penalty=1.2,
        presence_penalty=0.5,
        frequency_penalty=-1.0,
        logprobs=3,
        prompt_logprobs=3,  # echo with logprobs scores the prompt too
        seed=-3,
        stop_token_ids=[7],
        stop=["END"],
        ignore_eos=True,
    )
    assert params.validate(LIMITS.vocab_size) is params
    scored = parse_completion_request(completion(echo=True, max_tokens=0), limits=LIMITS)
    assert scored.sampling_params(0).prompt_logprobs == 0  # max_tokens 0: score the prompt
    assert (
        parse_completion_request(completion(logprobs=2), limits=LIMITS)
        .sampling_params(1)
        .prompt_logprobs
        is None
    )  # no echo: the prompt is not scored
    with pytest.raises(APIError, match="0 only with echo"):
        parse_completion_request(completion(max_tokens=0), limits=LIMITS)
    assert (
        parse_completion_request(completion(top_k=5), limits=LIMITS).sampling_params(1).top_k == 5
    )
    assert (
        parse_completion_request(completion(top_k=0), limits=LIMITS).sampling_params(1).top_k == 0
    )


def test_chat_maps_to_sampling_params_and_messages():
    body = chat(
        messages=[
            {"role": "developer", "content": "be brief"},
            {
                "role": "user",
                "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
            },
            {"role": "assistant", "content": None, "name": "x"},
            {"role": "tool", "content": "42"},
        ],
        max_tokens=9,
        max_completion_tokens=20,
        logprobs=True,
        top_logprobs=4,
        stop=["x", "y"],
        add_generation_prompt=False,
        chat_template_kwargs={"enable_thinking": 1},
        temperature=0,
    )
    r = parse_chat_request(body, limits=LIMITS)
    assert r.messages == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "ab"},
        {"role": "assistant", "content": ""},
        {"role": "tool", "content": "42"},
    ]
    assert (r.max_tokens, r.add_generation_prompt, r.chat_template_kwargs) == (
        20,
        False,
        {"enable_thinking": 1},
    )
    params = r.sampling_params(20)
    assert (params.logprobs, params.stop, params.temperature) == (4, ["x", "y"], 0.0)
    assert parse_chat_request(chat(max_tokens=9), limits=LIMITS).max_tokens == 9
    no_top = parse_chat_request(chat(logprobs=True), limits=LIMITS)
    assert no_top.sampling_params(1).logprobs == 0
    assert (
        parse_chat_request(chat(logprobs=False), limits=LIMITS).sampling_params(1).logprobs is None
    )


def test_api_error_factories():
    cases = [
        (APIError.invalid("bad", "n"), 400, "invalid_request_error", "n", None),
        (APIError.unauthorized(), 401, "authentication_error", None, "invalid_api_key"),
        (APIError.not_found("no model x"), 404, "not_found_error", "model", "model_not_found"),
        (APIError.rate_limited("busy"), 429, "rate_limit_exceeded", None, "rate_limit_exceeded"),
        (APIError.server_error("boom"), 500, "server_error", None, None),
    ]
    for err, status, type_, param, code in cases:
        assert (err.status, err.type, err.param, err.code) == (status, type_, param, code)
        assert err.body()["error"] == {
            "message": err.message,
            "type": type_,
            "param": param,
            "code": code,
        }
        assert str(err) == err.message


# -- responses --------------------------------------------------------------------------------

VOCAB = {1: "Hel", 2: "lo", 3: " world", 4: "é", 5: "lo"}


def decode(token_id: int) -> str:
    return VOCAB[token_id]


ENTRIES = [
    TokenLogprob(1, -0.5, [(1, -0.5), (3, -1.5)]),
    TokenLogprob(2, float("-inf"), [(5, -0.1), (2, -0.2), (4, float("nan"))]),
]


def test_ids_and_usage():
    a, b = new_id("cmpl"), new_id("chatcmpl")
    assert a.startswith("cmpl-") and b.startswith("chatcmpl-") and a != new_id("cmpl")
    assert usage(10, 3, 4) == {
        "prompt_tokens": 10,
        "completion_tokens": 3,
        "total_tokens": 13,
        "prompt_tokens_details": {"cached_tokens": 4},
    }


def test_completion_response_shape_and_logprobs():
    choices = [
        Choice(0, "Hello", "length", ENTRIES, text_offset=2),
        Choice(1, "x", "stop"),
    ]
    r = completion_response("cmpl-1", "m", 123, choices, usage(1, 2), decode_token=decode)
    assert list(r) == ["id", "object", "created", "model", "choices", "usage"]
    assert (r["id"], r["object"], r["created"], r["model"]) == (
        "cmpl-1",
        "text_completion",
        123,
        "m",
    )
    c0, c1 = r["choices"]
    assert list(c0) == ["index", "text", "logprobs", "finish_reason"]
    assert (c0["index"], c0["text"], c0["finish_reason"]) == (0, "Hello", "length")
    assert c0["logprobs"] == {
        "tokens": ["Hel", "lo"],
        "token_logprobs": [-0.5, MIN_LOGPROB],
        # two ids decode to "lo": the more likely (first) is kept; NaN/-inf are clamped
        "top_logprobs": [{"Hel": -0.5, " world": -1.5}, {"lo": -0.1, "é": MIN_LOGPROB}],
        "text_offset": [2, 5],
    }
    assert c1["logprobs"] is None and c1["index"] == 1
    json.dumps(r, allow_nan=False)  # valid JSON: no inf / NaN


def test_completion_chunk_and_usage_chunk():
    chunk = completion_chunk("cmpl-1", "m", 5, [Choice(0, "lo")], decode_token=decode)
    assert chunk["object"] == "text_completion" and chunk["usage"] is None
    assert chunk["choices"] == [{"index": 0, "text": "lo", "logprobs": None, "finish_reason": None}]
    last = completion_chunk("cmpl-1", "m", 5, [], decode_token=decode, usage=usage(1, 1))
    assert last["choices"] == [] and last["usage"]["total_tokens"] == 2


def test_chat_response_shape_and_logprobs():
    choices = [
        Choice(0, "Hello", "stop", ENTRIES[:1], reasoning_content="think"),
        Choice(1, "Hi", "length"),
    ]
    r = chat_response("chatcmpl-1", "m", 9, choices, usage(3, 4, 1), decode_token=decode)
    assert list(r) == ["id", "object", "created", "model", "choices", "usage"]
    assert r["object"] == "chat.completion" and r["usage"]["prompt_tokens_details"] == {
        "cached_tokens": 1
    }
    c0, c1 = r["choices"]
    assert list(c0) == ["index", "message", "logprobs", "finish_reason"]
    assert c0["message"] == {"role": "assistant", "content": "Hello", "reasoning_content": "think"}
    assert c1["message"] == {"role": "assistant", "content": "Hi"}
    assert c0["logprobs"] == {
        "content": [
            {
                "token": "Hel",
                "logprob": -0.5,
                "bytes": [72, 101, 108],
                "top_logprobs": [
                    {"token": "Hel", "logprob": -0.5, "bytes": [72, 101, 108]},
                    {"token": " world", "logprob": -1.5, "bytes": list(b" world")},
                ],
            }
        ]
    }
    assert c1["logprobs"] is None
    entry = chat_response(
        "x", "m", 0, [Choice(0, "é", None, [ENTRIES[1]])], None, decode_token=decode
    )["choices"][0]["logprobs"]["content"][0]
    assert entry["logprob"] == MIN_LOGPROB and entry["top_logprobs"][2]["bytes"] == [0xC3, 0xA9]


def test_chat_chunks():
    first = chat_chunk("c", "m", 1, [Choice(0), Choice(1)], decode_token=decode, role=True)
    assert first["object"] == "chat.completion.chunk" and first["usage"] is None
    assert [c["delta"] for c in first["choices"]] == [{"role": "assistant", "content": ""}] * 2
    mid = chat_chunk(
        "c",
        "m",
        1,
        [Choice(0, "ab", reasoning_content="r", logprobs=ENTRIES[:1])],
        decode_token=decode,
    )["choices"][0]
    assert mid["delta"] == {"reasoning_content": "r", "content": "ab"}
    assert [e["token"] for e in mid["logprobs"]["content"]] == ["Hel"]
    only_reasoning = chat_chunk(
        "c", "m", 1, [Choice(0, reasoning_content="r")], decode_token=decode
    )
    assert only_reasoning["choices"][0]["delta"] == {"reasoning_content": "r"}
    last = chat_chunk("c", "m", 1, [Choice(0, finish_reason="stop")], decode_token=decode)
    assert last["choices"][0]["delta"] == {} and last["choices"][0]["finish_reason"] == "stop"
    u = chat_chunk("c", "m", 1, [], decode_token=decode, usage=usage(2, 2))
    assert u["choices"] == [] and u["usage"]["total_tokens"] == 4


def test_models_response():
    r = models_response(["a", "b"], 7, max_model_len=4096)
    assert r["object"] == "list"
    assert r["data"] == [
        {
            "id": "a",
            "object": "model",
            "created": 7,
            "owned_by": "lightlong",
            "max_model_len": 4096,
        },
        {
            "id": "b",
            "object": "model",
            "created": 7,
            "owned_by": "lightlong",
            "max_model_len": 4096,
        },
    ]
    assert model_card("a", 1, "me") == {
        "id": "a",
        "object": "model",
        "created": 1,
        "owned_by": "me",
    }


def test_sse():
    event = sse({"text": "é\nx"})
    assert event == 'data: {"text": "é\\nx"}\n\n'.encode()
    assert json.loads(event.decode()[len("data: ") :]) == {"text": "é\nx"}
    assert sse("a\nb") == b"data: a\ndata: b\n\n"
    assert DONE == b"data: [DONE]\n\n"
