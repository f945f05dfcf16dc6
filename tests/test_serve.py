"""`lightlong serve` end to end: real server processes on the tiny preset, driven by the
`openai` client and raw HTTP, their answers checked token for token against the offline
`Engine`.

The server's `--model tiny` and `load_model("tiny", seed=0)` here have the same weights, so a
greedy answer must equal `Engine`'s. The byte tokenizer decodes many ids alike (every byte
>= 128 alone is U+FFFD), so an answer is compared by its text, each token's string and each
token's log-probability (`logprobs=0` returns them): another token with the same string
would not have the same log-probability.
"""

from __future__ import annotations

import asyncio
import json
import os
import queue
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import torch
from openai import AsyncOpenAI, AuthenticationError, OpenAI

from lightlong.infer import Engine, SamplingParams
from lightlong.model.source import load_model
from lightlong.serve.chat import ChatTemplate, ReasoningParser
from lightlong.tokenizer import ByteTokenizer, HFTokenizer

BYTES = ByteTokenizer()
LOGPROB_TOL = 1e-4
"""Most |server − Engine| per token log-probability (fp32; batched rows round differently)."""
START_TIMEOUT_S = 60
API_KEY = "sk-test-key"
LISTENING = re.compile(r"lightlong serve: listening on (http://\S+)")
COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"
ENDLESS = {"max_tokens": 100000, "temperature": 0, "ignore_eos": True}
"""A request that runs until it is cancelled."""


# -- servers -----------------------------------------------------------------------------------


class Server:
    """A `lightlong serve` subprocess on a free port; its stderr is kept in `log`."""

    def __init__(self, *args: str):
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        cmd = [sys.executable, "-m", "lightlong", "serve", "--port", "0", "--threads", "1", *args]
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            text=True, env=env,
        )  # fmt: skip
        self.log: list[str] = []
        urls: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read_stderr, args=(urls,), daemon=True).start()
        try:
            url = urls.get(timeout=START_TIMEOUT_S)
        except queue.Empty:
            url = None
        if url is None:
            self.stop()
            raise RuntimeError(f"lightlong serve {' '.join(args)} did not start:\n{self.stderr}")
        self.url = url
        self.http = httpx.Client(base_url=url, timeout=60)

    def _read_stderr(self, urls: queue.Queue) -> None:
        for line in self.proc.stderr:  # read to the end, so that the pipe never fills
            self.log.append(line)
            found = LISTENING.search(line)
            if found:
                urls.put(found.group(1))
        urls.put(None)

    @property
    def stderr(self) -> str:
        return "".join(self.log)

    def client(self, api_key: str = "x") -> OpenAI:
        return OpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0, timeout=60)

    def async_client(self) -> AsyncOpenAI:
        return AsyncOpenAI(base_url=self.url + "/v1", api_key="x", max_retries=0, timeout=120)

    def stop(self) -> int:
        """SIGTERM, then kill if it has not exited within 10 s; returns the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if hasattr(self, "http"):
            self.http.close()
        return self.proc.returncode

    def metric(self, name: str, **labels: str) -> float:
        """A sample of GET /metrics; a labelled sample not (yet) there is 0."""
        want = name
        if labels:
            want += "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}"
        text = self.http.get("/metrics").text
        for line in text.splitlines():
            if line.startswith(want + " "):
                return float(line.split()[-1])
        if labels:
            return 0.0
        raise KeyError(f"{name} is not in /metrics:\n{text}")


@contextmanager
def serving(*args: str) -> Iterator[Server]:
    server = Server(*args)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    """Default settings: 64 rows, prefix cache on (snapshots every 256 tokens)."""
    with serving("--model", "tiny") as s:
        yield s


@pytest.fixture(scope="module")
def single() -> Iterator[Server]:
    """One row, one waiting request, no prefix cache."""
    with serving("--model", "tiny", "--max-num-seqs", "1", "--max-waiting", "1",
                 "--prefix-cache-bytes", "0") as s:  # fmt: skip
        yield s


@pytest.fixture(scope="module")
def strict() -> Iterator[Server]:
    """Small limits and an API key."""
    with serving("--model", "tiny", "--max-model-len", "64", "--max-num-seqs", "2",
                 "--max-body-bytes", "4096", "--api-key", API_KEY) as s:  # fmt: skip
        yield s


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine(load_model("tiny", seed=0), BYTES)


# -- answers -----------------------------------------------------------------------------------


@dataclass
class Answer:
    """One choice: its text, and each token's string and log-probability."""

    text: str = ""
    tokens: list[str] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish_reason: str | None = None


def reference(engine: Engine, prompt: str | list[int], max_tokens: int, **params) -> Answer:
    """`Engine`'s answer (greedy unless params say otherwise)."""
    tokenizer = engine.tokenizer
    answer = Answer()
    sampling = SamplingParams(max_new_tokens=max_tokens, logprobs=0, **params)
    for ev in engine.stream(prompt, sampling):
        answer.text += ev.text
        answer.tokens.append(tokenizer.decode([ev.token_id]))
        answer.logprobs.append(ev.logprob)
        answer.finish_reason = ev.finish_reason
    return answer


def assert_same(got: Answer, ref: Answer, name: str = "answer") -> None:
    assert got.tokens == ref.tokens, f"{name}: tokens differ"
    assert got.text == ref.text, f"{name}: text differs"
    assert got.finish_reason == ref.finish_reason, f"{name}: finish_reason differs"
    err = max((abs(a - b) for a, b in zip(got.logprobs, ref.logprobs, strict=True)), default=0)
    assert err <= LOGPROB_TOL, f"{name}: log-probabilities differ by up to {err:.2e}"


def completion_answer(choice) -> Answer:
    lp = choice.logprobs
    return Answer(choice.text, list(lp.tokens), list(lp.token_logprobs), choice.finish_reason)


def chat_answer(choice) -> Answer:
    content = choice.logprobs.content
    return Answer(
        choice.message.content, [c.token for c in content], [c.logprob for c in content],
        choice.finish_reason,
    )  # fmt: skip


def completion_stream_answers(chunks) -> dict[int, Answer]:
    """Each choice's answer from streamed completion chunks (dicts or openai objects)."""
    answers: dict[int, Answer] = {}
    for chunk in map(_as_dict, chunks):
        for c in chunk["choices"]:
            a = answers.setdefault(c["index"], Answer())
            a.text += c["text"]
            if c["logprobs"] is not None:
                a.tokens += c["logprobs"]["tokens"]
                a.logprobs += c["logprobs"]["token_logprobs"]
            a.finish_reason = c["finish_reason"] or a.finish_reason
    return answers


