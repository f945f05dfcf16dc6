"""Model references, resolved in one place: what `--model` (generate, info, eval, train) and
the Python loaders accept.

A reference is a preset name (`PRESETS`, or `VL_PRESETS` for a vision-language model), a
checkpoint directory (config.json + safetensors), a training run directory (its newest
complete `step-N/`), or a config .json file (fresh weights).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from lightlong.model.checkpoint import (
    GENERATION_FILE,
    CheckpointError,
    complete_checkpoints,
    resolve_checkpoint,
)
from lightlong.model.config import PRESETS, HybridConfig, read_json
from lightlong.model.hybrid import HybridLM
from lightlong.model.image import ImageProcessor
from lightlong.model.vision import VL_PRESETS, HybridVLM, VLConfig, is_vl_config
from lightlong.nn.quant import QUANTIZATIONS
from lightlong.nn.quant import quantize as quantize_model
from lightlong.tokenizer import ByteTokenizer, Tokenizer, load_tokenizer


def resolve_model(ref: str | Path) -> HybridConfig | VLConfig | Path:
    """The checkpoint directory `ref` names, or the config of a preset / config .json file.
    A preset name wins over a directory of that name unless the directory holds a checkpoint
    (write ./name for the directory).

    FileNotFoundError for a path that does not exist; ValueError (naming the presets) for a
    name that is neither a path nor a preset, or a directory that is not a checkpoint."""
    path = Path(ref)
    if str(ref) in {*PRESETS, *VL_PRESETS} and not _holds_checkpoint(path):  # out_dir "tiny"?
        name = str(ref)
        return HybridConfig.from_preset(name) if name in PRESETS else VLConfig.from_preset(name)
    if path.is_dir():
        return resolve_checkpoint(path)
    if path.is_file():
        if path.suffix != ".json":
            raise ValueError(f"model {str(ref)!r}: expected a directory or a config .json file")
        return read_config(path)
    if path.suffix == ".json" or len(path.parts) > 1:
        raise FileNotFoundError(f"model {str(ref)!r}: no such file or directory")
    raise ValueError(
        f"model {str(ref)!r} is neither a checkpoint or run directory, a config .json file nor "
        f"a preset; presets: {sorted(PRESETS)}, vision-language: {sorted(VL_PRESETS)}"
    )


def read_config(path: str | Path) -> HybridConfig | VLConfig:
    """A config.json of a text model (`HybridConfig`) or a vision-language one (`VLConfig`:
    it has a vision_config)."""
    d = read_json(path)
    cls = VLConfig if is_vl_config(d) else HybridConfig
    return cls.from_dict(d, source=str(path))


def _holds_checkpoint(path: Path) -> bool:
    return (path / "config.json").is_file() or bool(complete_checkpoints(path))


def resolve_config(ref: str | Path, *, vision: bool = False) -> HybridConfig | VLConfig:
    """The config of a model reference (no weights are read). A vision-language model's is
    a `VLConfig` where `vision`, else ValueError (the caller runs text models only)."""
    found = resolve_model(ref)
    config = read_config(found / "config.json") if isinstance(found, Path) else found
    if isinstance(config, VLConfig) and not vision:
        raise ValueError(
            f"model {str(ref)!r} is a vision-language model; this command runs text models "
            "(generate and serve take vision-language ones)"
        )
    return config


def load_model(
    ref: str | Path,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    seed: int = 0,
    quantize: str = "none",
    vision: bool = False,
) -> HybridLM | HybridVLM:
    """A checkpoint's model, or a preset or config .json file with seeded random weights (to
    train, or to try things out and benchmark; it generates noise). quantize "int8": for
    inference, in eval mode with int8 projections and experts (`lightlong.nn.quantize_int8`;
    a vision-language model's text model). vision: a vision-language model is loaded as a
    `HybridVLM`; without it, ValueError."""
    if quantize not in QUANTIZATIONS:  # before any weights are read
        raise ValueError(f"quantize must be one of {list(QUANTIZATIONS)}, got {quantize!r}")
    config = resolve_config(ref, vision=vision)
    found = resolve_model(ref)
    cls = HybridVLM if isinstance(config, VLConfig) else HybridLM
    if isinstance(found, Path):
        model = cls.from_pretrained(found, dtype=dtype, device=device)
    else:
        torch.manual_seed(seed)
        model = cls(config).to(device=device, dtype=dtype)
    model.eval()
    if quantize != "none":  # in place
        quantize_model(model.language_model if cls is HybridVLM else model, quantize)
    return model


def load_image_processor(ref: str | Path, config: VLConfig, *, max_pixels: int) -> ImageProcessor:
    """The image processor of a vision-language model reference: its checkpoint's
    preprocessor_config.json when it has one, else its config's."""
    found = resolve_model(ref)
    if isinstance(found, Path):
        return ImageProcessor.from_pretrained(found, config, max_pixels=max_pixels)
    return ImageProcessor.for_config(config, max_pixels=max_pixels)


def load_model_tokenizer(ref: str | Path, tokenizer: str | Path | None = None) -> Tokenizer:
    """`tokenizer` when given (a tokenizer.json or a directory holding one; it must be
    readable), else the one saved in the checkpoint `ref` resolves to, else (a preset or
    config file) UTF-8 bytes."""
    if tokenizer is not None:
        return load_tokenizer(tokenizer, required=True)
    found = resolve_model(ref)
    return load_tokenizer(found) if isinstance(found, Path) else ByteTokenizer()


def generation_config(ref: str | Path) -> dict:
    """The checkpoint's generation_config.json (e.g. eos_token_id, an int or a list), {} for
    a preset or config file or a checkpoint without one."""
    found = resolve_model(ref)
    if not isinstance(found, Path) or not (found / GENERATION_FILE).is_file():
        return {}
    try:
        config = json.loads((found / GENERATION_FILE).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{found / GENERATION_FILE}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{found / GENERATION_FILE}: expected a JSON object")
    return config


def eos_token_ids(config: dict) -> list[int]:
    """generation_config's eos_token_id as a list (it may be None, an int or a list of
    ints); CheckpointError for anything else."""
    eos = config.get("eos_token_id")
    ids = [] if eos is None else [eos] if isinstance(eos, int) else eos
    if not isinstance(ids, list) or not all(
        isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids
    ):
        raise CheckpointError(
            f"{GENERATION_FILE}: eos_token_id must be a token id or a list of them, got {eos!r}"
        )
    return ids
