"""`lightlong bench attention`: lightning attention vs causal softmax SDPA, T = 1K ... 1M.

Every figure comes from one run: each length is measured in a fresh process (so peak
memory is that length's own), the machine's GEMM rates (float32 and bfloat16) are measured
in the same run, and nothing is timed unless the op first matches its float64 reference on
these shapes (bfloat16: within twice the error of a plain bfloat16 implementation).
Beside the float32 forward it times the bfloat16 forward, and forward tok/s in one plain
Python process (glibc's malloc as is: what a library user gets) at 4K and 128K.
On CUDA (`--device cuda`, see `attention_cuda.py`) it also compares lightning's Triton
and torch backends, flash-linear-attention and FlashAttention, and times decode steps.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from lightlong.bench.machine import (
    Roofline,
    describe_machine,
    matmul_gflops,
    measure_roofline,
    sync,
)
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
    bf16: bool = True
    """Also time lightning's forward in bfloat16 at every length (when dtype is float32):
    tok/s, the ratio to float32 and the fraction of the bfloat16 GEMM peak."""
    plain_lengths: list[int] = field(default_factory=lambda: [4096, 131072])
    """Lengths whose forward tok/s is measured in one plain Python process (no
    keep_freed_memory, glibc's malloc as is), outputs dropped between calls as a library
    user would; the target compares the last with the first. Empty: not measured."""
    out_dir: str = "benchmarks/results"
    """Where the JSON, Markdown and PNG go."""
    overwrite: bool = False
    """Replace result files already in out_dir (else the run stops before measuring)."""
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
        if any(t < 1 for t in self.plain_lengths):
            raise ValueError(f"plain_lengths must be positive, got {self.plain_lengths}")
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


def _errors_vs_float64(
    cfg: AttentionBenchConfig, block: int, dtype: torch.dtype, ops: dict[str, Callable]
) -> dict[str, list[float]]:
    """Relative errors of o, dq, dk, dv of each op(q, k, v, decay) -> o, run in dtype,
    against the float64 naive op on the same values: a short slice (3 blocks + 5 tokens)
    of the benchmark's shapes."""
    torch.manual_seed(0)
    T = 3 * block + 5
    H, D = cfg.heads, cfg.head_dim
    decay = decay_rates(H, 0, 80).to(cfg.device)
    x64 = [torch.randn(1, T, H, D, dtype=torch.float64, device=cfg.device) for _ in range(3)]
    do = torch.randn(1, T, H, D, dtype=torch.float64, device=cfg.device)
    x64 = [x.to(dtype).double().requires_grad_(True) for x in x64]  # the values dtype holds
    ref, _ = lightning_attn_naive(*x64, decay)
    expected = [ref, *torch.autograd.grad(ref, x64, do)]
    errors = {}
    for name, op in ops.items():
        xs = [x.detach().to(dtype).requires_grad_(True) for x in x64]
        out = op(*xs, decay)
        got = [out, *torch.autograd.grad(out, xs, do.to(dtype))]
        errors[name] = [
            ((a.double() - b).norm() / b.norm()).item() for a, b in zip(got, expected, strict=True)
        ]
    return errors


def check_against_reference(
    cfg: AttentionBenchConfig, block: int, op: Callable | None = None
) -> float:
    """Max relative error of an op (forward and gradients) vs float64 naive, same H, D, C.

    op(q, k, v, decay) -> o; None means `lightning_attn` with block size `block`. Runs a
    short slice (3 blocks + 5 tokens) of the benchmark's shapes in cfg.dtype.
    """
    if op is None:

        def op(q, k, v, decay):
            return lightning_attn(q, k, v, decay, block_size=block)[0]

    return max(_errors_vs_float64(cfg, block, getattr(torch, cfg.dtype), {"op": op})["op"])


def check_low_precision(cfg: AttentionBenchConfig, block: int, dtype: str) -> tuple[float, float]:
    """The op's low-precision rule on the benchmark's shapes: (worst ratio of lightning's
    error to the naive op's error in `dtype`, over o, dq, dk, dv; lightning's worst error).
    The rule holds when the ratio is at most 2."""
    errors = _errors_vs_float64(
        cfg,
        block,
        getattr(torch, dtype),
        {
            "op": lambda q, k, v, decay: lightning_attn(q, k, v, decay, block_size=block)[0],
            "naive": lambda q, k, v, decay: lightning_attn_naive(q, k, v, decay)[0],
        },
    )
    worst = max(a / b for a, b in zip(errors["op"], errors["naive"], strict=True))
    return worst, max(errors["op"])


def lightning_flops(T: int, B: int, H: int, K: int, V: int, C: int) -> float:
    """Forward FLOPs of the tiled op: per token and head 2·C·(K+V) (intra) + 4·K·V (inter).

    The work the algorithm does, not the least the math needs: each block computes its
    full C×C score matrix (masked after) and the full [P | q ⊙ a] @ [v ; S] product, so
    the count is 2·C·K (q kᵀ) + 2·(C+K)·V (the fused output product) + 2·K·V ((k ⊙ b)ᵀ v)
    per token and head; elementwise work is not counted.
    """
    return B * T * H * (2 * C * (K + V) + 4 * K * V)


def results_stem(cfg: AttentionBenchConfig) -> Path:
    """Where the results go, without the suffix."""
    return Path(cfg.out_dir) / (
        f"attention-{cfg.device.split(':')[0]}" + ("-quick" if cfg.quick else "")
    )


def measure_plain_process(spec: dict) -> dict:
    """Forward tok/s of `lightning_attn` at each of spec["lengths"], in this process as a
    library user runs it: no keep_freed_memory, no allocator setting, each output dropped
    before the next call. Rounds alternate the lengths (so a noisy moment hits all of them)
    and each length keeps its best time.

    spec: lengths, B, H, K, V, dtype, device, block_size, budget_s (seconds per length and
    round), rounds.
    """
    from lightlong.runtime import parse_dtype

    B, H, K, V, device = (spec[x] for x in ("B", "H", "K", "V", "device"))
    dtype = parse_dtype(spec["dtype"])
    decay = decay_rates(H, 0, 80, device=device)
    gen = torch.Generator().manual_seed(0)
    inputs = {
        T: [torch.randn(B, T, H, D, generator=gen).to(device, dtype) for D in (K, K, V)]
        for T in spec["lengths"]
    }

    def once(T: int) -> float:
        sync(device)
        t0 = time.perf_counter()
        o = lightning_attn(*inputs[T], decay, block_size=spec["block_size"])[0]
        sync(device)
        del o
        return time.perf_counter() - t0

    best = {}
    with torch.no_grad():
        for T in spec["lengths"]:
            best[T] = once(T)  # the first call of a length allocates what later calls reuse
        for _ in range(spec["rounds"]):
            for T in spec["lengths"]:
                reps = max(1, min(20, int(spec["budget_s"] / best[T])))
                best[T] = min(best[T], *(once(T) for _ in range(reps)))
    return {"fwd_tok_s": {str(T): B * T / t for T, t in best.items()}}


def run_plain_process(spec: dict, timeout_s: float, failed: list[dict]) -> dict | None:
    """`measure_plain_process(spec)` in a new interpreter that sets nothing up first; None
    (and an entry in failed) if it fails."""
    return run_in_fresh_process(
        spec, timeout_s, failed, module="lightlong.bench.attention",
        what=f"lightning plain process T={spec['lengths']}",
    )  # fmt: skip


def run_attention_bench(cfg: AttentionBenchConfig) -> dict:
    """Measures, prints the table, writes JSON + PNG; returns the report dict."""
    cfg.validate()
    if cfg.device.startswith("cuda"):
        from lightlong.bench.attention_cuda import run_attention_bench_cuda

        return run_attention_bench_cuda(cfg)
    check_overwrite(results_stem(cfg), cfg.overwrite)
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
    bf16 = cfg.bf16 and cfg.dtype == "float32"
    bf16_check = None
    if bf16:
        worst, bf16_err = check_low_precision(cfg, block, "bfloat16")
        if not worst <= 2.0:
            raise SystemExit(
                f"bfloat16 check failed: lightning's error {bf16_err:.2e} is {worst:.2f}x a "
                "plain bfloat16 implementation's (the rule: at most 2x); no numbers printed"
            )
        bf16_check = {"max_rel_err": bf16_err, "worst_ratio_to_naive": worst}
        log(f"bfloat16 check passed: error {bf16_err:.1e}, at most {worst:.2f}x naive bf16's")

    roofline = measure_roofline(cfg.device)
    log(roofline.summary())
    dtypes = [cfg.dtype] + (["bfloat16"] if bf16 and cfg.dtype != "bfloat16" else [])
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
    failed: list[dict] = []
    sdpa_fwd_done = sdpa_bwd_done = True
    last_sdpa: dict = {}
    for T in lengths:
        t0 = time.perf_counter()
        modes = ["fwd", "fwdbwd"] if cfg.fwdbwd_max_len >= T else ["fwd"]
        spec = {**base, "op": "lightning", "T": T, "block_size": block}
        lit = run_in_fresh_process({**spec, "modes": modes}, 1800, failed)
        row = {"T": T, "lightning": lit}
        if bf16:
            bf = {**spec, "dtype": "bfloat16", "modes": ["fwd"]}
            row["lightning_bf16"] = run_in_fresh_process(bf, 1800, failed)
        sdpa_modes = []
        for mode, ok in (("fwd", sdpa_fwd_done), ("fwdbwd", sdpa_bwd_done)):
            prev = last_sdpa.get(f"{mode}_s")
            predicted = prev * (T / last_sdpa["T"]) ** 2 if prev else 0.0
            if ok and predicted <= cfg.sdpa_limit_s:
                sdpa_modes.append(mode)
        sdpa_fwd_done, sdpa_bwd_done = "fwd" in sdpa_modes, "fwdbwd" in sdpa_modes
        if sdpa_modes:
            sd = run_in_fresh_process(
                {**base, "op": "sdpa", "T": T, "modes": sdpa_modes}, 1800, failed
            )
            row["sdpa"] = sd
            if sd:
                last_sdpa = {"T": T, **sd}
            else:
                sdpa_fwd_done = sdpa_bwd_done = False
        rows.append(row)
        log(_progress_line(row, time.perf_counter() - t0))

    plain = None
    if cfg.plain_lengths:
        plain_spec = {**base, "lengths": sorted(set(cfg.plain_lengths)), "block_size": block,
                      "budget_s": 1.0, "rounds": 3}  # fmt: skip
        plain = run_plain_process(plain_spec, 1800, failed)
        if plain:
            log(f"plain process: fwd tok/s {plain['fwd_tok_s']}")

    # the better of the run's two measurements of each GEMM peak (before and after)
    peaks = {
        d: max(roofline.gemm(d), matmul_gflops(2048, getattr(torch, d), cfg.device, reps=3))
        for d in dtypes
    }
    report = _summarise(cfg, rows, block, peaks, err, plain, bf16_check, roofline, failed)
    print(format_table(report))
    write_results(
        results_stem(cfg), report, format_table(report), plot_attention, overwrite=cfg.overwrite
    )
    return report


def _progress_line(row: dict, elapsed: float) -> str:
    parts = [f"T={row['T']:>8}"]
    for name in ("lightning", "lightning_bf16", "sdpa"):
        r = row.get(name) or {}
        for mode in ("fwd", "fwdbwd"):
            if f"{mode}_s" in r:
                parts.append(f"{name} {mode} {r[f'{mode}_s']:.3f}s")
    return "  ".join(parts) + f"  ({elapsed:.0f}s)"


def _summarise(
    cfg: AttentionBenchConfig,
    rows: list[dict],
    block: int,
    peaks: dict[str, float],
    err: float,
    plain: dict | None,
    bf16_check: dict | None,
    roofline: Roofline,
    failed: list[dict],
) -> dict:
    H, D, B = cfg.heads, cfg.head_dim, cfg.batch
    peak = peaks[cfg.dtype]
    table = []
    for r in rows:
        lit, sd = r.get("lightning") or {}, r.get("sdpa") or {}
        bf = r.get("lightning_bf16") or {}
        T = r["T"]
        flops = lightning_flops(T, B, H, D, D, block)
        entry = {"T": T}
        if "fwd_s" in lit:
            entry["fwd_tok_s"] = B * T / lit["fwd_s"]
            entry["fwd_gflops"] = flops / lit["fwd_s"] / 1e9
            entry["fwd_of_gemm"] = entry["fwd_gflops"] / peak
            entry["fwd_peak_mb"] = lit["fwd_peak_bytes"] / 2**20
            entry["fwd_s"] = lit["fwd_s"]
        if "fwd_s" in bf:
            entry["bf16_fwd_s"] = bf["fwd_s"]
            entry["bf16_fwd_tok_s"] = B * T / bf["fwd_s"]
            entry["bf16_fwd_gflops"] = flops / bf["fwd_s"] / 1e9
            entry["bf16_fwd_of_gemm"] = entry["bf16_fwd_gflops"] / peaks["bfloat16"]
            entry["bf16_speedup_fwd"] = ratio(entry["bf16_fwd_tok_s"], entry.get("fwd_tok_s"))
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
        return next((e[key] for e in table if e["T"] == T and e.get(key) is not None), None)

    longest_T = max((T for T in (e["T"] for e in table) if at(T, "speedup_fwd")), default=None)
    sdpa_pts = [(e["T"], e["sdpa_fwd_s"]) for e in table if "sdpa_fwd_s" in e][-3:]
    lit_pts = [(e["T"], e["fwd_s"]) for e in table if "fwd_s" in e][-3:]
    extrapolated = None
    if len(sdpa_pts) >= 3 and len(lit_pts) >= 3:  # a power law from two noisy points is not one
        c_s, p_s = fit_power(sdpa_pts)
        c_l, p_l = fit_power(lit_pts)
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
    plain_ratio = None
    if plain:
        tok = plain["fwd_tok_s"]
        first, last = str(min(cfg.plain_lengths)), str(max(cfg.plain_lengths))
        plain_ratio = ratio(tok.get(last), tok.get(first))
        plain = {**plain, "ratio": plain_ratio, "lengths": [int(first), int(last)]}
    fp32_d128 = cfg.dtype == "float32" and D == 128
    targets = {
        "fwd_flat_1M": target(
            ratio(at(2**20, "fwd_tok_s"), at(4096, "fwd_tok_s")), ">=", 0.85, "fwd tok/s 1M/4K"
        ),
        "fwdbwd_flat_256K": target(
            ratio(at(2**18, "fwdbwd_tok_s"), at(4096, "fwdbwd_tok_s")), ">=", 0.85,
            "fwd+bwd tok/s 256K/4K",
        ),
        "fwd_matmul_share_64K": target(
            at(2**16, "fwd_of_gemm"), ">=", 0.5, "fwd GFLOP/s at 64K / GEMM"
        ),
        "fwd_fp32_gemm_64K_d128": target(
            at(2**16, "fwd_of_gemm") if fp32_d128 else None, ">=", 0.6,
            "fp32 fwd at 64K, d=128 / fp32 GEMM",
        ),
        "bf16_speedup_64K": target(
            at(2**16, "bf16_speedup_fwd"), ">=", 1.5, "bf16 / fp32 fwd tok/s at 64K"
        ),
        "plain_flat": target(
            plain_ratio, ">=", 0.9,
            f"plain-process fwd tok/s {_short_T(max(cfg.plain_lengths or [0]))}/"
            f"{_short_T(min(cfg.plain_lengths or [0]))}",
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
        "gemm_gflops": peaks,
        "roofline": roofline.to_dict(),
        "reference_max_rel_err": err,
        "bf16_check": bf16_check,
        "rows": table,
        "plain_process": plain,
        "longest_common_T": longest_T,
        "speedup_fwd_longest_common": at(longest_T, "speedup_fwd") if longest_T else None,
        "extrapolated_1M": extrapolated,
        "targets": targets,
        "failed": failed,
    }


def _short_T(T: int) -> str:
    """4096 -> '4K', 131072 -> '128K', 1048576 -> '1M'."""
    if T >= 2**20 and T % 2**20 == 0:
        return f"{T >> 20}M"
    return f"{T >> 10}K" if T >= 1024 and T % 1024 == 0 else str(T)


_SHORT = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def format_table(report: dict) -> str:
    """The report's rows as a Markdown table, then the ratios."""
    cfg = report["config"]
    dt = _SHORT.get(cfg["dtype"], cfg["dtype"])
    bf16 = any("bf16_fwd_s" in e for e in report["rows"])
    bf16_cols = " bf16 fwd tok/s | bf16 / fp32 | bf16 % bf16 GEMM |" if bf16 else ""
    lines = [
        f"| T | fwd tok/s | fwd GFLOP/s | % {dt} GEMM |{bf16_cols} fwd+bwd tok/s | "
        "fwd peak MB | fwd+bwd peak MB | SDPA fwd s | SDPA fwd+bwd s | speedup fwd | "
        "speedup fwd+bwd |",
        "|" + "---|" * (14 if bf16 else 11),
    ]
    for e in report["rows"]:
        frac = e.get("fwd_of_gemm")
        cells = [
            f"{e['T']}",
            fmt(e.get("fwd_tok_s"), ",.0f"),
            fmt(e.get("fwd_gflops"), ".1f"),
            fmt(frac and 100 * frac, ".0f"),
        ]
        if bf16:
            bfrac = e.get("bf16_fwd_of_gemm")
            cells += [
                fmt(e.get("bf16_fwd_tok_s"), ",.0f"),
                fmt(e.get("bf16_speedup_fwd"), ".2f"),
                fmt(bfrac and 100 * bfrac, ".0f"),
            ]
        cells += [
            fmt(e.get("fwdbwd_tok_s"), ",.0f"),
            fmt(e.get("fwd_peak_mb"), ",.0f"),
            fmt(e.get("fwdbwd_peak_mb"), ",.0f"),
            fmt(e.get("sdpa_fwd_s"), ".3f"),
            fmt(e.get("sdpa_fwdbwd_s"), ".3f"),
            fmt(e.get("speedup_fwd"), ".1f"),
            fmt(e.get("speedup_fwdbwd"), ".1f"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    m = report["machine"]
    gemm = ", ".join(f"{_SHORT.get(k, k)} {v:,.0f}" for k, v in report["gemm_gflops"].items())
    lines.append("")
    lines.append(
        f"machine: {m['cpu']}, {m['torch_threads']} threads, torch {m['torch']}; "
        f"GEMM {gemm} GFLOP/s; block {report['block_size']}; "
        f"B={cfg['batch']} H={cfg['heads']} K=V={cfg['head_dim']} {cfg['dtype']}"
    )
    plain = report.get("plain_process")
    if plain:
        tok = ", ".join(f"{_short_T(int(T))} {v:,.0f}" for T, v in plain["fwd_tok_s"].items())
        lines.append(
            f"plain process (no keep_freed_memory, glibc malloc as is; {cfg['dtype']}): "
            f"fwd tok/s {tok}; {fmt(plain['ratio'], '.2f')} of the shortest's"
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
    failed = failed_line(report.get("failed") or [])
    if failed:
        lines.append(failed)
    return "\n".join(lines)


def plot_attention(report: dict, path: Path) -> None:
    """Log-log time vs length: lightning (float32, bfloat16) and SDPA, forward and
    forward+backward."""
    from lightlong.plot import predicted, pyplot, save, tidy

    rows = report["rows"]
    fig, ax = pyplot().subplots(figsize=(7, 4.5))
    dt = report["config"]["dtype"]
    # op by colour and marker, pass by dash
    series = [
        ("fwd_s", f"lightning forward ({dt})", "C0", "o", "-"),
        ("bf16_fwd_s", "lightning forward (bfloat16)", "C2", "^", "-"),
        ("fwdbwd_s", f"lightning forward+backward ({dt})", "C0", "o", "--"),
        ("sdpa_fwd_s", "softmax SDPA forward", "C3", "s", "-"),
        ("sdpa_fwdbwd_s", "softmax SDPA forward+backward", "C3", "s", "--"),
    ]
    for key, label, color, marker, dash in series:
        pts = [(r["T"], r[key]) for r in rows if key in r]
        if pts:
            ax.plot(*zip(*pts, strict=True), dash, marker=marker, color=color, label=label)
    ex = report["extrapolated_1M"]
    if ex:  # one predicted point, no line drawn to it
        predicted(ax, ex["T"], ex["sdpa_fwd_s"], "C3", "softmax SDPA forward at 1M")
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


if __name__ == "__main__":  # the plain-process measurement (`run_plain_process`)
    print(json.dumps(measure_plain_process(json.loads(sys.argv[1]))))
