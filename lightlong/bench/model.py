"""`lightlong bench model`: the whole model, lightlong vs `transformers`' MiniMax, T = 1K ... 64K.

Same config and weights for both (loaded from one checkpoint directory, each through its own
loader); prefill (last-position logits, no cache) and forward+backward (loss over all
positions). Each measurement runs in a fresh process so peak memory is its own, and nothing
is timed unless the two implementations agree on the logits of a short prompt.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from lightlong.bench.machine import describe_machine
from lightlong.bench.report import fmt, ratio, target, targets_line, write_results
from lightlong.bench.worker import log, run_in_fresh_process
from lightlong.model import HybridConfig, HybridLM

DEFAULT_LENGTHS = [2**i for i in range(10, 17)]  # 1K ... 64K


@dataclass
class ModelBenchConfig:
    """What `lightlong bench model` measures."""

    preset: str = "small"
    """Model preset; its `-linear` twin is measured too (lightlong only)."""
    lengths: list[int] = field(default_factory=list)
    """Sequence lengths; empty means 1K ... 64K."""
    transformers: bool = True
    """Also measure `transformers`' MiniMaxForCausalLM (needs the `hf` extra)."""
    limit_s: float = 120.0
    """A measurement whose predicted time exceeds this is skipped (and longer ones too)."""
    fwdbwd_max_len: int = 32768
    """Longest length with forward+backward: without activation checkpointing the `small`
    model's saved activations and [T, vocab] logits at 64K exceed a 24 GB machine."""
    out_dir: str = "benchmarks/results"
    """Where the JSON, Markdown and PNG go."""

    def validate(self) -> None:
        """Raises ValueError naming the field that is out of range."""
        HybridConfig.from_preset(self.preset)
        if any(t < 2 for t in self.lengths):
            raise ValueError(f"lengths must be >= 2, got {self.lengths}")
        if self.limit_s <= 0:
            raise ValueError(f"limit_s must be > 0, got {self.limit_s}")
        if self.fwdbwd_max_len < 0:
            raise ValueError(f"fwdbwd_max_len must be >= 0, got {self.fwdbwd_max_len}")


def comparable_config(preset: str) -> HybridConfig:
    """The preset as `transformers`' MiniMax can run it: full-head RoPE (it ignores
    partial_rotary_factor) and post-norm (it has no pre-norm)."""
    config = HybridConfig.from_preset(preset)
    return dataclasses.replace(config, rotary_dim=config.head_dim, postnorm=True)


def save_random_checkpoint(config: HybridConfig, path: Path) -> Path:
    torch.manual_seed(0)
    HybridLM(config).save_pretrained(path, config_format="transformers")
    return path


