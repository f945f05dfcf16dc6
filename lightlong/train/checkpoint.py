"""Training checkpoints: `step-N/` directories written atomically, found again on resume.

A checkpoint holds the model (config.json + safetensors, loadable by
`HybridLM.from_pretrained`), `trainer_state.pt` (optimizer, scheduler, RNG and data state,
counters) and a `COMPLETE` marker written last. It is built in a hidden sibling directory
and renamed into place, so a crash mid-save leaves the last good checkpoint and at worst a
hidden partial directory, which resume ignores.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import torch
from torch import Tensor

from lightlong.model import HybridConfig
from lightlong.model.checkpoint import save_weights

MARKER = "COMPLETE"
STATE_FILE = "trainer_state.pt"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def save_checkpoint(
    out_dir: str | Path,
    step: int,
    config: HybridConfig,
    weights: dict[str, Tensor],
    state: dict,
    keep_last: int = 0,
) -> Path:
    """Writes out_dir/step-{step}/ (the model's config and weights, the trainer state)
    atomically; then keeps only the newest `keep_last` complete checkpoints (0 keeps all).
    Returns the checkpoint's path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    final = out / f"step-{step}"
    tmp = out / f".step-{step}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    save_weights(config, weights, tmp)
    torch.save(state, tmp / STATE_FILE)
    (tmp / MARKER).write_text(f"{step}\n")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    if keep_last > 0:
        for old in complete_checkpoints(out)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def complete_checkpoints(out_dir: str | Path) -> list[Path]:
    """Complete `step-N/` directories under out_dir, oldest first."""
    out = Path(out_dir)
    if not out.is_dir():
        return []
    found = []
    for p in out.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and p.is_dir() and (p / MARKER).is_file() and (p / STATE_FILE).is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def resolve_resume(resume: str, out_dir: str | Path) -> Path | None:
    """The checkpoint to resume from: "" none, "auto" the newest complete one under
    out_dir (None if there is none), else a path that must be a complete checkpoint."""
    if not resume:
        return None
    if resume == "auto":
        found = complete_checkpoints(out_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / MARKER).is_file() or not (path / STATE_FILE).is_file():
        raise ValueError(f"resume: {path} is not a complete checkpoint (no {MARKER} marker)")
    return path


def load_trainer_state(path: str | Path) -> dict:
    """The trainer state saved with a checkpoint."""
    return torch.load(Path(path) / STATE_FILE, map_location="cpu", weights_only=False)
