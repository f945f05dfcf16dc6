"""The plots' shared style (lightlong/plot.py): tick labels, line looks, titles, layout."""

from __future__ import annotations

import json

import pytest

from lightlong import plot
from lightlong.train.loop import plot_metrics


def _labels(axis) -> list[str]:
    axis.figure.canvas.draw()
    return [t.get_text() for t in axis.get_ticklabels() if t.get_text()]


@pytest.fixture
def ax():
    fig, ax = plot.pyplot().subplots()
    yield ax
    plot.pyplot().close(fig)


def test_log2_lengths_in_binary_units_and_log10_values_plain(ax):
    T = [2**k for k in range(10, 21)]
    ax.plot(T, [t * 1e-6 for t in T])
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    plot.tidy(ax)
    xs, ys = _labels(ax.xaxis), _labels(ax.yaxis)
    assert {"1K", "4K", "1M"} <= set(xs), xs
    assert {"0.001", "0.01", "0.1", "1"} <= set(ys), ys
    assert not any("^" in s or "e" in s for s in xs + ys), xs + ys


def test_linear_axes_have_no_offset_or_exponent(ax):
    ax.plot([0, 1000], [1.0001e-3, 1.0009e-3])
    plot.tidy(ax)
    assert "0.0010" in " ".join(_labels(ax.yaxis))
    assert ax.yaxis.get_offset_text().get_text() == ""


def test_series_differ_without_colour():
    looks = [plot.series(i) for i in range(8)]
    assert len({(s["marker"], s["linestyle"]) for s in looks}) == 8
    assert len({s["hatch"] for s in (plot.bars(i) for i in range(8))}) == 8


def test_training_plot_names_the_run_and_its_last_step(tmp_path, monkeypatch):
    run = tmp_path / "my-run"
    run.mkdir()
    rows = [{"step": s, "loss": 3.0 / s} for s in range(10, 130, 10)]
    rows[-1]["eval_loss"] = 0.05
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    saved = []
    monkeypatch.setattr(plot, "save", lambda fig, path, dpi=110: saved.append(fig))
    plot_metrics(run / "metrics.jsonl", run / "loss.png")
    (fig,) = saved
    ax = fig.axes[0]
    assert ax.get_title() == "my-run — step 120"
    train, held_out = ax.get_lines()
    assert (train.get_marker(), train.get_linestyle()) != (
        held_out.get_marker(),
        held_out.get_linestyle(),
    )
    plot.pyplot().close(fig)


def test_saved_figure_keeps_what_sticks_out(tmp_path):
    """A title wider than the figure widens the image rather than being cut off."""
    import matplotlib.image

    fig, ax = plot.pyplot().subplots(figsize=(2, 2))
    ax.set_title("a title much wider than its figure " * 3)
    plot.save(fig, tmp_path / "x.png", dpi=50)
    height, width = matplotlib.image.imread(tmp_path / "x.png").shape[:2]
    assert width > 2 * 50, (width, height)
