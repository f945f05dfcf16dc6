"""Formatting shared by the benchmarks: numbers or '-', target lines with pass/fail, and
the JSON + Markdown + PNG each benchmark writes."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from lightlong.bench.worker import log


def fmt(x: float | None, spec: str) -> str:
    """x formatted, or '-' when it was not measured."""
    return "-" if x is None else format(x, spec)


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b, or None when either side is missing."""
    return a / b if a is not None and b else None


def target(value: float | None, op: str, bound: float, label: str, spec: str = ".2f") -> dict:
    """A target as stored in the JSON: its value, the bound, and whether it was met."""
    met = None if value is None else (value >= bound if op == ">=" else value <= bound)
    return {"label": label, "value": value, "op": op, "bound": bound, "met": met, "spec": spec}


def targets_line(targets: dict[str, dict]) -> str:
    """'targets: label = value (op bound, met|MISSED); ...'."""
    parts = []
    for t in targets.values():
        verdict = {True: "met", False: "MISSED", None: "not measured"}[t["met"]]
        parts.append(
            f"{t['label']} = {fmt(t['value'], t['spec'])} ({t['op']} {t['bound']:g}, {verdict})"
        )
    return "targets: " + "; ".join(parts)


def write_results(
    stem: Path, report: dict, markdown: str, plot: Callable[[dict, Path], None]
) -> None:
    """Writes stem.json (the report), stem.md (markdown) and stem.png (plot(report, path)),
    making stem's directory; logs where they went."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown + "\n")
    plot(report, stem.with_suffix(".png"))
    log(f"wrote {stem}.json, .md, .png")
