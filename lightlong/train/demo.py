"""`lightlong demo` (what `make run` runs): the hybrid's reason to exist, in minutes on a CPU.

Trains three models of equal size — the `tiny` hybrid (one softmax layer in four), its
all-lightning twin and its all-softmax twin — on a retrieval task, then measures answer
accuracy on held-out samples at the training length and at longer ones (more filler
between what is to be retrieved and where it is asked for).

The default task is copying (`copy`): 16 random tokens, filler, a separator, then the same
16 tokens. Softmax attention can look each one up; pure linear attention must squeeze them
all into a fixed-size state. Multi-query associative recall (`recall`) is the classic
probe, but at this size and budget none of the three models learned it (all stayed at
chance), so it is not the default.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from lightlong.bench.machine import describe_machine
from lightlong.train.config import TrainConfig
from lightlong.train.data import TASKS
from lightlong.train.loop import Trainer


@dataclass
class DemoConfig:
    """What `lightlong demo` trains and measures."""

    presets: list[str] = field(default_factory=lambda: ["tiny", "tiny-linear", "tiny-softmax"])
    """Models to train (equal size: the same preset with other layer types)."""
    task: str = "copy"
    """Synthetic task: copy, recall, passkey, selective_copy or retrieval."""
    seq_len: int = 64
    """Training length."""
    num_pairs: int = 16
    """Tokens to copy (copy, passkey, selective_copy) or key-value pairs (recall)."""
    num_queries: int = 16
    """Recall: queries per sample."""
    steps: int = 1500
    """Optimizer steps per model."""
    batch_size: int = 16
    """Samples per step."""
    lr: float = 1e-2
    """Peak learning rate."""
    length_factors: list[int] = field(default_factory=lambda: [1, 2, 4])
    """Accuracy is measured at seq_len times each factor (must include 1)."""
    eval_batches: int = 8
    """Held-out batches per length."""
    seed: int = 0
    """Weights and data seed."""
    out_dir: str = "runs/demo"
    """report.json, loss.png, accuracy.png and each model's run directory."""

    def validate(self) -> DemoConfig:
        """Raises ValueError naming the field; returns self."""
        if not self.presets:
            raise ValueError("presets must name at least one model")
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
        if any(f < 1 for f in self.length_factors) or 1 not in self.length_factors:
            raise ValueError(
                f"length_factors must be >= 1 and include 1, got {self.length_factors}"
            )
        return self


def run_demo(cfg: DemoConfig) -> dict:
    """Trains each preset, measures answer accuracy vs length, prints a table, writes a report."""
    cfg.validate()
    out = Path(cfg.out_dir)
    results = {}
    for preset in cfg.presets:
        tc = TrainConfig(
            model=preset, task=cfg.task, num_pairs=cfg.num_pairs, num_queries=cfg.num_queries,
            seq_len=cfg.seq_len, batch_size=cfg.batch_size, steps=cfg.steps, lr=cfg.lr,
            warmup_steps=max(1, cfg.steps // 10), eval_every=max(1, cfg.steps // 5),
            eval_batches=cfg.eval_batches, log_every=max(1, cfg.steps // 30), save_every=0,
            keep_last=1, seed=cfg.seed, out_dir=str(out / preset),
            eval_lengths=[cfg.seq_len * f for f in cfg.length_factors if f != 1],
        ).validate()  # fmt: skip
        t0 = time.perf_counter()
        trainer = Trainer(tc)
        print(f"{preset}: {trainer.model.param_count()['total'] / 1e6:.2f}M params", flush=True)
        final = trainer.fit()
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
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    _plot(report, out)
    print(format_demo(report))
    print(f"wrote {out / 'report.json'}, {out / 'loss.png'}, {out / 'accuracy.png'}")
    return report


def _describe_task(cfg: DemoConfig) -> str:
    what = {
        "copy": f"copy {cfg.num_pairs} tokens",
        "recall": f"associative recall, {cfg.num_pairs} pairs, {cfg.num_queries} queries",
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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for i, (name, r) in enumerate(report["results"].items()):
        ax.plot(*zip(*r["curve"], strict=True), color=f"C{i}", label=f"{name} ({r['layers']})")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend()
    ax.set_title(report["task"], fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for i, (name, r) in enumerate(report["results"].items()):
        lengths = [int(T) for T in r["accuracy"]]
        ax.plot(lengths, list(r["accuracy"].values()), "o-", color=f"C{i}", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("sequence length (trained at the first)")
    ax.set_ylabel("answer accuracy (held out)")
    ax.set_ylim(0, 1.02)
    ax.grid(True, alpha=0.3)
    ax.legend()
    ax.set_title(report["task"], fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "accuracy.png", dpi=110)
    plt.close(fig)
