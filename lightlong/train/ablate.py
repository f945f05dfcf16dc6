"""`lightlong ablate`: MiniMax-01's architecture ablation at laptop scale.

Each variant is the preset's hybrid with its lightning layers replaced by another mixer
(its softmax layers stay): `lightning` (the preset itself), `cosformer`, `norm_linear`
(NormAttention), `window` (sliding-window softmax), `diag` (DiagAttention); or a stack of
one kind: `linear` (every layer lightning) and `softmax` (every layer softmax). All train
with the same size, data, steps and batch. Every variant gets the same learning-rate sweep
on the first seed; the rate with the best validation score (held-out samples of their own
seed, never the test samples) trains the other seeds. Then each reports, over its seeds,
held-out loss, training tok/s and retrieval on test samples at the training length and
`length_factor` times it:

- synthetic data (default `recall`: multi-query associative recall): MQAR answer accuracy;
  with `retrieval` (half MQAR, half passkey) MQAR and NIAH (the passkey, a needle of
  `num_pairs` tokens at a random depth); another synthetic `task` is measured by its own
  answer accuracy;
- text (`data`): NIAH is `lightlong.eval`'s niah task (generation, match-all, depth 0.5);
  the validation score is the held-out loss.

Writes `ablation.json`, `ablation.md`, `loss.png`, `retrieval.png` and each run's
directory under `out_dir`.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from lightlong.bench.machine import describe_machine
from lightlong.model import HybridConfig
from lightlong.model.config import PRESETS
from lightlong.train.config import RecipeConfig, TrainConfig
from lightlong.train.data import SyntheticData, SyntheticTask
from lightlong.train.loop import Trainer, answer_totals

VARIANTS = {
    "lightning": "lightning", "linear": "lightning", "cosformer": "cosformer",
    "norm_linear": "norm_linear", "window": "window_softmax", "diag": "diag_softmax",
    "softmax": "softmax",
}  # fmt: skip
"""Variant name -> the mixer that replaces the preset's lightning layers (`linear` and
`softmax`: every layer)."""
_WHOLE_STACK = ("linear", "softmax")
_TEST_SEED = 2_000_003
"""Test samples come from seed + this; the trainer's validation samples from seed + 1,000,003."""


