"""Typed config dataclasses on the command line: flags from fields, files, --print-config."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import itertools
import json
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
    """The docstring under each field of a dataclass (the string literal after it)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, nxt in itertools.pairwise(body):
        is_doc = isinstance(nxt, ast.Expr) and isinstance(getattr(nxt, "value", None), ast.Constant)
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and is_doc:
            docs[node.target.id] = str(nxt.value.value).strip()
    return docs


def add_config_args(parser: argparse.ArgumentParser, cls: type) -> None:
    """Adds --config FILE, --print-config and one flag per field of dataclass cls."""
    parser.add_argument("--config", type=Path, help="JSON or TOML file of field values")
    parser.add_argument("--print-config", action="store_true", help="print the config and exit")
    docs = field_docs(cls)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        kind = hints[f.name]
        help_ = docs.get(f.name, "")
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
