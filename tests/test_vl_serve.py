"""`lightlong serve` with a vision-language model (tiny-vl): chat requests with image_url
parts, answered token for token as the offline `Engine` answers the same prompt and images.

The server's `--model tiny-vl` and `load_model("tiny-vl", vision=True, seed=0)` have the same
random weights, so greedy answers must agree. Images are seeded noise, so two images give
different features, hence (checked) different log-probabilities: an answer that ignored or
swapped its images would not match the reference.
"""

from __future__ import annotations

import base64
import io
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from PIL import Image
from test_serve import (
    LOGPROB_TOL,
    Answer,
    Server,
    assert_error,
    assert_same,
    chat_answer,
    chat_stream_answers,
    chunks_of,
    post_sse,
    serving,
)

from lightlong.infer import Engine, SamplingParams
from lightlong.model.image import encode_with_images
from lightlong.model.source import load_model
from lightlong.serve.chat import ChatTemplate
from lightlong.serve.protocol import APIError, Limits, parse_chat_request
from lightlong.tokenizer import ByteTokenizer

BYTES = ByteTokenizer()
TEMPLATE = ChatTemplate.for_tokenizer(BYTES)
MODEL = "tiny-vl"
CHAT = "/v1/chat/completions"
MAX_IMAGES = 3
MAX_PIXELS = 20_000
"""The VL server's --max-image-pixels (small, so that a too-big image is a small file)."""
PREFIX_BLOCK = 32
SLOW_S = 3.0
"""How long the image host's /slow takes: three times the remote server's fetch timeout."""
MAX_BYTES = 20_000
"""The remote server's --max-image-bytes (PNGS fit, BIG does not)."""


# -- images and messages -----------------------------------------------------------------------


