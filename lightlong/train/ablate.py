"""`lightlong ablate`: MiniMax-01's architecture ablation at laptop scale.

Each variant is the preset's hybrid with its lightning layers replaced by another mixer
(its softmax layers stay): `lightning` (the preset itself), `cosformer`, `norm_linear`
(NormAttention), `window` (sliding-window softmax), `diag` (DiagAttention), and
`softmax` (every layer softmax, the reference). All train with the same size, data, steps,
batch and learning rate; then each reports its held-out loss, training tok/s and
retrieval at the training length and `length_factor` times it:

- synthetic data (default, task `retrieval`: half multi-query associative recall, half
  passkey): MQAR and NIAH are answer accuracy on held-out `recall` and `passkey` samples
  (the passkey is a needle of `num_pairs` tokens at a random depth); another synthetic
  `task` is measured by its own answer accuracy;
- text (`data`): NIAH is `lightlong.eval`'s niah task (generation, match-all, depth 0.5).

Writes `ablation.json`, `ablation.md`, `loss.png`, `retrieval.png` and each variant's run
directory under `out_dir`.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from lightlong.bench.machine import describe_machine
from lightlong.model import HybridConfig
from lightlong.model.config import PRESETS
from lightlong.train.config import TrainConfig
from lightlong.train.data import TASKS, SyntheticData, SyntheticTask
from lightlong.train.loop import Trainer, answer_totals

VARIANTS = {
    "lightning": "lightning", "cosformer": "cosformer", "norm_linear": "norm_linear",
    "window": "window_softmax", "diag": "diag_softmax", "softmax": "softmax",
}  # fmt: skip
"""Variant name -> the mixer that replaces the preset's lightning layers."""


