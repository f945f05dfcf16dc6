"""Formatting shared by the benchmarks: numbers or '-', and target lines with pass/fail."""

from __future__ import annotations


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
