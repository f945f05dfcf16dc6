"""`lightlong bench attention --device cuda`: lightning attention's kernels on one GPU.

In one run: the GPU's bf16 matmul TFLOP/s and copy GB/s, then per length T = 512 ... 1M
(B = tokens // T rows) the forward and forward+backward time and TFLOP/s of

    triton  lightning_attn(backend="triton")      the fused kernels
    torch   lightning_attn(backend="torch")       the tiled torch path
    fla     flash-linear-attention's chunk_simple_gla with g_gamma = −decay, if installed
    sdpa    causal softmax SDPA, FlashAttention kernel

then decode µs/step and GB/s against batch size (`lightning_attn_step`, Triton and torch).
Every op is first checked against the float64 reference on the same H, d, block and dtype;
one that fails is not timed. Writes attention-cuda-<gpu>.{json,md,png}. (With
TRITON_INTERPRET=1 the same run works on CPU tensors at toy sizes: that is how it is tested
without a GPU.)
"""

from __future__ import annotations

import importlib.util
import time
from dataclasses import asdict
from pathlib import Path

import torch

from lightlong.bench.attention import AttentionBenchConfig, check_against_reference, lightning_flops
from lightlong.bench.machine import copy_gbps, describe_machine, matmul_gflops, slug
from lightlong.bench.report import (
    check_overwrite,
    fmt,
    ratio,
    target,
    targets_line,
    write_results,
)
from lightlong.bench.worker import log, run_in_fresh_process
from lightlong.ops import decay_rates, lightning_attn, lightning_attn_step
from lightlong.ops.lightning.api import DEFAULT_BLOCK_SIZE

CUDA_LENGTHS = [2**i for i in range(9, 21)]  # 512 ... 1M
DECODE_BATCHES = [2**i for i in range(9)]  # 1 ... 256
OPS = ("triton", "torch", "fla", "sdpa")
# time ∝ B·T^p at fixed H, d: linear for the lightning ops, quadratic for softmax
_EXPONENT = {"triton": 1, "torch": 1, "fla": 1, "sdpa": 2}


def _lightning_op(backend: str, block: int):
    def op(q, k, v, decay):
        return lightning_attn(q, k, v, decay, block_size=block, backend=backend)[0]

    return op


def _fla_op(q, k, v, decay):
    from fla.ops.simple_gla import chunk_simple_gla

    return chunk_simple_gla(q, k, v, g_gamma=-decay, scale=q.shape[-1] ** -0.5)[0]


def sdpa_flops(T: int, B: int, H: int, D: int) -> float:
    """Forward FLOPs of causal softmax attention: half of 4·T²·D per head (QKᵀ and PV)."""
    return 2 * B * H * T * T * D


def _check_ops(cfg: AttentionBenchConfig, block: int) -> tuple[list[str], dict]:
    """The ops that pass the reference check, and every op's error (or why it was left out)."""
    tol = 1e-4 if cfg.dtype == "float32" else 2e-2
    ops = {"triton": _lightning_op("triton", block), "torch": _lightning_op("torch", block)}
    errors: dict = {}
    if importlib.util.find_spec("fla") is not None:
        ops["fla"] = _fla_op
    else:
        errors["fla"] = "not installed (pip install flash-linear-attention)"
    passed = []
    for name, op in ops.items():
        err = check_against_reference(cfg, block, op)
        errors[name] = err
        if name in ("triton", "torch") and not err < tol:
            raise SystemExit(
                f"reference check failed for {name}: relative error {err:.2e} >= {tol:.0e} vs "
                f"float64 naive (H={cfg.heads}, D={cfg.head_dim}, block={block}); no numbers"
            )
        if err < tol:
            passed.append(name)
        log(f"reference check {name}: max relative error {err:.1e}")
    return [*passed, "sdpa"], errors


