"""Chat templates (default, tokenizer_config.json, file; the sandbox; errors) and the
MiniMax-M1 reasoning parser, streamed across every delta boundary."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from lightlong.serve.chat import (
    DEFAULT_CHAT_TEMPLATE,
    REASONING_PARSERS,
    ChatTemplate,
    ChatTemplateError,
    ReasoningParser,
)
from lightlong.tokenizer import CONFIG_FILE, ByteTokenizer, HFTokenizer, load_tokenizer

MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "2+2?"},
]

# A template in the style of MiniMax-Text-01 / M1 (written for this test): each turn is
# <beginning_of_sentence>{role header}\n{content}<end_of_sentence>\n, and the prompt for the
# answer is the ai header.
MINIMAX_STYLE = (
    "{{ bos_token }}"
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{% set header = 'system ai_setting=assistant' %}"
    "{% elif m['role'] == 'user' %}{% set header = 'user name=user' %}"
    "{% elif m['role'] == 'assistant' %}{% set header = 'ai name=assistant' %}"
    "{% else %}{{ raise_exception('unsupported role ' + m['role']) }}{% endif %}"
    "<beginning_of_sentence>{{ header }}\n{{ m['content'] }}<end_of_sentence>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<beginning_of_sentence>ai name=assistant\n"
    "{% if think %}<think>\n{% endif %}{% endif %}"
)


def write_tokenizer(directory: Path, config: dict) -> HFTokenizer:
    """A tiny word-level tokenizer.json plus `config` as tokenizer_config.json."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<beginning_of_sentence>": 1, "<end_of_sentence>": 2, "hi": 3}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    (directory / CONFIG_FILE).write_text(json.dumps(config), encoding="utf-8")
    tokenizer = load_tokenizer(directory)
    assert isinstance(tokenizer, HFTokenizer)
    return tokenizer


SPECIALS = {"bos_token": "<beginning_of_sentence>", "eos_token": "<end_of_sentence>"}


def test_default_template_output():
    template = ChatTemplate.for_tokenizer(ByteTokenizer())
    assert (template.source, template.template) == ("default", DEFAULT_CHAT_TEMPLATE)
    assert template.render(MESSAGES) == (
        "<|system|>\nBe brief.\n<|user|>\nHi\n<|assistant|>\nHello!\n<|user|>\n2+2?\n"
        "<|assistant|>\n"
    )
    assert template.render(MESSAGES[:2], add_generation_prompt=False) == (
        "<|system|>\nBe brief.\n<|user|>\nHi\n"
    )
    # the byte tokenizer has no text that encodes to its eos
    assert (template.bos_token, template.eos_token) == ("", "")


def test_tokenizer_without_template_gets_default(tmp_path):
    tokenizer = write_tokenizer(tmp_path, SPECIALS)
    template = ChatTemplate.for_tokenizer(tokenizer)
    assert template.source == "default"
    assert (template.bos_token, template.eos_token) == (
        "<beginning_of_sentence>",
        "<end_of_sentence>",
    )


@pytest.mark.parametrize(
    "chat_template",
    [
        MINIMAX_STYLE,
        [{"name": "tool_use", "template": "TOOLS"}, {"name": "default", "template": MINIMAX_STYLE}],
    ],
    ids=["string", "named-list"],
)
def test_tokenizer_config_template_is_used(tmp_path, chat_template):
    tokenizer = write_tokenizer(tmp_path, {**SPECIALS, "chat_template": chat_template})
    template = ChatTemplate.for_tokenizer(tokenizer)
    assert template.source == "tokenizer_config.json"
    assert template.render(MESSAGES[:2], think=True) == (
        "<beginning_of_sentence>"
        "<beginning_of_sentence>system ai_setting=assistant\nBe brief.<end_of_sentence>\n"
        "<beginning_of_sentence>user name=user\nHi<end_of_sentence>\n"
        "<beginning_of_sentence>ai name=assistant\n<think>\n"
    )
    # chat_template_kwargs reach the template; a variable not given is undefined (false)
    assert template.render(MESSAGES[1:2]).endswith("ai name=assistant\n")
    with pytest.raises(ChatTemplateError, match="unsupported role tool"):
        template.render([{"role": "tool", "content": "42"}])


