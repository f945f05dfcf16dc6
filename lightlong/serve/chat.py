"""Chat for `lightlong serve`: turning messages into a prompt with a Jinja chat template, and
splitting a reasoning model's output into reasoning and answer.

- `ChatTemplate` renders messages the way `transformers`' `apply_chat_template` does (a
  sandboxed Jinja environment with `raise_exception`, `strftime_now` and a `tojson` that keeps
  non-ASCII), from the tokenizer's `tokenizer_config.json`, a user's template file, or
  `DEFAULT_CHAT_TEMPLATE` for tokenizers without one (the byte tokenizer, a trained BPE).
- `ReasoningParser` splits `<think>...</think>` reasoning (MiniMax-M1) off the answer, in one
  go or delta by delta while streaming; `REASONING_PARSERS` maps `--reasoning-parser` names
  to it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, NoReturn

import jinja2
from jinja2.exceptions import SecurityError, TemplateError
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from lightlong.tokenizer import CONFIG_FILE, HFTokenizer, Tokenizer

DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
"""The template for tokenizers that ship none: plain text, readable by a byte-level model.

Each message becomes its role in `<|...|>` on a line of its own, then its content and a
newline; the generation prompt is `<|assistant|>` and a newline. For
`[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]` it renders
(with add_generation_prompt)::

    <|system|>
    Be brief.
    <|user|>
    Hi
    <|assistant|>

and the model's answer follows. A model not trained on this format may go on to write the
next `<|user|>` turn itself; `stop: ["\\n<|user|>"]` ends the answer there.
"""


class ChatTemplateError(TemplateError):
    """A chat template failed on a request's messages (its `raise_exception`, an unsafe
    access, a type error...): the request's fault, answered with 400 naming `messages`."""


def _raise_exception(message: str) -> NoReturn:
    raise ChatTemplateError(message)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


