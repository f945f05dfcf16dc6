"""`TrainConfig`: every knob of a training run, from a TOML/YAML/JSON file and key=value
overrides; unknown keys and bad values fail before anything is built."""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lightlong.train.data import TASKS

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib


@dataclass
class ParallelConfig:
    """How a run spreads over the processes of a torchrun launch (key=value as
    `parallel.sequence=2`; `parallel=fsdp` is short for `parallel.data=fsdp`). The processes
    form a data × sequence grid: world size = replicas × `sequence`."""

    data: str = "ddp"
    """Across replicas: 'ddp', or 'fsdp' (FSDP2, fully_shard per layer; only without
    sequence or expert parallelism)."""
    sequence: int = 1
    """Sequence-parallel degree: every packed row is split into this many contiguous chunks,
    one per process (lightning layers exchange one state per head, softmax layers all-gather
    K/V). Must divide the number of processes."""
    expert: int = 1
    """Expert-parallel degree: each MoE layer's experts are sharded over this many processes
    (all-to-all token dispatch). Must divide the number of processes and the expert count."""

    def validate(self) -> None:
        """Raises ValueError naming the key (parallel.NAME) and what it accepts."""
        if self.data not in ("ddp", "fsdp"):
            raise ValueError(f"parallel.data must be 'ddp' or 'fsdp', got {self.data!r}")
        for name in ("sequence", "expert"):
            if getattr(self, name) < 1:
                raise ValueError(f"parallel.{name} must be >= 1, got {getattr(self, name)}")
        if self.data == "fsdp" and (self.sequence > 1 or self.expert > 1):
            raise ValueError(
                "parallel.data='fsdp' runs without sequence or expert parallelism; with "
                f"parallel.sequence={self.sequence}, parallel.expert={self.expert} use "
                "parallel.data='ddp' (gradients all-reduced across the replicas)"
            )

    def check_world(self, world: int) -> None:
        """Raises ValueError naming the key whose degree does not divide `world` processes."""
        for name in ("sequence", "expert"):
            degree = getattr(self, name)
            if world % degree:
                raise ValueError(
                    f"parallel.{name}={degree} must divide the number of processes ({world})"
                )


