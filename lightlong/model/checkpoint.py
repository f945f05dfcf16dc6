"""Checkpoints in MiniMax-Text-01's Hugging Face layout: `config.json` + safetensors shards,
with the tokenizer and `generation_config.json` beside them.

Loads the released layout (our parameter names are its keys) and `transformers`' layout
(`mlp.*` for `block_sparse_moe.*`, experts fused as `gate_up_proj` [E, 2I, D] and `down_proj`
[E, D, I], derived decay buffers), one shard at a time. Saves the released layout atomically.

A training run directory holds `step-N/` checkpoints, each complete once its `COMPLETE`
marker is written; `resolve_checkpoint` turns a run directory into its newest one.
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
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from lightlong.model.config import CONFIG_FORMATS, HybridConfig
from lightlong.model.hybrid import HybridLM
from lightlong.model.vision import HybridVLM, VLConfig
from lightlong.tokenizer import ByteTokenizer, Tokenizer, save_tokenizer

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
GENERATION_FILE = "generation_config.json"
MARKER = "COMPLETE"
"""Written last into a training run's step-N/ checkpoint."""
STATE_FILE = "trainer_state.pt"
"""The trainer state of a step-N/ checkpoint (optimizer, scheduler, RNG, data, counters)."""
_STEP_DIR = re.compile(r"^step-(\d+)$")


class CheckpointError(ValueError):
    """A checkpoint directory or file that cannot be read: the message names the file."""


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
            raise CheckpointError(f"{path / INDEX_FILE}: malformed index ({e})") from None
        missing = [f for f in files if not (path / f).exists()]
        if missing:
            raise CheckpointError(f"{path / INDEX_FILE} names shards that do not exist: {missing}")
        return [path / f for f in files]
    if (path / SINGLE_FILE).exists():
        return [path / SINGLE_FILE]
    raise CheckpointError(f"{path}: no {SINGLE_FILE} or {INDEX_FILE}")


def complete_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete `step-N/` checkpoints (COMPLETE marker, config.json and trainer state) under
    a training run directory, oldest first."""
    out = Path(run_dir)
    if not out.is_dir():
        return []
    found = []
    for p in out.iterdir():
        m = _STEP_DIR.match(p.name)
        names = (MARKER, STATE_FILE, CONFIG_FILE)
        if m and p.is_dir() and all((p / name).is_file() for name in names):
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def resolve_checkpoint(path: str | Path) -> Path:
    """The checkpoint directory `path` names: itself when it holds config.json, else (a
    training run directory) its newest complete `step-N/`. FileNotFoundError when `path`
    does not exist, CheckpointError when it is neither."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such checkpoint or run directory")
    if not path.is_dir():
        raise CheckpointError(f"{path}: expected a checkpoint directory (with {CONFIG_FILE})")
    if (path / CONFIG_FILE).is_file():
        return path
    runs = complete_checkpoints(path)
    if runs:
        return runs[-1]
    raise CheckpointError(
        f"{path}: no {CONFIG_FILE} and no complete step-N/ checkpoint in it; expected a "
        f"checkpoint directory ({CONFIG_FILE} + {SINGLE_FILE}) or a training run directory"
    )


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


def _vl_tensors(name: str, t: Tensor) -> Iterator[tuple[str, Tensor]]:
    """Maps one stored tensor of a vision-language checkpoint (MiniMax-VL-01's released
    names, or `transformers`' llava_next ones: `model.vision_tower.*` without
    `vision_model.`, `model.language_model.*`, `lm_head.*`) to our parameter names."""
    if name.startswith("model.language_model."):
        name = "language_model.model." + name.removeprefix("model.language_model.")
    elif name.startswith("model."):
        name = name.removeprefix("model.")
    elif name.startswith("lm_head."):
        name = "language_model." + name
    if name.startswith("vision_tower.") and not name.startswith("vision_tower.vision_model."):
        name = "vision_tower.vision_model." + name.removeprefix("vision_tower.")
    if name.startswith("language_model."):
        for n, t_n in _released_tensors(name.removeprefix("language_model."), t):
            yield "language_model." + n, t_n
        return
    yield name, t


def _skipped(key: str) -> bool:
    """Stored tensors that are derived or unused, recognised and not loaded: the text
    model's decay buffers, CLIP's position ids and its final LayerNorm (MiniMax-VL-01 takes
    its features before it; the released checkpoint has none, `transformers` saves one)."""
    last = key.rsplit(".", 1)[-1]
    return last in _DERIVED_BUFFERS or last == "position_ids" or ".post_layernorm." in key


def load_pretrained(
    path: str | Path,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
) -> HybridLM:
    """Builds the model on the meta device, then fills it shard by shard.

    `path` is a checkpoint directory or a training run directory (its newest complete
    step-N/). dtype None keeps the checkpoint's dtype. A missing directory raises
    FileNotFoundError; a missing, malformed or truncated file, and missing, unexpected or
    mis-shaped tensors, raise CheckpointError (a ValueError) naming the file and key.
    """
    path = resolve_checkpoint(path)
    config = HybridConfig.from_json(path / CONFIG_FILE)
    return _load_into(HybridLM, config, path, dtype, device, _released_tensors)