def _check_decode(cfg: AttentionBenchConfig) -> dict[str, float]:
    """Relative errors of the Triton decode step vs the torch step after 4 steps: o (in the
    inputs' dtype) and the float32 state."""
    B, H, D = 4, cfg.decode_heads, cfg.head_dim
    dtype = getattr(torch, cfg.dtype)
    decay = decay_rates(H, 0, 80, device=cfg.device)
    states = [torch.randn(B, H, D, D, device=cfg.device) for _ in range(2)]
    states[1].copy_(states[0])
    for _ in range(4):
        q, k, v = (torch.randn(B, 1, H, D, device=cfg.device, dtype=dtype) for _ in range(3))
        outs = [
            lightning_attn_step(q, k, v, decay, state, backend=backend)
            for state, backend in zip(states, ("triton", "torch"), strict=True)
        ]

    def err(a, b):
        return ((a.double() - b.double()).norm() / b.double().norm()).item()

    return {"o": err(*outs), "state": err(*states)}


def _time_lengths(cfg: AttentionBenchConfig, ops: list[str], block: int) -> list[dict]:
    """One row per length: each op's fwd/fwdbwd seconds, measured in fresh processes; an op
    whose predicted time passes sdpa_limit_s (or that failed) stops for longer lengths."""
    H, D = cfg.heads, cfg.head_dim
    lengths = sorted(cfg.lengths or CUDA_LENGTHS)
    last: dict[tuple[str, str], tuple[int, float]] = {}  # (op, mode) -> (B·T^p, seconds)
    stopped: set[tuple[str, str]] = set()
    rows = []
    for T in lengths:
        B = max(cfg.batch, cfg.tokens // T)
        row: dict = {"T": T, "B": B}
        t0 = time.perf_counter()
        for op in ops:
            work = B * T ** _EXPONENT[op]
            modes = []
            for mode in ("fwd", "fwdbwd") if cfg.fwdbwd_max_len >= T else ("fwd",):
                prev = last.get((op, mode))
                predicted = prev[1] * work / prev[0] if prev else 0.0
                if (op, mode) not in stopped and predicted <= cfg.sdpa_limit_s:
                    modes.append(mode)
                else:
                    stopped.add((op, mode))
            if not modes:
                continue
            spec = {"kind": "attention", "op": "lightning" if op in ("triton", "torch") else op,
                    "backend": op, "T": T, "B": B, "H": H, "K": D, "V": D, "dtype": cfg.dtype,
                    "device": cfg.device, "block_size": block, "modes": modes}  # fmt: skip
            result = run_in_fresh_process(spec, 1800)
            if result is None:
                stopped.update((op, m) for m in modes)
                continue
            for mode in modes:
                last[(op, mode)] = (work, result[f"{mode}_s"])
            row[op] = result
        rows.append(row)
        parts = [
            f"{op} {mode} {row[op][f'{mode}_s'] * 1e3:.2f}ms"
            for op in ops
            for mode in ("fwd", "fwdbwd")
            if f"{mode}_s" in row.get(op, {})
        ]
        log(f"T={T:>8} B={B:>5}  " + "  ".join(parts) + f"  ({time.perf_counter() - t0:.0f}s)")
    return rows


def _time_decode(cfg: AttentionBenchConfig) -> list[dict]:
    rows = []
    for B in cfg.decode_batches or DECODE_BATCHES:
        row: dict = {"B": B}
        for backend in ("triton", "torch"):
            spec = {"kind": "decode", "B": B, "H": cfg.decode_heads, "K": cfg.head_dim,
                    "V": cfg.head_dim, "dtype": cfg.dtype, "device": cfg.device,
                    "backend": backend, "steps": 100}  # fmt: skip
            result = run_in_fresh_process(spec, 600)
            if result is not None:
                row[backend] = {
                    "us": result["step_s"] * 1e6,
                    "gbps": result["bytes"] / result["step_s"] / 1e9,
                    "state_bytes": result["state_bytes"],
                }
        rows.append(row)
        log(f"decode B={B:>3}: " + "  ".join(f"{b} {r['us']:.1f}us" for b, r in row.items()
                                              if b != "B"))  # fmt: skip
    return rows


def _summarise(cfg, block, rows, decode, machine) -> dict:
    H, D = cfg.heads, cfg.head_dim
    table = []
    for r in rows:
        T, B = r["T"], r["B"]
        entry: dict = {"T": T, "B": B}
        for op in OPS:
            res = r.get(op) or {}
            flops = (
                sdpa_flops(T, B, H, D) if op == "sdpa" else lightning_flops(T, B, H, D, D, block)
            )
            # forward+backward as 3x (lightning: 2 passes of the same matmuls) and 3.5x
            # (FlashAttention's backward is 2.5 forwards)
            for mode, factor in (("fwd", 1.0), ("fwdbwd", 3.5 if op == "sdpa" else 3.0)):
                if f"{mode}_s" in res:
                    entry[f"{op}_{mode}_ms"] = res[f"{mode}_s"] * 1e3
                    entry[f"{op}_{mode}_tflops"] = factor * flops / res[f"{mode}_s"] / 1e12
                    entry[f"{op}_{mode}_peak_mb"] = res[f"{mode}_peak_bytes"] / 2**20
        table.append(entry)

    def at(T: int, key: str):
        return next((e[key] for e in table if e["T"] == T and key in e), None)

    def worst(num: str, den: str, lo: int, hi: int):
        """min over lo <= T <= hi of num/den, None unless both were measured at every T."""
        ratios = [ratio(e.get(num), e.get(den)) for e in table if lo <= e["T"] <= hi]
        return min(ratios) if ratios and None not in ratios else None

    copy = machine["copy_gbps"]
    bound = None
    b64 = next((d for d in decode if d["B"] == 64 and "triton" in d), None)
    if b64:
        bound = b64["triton"]["us"] / (2 * b64["triton"]["state_bytes"] / copy / 1e3)
    for d in decode:
        for backend in ("triton", "torch"):
            if backend in d:
                d[backend]["vs_copy"] = d[backend]["us"] / (
                    2 * d[backend]["state_bytes"] / copy / 1e3
                )
    targets = {
        "fwdbwd_vs_fla_4K_64K": target(
            worst("fla_fwdbwd_ms", "triton_fwdbwd_ms", 4096, 65536), ">=", 1.0,
            "min fla/triton fwd+bwd time, 4K-64K",
        ),
        "fwd_vs_flash_from_4K": target(
            worst("sdpa_fwd_ms", "triton_fwd_ms", 4096, 2**20), ">=", 1.0,
            "min flash/triton fwd time, T >= 4K",
        ),
        "softmax_over_lightning_1M": target(
            ratio(at(2**20, "sdpa_fwd_ms"), at(2**20, "triton_fwd_ms")), ">=", 100,
            "softmax/lightning fwd time at 1M", ".0f",
        ),
        "decode_b64_vs_copy": target(
            bound, "<=", 2.0, "decode step at B=64 / state read+write at copy GB/s"
        ),
    }  # fmt: skip
    return {
        "benchmark": "attention-cuda",
        "config": asdict(cfg),
        "block_size": block,
        "machine": machine,
        "rows": table,
        "decode": decode,
        "targets": targets,
    }


def format_table(report: dict) -> str:
    """Markdown: ms and TFLOP/s per op and length, then decode, then the targets."""
    head = "| T | B | " + " | ".join(f"{op} fwd ms | {op} fwd+bwd ms" for op in OPS) + " |"
    lines = [head, "|" + "---|" * (2 + 2 * len(OPS))]
    for e in report["rows"]:
        cells = [
            f"{fmt(e.get(f'{op}_{m}_ms'), '.3f')} ({fmt(e.get(f'{op}_{m}_tflops'), '.1f')})"
            for op in OPS
            for m in ("fwd", "fwdbwd")
        ]
        lines.append(f"| {e['T']} | {e['B']} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "(TFLOP/s in parentheses)",
        "",
        "| decode B | triton µs | triton GB/s | torch µs | torch GB/s | triton / copy bound |",
        "|---|---|---|---|---|---|",
    ]
    for d in report["decode"]:
        tr, to = d.get("triton", {}), d.get("torch", {})
        lines.append(
            f"| {d['B']} | {fmt(tr.get('us'), '.1f')} | {fmt(tr.get('gbps'), '.0f')} | "
            f"{fmt(to.get('us'), '.1f')} | {fmt(to.get('gbps'), '.0f')} | "
            f"{fmt(tr.get('vs_copy'), '.2f')} |"
        )
    m, cfg = report["machine"], report["config"]
    lines += [
        "",
        f"GPU: {m['gpu']}; bf16 matmul {m['matmul_tflops_bf16']:.0f} TFLOP/s, copy "
        f"{m['copy_gbps']:.0f} GB/s; torch {m['torch']}; H={cfg['heads']} d={cfg['head_dim']} "
        f"{cfg['dtype']}, block {report['block_size']}, B·T = max(B, {cfg['tokens']}) tokens; "
        f"reference errors {m['reference_errors']}",
        targets_line(report["targets"]),
    ]
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    """Left: time vs T per op (fwd solid, fwd+bwd dashed). Right: decode µs vs batch."""
    from lightlong.plot import pyplot, save, tidy

    fig, (ax, bx) = pyplot().subplots(1, 2, figsize=(12, 4.5))
    # op by colour and marker, pass by dash
    looks = {"triton": ("C0", "o"), "torch": ("C2", "^"), "fla": ("C1", "D"), "sdpa": ("C3", "s")}
    for op in OPS:
        for mode, dash in (("fwd", "-"), ("fwdbwd", "--")):
            pts = [(e["T"], e[f"{op}_{mode}_ms"]) for e in report["rows"] if f"{op}_{mode}_ms" in e]
            if pts:
                label = f"{op} {'forward' if mode == 'fwd' else 'forward+backward'}"
                color, marker = looks[op]
                ax.plot(*zip(*pts, strict=True), dash, marker=marker, color=color, label=label)
    ax.set(xscale="log", yscale="log", xlabel="sequence length T (B·T fixed)", ylabel="ms")
    ax.set_xscale("log", base=2)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    for backend in ("triton", "torch"):
        pts = [(d["B"], d[backend]["us"]) for d in report["decode"] if backend in d]
        if pts:
            color, marker = looks[backend]
            bx.plot(*zip(*pts, strict=True), marker=marker, color=color, label=f"{backend} step")
    copy = report["machine"]["copy_gbps"]
    cfg = report["config"]
    bound = [
        (d["B"], 2 * d["B"] * cfg["decode_heads"] * cfg["head_dim"] ** 2 * 4 / copy / 1e3)
        for d in report["decode"]
    ]
    if bound:
        bx.plot(*zip(*bound, strict=True), ":", color="k", label="state read+write at copy GB/s")
    bx.set(xscale="log", yscale="log", xlabel="decode batch", ylabel="µs per step")
    bx.set_xscale("log", base=2)
    bx.grid(True, which="both", alpha=0.3)
    bx.legend(fontsize=7)
    fig.suptitle(
        f"Lightning attention on {report['machine']['gpu']}: H={cfg['heads']} "
        f"d={cfg['head_dim']} {cfg['dtype']}; decode H={cfg['decode_heads']}",
        fontsize=9,
    )
    tidy(ax, bx)
    save(fig, path, dpi=120)


def run_attention_bench_cuda(cfg: AttentionBenchConfig) -> dict:
    """The GPU comparison (see the module docstring); prints, writes, returns the report."""
    block = cfg.block_size or DEFAULT_BLOCK_SIZE
    ops, errors = _check_ops(cfg, block)
    errors["decode"] = _check_decode(cfg)
    o_tol = 1e-5 if cfg.dtype == "float32" else 1e-2  # o rounds to bf16/fp16
    if not (errors["decode"]["state"] < 1e-5 and errors["decode"]["o"] < o_tol):
        raise SystemExit(f"decode check failed vs the torch step: {errors['decode']}")
    machine = describe_machine(cfg.device)
    machine.setdefault("gpu", machine["cpu"])
    stem = Path(cfg.out_dir) / f"attention-{cfg.device.split(':')[0]}-{slug(machine['gpu'])}"
    check_overwrite(stem, cfg.overwrite)  # before measuring
    gpu = cfg.device.startswith("cuda")  # else the interpreter test: small sizes
    tflops = matmul_gflops(8192 if gpu else 512, torch.bfloat16, cfg.device, reps=20) / 1e3
    gbps = copy_gbps(2**31 if gpu else 2**24, cfg.device, reps=20)
    machine.update(matmul_tflops_bf16=tflops, copy_gbps=gbps, reference_errors=errors)
    log(f"bf16 matmul {tflops:.0f} TFLOP/s, copy {gbps:.0f} GB/s")
    rows = _time_lengths(cfg, ops, block)
    decode = _time_decode(cfg)
    report = _summarise(cfg, block, rows, decode, machine)
    print(format_table(report))
    write_results(stem, report, format_table(report), plot, overwrite=cfg.overwrite)
    return report