@dataclass
class TrainConfig:
    """A training run."""

    model: str = "tiny"
    """Preset name or config .json file (fresh weights from `seed`), or a checkpoint
    directory to start from."""
    task: str = "recall"
    """Synthetic task (recall, passkey, copy, selective_copy, retrieval) or 'text'
    (data_files)."""
    data_files: list[str] = field(default_factory=list)
    """.txt / .jsonl files for task 'text'."""
    text_field: str = "text"
    """Field of a .jsonl record that holds the document."""
    tokenizer: str = ""
    """tokenizer.json (or its directory) for task 'text'; empty: UTF-8 bytes."""
    num_pairs: int = 16
    """Synthetic tasks: key-value pairs (recall) or answer tokens (others)."""
    num_queries: int = 16
    """Recall: queries per sample."""
    min_pairs: int = 0
    """Recall (and retrieval's recall samples): training samples draw their pair count from
    min_pairs … num_pairs (a curriculum within each batch; 0: always num_pairs). Held-out
    samples have num_pairs; other tasks ignore it."""
    seq_len: int = 512
    """Tokens per sample (synthetic) or window (text)."""
    batch_size: int = 8
    """Samples per optimizer step, over all processes and accumulation steps."""
    grad_accum: int = 1
    """Micro-batches per optimizer step (each process)."""
    steps: int = 200
    """Optimizer steps in all."""
    lr: float = 3e-3
    """Peak learning rate (AdamW)."""
    min_lr_ratio: float = 0.1
    """Cosine decay ends at lr · min_lr_ratio."""
    warmup_steps: int = 20
    """Linear warmup from 0."""
    weight_decay: float = 0.1
    """AdamW decay on matrices (not on norms)."""
    beta1: float = 0.9
    """AdamW β1."""
    beta2: float = 0.95
    """AdamW β2."""
    grad_clip: float = 1.0
    """Max global gradient norm; 0 turns clipping off."""
    dtype: str = "float32"
    """float32, or bfloat16 (autocast; weights and optimizer stay fp32)."""
    activation_checkpointing: bool = False
    """Recompute each layer in the backward instead of keeping its activations."""
    eval_every: int = 50
    """Steps between held-out evaluations (0: only at the end)."""
    eval_batches: int = 2
    """Batches per evaluation."""
    eval_lengths: list[int] = field(default_factory=list)
    """Synthetic tasks: also measure recall at these lengths (e.g. 4× seq_len)."""
    save_every: int = 0
    """Steps between checkpoints (0: only at the end)."""
    keep_last: int = 2
    """Complete checkpoints kept (0: all)."""
    out_dir: str = "runs/train"
    """Checkpoints, metrics.jsonl and loss.png."""
    resume: str = ""
    """'auto' (newest complete checkpoint in out_dir, if any), a checkpoint dir, or ''."""
    seed: int = 0
    """Seed of the weights and the data order."""
    max_nonfinite: int = 5
    """Abort after this many non-finite steps in a row (each is skipped and counted)."""
    log_every: int = 10
    """Steps between metric lines."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """With several processes: data (ddp, fsdp), sequence and expert parallelism (see
    parallel.*)."""
    device: str = "cpu"
    """cpu, cuda (each process takes cuda:LOCAL_RANK) or another torch device."""
    progress: bool = True
    """Show a progress bar (rank 0)."""

    def validate(self) -> TrainConfig:
        """Raises ValueError naming the key and what it accepts; returns self."""
        if self.task not in (*TASKS, "text"):
            raise ValueError(f"task must be one of {(*TASKS, 'text')}, got {self.task!r}")
        if self.task == "text" and not self.data_files:
            raise ValueError("data_files: task 'text' needs at least one file")
        positive = ("seq_len", "batch_size", "grad_accum", "steps", "eval_batches",
                    "log_every", "max_nonfinite", "num_pairs", "num_queries")  # fmt: skip
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "eval_every", "save_every", "keep_last", "grad_clip",
                     "weight_decay"):  # fmt: skip
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.min_pairs <= self.num_pairs:
            raise ValueError(f"min_pairs must be in [0, num_pairs={self.num_pairs}], got "
                             f"{self.min_pairs}")  # fmt: skip
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {self.dtype!r}")
        if isinstance(self.parallel, str):  # TrainConfig(parallel="fsdp"), as before
            self.parallel = ParallelConfig(data=self.parallel)
        self.parallel.validate()
        if self.batch_size % self.grad_accum:
            raise ValueError(
                f"batch_size {self.batch_size} must be a multiple of grad_accum {self.grad_accum}"
            )
        if any(n < 2 for n in self.eval_lengths):
            raise ValueError(f"eval_lengths must be >= 2, got {self.eval_lengths}")
        return self

    @classmethod
    def load(cls, path: str | Path | None = None, overrides: list[str] = ()) -> TrainConfig:
        """From a .toml/.yaml/.json file (optional), then `key=value` overrides; validated."""
        values: dict[str, Any] = {}
        if path is not None:
            values = _read(Path(path))
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"{path}: unknown keys {unknown}; valid keys: {sorted(names)}")
        hints = typing.get_type_hints(cls)
        for item in overrides:
            key, eq, text = item.partition("=")
            if not eq:
                raise ValueError(f"override {item!r}: expected key=value")
            head, dot, sub = key.partition(".")
            if head not in names or (dot and not dataclasses.is_dataclass(hints[head])):
                raise ValueError(f"override {item!r}: unknown key {key!r}; valid: {sorted(names)}")
            if dataclasses.is_dataclass(hints[head]):  # parallel=fsdp sets parallel.data
                table = _table(head, values.get(head, {}))
                if dot:
                    kind = typing.get_type_hints(hints[head]).get(sub, str)
                    table[sub] = _parse(key, text, kind)
                else:
                    table.update(_table(head, text))
                values[head] = table
            else:
                values[key] = _parse(key, text, hints[key])
        for key, value in values.items():
            if dataclasses.is_dataclass(hints[key]):
                values[key] = _nested(key, _table(key, value), hints[key])
            else:
                _check_type(key, value, hints[key])
        return cls(**values).validate()


@dataclass
class RecipeConfig:
    """The synthetic-task recipe that `lightlong demo` and `lightlong ablate` train every
    model on alike (each adds what it compares)."""

    task: str = "recall"
    """Synthetic task: recall (multi-query associative recall), retrieval (recall or
    passkey), passkey, copy or selective_copy."""
    seq_len: int = 48
    """Training length (tokens)."""
    num_pairs: int = 8
    """Key-value pairs (recall) or answer tokens (passkey, copy, selective_copy)."""
    num_queries: int = 8
    """Recall: queries per sample."""
    min_pairs: int = 1
    """Recall: training samples have min_pairs … num_pairs pairs (0: always num_pairs)."""
    steps: int = 1000
    """Optimizer steps per model."""
    batch_size: int = 32
    """Samples per step."""
    eval_batches: int = 8
    """Held-out batches per measurement."""

    def validate_recipe(self) -> None:
        """Raises ValueError naming the field."""
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
        for name in ("seq_len", "num_pairs", "num_queries", "steps", "batch_size",
                     "eval_batches"):  # fmt: skip
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.min_pairs <= self.num_pairs:
            raise ValueError(f"min_pairs must be in [0, num_pairs={self.num_pairs}], got "
                             f"{self.min_pairs}")  # fmt: skip


def _read(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ValueError(f"config file {path} " + ("is not a file" if path.exists() else
                                                   "does not exist"))  # fmt: skip
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"config file {path}: not UTF-8 (byte offset {e.start})") from None
    try:
        if path.suffix == ".toml":
            data = tomllib.loads(text)
        elif path.suffix in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError:
                raise ValueError(f"{path}: YAML needs PyYAML (pip install pyyaml)") from None
            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as e:  # each parser raises its own error type
        raise ValueError(f"config file {path}: cannot parse: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"config file {path}: expected a table of key = value")
    return data


def _table(key: str, value: Any) -> dict[str, Any]:
    """A nested key's values: a table, or a string as the first field (parallel=fsdp)."""
    if isinstance(value, str):
        return {"data": value}
    if not isinstance(value, dict):
        raise ValueError(f"{key} must be a table of {key}.NAME = value, got {value!r}")
    return dict(value)


