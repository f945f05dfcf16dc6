"""`lightlong bench model`: the whole model, lightlong vs `transformers`' MiniMax, T = 1K ... 64K.

Same config and weights for both (loaded from one checkpoint directory, each through its own
loader); prefill (last-position logits, no cache) and forward+backward (loss over all
positions). Each measurement runs in a fresh process so peak memory is its own, and nothing
is timed unless the two implementations agree on the logits of a short prompt. lightlong
runs in each of `dtypes` (weights and activations), `transformers` in fp32; every rate is
set beside the GEMM peak of its dtype, measured first in the same run (FLOPs per token from
`roofline.py`).
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from lightlong.bench.machine import Roofline, describe_machine, measure_roofline
from lightlong.bench.report import (
    check_overwrite,
    failed_line,
    fit_power,
    fmt,
    ratio,
    target,
    targets_line,
    write_results,
)
from lightlong.bench.roofline import forward_flops_per_token
from lightlong.bench.worker import log, run_in_fresh_process
from lightlong.model import HybridConfig, HybridLM

DEFAULT_LENGTHS = [2**i for i in range(10, 17)]  # 1K ... 64K
PRECISION_MAX_REL_ERR = 0.1
"""Largest relative error of a bf16 or int8 model's logits vs fp32 (a short prompt) before
the precision table is refused: rounding gives ~1e-2, a broken path ~1."""


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
    dtypes: list[str] = field(default_factory=lambda: ["float32", "bfloat16"])
    """lightlong's weight and activation dtypes (float32 first: the others' ratios are to
    it); transformers runs in float32."""
    out_dir: str = "benchmarks/results"
    """Where the JSON, Markdown and PNG go."""
    overwrite: bool = False
    """Replace result files already in out_dir (else the run stops before measuring)."""

    def validate(self) -> None:
        """Raises ValueError naming the field that is out of range."""
        HybridConfig.from_preset(self.preset)
        check_dtypes(self.dtypes)
        if any(t < 2 for t in self.lengths):
            raise ValueError(f"lengths must be >= 2, got {self.lengths}")
        if self.limit_s <= 0:
            raise ValueError(f"limit_s must be > 0, got {self.limit_s}")
        if self.fwdbwd_max_len < 0:
            raise ValueError(f"fwdbwd_max_len must be >= 0, got {self.fwdbwd_max_len}")


def check_dtypes(dtypes: list[str]) -> None:
    """ValueError unless dtypes are distinct float32 / bfloat16, float32 first."""
    if (
        not dtypes
        or dtypes[0] != "float32"
        or len(set(dtypes)) != len(dtypes)
        or not set(dtypes) <= {"float32", "bfloat16"}
    ):
        raise ValueError(f"dtypes must be float32, then optionally bfloat16; got {dtypes}")


def series_key(impl: str, variant: str, dtype: str = "float32") -> str:
    """'lightlong:small' (float32) or 'lightlong:small:bfloat16'."""
    return f"{impl}:{variant}" + ("" if dtype == "float32" else f":{dtype}")


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


def results_stem(cfg: ModelBenchConfig) -> Path:
    """Where the results go, without the suffix."""
    return Path(cfg.out_dir) / "model-cpu"


def check_precision(checkpoint: Path, dtype: str, quantize: str | None, T: int = 300) -> float:
    """Relative error of the logits of the model in `dtype` (weights `quantize`d) vs fp32 on
    one random prompt of T tokens, then over 4 decode steps after it (the worst of the
    two: int8 prefill and decode run different kernels)."""
    from lightlong.infer import HybridCache

    ref = HybridLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    other = HybridLM.from_pretrained(checkpoint, dtype=getattr(torch, dtype)).eval()
    if quantize == "int8":
        from lightlong.nn.quant import quantize_int8

        quantize_int8(other)
    ids = torch.randint(
        0, ref.config.vocab_size, (1, T + 4), generator=torch.Generator().manual_seed(0)
    )
    errors = []
    with torch.no_grad():
        caches = [HybridCache.for_model(m, 1) for m in (other, ref)]
        a, b = (
            m(ids[:, :T], cache=c).logits.double()
            for m, c in zip((other, ref), caches, strict=True)
        )
        errors.append(((a - b).norm() / b.norm()).item())
        steps = [[], []]
        for t in range(T, T + 4):
            for out, m, c in zip(steps, (other, ref), caches, strict=True):
                out.append(m(ids[:, t : t + 1], cache=c).logits.double())
        a, b = torch.cat(steps[0], 1), torch.cat(steps[1], 1)
        errors.append(((a - b).norm() / b.norm()).item())
    return max(errors)


def run_model_bench(cfg: ModelBenchConfig) -> dict:
    """Measures, prints the table, writes JSON + Markdown + PNG; returns the report."""
    cfg.validate()
    check_overwrite(results_stem(cfg), cfg.overwrite)
    lengths = sorted(cfg.lengths or DEFAULT_LENGTHS)
    use_hf = cfg.transformers
    if use_hf:
        try:
            import transformers  # noqa: F401
        except ImportError as e:
            raise ValueError("transformers is not installed: pip install 'lightlong[hf]'") from e
    roofline = measure_roofline("cpu")
    log(roofline.summary())
    failed: list[dict] = []
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
        precision_err = {}
        for dtype in cfg.dtypes[1:]:
            for name, ck in ((cfg.preset, hybrid), (f"{cfg.preset}-linear", linear)):
                e = precision_err[f"{name}:{dtype}"] = check_precision(ck, dtype, None)
                if not e <= PRECISION_MAX_REL_ERR:
                    raise SystemExit(
                        f"precision check failed: {name} {dtype} logits differ from fp32 by "
                        f"{e:.2e} (relative); no numbers printed"
                    )
        runs = [
            ("lightlong", name, ck, dtype)
            for dtype in cfg.dtypes
            for name, ck in ((cfg.preset, hybrid), (f"{cfg.preset}-linear", linear))
        ]
        if use_hf:
            runs.append(("transformers", cfg.preset, hybrid, "float32"))
        rows = {series_key(impl, name, dtype): [] for impl, name, _, dtype in runs}
        for impl, name, ck, dtype in runs:
            key = series_key(impl, name, dtype)
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
                        "modes": modes, "device": "cpu", "dtype": dtype}  # fmt: skip
                r = run_in_fresh_process(spec, timeout_s=30 * 60, failed=failed)
                if r is None:
                    break
                rows[key].append({"T": T, **r})
                for m in modes:
                    done[m].append((T, r[f"{m}_s"]))
                parts = "  ".join(f"{m} {r[f'{m}_s']:.2f}s" for m in modes)
                log(f"{key:>28} T={T:>6}  {parts}  ({time.perf_counter() - t0:.0f}s)")
    report = _summarise(cfg, rows, err, roofline, failed)
    report["precision_rel_err_vs_float32"] = precision_err
    print(format_table(report))
    _write(report, cfg)
    return report


def predict_seconds(
    points: list[tuple[int, float]], T: int, min_exponent: float = 1.0, max_exponent: float = 3.0
) -> float:
    """Time at T predicted from measured (T, s) points, to decide whether to run T at all: a
    power law fitted by least squares to the last three (exponent clamped to [min_exponent,
    max_exponent], so that two noisy short points cannot predict an absurd time); from a
    single point, exponent 2. Never drawn or reported as a result."""
    if not points:
        return 0.0
    if len(points) == 1:
        (t1, s1) = points[0]
        return s1 * (T / t1) ** 2
    last = [(t, s) for t, s in points[-3:] if s > 0]
    if len(last) < 2:
        return 0.0
    _, p = fit_power(last)
    p = min(max_exponent, max(min_exponent, p))
    t2, s2 = last[-1]
    return s2 * (T / t2) ** p


def _summarise(
    cfg: ModelBenchConfig, rows: dict, err: float | None, roofline: Roofline, failed: list[dict]
) -> dict:
    table = {}
    for key, entries in rows.items():
        _, variant, *rest = key.split(":")
        dtype = rest[0] if rest else "float32"
        config = comparable_config(variant)
        for e in entries:
            T = e["T"]
            out = table.setdefault(T, {"T": T})
            # prefill computes the last position's logits only; fwd+bwd every position's
            flops = {
                "prefill": forward_flops_per_token(config, T, lm_head=False),
                "fwdbwd": 3 * forward_flops_per_token(config, T),
            }
            for m in ("prefill", "fwdbwd"):
                if f"{m}_s" in e:
                    tok_s = T / e[f"{m}_s"]
                    out[f"{key}:{m}_tok_s"] = tok_s
                    out[f"{key}:{m}_peak_mb"] = e[f"{m}_peak_bytes"] / 2**20
                    out[f"{key}:{m}_of_gemm"] = tok_s * flops[m] / 1e9 / roofline.gemm(dtype)
    ordered = [table[T] for T in sorted(table)]
    ours, lin, hf = (f"lightlong:{cfg.preset}", f"lightlong:{cfg.preset}-linear",
                     f"transformers:{cfg.preset}")  # fmt: skip
    bf16 = series_key("lightlong", cfg.preset, "bfloat16")

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
        "bf16_prefill_vs_float32_4K": target(
            ratio(at(4096, f"{bf16}:prefill_tok_s"), at(4096, f"{ours}:prefill_tok_s")), ">=", 2,
            "prefill tok/s bf16 / fp32 at 4K",
        ),
        "bf16_fwdbwd_vs_float32_4K": target(
            ratio(at(4096, f"{bf16}:fwdbwd_tok_s"), at(4096, f"{ours}:fwdbwd_tok_s")), ">=", 2,
            "fwd+bwd tok/s bf16 / fp32 at 4K",
        ),
        "bf16_prefill_of_gemm_4K": target(
            at(4096, f"{bf16}:prefill_of_gemm"), ">=", 0.5,
            "prefill bf16 at 4K / bf16 GEMM peak",
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
        "roofline": roofline.to_dict(),
        "reference_rel_err_vs_transformers": err,
        "series": list(rows),
        "rows": ordered,
        "failed": failed,
        "targets": targets,
    }


def format_table(report: dict) -> str:
    """Markdown: per series and length, tok/s and its fraction of the GEMM peak of the
    series' dtype (prefill, forward+backward) and prefill peak MB; then the roofline and the
    target ratios."""
    lines = [
        "| series | T | prefill tok/s | of GEMM | fwd+bwd tok/s | of GEMM | prefill peak MB |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in report["series"]:
        for r in report["rows"]:
            if not any(k.startswith(f"{s}:") for k in r):
                continue
            cells = [
                fmt(r.get(f"{s}:prefill_tok_s"), ",.0f"), fmt(r.get(f"{s}:prefill_of_gemm"), ".2f"),
                fmt(r.get(f"{s}:fwdbwd_tok_s"), ",.0f"), fmt(r.get(f"{s}:fwdbwd_of_gemm"), ".2f"),
                fmt(r.get(f"{s}:prefill_peak_mb"), ",.0f"),
            ]  # fmt: skip
            lines.append(f"| {s} | {r['T']:,} | " + " | ".join(cells) + " |")
    m, t, model = report["machine"], report["targets"], report["model"]
    lines += [
        "",
        f"machine: {m['cpu']}, {m['torch_threads']} threads, torch {m['torch']}; "
        f"{model['preset']}: {model['params']['total'] / 1e6:.1f}M params; series in fp32 "
        "unless named :bfloat16 (weights and activations)",
        Roofline.from_dict(report["roofline"]).summary(),
        "of GEMM: tok/s × FLOPs per token (2 × active matmul weights + attention; fwd+bwd "
        "3 × forward) ÷ GEMM peak of the series' dtype",
        *filter(None, [failed_line(report.get("failed", []))]),
        targets_line(t),
    ]
    errs = report.get("precision_rel_err_vs_float32")
    if errs:
        checked = ", ".join(f"{k} {v:.1e}" for k, v in errs.items())
        lines.insert(-1, f"precision check, logits vs fp32 (relative error): {checked}")
    return "\n".join(lines)


def _write(report: dict, cfg: ModelBenchConfig) -> None:
    write_results(
        results_stem(cfg), report, format_table(report), plot_model, overwrite=cfg.overwrite
    )


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
        f"{report['model']['preset']} model — {m['cpu']} ({m['torch_threads']} threads)",
        fontsize=9,
    )
    tidy(*axes)
    save(fig, path, dpi=120)