def chat_stream_answers(chunks) -> dict[int, Answer]:
    answers: dict[int, Answer] = {}
    for chunk in map(_as_dict, chunks):
        for c in chunk["choices"]:
            a = answers.setdefault(c["index"], Answer())
            a.text += c["delta"].get("content") or ""
            if c["logprobs"] is not None:
                a.tokens += [t["token"] for t in c["logprobs"]["content"]]
                a.logprobs += [t["logprob"] for t in c["logprobs"]["content"]]
            a.finish_reason = c["finish_reason"] or a.finish_reason
    return answers


def _as_dict(chunk) -> dict:
    return chunk if isinstance(chunk, dict) else chunk.model_dump()


def token_ids(n: int, seed: int) -> list[int]:
    """n random byte ids (a prompt no other test sends)."""
    rng = random.Random(seed)
    return [rng.randrange(256) for _ in range(n)]


def default_chat_prompt(messages: list[dict]) -> list[int]:
    """The prompt ids the server makes of `messages` with the byte tokenizer's template."""
    return BYTES.encode(ChatTemplate.for_tokenizer(BYTES).render(messages))


MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]


# -- raw HTTP and server-sent events -----------------------------------------------------------


def iter_sse(response: httpx.Response) -> Iterator[str]:
    """The data of each server-sent event of a streamed response, as it arrives."""
    data: list[str] = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data.append(line[len("data: ") :])
        elif line == "" and data:
            yield "\n".join(data)
            data = []
        elif line:
            raise AssertionError(f"not a data line of server-sent events: {line!r}")
    if data:
        yield "\n".join(data)


def post_sse(http: httpx.Client, path: str, body: dict) -> list[str]:
    """Every event of a streamed POST; the response must be 200 text/event-stream."""
    with http.stream("POST", path, json=body) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        return list(iter_sse(r))


def chunks_of(events: list[str]) -> list[dict]:
    """The JSON chunks of a whole stream, which must end with exactly one [DONE]."""
    assert events and events[-1] == "[DONE]", f"stream does not end with [DONE]: {events[-3:]}"
    assert "[DONE]" not in events[:-1]
    return [json.loads(e) for e in events[:-1]]


def assert_error(r: httpx.Response, status: int, param: str | None, *fragments: str) -> dict:
    """An OpenAI error body with `status`, naming `param`, its message holding `fragments`."""
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"], error
    assert error["param"] == param, error
    for fragment in fragments:
        assert fragment in error["message"], error
    return error


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


# -- the API -----------------------------------------------------------------------------------


@pytest.mark.timeout(90)
def test_health_models_and_unknown_routes(server):
    assert server.http.get("/health").json() == {"status": "ok"}
    models = server.client().models.list()
    assert [m.id for m in models.data] == ["tiny"]
    assert server.client().models.retrieve("tiny").id == "tiny"
    assert_error(server.http.get("/v1/models/gpt-4"), 404, None, "'gpt-4'")
    assert_error(server.http.get("/v1/nope"), 404, None)
    assert_error(server.http.post("/v2/completions", json={}), 404, None)
    body = {"model": "gpt-4", "prompt": "Hi", "max_tokens": 2}
    error = assert_error(server.http.post(COMPLETIONS, json=body), 404, "model", "'tiny'")
    assert error["type"] == "not_found_error"


