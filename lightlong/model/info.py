"""`lightlong info`: a model's architecture, parameter counts and memory at a context length."""

from __future__ import annotations

import torch

from lightlong.model.config import LAYER_LETTERS, HybridConfig
from lightlong.model.hybrid import HybridLM
from lightlong.model.vision import HybridVLM, VLConfig


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
    """Bytes for weights, linear states (fp32, constant in context), local KV (bounded) and
    softmax KV (grows with the context).

    Weights count every parameter in `dtype`; a lightning or norm_linear layer keeps one
    H×K×K fp32 state per sequence (cosformer: H×2K×(K+1)); a window/diag layer keeps K and V
    of its last `window_size`/`diag_block_size` tokens (and their int64 positions); a
    softmax layer keeps K and V for every token (GQA heads).
    """
    c = config
    with torch.device("meta"):
        counts = HybridLM(c).param_count()
    width = torch.finfo(dtype).bits // 8
    H, D = c.num_heads, c.head_dim
    state = {"lightning": H * D * D * 4, "norm_linear": H * D * D * 4,
             "cosformer": H * 2 * D * (D + 1) * 4}  # fmt: skip
    kv = 2 * c.num_kv_heads * D * width  # one token's K and V in one layer
    span = {"window_softmax": c.window_size, "diag_softmax": c.diag_block_size}
    return {
        "params": counts,
        "weights_bytes": counts["total"] * width,
        "lightning_state_bytes": sum(state.get(t, 0) for t in c.layer_types) * batch,
        "local_kv_bytes": sum(span[t] * (kv + 8) for t in c.layer_types if t in span) * batch,
        "softmax_kv_bytes": c.layer_types.count("softmax") * kv * context * batch,
    }


def describe(config: HybridConfig | VLConfig, context: int, batch: int, dtype: torch.dtype) -> str:
    """Human-readable summary: parameter counts in K/M/B/T, memory in the binary unit that
    fits (KiB ... TiB). A vision-language model's adds its ViT and the whole model's counts
    (the memory plan is the text model's, whose weights include no vision part)."""
    from lightlong.units import count, size

    if isinstance(config, VLConfig):
        with torch.device("meta"):
            p = HybridVLM(config).param_count()
        v = config.vision
        most = max(h * w for h, w in config.image_grid_pinpoints) // v.image_size**2
        return "\n".join([
            f"vision           ViT {v.num_layers} layers, width {v.hidden_size}, heads "
            f"{v.num_heads}, patch {v.patch_size} on {v.image_size} px tiles "
            f"({config.tile_tokens} features a tile), up to {most} tiles + thumbnail an image",
            f"vl parameters    total {count(p['total'])}, vision {count(p['vision'])} (ViT + "
            f"projector, once per tile), active/text token {count(p['active'])}, weights "
            f"{size(p['total'] * torch.finfo(dtype).bits // 8)}",
            "text model:",
            describe(config.text, context, batch, dtype),
        ])  # fmt: skip

    plan = memory_plan(config, context, batch, dtype)
    p = plan["params"]
    legend = ", ".join(f"{LAYER_LETTERS[t]} {t}" for t in dict.fromkeys(config.layer_types))
    memory = [
        ("weights", plan["weights_bytes"], ""),
        ("lightning", plan["lightning_state_bytes"], "fp32 states, same at any T"),
        *([("local KV", plan["local_kv_bytes"], "window/diag, same at any T")]
          if plan["local_kv_bytes"] else []),
        ("softmax KV", plan["softmax_kv_bytes"], "grows with T"),
    ]  # fmt: skip
    memory.append(("total", sum(n for _, n, _ in memory), ""))
    lines = [
        f"layers           {config.num_layers}: {config.pattern}  ({legend})",
        f"width            hidden {config.hidden_size}, heads {config.num_heads} x "
        f"{config.head_dim} (kv heads {config.num_kv_heads}), rotary {config.rotary_dim} "
        f"dims, theta {config.rope_theta:g}",
        f"moe              {config.num_experts} experts, top-{config.experts_per_token}, "
        f"expert size {config.intermediate_size}",
        f"vocab            {config.vocab_size}",
        f"parameters       total {count(p['total'])}, active/token {count(p['active'])} "
        f"(without {count(p['embedding'])} embedding/LM head)",
        f"memory at T={context:,}, batch {batch}, {str(dtype).removeprefix('torch.')} weights:",
        *(f"  {name:<13}{size(n):>11}" + (f"  ({note})" if note else "")
          for name, n, note in memory),
    ]  # fmt: skip
    return "\n".join(lines)
