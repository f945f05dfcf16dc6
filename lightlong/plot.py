"""The plots' shared style: plain-number ticks, human units on log axes (1K, 4K, 1M), lines
told apart by marker and dash as well as colour, and nothing clipped at the edges."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from matplotlib.ticker import LogFormatter, LogFormatterSciNotation, ScalarFormatter

from lightlong import units

MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
DASHES = ("-", "--", "-.", ":")
HATCHES = ("", "//", "..", "xx", "\\\\", "oo", "++", "--")


class _HumanLog(LogFormatterSciNotation):
    """Labels the log-axis ticks matplotlib would label, with `label(x)` as the text."""

    def __init__(self, label: Callable[[float], str], **kw):
        super().__init__(**kw)
        self.label = label

    def __call__(self, x, pos=None):
        return self.label(x) if super().__call__(x, pos) else ""


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def series(i: int, dense: bool = False) -> dict:
    """`plot` keywords of the i-th line: colour, marker and dash all change with i, so lines
    that overlap stay distinguishable without colour. dense: a marker on about every tenth
    of the line rather than on every point (training curves)."""
    style = {"color": f"C{i % 10}", "marker": MARKERS[i % len(MARKERS)],
             "linestyle": DASHES[i % len(DASHES)]}  # fmt: skip
    if dense:
        style.update(markevery=0.1, markersize=4)
    return style


def bars(i: int) -> dict:
    """`bar` keywords of the i-th group: colour and hatching change with i."""
    return {"color": f"C{i % 10}", "hatch": HATCHES[i % len(HATCHES)], "edgecolor": "white"}


def predicted(ax, x: float, y: float, color: str, label: str) -> None:
    """One predicted, not measured, point: a hollow marker, no line to it (a fit drawn past
    the measured range reads as data), "predicted" beside it and in its legend label."""
    ax.plot([x], [y], linestyle="none", marker="o", markersize=8, markerfacecolor="none",
            markeredgecolor=color, label=f"{label} (predicted)")  # fmt: skip
    ax.annotate("predicted", (x, y), textcoords="offset points", xytext=(6, -3), fontsize=7,
                color=color)  # fmt: skip


def tidy(*axes) -> None:
    """Plain tick labels on every axis of `axes`: no offset or scientific notation on linear
    axes; on log axes, lengths in binary units (base 2: 1K, 4K, 1M) and other numbers in
    decimal ones (base 10: 0.001, 10K). Labels set by hand are kept. Call after plotting,
    when the scales are set."""
    for ax in axes:
        for axis in (ax.xaxis, ax.yaxis):
            scale = axis.get_scale()
            if scale == "linear" and isinstance(axis.get_major_formatter(), ScalarFormatter):
                plain = ScalarFormatter(useOffset=False)
                plain.set_scientific(False)
                axis.set_major_formatter(plain)
            elif scale == "log" and isinstance(axis.get_major_formatter(), LogFormatter):
                base = axis.get_transform().base
                label = units.length if base == 2 else units.count
                axis.set_major_formatter(_HumanLog(label, base=base))
                axis.set_minor_formatter(_HumanLog(label, base=base, labelOnlyBase=False))


def save(fig, path: str | Path, dpi: int = 110) -> None:
    """Lays the figure out so that no label is cut off, writes it and frees it."""
    fig.tight_layout()
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    pyplot().close(fig)
