"""Adapter to `transformers`' MiniMax (the `hf` extra), through the checkpoint files users use.

Known differences of `transformers`' MiniMax from the released model, which these
conversions do not paper over: it uses the slopes 2^(-8(h+1)/H) for every head count (ALiBi's
construction differs when H is not a power of two) and 1 − l/(L−1+1e-5) + 1e-5 for the depth
factor; compare on power-of-two head counts.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from lightlong.model.hybrid import HybridLM


def to_transformers(model: HybridLM, dtype: torch.dtype | None = None):
    """A `transformers.MiniMaxForCausalLM` with the same config and weights (via disk)."""
    from transformers import MiniMaxForCausalLM

    dtype = dtype or next(model.parameters()).dtype
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(Path(tmp) / "ck", config_format="transformers")
        hf = MiniMaxForCausalLM.from_pretrained(Path(tmp) / "ck", dtype=dtype)
    return hf.eval()


def from_transformers(hf_model, dtype: torch.dtype | None = None) -> HybridLM:
    """A HybridLM loaded from what `transformers`' `save_pretrained` writes."""
    with tempfile.TemporaryDirectory() as tmp:
        hf_model.save_pretrained(Path(tmp) / "ck")
        return HybridLM.from_pretrained(Path(tmp) / "ck", dtype=dtype)