@pytest.mark.parametrize(
    "chat_template, match",
    [
        ([{"name": "rag", "template": "x"}], r"\['rag'\], none named 'default'"),
        (5, "must be a string or a list"),
        ([{"name": "default"}], "must be a string or a list"),
    ],
    ids=["no-default", "number", "no-template-key"],
)
def test_bad_config_template_names_the_file(tmp_path, chat_template, match):
    tokenizer = write_tokenizer(tmp_path, {"chat_template": chat_template})
    with pytest.raises(ValueError, match=match) as info:
        ChatTemplate.for_tokenizer(tokenizer)
    assert str(tmp_path / CONFIG_FILE) in str(info.value)


def test_template_file_wins(tmp_path):
    tokenizer = write_tokenizer(tmp_path / "tok", {**SPECIALS, "chat_template": MINIMAX_STYLE})
    file = tmp_path / "chat.jinja"
    file.write_text("{{ eos_token }}{% for m in messages %}[{{ m.content }}]{% endfor %}")
    template = ChatTemplate.for_tokenizer(tokenizer, file)
    assert template.source == "file"
    assert template.render(MESSAGES[:2]) == "<end_of_sentence>[Be brief.][Hi]"
    with pytest.raises(ValueError, match="cannot read"):
        ChatTemplate.for_tokenizer(tokenizer, tmp_path / "missing.jinja")


def test_syntax_error_names_source_and_line():
    with pytest.raises(ValueError, match=r"chat template \(file\), line 2"):
        ChatTemplate("ok\n{% for m in messages %}", source="file")


def test_globals_and_tojson():
    template = ChatTemplate(
        "{{ messages | tojson }}|{{ {'b': 1, 'a': 'é'} | tojson(indent=1, sort_keys=true) }}"
        "|{{ strftime_now('%Y') | length }}",
        source="file",
    )
    out = template.render([{"role": "user", "content": "日本"}])
    assert out == '[{"role": "user", "content": "日本"}]|{\n "a": "é",\n "b": 1\n}|4'


@pytest.mark.parametrize(
    "source",
    [
        "{{ ''.__class__ }}",
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ messages.__class__ }}",
        "{% for c in ().__class__.__base__.__subclasses__() %}{{ c }}{% endfor %}",
        "{{ messages.append(1) }}",
    ],
)
def test_sandbox_blocks_python_internals(source):
    template = ChatTemplate(source, source="file")
    with pytest.raises(ChatTemplateError, match=r"unsafe|SecurityError") as info:
        template.render(MESSAGES)
    assert "<class" not in str(info.value)


@pytest.mark.parametrize(
    "source, match",
    [
        ("{{ raise_exception('only user and assistant roles') }}", "only user and assistant"),
        ("{{ messages[0]['content'] + 1 }}", "TypeError"),
        ("{{ 1 // 0 }}", "ZeroDivisionError"),
        ("{{ missing.attr }}", "UndefinedError"),
    ],
)
def test_template_failures_are_chat_template_errors(source, match):
    with pytest.raises(ChatTemplateError, match=match):
        ChatTemplate(source, source="file").render(MESSAGES)


def test_request_fields_win_over_kwargs():
    template = ChatTemplate(
        "{{ bos_token }}{{ x }}{{ add_generation_prompt }}", source="file", bos_token="<s>"
    )
    assert template.render(MESSAGES, add_generation_prompt=False, x=7) == "<s>7False"


# -- reasoning parser -------------------------------------------------------------------------

