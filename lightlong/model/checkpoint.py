"""Checkpoints in MiniMax-Text-01's Hugging Face layout: `config.json` + safetensors shards.

Loads the released layout (our parameter names are its keys) and `transformers`' layout
(`mlp.*` for `block_sparse_moe.*`, experts fused as `gate_up_proj` [E, 2I, D] and `down_proj`
[E, D, I], derived decay buffers), one shard at a time. Saves the released layout atomically.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from lightlong.model.config import CONFIG_FORMATS, HybridConfig
from lightlong.model.hybrid import HybridLM

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# transformers' MiniMax also saves what it derives from the config; recognised, not loaded
_DERIVED_BUFFERS = ("slope_rate", "query_decay", "key_decay", "diagonal_decay")
_HF_EXPERTS = re.compile(r"^(model\.layers\.\d+)\.mlp\.experts\.(gate_up_proj|down_proj)$")

_UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string like '5GB' / '500MiB'."""
    if isinstance(size, int) and size > 0:
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]I?B)\s*", str(size).upper())
    if not m:
        raise ValueError(f"max_shard_size must be bytes or like '5GB' / '500MiB', got {size!r}")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def _checkpoint_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint directory, in index order."""
    if (path / INDEX_FILE).exists():
        try:
            index = json.loads((path / INDEX_FILE).read_text())
            files = sorted(set(index["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError, TypeError) as e:
            raise ValueError(f"{path / INDEX_FILE}: malformed index ({e})") from None
        missing = [f for f in files if not (path / f).exists()]
        if missing:
            raise ValueError(f"{path / INDEX_FILE} names shards that do not exist: {missing}")
        return [path / f for f in files]
    if (path / SINGLE_FILE).exists():
        return [path / SINGLE_FILE]
    raise ValueError(f"{path}: no {SINGLE_FILE} or {INDEX_FILE}")


def _released_tensors(name: str, t: Tensor) -> Iterator[tuple[str, Tensor]]:
    """Maps one stored tensor to (our parameter name, tensor) pairs."""
    m = _HF_EXPERTS.match(name)
    if m:
        prefix, kind = m.groups()
        for e, t_e in enumerate(t):
            if kind == "gate_up_proj":
                w1, w3 = t_e.chunk(2, dim=0)
                yield f"{prefix}.block_sparse_moe.experts.{e}.w1.weight", w1
                yield f"{prefix}.block_sparse_moe.experts.{e}.w3.weight", w3
            else:
                yield f"{prefix}.block_sparse_moe.experts.{e}.w2.weight", t_e
        return
    yield name.replace(".mlp.", ".block_sparse_moe.", 1), t


def load_pretrained(
    path: str | Path,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
) -> HybridLM:
    """Builds the model on the meta device, then fills it shard by shard.

    dtype None keeps the checkpoint's dtype. Missing, unexpected or mis-shaped tensors raise
    ValueError naming the key (and both shapes).
    """
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"{path}: not a checkpoint directory")
    config = HybridConfig.from_json(path / "config.json")
    files = _checkpoint_files(path)
    if dtype is None:
        with safe_open(files[0], "pt") as f:
            keys = list(f.keys())
            dtype = f.get_slice(keys[0]).get_dtype() if keys else "F32"
        dtype = _SAFETENSORS_DTYPES.get(dtype, torch.float32)
    with torch.device("meta"):
        model = HybridLM(config)
    model.to_empty(device=device)
    model.tie_weights()
    model.to(dtype)
    params = dict(model.named_parameters())
    loaded: set[str] = set()
    for file in files:
        with safe_open(file, "pt", device="cpu") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                if key.rsplit(".", 1)[-1] in _DERIVED_BUFFERS:
                    continue
                for name, t in _released_tensors(key, f.get_tensor(key)):
                    if name not in params:
                        raise ValueError(f"{file.name}: unexpected tensor {key!r} ({name!r})")
                    p = params[name]
                    if tuple(t.shape) != tuple(p.shape):
                        raise ValueError(
                            f"{file.name}: tensor {key!r} has shape {tuple(t.shape)}, the model "
                            f"expects {tuple(p.shape)} for {name!r}"
                        )
                    with torch.no_grad():
                        p.copy_(t)
                    loaded.add(name)
    if config.tie_word_embeddings:
        loaded.add("lm_head.weight")
    missing = sorted(set(params) - loaded)
    if missing:
        shown = ", ".join(missing[:8]) + (
            f" and {len(missing) - 8} more" if len(missing) > 8 else ""
        )
        raise ValueError(f"{path}: checkpoint lacks tensors for {shown}")
    return model


_SAFETENSORS_DTYPES = {
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F64": torch.float64,
}


def save_pretrained(
    model: HybridLM,
    path: str | Path,
    *,
    max_shard_size: int | str = "5GB",
    config_format: str = "minimax",
) -> None:
    """Writes config.json and safetensors shards (released weight names), atomically.

    config_format "minimax" writes the released config; "transformers" writes `transformers`'
    MiniMax config, which its `from_pretrained` reads (it converts the released weight names).

    Everything goes to a temporary sibling directory first, which then replaces `path` by
    rename: a crash leaves either the previous checkpoint or the new one, never a mix.
    """
    save_weights(model.config, model.state_dict(), path, max_shard_size=max_shard_size,
                 config_format=config_format)  # fmt: skip


def save_weights(
    config: HybridConfig,
    state_dict: dict[str, Tensor],
    path: str | Path,
    *,
    max_shard_size: int | str = "5GB",
    config_format: str = "minimax",
) -> None:
    """`save_pretrained` from a config and a state dict (e.g. gathered from shards)."""
    path = Path(path)
    limit = parse_size(max_shard_size)
    if config_format not in CONFIG_FORMATS:
        raise ValueError(f"config_format must be one of {CONFIG_FORMATS}, got {config_format!r}")
    state = {
        k: v.detach().contiguous().cpu()
        for k, v in state_dict.items()
        if not (config.tie_word_embeddings and k == "lm_head.weight")
    }
    shards: list[dict[str, Tensor]] = [{}]
    size = 0
    for key, t in state.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][key] = t
        size += nbytes

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        config.save_json(tmp / "config.json", format=config_format)
        if len(shards) == 1:
            save_file(shards[0], tmp / SINGLE_FILE, metadata={"format": "pt"})
        else:
            weight_map = {}
            for i, shard in enumerate(shards):
                name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, tmp / name, metadata={"format": "pt"})
                weight_map.update(dict.fromkeys(shard, name))
            total = sum(t.numel() * t.element_size() for t in state.values())
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        _fsync_dir(tmp)
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            os.replace(path, old / path.name)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _fsync_dir(path: Path) -> None:
    for f in path.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