def _nested(key: str, table: dict[str, Any], cls: type) -> Any:
    """The dataclass cls from a table, each value type-checked under its dotted name."""
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(table) - set(hints))
    if unknown:
        raise ValueError(
            f"unknown keys {[f'{key}.{u}' for u in unknown]}; valid: "
            f"{[f'{key}.{n}' for n in hints]}"
        )
    for name, value in table.items():
        _check_type(f"{key}.{name}", value, hints[name])
    return cls(**table)


def _parse(key: str, text: str, kind: Any) -> Any:
    """A command-line value as the field's type (lists as JSON or comma-separated)."""
    try:
        if kind is bool:
            if text.lower() not in ("true", "false", "1", "0"):
                raise ValueError
            return text.lower() in ("true", "1")
        if kind in (int, float):
            return kind(text)
        if typing.get_origin(kind) is list:
            (item,) = typing.get_args(kind)
            parts = json.loads(text) if text.startswith("[") else [p for p in text.split(",") if p]
            return [item(p) for p in parts]
        return text
    except (ValueError, json.JSONDecodeError):
        raise ValueError(f"override {key}={text!r}: expected {_name(kind)}") from None


def _check_type(key: str, value: Any, kind: Any) -> None:
    if typing.get_origin(kind) is list:
        (item,) = typing.get_args(kind)
        ok = isinstance(value, list) and all(isinstance(v, item) for v in value)
    elif kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, kind)
    if not ok:
        raise ValueError(f"{key} must be {_name(kind)}, got {value!r}")


def _name(kind: Any) -> str:
    return getattr(kind, "__name__", str(kind)) if typing.get_origin(kind) is None else str(kind)
