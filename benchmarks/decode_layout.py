"""Decode at batch 1 with and without the decode layout (`lightlong.nn.decode_layout`),
fp32 and int8, measured interleaved in one process: each round times every variant in
turn, so a shared machine's slow spells fall on all of them alike. Reports the best and
the median step of each, and the median of the per-round ratios to fp32 row-major.

    python benchmarks/decode_layout.py --out-dir benchmarks/results/roofline [--overwrite]

Variants: "fp32" (the model as built: row-major weights, `F.linear`), "fp32 + layout",
"int8" (`quantize_int8`), "int8 + layout" (its groups fused). Each decodes from its own
cache after the same `--context`-token prompt; logits are checked against fp32 first.
Also measured once: the same steps on a copy of the model with every width cut to a
sliver (`--overhead`), the per-token cost of the eager step itself (Python, dispatch,
small kernels) with almost no bytes to read.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import statistics
import time
from pathlib import Path

import torch

from lightlong.bench.generate import decode_bound
from lightlong.bench.machine import Roofline, describe_machine, measure_roofline
from lightlong.bench.model import comparable_config
from lightlong.bench.report import check_overwrite, write_results
from lightlong.infer import HybridCache
from lightlong.model import HybridLM
from lightlong.nn import decode_layout, quantize_int8
from lightlong.plot import bars, pyplot, save, tidy

VARIANTS = ("fp32", "fp32 + layout", "int8", "int8 + layout")


def build(variant: str, base: HybridLM) -> HybridLM:
    """A copy of base as `variant` names."""
    model = copy.deepcopy(base)
    if variant.startswith("int8"):
        quantize_int8(model)
    if variant.endswith("layout"):
        decode_layout(model)
    return model


@torch.no_grad()
def measure(preset: str, context: int, rounds: int, steps: int, roofline: Roofline) -> dict:
    """Interleaved decode steps of every variant of `preset` after a `context`-token prompt:
    {variant: {"best_ms", "median_ms", "vs_fp32", "logits_rel_err", "of_bound"}}; of_bound:
    the best step's tok/s over the bytes a token reads at the machine's matrix-vector
    GB/s (`lightlong.bench.generate.decode_bound`, as `bench generate` counts them)."""
    torch.manual_seed(0)
    config = comparable_config(preset)
    base = HybridLM(config).eval()
    models = {v: build(v, base) for v in VARIANTS}
    ids = torch.randint(0, config.vocab_size, (1, context))
    token = torch.randint(0, config.vocab_size, (1, 1))
    caches, logits = {}, {}
    for v, m in models.items():
        caches[v] = HybridCache.for_model(m, batch_size=1, capacity=context + rounds * steps + 8)
        m(ids, cache=caches[v], logits_to_keep=1)
        logits[v] = m(token, cache=caches[v]).logits
    ref = logits["fp32"]
    rel = {v: float((x - ref).norm() / ref.norm()) for v, x in logits.items()}
    times: dict[str, list[float]] = {v: [] for v in models}
    for _ in range(rounds):
        for v, m in models.items():
            t0 = time.perf_counter()
            for _ in range(steps):
                m(token, cache=caches[v])
            times[v].append((time.perf_counter() - t0) / steps)
    out = {}
    for v, ts in times.items():
        ratios = [a / b for a, b in zip(times["fp32"], ts, strict=True)]
        bound = decode_bound(roofline, preset, context,
                             quantize="int8" if v.startswith("int8") else None)  # fmt: skip
        out[v] = {"best_ms": 1e3 * min(ts), "median_ms": 1e3 * statistics.median(ts),
                  "vs_fp32": statistics.median(ratios), "logits_rel_err": rel[v],
                  "of_bound": 1 / min(ts) / bound["decode_bound_tok_s"]}  # fmt: skip
    return out


@torch.no_grad()
def overhead_ms(preset: str, context: int, steps: int) -> float:
    """Best step of `preset` with every width cut to a sliver (D = 64, 8 heads of 8, FFN
    64, vocab 512): what the eager step costs without its bytes, in ms."""
    c = comparable_config(preset)
    thin = dataclasses.replace(c, hidden_size=64, head_dim=8, intermediate_size=64,
                               vocab_size=512, rotary_dim=min(c.rotary_dim, 4))  # fmt: skip
    model = HybridLM(thin.validate()).eval()
    decode_layout(model)
    cache = HybridCache.for_model(model, batch_size=1, capacity=context + 10 * steps + 8)
    model(torch.randint(0, 512, (1, context)), cache=cache, logits_to_keep=1)
    token = torch.tensor([[1]])
    best = float("inf")
    for _ in range(10):
        t0 = time.perf_counter()
        for _ in range(steps):
            model(token, cache=cache)
        best = min(best, (time.perf_counter() - t0) / steps)
    return 1e3 * best


def markdown(report: dict) -> str:
    rows = ["| series | variant | best ms/token | median ms/token | tok/s (best) | of bound "
            "| × fp32 (median of rounds) | logits vs fp32 |",
            "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for preset, r in report["results"].items():
        for v, x in r.items():
            rows.append(
                f"| {preset} | {v} | {x['best_ms']:.2f} | {x['median_ms']:.2f} | "
                f"{1e3 / x['best_ms']:.1f} | {x['of_bound']:.2f} | {x['vs_fp32']:.2f} | "
                f"{x['logits_rel_err']:.1e} |"
            )
    m = report["machine"]
    rows += [
        "",
        f"machine: {m['cpu']}, {m['torch_threads']} threads, torch {m['torch']}; "
        f"{report['context']}-token prompt, {report['rounds']} rounds of {report['steps']} "
        "steps, variants interleaved in each round",
        report["roofline_summary"],
        "eager step with almost no bytes (every width cut to a sliver): "
        + ", ".join(f"{p} {ms:.2f} ms/token" for p, ms in report["overhead_ms"].items()),
    ]
    return "\n".join(rows)


def plot(report: dict, path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.6))
    presets = list(report["results"])
    width = 0.8 / len(VARIANTS)
    for i, v in enumerate(VARIANTS):
        xs = [j + (i - (len(VARIANTS) - 1) / 2) * width for j in range(len(presets))]
        ys = [1e3 / report["results"][p][v]["best_ms"] for p in presets]
        ax.bar(xs, ys, width, label=v, **bars(i))
    ax.set_xticks(range(len(presets)), presets)
    ax.set_ylabel("decode tok/s, batch 1 (best round)")
    ax.set_title(f"decode layout, {report['context']}-token prompt, interleaved")
    ax.legend(fontsize=8)
    tidy(ax)
    save(fig, path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", nargs="+", default=["small", "small-linear"])
    p.add_argument("--context", type=int, default=4096)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--out-dir", default="runs/decode-layout")
    p.add_argument("--overwrite", action="store_true")
    a = p.parse_args()
    stem = Path(a.out_dir) / "decode-layout-cpu"
    check_overwrite(stem, a.overwrite)
    roofline = measure_roofline("cpu")
    report = {
        "benchmark": "decode-layout", "machine": describe_machine("cpu"),
        "roofline": roofline.to_dict(), "roofline_summary": roofline.summary(),
        "context": a.context, "rounds": a.rounds, "steps": a.steps,
        "results": {
            preset: measure(preset, a.context, a.rounds, a.steps, roofline) for preset in a.presets
        },
        "overhead_ms": {preset: overhead_ms(preset, a.context, a.steps) for preset in a.presets},
    }  # fmt: skip
    text = markdown(report)
    print(text)
    write_results(stem, report, text, plot, overwrite=a.overwrite)


if __name__ == "__main__":
    main()
