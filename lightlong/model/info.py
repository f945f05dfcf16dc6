"""`lightlong info`: a model's architecture, parameter counts and memory at a context length."""

from __future__ import annotations

from pathlib import Path

import torch

from lightlong.model.config import PRESETS, HybridConfig
from lightlong.model.hybrid import HybridLM


def resolve_config(name_or_dir: str) -> HybridConfig:
    """A preset name, a checkpoint directory holding config.json, or a config .json file."""
    path = Path(name_or_dir)
    if path.is_dir():
        return HybridConfig.from_json(path / "config.json")
    if path.suffix == ".json" and path.is_file():
        return HybridConfig.from_json(path)
    if name_or_dir in PRESETS:
        return HybridConfig.from_preset(name_or_dir)
    raise ValueError(
        f"{name_or_dir!r} is neither a checkpoint directory, a config .json file nor a "
        f"preset; presets: {sorted(PRESETS)}"
    )


def load_model(
    name_or_dir: str,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> HybridLM:
    """A checkpoint directory's model, or a preset or config .json file with seeded random
    weights (to train, or to try things out and benchmark; it generates noise)."""
    if Path(name_or_dir).is_dir():
        return HybridLM.from_pretrained(name_or_dir, dtype=dtype, device=device)
    config = resolve_config(name_or_dir)
    torch.manual_seed(seed)
    return HybridLM(config).to(device=device, dtype=dtype)


def train_flops_per_token(config: HybridConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward = 3 × forward), the usual estimate:
    6 × the parameters a token uses (experts it is routed to, LM head; not the embedding
    lookup) plus attention: a lightning layer's block-quadratic and state terms
    (~4·H·d·(C + d) per token forward) and a softmax layer's causal scores and mixing
    (2·H·d·T per token forward on average)."""
    with torch.device("meta"):
        counts = HybridLM(config).param_count()
    c = config
    dense = counts["active"] + c.vocab_size * c.hidden_size
    lightning = 4 * c.num_heads * c.head_dim * (c.block_size + c.head_dim)
    softmax = 2 * c.num_heads * c.head_dim * seq_len
    per_layer = sum(lightning if t == "lightning" else softmax for t in c.layer_types)
    return 6 * dense + 3 * per_layer


def memory_plan(config: HybridConfig, context: int, batch: int, dtype: torch.dtype) -> dict:
    """Bytes for weights, lightning states (fp32, constant in context) and softmax KV.

    Weights count every parameter in `dtype`; a lightning layer keeps one H×K×K fp32 state
    per sequence; a softmax layer keeps K and V for every token (GQA heads).
    """
    with torch.device("meta"):
        counts = HybridLM(config).param_count()
    width = torch.finfo(dtype).bits // 8
    n_lightning = config.layer_types.count("lightning")
    n_softmax = config.layer_types.count("softmax")
    state = config.num_heads * config.head_dim * config.head_dim * 4
    kv = 2 * config.num_kv_heads * config.head_dim * width
    return {
        "params": counts,
        "weights_bytes": counts["total"] * width,
        "lightning_state_bytes": n_lightning * state * batch,
        "softmax_kv_bytes": n_softmax * kv * context * batch,
    }


def describe(config: HybridConfig, context: int, batch: int, dtype: torch.dtype) -> str:
    """Human-readable summary."""
    plan = memory_plan(config, context, batch, dtype)
    p = plan["params"]
    pattern = "".join("L" if t == "lightning" else "S" for t in config.layer_types)
    gib = 2**30
    total = plan["weights_bytes"] + plan["lightning_state_bytes"] + plan["softmax_kv_bytes"]
    lines = [
        f"layers           {config.num_layers}: {pattern}  (L lightning, S softmax)",
        f"width            hidden {config.hidden_size}, heads {config.num_heads} x "
        f"{config.head_dim} (kv heads {config.num_kv_heads}), rotary {config.rotary_dim} "
        f"dims, theta {config.rope_theta:g}",
        f"moe              {config.num_experts} experts, top-{config.experts_per_token}, "
        f"expert size {config.intermediate_size}",
        f"vocab            {config.vocab_size}",
        f"parameters       total {p['total'] / 1e9:.3f}B, active/token {p['active'] / 1e9:.3f}B "
        f"(without {p['embedding'] / 1e9:.3f}B embedding/LM head)",
        f"memory at T={context:,}, batch {batch}, {str(dtype).removeprefix('torch.')} weights:",
        f"  weights        {plan['weights_bytes'] / gib:10.2f} GiB",
        f"  lightning      {plan['lightning_state_bytes'] / gib:10.4f} GiB  (fp32 states, "
        f"same at any T)",
        f"  softmax KV     {plan['softmax_kv_bytes'] / gib:10.2f} GiB  (grows with T)",
        f"  total          {total / gib:10.2f} GiB",
    ]
    return "\n".join(lines)
