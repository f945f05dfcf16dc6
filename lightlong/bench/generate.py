"""`lightlong bench generate`: inference at 1K … 1M tokens of context, lightlong vs `transformers`.

One run measures, each point in a fresh process (so peak memory is its own):
- decode tok/s (batch 1, greedy) after a prompt of 1K … 256K tokens for the preset, its
  `-linear` and `-softmax` variants and `transformers`' MiniMax with the same weights;
  prefill time, peak memory and cache bytes of the same runs;
- prefill of a 1M-token prompt (the `-linear` variant, and the hybrid as far as it goes);
- batched decode (32 rows) against batch 1;
- a prompt arriving after a cached prefix against a fresh prefill, and against `transformers`;
- precision at one context (4K): decode at batch 1 and prefill of the preset and its
  `-linear` twin in each of `dtypes` and with int8 weights, beside `transformers` in fp32.
Softmax variants stop at the length whose predicted time passes `limit_s` (their prefill is
quadratic). Nothing is timed unless the two implementations agree on a short prompt.

Every rate is set beside the machine's roofline, measured first in the same run: decode at
batch 1 as a fraction of matrix-vector GB/s ÷ bytes read per token (`roofline.py`), prefill
and batched decode as a fraction of the GEMM peak of the dtype they run in.
"""

from __future__ import annotations

