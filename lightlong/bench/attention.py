"""`lightlong bench attention`: lightning attention vs causal softmax SDPA, T = 1K ... 1M.

Every figure comes from one run: each length is measured in a fresh process (so peak
memory is that length's own), the machine's matmul rate is measured in the same run, and
nothing is timed unless the op first matches its float64 reference on these shapes.
On CUDA (`--device cuda`, see `attention_cuda.py`) it also compares lightning's Triton
and torch backends, flash-linear-attention and FlashAttention, and times decode steps.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from lightlong.bench.machine import describe_machine, matmul_gflops
from lightlong.bench.report import fmt, ratio, target, targets_line, write_results
from lightlong.bench.worker import log, run_in_fresh_process
from lightlong.ops import decay_rates, lightning_attn, lightning_attn_naive
from lightlong.ops.lightning.api import DEFAULT_BLOCK_SIZE

FULL_LENGTHS = [2**i for i in range(10, 21)]  # 1K ... 1M
QUICK_LENGTHS = [2**i for i in range(10, 17)]  # 1K ... 64K


@dataclass
class AttentionBenchConfig:
    """What `lightlong bench attention` measures."""

    quick: bool = False
    """Lengths up to 64K only (the `make run` form)."""
    lengths: list[int] = field(default_factory=list)
    """Sequence lengths; empty means 1K ... 1M (quick: ... 64K)."""
    batch: int = 1
    """Batch size B."""
    heads: int = 8
    """Heads H."""
    head_dim: int = 128
    """K = V head dim."""
    dtype: str = "float32"
    """float32, bfloat16 or float16."""
    device: str = "cpu"
    """Torch device; "cuda" runs the GPU comparison (benchmarks/attention-cuda.toml)."""
    block_size: int = 0
    """Lightning block size C; 0 means the op's default."""
    fwdbwd_max_len: int = 262144
    """Longest length with forward+backward (8 tensors of B·T·H·D floats must fit)."""
    sdpa_limit_s: float = 60.0
    """Softmax lengths whose predicted time exceeds this are skipped."""
    out_dir: str = "benchmarks/results"
    """Where the JSON and PNG go."""
    tokens: int = 0
    """CUDA: tokens per measurement, B = max(batch, tokens // T) (short rows batch up); 0: batch."""
    decode_batches: list[int] = field(default_factory=list)
    """CUDA: decode batch sizes timed; empty means 1, 2, 4 ... 256."""
    decode_heads: int = 64
    """CUDA: heads H of the decode benchmark (K = V = head_dim)."""

    def validate(self) -> None:
        """Raises ValueError naming the field that is out of range."""
        for name in ("batch", "heads", "head_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {self.dtype!r}")
        if self.block_size < 0:
            raise ValueError(f"block_size must be >= 0 (0 = default), got {self.block_size}")
        if any(t < 1 for t in self.lengths):
            raise ValueError(f"lengths must be positive, got {self.lengths}")
        if self.sdpa_limit_s <= 0:
            raise ValueError(f"sdpa_limit_s must be > 0, got {self.sdpa_limit_s}")
        if self.tokens < 0:
            raise ValueError(f"tokens must be >= 0 (0 = batch), got {self.tokens}")
        if self.decode_heads < 1 or any(b < 1 for b in self.decode_batches):
            raise ValueError(
                f"decode_heads and decode_batches must be >= 1, got {self.decode_heads}, "
                f"{self.decode_batches}"
            )
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(
                f"device {self.device!r}: torch sees no CUDA device (torch {torch.__version__}, "
                f"CUDA build {torch.version.cuda}); run on a GPU machine with a CUDA build of "
                "torch, or use --device cpu"
            )


def check_against_reference(
    cfg: AttentionBenchConfig, block: int, op: Callable | None = None
) -> float:
    """Max relative error of an op (forward and gradients) vs float64 naive, same H, D, C.

    op(q, k, v, decay) -> o; None means `lightning_attn` with block size `block`. Runs a
    short slice (3 blocks + 5 tokens) of the benchmark's shapes.
    """
    torch.manual_seed(0)
    T = 3 * block + 5
    H, D = cfg.heads, cfg.head_dim
    dtype = getattr(torch, cfg.dtype)
    decay = decay_rates(H, 0, 80).to(cfg.device)
    x64 = [torch.randn(1, T, H, D, dtype=torch.float64, device=cfg.device) for _ in range(3)]
    xs = [x.to(dtype).requires_grad_(True) for x in x64]
    x64 = [x.requires_grad_(True) for x in x64]
    do = torch.randn(1, T, H, D, dtype=torch.float64, device=cfg.device)
    ref, _ = lightning_attn_naive(*x64, decay)
    ref_grads = torch.autograd.grad(ref, x64, do)
    if op is None:
        out, _ = lightning_attn(*xs, decay, block_size=block)
    else:
        out = op(*xs, decay)
    grads = torch.autograd.grad(out, xs, do.to(dtype))
    errs = [
        ((a.double() - b).norm() / b.norm()).item()
        for a, b in zip([out, *grads], [ref, *ref_grads], strict=True)
    ]
    return max(errs)


