"""`lightlong bench train`: training tok/s vs sequence length at equal tokens per step.

A training step (forward, backward, AdamW; activation checkpointing on, as long sequences
need) on `tokens` tokens cut into rows of T, for T = 2K … 64K: the preset's `-linear` twin,
the preset, its `-softmax` twin, and `transformers`' MiniMax with the preset's config and
weights. Each point runs in a fresh process; a series stops where its predicted step time
passes `limit_s` (softmax attention is quadratic in T). lightlong trains in each of `dtypes`
(bfloat16: autocast with fp32 weights and optimizer, as `lightlong train` does),
`transformers` in fp32; each rate is set beside the GEMM peak of the dtype its matmuls run
in, measured first in the same run (model FLOPs: 3 × forward, `roofline.py`).
"""

from __future__ import annotations

import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from lightlong.bench.machine import Roofline, describe_machine, measure_roofline
from lightlong.bench.model import (
    check_against_transformers,
    check_dtypes,
    comparable_config,
    predict_seconds,
    save_random_checkpoint,
    series_key,
)
from lightlong.bench.report import (
    check_overwrite,
    failed_line,
    fmt,
    ratio,
    target,
    targets_line,
    write_results,
)
from lightlong.bench.roofline import train_flops_per_token
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
    dtypes: list[str] = field(default_factory=lambda: ["float32", "bfloat16"])
    """lightlong's training precisions: float32, bfloat16 (autocast, fp32 weights and
    optimizer); float32 first. transformers trains in float32."""
    out_dir: str = "benchmarks/results"
    """Where the JSON, Markdown and PNG go."""
    overwrite: bool = False
    """Replace result files already in out_dir (else the run stops before measuring)."""

    def validate(self) -> None:
        """Raises ValueError naming the field that is out of range."""
        HybridConfig.from_preset(self.preset)
        check_dtypes(self.dtypes)
        lengths = self.lengths or DEFAULT_LENGTHS
        if any(T < 2 or self.tokens % T for T in lengths):
            raise ValueError(f"lengths must be >= 2 and divide tokens={self.tokens}: {lengths}")
        if self.limit_s <= 0:
            raise ValueError(f"limit_s must be > 0, got {self.limit_s}")


def results_stem(cfg: TrainBenchConfig) -> Path:
    """Where the results go, without the suffix."""
    return Path(cfg.out_dir) / "train-cpu"


def run_train_bench(cfg: TrainBenchConfig) -> dict:
    """Measures, prints the table, writes JSON + Markdown + PNG; returns the report."""
    cfg.validate()
    check_overwrite(results_stem(cfg), cfg.overwrite)
    lengths = sorted(cfg.lengths or DEFAULT_LENGTHS)
    p = cfg.preset
    roofline = measure_roofline("cpu")
    log(roofline.summary())
    failed: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        variants = (f"{p}-linear", p, f"{p}-softmax")
        ck = {v: save_random_checkpoint(comparable_config(v), Path(tmp) / v) for v in variants}
        err = None
        if cfg.transformers:
            err = check_against_transformers(ck[p])
            if not err < 1e-4:
                raise SystemExit(f"reference check failed: logits differ by {err:.2e} (relative)")
        series = [("lightlong", v, d) for d in cfg.dtypes for v in variants]
        series += [("transformers", p, "float32")] if cfg.transformers else []
        rows: dict[str, list[dict]] = {}
        for impl, variant, dtype in series:
            key = rows.setdefault(series_key(impl, variant, dtype), [])
            for T in lengths:
                # Equal tokens per step: the time grows with T only through attention, so
                # extrapolate from two points (exponent >= 0), never from one.
                seen = [(r["T"], r["step_s"]) for r in key]
                if len(seen) >= 2 and predict_seconds(seen, T, min_exponent=0.0) > cfg.limit_s:
                    break
                spec = {"kind": "train", "impl": impl, "checkpoint": str(ck[variant]), "T": T,
                        "tokens": cfg.tokens, "device": "cpu", "dtype": dtype}  # fmt: skip
                r = run_in_fresh_process(spec, timeout_s=30 * 60, failed=failed)
                log(f"{impl}:{variant} {dtype} T={T} -> {r}")
                if r is None:
                    break
                tok_s = cfg.tokens / r["step_s"]
                flops = train_flops_per_token(comparable_config(variant), T)
                of_gemm = tok_s * flops / 1e9 / roofline.gemm(dtype)
                key.append({"T": T, "tok_s": tok_s, "of_gemm": of_gemm, **r})
    report = _summarise(cfg, lengths, rows, err, roofline, failed)
    print(format_table(report))
    write_results(
        results_stem(cfg), report, format_table(report), plot_train, overwrite=cfg.overwrite
    )
    return report