OUTPUTS = {
    "tags": "<think>\nLet me add: 2+2=4.\n</think>\n\nThe answer is 4.",
    "no-open-tag": "  Add them.  \n</think>4",
    "empty-reasoning": "<think></think>Just 4.",
    "only-spaces-reasoning": "<think> \n </think> \n4",
    "cut-off-while-thinking": "<think>\nStill thinking </thi",
    "cut-off-no-tag": "still thinking",
    "cut-off-trailing-space": "<think>still thinking \n",
    "tag-prefix-only": "<thi",
    "lookalike-tags": "<thinking>x</thin k></think>a</think><think>b",
    "close-split-by-lt": "a<</think>b",
    "leading-space-open": " \n<think>r</think>c",
    "empty": "",
    "close-first": "</think>answer",
    "unicode": "<think>日本語 ✓</think>\n答え 😀",
}

SPLITS = {
    "tags": ("Let me add: 2+2=4.", "The answer is 4."),
    "no-open-tag": ("Add them.", "4"),
    "empty-reasoning": (None, "Just 4."),
    "only-spaces-reasoning": (None, "4"),
    "cut-off-while-thinking": ("Still thinking </thi", ""),
    "cut-off-no-tag": ("still thinking", ""),
    "cut-off-trailing-space": ("still thinking", ""),
    "tag-prefix-only": ("<thi", ""),
    "lookalike-tags": ("<thinking>x</thin k>", "a</think><think>b"),
    "close-split-by-lt": ("a<", "b"),
    "leading-space-open": ("r", "c"),
    "empty": (None, ""),
    "close-first": (None, "answer"),
    "unicode": ("日本語 ✓", "答え 😀"),
}


@pytest.mark.parametrize("name", OUTPUTS)
def test_reasoning_split(name):
    assert ReasoningParser().split(OUTPUTS[name]) == SPLITS[name]


def stream(text: str, cuts: list[int]) -> tuple[str, str]:
    parser = REASONING_PARSERS["minimax-m1"]()
    reasoning, content = [], []
    for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True):
        r, c = parser.push(text[a:b])
        reasoning.append(r)
        content.append(c)
    r, c = parser.finish()
    return "".join([*reasoning, r]), "".join([*content, c])


@pytest.mark.parametrize("name", OUTPUTS)
def test_reasoning_stream_matches_split(name):
    text = OUTPUTS[name]
    reasoning, content = ReasoningParser().split(text)
    expected = (reasoning or "", content)
    # every single cut, one character at a time, and random chunkings
    for i in range(len(text) + 1):
        assert stream(text, [i]) == expected, f"cut at {i}"
    assert stream(text, list(range(1, len(text)))) == expected
    rng = random.Random(0)
    for _ in range(50):
        k = rng.randint(0, len(text))
        assert stream(text, sorted(rng.sample(range(len(text) + 1), k))) == expected


def test_reasoning_stream_holds_back_only_what_may_be_a_tag():
    parser = ReasoningParser()
    assert parser.push("<thi") == ("", "")  # may become <think>
    assert parser.push("nk>abc </") == ("abc", "")  # " </" may start </think>
    assert parser.push("b>") == (" </b>", "")
    assert parser.push("</think>\n") == ("", "")
    assert parser.push("\nAns") == ("", "Ans")
    assert parser.push("wer </think>") == ("", "wer </think>")
    assert parser.finish() == ("", "")


def test_templates_that_loop_over_content_get_text_parts():
    """MiniMax-Text-01's template iterates message['content'] as OpenAI parts; a string
    content would render character by character (or not at all)."""
    parts = ChatTemplate(
        "{% for m in messages %}{{ m['role'] }}:"
        "{% for c in m['content'] %}[{{ c['text'] }}]{% endfor %};{% endfor %}",
        source="file",
    )
    plain = ChatTemplate("{% for m in messages %}{{ m.role }}:[{{ m.content }}];{% endfor %}",
                         source="file")  # fmt: skip
    messages = [{"role": "user", "content": "hello"}]
    assert parts.content_as_parts and not plain.content_as_parts
    assert parts.render(messages, add_generation_prompt=False) == "user:[hello];"
    assert plain.render(messages, add_generation_prompt=False) == "user:[hello];"