def noise_png(seed: int, size: tuple[int, int] = (40, 60)) -> bytes:
    """A PNG of seeded RGB noise, size (height, width)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "PNG")
    return out.getvalue()


def data_url(data: bytes, media: str = "image/png") -> str:
    return f"data:{media};base64,{base64.b64encode(data).decode()}"


def image(url: str, **extra: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url, **extra}}


def text(t: str) -> dict:
    return {"type": "text", "text": t}


PNGS = {seed: noise_png(seed, size) for seed, size in [(0, (40, 60)), (1, (50, 30)), (2, (40, 60))]}
TRUNCATED = noise_png(3)[:2000]
BIG = noise_png(4, (150, 150))  # 22,500 pixels > MAX_PIXELS; 67 KB > MAX_BYTES


def decoded(png: bytes) -> Image.Image:
    with Image.open(io.BytesIO(png)) as im:
        return im.convert("RGB")


def flatten(messages: list[dict]) -> tuple[list[dict], list[bytes]]:
    """The messages with each image part as the text "<image>" (content joined), and the
    PNGs of the image parts in order (each image_url must be a PNG data URL)."""
    flat, pngs = [], []
    for m in messages:
        content = m["content"]
        if isinstance(content, list):
            pieces = []
            for part in content:
                if part["type"] == "image_url":
                    url = part["image_url"]["url"]
                    pngs.append(base64.b64decode(url.split(",", 1)[1]))
                    pieces.append("<image>")
                else:
                    pieces.append(part["text"])
            content = "".join(pieces)
        flat.append({"role": m["role"], "content": content})
    return flat, pngs


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine(load_model(MODEL, vision=True, seed=0), BYTES)


def reference(engine: Engine, messages: list[dict], max_tokens: int) -> tuple[Answer, int]:
    """`Engine`'s greedy answer to the chat (the server's template, image parts as
    "<image>"), and the prompt's length with each image's features counted."""
    flat, pngs = flatten(messages)
    prompt = TEMPLATE.render(flat)
    images = [decoded(p) for p in pngs]
    answer = Answer()
    params = SamplingParams(max_new_tokens=max_tokens, temperature=0, logprobs=0)
    for ev in engine.stream(prompt, params, images=[images]):
        answer.text += ev.text
        answer.tokens.append(BYTES.decode([ev.token_id]))
        answer.logprobs.append(ev.logprob)
        answer.finish_reason = ev.finish_reason
    config = engine.model.config
    ids = encode_with_images(BYTES, prompt, config.image_token_id)
    length = len(ids) + sum(config.num_image_tokens(im.size[::-1]) - 1 for im in images)
    return answer, length


def differ(a: Answer, b: Answer) -> bool:
    """Different tokens, or log-probabilities apart by more than the tolerance."""
    if a.tokens != b.tokens:
        return True
    return max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs, strict=True)) > LOGPROB_TOL


def chat(server: Server, messages: list[dict], max_tokens: int = 6, **extra):
    return server.client().chat.completions.create(
        model=MODEL, messages=messages, max_tokens=max_tokens, temperature=0, logprobs=True,
        top_logprobs=0, **extra,
    )  # fmt: skip


# -- servers -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vl() -> Iterator[Server]:
    with serving("--model", MODEL, "--prefix-block", str(PREFIX_BLOCK),
                 "--max-images-per-request", str(MAX_IMAGES),
                 "--max-image-pixels", str(MAX_PIXELS)) as s:  # fmt: skip
        yield s


class _Images(BaseHTTPRequestHandler):
    """A local image host: /a.png (PNGS[0]), /big.png (BIG), /page.html, /slow (answers
    after SLOW_S), /trickle (PNGS[0] a byte at a time, each well within the fetch timeout,
    all of it over SLOW_S), /garbage (a reply that is not HTTP), redirects /to-file and
    /to-ftp, anything else 404."""

    def do_GET(self) -> None:
        if self.path == "/slow":
            time.sleep(SLOW_S)
        if self.path == "/garbage":
            self.wfile.write(b"this is not HTTP\r\n\r\n")
            return
        if self.path == "/trickle":
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.end_headers()
            for _ in range(int(SLOW_S / 0.1)):
                self.wfile.write(b"x")
                self.wfile.flush()
                time.sleep(0.1)
            return
        redirects = {"/to-file": "file:///etc/passwd", "/to-ftp": "ftp://127.0.0.1/a.png"}
        if self.path in redirects:
            self.send_response(302)
            self.send_header("Location", redirects[self.path])
            self.end_headers()
            return
        bodies = {
            "/a.png": (PNGS[0], "image/png"),
            "/big.png": (BIG, "image/png"),
            "/slow": (PNGS[0], "image/png"),
            "/page.html": (b"<html></html>", "text/html"),
        }
        if self.path not in bodies:
            self.send_error(404)
            return
        body, kind = bodies[self.path]
        self.send_response(200)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def image_host() -> Iterator[str]:
    host = ThreadingHTTPServer(("127.0.0.1", 0), _Images)
    thread = threading.Thread(target=host.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{host.server_address[1]}"
    host.shutdown()
    host.server_close()


# -- answers -----------------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_chat_with_one_image_equals_engine(vl, engine):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [image(data_url(PNGS[0])), text("What is this?")]},
    ]
    out = chat(vl, messages)
    ref, length = reference(engine, messages, 6)
    assert_same(chat_answer(out.choices[0]), ref, "one image")
    assert out.usage.prompt_tokens == length > len(TEMPLATE.render(flatten(messages)[0]))
    # another image in its place changes the answer: the image is not ignored
    other = [messages[0], {"role": "user", "content": [image(data_url(PNGS[1])),
                                                        text("What is this?")]}]  # fmt: skip
    assert differ(reference(engine, other, 6)[0], ref)


@pytest.mark.timeout(120)
def test_chat_with_images_across_messages_equals_engine_in_order(vl, engine):
    a, b = data_url(PNGS[0]), data_url(PNGS[1])
    messages = [
        {"role": "user", "content": [text("First "), image(a, detail="low"), text(" then")]},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": [text("and "), image(b, detail="high"), text("?")]},
    ]
    out = chat(vl, messages)
    ref, length = reference(engine, messages, 6)
    assert_same(chat_answer(out.choices[0]), ref, "two images")
    assert out.usage.prompt_tokens == length
    swapped = [
        {**messages[0], "content": [text("First "), image(b), text(" then")]},
        messages[1],
        {**messages[2], "content": [text("and "), image(a), text("?")]},
    ]
    out_swapped = chat(vl, swapped)
    ref_swapped, _ = reference(engine, swapped, 6)
    assert_same(chat_answer(out_swapped.choices[0]), ref_swapped, "swapped")
    assert differ(ref, ref_swapped)  # the order of the images matters


@pytest.mark.timeout(120)
def test_streamed_chat_with_an_image_equals_engine(vl, engine):
    messages = [{"role": "user", "content": [text("Look: "), image(data_url(PNGS[1]))]}]
    body = dict(model=MODEL, messages=messages, max_tokens=5, temperature=0, logprobs=True,
                top_logprobs=0, stream=True, stream_options={"include_usage": True})  # fmt: skip
    chunks = chunks_of(post_sse(vl.http, CHAT, body))
    ref, length = reference(engine, messages, 5)
    assert_same(chat_stream_answers(chunks)[0], ref, "stream")
    assert chunks[-1]["usage"]["prompt_tokens"] == length


@pytest.mark.timeout(120)
def test_prefix_cache_keys_on_the_image(vl, engine):
    """A repeated image prompt restores its snapshot; the same text with another image at
    the same place restores nothing past that image (here: nothing, the only snapshot
    being past it), and answers for its own image."""
    intro = "You describe pictures. " * 3  # the image starts after a whole prefix block
    question = [text("Describe it in detail, please, in a few words.")]

    def messages(seed: int) -> list[dict]:
        content = [image(data_url(PNGS[seed])), *question]
        return [{"role": "system", "content": intro}, {"role": "user", "content": content}]

    first = chat(vl, messages(0))
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    hits = vl.metric("lightlong_prefix_cache_hits_total")
    again = chat(vl, messages(0))
    cached = again.usage.prompt_tokens_details.cached_tokens
    length = again.usage.prompt_tokens
    assert cached > 0 and cached % PREFIX_BLOCK == 0 and length - cached <= PREFIX_BLOCK
    assert vl.metric("lightlong_prefix_cache_hits_total") == hits + 1
    ref, _ = reference(engine, messages(0), 6)
    assert_same(chat_answer(again.choices[0]), ref, "cache hit")
    assert_same(chat_answer(first.choices[0]), ref, "first")

    # PNGS[2] has PNGS[0]'s size: the same prompt, token for token, but other pixels
    other = chat(vl, messages(2))
    assert other.usage.prompt_tokens == length
    assert other.usage.prompt_tokens_details.cached_tokens == 0
    ref_other, _ = reference(engine, messages(2), 6)
    assert_same(chat_answer(other.choices[0]), ref_other, "other image")
    assert differ(ref, ref_other)


@pytest.mark.timeout(60)
def test_completions_stay_text_only(vl):
    r = vl.http.post("/v1/completions", json={"model": MODEL, "prompt": "<image> hi",
                                              "max_tokens": 2})  # fmt: skip
    assert r.status_code == 200, r.text  # "<image>" is plain text here
    image_token = 257
    r = vl.http.post("/v1/completions", json={"model": MODEL, "prompt": [1, image_token, 2],
                                              "max_tokens": 2})  # fmt: skip
    assert_error(r, 400, "prompt", "<image>")


# -- remote images -----------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_remote_images_are_refused_without_the_flag(vl, image_host):
    for url in (f"{image_host}/a.png", "https://example.com/cat.png"):
        messages = [{"role": "user", "content": [image(url), text("hi")]}]
        r = vl.http.post(CHAT, json={"model": MODEL, "messages": messages, "max_tokens": 2})
        assert_error(r, 400, "messages[0].content[0].image_url", "--allow-remote-images")


@pytest.mark.timeout(120)
def test_remote_images_with_the_flag(image_host, engine):
    def ask(s: Server, url: str):
        messages = [{"role": "user", "content": [text("x "), image(url)]}]
        return s.http.post(CHAT, json={"model": MODEL, "messages": messages, "max_tokens": 4,
                                       "temperature": 0})  # fmt: skip

    with serving("--model", MODEL, "--allow-remote-images", "--remote-image-timeout-s",
                 str(SLOW_S / 3), "--max-image-bytes", str(MAX_BYTES)) as s:  # fmt: skip
        fetched = ask(s, f"{image_host}/a.png")
        inline = ask(s, data_url(PNGS[0]))
        assert fetched.status_code == inline.status_code == 200, fetched.text
        assert fetched.json()["choices"] == inline.json()["choices"]
        assert fetched.json()["usage"] == inline.json()["usage"]
        param = "messages[0].content[1].image_url"
        assert_error(ask(s, f"{image_host}/missing.png"), 400, param, "HTTP 404")
        assert_error(ask(s, f"{image_host}/page.html"), 400, param, "not an image")
        assert_error(ask(s, f"{image_host}/to-file"), 400, param, "file:///etc/passwd")
        assert_error(ask(s, f"{image_host}/to-ftp"), 400, param, "redirects to a ftp: URL")
        assert_error(ask(s, "file:///etc/passwd"), 400, param, "http(s)")
        assert_error(ask(s, f"{image_host}/slow"), 400, param, "timed out")
        assert_error(ask(s, f"{image_host}/trickle"), 400, param, "timed out")
        assert_error(ask(s, f"{image_host}/garbage"), 400, param, "fetching the image failed")
        over = f"more than the limit of {MAX_BYTES}"
        assert_error(ask(s, f"{image_host}/big.png"), 400, param, over)
        assert_error(ask(s, data_url(BIG)), 400, param, over)
        assert s.http.get("/health").status_code == 200


# -- bad requests ------------------------------------------------------------------------------

P0 = "messages[0].content[0].image_url"
# (id, content of the one user message, param, message part)
BAD_IMAGES = [
    ("bad-base64", [image("data:image/png;base64,@@@not*base64")], P0, "base64"),
    ("text-data-url", [image("data:text/plain;base64,aGVsbG8=")], P0, "not an image"),
    ("not-base64-url", [image("data:image/png,rawdata")], P0, "base64"),
    ("not-an-image", [image(data_url(b"hello, not a png"))], P0, "not an image"),
    ("truncated-png", [image(data_url(TRUNCATED))], P0, "truncated"),
    ("too-many-pixels", [image(data_url(BIG))], P0, f"limit of {MAX_PIXELS}"),
    ("file-url", [image("file:///etc/passwd")], P0, "data:image"),
    ("no-scheme", [image("cat.png")], P0, "data:image"),
    ("no-url", [{"type": "image_url", "image_url": {}}], P0, "url"),
    (
        "url-not-object",
        [{"type": "image_url", "image_url": "data:image/png;base64,AA"}],
        P0,
        "object",
    ),
    ("bad-detail", [image(data_url(PNGS[0]), detail="max")], P0 + ".detail", "got 'max'"),
    (
        "second-part",
        [text("a"), image("data:image/png;base64,AAAA")],
        "messages[0].content[1].image_url",
        "not an image",
    ),
    (
        "more-placeholders",
        [text("<image> and "), image(data_url(PNGS[0]))],
        "messages",
        "holds 2 '<image>' but the messages have 1 image",
    ),
    (
        "placeholder-no-image",
        [text("<image> what?")],
        "messages",
        "holds 1 '<image>' but the messages have 0 images",
    ),
    (
        "too-many-images",
        [image(data_url(PNGS[0]))] * (MAX_IMAGES + 1),
        f"messages[0].content[{MAX_IMAGES}].image_url",
        f"{MAX_IMAGES} allowed",
    ),
    ("unknown-part", [{"type": "input_audio"}], "messages[0].content", "input_audio"),
]


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("content", "param", "message"),
    [case[1:] for case in BAD_IMAGES], ids=[case[0] for case in BAD_IMAGES],
)  # fmt: skip
def test_bad_image_gets_400_naming_the_part(vl, content, param, message):
    messages = [{"role": "user", "content": content}]
    r = vl.http.post(CHAT, json={"model": MODEL, "messages": messages, "max_tokens": 2})
    error = assert_error(r, 400, param, message)
    assert error["type"] == "invalid_request_error"


@pytest.mark.timeout(120)
def test_bad_image_in_a_later_message_is_named_and_the_server_still_answers(vl, engine):
    messages = [
        {"role": "user", "content": [image(data_url(PNGS[0])), text("hi")]},
        {"role": "user", "content": [text("and"), image(data_url(TRUNCATED))]},
    ]
    r = vl.http.post(CHAT, json={"model": MODEL, "messages": messages, "max_tokens": 2})
    assert_error(r, 400, "messages[1].content[1].image_url", "truncated")
    good = [{"role": "user", "content": [image(data_url(PNGS[1])), text("hi")]}]
    assert_same(chat_answer(chat(vl, good).choices[0]), reference(engine, good, 6)[0], "after")
    assert vl.http.get("/health").status_code == 200


@pytest.mark.timeout(90)
def test_text_only_model_refuses_images():
    with serving("--model", "tiny", "--prefix-cache-bytes", "0") as s:
        messages = [{"role": "user", "content": [text("hi"), image(data_url(PNGS[0]))]}]
        r = s.http.post(CHAT, json={"model": "tiny", "messages": messages, "max_tokens": 2})
        assert_error(r, 400, "messages[0].content", "takes no images")
        ok = [{"role": "user", "content": [text("<image> is just text here")]}]
        r = s.http.post(CHAT, json={"model": "tiny", "messages": ok, "max_tokens": 2})
        assert r.status_code == 200, r.text


# -- parsing -----------------------------------------------------------------------------------


def test_image_parts_become_placeholders_in_order():
    limits = Limits(max_n=4, max_tokens=16, vocab_size=512, max_images=4)
    body = {
        "model": MODEL,
        "messages": [
            {
                "role": "user",
                "content": [text("a"), image("data:x1"), text("b"), image("data:x2", detail="low")],
            },
            {"role": "assistant", "content": "c"},
            {"role": "user", "content": [image("https://h/x3")]},
        ],
    }
    req = parse_chat_request(body, limits=limits)
    assert [m["content"] for m in req.messages] == ["a<image>b<image>", "c", "<image>"]
    assert [(p.url, p.detail, p.param) for p in req.images] == [
        ("data:x1", "auto", "messages[0].content[1].image_url"),
        ("data:x2", "low", "messages[0].content[3].image_url"),
        ("https://h/x3", "auto", "messages[2].content[0].image_url"),
    ]
    text_only = Limits(max_n=4, max_tokens=16, vocab_size=512)
    with pytest.raises(APIError) as e:
        parse_chat_request(body, limits=text_only)
    assert e.value.param == "messages[0].content" and "takes no images" in e.value.message


@pytest.mark.timeout(120)
@pytest.mark.parametrize("role", ["system", "assistant"])
def test_images_only_in_user_messages(vl, role):
    messages = [
        {"role": role, "content": [text("see "), image(data_url(PNGS[0]))]},
        {"role": "user", "content": "hi"},
    ]
    r = vl.http.post(CHAT, json={"model": MODEL, "messages": messages, "max_tokens": 2})
    assert_error(r, 400, "messages[0].content[1]", f"an image in a '{role}' message")