def _summarise(
    cfg: TrainBenchConfig, lengths: list[int], rows: dict, err, roofline: Roofline, failed: list
) -> dict:
    p = cfg.preset

    def at(key: str, T: int, field_: str = "tok_s"):
        return next((r[field_] for r in rows.get(key, []) if r["T"] == T), None)

    lin, hf = f"lightlong:{p}-linear", f"transformers:{p}"
    bf16 = series_key("lightlong", p, "bfloat16")
    targets = {
        "linear_flat": target(
            ratio(at(lin, 65536), at(lin, 2048)), ">=", 0.85, f"{p}-linear train tok/s 64K/2K"
        ),
        "vs_transformers_8K": target(
            ratio(at(f"lightlong:{p}", 8192), at(hf, 8192)), ">=", 2,
            "train tok/s vs transformers at 8K",
        ),
        "bf16_vs_float32_8K": target(
            ratio(at(bf16, 8192), at(f"lightlong:{p}", 8192)), ">=", 2,
            "train tok/s bf16 / fp32 at 8K",
        ),
    }  # fmt: skip
    with torch.device("meta"):
        params = HybridLM(HybridConfig.from_preset(p)).param_count()
    return {
        "benchmark": "train",
        "config": asdict(cfg),
        "model": {"preset": p, "rotary_dim": "full head", "postnorm": True, "params": params},
        "machine": describe_machine("cpu"),
        "roofline": roofline.to_dict(),
        "reference_rel_err_vs_transformers": err,
        "lengths": lengths,
        "rows": rows,
        "failed": failed,
        "targets": targets,
    }


def format_table(report: dict) -> str:
    """Markdown: per series and length, tok/s, its fraction of the GEMM peak of the series'
    dtype, and peak MB; then the roofline and the targets."""
    lines = ["| series | T | tok/s | of GEMM | peak MB |", "|---|---|---|---|---|"]
    for s, rows in report["rows"].items():
        for T in report["lengths"]:
            r = next((r for r in rows if r["T"] == T), None)
            if r is None:
                continue
            lines.append(
                f"| {s} | {T:,} | {fmt(r['tok_s'], ',.0f')} | {fmt(r.get('of_gemm'), '.2f')} | "
                f"{fmt(r['peak_bytes'] / 2**20, ',.0f')} |"
            )
    m, model, c = report["machine"], report["model"], report["config"]
    lines += [
        "",
        f"machine: {m['cpu']}, {m['torch_threads']} threads, torch {m['torch']}; "
        f"{model['preset']}: {model['params']['total'] / 1e6:.1f}M params, fp32 unless named "
        f":bfloat16 (autocast, fp32 weights and AdamW), {c['tokens']:,} tokens per step, "
        "activation checkpointing",
        Roofline.from_dict(report["roofline"]).summary(),
        "of GEMM: tok/s × 3 × forward FLOPs per token (2 × active matmul weights + attention; "
        "the checkpointed forward's recomputation not counted) ÷ GEMM peak of the dtype",
        *filter(None, [failed_line(report.get("failed", []))]),
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
    ax.set_title(f"{report['model']['preset']} — {m['cpu']} ({m['torch_threads']} threads)",
                 fontsize=9)  # fmt: skip
    tidy(ax)
    save(fig, path, dpi=120)
