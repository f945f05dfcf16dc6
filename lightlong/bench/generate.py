"""`lightlong bench generate`: inference at 1K … 1M tokens of context, lightlong vs `transformers`.

One run measures, each point in a fresh process (so peak memory is its own):
- decode tok/s (batch 1, greedy) after a prompt of 1K … 256K tokens for the preset, its
  `-linear` and `-softmax` variants and `transformers`' MiniMax with the same weights;
  prefill time, peak memory and cache bytes of the same runs;
- prefill of a 1M-token prompt (the `-linear` variant, and the hybrid as far as it goes);
- batched decode (32 rows) against batch 1;
- a prompt arriving after a cached prefix against a fresh prefill, and against `transformers`.
Softmax variants stop at the length whose predicted time passes `limit_s` (their prefill is
quadratic). Nothing is timed unless the two implementations agree on a short prompt.
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
from lightlong.units import length

DEFAULT_CONTEXTS = [2**i for i in range(10, 19, 2)]  # 1K, 4K, 16K, 64K, 256K


@dataclass
class GenerateBenchConfig:
    """What `lightlong bench generate` measures."""

    preset: str = "small"
    """Model preset; its `-linear` and `-softmax` variants are measured too."""
    contexts: list[int] = field(default_factory=list)
    """Prompt lengths before decoding; empty means 1K, 4K, 16K, 64K, 256K."""
    long_prompt: int = 1_000_000
    """Length of the long-prompt prefill (0 skips it); with new_tokens it must fit in the
    preset's max_position_embeddings (2^20)."""
    new_tokens: int = 64
    """Tokens decoded per measurement."""
    batch: int = 32
    """Rows of the batched-decode measurement."""
    batch_context: int = 1024
    """Prompt length of the batched-decode measurement."""
    prefix: int = 16384
    """Cached prefix of the continuation measurement."""
    suffix: int = 4096
    """Tokens that arrive after the cached prefix."""
    prefill_chunk: int = 4096
    """Tokens per prefill forward pass."""
    transformers: bool = True
    """Also measure `transformers`' MiniMaxForCausalLM (needs the `hf` extra)."""
    limit_s: float = 180.0
    """A point whose predicted prefill time exceeds this is skipped (and longer ones too)."""
    out_dir: str = "benchmarks/results"
    """Where the JSON, Markdown and PNG go."""

    def validate(self) -> None:
        """Raises ValueError naming the field that is out of range."""
        HybridConfig.from_preset(self.preset)
        for name in ("new_tokens", "batch", "batch_context", "prefix", "suffix", "prefill_chunk"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.new_tokens < 2:
            raise ValueError(f"new_tokens must be >= 2, got {self.new_tokens}")
        if any(t < 2 for t in self.contexts) or self.long_prompt < 0:
            raise ValueError("contexts must be >= 2 and long_prompt >= 0")
        if self.limit_s <= 0:
            raise ValueError(f"limit_s must be > 0, got {self.limit_s}")


def run_generate_bench(cfg: GenerateBenchConfig) -> dict:
    """Measures, prints the table, writes JSON + Markdown + PNG; returns the report."""
    cfg.validate()
    contexts = sorted(cfg.contexts or DEFAULT_CONTEXTS)
    if cfg.transformers:
        try:
            import transformers  # noqa: F401
        except ImportError as e:
            raise ValueError("transformers is not installed: pip install 'lightlong[hf]'") from e
    p = cfg.preset
    base = {"kind": "generate", "device": "cpu", "dtype": "float32",
            "new_tokens": cfg.new_tokens, "prefill_chunk": cfg.prefill_chunk,
            "batch": cfg.batch, "suffix": cfg.suffix}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        ck = {
            v: save_random_checkpoint(comparable_config(v), Path(tmp) / v)
            for v in (p, f"{p}-linear", f"{p}-softmax")
        }
        err = None
        if cfg.transformers:
            err = check_against_transformers(ck[p])
            if not err < 1e-4:
                raise SystemExit(f"reference check failed: logits differ by {err:.2e} (relative)")
            log(f"reference check passed: logits match transformers to {err:.1e} (relative)")
        series = [("lightlong", v) for v in ck] + (
            [("transformers", p)] if cfg.transformers else []
        )

        def point(impl: str, variant: str, **spec) -> dict | None:
            r = run_in_fresh_process(
                {**base, "impl": impl, "checkpoint": str(ck[variant]), **spec}, timeout_s=30 * 60
            )
            log(f"{impl}:{variant} {spec} -> {r}")
            return r

        context_rows: dict[str, list[dict]] = {}
        for impl, variant in series:
            rows = context_rows[f"{impl}:{variant}"] = []
            lengths = contexts + (
                [cfg.long_prompt] if impl == "lightlong" and cfg.long_prompt else []
            )
            for T in lengths:
                # The long prompt of the -linear twin runs whatever its time: it is a target.
                must = cfg.long_prompt == T and variant == f"{p}-linear"
                seen = [(r["context"], r["prefill_s"]) for r in rows]
                if not must and predict_seconds(seen, T) > cfg.limit_s:
                    break
                r = point(impl, variant, mode="context", context=T)
                if r is None:
                    break
                rows.append({"context": T, **r})
        batched = {
            f"{impl}:{variant}": point(impl, variant, mode="batched", context=cfg.batch_context)
            for impl, variant in series
            if variant != f"{p}-softmax"
        }
        continuation = {
            f"{impl}:{variant}": point(impl, variant, mode="continuation", context=cfg.prefix)
            for impl, variant in series
            if variant != f"{p}-softmax"
        }
    report = _summarise(cfg, contexts, context_rows, batched, continuation, err)
    print(format_table(report))
    _write(report, cfg)
    return report


def _summarise(cfg, contexts, context_rows, batched, continuation, err) -> dict:
    p = cfg.preset
    ours, lin, hf = f"lightlong:{p}", f"lightlong:{p}-linear", f"transformers:{p}"

    def at(key: str, T: int, field_: str):
        return next((r.get(field_) for r in context_rows.get(key, []) if r["context"] == T), None)

    def tok_s(key: str, T: int):
        s = at(key, T, "prefill_s")
        return T / s if s else None

    def cont(key: str, which: str):
        r = continuation.get(key)
        return cfg.suffix / r[which] if r else None

    b = batched.get(lin) or {}
    longest = max(contexts)
    targets = {
        "linear_decode_flat": target(
            ratio(at(lin, longest, "decode_tok_s"), at(lin, min(contexts), "decode_tok_s")),
            ">=", 0.9, f"{p}-linear decode tok/s {length(longest)}/{length(min(contexts))}",
        ),
        "decode_vs_transformers_4K": target(
            ratio(at(ours, 4096, "decode_tok_s"), at(hf, 4096, "decode_tok_s")), ">=", 3,
            "decode tok/s vs transformers at 4K",
        ),
        "batched_decode": target(
            ratio(b.get(f"decode_tok_s_b{cfg.batch}"), b.get("decode_tok_s_b1")), ">=", 10,
            f"{p}-linear decode tok/s batch {cfg.batch} / batch 1",
        ),
        "continuation_vs_fresh": target(
            ratio(cont(ours, "continued_s"), cont(ours, "fresh_s")), ">=", 0.9,
            "prefill after a cached prefix vs fresh",
        ),
        "continuation_vs_transformers": target(
            ratio(cont(ours, "continued_s"), cont(hf, "continued_s")), ">=", 2,
            "prefill after a cached prefix vs transformers",
        ),
        "long_prompt_memory_gb": target(
            (at(lin, cfg.long_prompt, "peak_bytes") or 0) / 2**30 or None, "<=", 8,
            f"{p}-linear {cfg.long_prompt:,}-token prompt peak GB",
        ),
        "long_prompt_flat": target(
            ratio(tok_s(lin, cfg.long_prompt), tok_s(lin, 4096)), ">=", 0.8,
            f"{p}-linear prefill tok/s {cfg.long_prompt:,}/4K",
        ),
    }  # fmt: skip
    with torch.device("meta"):
        params = HybridLM(HybridConfig.from_preset(p)).param_count()
    return {
        "benchmark": "generate",
        "config": asdict(cfg),
        "model": {"preset": p, "rotary_dim": "full head", "postnorm": True, "params": params},
        "machine": describe_machine("cpu"),
        "reference_rel_err_vs_transformers": err,
        "context": context_rows,
        "batched": batched,
        "continuation": continuation,
        "targets": targets,
    }


def format_table(report: dict) -> str:
    """Markdown: per series and context, prefill tok/s, decode tok/s, peak MB, cache MB;
    then batched decode, continuation and the targets."""
    lines = [
        "| series | context | prefill tok/s | decode tok/s | peak MB | cache MB |",
        "|---|---|---|---|---|---|",
    ]
    for key, rows in report["context"].items():
        for r in rows:
            cache = r.get("cache_bytes", {}).get("total")
            lines.append(
                f"| {key} | {r['context']:,} | {fmt(r['context'] / r['prefill_s'], ',.0f')} | "
                f"{fmt(r['decode_tok_s'], ',.1f')} | {fmt(r['peak_bytes'] / 2**20, ',.0f')} | "
                f"{fmt(None if cache is None else cache / 2**20, ',.1f')} |"
            )
    cfg = report["config"]
    lines += ["", f"| series | decode tok/s batch 1 | batch {cfg['batch']} |", "|---|---|---|"]
    for key, r in report["batched"].items():
        if r:
            wide = r[f"decode_tok_s_b{cfg['batch']}"]
            lines.append(f"| {key} | {r['decode_tok_s_b1']:,.1f} | {wide:,.1f} |")
    lines += [
        "",
        f"| series | {cfg['suffix']:,} tokens after a cached {cfg['prefix']:,}-token prefix, "
        "tok/s | the same tokens fresh, tok/s |",
        "|---|---|---|",
    ]
    for key, r in report["continuation"].items():
        if r:
            lines.append(
                f"| {key} | {cfg['suffix'] / r['continued_s']:,.0f} | "
                f"{cfg['suffix'] / r['fresh_s']:,.0f} |"
            )
    m, model = report["machine"], report["model"]
    lines += [
        "",
        f"machine: {m['cpu']}, {m['torch_threads']} threads, torch {m['torch']}; "
        f"{model['preset']}: {model['params']['total'] / 1e6:.1f}M params, fp32",
        targets_line(report["targets"]),
    ]
    return "\n".join(lines)


def _write(report: dict, cfg: GenerateBenchConfig) -> None:
    write_results(Path(cfg.out_dir) / "generate-cpu", report, format_table(report), plot_generate)


def plot_generate(report: dict, path: Path) -> None:
    """Three panels vs context length: decode tok/s, prefill tok/s, cache MB."""
    from lightlong.plot import pyplot, save, series, tidy

    fig, axes = pyplot().subplots(1, 3, figsize=(15, 4.2))
    panels = (
        ("decode tok/s (batch 1)", lambda r: r["decode_tok_s"]),
        ("prefill tok/s", lambda r: r["context"] / r["prefill_s"]),
        ("cache MB", lambda r: r["cache_bytes"]["total"] / 2**20 if "cache_bytes" in r else None),
    )
    for ax, (title, value) in zip(axes, panels, strict=True):
        for i, (key, rows) in enumerate(report["context"].items()):
            pts = [(r["context"], value(r)) for r in rows if value(r) is not None]
            if pts:
                ax.plot(*zip(*pts, strict=True), label=key, **series(i))
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context (tokens)")
        ax.set_title(title, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        if ax.lines:  # a panel can be empty (e.g. no length within fwdbwd_max_len)
            ax.legend(fontsize=8)
    m = report["machine"]
    fig.suptitle(
        f"{report['model']['preset']} model inference, fp32 — {m['cpu']} "
        f"({m['torch_threads']} threads)",
        fontsize=9,
    )
    tidy(*axes)
    save(fig, path, dpi=120)
