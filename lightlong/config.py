"""Typed config dataclasses on the command line: flags from fields, files, --print-config."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import itertools
import json
import re
import textwrap
import typing
from pathlib import Path
from typing import Any, TypeVar

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

C = TypeVar("C")


def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of a dataclass (the string literal after it), its
    dataclass bases' fields included (a subclass's own docstring wins)."""
    docs = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        body = ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0].body
        for node, nxt in itertools.pairwise(body):
            value = getattr(nxt, "value", None)
            is_doc = isinstance(nxt, ast.Expr) and isinstance(value, ast.Constant)
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and is_doc:
                docs[node.target.id] = str(value.value).strip()
    return docs


def field_default(f: dataclasses.Field) -> Any:
    """A dataclass field's default value (its default_factory called)."""
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def show_default(value: Any) -> str:
    """A default as help text shows it: a list as its items are typed after the flag (or
    'empty'), '' for the empty string."""
    if isinstance(value, list):
        return " ".join(map(str, value)) or "empty"
    return "''" if value == "" else str(value)


def with_default(help_: str, value: Any) -> str:
    """help_ followed by "(default: value)", unless it already says "default:"."""
    if re.search(r"\bdefault:", help_, re.IGNORECASE):
        return help_
    shown = show_default(value).replace("%", "%%")  # argparse %-formats help strings
    return f"{help_} (default: {shown})".strip()


def fields_help(cls: type, prefix: str = "") -> str:
    """Every field of dataclass cls with its type, default and docstring, for an epilog; a
    field that is itself a dataclass lists its fields as `field.name`."""
    docs = field_docs(cls)
    hints = typing.get_type_hints(cls)
    lines = []
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        doc = " ".join(docs.get(f.name, "").split())
        if dataclasses.is_dataclass(kind):
            lines.append(fields_help(kind, prefix=f"{prefix}{f.name}."))
            continue
        name = getattr(kind, "__name__", None) if typing.get_origin(kind) is None else None
        lines.append(
            f"  {prefix}{f.name} ({name or kind}, default {show_default(field_default(f))})"
        )
        lines.append(textwrap.fill(doc, width=88, initial_indent=" " * 6,
                                   subsequent_indent=" " * 6))  # fmt: skip
    return "\n".join(line for line in lines if line)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions and epilogs as written; an option's help ends with its default unless it
    says it already or there is none to show (None, False, [])."""

    def _get_help_string(self, action: argparse.Action) -> str:
        d = action.default
        if not action.option_strings or d is None or d is False or d is argparse.SUPPRESS:
            return action.help or ""
        if isinstance(d, list) and not d:
            return action.help or ""
        return with_default(action.help or "", d)


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser with HelpFormatter, for it and its subcommands' parsers."""

    def __init__(self, *args: Any, formatter_class: type = HelpFormatter, **kwargs: Any):
        super().__init__(*args, formatter_class=formatter_class, **kwargs)


def add_config_args(parser: argparse.ArgumentParser, cls: type) -> None:
    """Adds --config FILE, --print-config and one flag per field of dataclass cls, each
    with its docstring and default as help."""
    parser.add_argument("--config", type=Path, help="JSON or TOML file of field values")
    parser.add_argument("--print-config", action="store_true", help="print the config and exit")
    docs = field_docs(cls)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        kind = hints[f.name]
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        if len(args) == 1 and type(None) in typing.get_args(kind):  # X | None: a flag of X
            kind = args[0]
        # the flag's own default stays None: only flags given override --config
        help_ = with_default(docs.get(f.name, "").replace("%", "%%"), field_default(f))
        if kind is bool:
            parser.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=None, help=help_
            )
        elif typing.get_origin(kind) is list:
            (item,) = typing.get_args(kind)
            parser.add_argument(flag, type=item, nargs="+", default=None, help=help_)
        else:
            parser.add_argument(flag, type=kind, default=None, help=help_)


def config_from_args(cls: type[C], args: argparse.Namespace) -> C:
    """Builds cls from --config (if given) overridden by the flags set on the command line."""
    values: dict[str, Any] = {}
    if args.config is not None:
        text = args.config.read_text()
        try:
            values = tomllib.loads(text) if args.config.suffix == ".toml" else json.loads(text)
        except (json.JSONDecodeError, tomllib.TOMLDecodeError) as e:
            raise ValueError(f"--config {args.config}: not valid JSON/TOML: {e}") from None
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(
                f"--config {args.config}: unknown keys {unknown}; valid: {sorted(names)}"
            )
    for f in dataclasses.fields(cls):
        value = getattr(args, f.name, None)
        if value is not None:
            values[f.name] = value
    return cls(**values)