import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from lightlong.bench.machine import (
    Roofline,
    decode_bound_tok_s,
    describe_machine,
    fraction_of_bound,
    measure_roofline,
)
from lightlong.bench.model import (
    PRECISION_MAX_REL_ERR,
    check_against_transformers,
    check_precision,
    comparable_config,
    predict_seconds,
    save_random_checkpoint,
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
from lightlong.bench.roofline import (
    decode_bytes_per_token,
    forward_flops_per_token,
    int8_bytes_per_token,
)
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
    repeats: int = 3
    """Decode runs per measurement, each from the same prefilled cache (the prompt is
    prefilled once); the best tok/s is reported: the machines are shared, and a
    neighbour's burst slows one run, not the machine's speed."""
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
    dtypes: list[str] = field(default_factory=lambda: ["float32", "bfloat16"])
    """Precision table: the weights' and activations' dtypes measured (float32 first: the
    others' ratios are to it)."""
    int8: bool = True
    """Precision table: also int8 weights of an fp32 model (weight-only, per-channel
    scales; decode rounds activations to bf16 for the int8 kernel;
    `lightlong.nn.quant.quantize_int8`)."""
    precision_context: int = 4096
    """Prompt length of the precision table; 0 skips the table."""
    out_dir: str = "benchmarks/results"
    """Where the JSON, Markdown and PNG go."""
    overwrite: bool = False
    """Replace result files already in out_dir (else the run stops before measuring)."""

    def validate(self) -> None:
        """Raises ValueError naming the field that is out of range."""
        HybridConfig.from_preset(self.preset)
        for name in (
            "new_tokens", "repeats", "batch", "batch_context", "prefix", "suffix",
            "prefill_chunk",
        ):  # fmt: skip
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.new_tokens < 2:
            raise ValueError(f"new_tokens must be >= 2, got {self.new_tokens}")
        if any(t < 2 for t in self.contexts) or self.long_prompt < 0:
            raise ValueError("contexts must be >= 2 and long_prompt >= 0")
        if self.limit_s <= 0:
            raise ValueError(f"limit_s must be > 0, got {self.limit_s}")
        if self.prefix % self.prefill_chunk:
            raise ValueError(
                f"prefix ({self.prefix}) must be a multiple of prefill_chunk "
                f"({self.prefill_chunk}): the prefix cache keeps snapshots at chunk boundaries "
                "only, so the cached prefix would not be reused"
            )
        if self.precision_context and (
            self.precision_context < 2 or not self.dtypes or self.dtypes[0] != "float32"
        ):
            raise ValueError(
                f"precision_context must be 0 or >= 2 and dtypes start with float32, got "
                f"{self.precision_context} and {self.dtypes}"
            )
        bad = [d for d in self.dtypes if d not in ("float32", "bfloat16")]
        if bad or len(set(self.dtypes)) != len(self.dtypes):
            raise ValueError(f"dtypes must be distinct float32 / bfloat16, got {self.dtypes}")


def results_stem(cfg: GenerateBenchConfig) -> Path:
    """Where the results go, without the suffix."""
    return Path(cfg.out_dir) / "generate-cpu"


def run_generate_bench(cfg: GenerateBenchConfig) -> dict:
    """Measures, prints the table, writes JSON + Markdown + PNG; returns the report."""
    cfg.validate()
    check_overwrite(results_stem(cfg), cfg.overwrite)
    contexts = sorted(cfg.contexts or DEFAULT_CONTEXTS)
    if cfg.transformers:
        try:
            import transformers  # noqa: F401
        except ImportError as e:
            raise ValueError("transformers is not installed: pip install 'lightlong[hf]'") from e
    roofline = measure_roofline("cpu")
    log(roofline.summary())
    p = cfg.preset
    base = {"kind": "generate", "device": "cpu", "dtype": "float32",
            "new_tokens": cfg.new_tokens, "repeats": cfg.repeats,
            "prefill_chunk": cfg.prefill_chunk,
            "batch": cfg.batch, "suffix": cfg.suffix}  # fmt: skip
    failed: list[dict] = []
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
        precision_err = {}
        if cfg.precision_context:
            kinds = [(d, None) for d in cfg.dtypes[1:]] + (
                [("float32", "int8")] if cfg.int8 else []
            )
            for v in (p, f"{p}-linear"):
                for dtype, quantize in kinds:
                    name = f"{v}:{dtype}" + (f"+{quantize}" if quantize else "")
                    precision_err[name] = check_precision(ck[v], dtype, quantize)
                    if not precision_err[name] <= PRECISION_MAX_REL_ERR:
                        raise SystemExit(
                            f"precision check failed: {name} logits differ from fp32 by "
                            f"{precision_err[name]:.2e} (relative); no numbers printed"
                        )
            log(f"precision check passed: logits vs fp32 {precision_err}")
        series = [("lightlong", v) for v in ck] + (
            [("transformers", p)] if cfg.transformers else []
        )

        def point(impl: str, variant: str, **spec) -> dict | None:
            r = run_in_fresh_process(
                {**base, "impl": impl, "checkpoint": str(ck[variant]), **spec},
                timeout_s=30 * 60, failed=failed,
            )  # fmt: skip
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
        precision = []
        if cfg.precision_context:
            kinds = [(d, None) for d in cfg.dtypes] + ([("float32", "int8")] if cfg.int8 else [])
            runs = [("lightlong", v, d, q) for v in (p, f"{p}-linear") for d, q in kinds]
            runs += [("transformers", p, "float32", None)] if cfg.transformers else []
            for impl, variant, dtype, quantize in runs:
                r = point(impl, variant, mode="context", context=cfg.precision_context,
                          dtype=dtype, quantize=quantize)  # fmt: skip
                precision.append({"series": f"{impl}:{variant}", "dtype": dtype,
                                  "quantize": quantize, "result": r})  # fmt: skip
    report = _summarise(
        cfg, contexts, context_rows, batched, continuation, precision, err, roofline, failed
    )
    report["precision_rel_err_vs_float32"] = precision_err
    print(format_table(report))
    _write(report, cfg)
    return report


def _variant(key: str) -> str:
    """'lightlong:small-linear' -> 'small-linear'."""
    return key.split(":", 1)[1]


def decode_bound(roofline: Roofline, variant: str, context: int, dtype: str = "float32",
                  quantize: str | None = None) -> dict:  # fmt: skip
    """Bytes a decoded token reads and the tok/s they bound it to: at matrix-vector GB/s of
    the weights' dtype ("decode_bound_tok_s"; int8: the int8 matrices at the int8 kernel's
    rate, the rest (float weights, states, KV) at `dtype`'s) and at copy GB/s
    ("decode_copy_bound_tok_s")."""
    config = comparable_config(variant)
    nbytes = decode_bytes_per_token(config, context, dtype, quantize)["total"]
    narrow = int8_bytes_per_token(config, dtype) if quantize == "int8" else 0.0
    seconds = narrow / roofline.matvec(dtype, quantize) + (nbytes - narrow) / roofline.matvec(dtype)
    return {
        "bytes_per_token": nbytes,
        "decode_bound_tok_s": decode_bound_tok_s(nbytes, nbytes / seconds),
        "decode_copy_bound_tok_s": decode_bound_tok_s(nbytes, roofline.copy_gbps),
    }


def _gemm_fraction(roofline: Roofline, variant: str, context: int, tok_s: float | None,
                   dtype: str = "float32", decode: bool = False) -> float | None:  # fmt: skip
    """tok/s × FLOPs per token ÷ the GEMM peak of dtype (a prefill computes the last
    position's logits only: no LM head per token; decode: the LM head for every token)."""
    if tok_s is None:
        return None
    config = comparable_config(variant)
    flops = forward_flops_per_token(config, context, decode=decode, lm_head=decode)
    return tok_s * flops / 1e9 / roofline.gemm(dtype)


def _summarise(
    cfg, contexts, context_rows, batched, continuation, precision, err, roofline, failed
) -> dict:
    p = cfg.preset
    ours, lin, hf = f"lightlong:{p}", f"lightlong:{p}-linear", f"transformers:{p}"
    for key, rows in context_rows.items():
        for r in rows:
            T = r["context"]
            r |= decode_bound(roofline, _variant(key), T)
            r["decode_of_bound"] = fraction_of_bound(r["decode_tok_s"], r["decode_bound_tok_s"])
            r["prefill_of_gemm"] = _gemm_fraction(roofline, _variant(key), T, T / r["prefill_s"])
    for key, r in batched.items():
        if r:
            B, L = cfg.batch, cfg.batch_context
            r |= decode_bound(roofline, _variant(key), L)
            r["decode_of_bound_b1"] = fraction_of_bound(
                r["decode_tok_s_b1"], r["decode_bound_tok_s"]
            )
            r[f"decode_of_gemm_b{B}"] = _gemm_fraction(
                roofline, _variant(key), L, r[f"decode_tok_s_b{B}"], decode=True
            )
    L = cfg.precision_context
    fp32 = {e["series"]: e["result"] for e in precision if e["dtype"] == "float32"
            and not e["quantize"]}  # fmt: skip
    for e in precision:
        r, variant = e["result"], _variant(e["series"])
        e |= decode_bound(roofline, variant, L, e["dtype"], e["quantize"])
        if r is None:
            continue
        base = fp32.get(e["series"]) or {}
        e["prefill_tok_s"] = L / r["prefill_s"]
        e["decode_tok_s"] = r["decode_tok_s"]
        e["decode_vs_float32"] = ratio(r["decode_tok_s"], base.get("decode_tok_s"))
        e["prefill_vs_float32"] = ratio(base.get("prefill_s"), r["prefill_s"])
        e["decode_of_bound"] = fraction_of_bound(r["decode_tok_s"], e["decode_bound_tok_s"])
        e["prefill_of_gemm"] = _gemm_fraction(roofline, variant, L, e["prefill_tok_s"], e["dtype"])

    def at(key: str, T: int, field_: str):
        return next((r.get(field_) for r in context_rows.get(key, []) if r["context"] == T), None)

    def tok_s(key: str, T: int):
        s = at(key, T, "prefill_s")
        return T / s if s else None

    def cont(key: str, which: str):
        r = continuation.get(key)
        return cfg.suffix / r[which] if r else None

    def prec(key: str, dtype: str, field_: str, quantize: str | None = None):
        return next((e.get(field_) for e in precision if e["series"] == key
                     and e["dtype"] == dtype and e["quantize"] == quantize), None)  # fmt: skip

    b = batched.get(lin) or {}
    longest, shortest = max(contexts), min(contexts)
    targets = {
        "linear_decode_flat": target(
            # one context is no comparison: not measured rather than trivially met
            ratio(at(lin, longest, "decode_tok_s"), at(lin, shortest, "decode_tok_s"))
            if longest > shortest else None,
            ">=", 0.9, f"{p}-linear decode tok/s {length(longest)}/{length(shortest)}",
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
            ratio(tok_s(lin, cfg.long_prompt), tok_s(lin, 4096))
            if cfg.long_prompt != 4096 else None,
            ">=", 0.8, f"{p}-linear prefill tok/s {cfg.long_prompt:,}/4K",
        ),
    }  # fmt: skip
    at_L = length(L) if L else "-"
    targets["decode_vs_transformers_precision"] = target(
        ratio(prec(ours, "float32", "decode_tok_s"), prec(hf, "float32", "decode_tok_s")),
        ">=", 2.5, f"decode b1 fp32 vs transformers at {at_L}",
    )  # fmt: skip
    for key in (ours, lin):
        v = _variant(key)
        targets[f"{v}:decode_of_bound"] = target(
            prec(key, "float32", "decode_of_bound"), ">=", 0.7,
            f"{v} decode b1 fp32 at {at_L} / matvec bandwidth bound",
        )  # fmt: skip
        targets[f"{v}:int8_decode_vs_float32"] = target(
            prec(key, "float32", "decode_vs_float32", "int8"), ">=", 2,
            f"{v} decode b1 int8 / fp32 at {at_L}",
        )  # fmt: skip
        targets[f"{v}:bf16_prefill_vs_float32"] = target(
            prec(key, "bfloat16", "prefill_vs_float32"), ">=", 2,
            f"{v} prefill bf16 / fp32 at {at_L}",
        )  # fmt: skip
        targets[f"{v}:bf16_prefill_of_gemm"] = target(
            prec(key, "bfloat16", "prefill_of_gemm"), ">=", 0.5,
            f"{v} prefill bf16 at {at_L} / bf16 GEMM peak",
        )  # fmt: skip
        targets[f"{v}:batched_decode_of_gemm"] = target(
            (batched.get(key) or {}).get(f"decode_of_gemm_b{cfg.batch}"), ">=", 0.5,
            f"{v} decode batch {cfg.batch} / fp32 GEMM peak",
        )  # fmt: skip
    with torch.device("meta"):
        params = HybridLM(HybridConfig.from_preset(p)).param_count()
    return {
        "benchmark": "generate",
        "config": asdict(cfg),
        "model": {"preset": p, "rotary_dim": "full head", "postnorm": True, "params": params},
        "machine": describe_machine("cpu"),
        "roofline": roofline.to_dict(),
        "reference_rel_err_vs_transformers": err,
        "context": context_rows,
        "batched": batched,
        "continuation": continuation,
        "precision": precision,
        "failed": failed,
        "targets": targets,
    }


def _precision_name(e: dict) -> str:
    return {"float32": "fp32", "bfloat16": "bf16"}[e["dtype"]] + (
        f" + {e['quantize']} weights" if e["quantize"] else ""
    )


def format_table(report: dict) -> str:
    """Markdown: per series and context, prefill tok/s (and its fraction of the GEMM peak),
    decode tok/s (and its fraction of the bandwidth bound), peak MB, cache MB; then batched
    decode, continuation, the precision table, the roofline and the targets."""
    lines = [
        "| series | context | prefill tok/s | of GEMM | decode tok/s | of bound | peak MB | "
        "cache MB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for key, rows in report["context"].items():
        for r in rows:
            cache = r.get("cache_bytes", {}).get("total")
            lines.append(
                f"| {key} | {r['context']:,} | {fmt(r['context'] / r['prefill_s'], ',.0f')} | "
                f"{fmt(r.get('prefill_of_gemm'), '.2f')} | {fmt(r['decode_tok_s'], ',.1f')} | "
                f"{fmt(r.get('decode_of_bound'), '.2f')} | "
                f"{fmt(r['peak_bytes'] / 2**20, ',.0f')} | "
                f"{fmt(None if cache is None else cache / 2**20, ',.1f')} |"
            )
    cfg = report["config"]
    B = cfg["batch"]
    lines += [
        "",
        f"| series | decode tok/s batch 1 | of bound | batch {B} | of GEMM |",
        "|---|---|---|---|---|",
    ]
    for key, r in report["batched"].items():
        r = r or {}
        cells = [fmt(r.get("decode_tok_s_b1"), ",.1f"), fmt(r.get("decode_of_bound_b1"), ".2f"),
                 fmt(r.get(f"decode_tok_s_b{B}"), ",.1f"),
                 fmt(r.get(f"decode_of_gemm_b{B}"), ".2f")]  # fmt: skip
        lines.append(f"| {key} | " + " | ".join(cells) + " |" + ("" if r else " failed"))
    lines += [
        "",
        f"| series | {cfg['suffix']:,} tokens after a cached {cfg['prefix']:,}-token prefix, "
        "tok/s | the same tokens fresh, tok/s |",
        "|---|---|---|",
    ]
    for key, r in report["continuation"].items():
        cont = fmt(r and cfg["suffix"] / r["continued_s"], ",.0f")
        fresh = fmt(r and cfg["suffix"] / r["fresh_s"], ",.0f")
        lines.append(f"| {key} | {cont} | {fresh} |" + ("" if r else " failed"))
    if report.get("precision"):
        lines += [
            "",
            f"| series | precision ({cfg['precision_context']:,}-token prompt) | prefill tok/s "
            "| × fp32 | of GEMM | decode tok/s | × fp32 | of bound | bound tok/s |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for e in report["precision"]:
            cells = [
                fmt(e.get("prefill_tok_s"), ",.0f"), fmt(e.get("prefill_vs_float32"), ".2f"),
                fmt(e.get("prefill_of_gemm"), ".2f"), fmt(e.get("decode_tok_s"), ",.1f"),
                fmt(e.get("decode_vs_float32"), ".2f"), fmt(e.get("decode_of_bound"), ".2f"),
                fmt(e.get("decode_bound_tok_s"), ",.0f"),
            ]  # fmt: skip
            lines.append(
                f"| {e['series']} | {_precision_name(e)} | " + " | ".join(cells) + " |"
                + ("" if e["result"] else " failed")
            )  # fmt: skip
    m, model = report["machine"], report["model"]
    lines += [
        "",
        f"machine: {m['cpu']}, {m['torch_threads']} threads, torch {m['torch']}; "
        f"{model['preset']}: {model['params']['total'] / 1e6:.1f}M params, fp32 unless "
        "the precision table says otherwise",
        Roofline.from_dict(report["roofline"]).summary(),
        "bounds: decode batch 1 = matrix-vector GB/s of the weights' dtype ÷ bytes read per "
        "token (active weights, LM head, lightning states read and written, softmax KV); "
        f"prefill and batch-{B} decode: FLOPs per token × tok/s ÷ GEMM peak of the dtype",
        *filter(None, [failed_line(report.get("failed", []))]),
        targets_line(report["targets"]),
    ]
    errs = report.get("precision_rel_err_vs_float32")
    if errs:
        checked = ", ".join(f"{k} {v:.1e}" for k, v in errs.items())
        lines.insert(-1, f"precision check, logits vs fp32 (relative error): {checked}")
    return "\n".join(lines)


def _write(report: dict, cfg: GenerateBenchConfig) -> None:
    write_results(
        results_stem(cfg), report, format_table(report), plot_generate, overwrite=cfg.overwrite
    )


def plot_generate(report: dict, path: Path) -> None:
    """Three panels vs context length: decode tok/s, prefill tok/s, cache MB; a fourth with
    the precision table's fractions of bound (decode: bandwidth; prefill: GEMM peak)."""
    from lightlong.plot import bars, pyplot, save, series, tidy

    fig, axes = pyplot().subplots(1, 4, figsize=(20, 4.2))
    panels = (
        ("decode tok/s (batch 1)", lambda r: r["decode_tok_s"]),
        ("prefill tok/s", lambda r: r["context"] / r["prefill_s"]),
        ("cache MB", lambda r: r["cache_bytes"]["total"] / 2**20 if "cache_bytes" in r else None),
    )
    for ax, (title, value) in zip(axes, panels, strict=False):
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
    frac = axes[3]
    entries = report.get("precision", [])
    names = [f"{e['series'].split(':', 1)[1]}\n{_precision_name(e)}" for e in entries]
    for i, (key, label) in enumerate(
        (("decode_of_bound", "decode b1 / bandwidth bound"), ("prefill_of_gemm", "prefill / GEMM"))
    ):
        values = [e.get(key) or 0 for e in entries]
        frac.bar([j + 0.4 * i for j in range(len(entries))], values, width=0.4, label=label,
                 **bars(i))  # fmt: skip
    frac.set_xticks([j + 0.2 for j in range(len(entries))], names, fontsize=7, rotation=30)
    frac.set_title(
        f"fraction of bound, {report['config']['precision_context']:,}-token prompt", fontsize=10
    )
    frac.grid(True, axis="y", alpha=0.3)
    if entries:
        frac.legend(fontsize=8)
    m = report["machine"]
    fig.suptitle(
        f"{report['model']['preset']} model inference — {m['cpu']} ({m['torch_threads']} threads)",
        fontsize=9,
    )
    tidy(*axes)
    save(fig, path, dpi=120)
