"""Formatting shared by the benchmarks: numbers or '-', target lines with pass/fail, and
the JSON + Markdown + PNG each benchmark writes."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

from lightlong.bench.worker import log


def fmt(x: float | None, spec: str) -> str:
    """x formatted, or '-' when it was not measured."""
    return "-" if x is None else format(x, spec)


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b, or None when either side is missing."""
    return a / b if a is not None and b else None


def fit_power(points: list[tuple[float, float]]) -> tuple[float, float]:
    """Least-squares fit of y = c · x^p in log-log space over (x, y) points; returns (c, p).
    A single point gives p = 1."""
    lx, ly = [math.log(x) for x, _ in points], [math.log(y) for _, y in points]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    sxx = sum((a - mx) ** 2 for a in lx)
    p = sum((a - mx) * (b - my) for a, b in zip(lx, ly, strict=True)) / sxx if sxx else 1.0
    return math.exp(my - p * mx), p


def failed_line(failed: list[dict]) -> str | None:
    """'failed (not measured): what: why; ...', or None when every point ran."""
    if not failed:
        return None
    return "failed (not measured): " + "; ".join(f"{f['what']}: {f['error']}" for f in failed)


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


RESULT_SUFFIXES = (".json", ".md", ".png")
"""The files a benchmark writes beside its stem."""


def check_overwrite(stem: Path, overwrite: bool) -> None:
    """ValueError naming stem's result files that exist, unless overwrite: a benchmark run
    calls it before measuring (so a long run is not wasted) and `write_results` again."""
    existing = [p for p in (stem.with_suffix(x) for x in RESULT_SUFFIXES) if p.exists()]
    if existing and not overwrite:
        raise ValueError(
            f"{', '.join(map(str, existing))} already exist: pass --overwrite to replace them "
            "(overwrite=True), or choose another --out-dir"
        )


def write_results(
    stem: Path,
    report: dict,
    markdown: str,
    plot: Callable[[dict, Path], None],
    overwrite: bool = False,
) -> None:
    """Writes stem.json (the report), stem.md (markdown) and stem.png (plot(report, path)),
    making stem's directory; logs where they went. Existing files are a ValueError unless
    overwrite (`check_overwrite`)."""
    check_overwrite(stem, overwrite)
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown + "\n")
    plot(report, stem.with_suffix(".png"))
    log(f"wrote {stem}.json, .md, .png")