def check_against_transformers(checkpoint: Path, T: int = 300) -> float:
    """Relative error of lightlong's logits vs `transformers`' on one random prompt."""
    from transformers import MiniMaxForCausalLM

    ours = HybridLM.from_pretrained(checkpoint, dtype=torch.float32)
    theirs = MiniMaxForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    ids = torch.randint(
        0, ours.config.vocab_size, (1, T), generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        a = ours(ids).logits.double()
        b = theirs(input_ids=ids, use_cache=False).logits.double()
    return ((a - b).norm() / b.norm()).item()


def run_model_bench(cfg: ModelBenchConfig) -> dict:
    """Measures, prints the table, writes JSON + Markdown + PNG; returns the report."""
    cfg.validate()
    lengths = sorted(cfg.lengths or DEFAULT_LENGTHS)
    use_hf = cfg.transformers
    if use_hf:
        try:
            import transformers  # noqa: F401
        except ImportError as e:
            raise ValueError("transformers is not installed: pip install 'lightlong[hf]'") from e
    with tempfile.TemporaryDirectory() as tmp:
        hybrid = save_random_checkpoint(comparable_config(cfg.preset), Path(tmp) / "hybrid")
        linear = save_random_checkpoint(
            comparable_config(f"{cfg.preset}-linear"), Path(tmp) / "linear"
        )
        err = None
        if use_hf:
            err = check_against_transformers(hybrid)
            if not err < 1e-4:
                raise SystemExit(
                    f"reference check failed: lightlong vs transformers logits differ by {err:.2e}"
                    " (relative); no numbers printed"
                )
            log(f"reference check passed: logits match transformers to {err:.1e} (relative)")
        runs = [("lightlong", cfg.preset, hybrid), ("lightlong", f"{cfg.preset}-linear", linear)]
        if use_hf:
            runs.append(("transformers", cfg.preset, hybrid))
        rows = {f"{impl}:{name}": [] for impl, name, _ in runs}
        for impl, name, ck in runs:
            key = f"{impl}:{name}"
            done = {"prefill": [], "fwdbwd": []}
            for T in lengths:
                t0 = time.perf_counter()
                modes = [
                    m
                    for m, pts in done.items()
                    if predict_seconds(pts, T) <= cfg.limit_s
                    and (m == "prefill" or cfg.fwdbwd_max_len >= T)
                ]
                if not modes:
                    break
                spec = {"kind": "model", "impl": impl, "checkpoint": str(ck), "T": T,
                        "modes": modes, "device": "cpu", "dtype": "float32"}  # fmt: skip
                r = run_in_fresh_process(spec, timeout_s=30 * 60)
                if r is None:
                    break
                rows[key].append({"T": T, **r})
                for m in modes:
                    done[m].append((T, r[f"{m}_s"]))
                parts = "  ".join(f"{m} {r[f'{m}_s']:.2f}s" for m in modes)
                log(f"{key:>28} T={T:>6}  {parts}  ({time.perf_counter() - t0:.0f}s)")
    report = _summarise(cfg, rows, err)
    print(format_table(report))
    _write(report, cfg)
    return report


def predict_seconds(points: list[tuple[int, float]], T: int, min_exponent: float = 1.0) -> float:
    """Time at T extrapolated from the last two (T, s) points (power law, exponent >=
    min_exponent; 2 from a single point)."""
    if not points:
        return 0.0
    if len(points) == 1:
        (t1, s1) = points[0]
        return s1 * (T / t1) ** 2
    (t1, s1), (t2, s2) = points[-2:]
    import math

    p = math.log(s2 / s1) / math.log(t2 / t1) if s1 > 0 and s2 > 0 else 2.0
    p = max(min_exponent, p)
    return s2 * (T / t2) ** p


def _summarise(cfg: ModelBenchConfig, rows: dict, err: float | None) -> dict:
    table = {}
    for key, entries in rows.items():
        for e in entries:
            out = table.setdefault(e["T"], {"T": e["T"]})
            for m in ("prefill", "fwdbwd"):
                if f"{m}_s" in e:
                    out[f"{key}:{m}_tok_s"] = e["T"] / e[f"{m}_s"]
                    out[f"{key}:{m}_peak_mb"] = e[f"{m}_peak_bytes"] / 2**20
    ordered = [table[T] for T in sorted(table)]
    ours, lin, hf = (f"lightlong:{cfg.preset}", f"lightlong:{cfg.preset}-linear",
                     f"transformers:{cfg.preset}")  # fmt: skip

    def at(T: int, key: str):
        return table.get(T, {}).get(key)

    targets = {
        "prefill_vs_transformers_16K": target(
            ratio(at(16384, f"{ours}:prefill_tok_s"), at(16384, f"{hf}:prefill_tok_s")), ">=", 2,
            "prefill tok/s vs transformers at 16K",
        ),
        "fwdbwd_vs_transformers_8K": target(
            ratio(at(8192, f"{ours}:fwdbwd_tok_s"), at(8192, f"{hf}:fwdbwd_tok_s")), ">=", 2,
            "fwd+bwd tok/s vs transformers at 8K",
        ),
        "prefill_memory_vs_transformers_64K": target(
            ratio(at(65536, f"{ours}:prefill_peak_mb"), at(65536, f"{hf}:prefill_peak_mb")),
            "<=", 0.5, "prefill peak memory vs transformers at 64K",
        ),
        "linear_prefill_flat_64K": target(
            ratio(at(65536, f"{lin}:prefill_tok_s"), at(4096, f"{lin}:prefill_tok_s")), ">=",
            0.8, f"{cfg.preset}-linear prefill tok/s 64K/4K",
        ),
    }  # fmt: skip
    with torch.device("meta"):
        params = HybridLM(HybridConfig.from_preset(cfg.preset)).param_count()
    return {
        "benchmark": "model",
        "config": asdict(cfg),
        "model": {
            "preset": cfg.preset,
            "rotary_dim": "full head",
            "postnorm": True,
            "params": params,
        },
        "machine": describe_machine("cpu"),
        "reference_rel_err_vs_transformers": err,
        "series": list(rows),
        "rows": ordered,
        "targets": targets,
    }


def format_table(report: dict) -> str:
    """Markdown: tok/s and peak MB per implementation and length, then the target ratios."""
    series = report["series"]
    head = ["T"]
    for s in series:
        head += [f"{s} prefill tok/s", f"{s} fwd+bwd tok/s", f"{s} prefill peak MB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in report["rows"]:
        cells = [str(r["T"])]
        for s in series:
            cells += [
                fmt(r.get(f"{s}:prefill_tok_s"), ",.0f"),
                fmt(r.get(f"{s}:fwdbwd_tok_s"), ",.0f"),
                fmt(r.get(f"{s}:prefill_peak_mb"), ",.0f"),
            ]
        lines.append("| " + " | ".join(cells) + " |")
    m, t, model = report["machine"], report["targets"], report["model"]
    lines += [
        "",
        f"machine: {m['cpu']}, {m['torch_threads']} threads, torch {m['torch']}; "
        f"{model['preset']}: {model['params']['total'] / 1e6:.1f}M params, fp32",
        targets_line(t),
    ]
    return "\n".join(lines)


def _write(report: dict, cfg: ModelBenchConfig) -> None:
    write_results(Path(cfg.out_dir) / "model-cpu", report, format_table(report), plot_model)


def plot_model(report: dict, path: Path) -> None:
    """tok/s vs length (log-log) for prefill and forward+backward, one line per series."""
    from lightlong.plot import pyplot, save, series, tidy

    fig, axes = pyplot().subplots(1, 2, figsize=(11, 4.2))
    for ax, mode, title in (
        (axes[0], "prefill", "prefill"),
        (axes[1], "fwdbwd", "forward+backward"),
    ):
        for i, s in enumerate(report["series"]):
            pts = [
                (r["T"], r[f"{s}:{mode}_tok_s"]) for r in report["rows"] if f"{s}:{mode}_tok_s" in r
            ]
            if pts:
                ax.plot(*zip(*pts, strict=True), label=s, **series(i))
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length T (tokens)")
        ax.set_ylabel("tokens / s")
        ax.set_title(title, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        if ax.lines:  # a panel can be empty (e.g. no length within fwdbwd_max_len)
            ax.legend(fontsize=8)
    m = report["machine"]
    fig.suptitle(
        f"{report['model']['preset']} model, fp32 — {m['cpu']} ({m['torch_threads']} threads)",
        fontsize=9,
    )
    tidy(*axes)
    save(fig, path, dpi=120)