@dataclass
class AblateConfig(RecipeConfig):
    """What `lightlong ablate` trains and measures."""

    preset: str = "demo"
    """Model preset; every variant has its size (the same projections and MoE)."""
    variants: list[str] = field(
        default_factory=lambda: ["lightning", "linear", "cosformer", "norm_linear", "window",
                                 "softmax"]
    )  # fmt: skip
    """lightning, linear, cosformer, norm_linear, window, diag, softmax (commas also separate)."""
    data: list[str] = field(default_factory=list)
    """Text files (.txt/.jsonl) to train on; empty: the synthetic `task`."""
    lrs: list[float] = field(default_factory=lambda: [1e-3, 3e-3, 1e-2])
    """Peak learning rates swept for every variant on the first seed."""
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    """Weights and data seeds (the same for every variant); the first one sweeps lrs."""
    window: int = 0
    """Span of window (window_size) and diag (block) layers; 0: seq_len // 4."""
    length_factor: int = 4
    """Retrieval is measured at seq_len and seq_len × this."""
    niah_samples: int = 8
    """Text: NIAH prompts per length."""
    workers: int = 1
    """Runs trained at once, each in its own process with one torch thread (1: here)."""
    out_dir: str = "runs/ablate"
    """ablation.json, ablation.md, loss.png, retrieval.png, one run directory per run."""

    def __post_init__(self):
        self.variants = [v for item in self.variants for v in item.split(",") if v]

    def validate(self) -> AblateConfig:
        """Raises ValueError naming the field; returns self."""
        if self.preset not in PRESETS:
            raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {self.preset!r}")
        bad = [v for v in self.variants if v not in VARIANTS]
        if not self.variants or bad:
            raise ValueError(f"variants must be some of {list(VARIANTS)}, got {self.variants}")
        self.validate_recipe()
        for name in ("length_factor", "niah_samples", "workers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.lrs or any(not lr > 0 for lr in self.lrs):
            raise ValueError(f"lrs must be one or more rates > 0, got {self.lrs}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be one or more distinct ints, got {self.seeds}")
        if self.window < 0:
            raise ValueError(f"window must be >= 0, got {self.window}")
        return self

    @property
    def span(self) -> int:
        return self.window or max(1, self.seq_len // 4)


def variant_config(cfg: AblateConfig, variant: str) -> HybridConfig:
    """The preset with its lightning layers replaced by the variant's mixer (`linear`,
    `softmax`: every layer)."""
    base = HybridConfig.from_preset(cfg.preset)
    mixer = VARIANTS[variant]
    if variant in _WHOLE_STACK:
        layer_types = [mixer] * base.num_layers
    else:
        layer_types = [mixer if t == "lightning" else t for t in base.layer_types]
    return dataclasses.replace(
        base, layer_types=layer_types, window_size=cfg.span, diag_block_size=cfg.span,
        cosformer_max_len=cfg.seq_len * cfg.length_factor,
    ).validate()  # fmt: skip


def run_ablation(cfg: AblateConfig) -> dict:
    """Sweeps lrs on the first seed, trains the other seeds at each variant's best rate,
    measures every run; prints the table; writes the report and plots."""
    cfg.validate()
    out = Path(cfg.out_dir)
    first, rest = cfg.seeds[0], cfg.seeds[1:]
    sweep = _train_all(cfg, [(v, lr, first) for v in cfg.variants for lr in cfg.lrs])
    best = {}
    for v in cfg.variants:
        tried = [r for r in sweep if r["variant"] == v]
        best[v] = max(tried, key=lambda r: r["validation"])["lr"]  # first of equals wins
    runs = sweep + _train_all(cfg, [(v, best[v], s) for v in cfg.variants for s in rest])
    results = {}
    for v in cfg.variants:
        mine = [r for r in runs if r["variant"] == v and r["lr"] == best[v]]
        results[v] = {
            "layers": mine[0]["layers"],
            "params": mine[0]["params"],
            "lr": best[v],
            "lr_sweep": {str(r["lr"]): r["validation"] for r in sweep if r["variant"] == v},
            "seeds": [r["seed"] for r in mine],
            "train_tok_s": statistics.fmean(r["train_tok_s"] for r in mine),
            "eval_loss": statistics.fmean(r["eval_loss"] for r in mine),
            "retrieval": {
                p: {n: _spread([r["retrieval"][p][n] for r in mine]) for n in by_len}
                for p, by_len in mine[0]["retrieval"].items()
            },
            "curve": mine[0]["curve"],
            "runs": mine,
        }
    report = {
        "ablate": dataclasses.asdict(cfg),
        "machine": describe_machine("cpu"),
        "lengths": [cfg.seq_len, cfg.seq_len * cfg.length_factor],
        "results": results,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "ablation.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "ablation.md").write_text(format_ablation(report) + "\n")
    _plot(report, out)
    print(format_ablation(report))
    print(f"wrote {out / 'ablation.json'}, ablation.md, loss.png, retrieval.png")
    return report


def _spread(values: list[float]) -> dict:
    """Mean, standard deviation (0 for one value) and the values."""
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": statistics.fmean(values), "std": std, "values": values}


def _train_all(cfg: AblateConfig, jobs: list[tuple[str, float, int]]) -> list[dict]:
    """Runs `train_run` for each (variant, lr, seed), `cfg.workers` at a time."""
    if cfg.workers == 1 or len(jobs) <= 1:
        return [train_run(cfg, *job) for job in jobs]
    import multiprocessing

    context = multiprocessing.get_context("spawn")  # no torch state shared with the parent
    with ProcessPoolExecutor(cfg.workers, mp_context=context, initializer=_one_thread) as pool:
        return list(pool.map(train_run, *zip(*[(cfg, *job) for job in jobs], strict=True)))


def _one_thread() -> None:
    import torch

    torch.set_num_threads(1)


def train_run(cfg: AblateConfig, variant: str, lr: float, seed: int) -> dict:
    """Trains one variant at one rate and seed; returns its validation score (answer
    accuracy on the trainer's held-out samples, or minus the held-out loss for text), loss,
    speed, curve and test retrieval."""
    run = Path(cfg.out_dir) / variant / f"lr{lr:g}-seed{seed}"
    run.mkdir(parents=True, exist_ok=True)
    config = variant_config(cfg, variant)
    (run / "model.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    tc = TrainConfig(
        model=str(run / "model.json"), task="text" if cfg.data else cfg.task,
        data_files=list(cfg.data), num_pairs=cfg.num_pairs, num_queries=cfg.num_queries,
        min_pairs=cfg.min_pairs, seq_len=cfg.seq_len,
        batch_size=cfg.batch_size, steps=cfg.steps, lr=lr, warmup_steps=max(1, cfg.steps // 10),
        eval_every=0, eval_batches=cfg.eval_batches, log_every=max(1, cfg.steps // 20),
        save_every=0, keep_last=1, seed=seed, progress=False, out_dir=str(run),
    ).validate()  # fmt: skip
    print(f"{variant} ({config.pattern}) lr {lr:g} seed {seed}: training", flush=True)
    t0 = time.perf_counter()
    trainer = Trainer(tc)
    trainer.resume_hint = False
    final = trainer.fit()
    trainer.raise_if_stopped(tc.out_dir)
    seconds = time.perf_counter() - t0
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    # Rate over the logged windows after the first (which holds the warm-up).
    rates = [m["tok_s"] for m in metrics[1:]] or [metrics[0]["tok_s"]]
    trainer.model.eval()
    validation = -final["eval_loss"] if cfg.data else final["eval_accuracy"]
    return {
        "variant": variant, "lr": lr, "seed": seed, "layers": config.pattern,
        "params": trainer.model.param_count()["total"], "train_seconds": seconds,
        "train_tok_s": sum(rates) / len(rates), "eval_loss": final["eval_loss"],
        "validation": validation, "retrieval": _retrieval(cfg, trainer, seed),
        "curve": [(m["step"], m["loss"]) for m in metrics],
    }  # fmt: skip


def probes(cfg: AblateConfig) -> dict[str, str]:
    """Retrieval measurements: column name -> synthetic task ("text" for text NIAH)."""
    if cfg.data:
        return {"NIAH": "text"}
    if cfg.task == "retrieval":
        return {"MQAR": "recall", "NIAH": "passkey"}
    return {"MQAR" if cfg.task == "recall" else cfg.task: cfg.task}


def _retrieval(cfg: AblateConfig, trainer: Trainer, seed: int) -> dict:
    """{probe: {length: answer accuracy (synthetic) or NIAH score (text)}} on test samples."""
    lengths = [cfg.seq_len, cfg.seq_len * cfg.length_factor]
    model = trainer.model
    out = {}
    for name, task in probes(cfg).items():
        if task == "text":
            out[name] = _text_niah(cfg, model, lengths, seed)
            continue
        data = SyntheticData(
            SyntheticTask(task, model.config.vocab_size, cfg.num_pairs, cfg.num_queries),
            cfg.seq_len, cfg.batch_size, seed=seed + _TEST_SEED,
        )  # fmt: skip
        out[name] = {}
        for n in lengths:
            totals = answer_totals(model, data, cfg.eval_batches, n, trainer.device)
            out[name][str(n)] = float(totals[1] / totals[2].clamp(min=1))
    return out


def _text_niah(cfg: AblateConfig, model, lengths: list[int], seed: int) -> dict:
    from lightlong.eval.runner import EvalConfig, engine_generate, evaluate, make_samples, make_task
    from lightlong.infer import Engine
    from lightlong.tokenizer import ByteTokenizer

    tokenizer = ByteTokenizer()
    ec = EvalConfig(model="ablation", lengths=lengths, depths=[0.5],
                    samples=cfg.niah_samples, seed=seed + _TEST_SEED)  # fmt: skip
    task = make_task("niah", ec)
    records = evaluate(task, make_samples(task, ec, tokenizer),
                       engine_generate(Engine(model, tokenizer), 8))  # fmt: skip
    return {str(n): sum(r["score"] for r in records if r["length"] == n)
            / sum(r["length"] == n for r in records) for n in lengths}  # fmt: skip


def format_ablation(report: dict) -> str:
    """Markdown table: per variant, layers, params, chosen lr, tok/s, held-out loss, and
    retrieval as mean ± standard deviation over the seeds."""
    lengths = report["lengths"]
    names = list(next(iter(report["results"].values()))["retrieval"])
    head = ["variant", "layers", "params", "lr", "train tok/s", "held-out loss"]
    head += [f"{p} @ {n}" for p in names for n in lengths]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in report["results"].items():
        cells = [name, r["layers"], f"{r['params'] / 1e6:.2f}M", f"{r['lr']:g}",
                 f"{r['train_tok_s']:,.0f}", f"{r['eval_loss']:.3f}"]  # fmt: skip
        for p in names:
            for n in lengths:
                x = r["retrieval"][p][str(n)]
                cells.append(f"{x['mean']:.2f} ± {x['std']:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    a, m = report["ablate"], report["machine"]
    data = f"text {a['data']}" if a["data"] else f"synthetic {a['task']}"
    if a["task"] == "retrieval" and not a["data"]:
        data += " (half MQAR, half passkey)"
    if a["min_pairs"] and not a["data"] and a["task"] in ("recall", "retrieval"):
        data += f", {a['min_pairs']}–{a['num_pairs']} pairs in training"
    pick = "validation loss" if a["data"] else "validation accuracy"
    lines += ["", f"{a['preset']} at {a['seq_len']} tokens, {a['steps']} steps × "
              f"{a['batch_size']}, {data}, {a['num_pairs']} pairs/needle tokens; seeds "
              f"{', '.join(map(str, a['seeds']))} (mean ± std); lr from "
              f"{', '.join(f'{x:g}' for x in a['lrs'])} by {pick} on seed {a['seeds'][0]}; "
              f"{m['cpu']}, {m['torch_threads']} threads"]  # fmt: skip
    return "\n".join(lines)


def _plot(report: dict, out: Path) -> None:
    from lightlong.plot import bars, pyplot, save, series, tidy

    plt = pyplot()
    a = report["ablate"]
    results = report["results"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, (name, r) in enumerate(results.items()):
        ax.plot(*zip(*r["curve"], strict=True), label=f"{name} ({r['layers']}, lr {r['lr']:g})",
                **series(i, dense=True))  # fmt: skip
    ax.set_xlabel(f"step (seed {a['seeds'][0]})")
    ax.set_ylabel("training loss")
    ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"{out.resolve().name} — {a['preset']} variants, step {a['steps']}", fontsize=9)
    tidy(ax)
    save(fig, out / "loss.png")

    names = list(next(iter(results.values()))["retrieval"])
    columns = [(p, n) for p in names for n in report["lengths"]]
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / len(results)
    for i, (name, r) in enumerate(results.items()):
        cells = [r["retrieval"][p][str(n)] for p, n in columns]
        xs = [j + i * width for j in range(len(columns))]
        ax.bar(xs, [c["mean"] for c in cells], width, yerr=[c["std"] for c in cells],
               capsize=2, label=name, **bars(i))  # fmt: skip
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(columns))],
                  [f"{p} @ {n}" for p, n in columns])  # fmt: skip
    ax.set_ylim(0, 1.05)
    ax.set_ylabel(f"answer accuracy (test, mean ± std of {len(a['seeds'])} seeds)")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"{out.resolve().name} — {a['preset']} variants, step {a['steps']}", fontsize=9)
    tidy(ax)
    save(fig, out / "retrieval.png")
