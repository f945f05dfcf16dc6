"""Why does (or doesn't) the hybrid learn retrieval? Trains model variants on multi-query
associative recall (MQAR) and writes a table and loss / accuracy curves.

Each run is a preset (`demo` unless it says) with `HybridConfig` overrides (layer
pattern, width, heads, decay schedule, FFN) and `TrainConfig` overrides (lr, steps,
pairs, curriculum), trained by the library's own `Trainer` like `lightlong demo`: MQAR
with 8 pairs and 8 queries at 48 tokens, training samples mixing 1 … 8 pairs, batch 32,
1,000 steps, lr 1e-3. Runs go two at a time, one torch thread each. Each experiment is a
named group in `EXPERIMENTS`; the findings are in docs/hybrid-recall.md.

    python benchmarks/hybrid_probe.py tiny decay curriculum --out benchmarks/results/hybrid-probe
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

LETTERS = {"L": "lightning", "S": "softmax"}

# name -> list of (label, model overrides, train overrides); "pattern" sets layer_types.
EXPERIMENTS: dict[str, list[tuple[str, dict, dict]]] = {}


def run_one(label: str, model: dict, train: dict, seed: int, out: str) -> dict:
    """Trains one variant on MQAR; returns its config, curve and held-out accuracy."""
    import torch

    torch.set_num_threads(1)
    from lightlong.model import HybridConfig
    from lightlong.train.config import TrainConfig
    from lightlong.train.data import SyntheticData, SyntheticTask
    from lightlong.train.loop import Trainer, answer_totals

    model = dict(model)
    base = HybridConfig.from_preset(model.pop("preset", "demo"))
    if "pattern" in model:
        model["layer_types"] = [LETTERS[c] for c in model.pop("pattern")]
        model["num_layers"] = len(model["layer_types"])
    config = dataclasses.replace(base, **model).validate()
    run = Path(out) / f"{label}-s{seed}"
    run.mkdir(parents=True, exist_ok=True)
    (run / "model.json").write_text(json.dumps(config.to_dict()) + "\n")
    t = {"task": "recall", "num_pairs": 8, "num_queries": 8, "min_pairs": 1, "seq_len": 48,
         "batch_size": 32, "steps": 1000, "lr": 1e-3} | train  # fmt: skip
    steps = t["steps"]
    tc = TrainConfig(
        model=str(run / "model.json"), warmup_steps=max(1, steps // 10),
        eval_every=max(1, steps // 10), eval_batches=4, log_every=max(1, steps // 20),
        save_every=0, keep_last=1, seed=seed, progress=False, out_dir=str(run), **t,
    ).validate()  # fmt: skip
    t0 = time.perf_counter()
    trainer = Trainer(tc)
    final = trainer.fit()
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    trainer.model.eval()
    task = SyntheticTask("recall", config.vocab_size, t["num_pairs"], t["num_queries"])
    held = SyntheticData(task, t["seq_len"], 64, seed=seed + 1_000_003)
    acc = {}
    with torch.no_grad():
        for f in (1, 4):
            tot = answer_totals(trainer.model, held, 8, t["seq_len"] * f, trainer.device)
            acc[f] = float(tot[1] / tot[2])
    return {
        "label": label, "seed": seed, "pattern": config.pattern, "model": model, "train": t,
        "params": trainer.model.param_count()["total"], "seconds": time.perf_counter() - t0,
        "eval_loss": final["eval_loss"], "acc": acc[1], "acc4": acc[4],
        "curve": [(m["step"], m["loss"]) for m in metrics],
        "acc_curve": [(m["step"], m["eval_accuracy"]) for m in metrics if "eval_accuracy" in m],
    }  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("experiments", nargs="+", choices=sorted(EXPERIMENTS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", default="runs/probe")
    a = p.parse_args()
    out = Path(a.out) / "+".join(a.experiments)
    runs = [run for name in a.experiments for run in EXPERIMENTS[name]]
    jobs = [(lab, m, t, s, str(out)) for lab, m, t in runs for s in a.seeds]
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with ProcessPoolExecutor(a.workers) as pool:
        results = list(pool.map(run_one, *zip(*jobs, strict=True)))
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    lines = ["| run | layers | params | seed | s | held-out loss | MQAR acc | MQAR acc @4x |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in results:
        lines.append(f"| {r['label']} | {r['pattern']} | {r['params'] / 1e6:.2f}M | {r['seed']} "
                     f"| {r['seconds']:.0f} | {r['eval_loss']:.3f} | {r['acc']:.3f} "
                     f"| {r['acc4']:.3f} |")  # fmt: skip
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    _plot(results, out / "curves.png")


def _plot(results: list[dict], png: Path) -> None:
    from lightlong.plot import pyplot, save, series, tidy

    fig, (a, b) = pyplot().subplots(1, 2, figsize=(11, 4))
    labels = list(dict.fromkeys(r["label"] for r in results))
    for r in results:
        i = labels.index(r["label"])
        name = f"{r['label']} ({r['pattern']})" if r["seed"] == results[0]["seed"] else None
        a.plot(*zip(*r["curve"], strict=True), label=name, alpha=0.8, **series(i, dense=True))
        b.plot(*zip(*r["acc_curve"], strict=True), ms=3, alpha=0.8, **series(i))
    a.set(xlabel="step", ylabel="training loss (answers)", yscale="log")
    b.set(xlabel="step", ylabel="held-out MQAR answer accuracy", ylim=(0, 1.02))
    for ax in (a, b):
        ax.grid(True, alpha=0.3)
    a.legend(fontsize=7)
    last = max(r["curve"][-1][0] for r in results)
    fig.suptitle(f"{png.resolve().parent.name} — step {last}", fontsize=9)
    tidy(a, b)
    save(fig, png, dpi=100)


def _exp(name: str, runs: list[tuple[str, dict, dict]]) -> None:
    EXPERIMENTS[name] = runs


# The starting point: tiny (hidden 64, 4 layers, MiniMax's decay), 8 pairs at 64.
_TINY = {"preset": "tiny"}
_exp("tiny", [(p, _TINY | {"pattern": p}, {"seq_len": 64, "min_pairs": 0, "lr": 3e-3})
              for p in ("LLLS", "LLLL", "SSSS")])  # fmt: skip
# The demo preset (2 layers, hidden 128, 4 heads of 32) with one thing changed at a time.
_MINIMAX_DECAY = {"decay_slope_heads": 0}
# (The demo preset itself, its all-lightning and all-softmax twins and the learning-rate
# sweep are `lightlong ablate`'s lightning, linear and softmax runs.)
_exp("decay", [("LS-minimax-decay", {"pattern": "LS"} | _MINIMAX_DECAY, {})])
_exp("curriculum", [("LS-R64-no-mix", {"pattern": "LS"}, {"min_pairs": 0})])
_exp("width", [("LS-R64-h64", {"pattern": "LS", "hidden_size": 64, "head_dim": 16}, {})])
_exp("ffn", [("LS-R64-dense", {"pattern": "LS", "num_experts": 1, "experts_per_token": 1,
                                "intermediate_size": 256}, {})])  # fmt: skip
_exp("depth", [
    ("LLLS-R64", {"pattern": "LLLS"}, {}),
    ("LLLS-minimax-decay", {"pattern": "LLLS"} | _MINIMAX_DECAY, {}),
])  # fmt: skip
_exp("pairs", [(f"{p}-R64-16pairs", {"pattern": p}, {"num_pairs": 16, "seq_len": 64})
               for p in ("LS", "LL")])  # fmt: skip


if __name__ == "__main__":
    main()