def load_pretrained_vl(
    path: str | Path,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
) -> HybridVLM:
    """`load_pretrained` for MiniMax-VL-01 (`lightlong.model.HybridVLM`): the released
    layout or `transformers`' llava_next one."""
    from lightlong.model.vision import VLConfig

    path = resolve_checkpoint(path)
    config = VLConfig.from_json(path / CONFIG_FILE)
    return _load_into(HybridVLM, config, path, dtype, device, _vl_tensors)


def _load_into(cls, config, path: Path, dtype, device, rename):
    """A `cls(config)` built on the meta device and filled from the checkpoint at `path`,
    one shard at a time; `rename` maps a stored (key, tensor) to (parameter name, tensor)
    pairs."""
    files = _checkpoint_files(path)
    if dtype is None:
        with _open_safetensors(files[0]) as f:
            keys = list(f.keys())
            dtype = f.get_slice(keys[0]).get_dtype() if keys else "F32"
        dtype = _SAFETENSORS_DTYPES.get(dtype, torch.float32)
    with torch.device("meta"):
        model = cls(config)
    model.to_empty(device=device)
    model.tie_weights()
    model.to(dtype)
    params = dict(model.named_parameters())
    loaded: set[str] = set()
    for file in files:
        with _open_safetensors(file) as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                if _skipped(key):
                    continue
                try:
                    tensor = f.get_tensor(key)
                except SafetensorError as e:
                    raise CheckpointError(f"{file}: cannot read tensor {key!r} ({e})") from None
                for name, t in rename(key, tensor):
                    if name not in params:
                        raise CheckpointError(
                            f"{file.name}: unexpected tensor {key!r} ({name!r}); is "
                            f"{path / CONFIG_FILE} the config of these weights?"
                        )
                    p = params[name]
                    if tuple(t.shape) != tuple(p.shape):
                        raise CheckpointError(
                            f"{file.name}: tensor {key!r} has shape {tuple(t.shape)}, the model "
                            f"expects {tuple(p.shape)} for {name!r}"
                        )
                    with torch.no_grad():
                        p.copy_(t)
                    loaded.add(name)
    tied = _tied_head(config)
    if tied is not None:
        loaded.add(tied)
    missing = sorted(set(params) - loaded)
    if missing:
        shown = ", ".join(missing[:8]) + (
            f" and {len(missing) - 8} more" if len(missing) > 8 else ""
        )
        raise CheckpointError(f"{path}: checkpoint lacks tensors for {shown}")
    return model


def _open_safetensors(file: Path):
    """safe_open, with a truncated or foreign file reported as CheckpointError."""
    try:
        return safe_open(file, "pt", device="cpu")
    except (SafetensorError, OSError) as e:
        raise CheckpointError(
            f"{file}: not a readable safetensors file ({e}); it may be truncated"
        ) from None


_SAFETENSORS_DTYPES = {
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F64": torch.float64,
}


def _plain(shard: dict[str, Tensor]) -> dict[str, Tensor]:
    """The shard's tensors contiguous, each in its own memory, on the CPU (safetensors
    writes no views: a laid-out model's weights are column-major views of shared buffers)."""
    return {k: v.contiguous().cpu() for k, v in shard.items()}


def _tied_head(config: HybridConfig | VLConfig) -> str | None:
    """The LM head's parameter name when it shares the embedding (not stored), else None."""
    if isinstance(config, VLConfig):
        return "language_model.lm_head.weight" if config.text.tie_word_embeddings else None
    return "lm_head.weight" if config.tie_word_embeddings else None


def save_pretrained(
    model: HybridLM,
    path: str | Path,
    *,
    tokenizer: Tokenizer | str | None = None,
    max_shard_size: int | str = "5GB",
    config_format: str = "minimax",
) -> None:
    """Writes config.json, safetensors shards (released weight names), the tokenizer and
    generation_config.json, atomically.

    config_format "minimax" writes the released config; "transformers" writes `transformers`'
    MiniMax config, which its `from_pretrained` reads (it converts the released weight names);
    a model `transformers` would run differently is refused (ValueError naming the field).
    tokenizer None writes the UTF-8 byte tokenizer's marker (what `load_tokenizer` then
    returns) when vocab_size holds its 257 ids, else says none was given; a string says
    what token ids the model was trained on without a tokenizer
    (`lightlong.tokenizer.save_tokenizer`).

    Everything goes to a temporary sibling directory first, which then replaces `path` by
    rename: a crash leaves the previous checkpoint (at `path`, or between the two renames
    in a hidden `.NAME.old-*` sibling) or the new one, never a mix. `path` may be new or a
    checkpoint directory; a file, the working directory or a directory holding other files
    is refused (ValueError), since replacing it would lose them.
    """
    save_weights(model.config, model.state_dict(), path, tokenizer=tokenizer,
                 max_shard_size=max_shard_size, config_format=config_format)  # fmt: skip


