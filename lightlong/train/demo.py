"""`lightlong demo` (what `make run` runs): the hybrid's reason to exist, in minutes on a CPU.

Trains three models of equal size — the `demo` hybrid (a lightning layer, then a softmax
layer), its all-lightning twin and its all-softmax twin — the same way on multi-query
associative recall (MQAR: 8 key-value pairs, filler, 8 queries; loss on the answers), then
measures answer accuracy on held-out samples at the training length and at 2× and 4× it
(more filler between the pairs and the queries). Training samples mix 1 … 8 pairs
(`min_pairs`), held-out ones always have 8. Why this recipe: docs/hybrid-recall.md.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from lightlong.bench.machine import describe_machine
from lightlong.train.config import RecipeConfig, TrainConfig
from lightlong.train.loop import Trainer

if TYPE_CHECKING:
    from lightlong.train.vl_demo import VLDemoConfig


@dataclass
class DemoConfig(RecipeConfig):
    """What `lightlong demo` trains and measures (the recipe's fields, then these)."""

    presets: list[str] = field(default_factory=lambda: ["demo", "demo-linear", "demo-softmax"])
    """Models to train (equal size: the same preset with other layer types)."""
    lr: float = 1e-3
    """Peak learning rate (the best of 1e-3, 3e-3, 1e-2 for all three models in
    `lightlong ablate`'s sweep)."""
    length_factors: list[int] = field(default_factory=lambda: [1, 2, 4])
    """Accuracy is measured at seq_len times each factor (must include 1)."""
    seed: int = 0
    """Weights and data seed."""
    out_dir: str = "runs/demo"
    """report.json, loss.png, accuracy.png and each model's run directory (with --vl:
    runs/demo-vl while this is left at runs/demo)."""
    vl: bool = False
    """Train the vision-language demo instead (lightlong.train.vl_demo: a tiny ViT and
    projector in front of the tiny hybrid answering questions about drawn shapes, against a
    text-only baseline; takes seed and out_dir from here, its own recipe from
    VLDemoConfig's defaults; docs/vl-demo.md)."""

    def validate(self) -> DemoConfig:
        """Raises ValueError naming the field; returns self."""
        self.validate_recipe()
        if not self.presets:
            raise ValueError("presets must name at least one model")
        if any(f < 1 for f in self.length_factors) or 1 not in self.length_factors:
            raise ValueError(
                f"length_factors must be >= 1 and include 1, got {self.length_factors}"
            )
        return self


def run_demo(cfg: DemoConfig) -> dict:
    """Trains each preset, measures answer accuracy vs length, prints a table, writes a report
    (with cfg.vl, runs the vision-language demo instead: `run_vl_demo`)."""
    cfg.validate()
    if cfg.vl:
        from lightlong.train.vl_demo import run_vl_demo

        return run_vl_demo(vl_demo_config(cfg))
    out = Path(cfg.out_dir)
    results = {}
    for preset in cfg.presets:
        tc = TrainConfig(
            model=preset, task=cfg.task, num_pairs=cfg.num_pairs, num_queries=cfg.num_queries,
            min_pairs=cfg.min_pairs,
            seq_len=cfg.seq_len, batch_size=cfg.batch_size, steps=cfg.steps, lr=cfg.lr,
            warmup_steps=max(1, cfg.steps // 10), eval_every=max(1, cfg.steps // 5),
            eval_batches=cfg.eval_batches, log_every=max(1, cfg.steps // 30), save_every=0,
            keep_last=1, seed=cfg.seed, out_dir=str(out / preset),
            eval_lengths=[cfg.seq_len * f for f in cfg.length_factors if f != 1],
        ).validate()  # fmt: skip
        t0 = time.perf_counter()
        trainer = Trainer(tc)
        trainer.resume_hint = False
        print(f"{preset}: {trainer.model.param_count()['total'] / 1e6:.2f}M params", flush=True)
        final = trainer.fit()
        trainer.raise_if_stopped(preset)
        metrics = [json.loads(x) for x in (out / preset / "metrics.jsonl").read_text().splitlines()]
        accuracy = {cfg.seq_len * f: final[_key(cfg, f)] for f in sorted(cfg.length_factors)}
        results[preset] = {
            "layers": trainer.model.config.pattern,
            "params": trainer.model.param_count()["total"],
            "train_seconds": time.perf_counter() - t0,
            "final_loss": final["loss"],
            "eval_loss": final["eval_loss"],
            "accuracy": accuracy,
            "curve": [(m["step"], m["loss"]) for m in metrics],
        }
    report = {
        "demo": dataclasses.asdict(cfg),
        "machine": describe_machine("cpu"),
        "task": _describe_task(cfg),
        "results": results,
    }
    report["summary"] = summarize(report)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    _plot(report, out)
    print(format_demo(report))
    print(f"\n{report['summary']}\n")
    print(f"wrote {out / 'report.json'}, {out / 'loss.png'}, {out / 'accuracy.png'}")
    return report


def vl_demo_config(cfg: DemoConfig) -> VLDemoConfig:
    """The vision-language demo's config for `lightlong demo --vl`: cfg's seed and out_dir
    (runs/demo-vl in place of the default runs/demo), the rest VLDemoConfig's defaults."""
    from lightlong.train.vl_demo import VLDemoConfig

    default_out = DemoConfig.__dataclass_fields__["out_dir"].default
    out_dir = VLDemoConfig.out_dir if cfg.out_dir == default_out else cfg.out_dir
    return VLDemoConfig(seed=cfg.seed, out_dir=out_dir)


def summarize(report: dict) -> str:
    """One plain sentence (two with all-softmax) saying what the run shows, from its numbers:
    the hybrid's accuracy at the training length against all-lightning's (a gap of 0.3 or
    more counts as a difference), then the hybrid and all-softmax at the longest length."""
    by_kind = {}
    for name, r in report["results"].items():
        kind = {"L": "linear", "S": "softmax"}.get("".join(sorted(set(r["layers"]))), "hybrid")
        by_kind.setdefault(kind, (name, r))
    if "hybrid" not in by_kind or "linear" not in by_kind:
        return "This run has no hybrid and all-lightning pair to compare."
    (name, hyb), (lin_name, lin) = by_kind["hybrid"], by_kind["linear"]
    T, longest = next(iter(hyb["accuracy"])), list(hyb["accuracy"])[-1]
    h, n = hyb["accuracy"][T], lin["accuracy"][T]
    said = (
        f"At the training length ({T} tokens) the hybrid {name} ({hyb['layers']}) answers "
        f"{h:.2f} of held-out queries and the all-lightning {lin_name} {n:.2f}: "
    )
    if h - n >= 0.3:
        said += "the softmax layer gives the retrieval that lightning layers alone did not learn."
    elif n - h >= 0.3:
        said += (
            "here the hybrid retrieves worse than all-lightning; its softmax layer did not help."
        )
    else:
        said += "here they retrieve alike, so this run shows no advantage for the hybrid."
    if longest != T:
        said += f" At {longest} tokens the hybrid answers {hyb['accuracy'][longest]:.2f}"
        if "softmax" in by_kind:
            sm_name, sm = by_kind["softmax"]
            said += f" and the all-softmax {sm_name} {sm['accuracy'][longest]:.2f}"
        said += "."
    return said


def _describe_task(cfg: DemoConfig) -> str:
    what = {
        "copy": f"copy {cfg.num_pairs} tokens",
        "recall": f"associative recall, {cfg.num_pairs} pairs"
        + (f" ({cfg.min_pairs}–{cfg.num_pairs} in training)" if cfg.min_pairs else "")
        + f", {cfg.num_queries} queries",
        "passkey": f"passkey of {cfg.num_pairs} tokens",
        "selective_copy": f"selective copy of {cfg.num_pairs} tokens",
        "retrieval": f"recall ({cfg.num_pairs} pairs) or passkey ({cfg.num_pairs} tokens)",
    }[cfg.task]
    return f"{what}, trained at {cfg.seq_len} tokens"


def _key(cfg: DemoConfig, factor: int) -> str:
    return "eval_accuracy" if factor == 1 else f"eval_accuracy@{cfg.seq_len * factor}"


def format_demo(report: dict) -> str:
    """Markdown table: per model, layers, params, time, loss and answer accuracy at each length."""
    results = report["results"]
    lengths = list(next(iter(results.values()))["accuracy"])
    head = ["model", "layers", "params", "train s", "held-out loss"]
    head += [f"accuracy @ {T}" for T in lengths]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in results.items():
        cells = [name, r["layers"], f"{r['params'] / 1e6:.2f}M", f"{r['train_seconds']:.0f}",
                 f"{r['eval_loss']:.3f}"]  # fmt: skip
        cells += [f"{r['accuracy'][T]:.2f}" for T in lengths]
        lines.append("| " + " | ".join(cells) + " |")
    m = report["machine"]
    lines += ["", f"{report['task']}; {m['cpu']}, {m['torch_threads']} threads"]
    return "\n".join(lines)


def _plot(report: dict, out: Path) -> None:
    from lightlong import units
    from lightlong.plot import pyplot, save, series, tidy

    plt = pyplot()
    title = f"{out.resolve().name} — {report['task']}, step {report['demo']['steps']}"
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, (name, r) in enumerate(report["results"].items()):
        ax.plot(*zip(*r["curve"], strict=True), label=f"{name} ({r['layers']})",
                **series(i, dense=True))  # fmt: skip
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend()
    ax.set_title(title, fontsize=8)
    tidy(ax)
    save(fig, out / "loss.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    for i, (name, r) in enumerate(report["results"].items()):
        lengths = [int(T) for T in r["accuracy"]]
        ax.plot(lengths, list(r["accuracy"].values()), label=name, **series(i))
    ax.set_xscale("log", base=2)
    ax.set_xlabel("sequence length (trained at the first)")
    ax.set_ylabel("answer accuracy (held out)")
    ax.set_ylim(0, 1.02)
    ax.grid(True, alpha=0.3)
    ax.legend()
    ax.set_title(title, fontsize=8)
    tidy(ax)
    ax.set_xticks(lengths, [units.length(n) for n in lengths])  # the lengths measured
    save(fig, out / "accuracy.png")