def lightning_flops(T: int, B: int, H: int, K: int, V: int, C: int) -> float:
    """Forward FLOPs of the tiled op: per token and head 2·C·(K+V) (intra) + 4·K·V (inter)."""
    return B * T * H * (2 * C * (K + V) + 4 * K * V)


def _fit_power(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares fit of y = c · x^p in log-log space; returns (c, p)."""
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    sxx = sum((a - mx) ** 2 for a in lx)
    p = sum((a - mx) * (b - my) for a, b in zip(lx, ly, strict=True)) / sxx if sxx else 1.0
    return math.exp(my - p * mx), p


def run_attention_bench(cfg: AttentionBenchConfig) -> dict:
    """Measures, prints the table, writes JSON + PNG; returns the report dict."""
    cfg.validate()
    if cfg.device.startswith("cuda"):
        from lightlong.bench.attention_cuda import run_attention_bench_cuda

        return run_attention_bench_cuda(cfg)
    lengths = sorted(cfg.lengths or (QUICK_LENGTHS if cfg.quick else FULL_LENGTHS))
    H, D, B = cfg.heads, cfg.head_dim, cfg.batch
    block = cfg.block_size or DEFAULT_BLOCK_SIZE

    err = check_against_reference(cfg, block)
    tol = 1e-4 if cfg.dtype == "float32" else 2e-2
    if not err < tol:
        raise SystemExit(
            f"reference check failed: relative error {err:.2e} >= {tol:.0e} vs float64 naive "
            f"(H={H}, D={D}, block={block}); no numbers printed"
        )
    log(f"reference check passed: max relative error {err:.1e} (forward and gradients)")

    peak_before = matmul_gflops(device=cfg.device)
    log(f"matmul peak: {peak_before:.0f} GFLOP/s")
    base = {
        "kind": "attention",
        "B": B,
        "H": H,
        "K": D,
        "V": D,
        "dtype": cfg.dtype,
        "device": cfg.device,
    }
    rows = []
    sdpa_fwd_done = sdpa_bwd_done = True
    last_sdpa: dict = {}
    for T in lengths:
        t0 = time.perf_counter()
        modes = ["fwd", "fwdbwd"] if cfg.fwdbwd_max_len >= T else ["fwd"]
        lit = run_in_fresh_process(
            {**base, "op": "lightning", "T": T, "block_size": block, "modes": modes}, 1800
        )
        row = {"T": T, "lightning": lit}
        sdpa_modes = []
        for mode, ok in (("fwd", sdpa_fwd_done), ("fwdbwd", sdpa_bwd_done)):
            prev = last_sdpa.get(f"{mode}_s")
            predicted = prev * (T / last_sdpa["T"]) ** 2 if prev else 0.0
            if ok and predicted <= cfg.sdpa_limit_s:
                sdpa_modes.append(mode)
        sdpa_fwd_done, sdpa_bwd_done = "fwd" in sdpa_modes, "fwdbwd" in sdpa_modes
        if sdpa_modes:
            sd = run_in_fresh_process({**base, "op": "sdpa", "T": T, "modes": sdpa_modes}, 1800)
            row["sdpa"] = sd
            if sd:
                last_sdpa = {"T": T, **sd}
            else:
                sdpa_fwd_done = sdpa_bwd_done = False
        rows.append(row)
        log(_progress_line(row, time.perf_counter() - t0))

    peak = max(peak_before, matmul_gflops(device=cfg.device))
    report = _summarise(cfg, rows, block, peak, err)
    print(format_table(report))
    _write(report, cfg)
    return report


def _progress_line(row: dict, elapsed: float) -> str:
    lit, sd = row.get("lightning") or {}, row.get("sdpa") or {}
    parts = [f"T={row['T']:>8}"]
    for name, r in (("lightning", lit), ("sdpa", sd)):
        for mode in ("fwd", "fwdbwd"):
            if f"{mode}_s" in r:
                parts.append(f"{name} {mode} {r[f'{mode}_s']:.3f}s")
    return "  ".join(parts) + f"  ({elapsed:.0f}s)"


def _summarise(cfg: AttentionBenchConfig, rows: list[dict], block: int, peak: float, err):
    H, D, B = cfg.heads, cfg.head_dim, cfg.batch
    table = []
    for r in rows:
        lit, sd = r.get("lightning") or {}, r.get("sdpa") or {}
        T = r["T"]
        entry = {"T": T}
        if "fwd_s" in lit:
            entry["fwd_tok_s"] = B * T / lit["fwd_s"]
            entry["fwd_gflops"] = lightning_flops(T, B, H, D, D, block) / lit["fwd_s"] / 1e9
            entry["fwd_peak_mb"] = lit["fwd_peak_bytes"] / 2**20
            entry["fwd_s"] = lit["fwd_s"]
        if "fwdbwd_s" in lit:
            entry["fwdbwd_tok_s"] = B * T / lit["fwdbwd_s"]
            entry["fwdbwd_peak_mb"] = lit["fwdbwd_peak_bytes"] / 2**20
            entry["fwdbwd_s"] = lit["fwdbwd_s"]
        for mode in ("fwd", "fwdbwd"):
            if f"{mode}_s" in sd:
                entry[f"sdpa_{mode}_s"] = sd[f"{mode}_s"]
                entry[f"sdpa_{mode}_peak_mb"] = sd[f"{mode}_peak_bytes"] / 2**20
                if f"{mode}_s" in entry:
                    entry[f"speedup_{mode}"] = sd[f"{mode}_s"] / entry[f"{mode}_s"]
        table.append(entry)

    def at(T: int, key: str):
        return next((e[key] for e in table if e["T"] == T and key in e), None)

    longest_T = max((T for T in (e["T"] for e in table) if at(T, "speedup_fwd")), default=None)
    sdpa_pts = [(e["T"], e["sdpa_fwd_s"]) for e in table if "sdpa_fwd_s" in e][-3:]
    lit_pts = [(e["T"], e["fwd_s"]) for e in table if "fwd_s" in e][-3:]
    extrapolated = None
    if len(sdpa_pts) >= 2 and len(lit_pts) >= 2:
        c_s, p_s = _fit_power(*zip(*sdpa_pts, strict=True))
        c_l, p_l = _fit_power(*zip(*lit_pts, strict=True))
        T1M = 2**20
        lit_1m = at(T1M, "fwd_s") or c_l * T1M**p_l
        extrapolated = {
            "T": T1M,
            "sdpa_fwd_s": c_s * T1M**p_s,
            "sdpa_exponent": p_s,
            "lightning_fwd_s": lit_1m,
            "lightning_measured": at(T1M, "fwd_s") is not None,
            "speedup_fwd": c_s * T1M**p_s / lit_1m,
        }
    targets = {
        "fwd_flat_1M": target(
            ratio(at(2**20, "fwd_tok_s"), at(4096, "fwd_tok_s")), ">=", 0.85, "fwd tok/s 1M/4K"
        ),
        "fwdbwd_flat_256K": target(
            ratio(at(2**18, "fwdbwd_tok_s"), at(4096, "fwdbwd_tok_s")), ">=", 0.85,
            "fwd+bwd tok/s 256K/4K",
        ),
        "fwd_matmul_share_64K": target(
            ratio(at(2**16, "fwd_gflops"), peak), ">=", 0.5, "fwd GFLOP/s at 64K / matmul"
        ),
        "speedup_vs_sdpa_64K": target(
            at(2**16, "speedup_fwd"), ">=", 20, "speedup vs SDPA at 64K", ".0f"
        ),
        "fwdbwd_memory_linear": target(
            ratio(at(2**18, "fwdbwd_peak_mb"), at(2**16, "fwdbwd_peak_mb")), "<=", 4.4,
            "fwd+bwd peak 256K/64K",
        ),
    }  # fmt: skip
    return {
        "benchmark": "attention",
        "config": asdict(cfg),
        "block_size": block,
        "machine": describe_machine(cfg.device),
        "matmul_gflops": peak,
        "reference_max_rel_err": err,
        "rows": table,
        "longest_common_T": longest_T,
        "speedup_fwd_longest_common": at(longest_T, "speedup_fwd") if longest_T else None,
        "extrapolated_1M": extrapolated,
        "targets": targets,
    }


def format_table(report: dict) -> str:
    """The report's rows as a Markdown table, then the ratios."""
    lines = [
        "| T | fwd tok/s | fwd GFLOP/s | % matmul | fwd+bwd tok/s | fwd peak MB | "
        "fwd+bwd peak MB | SDPA fwd s | SDPA fwd+bwd s | speedup fwd | speedup fwd+bwd |",
        "|" + "---|" * 11,
    ]
    peak = report["matmul_gflops"]
    for e in report["rows"]:
        g = e.get("fwd_gflops")
        lines.append(
            f"| {e['T']} | {fmt(e.get('fwd_tok_s'), ',.0f')} | {fmt(g, '.1f')} | "
            f"{fmt(g and 100 * g / peak, '.0f')} | {fmt(e.get('fwdbwd_tok_s'), ',.0f')} | "
            f"{fmt(e.get('fwd_peak_mb'), ',.0f')} | {fmt(e.get('fwdbwd_peak_mb'), ',.0f')} | "
            f"{fmt(e.get('sdpa_fwd_s'), '.3f')} | {fmt(e.get('sdpa_fwdbwd_s'), '.3f')} | "
            f"{fmt(e.get('speedup_fwd'), '.1f')} | {fmt(e.get('speedup_fwdbwd'), '.1f')} |"
        )
    m = report["machine"]
    lines.append("")
    lines.append(
        f"machine: {m['cpu']}, {m['torch_threads']} threads, torch {m['torch']}; "
        f"matmul {peak:.0f} GFLOP/s; block {report['block_size']}; "
        f"B={report['config']['batch']} H={report['config']['heads']} "
        f"K=V={report['config']['head_dim']} {report['config']['dtype']}"
    )
    if report["longest_common_T"]:
        lines.append(
            f"lightning vs softmax SDPA at T={report['longest_common_T']} (longest both ran): "
            f"{report['speedup_fwd_longest_common']:.1f}x faster forward"
        )
    ex = report["extrapolated_1M"]
    if ex:
        which = "measured" if ex["lightning_measured"] else "extrapolated"
        lines.append(
            f"EXTRAPOLATED to T=1M: SDPA forward ~{ex['sdpa_fwd_s']:.0f}s "
            f"(fit T^{ex['sdpa_exponent']:.2f}) "
            f"vs lightning {ex['lightning_fwd_s']:.2f}s ({which}): ~{ex['speedup_fwd']:.0f}x"
        )
    lines.append(targets_line(report["targets"]))
    return "\n".join(lines)


def _write(report: dict, cfg: AttentionBenchConfig) -> None:
    stem = f"attention-{cfg.device.split(':')[0]}" + ("-quick" if cfg.quick else "")
    write_results(Path(cfg.out_dir) / stem, report, format_table(report), plot_attention)


def plot_attention(report: dict, path: Path) -> None:
    """Log-log time vs length: lightning and SDPA, forward and forward+backward."""
    from lightlong.plot import pyplot, save, tidy

    rows = report["rows"]
    fig, ax = pyplot().subplots(figsize=(7, 4.5))
    # op by colour and marker, pass by dash
    series = [
        ("fwd_s", "lightning forward", "C0", "o", "-"),
        ("fwdbwd_s", "lightning forward+backward", "C0", "o", "--"),
        ("sdpa_fwd_s", "softmax SDPA forward", "C3", "s", "-"),
        ("sdpa_fwdbwd_s", "softmax SDPA forward+backward", "C3", "s", "--"),
    ]
    for key, label, color, marker, dash in series:
        pts = [(r["T"], r[key]) for r in rows if key in r]
        if pts:
            ax.plot(*zip(*pts, strict=True), dash, marker=marker, color=color, label=label)
    ex = report["extrapolated_1M"]
    if ex:
        last = [(r["T"], r["sdpa_fwd_s"]) for r in rows if "sdpa_fwd_s" in r][-1]
        ax.plot(
            [last[0], ex["T"]],
            [last[1], ex["sdpa_fwd_s"]],
            ":",
            color="C3",
            label="softmax SDPA forward (extrapolated)",
        )
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length T (tokens)")
    ax.set_ylabel("time (s)")
    cfg, m = report["config"], report["machine"]
    ax.set_title(
        f"Causal attention, B={cfg['batch']} H={cfg['heads']} d={cfg['head_dim']} "
        f"{cfg['dtype']}\n{m['cpu']} ({m['torch_threads']} threads)",
        fontsize=9,
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    tidy(ax)
    save(fig, path, dpi=120)