def save_weights(
    config: HybridConfig | VLConfig,
    state_dict: dict[str, Tensor],
    path: str | Path,
    *,
    tokenizer: Tokenizer | str | None = None,
    max_shard_size: int | str = "5GB",
    config_format: str = "minimax",
    extra_files: dict[str, bytes] | None = None,
) -> None:
    """`save_pretrained` from a config and a state dict (e.g. gathered from shards);
    `extra_files` (name -> bytes) are written into the same directory, last, before it is
    renamed into place."""
    path = Path(path)
    _check_replaceable(path)
    limit = parse_size(max_shard_size)
    if config_format not in CONFIG_FORMATS:
        raise ValueError(f"config_format must be one of {CONFIG_FORMATS}, got {config_format!r}")
    if config_format == "transformers":
        config.to_hf_dict()  # refuses what transformers' MiniMax cannot represent
    text = config.text if isinstance(config, VLConfig) else config
    if tokenizer is None:  # lightlong's default, when the vocabulary holds it
        bytes_fit = text.vocab_size >= ByteTokenizer.vocab_size
        tokenizer = ByteTokenizer() if bytes_fit else "no tokenizer given"
    special = tokenizer if not isinstance(tokenizer, str) else None
    if special is not None and special.vocab_size > text.vocab_size:
        raise ValueError(
            f"tokenizer has {special.vocab_size} ids, more than the model's vocab_size "
            f"{text.vocab_size}"
        )
    tied = _tied_head(config)
    state = {k: v.detach() for k, v in state_dict.items() if k != tied}  # made contiguous
    # and moved shard by shard below: a laid-out model (`lightlong.nn.decode_layout`) is
    # not copied whole at once
    shards: list[dict[str, Tensor]] = [{}]
    size = 0
    for key, t in state.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][key] = t
        size += nbytes

    ensure_writable_dir(path.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        umask = _umask()
        tmp.chmod(0o777 & ~umask)  # mkdtemp's 0700 would hide the checkpoint from others
        config.save_json(tmp / CONFIG_FILE, format=config_format)
        save_tokenizer(tokenizer, tmp)
        eos = None if special is None else special.eos_token_id
        generation = {"bos_token_id": None if special is None else special.bos_token_id,
                      "eos_token_id": eos, "pad_token_id": eos}  # fmt: skip
        (tmp / GENERATION_FILE).write_text(json.dumps(generation, indent=2) + "\n")
        if len(shards) == 1:
            save_file(_plain(shards[0]), tmp / SINGLE_FILE, metadata={"format": "pt"})
        else:
            weight_map = {}
            for i, shard in enumerate(shards):
                name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                save_file(_plain(shard), tmp / name, metadata={"format": "pt"})
                weight_map.update(dict.fromkeys(shard, name))
            total = sum(t.numel() * t.element_size() for t in state.values())
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        for name, data in (extra_files or {}).items():
            (tmp / name).write_bytes(data)
        for f in tmp.iterdir():  # safetensors creates its files 0600
            f.chmod(0o666 & ~umask)
        _fsync_dir(tmp)
        if path.exists():  # a crash between the renames leaves it in .NAME.old-*/
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            os.replace(path, old / path.name)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
        _fsync(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# What a checkpoint directory holds: saving may replace a directory of only these.
_CHECKPOINT_ENTRY = re.compile(
    r"^(config|generation_config|tokenizer|tokenizer_config|special_tokens_map"
    r"|preprocessor_config)\.json$"
    r"|^model(-\d+-of-\d+)?\.safetensors$|^model\.safetensors\.index\.json$"
    rf"|^{MARKER}$|^{re.escape(STATE_FILE)}$"
)


def _check_replaceable(path: Path) -> None:
    """Saving replaces `path` whole: refuse a file, the working directory (or one above
    it) and a directory holding anything but a checkpoint's files, naming what is there."""
    if not path.exists():
        return
    if not path.is_dir():
        raise ValueError(f"{path}: exists and is not a directory (a checkpoint is a directory)")
    if path.resolve() in (Path.cwd(), *Path.cwd().parents):
        raise ValueError(f"{path}: is the working directory or above it; save into a new one")
    other = sorted(p.name for p in path.iterdir() if not _CHECKPOINT_ENTRY.match(p.name))
    if other:
        shown = ", ".join(other[:3]) + (f" and {len(other) - 3} more" if len(other) > 3 else "")
        raise ValueError(
            f"{path}: holds {shown} besides a checkpoint; saving replaces the whole "
            "directory, so save into an empty or new one"
        )


def ensure_writable_dir(path: Path, *, create: bool = True) -> None:
    """Makes sure `path` is (create: becomes) a writable directory; ValueError naming it
    (or the file in its way) otherwise. create=False checks without creating anything:
    the nearest existing ancestor must be a writable directory."""
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"{path}: {existing} exists and is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{path}: {existing} is not writable")
    if create:
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ValueError(f"{path}: cannot create the directory ({e.strerror})") from None


def _umask() -> int:
    """The process's umask, read without changing it where Linux shows it (/proc); else
    set and put back at once, the only portable way."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync(path: Path) -> None:
    """Flushes a file or directory entry to disk (directories: where the OS allows it)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    """Flushes every file in `path`, then `path` itself."""
    for f in path.iterdir():
        _fsync(f)
    _fsync(path)