@pytest.mark.timeout(90)
def test_responses_are_not_held_back_by_nagle(server):
    """Without TCP_NODELAY, Nagle's algorithm holds a response's last write until the
    client's delayed ACK: every round trip takes 40 ms or more (Linux)."""
    times = []
    for _ in range(21):
        t0 = time.perf_counter()
        assert server.http.get("/health").status_code == 200
        times.append(time.perf_counter() - t0)
    median = sorted(times)[len(times) // 2]
    assert median < 0.02, f"the median GET /health round trip took {median * 1e3:.0f} ms"


@pytest.mark.timeout(90)
@pytest.mark.parametrize("prompt", ["The cache holds", token_ids(37, seed=1)], ids=["text", "ids"])
def test_completion_equals_engine(server, engine, prompt):
    t0 = int(time.time())
    out = server.client().completions.create(
        model="tiny", prompt=prompt, max_tokens=16, temperature=0, logprobs=0
    )
    t1 = int(time.time())
    ref = reference(engine, prompt, 16)
    assert_same(completion_answer(out.choices[0]), ref)
    assert out.id.startswith("cmpl-") and len(out.id) > len("cmpl-")
    assert out.object == "text_completion" and out.model == "tiny"
    assert t0 - 1 <= out.created <= t1 + 1
    n_prompt = len(prompt) if isinstance(prompt, list) else len(BYTES.encode(prompt))
    u = out.usage
    assert (u.prompt_tokens, u.completion_tokens) == (n_prompt, len(ref.tokens))
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens


@pytest.mark.timeout(90)
def test_completion_stream_equals_engine_and_ends_with_done(server, engine):
    prompt = token_ids(23, seed=2)
    body = {"model": "tiny", "prompt": prompt, "max_tokens": 20, "temperature": 0,
            "logprobs": 0, "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    t0 = int(time.time())
    chunks = chunks_of(post_sse(server.http, COMPLETIONS, body))
    t1 = int(time.time())
    *deltas, last = chunks
    assert {c["id"] for c in chunks} == {chunks[0]["id"]} and chunks[0]["id"].startswith("cmpl-")
    assert {c["created"] for c in chunks} == {chunks[0]["created"]}
    assert t0 - 1 <= chunks[0]["created"] <= t1 + 1
    assert all(c["object"] == "text_completion" and c["usage"] is None for c in deltas)
    assert last["choices"] == []
    answer = completion_stream_answers(deltas)[0]
    assert_same(answer, reference(engine, prompt, 20))
    usage = last["usage"]
    assert usage["prompt_tokens"] == len(prompt)
    assert usage["completion_tokens"] == len(answer.tokens)
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


@pytest.mark.timeout(90)
def test_stream_without_include_usage_has_no_usage_chunk(server):
    body = {"model": "tiny", "prompt": "Hi", "max_tokens": 5, "temperature": 0, "stream": True}
    chunks = chunks_of(post_sse(server.http, COMPLETIONS, body))
    assert chunks and all(c["choices"] and c["usage"] is None for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")


@pytest.mark.timeout(90)
def test_chat_equals_engine(server, engine):
    client = server.client()
    t0 = int(time.time())
    out = client.chat.completions.create(
        model="tiny", messages=MESSAGES, max_tokens=16, temperature=0, logprobs=True
    )
    t1 = int(time.time())
    prompt = default_chat_prompt(MESSAGES)
    ref = reference(engine, prompt, 16)
    assert_same(chat_answer(out.choices[0]), ref)
    assert out.id.startswith("chatcmpl-") and out.object == "chat.completion"
    assert t0 - 1 <= out.created <= t1 + 1
    assert out.choices[0].message.role == "assistant"
    u = out.usage
    assert (u.prompt_tokens, u.completion_tokens) == (len(prompt), len(ref.tokens))
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens

    stream = client.chat.completions.create(
        model="tiny", messages=MESSAGES, max_tokens=16, temperature=0, logprobs=True,
        stream=True, stream_options={"include_usage": True},
    )  # fmt: skip
    *chunks, last = list(stream)
    assert {c.id for c in chunks} == {last.id} and last.id.startswith("chatcmpl-")
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.choices[0].delta.role is None for c in chunks[1:])
    answer = chat_stream_answers(chunks)[0]
    assert_same(answer, ref)
    assert last.choices == [] and last.usage.completion_tokens == len(answer.tokens)
    assert last.usage.prompt_tokens == len(prompt)


@pytest.mark.timeout(90)
def test_chat_has_no_reasoning_content_without_a_parser(server):
    body = {"model": "tiny", "messages": MESSAGES, "max_tokens": 8, "temperature": 0}
    message = server.http.post(CHAT, json=body).json()["choices"][0]["message"]
    assert set(message) == {"role", "content"}
    chunks = chunks_of(post_sse(server.http, CHAT, {**body, "stream": True}))
    assert all("reasoning_content" not in c["choices"][0]["delta"] for c in chunks)


@pytest.mark.timeout(90)
def test_n_choices_are_seeded_seed_plus_index(server, engine):
    client = server.client()
    prompt = "Once upon a time"
    sampled = dict(model="tiny", prompt=prompt, max_tokens=12, temperature=0.8, logprobs=0)
    out = client.completions.create(n=3, seed=5, **sampled)
    assert [c.index for c in out.choices] == [0, 1, 2]
    answers = [completion_answer(c) for c in out.choices]
    for i, answer in enumerate(answers):  # choice i runs with seed 5 + i
        alone = client.completions.create(n=1, seed=5 + i, **sampled)
        assert_same(answer, completion_answer(alone.choices[0]), f"choice {i}")
    assert len({tuple(a.logprobs) for a in answers}) == 3, "choices with the same seed"
    assert out.usage.completion_tokens == sum(len(a.tokens) for a in answers)

    greedy = client.completions.create(
        model="tiny", prompt=prompt, max_tokens=12, temperature=0, logprobs=0, n=2, stream=True
    )
    streamed = completion_stream_answers(list(greedy))
    assert sorted(streamed) == [0, 1]
    for i in (0, 1):
        assert_same(streamed[i], reference(engine, prompt, 12), f"greedy choice {i}")

    chat = dict(model="tiny", messages=MESSAGES, max_tokens=10, temperature=0.8, logprobs=True)
    *chunks, last = client.chat.completions.create(
        n=2, seed=5, stream=True, stream_options={"include_usage": True}, **chat
    )
    roles: dict[int, str | None] = {}  # each choice's first chunk says the role
    for chunk in chunks:
        for c in chunk.choices:
            roles.setdefault(c.index, c.delta.role)
    assert roles == {0: "assistant", 1: "assistant"}
    answers = chat_stream_answers(chunks)
    for i in (0, 1):
        alone = client.chat.completions.create(n=1, seed=5 + i, **chat)
        assert_same(answers[i], chat_answer(alone.choices[0]), f"chat choice {i}")
    assert last.usage.completion_tokens == sum(len(a.tokens) for a in answers.values())


@pytest.mark.timeout(90)
def test_usage_counts_the_prompt_once_per_prompt_whatever_n(server):
    """OpenAI and vLLM count a prompt's tokens once, not once per choice."""
    prompt = token_ids(300, seed=3)  # past a 256-token prefix block: cached_tokens too
    body = dict(model="tiny", prompt=prompt, max_tokens=3, temperature=0,
                extra_body={"ignore_eos": True})  # fmt: skip
    server.client().completions.create(**body)
    out = server.client().completions.create(n=2, **body)
    assert out.usage.completion_tokens == 2 * 3
    assert out.usage.prompt_tokens == len(prompt)
    assert out.usage.prompt_tokens_details.cached_tokens == 256
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens


@pytest.mark.timeout(90)
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_stop_string_ends_the_text_before_it(server, engine, stream):
    prompt = token_ids(40, seed=4)
    full = reference(engine, prompt, 40)
    # two characters from the middle of the text that decode cleanly
    at = next(i for i in range(len(full.text) // 3, len(full.text) - 2)
              if "\ufffd" not in full.text[i : i + 2])  # fmt: skip
    stop = full.text[at : at + 2]
    expected = full.text[: full.text.index(stop)]
    ref = reference(engine, prompt, 40, stop=[stop])
    assert (ref.text, ref.finish_reason) == (expected, "stop")

    client = server.client()
    body = dict(model="tiny", prompt=prompt, max_tokens=40, temperature=0, stop=[stop], logprobs=0)
    if stream:
        got = completion_stream_answers(list(client.completions.create(stream=True, **body)))[0]
    else:
        got = completion_answer(client.completions.create(**body).choices[0])
    assert_same(got, ref)

    messages = [{"role": "user", "content": "Say something"}]
    chat_ref = reference(engine, default_chat_prompt(messages), 40)
    at = next(i for i in range(len(chat_ref.text) // 3, len(chat_ref.text) - 2)
              if "\ufffd" not in chat_ref.text[i : i + 2])  # fmt: skip
    stop = chat_ref.text[at : at + 2]
    chat_body = dict(model="tiny", messages=messages, max_tokens=40, temperature=0, stop=stop)
    if stream:
        chunks = list(client.chat.completions.create(stream=True, **chat_body))
        text, reason = chat_stream_answers(chunks)[0].text, chunks[-1].choices[0].finish_reason
    else:
        choice = client.chat.completions.create(**chat_body).choices[0]
        text, reason = choice.message.content, choice.finish_reason
    assert (text, reason) == (chat_ref.text[: chat_ref.text.index(stop)], "stop")


@pytest.mark.timeout(90)
def test_completion_logprobs_are_the_models_top_k(server, engine):
    prompt, k = token_ids(19, seed=6), 3
    out = server.client().completions.create(
        model="tiny", prompt=prompt, max_tokens=10, temperature=0, logprobs=k
    )
    lp = out.choices[0].logprobs
    events = list(engine.stream(prompt, SamplingParams(max_new_tokens=10, logprobs=k)))
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(events)
    for i, (chosen, top, ev) in enumerate(
        zip(lp.token_logprobs, lp.top_logprobs, events, strict=True)
    ):
        assert lp.tokens[i] == BYTES.decode([ev.token_id])
        assert chosen <= 0 and abs(chosen - ev.logprob) <= LOGPROB_TOL, (i, chosen, ev.logprob)
        expected: dict[str, float] = {}  # ids that decode alike keep the most likely
        for token_id, logprob in ev.top_logprobs:
            expected.setdefault(BYTES.decode([token_id]), logprob)
        assert 1 <= len(top) <= k and list(top) == list(expected), (i, top, expected)
        assert max(abs(top[t] - expected[t]) for t in top) <= LOGPROB_TOL
        # greedy: the chosen token is the most likely one
        assert lp.tokens[i] in top and abs(chosen - max(top.values())) <= 1e-6


@pytest.mark.timeout(90)
def test_chat_top_logprobs(server, engine):
    k = 4
    out = server.client().chat.completions.create(
        model="tiny", messages=MESSAGES, max_tokens=10, temperature=0, logprobs=True,
        top_logprobs=k,
    )  # fmt: skip
    content = out.choices[0].logprobs.content
    events = list(engine.stream(default_chat_prompt(MESSAGES),
                                SamplingParams(max_new_tokens=10, logprobs=k)))  # fmt: skip
    assert len(content) == len(events)
    for entry, ev in zip(content, events, strict=True):
        assert entry.token == BYTES.decode([ev.token_id])
        assert entry.bytes == list(entry.token.encode())
        assert entry.logprob <= 0 and abs(entry.logprob - ev.logprob) <= LOGPROB_TOL
        assert len(entry.top_logprobs) == k
        top = [t.logprob for t in entry.top_logprobs]
        assert top == sorted(top, reverse=True)
        assert [t.token for t in entry.top_logprobs] == [
            BYTES.decode([t]) for t, _ in ev.top_logprobs
        ]
        assert (
            max(abs(a - b) for a, (_, b) in zip(top, ev.top_logprobs, strict=True)) <= LOGPROB_TOL
        )
        assert abs(entry.logprob - top[0]) <= 1e-6  # greedy picks the most likely


@pytest.mark.timeout(90)
def test_seeded_sampling_is_reproducible(server, engine):
    client = server.client()
    body = dict(model="tiny", prompt="Seeds", max_tokens=16, temperature=0.8, logprobs=0)
    first = completion_answer(client.completions.create(seed=5, **body).choices[0])
    again = completion_answer(client.completions.create(seed=5, **body).choices[0])
    other = completion_answer(client.completions.create(seed=6, **body).choices[0])
    assert first == again
    assert other.tokens != first.tokens or other.logprobs != first.logprobs
    assert_same(first, reference(engine, "Seeds", 16, temperature=0.8, seed=5))


@pytest.mark.timeout(90)
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("case", ["max_tokens=1", "first-token-stops"])
def test_a_request_that_ends_at_its_first_token_gets_it(server, engine, case, stream):
    """The first token is sampled in the step that admits the request; it must still be sent."""
    prompt = token_ids(11, seed=13)
    if case == "max_tokens=1":
        body, ref = {"max_tokens": 1}, reference(engine, prompt, 1)
    else:
        first = engine.generate(prompt, SamplingParams(max_new_tokens=1))[0].token_ids[0]
        body = {"max_tokens": 5, "stop_token_ids": [first]}
        ref = reference(engine, prompt, 5, stop_token_ids=[first])
    assert len(ref.tokens) == 1
    body |= {"model": "tiny", "prompt": prompt, "temperature": 0, "logprobs": 0}
    if stream:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
        *chunks, last = chunks_of(post_sse(server.http, COMPLETIONS, body))
        answer, usage = completion_stream_answers(chunks).get(0, Answer()), last["usage"]
    else:
        out = server.http.post(COMPLETIONS, json=body).json()
        answer = completion_stream_answers([out])[0]
        usage = out["usage"]
    assert_same(answer, ref)
    assert usage["completion_tokens"] == 1


@pytest.mark.timeout(90)
@pytest.mark.parametrize("max_tokens", [0, 1])
def test_echo_scores_the_prompt(server, engine, max_tokens):
    """echo + logprobs: the prompt's tokens with their log-probabilities under the model (none
    for the first), then the max_tokens generated ones; max_tokens 0 only scores."""
    prompt = token_ids(9, seed=14)
    out = server.client().completions.create(
        model="tiny", prompt=prompt, max_tokens=max_tokens, temperature=0, logprobs=1, echo=True
    )
    choice = out.choices[0]
    with torch.no_grad():
        logits = engine.model(torch.tensor([prompt])).logits[0].float()
    logits[:, BYTES.vocab_size :] = float("-inf")  # ids the tokenizer lacks are never scored
    expected = torch.log_softmax(logits, dim=-1)[torch.arange(len(prompt) - 1), prompt[1:]].tolist()
    scored = choice.logprobs.token_logprobs[: len(prompt)]
    assert scored[0] is None
    err = max(abs(a - b) for a, b in zip(scored[1:], expected, strict=True))
    assert err <= LOGPROB_TOL, f"prompt log-probabilities differ by up to {err:.2e}"
    assert choice.logprobs.tokens[: len(prompt)] == [BYTES.decode([t]) for t in prompt]
    generated = reference(engine, prompt, max_tokens) if max_tokens else Answer()
    assert choice.text == BYTES.decode(prompt) + generated.text
    assert choice.logprobs.tokens[len(prompt) :] == generated.tokens
    assert (choice.finish_reason, out.usage.completion_tokens) == ("length", max_tokens)


# -- continuous batching -----------------------------------------------------------------------


async def stream_completion(client: AsyncOpenAI, prompt, max_tokens: int) -> list:
    stream = await client.completions.create(
        model="tiny", prompt=prompt, max_tokens=max_tokens, temperature=0, logprobs=0,
        stream=True, stream_options={"include_usage": True},
    )  # fmt: skip
    return [chunk async for chunk in stream]


@pytest.mark.timeout(150)
def test_32_concurrent_streams_equal_each_prompt_alone(server, engine):
    shared = token_ids(320, seed=7)
    prompts: list[list[int]] = [shared + token_ids(1 + i, seed=100 + i) for i in range(12)]
    for i, n in enumerate([1, 2, 3, 7, 15, 16, 17, 31, 33, 64, 100, 200, 255, 256, 257, 300,
                           5, 9, 12, 40]):  # fmt: skip
        prompts.append(token_ids(n, seed=200 + i))
    max_tokens = [4 + (7 * i) % 21 for i in range(len(prompts))]
    assert len(prompts) == 32
    refs = [reference(engine, p, m) for p, m in zip(prompts, max_tokens, strict=True)]

    async def run_all():
        async with server.async_client() as client:
            jobs = [
                stream_completion(client, p, m) for p, m in zip(prompts, max_tokens, strict=True)
            ]
            return await asyncio.gather(*jobs)

    results = asyncio.run(run_all())
    cached = 0
    for i, (chunks, ref) in enumerate(zip(results, refs, strict=True)):
        *deltas, last = chunks
        answer = completion_stream_answers(deltas)[0]
        assert_same(answer, ref, f"prompt {i} ({len(prompts[i])} tokens)")
        assert last.usage.completion_tokens == len(answer.tokens)
        assert last.usage.prompt_tokens == len(prompts[i])
        if i < 12:
            cached += last.usage.prompt_tokens_details.cached_tokens
    assert cached > 0, "no request of the shared 320-token prefix hit the prefix cache"


@pytest.mark.timeout(120)
def test_cancelled_stream_leaks_no_state_into_other_rows(server, engine):
    """Rows [A1, A2, A3]; A2 is cancelled after 2 chunks (A3 moves into its row), B joins.
    A1, A3 and B must all equal Engine."""
    a1, a2, a3, b = (token_ids(20 + i, seed=300 + i) for i in range(4))
    aborted = server.metric("lightlong_requests_total", status="aborted")

    async def scenario():
        async with server.async_client() as client:
            started = {name: asyncio.Event() for name in ("a1", "a3")}

            async def collect(name, prompt):
                stream = await client.completions.create(
                    model="tiny", prompt=prompt, max_tokens=300, temperature=0, logprobs=0,
                    stream=True, extra_body={"ignore_eos": True},
                )  # fmt: skip
                chunks = []
                async for chunk in stream:
                    chunks.append(chunk)
                    started[name].set()
                return chunks

            t1 = asyncio.create_task(collect("a1", a1))
            await started["a1"].wait()
            cancelled = await client.completions.create(
                model="tiny", prompt=a2, stream=True, max_tokens=ENDLESS["max_tokens"],
                temperature=0, extra_body={"ignore_eos": True},
            )  # fmt: skip
            chunks = cancelled.__aiter__()
            await chunks.__anext__()
            t3 = asyncio.create_task(collect("a3", a3))
            await started["a3"].wait()
            await chunks.__anext__()
            await cancelled.close()
            deadline = time.monotonic() + 20
            while server.metric("lightlong_requests_total", status="aborted") < aborted + 1:
                assert time.monotonic() < deadline, "the cancelled request was not aborted"
                await asyncio.sleep(0.02)
            assert not t1.done() and not t3.done(), "A1 or A3 ended before B joined"
            after = await client.completions.create(
                model="tiny", prompt=b, max_tokens=24, temperature=0, logprobs=0
            )
            return await t1, await t3, after

    r1, r3, after = asyncio.run(scenario())
    for name, chunks, prompt in (("A1", r1, a1), ("A3", r3, a3)):
        ref = reference(engine, prompt, 300, ignore_eos=True)
        assert_same(completion_stream_answers(chunks)[0], ref, name)
    assert_same(completion_answer(after.choices[0]), reference(engine, b, 24), "B")


@pytest.mark.timeout(90)
def test_client_disconnect_frees_the_row(single, engine):
    body = {"model": "tiny", "prompt": "Go on", "stream": True, **ENDLESS}
    aborted = single.metric("lightlong_requests_total", status="aborted")
    with single.http.stream("POST", COMPLETIONS, json=body) as r:
        events = iter_sse(r)
        next(events), next(events)
        assert single.metric("lightlong_num_requests_running") == 1
    wait_for(lambda: single.metric("lightlong_num_requests_running") == 0, "the row to be freed")
    assert single.metric("lightlong_num_requests_waiting") == 0
    assert single.metric("lightlong_requests_total", status="aborted") == aborted + 1
    # the only row is the freed one
    prompt = token_ids(30, seed=8)
    out = single.client().completions.create(
        model="tiny", prompt=prompt, max_tokens=20, temperature=0, logprobs=0
    )
    assert_same(completion_answer(out.choices[0]), reference(engine, prompt, 20))


@pytest.mark.timeout(90)
def test_client_gone_before_a_whole_answer_frees_the_row(single):
    """A non-streamed request whose client stops waiting is aborted too, not run to the end."""
    body = {"model": "tiny", "prompt": "Go on", **ENDLESS}
    aborted = single.metric("lightlong_requests_total", status="aborted")
    with pytest.raises(httpx.ReadTimeout):
        single.http.post(COMPLETIONS, json=body, timeout=1.0)
    wait_for(lambda: single.metric("lightlong_num_requests_running") == 0, "the row to be freed")
    assert single.metric("lightlong_requests_total", status="aborted") == aborted + 1


@pytest.mark.timeout(90)
def test_full_queue_gets_429(single):
    long = {"model": "tiny", "prompt": "x", "stream": True, **ENDLESS}
    with single.http.stream("POST", COMPLETIONS, json=long) as running:
        events = iter_sse(running)  # (dropping the iterator would close the connection)
        next(events)  # decoding in the only row
        with single.http.stream("POST", COMPLETIONS, json=long) as waiting:
            assert waiting.status_code == 200
            wait_for(lambda: single.metric("lightlong_num_requests_waiting") == 1,
                     "the second request to wait")  # fmt: skip
            r = single.http.post(COMPLETIONS, json={**long, "stream": False})
            error = assert_error(r, 429, None, "--max-waiting 1")
            assert error["type"] == "rate_limit_exceeded"
    wait_for(lambda: single.metric("lightlong_num_requests_running") == 0, "rows to be freed")
    wait_for(lambda: single.metric("lightlong_num_requests_waiting") == 0, "the queue to empty")
    ok = single.http.post(COMPLETIONS, json={**long, "stream": False, "max_tokens": 2})
    assert ok.status_code == 200


# -- prefix cache ------------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_prefix_cache_hit_equals_cache_off(server, single, engine):
    prefix = token_ids(600, seed=9)
    first, second = prefix + token_ids(20, seed=10), prefix + token_ids(17, seed=11)
    body = dict(model="tiny", max_tokens=12, temperature=0, logprobs=0)
    client = server.client()
    out1 = client.completions.create(prompt=first, **body)
    assert out1.usage.prompt_tokens_details.cached_tokens == 0

    hits = server.metric("lightlong_prefix_cache_hits_total")
    hit_tokens = server.metric("lightlong_prefix_cache_hit_tokens_total")
    prefilled = server.metric("lightlong_prefill_tokens_total")
    out2 = client.completions.create(prompt=second, **body)
    cached = out2.usage.prompt_tokens_details.cached_tokens
    assert 0 < cached <= len(prefix) and cached % 256 == 0  # snapshots every --prefix-block
    assert server.metric("lightlong_prefix_cache_hits_total") == hits + 1
    assert server.metric("lightlong_prefix_cache_hit_tokens_total") == hit_tokens + cached
    assert server.metric("lightlong_prefill_tokens_total") - prefilled == len(second) - cached

    off = single.client().completions.create(prompt=second, **body)
    assert off.usage.prompt_tokens_details.cached_tokens == 0
    ref = reference(engine, second, 12)
    assert_same(completion_answer(out2.choices[0]), ref, "cache on")
    assert_same(completion_answer(off.choices[0]), ref, "cache off")
    assert_same(completion_answer(out1.choices[0]), reference(engine, first, 12), "first")


@pytest.mark.timeout(120)
def test_prefix_cache_eviction_keeps_answers_correct(engine):
    """Budget for one 64-token snapshot (28 KiB; two do not fit): the least recent goes."""
    budget = 40_000
    prefixes = {name: token_ids(100, seed=20 + i) for i, name in enumerate("ABC")}
    # (prefix, suffix seed, cached tokens expected)
    plan = [("A", 1, 0), ("A", 2, 64), ("B", 1, 0), ("A", 3, 0), ("C", 1, 0), ("B", 2, 0),
            ("B", 3, 64)]  # fmt: skip
    with serving("--model", "tiny", "--prefix-block", "64",
                 "--prefix-cache-bytes", str(budget)) as s:  # fmt: skip
        client = s.client()
        for name, seed, cached in plan:
            prompt = prefixes[name] + token_ids(10, seed=seed)
            out = client.completions.create(
                model="tiny", prompt=prompt, max_tokens=8, temperature=0, logprobs=0
            )
            where = f"{name}{seed}"
            assert out.usage.prompt_tokens_details.cached_tokens == cached, where
            assert_same(completion_answer(out.choices[0]), reference(engine, prompt, 8), where)
            assert 0 < s.metric("lightlong_prefix_cache_bytes") <= budget


# -- bad requests ------------------------------------------------------------------------------

GOOD = {
    COMPLETIONS: {"model": "tiny", "prompt": "Hi", "max_tokens": 2},
    CHAT: {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2},
}
# (id, path, changes to a good body (None deletes a field) or raw bytes, param, message part)
BAD_REQUESTS = [
    ("malformed-json", COMPLETIONS, b'{"model": "tiny", "prompt": ', None, "not valid JSON"),
    ("not-utf8", COMPLETIONS, b'{"model": "\xff"}', None, "not valid JSON"),
    ("array-body", CHAT, b"[1, 2]", None, "JSON object"),
    ("no-model", COMPLETIONS, {"model": None}, "model", "model must be"),
    ("no-model-chat", CHAT, {"model": None}, "model", "model must be"),
    ("no-prompt", COMPLETIONS, {"prompt": None}, "prompt", "prompt must be"),
    ("empty-prompt", COMPLETIONS, {"prompt": ""}, "prompt", "got ''"),
    ("no-messages", CHAT, {"messages": None}, "messages", "messages must be"),
    ("max_tokens-string", COMPLETIONS, {"max_tokens": "5"}, "max_tokens", "got '5'"),
    ("max_tokens-0", CHAT, {"max_tokens": 0}, "max_tokens", "got 0"),
    ("temperature-string", COMPLETIONS, {"temperature": "hot"}, "temperature", "got 'hot'"),
    ("temperature-high", CHAT, {"temperature": 2.5}, "temperature", "[0, 2]"),
    ("n-0", COMPLETIONS, {"n": 0}, "n", "got 0"),
    ("top_p-0", CHAT, {"top_p": 0}, "top_p", "(0, 1]"),
    ("top_k", COMPLETIONS, {"top_k": -2}, "top_k", "got -2"),
    ("stop-9-strings", COMPLETIONS, {"stop": ["a"] * 9}, "stop", "at most 8"),
    ("stop-empty-string", CHAT, {"stop": ["a", ""]}, "stop[1]", "non-empty"),
    ("presence_penalty", COMPLETIONS, {"presence_penalty": 3}, "presence_penalty", "[-2, 2]"),
    ("frequency_penalty", CHAT, {"frequency_penalty": -2.5}, "frequency_penalty", "[-2, 2]"),
    ("repetition_penalty", COMPLETIONS, {"repetition_penalty": 0}, "repetition_penalty", "> 0"),
    ("seed-float", COMPLETIONS, {"seed": 1.5}, "seed", "got 1.5"),
    ("logprobs-6", COMPLETIONS, {"logprobs": 6}, "logprobs", "[0, 5]"),
    ("top_logprobs-21", CHAT, {"logprobs": True, "top_logprobs": 21}, "top_logprobs", "[0, 20]"),
    ("stream-string", CHAT, {"stream": "yes"}, "stream", "boolean"),
    ("token-out-of-vocab", COMPLETIONS, {"prompt": [1, 512]}, "prompt[1]", "got 512"),
    ("role", CHAT, {"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role", "robot"),
    ("content", CHAT, {"messages": [{"role": "user", "content": 5}]}, "messages[0].content", "5"),
    ("tools", CHAT, {"tools": [{"type": "function"}]}, "tools", "not supported"),
]


def bad_request(http: httpx.Client, path: str, change: dict | bytes) -> httpx.Response:
    if isinstance(change, bytes):
        return http.post(path, content=change, headers={"content-type": "application/json"})
    body = {k: v for k, v in {**GOOD[path], **change}.items() if v is not None}
    return http.post(path, json=body)


@pytest.mark.timeout(90)
@pytest.mark.parametrize(
    ("path", "change", "param", "message"),
    [case[1:] for case in BAD_REQUESTS], ids=[case[0] for case in BAD_REQUESTS],
)  # fmt: skip
def test_bad_request_gets_400_naming_the_field(server, path, change, param, message):
    error = assert_error(bad_request(server.http, path, change), 400, param, message)
    assert error["type"] == "invalid_request_error"
    if param is not None:
        assert param in error["message"]


@pytest.mark.timeout(120)
def test_server_answers_correctly_after_200_malformed_requests(server, engine):
    for i in range(200):
        _, path, change, _, _ = BAD_REQUESTS[i % len(BAD_REQUESTS)]
        assert bad_request(server.http, path, change).status_code == 400, BAD_REQUESTS[i]
        if i % 20 == 0:
            body = {**GOOD[COMPLETIONS], "model": "nope"}
            assert server.http.post(COMPLETIONS, json=body).status_code == 404
            with server.http.stream("POST", COMPLETIONS, json={"stream": True}) as r:
                assert r.status_code == 400
    assert server.http.get("/health").status_code == 200
    prompt = token_ids(25, seed=12)
    out = server.client().completions.create(
        model="tiny", prompt=prompt, max_tokens=16, temperature=0, logprobs=0
    )
    assert_same(completion_answer(out.choices[0]), reference(engine, prompt, 16))


def strict_post(strict: Server, path: str, body: dict) -> httpx.Response:
    return strict.http.post(path, json=body, headers={"authorization": f"Bearer {API_KEY}"})


@pytest.mark.timeout(90)
@pytest.mark.parametrize(
    ("path", "body", "param", "parts"),
    [
        (COMPLETIONS, {"prompt": token_ids(70, 0)}, "prompt", ["70 tokens", "64"]),
        (COMPLETIONS, {"prompt": token_ids(64, 0)}, "prompt", ["64 tokens", "64"]),
        (CHAT, {"messages": [{"role": "user", "content": "x" * 80}]}, "messages", ["64"]),
        (COMPLETIONS, {"max_tokens": 65}, "max_tokens", ["64]", "got 65"]),
        (COMPLETIONS, {"prompt": token_ids(60, 0), "max_tokens": 10}, "max_tokens",
         ["60 tokens", "max_tokens (10)", "64"]),
        (COMPLETIONS, {"n": 3}, "n", ["[1, 2]", "got 3"]),
        (COMPLETIONS, {"prompt": ["a", "b"], "n": 2}, "n", ["4 choices", "2 allowed"]),
        (CHAT, {"n": 3}, "n", ["[1, 2]"]),
    ],
    ids=["prompt-over", "prompt-at", "chat-over", "max_tokens-over", "prompt+max_tokens",
         "n-over", "prompts-x-n", "chat-n-over"],
)  # fmt: skip
def test_limits_are_enforced(strict, path, body, param, parts):
    assert_error(strict_post(strict, path, {**GOOD[path], **body}), 400, param, *parts)


@pytest.mark.timeout(90)
def test_prompt_that_just_fits_the_context(strict):
    for prompt, max_tokens in ((token_ids(60, 1), 4), (token_ids(63, 1), None)):
        body = {"model": "tiny", "prompt": prompt, "temperature": 0, "ignore_eos": True}
        r = strict_post(strict, COMPLETIONS, {**body, "max_tokens": max_tokens})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 64 - len(prompt)


@pytest.mark.timeout(90)
def test_api_key(strict):
    assert_error(strict.http.get("/v1/models"), 401, None, "Bearer")
    wrong = strict.http.get("/v1/models", headers={"authorization": "Bearer nope"})
    assert assert_error(wrong, 401, None)["code"] == "invalid_api_key"
    r = strict.http.post(COMPLETIONS, json=GOOD[COMPLETIONS], headers={"authorization": API_KEY})
    assert_error(r, 401, None)
    with pytest.raises(AuthenticationError):
        strict.client("nope").completions.create(model="tiny", prompt="Hi", max_tokens=1)
    assert [m.id for m in strict.client(API_KEY).models.list().data] == ["tiny"]
    out = strict.client(API_KEY).completions.create(model="tiny", prompt="Hi", max_tokens=2)
    assert out.usage.completion_tokens >= 1
    assert strict.http.get("/health").status_code == 200  # outside /v1: no key needed
    assert strict.http.get("/metrics").status_code == 200


@pytest.mark.timeout(90)
def test_body_over_the_limit_gets_413(strict):
    headers = {"authorization": f"Bearer {API_KEY}", "content-type": "application/json"}
    body = json.dumps({**GOOD[COMPLETIONS], "prompt": "a" * 5000}).encode()
    r = strict.http.post(COMPLETIONS, content=body, headers=headers)
    assert assert_error(r, 413, None, "4096")["code"] == "request_too_large"
    # without a content-length (chunked), the server counts as it reads
    chunked = strict.http.post(
        COMPLETIONS, content=iter([body[i : i + 1000] for i in range(0, len(body), 1000)]),
        headers=headers,
    )  # fmt: skip
    assert "content-length" not in chunked.request.headers
    assert_error(chunked, 413, None, "4096")
    small = json.dumps({**GOOD[COMPLETIONS], "prompt": "a" * 40}).encode()
    assert strict.http.post(COMPLETIONS, content=small, headers=headers).status_code == 200


# -- shutdown ----------------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_sigterm_ends_every_stream_and_exits_0():
    s = Server("--model", "tiny", "--shutdown-grace-s", "1")
    try:
        streams: list[list[str]] = [[] for _ in range(4)]
        started = [threading.Event() for _ in streams]
        failures: list[BaseException] = []

        def read(i: int) -> None:
            body = {"model": "tiny", "prompt": f"Stream {i}", "stream": True, **ENDLESS}
            if i == 0:
                body["max_tokens"] = 30  # may end before the signal
            try:
                with httpx.stream("POST", s.url + COMPLETIONS, json=body, timeout=60) as r:
                    for event in iter_sse(r):
                        streams[i].append(event)
                        started[i].set()
            except BaseException as e:
                failures.append(e)
                started[i].set()

        threads = [threading.Thread(target=read, args=(i,), daemon=True) for i in range(4)]
        for t in threads:
            t.start()
        for e in started:
            assert e.wait(timeout=30), "a stream never started"
        s.proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(timeout=30)
        assert not any(t.is_alive() for t in threads), "a stream hangs after SIGTERM"
        assert s.proc.wait(timeout=30) == 0, s.stderr
    finally:
        s.stop()
    assert not failures, failures
    for i, events in enumerate(streams):
        end = chunks_of(events)[-1]
        if i > 0 or "error" in end:  # endless streams are cut short by the shutdown
            assert end["error"]["code"] == "shutting_down", (i, end)
        else:
            assert end["choices"][-1]["finish_reason"] == "length", end
    assert "stopping (signal 15)" in s.stderr


# -- a checkpoint with a chat template ---------------------------------------------------------

BOS, EOS = "<beginning_of_sentence>", "<end_of_sentence>"
MINIMAX_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{% set header = 'system ai_setting=assistant' %}"
    "{% elif m['role'] == 'user' %}{% set header = 'user name=user' %}"
    "{% else %}{% set header = 'ai name=assistant' %}{% endif %}"
    "{{ bos_token }}{{ header }}\n{{ m['content'] }}{{ eos_token }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ bos_token }}ai name=assistant\n{% endif %}"
)
"""MiniMax's turn format (written for this test): `<beginning_of_sentence>user name=user\n
...<end_of_sentence>\n` per message, then the assistant's header."""
THINK_MESSAGES = [{"role": "user", "content": "Think first, then answer."}]
THINK_MAX_TOKENS = 24


def _byte_symbols() -> list[str]:
    """GPT-2's byte-level alphabet, in byte order (printable bytes stand for themselves)."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)}  # fmt: skip
    symbols, shifted = [], 0
    for b in range(256):
        symbols.append(chr(b) if b in printable else chr(256 + shifted))
        shifted += b not in printable
    return symbols


def write_byte_bpe(directory: Path, names: dict[int, str]) -> HFTokenizer:
    """A byte-level BPE without merges (id = byte, as the byte tokenizer) with the MiniMax
    specials as 256 (bos) and 257 (eos), ids 258..511 as added tokens named by `names`
    (default `<|fID|>`), and the MiniMax-style chat template in tokenizer_config.json."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    tok = Tokenizer(models.BPE(vocab={s: b for b, s in enumerate(_byte_symbols())}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(BOS, special=True), AddedToken(EOS, special=True)])
    tok.add_tokens([AddedToken(names.get(i, f"<|f{i}|>")) for i in range(258, 512)])
    directory.mkdir(parents=True)
    tok.save(str(directory / "tokenizer.json"))
    config = {"bos_token": BOS, "eos_token": EOS, "chat_template": MINIMAX_TEMPLATE}
    (directory / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return HFTokenizer(directory)


@dataclass
class ChatCheckpoint:
    path: Path
    engine: Engine
    """The checkpoint's model and tokenizer, offline."""


@pytest.fixture(scope="module")
def chat_checkpoint(tmp_path_factory) -> ChatCheckpoint:
    """tiny (seed 0) saved with a byte-level BPE whose tokenizer_config.json has a MiniMax-style
    chat template. One added token the model emits mid-answer for THINK_MESSAGES is named
    `</think>` (names change no prompt id, so not the answer's ids either), so that the
    reasoning parser has a real tag to split at."""
    tmp = tmp_path_factory.mktemp("chat")
    model = load_model("tiny", seed=0)
    probe = write_byte_bpe(tmp / "probe", {})
    prompt = probe.encode(ChatTemplate.for_tokenizer(probe).render(THINK_MESSAGES))
    out = Engine(model, probe).generate(prompt, SamplingParams(max_new_tokens=THINK_MAX_TOKENS))
    ids = out[0].token_ids
    think_at = next(i for i in range(2, len(ids) - 3) if ids[i] >= 258 and ids[i] not in ids[:i])
    tokenizer = write_byte_bpe(tmp / "tokenizer", {ids[think_at]: "</think>"})
    model.save_pretrained(tmp / "ckpt", tokenizer=tokenizer)
    saved = HFTokenizer(tmp / "ckpt")
    assert saved.config["chat_template"] == MINIMAX_TEMPLATE
    return ChatCheckpoint(tmp / "ckpt", Engine(model, saved))


@pytest.fixture(scope="module")
def chat_server(chat_checkpoint) -> Iterator[Server]:
    with serving("--model", str(chat_checkpoint.path), "--served-model-name", "minimax-style",
                 "--reasoning-parser", "minimax-m1") as s:  # fmt: skip
        yield s


@pytest.mark.timeout(120)
def test_checkpoint_chat_template_is_used(chat_server, chat_checkpoint):
    assert "chat template: tokenizer_config.json" in chat_server.stderr
    engine = chat_checkpoint.engine
    messages = [
        *MESSAGES[:1],
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "2+2?"},
    ]
    text = ChatTemplate.for_tokenizer(engine.tokenizer).render(messages)
    assert text.startswith(f"{BOS}system ai_setting=assistant\nBe brief.{EOS}\n")
    prompt = engine.tokenizer.encode(text)
    assert prompt.count(256) == 5 and prompt.count(257) == 4  # the specials are single ids
    out = chat_server.client().chat.completions.create(
        model="minimax-style", messages=messages, max_tokens=12, temperature=0
    )
    assert out.usage.prompt_tokens == len(prompt)
    ref = reference(engine, prompt, 12)
    message = out.choices[0].message
    got = (getattr(message, "reasoning_content", None), message.content)
    assert got == ReasoningParser().split(ref.text)
    assert out.choices[0].finish_reason == ref.finish_reason


@pytest.mark.timeout(120)
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_reasoning_parser_splits_think(chat_server, chat_checkpoint, stream):
    engine = chat_checkpoint.engine
    prompt = engine.tokenizer.encode(
        ChatTemplate.for_tokenizer(engine.tokenizer).render(THINK_MESSAGES)
    )
    ref = reference(engine, prompt, THINK_MAX_TOKENS)
    assert "</think>" in ref.text
    reasoning, content = ReasoningParser().split(ref.text)
    assert reasoning and content, (ref.text, reasoning, content)
    body = {"model": "minimax-style", "messages": THINK_MESSAGES, "temperature": 0,
            "max_tokens": THINK_MAX_TOKENS}  # fmt: skip
    if stream:
        chunks = chunks_of(post_sse(chat_server.http, CHAT, {**body, "stream": True}))
        deltas = [c["choices"][0]["delta"] for c in chunks]
        got_reasoning = "".join(d.get("reasoning_content") or "" for d in deltas)
        got_content = "".join(d.get("content") or "" for d in deltas)
        assert "</think>" not in got_reasoning + got_content
        assert chunks[-1]["choices"][0]["finish_reason"] == ref.finish_reason
    else:
        r = chat_server.http.post(CHAT, json=body)
        assert r.status_code == 200, r.text
        message = r.json()["choices"][0]["message"]
        got_reasoning, got_content = message["reasoning_content"], message["content"]
    assert (got_reasoning, got_content) == (reasoning, content)