@dataclass
class AblateConfig:
    """What `lightlong ablate` trains and measures."""

    preset: str = "tiny"
    """Model preset; every variant has its size (the same projections and MoE)."""
    variants: list[str] = field(
        default_factory=lambda: ["lightning", "cosformer", "norm_linear", "window"]
    )
    """lightning, cosformer, norm_linear, window, diag, softmax (commas also separate)."""
    data: list[str] = field(default_factory=list)
    """Text files (.txt/.jsonl) to train on; empty: the synthetic `task`."""
    task: str = "retrieval"
    """Synthetic task: retrieval (MQAR + passkey), recall, passkey, copy, selective_copy."""
    seq_len: int = 64
    """Training length (tokens)."""
    num_pairs: int = 4
    """Synthetic: key-value pairs (MQAR) and needle tokens (passkey)."""
    num_queries: int = 12
    """Synthetic: MQAR queries per sample."""
    steps: int = 2000
    """Optimizer steps per variant."""
    batch_size: int = 32
    """Samples per step."""
    lr: float = 3e-3
    """Peak learning rate."""
    window: int = 0
    """Span of window (window_size) and diag (block) layers; 0: seq_len // 4."""
    length_factor: int = 4
    """Retrieval is measured at seq_len and seq_len × this."""
    eval_batches: int = 8
    """Held-out batches per measurement (synthetic)."""
    niah_samples: int = 8
    """Text: NIAH prompts per length."""
    seed: int = 0
    """Weights and data seed (the same for every variant)."""
    out_dir: str = "runs/ablate"
    """ablation.json, ablation.md, loss.png, retrieval.png, one run directory per variant."""

    def __post_init__(self):
        self.variants = [v for item in self.variants for v in item.split(",") if v]

    def validate(self) -> AblateConfig:
        """Raises ValueError naming the field; returns self."""
        if self.preset not in PRESETS:
            raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {self.preset!r}")
        bad = [v for v in self.variants if v not in VARIANTS]
        if not self.variants or bad:
            raise ValueError(f"variants must be some of {list(VARIANTS)}, got {self.variants}")
        for name in ("seq_len", "num_pairs", "num_queries", "steps", "batch_size",
                     "length_factor", "eval_batches", "niah_samples"):  # fmt: skip
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.window < 0 or self.lr <= 0:
            raise ValueError("window must be >= 0 and lr > 0")
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
        return self

    @property
    def span(self) -> int:
        return self.window or max(1, self.seq_len // 4)


def variant_config(cfg: AblateConfig, variant: str) -> HybridConfig:
    """The preset with its lightning layers replaced by the variant's mixer."""
    base = HybridConfig.from_preset(cfg.preset)
    mixer = VARIANTS[variant]
    if variant == "softmax":
        layer_types = ["softmax"] * base.num_layers
    else:
        layer_types = [mixer if t == "lightning" else t for t in base.layer_types]
    return dataclasses.replace(
        base, layer_types=layer_types, window_size=cfg.span, diag_block_size=cfg.span,
        cosformer_max_len=cfg.seq_len * cfg.length_factor,
    ).validate()  # fmt: skip


def run_ablation(cfg: AblateConfig) -> dict:
    """Trains and measures every variant; prints the table; writes the report and plots."""
    cfg.validate()
    out = Path(cfg.out_dir)
    long = cfg.seq_len * cfg.length_factor
    results = {}
    for variant in cfg.variants:
        run = out / variant
        run.mkdir(parents=True, exist_ok=True)
        config = variant_config(cfg, variant)
        (run / "model.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
        tc = TrainConfig(
            model=str(run / "model.json"), task="text" if cfg.data else cfg.task,
            data_files=list(cfg.data), num_pairs=cfg.num_pairs, num_queries=cfg.num_queries,
            seq_len=cfg.seq_len, batch_size=cfg.batch_size, steps=cfg.steps, lr=cfg.lr,
            warmup_steps=max(1, cfg.steps // 10), eval_every=0, eval_batches=cfg.eval_batches,
            log_every=max(1, cfg.steps // 20), save_every=0, keep_last=1, seed=cfg.seed,
            progress=False, out_dir=str(run),
        ).validate()  # fmt: skip
        print(f"{variant}: training {config.pattern}", flush=True)
        t0 = time.perf_counter()
        trainer = Trainer(tc)
        final = trainer.fit()
        seconds = time.perf_counter() - t0
        metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        # Rate over the logged windows after the first (which holds the warm-up).
        rates = [m["tok_s"] for m in metrics[1:]] or [metrics[0]["tok_s"]]
        trainer.model.eval()
        results[variant] = {
            "layers": config.pattern,
            "params": trainer.model.param_count()["total"],
            "train_seconds": seconds,
            "train_tok_s": sum(rates) / len(rates),
            "eval_loss": final["eval_loss"],
            "retrieval": _retrieval(cfg, trainer, long),
            "curve": [(m["step"], m["loss"]) for m in metrics],
        }
    report = {
        "ablate": dataclasses.asdict(cfg),
        "machine": describe_machine("cpu"),
        "lengths": [cfg.seq_len, long],
        "results": results,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "ablation.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "ablation.md").write_text(format_ablation(report) + "\n")
    _plot(report, out)
    print(format_ablation(report))
    print(f"wrote {out / 'ablation.json'}, ablation.md, loss.png, retrieval.png")
    return report


def probes(cfg: AblateConfig) -> dict[str, str]:
    """Retrieval measurements: column name -> synthetic task ("text" for text NIAH)."""
    if cfg.data:
        return {"NIAH": "text"}
    if cfg.task == "retrieval":
        return {"MQAR": "recall", "NIAH": "passkey"}
    return {cfg.task: cfg.task}


def _retrieval(cfg: AblateConfig, trainer: Trainer, long: int) -> dict:
    """{probe: {length: answer accuracy (synthetic) or NIAH score (text)}}."""
    lengths = [cfg.seq_len, long]
    model = trainer.model
    out = {}
    for name, task in probes(cfg).items():
        if task == "text":
            out[name] = _text_niah(cfg, model, lengths)
            continue
        data = SyntheticData(
            SyntheticTask(task, model.config.vocab_size, cfg.num_pairs, cfg.num_queries),
            cfg.seq_len, cfg.batch_size, seed=cfg.seed + 1_000_003,
        )  # fmt: skip
        out[name] = {}
        for n in lengths:
            totals = answer_totals(model, data, cfg.eval_batches, n, trainer.device)
            out[name][str(n)] = float(totals[1] / totals[2].clamp(min=1))
    return out


def _text_niah(cfg: AblateConfig, model, lengths: list[int]) -> dict:
    from lightlong.eval.runner import EvalConfig, engine_generate, evaluate, make_samples, make_task
    from lightlong.infer import Engine
    from lightlong.tokenizer import ByteTokenizer

    tokenizer = ByteTokenizer()
    ec = EvalConfig(model="ablation", lengths=lengths, depths=[0.5],
                    samples=cfg.niah_samples, seed=cfg.seed)  # fmt: skip
    task = make_task("niah", ec)
    records = evaluate(task, make_samples(task, ec, tokenizer),
                       engine_generate(Engine(model, tokenizer), 8))  # fmt: skip
    return {str(n): sum(r["score"] for r in records if r["length"] == n)
            / sum(r["length"] == n for r in records) for n in lengths}  # fmt: skip


def format_ablation(report: dict) -> str:
    """Markdown table: per variant, layers, params, tok/s, held-out loss, retrieval."""
    lengths = report["lengths"]
    names = list(next(iter(report["results"].values()))["retrieval"])
    head = ["variant", "layers", "params", "train tok/s", "held-out loss"]
    head += [f"{p} @ {n}" for p in names for n in lengths]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in report["results"].items():
        cells = [name, r["layers"], f"{r['params'] / 1e6:.2f}M", f"{r['train_tok_s']:,.0f}",
                 f"{r['eval_loss']:.3f}"]  # fmt: skip
        cells += [f"{r['retrieval'][p][str(n)]:.2f}" for p in names for n in lengths]
        lines.append("| " + " | ".join(cells) + " |")
    a, m = report["ablate"], report["machine"]
    data = f"text {a['data']}" if a["data"] else f"synthetic {a['task']}"
    if a["task"] == "retrieval" and not a["data"]:
        data += " (half MQAR, half passkey)"
    lines += ["", f"{a['preset']} at {a['seq_len']} tokens, {a['steps']} steps × "
              f"{a['batch_size']}, lr {a['lr']}, {data}, {a['num_pairs']} pairs/needle tokens; "
              f"{m['cpu']}, {m['torch_threads']} threads"]  # fmt: skip
    return "\n".join(lines)


def _plot(report: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = report["results"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, (name, r) in enumerate(results.items()):
        ax.plot(*zip(*r["curve"], strict=True), color=f"C{i}", label=f"{name} ({r['layers']})")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=110)
    plt.close(fig)

    names = list(next(iter(results.values()))["retrieval"])
    bars = [(p, n) for p in names for n in report["lengths"]]
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / len(results)
    for i, (name, r) in enumerate(results.items()):
        values = [r["retrieval"][p][str(n)] for p, n in bars]
        ax.bar([j + i * width for j in range(len(bars))], values, width, color=f"C{i}",
               label=name)  # fmt: skip
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(bars))],
                  [f"{p} @ {n}" for p, n in bars])  # fmt: skip
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("answer accuracy (held out)")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "retrieval.png", dpi=110)
    plt.close(fig)
