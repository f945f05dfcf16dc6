"""`lightlong bench train`: training tok/s vs sequence length at equal tokens per step.

A training step (forward, backward, AdamW; activation checkpointing on, as long sequences
need) on `tokens` tokens cut into rows of T, for T = 2K … 64K: the preset's `-linear` twin,
the preset, its `-softmax` twin, and `transformers`' MiniMax with the preset's config and
weights. Each point runs in a fresh process; a series stops where its predicted step time
passes `limit_s` (softmax attention is quadratic in T).
"""

from __future__ import annotations

import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from lightlong.bench.machine import describe_machine
from lightlong.bench.model import (
    check_against_transformers,
    comparable_config,
    predict_seconds,
    save_random_checkpoint,
)
from lightlong.bench.report import fmt, ratio, target, targets_line, write_results
from lightlong.bench.worker import log, run_in_fresh_process
from lightlong.model import HybridConfig, HybridLM

DEFAULT_LENGTHS = [2048, 8192, 32768, 65536]


@dataclass
class TrainBenchConfig:
    """What `lightlong bench train` measures."""

    preset: str = "small"
    """Model preset; its `-linear` and `-softmax` twins are measured too."""
    lengths: list[int] = field(default_factory=list)
    """Sequence lengths; empty means 2K, 8K, 32K, 64K."""
    tokens: int = 65536
    """Tokens per step at every length (rows = tokens / T)."""
    transformers: bool = True
    """Also measure `transformers`' MiniMaxForCausalLM (needs the `hf` extra)."""
    limit_s: float = 240.0
    """A point whose predicted step time exceeds this is skipped (and longer ones too)."""
    out_dir: str = "benchmarks/results"
    """Where the JSON, Markdown and PNG go."""

    def validate(self) -> None:
        """Raises ValueError naming the field that is out of range."""
        HybridConfig.from_preset(self.preset)
        lengths = self.lengths or DEFAULT_LENGTHS
        if any(T < 2 or self.tokens % T for T in lengths):
            raise ValueError(f"lengths must be >= 2 and divide tokens={self.tokens}: {lengths}")
        if self.limit_s <= 0:
            raise ValueError(f"limit_s must be > 0, got {self.limit_s}")


def run_train_bench(cfg: TrainBenchConfig) -> dict:
    """Measures, prints the table, writes JSON + Markdown + PNG; returns the report."""
    cfg.validate()
    lengths = sorted(cfg.lengths or DEFAULT_LENGTHS)
    p = cfg.preset
    with tempfile.TemporaryDirectory() as tmp:
        variants = (f"{p}-linear", p, f"{p}-softmax")
        ck = {v: save_random_checkpoint(comparable_config(v), Path(tmp) / v) for v in variants}
        err = None
        if cfg.transformers:
            err = check_against_transformers(ck[p])
            if not err < 1e-4:
                raise SystemExit(f"reference check failed: logits differ by {err:.2e} (relative)")
        series = [("lightlong", v) for v in variants]
        series += [("transformers", p)] if cfg.transformers else []
        rows: dict[str, list[dict]] = {}
        for impl, variant in series:
            key = rows.setdefault(f"{impl}:{variant}", [])
            for T in lengths:
                # Equal tokens per step: the time grows with T only through attention, so
                # extrapolate from two points (exponent >= 0), never from one.
                seen = [(r["T"], r["step_s"]) for r in key]
                if len(seen) >= 2 and predict_seconds(seen, T, min_exponent=0.0) > cfg.limit_s:
                    break
                spec = {"kind": "train", "impl": impl, "checkpoint": str(ck[variant]), "T": T,
                        "tokens": cfg.tokens, "device": "cpu", "dtype": "float32"}  # fmt: skip
                r = run_in_fresh_process(spec, timeout_s=30 * 60)
                log(f"{impl}:{variant} T={T} -> {r}")
                if r is None:
                    break
                key.append({"T": T, "tok_s": cfg.tokens / r["step_s"], **r})
    report = _summarise(cfg, lengths, rows, err)
    print(format_table(report))
    write_results(Path(cfg.out_dir) / "train-cpu", report, format_table(report), plot_train)
    return report


def _summarise(cfg: TrainBenchConfig, lengths: list[int], rows: dict, err) -> dict:
    p = cfg.preset

    def at(key: str, T: int):
        return next((r["tok_s"] for r in rows.get(key, []) if r["T"] == T), None)

    lin, hf = f"lightlong:{p}-linear", f"transformers:{p}"
    targets = {
        "linear_flat": target(
            ratio(at(lin, 65536), at(lin, 2048)), ">=", 0.85, f"{p}-linear train tok/s 64K/2K"
        ),
        "vs_transformers_8K": target(
            ratio(at(f"lightlong:{p}", 8192), at(hf, 8192)), ">=", 2,
            "train tok/s vs transformers at 8K",
        ),
    }  # fmt: skip
    with torch.device("meta"):
        params = HybridLM(HybridConfig.from_preset(p)).param_count()
    return {
        "benchmark": "train",
        "config": asdict(cfg),
        "model": {"preset": p, "rotary_dim": "full head", "postnorm": True, "params": params},
        "machine": describe_machine("cpu"),
        "reference_rel_err_vs_transformers": err,
        "lengths": lengths,
        "rows": rows,
        "targets": targets,
    }


def format_table(report: dict) -> str:
    """Markdown: tok/s and peak MB per series and length, then the targets."""
    series = list(report["rows"])
    head = ["T"] + [f"{s} tok/s | {s} peak MB" for s in series]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * (1 + 2 * len(series))]
    for T in report["lengths"]:
        cells = [f"{T:,}"]
        for s in series:
            r = next((r for r in report["rows"][s] if r["T"] == T), None)
            cells += [fmt(r and r["tok_s"], ",.0f"), fmt(r and r["peak_bytes"] / 2**20, ",.0f")]
        lines.append("| " + " | ".join(cells) + " |")
    m, model, c = report["machine"], report["model"], report["config"]
    lines += [
        "",
        f"machine: {m['cpu']}, {m['torch_threads']} threads, torch {m['torch']}; "
        f"{model['preset']}: {model['params']['total'] / 1e6:.1f}M params, fp32, "
        f"{c['tokens']:,} tokens per step, activation checkpointing",
        targets_line(report["targets"]),
    ]
    return "\n".join(lines)


def plot_train(report: dict, path: Path) -> None:
    """Training tok/s vs sequence length, one line per series."""
    from lightlong.plot import pyplot, save, series, tidy

    fig, ax = pyplot().subplots(figsize=(6.5, 4.2))
    for i, (s, rows) in enumerate(report["rows"].items()):
        if rows:
            ax.plot([r["T"] for r in rows], [r["tok_s"] for r in rows], label=s, **series(i))
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length T (equal tokens per step)")
    ax.set_ylabel("training tokens / s")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    m = report["machine"]
    ax.set_title(f"{report['model']['preset']}, fp32 — {m['cpu']} ({m['torch_threads']} threads)",
                 fontsize=9)  # fmt: skip
    tidy(ax)
    save(fig, path, dpi=120)
