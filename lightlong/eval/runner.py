"""`lightlong eval`: runs tasks on a model over a grid of lengths (× depths), writes JSON
and plots.

Generation goes through `lightlong.infer.Engine` (chunked prefill, batched greedy decode).
The model `oracle` answers every sample with its expected answer: it scores 1.0 and
checks the pipeline end to end without a model.

Output, under `out_dir`: `TASK.json` (config, machine, per-sample outputs and scores, the
mean per cell, per length and per depth) and `TASK.png` (a depth × length heatmap for
tasks with a depth, else score vs length; loss vs position for perplexity); `all` adds
`summary.json`, `summary.md` and `summary.png`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lightlong.bench.machine import describe_machine
from lightlong.eval import mrniah
from lightlong.eval.perplexity import documents, perplexity_by_position
from lightlong.eval.tasks import Sample, Task, niah_tasks, sample_seed
from lightlong.tokenizer import Tokenizer

ORACLE = "oracle"
GENERATION_TASKS = (
    "niah", "niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery",
    "variable_tracking", "common_words", "frequent_words", "mr_niah",
)  # fmt: skip
TASKS = (*GENERATION_TASKS, "perplexity")

# Heatmap layout, fixed so that cells sit at known pixels (tests read the PNG back).
HEATMAP_FIGSIZE = (7.0, 4.5)
HEATMAP_DPI = 100
HEATMAP_AXES = (0.12, 0.14, 0.70, 0.76)  # left, bottom, width, height (figure fractions)
HEATMAP_CMAP = "RdYlGn"

Generate = Callable[[list[Sample], Task], list[str]]


@dataclass
class EvalConfig:
    """What `lightlong eval` runs."""

    model: str = ""
    """Checkpoint directory, training run directory (its newest step-N), preset, or oracle."""
    lengths: list[int] = field(default_factory=lambda: [1024, 2048, 4096])
    """Prompt lengths in tokens of the tokenizer."""
    depths: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    """Needle depths for tasks with one target (mr_niah: always 0.25, 0.5, 0.75)."""
    samples: int = 2
    """Samples per cell (length, depth); perplexity: documents."""
    seed: int = 0
    """Base seed of every sample."""
    haystack: list[str] = field(default_factory=list)
    """Text files for the haystacks of niah, niah_multikey/-value/-query (default: generated)."""
    data: list[str] = field(default_factory=list)
    """mr_niah: MiniMax's JSONL files (run instead of generated chats); perplexity: .txt or
    .jsonl documents (default: generated text)."""
    tokenizer: str = ""
    """tokenizer.json or its directory (default: the model directory's, else bytes)."""
    batch_size: int = 8
    """Prompts decoded together."""
    prefill_chunk: int = 4096
    """Tokens per prefill pass."""
    max_new_tokens: int = 0
    """Tokens generated per answer (0: the task's own)."""
    dtype: str = "float32"
    """Model dtype: float32 or bfloat16."""
    device: str = "cpu"
    """Torch device."""
    quantize: str = "none"
    """none, or int8: projections and experts as int8 weights (`lightlong.nn.quantize_int8`)."""
    train_length: int = 0
    """Marks the model's training length on the perplexity plot (0: none)."""
    out_dir: str = "runs/eval"
    """Where TASK.json and TASK.png go."""

    def validate(self) -> EvalConfig:
        """Raises ValueError naming the field; returns self."""
        if not self.model:
            raise ValueError("model is required: a checkpoint directory, a preset or 'oracle'")
        if not self.lengths or any(n < 2 for n in self.lengths):
            raise ValueError(f"lengths must be token counts >= 2, got {self.lengths}")
        if not self.depths or any(not 0.0 <= d <= 1.0 for d in self.depths):
            raise ValueError(f"depths must be in [0, 1], got {self.depths}")
        for name in ("samples", "batch_size", "prefill_chunk"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_new_tokens < 0 or self.train_length < 0:
            raise ValueError("max_new_tokens and train_length must be >= 0")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype must be float32 or bfloat16, got {self.dtype!r}")
        if self.quantize not in ("none", "int8"):
            raise ValueError(f"quantize must be none or int8, got {self.quantize!r}")
        return self


def make_task(name: str, cfg: EvalConfig) -> Task:
    """The task called `name` (see TASKS), with the config's haystack files."""
    if name == "mr_niah":
        return mrniah.MRNIAH()
    tasks = niah_tasks(cfg.haystack or "generated")
    if name not in tasks:
        raise ValueError(f"unknown task {name!r}; valid: {', '.join(TASKS)}, all")
    return tasks[name]


def make_samples(task: Task, cfg: EvalConfig, tokenizer: Tokenizer) -> list[Sample]:
    """The task's samples over the grid: lengths × depths (tasks with a depth) × samples.
    mr_niah with `data` files: their rows instead."""
    if task.name == "mr_niah" and cfg.data:
        return mrniah.file_samples(cfg.data, tokenizer)
    depths: Sequence[float | None] = [None]
    if task.uses_depth:
        depths = mrniah.NEEDLE_DEPTHS if task.name == "mr_niah" else cfg.depths
    return [
        task.sample(tokenizer, n, sample_seed(cfg.seed, task.name, n, d, i), d)
        for n in cfg.lengths
        for d in depths
        for i in range(cfg.samples)
    ]


def engine_generate(engine, batch_size: int, max_new_tokens: int = 0) -> Generate:
    """A `Generate` that decodes greedily with an `Engine`, `batch_size` prompts at a time."""
    from lightlong.infer import SamplingParams

    def generate(samples: list[Sample], task: Task) -> list[str]:
        params = SamplingParams(
            max_new_tokens=max_new_tokens or task.max_new_tokens, stop=list(task.stop)
        )
        out: list[str] = []
        for i in range(0, len(samples), batch_size):
            batch = [s.prompt for s in samples[i : i + batch_size]]
            out += [g.text for g in engine.generate(batch, params)]
        return out

    return generate


def oracle_generate(samples: list[Sample], task: Task) -> list[str]:
    """Answers each sample with its expected answer."""
    return [s.answer for s in samples]


def evaluate(
    task: Task,
    samples: list[Sample],
    generate: Generate,
    *,
    batch_size: int = 8,
    progress: Callable[[int], None] | None = None,
) -> list[dict]:
    """Generates and scores every sample; returns one record per sample."""
    records = []
    for i in range(0, len(samples), batch_size):
        batch = samples[i : i + batch_size]
        for s, output in zip(batch, generate(batch, task), strict=True):
            records.append({
                "length": s.length, "depth": s.depth, "seed": s.seed,
                "prompt_tokens": s.prompt_tokens, "score": task.score(s, output),
                "output": output, "answer": s.answer, "meta": s.meta,
            })  # fmt: skip
        if progress is not None:
            progress(len(batch))
    return records


def summarize(records: list[dict]) -> dict:
    """Mean scores per (length, depth) cell, per length, per depth, and overall."""

    def mean(rs: list[dict]) -> float:
        return float(np.mean([r["score"] for r in rs]))

    cells: dict[tuple, list[dict]] = {}
    for r in records:
        cells.setdefault((r["length"], r["depth"]), []).append(r)
    lengths = sorted({r["length"] for r in records})
    depths = sorted({r["depth"] for r in records if r["depth"] is not None})
    files = sorted({r["meta"]["file"] for r in records if "file" in r["meta"]})
    extra = {"by_file": {f: mean([r for r in records if r["meta"].get("file") == f])
                         for f in files}} if files else {}  # fmt: skip
    return {
        "score": mean(records),
        "cells": [
            {"length": n, "depth": d, "score": mean(rs), "samples": len(rs)}
            for (n, d), rs in sorted(cells.items(), key=lambda kv: (kv[0][0], kv[0][1] or 0))
        ],
        "by_length": {str(n): mean([r for r in records if r["length"] == n]) for n in lengths},
        "by_depth": {str(d): mean([r for r in records if r["depth"] == d]) for d in depths},
        **extra,
    }


# -- the command ------------------------------------------------------------------------------


def load(cfg: EvalConfig):
    """(model or None for the oracle, tokenizer) for the config."""
    from lightlong.model.source import load_model, load_model_tokenizer
    from lightlong.runtime import check_device, parse_dtype
    from lightlong.tokenizer import load_tokenizer

    if cfg.model == ORACLE:
        return None, load_tokenizer(cfg.tokenizer or None)
    tokenizer = load_model_tokenizer(cfg.model, cfg.tokenizer or None)
    dtype = parse_dtype(cfg.dtype)
    device = check_device(cfg.device)
    model = load_model(cfg.model, dtype=dtype, device=device, quantize=cfg.quantize)
    return model.eval(), tokenizer


def run_eval(task_name: str, cfg: EvalConfig, *, quiet: bool = False) -> dict:
    """Runs one task (or `all`: every task, a summary) and writes its files; returns the
    report (for `all`: the summary)."""
    cfg.validate()
    if task_name != "all" and task_name not in TASKS:
        raise ValueError(f"unknown task {task_name!r}; valid: {', '.join(TASKS)}, all")
    names = list(TASKS) if task_name == "all" else [task_name]
    if cfg.model == ORACLE and task_name == "perplexity":
        raise ValueError("perplexity needs a model: the oracle only answers questions")
    model, tokenizer = load(cfg)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    reports = {}
    for name in names:
        if name == "perplexity" and model is None:
            continue
        report = _run_one(name, cfg, model, tokenizer, quiet)
        (out / f"{name}.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
        plot_report(report, out / f"{name}.png")
        reports[name] = report
        if not quiet:
            print(format_report(report))
    if task_name != "all":
        return reports[task_name]
    summary = {"config": dataclasses.asdict(cfg), "machine": reports[names[0]]["machine"],
               "tasks": {n: _headline(r) for n, r in reports.items()}}  # fmt: skip
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "summary.md").write_text(format_summary(summary) + "\n")
    plot_summary(summary, out / "summary.png")
    if not quiet:
        print(format_summary(summary))
    return summary


def _run_one(name: str, cfg: EvalConfig, model, tokenizer: Tokenizer, quiet: bool) -> dict:
    from tqdm import tqdm

    t0 = time.perf_counter()
    base = {
        "task": name, "model": cfg.model, "tokenizer": repr(tokenizer),
        "config": dataclasses.asdict(cfg),
        "machine": describe_machine(cfg.device if model is not None else "cpu"),
    }  # fmt: skip
    if name == "perplexity":
        docs = documents(tokenizer, max(cfg.lengths), cfg.samples, files=cfg.data, seed=cfg.seed)
        with tqdm(total=sum(len(d) - 1 for d in docs), desc=name, unit="tok",
                  unit_scale=True, disable=quiet) as bar:  # fmt: skip
            result = perplexity_by_position(model, docs, chunk=cfg.prefill_chunk,
                                            progress=bar.update)  # fmt: skip
        return {**base, "metric": "loss", "documents": [len(d) for d in docs], **result,
                "seconds": time.perf_counter() - t0}  # fmt: skip
    task = make_task(name, cfg)
    samples = make_samples(task, cfg, tokenizer)
    if model is None:
        generate = oracle_generate
    else:
        from lightlong.infer import Engine

        engine = Engine(model, tokenizer, prefill_chunk=cfg.prefill_chunk)
        generate = engine_generate(engine, cfg.batch_size, cfg.max_new_tokens)
    with tqdm(total=len(samples), desc=name, unit="sample", disable=quiet) as bar:
        records = evaluate(task, samples, generate, batch_size=cfg.batch_size,
                           progress=bar.update)  # fmt: skip
    return {**base, "metric": task.metric, "uses_depth": task.uses_depth, **summarize(records),
            "records": records, "seconds": time.perf_counter() - t0}  # fmt: skip


def _headline(report: dict) -> dict:
    if report["task"] == "perplexity":
        return {"metric": "perplexity", "score": report["perplexity"]}
    return {"metric": report["metric"], "score": report["score"],
            "by_length": report["by_length"]}  # fmt: skip


# -- text and plots ---------------------------------------------------------------------------


def format_report(report: dict) -> str:
    """A Markdown table of one task's report."""
    if report["task"] == "perplexity":
        rows = [f"| {a:,}-{b - 1:,} | {loss:.3f} | {n:,} |"
                for (a, b), loss, n in zip(report["bins"], report["loss"], report["tokens"],
                                           strict=True) if loss is not None]  # fmt: skip
        return "\n".join([
            f"perplexity: {report['perplexity']:.3f} (loss {report['loss_all']:.4f})",
            "| positions | loss | predictions |", "|---|---|---|", *rows,
        ])  # fmt: skip
    lengths = list(report["by_length"])
    lines = [f"{report['task']} ({report['metric']}): {report['score']:.3f}",
             "| depth | " + " | ".join(f"{int(n):,}" for n in lengths) + " |",
             "|---" * (len(lengths) + 1) + "|"]  # fmt: skip
    depths = sorted({c["depth"] for c in report["cells"]}, key=lambda d: -1 if d is None else d)
    for d in depths:
        cells = {c["length"]: c["score"] for c in report["cells"] if c["depth"] == d}
        label = "-" if d is None else f"{d:.2f}"
        lines.append(f"| {label} | " + " | ".join(f"{cells.get(int(n), math.nan):.2f}"
                                                  for n in lengths) + " |")  # fmt: skip
    lines += [f"{f}: {v:.3f}" for f, v in report.get("by_file", {}).items()]
    return "\n".join(lines)


def format_summary(summary: dict) -> str:
    """A Markdown table: task × length (perplexity: one number)."""
    lengths = sorted({n for t in summary["tasks"].values() for n in t.get("by_length", {})},
                     key=int)  # fmt: skip
    head = "| task | metric | all | " + " | ".join(f"{int(n):,}" for n in lengths) + " |"
    lines = [head, "|---" * (len(lengths) + 3) + "|"]
    for name, t in summary["tasks"].items():
        by = t.get("by_length", {})
        cells = [f"{by[n]:.2f}" if n in by else "-" for n in lengths]
        lines.append(f"| {name} | {t['metric']} | {t['score']:.3f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def heatmap_matrix(report: dict) -> tuple[list[int], list[float], np.ndarray]:
    """(lengths, depths, scores [depths, lengths]) of a task with depths; NaN where no cell."""
    lengths = sorted({c["length"] for c in report["cells"]})
    depths = sorted({c["depth"] for c in report["cells"]})
    m = np.full((len(depths), len(lengths)), np.nan)
    for c in report["cells"]:
        m[depths.index(c["depth"]), lengths.index(c["length"])] = c["score"]
    return lengths, depths, m


def plot_report(report: dict, path: Path) -> None:
    """The task's PNG: heatmap (tasks with depths), score vs length, or loss vs position."""
    from lightlong.plot import pyplot, save, series, tidy

    plt = pyplot()
    title = f"{report['task']} — {report['model']}"
    heatmap = report["task"] != "perplexity" and report["uses_depth"]
    if heatmap and all(c["depth"] is not None for c in report["cells"]):
        # A fixed layout (HEATMAP_*), so that a cell's pixels are where the tests look.
        lengths, depths, m = heatmap_matrix(report)
        fig = plt.figure(figsize=HEATMAP_FIGSIZE, dpi=HEATMAP_DPI)
        ax = fig.add_axes(HEATMAP_AXES)
        image = ax.imshow(m, cmap=HEATMAP_CMAP, vmin=0.0, vmax=1.0, aspect="auto",
                          interpolation="nearest", origin="upper")  # fmt: skip
        for (i, j), v in np.ndenumerate(m):
            if not np.isnan(v):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=8)
        ax.set_xticks(range(len(lengths)), [f"{n:,}" for n in lengths])
        ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
        ax.set_xlabel("prompt length (tokens)")
        ax.set_ylabel("needle depth")
        fig.colorbar(image, cax=fig.add_axes((0.86, 0.14, 0.03, 0.76)), label=report["metric"])
        ax.set_title(title, fontsize=9)
        fig.savefig(path, dpi=HEATMAP_DPI)
        plt.close(fig)
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    if report["task"] == "perplexity":
        mids = [math.sqrt(a * b) for a, b in report["bins"]]
        ax.plot(mids, [np.nan if x is None else x for x in report["loss"]], ms=3, **series(0))
        if report["config"]["train_length"]:
            ax.axvline(report["config"]["train_length"], color="gray", ls="--",
                       label="training length")  # fmt: skip
            ax.legend()
        ax.set_xscale("log", base=2)
        ax.set_xlabel("token position")
        ax.set_ylabel("loss (nats)")
    else:
        lengths = [int(n) for n in report["by_length"]]
        ax.plot(lengths, list(report["by_length"].values()), **series(0))
        ax.set_xscale("log", base=2)
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("prompt length (tokens)")
        ax.set_ylabel(report["metric"])
    ax.grid(True, alpha=0.3)
    ax.set_title(title, fontsize=9)
    tidy(ax)
    save(fig, path, dpi=HEATMAP_DPI)


def plot_summary(summary: dict, path: Path) -> None:
    """Score vs length for every generation task in the summary."""
    from lightlong.plot import pyplot, save, series, tidy

    fig, ax = pyplot().subplots(figsize=(7, 4.5))
    for i, (name, t) in enumerate(summary["tasks"].items()):
        if "by_length" in t:
            lengths = [int(n) for n in t["by_length"]]
            ax.plot(lengths, list(t["by_length"].values()), label=name, **series(i))
    ax.set_xscale("log", base=2)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("prompt length (tokens)")
    ax.set_ylabel("score")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(f"lightlong eval all — {summary['config']['model']}", fontsize=9)
    tidy(ax)
    save(fig, path)
