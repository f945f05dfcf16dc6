"""Training checkpoints: `step-N/` directories written atomically, found again on resume.

A checkpoint holds the model (config.json + safetensors, loadable by
`HybridLM.from_pretrained`), `trainer_state.pt` (optimizer, scheduler, RNG and data state,
counters) and a `COMPLETE` marker written last. It is built in a hidden sibling directory
and renamed into place, so a crash mid-save leaves the last good checkpoint and at worst a
hidden partial directory, which resume ignores.
"""

from __future__ import annotations

import io
import pickle
import shutil
import zipfile
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor

from lightlong.model import HybridConfig
from lightlong.model.checkpoint import (
    MARKER,
    STATE_FILE,
    CheckpointError,
    complete_checkpoints,
    save_weights,
)
from lightlong.tokenizer import Tokenizer


def save_checkpoint(
    out_dir: str | Path,
    step: int,
    config: HybridConfig,
    weights: dict[str, Tensor],
    state: dict,
    keep_last: int = 0,
    tokenizer: Tokenizer | str | None = None,
) -> Path:
    """Writes out_dir/step-{step}/ (the model's config, weights and tokenizer, the trainer
    state) atomically; then keeps only the newest `keep_last` complete checkpoints (0 keeps
    all). Returns the checkpoint's path."""
    out = Path(out_dir)
    final = out / f"step-{step}"
    buffer = io.BytesIO()
    torch.save(state, buffer)
    # one rename puts the weights, the trainer state and the COMPLETE marker in place
    extra = {STATE_FILE: buffer.getvalue(), MARKER: f"{step}\n".encode()}
    save_weights(config, weights, final, tokenizer=tokenizer, extra_files=extra)
    if keep_last > 0:
        for old in complete_checkpoints(out)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def resume_candidates(resume: str, out_dir: str | Path) -> Iterator[Path]:
    """The checkpoints to try resuming from, in order: "" none, "auto" the complete ones
    under out_dir newest first (a caller moves on to the next when one fails to load), else
    the one path given, which must be a complete checkpoint."""
    if not resume:
        return iter(())
    if resume == "auto":
        return reversed(complete_checkpoints(out_dir))
    path = Path(resume)
    if not path.is_dir():
        raise FileNotFoundError(f"resume: {path} does not exist")
    if not (path / MARKER).is_file() or not (path / STATE_FILE).is_file():
        raise ValueError(
            f"resume: {path} is not a complete checkpoint (no {MARKER} marker or {STATE_FILE})"
        )
    return iter((path,))


def load_trainer_state(path: str | Path) -> dict:
    """The trainer state saved with a checkpoint; CheckpointError when the file is truncated
    or not a trainer state."""
    file = Path(path) / STATE_FILE
    try:
        state = torch.load(file, map_location="cpu", weights_only=False)
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError,
            zipfile.BadZipFile) as e:  # fmt: skip
        raise CheckpointError(f"{file}: cannot read the trainer state ({e})") from None
    if not isinstance(state, dict) or "step" not in state:
        raise CheckpointError(f"{file}: not a trainer state")
    return state