def _tojson(
    value: Any,
    indent: int | None = None,
    ensure_ascii: bool = False,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    return json.dumps(
        value, indent=indent, ensure_ascii=ensure_ascii, separators=separators, sort_keys=sort_keys
    )


class _Sandbox(ImmutableSandboxedEnvironment):
    """jinja2's immutable sandbox, except that an unsafe attribute (`''.__class__`) raises
    instead of rendering as an empty string, so a probing template gets an error."""

    def unsafe_undefined(self, obj: Any, attribute: str) -> jinja2.Undefined:
        raise SecurityError(
            f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe"
        )


def _environment() -> jinja2.Environment:
    env = _Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.filters["tojson"] = _tojson
    return env


def _token_string(tokenizer: Tokenizer, token_id: int | None) -> str:
    """The text of a special token, for templates' bos_token / eos_token. The byte tokenizer
    has no text that encodes to its eos (the string "<|endoftext|>" is bytes), so ""."""
    if token_id is None or not isinstance(tokenizer, HFTokenizer):
        return ""
    return tokenizer.tokenizer.id_to_token(token_id) or ""


def _config_template(config: Mapping[str, Any], where: str) -> str | None:
    """tokenizer_config.json's chat_template: a string, or a list of named templates (the one
    named "default" is used)."""
    template = config.get("chat_template")
    if template is None or isinstance(template, str):
        return template
    if isinstance(template, list) and all(
        isinstance(t, dict) and isinstance(t.get("template"), str) for t in template
    ):
        named = {t.get("name"): t["template"] for t in template}
        if "default" not in named:
            raise ValueError(
                f"{where}: chat_template lists templates {sorted(map(str, named))}, none "
                "named 'default'; pass one with --chat-template"
            )
        return named["default"]
    raise ValueError(
        f"{where}: chat_template must be a string or a list of {{'name', 'template'}}, "
        f"got {type(template).__name__}"
    )


_LOOPS_OVER_CONTENT = re.compile(
    r"""for\s+\w+\s+in\s+\w+\s*(\[\s*['"]content['"]\s*\]|\.content\b)"""
)


def _as_parts(message: Mapping[str, Any]) -> dict[str, Any]:
    """message with its string content as one OpenAI text part."""
    content = message.get("content")
    if not isinstance(content, str):
        return dict(message)
    return {**message, "content": [{"type": "text", "text": content}]}


class ChatTemplate:
    """A compiled chat template and the special tokens it may use.

    Args:
        template: the Jinja source.
        source: where it came from: "tokenizer_config.json", "file" or "default".
        bos_token, eos_token: the strings templates see as `bos_token` / `eos_token`.

    Raises ValueError (naming the source and line) when the template does not compile.
    """

    def __init__(
        self, template: str, *, source: str, bos_token: str = "", eos_token: str = ""
    ) -> None:
        self.template = template
        self.source = source
        """"tokenizer_config.json", "file" or "default"."""
        self.bos_token = bos_token
        self.eos_token = eos_token
        # Some templates (MiniMax-Text-01's) loop over a message's content as OpenAI parts,
        # [{"type": "text", "text": ...}]; they get it in that form, the others as a string.
        self.content_as_parts = bool(_LOOPS_OVER_CONTENT.search(template))
        try:
            self._compiled = _environment().from_string(template)
        except jinja2.TemplateSyntaxError as e:
            raise ValueError(f"chat template ({source}), line {e.lineno}: {e.message}") from None

    @classmethod
    def for_tokenizer(
        cls, tokenizer: Tokenizer, template_file: str | Path | None = None
    ) -> ChatTemplate:
        """The template to use with `tokenizer`: `template_file` when given (--chat-template),
        else the `chat_template` of its tokenizer_config.json, else `DEFAULT_CHAT_TEMPLATE`."""
        tokens = {
            "bos_token": _token_string(tokenizer, tokenizer.bos_token_id),
            "eos_token": _token_string(tokenizer, tokenizer.eos_token_id),
        }
        if template_file is not None:
            path = Path(template_file)
            try:
                text = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise ValueError(f"--chat-template {path}: cannot read it ({e})") from None
            return cls(text, source="file", **tokens)
        if isinstance(tokenizer, HFTokenizer):
            template = _config_template(tokenizer.config, str(tokenizer.path.parent / CONFIG_FILE))
            if template is not None:
                return cls(template, source="tokenizer_config.json", **tokens)
        return cls(DEFAULT_CHAT_TEMPLATE, source="default", **tokens)

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool = True,
        **kwargs: Any,
    ) -> str:
        """The prompt text for `messages`; `kwargs` (a request's chat_template_kwargs) are
        extra template variables. Raises ChatTemplateError when the template fails."""
        variables = {
            **kwargs,
            "messages": [_as_parts(m) for m in messages]
            if self.content_as_parts
            else list(messages),
            "add_generation_prompt": add_generation_prompt,
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
        }
        try:
            return self._compiled.render(variables)
        except ChatTemplateError:
            raise
        # templates fail on the data they are given: undefined names, unsafe access, "a" + 1
        except (TemplateError, TypeError, ValueError, LookupError, ArithmeticError) as e:
            raise ChatTemplateError(
                f"the chat template ({self.source}) failed: {type(e).__name__}: {e}"
            ) from None


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag`."""
    for n in range(min(len(text), len(tag) - 1), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


class ReasoningParser:
    """Splits `<think>reasoning</think>answer` (MiniMax-M1) into reasoning and answer.

    The output is reasoning up to the first `</think>`; a `<think>` at its start is dropped,
    and may be absent (when the chat template already put it in the prompt). Everything after
    `</think>` is the answer. Whitespace around the reasoning and before the answer is
    dropped. An output without `</think>` is all reasoning (a model cut off while thinking),
    so that a stream, which cannot wait for the end, and `split` always agree:
    `push`ing any cut of a text, then `finish`, gives the pieces of `split(text)`.
    """

    open_tag = "<think>"
    close_tag = "</think>"

    def __init__(self) -> None:
        self._state = "start"  # -> "reasoning" -> "content"
        self._held = ""  # text not returned yet: a tag's prefix, whitespace that may be cut
        self._begun = False  # some of the current part (reasoning or answer) was returned

    def split(self, text: str) -> tuple[str | None, str]:
        """(reasoning, answer) of a whole output; reasoning None when there is none."""
        text = text.lstrip()
        if text.startswith(self.open_tag):
            text = text[len(self.open_tag) :]
        reasoning, _, content = text.partition(self.close_tag)
        return reasoning.strip() or None, content.lstrip()

    def push(self, delta: str) -> tuple[str, str]:
        """Adds a piece of output; returns the (reasoning, answer) text it completes. Text that
        may still turn out to be a tag, or whitespace to drop, is held back."""
        if self._state == "start":
            text = (self._held + delta).lstrip()
            if self.open_tag.startswith(text) and text != self.open_tag:
                self._held = text  # "" or a prefix of <think>: wait for more
                return "", ""
            if text.startswith(self.open_tag):
                text = text[len(self.open_tag) :]
            self._state, self._held = "reasoning", ""
            return self._reasoning(text)
        if self._state == "reasoning":
            return self._reasoning(delta)
        return "", self._answer(delta)

    def _reasoning(self, delta: str) -> tuple[str, str]:
        text = self._held + delta
        if not self._begun:
            text = text.lstrip()
        reasoning, close, content = text.partition(self.close_tag)
        if close:
            self._state, self._held, self._begun = "content", "", False
            return reasoning.rstrip(), self._answer(content)
        keep = _partial_suffix(text, self.close_tag)
        out = text[: len(text) - keep].rstrip()
        self._held = text[len(out) :]
        self._begun = self._begun or bool(out)
        return out, ""

    def _answer(self, delta: str) -> str:
        if not self._begun:
            delta = delta.lstrip()
            self._begun = bool(delta)
        return delta

    def finish(self) -> tuple[str, str]:
        """Ends the output; returns the (reasoning, answer) text still held back."""
        held, self._held = self._held, ""
        return held.rstrip(), ""


REASONING_PARSERS: dict[str, Callable[[], ReasoningParser]] = {"minimax-m1": ReasoningParser}
"""`--reasoning-parser` names; each makes a fresh parser (one per choice)."""
