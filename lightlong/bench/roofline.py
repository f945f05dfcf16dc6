"""What a token costs: bytes read per decoded token and FLOPs per token, from a HybridConfig.

The benchmarks divide a measured rate by the machine's bound (`machine.Roofline`): decode at
batch 1 by matrix-vector GB/s ÷ `decode_bytes_per_token`, prefill, training and batched
decode by GEMM GFLOP/s ÷ `forward_flops_per_token` (× 3 for training).

# D hidden size, H heads, G key/value heads, E head dim (K = V = E), C lightning block,
# L context length, k of N experts a token is routed to, I expert hidden size

Counts are taken from the model built on the meta device (no memory, any size), so they
follow the modules: every nn.Linear weight is a matmul weight; an expert's weights count
k/N of the time; the embedding lookup (one row) is left out, the LM head is in.
"""

from __future__ import annotations

import torch
from torch import nn

from lightlong.model import HybridConfig, HybridLM
from lightlong.model.info import memory_plan
from lightlong.nn.moe import Expert, MoE

FLOP_TYPES = ("lightning", "softmax")
"""Layer types whose attention FLOPs are counted (MiniMax's two)."""


def _weights(config: HybridConfig) -> list[tuple[str, nn.Module, float]]:
    """(kind, module, share of tokens that use it) per parameterised leaf module: kind
    "linear" (quantizable: projections, experts, an untied LM head), "kept" (router,
    shared-expert gate, a tied LM head: int8 leaves them in higher precision) or "other"
    (norms). No embedding."""
    with torch.device("meta"):
        model = HybridLM(config)
    c = config
    kept = {id(model.lm_head)} if config.tie_word_embeddings else set()  # int8: untied head
    share: dict[int, float] = {}
    for m in model.modules():
        if isinstance(m, MoE):
            kept.add(id(m.gate))
        if isinstance(m, Expert):
            for sub in m.modules():
                share[id(sub)] = c.experts_per_token / c.num_experts
        coefficient = getattr(m, "coefficient", None)
        if isinstance(coefficient, nn.Linear):
            kept.add(id(coefficient))
    out = []
    for m in model.modules():
        if isinstance(m, nn.Embedding) or not list(m.parameters(recurse=False)):
            continue
        linear = isinstance(m, nn.Linear)
        kind = "other" if not linear else "kept" if id(m) in kept else "linear"
        out.append((kind, m, share.get(id(m), 1.0)))
    return out


def matmul_params_per_token(config: HybridConfig) -> float:
    """Matmul weights one token uses: every projection, the router, k of N experts, the
    shared expert and its gate, the LM head."""
    return sum(s * m.weight.numel() for kind, m, s in _weights(config) if isinstance(m, nn.Linear))


def weight_bytes_per_token(
    config: HybridConfig, dtype: str = "float32", quantize: str | None = None
) -> float:
    """Bytes of the weights one decoded token reads (k of N experts, the final norm, the LM
    head; not the embedding row). quantize "int8": projections, experts and an untied LM
    head at one byte a weight plus one scale per output row (bf16 for fp32 and bf16
    models, as `Int8Linear` stores them; else `dtype`); the router,
    shared-expert gate, norms and a tied head stay in `dtype`."""
    if quantize not in (None, "int8"):
        raise ValueError(f"quantize must be None or 'int8', got {quantize!r}")
    width = getattr(torch, dtype).itemsize
    scale = 2 if dtype in ("float32", "bfloat16") else width  # Int8Linear's bf16 scales
    total = 0.0
    for kind, m, share in _weights(config):
        if kind == "linear" and quantize == "int8":
            out_features, in_features = m.weight.shape
            nbytes = out_features * in_features + out_features * scale
        else:
            nbytes = sum(p.numel() for p in m.parameters(recurse=False)) * width
        total += share * nbytes
    return total


def int8_bytes_per_token(config: HybridConfig, dtype: str = "float32") -> float:
    """The part of `weight_bytes_per_token(config, dtype, "int8")` in int8 matrices (their
    weights and scales): what the int8 kernel reads; the rest is read as `dtype`."""
    scale = 2 if dtype in ("float32", "bfloat16") else getattr(torch, dtype).itemsize
    return sum(
        share * m.weight.shape[0] * (m.weight.shape[1] + scale)
        for kind, m, share in _weights(config)
        if kind == "linear"
    )


def decode_bytes_per_token(
    config: HybridConfig, context: int, dtype: str = "float32", quantize: str | None = None
) -> dict[str, float]:
    """Bytes one decode step reads at batch 1 after `context` tokens: the active weights
    (`weight_bytes_per_token`), each lightning layer's fp32 state H·E·E·4 read and written,
    each softmax layer's keys and values 2·L·G·E in the activations' dtype. Keys: weights,
    lightning_state, softmax_kv, local_kv, total."""
    plan = memory_plan(config, context, 1, getattr(torch, dtype))
    parts = {
        "weights": weight_bytes_per_token(config, dtype, quantize),
        "lightning_state": 2 * plan["lightning_state_bytes"],
        "softmax_kv": plan["softmax_kv_bytes"],
        "local_kv": plan["local_kv_bytes"],
    }
    return parts | {"total": sum(parts.values())}


def lightning_flops_per_token(config: HybridConfig, decode: bool = False) -> float:
    """One lightning layer's attention FLOPs per token (per head ×H), as the tiled op runs:
    within a block, q kᵀ over the C block positions (2·C·E) and its product with v
    (2·C·E), the masked half included because the op computes whole C×C blocks; across
    blocks, q times the entering state (2·E·E) and the block's kᵀ v added to the state
    (2·E·E). H·(4·C·E + 4·E·E). decode: the recurrent step only, H·4·E·E."""
    H, E, C = config.num_heads, config.head_dim, config.block_size
    return H * 4 * E * E if decode else H * (4 * C * E + 4 * E * E)


def softmax_flops_per_token(config: HybridConfig, context: int, decode: bool = False) -> float:
    """One causal softmax layer's attention FLOPs per token: q kᵀ and the product with v over
    the positions it sees, 4·H·E per position. Prefill (a token at the average position
    L/2): 2·H·E·L; decode (the token sees all L): 4·H·E·L."""
    H, E = config.num_heads, config.head_dim
    return 4 * H * E * context if decode else 2 * H * E * context


def forward_flops_per_token(
    config: HybridConfig, context: int, decode: bool = False, lm_head: bool = True
) -> float:
    """Forward FLOPs per token at context length `context`: 2 × the matmul weights a token
    uses (`matmul_params_per_token`) plus each layer's attention. decode: a token decoded
    after `context` (else: the mean over a prefill of `context`). lm_head False: without
    the LM head's 2·V·D (a prefill computes the last position's logits only)."""
    others = sorted(set(config.layer_types) - set(FLOP_TYPES))
    if others:
        raise ValueError(f"FLOPs are counted for {list(FLOP_TYPES)} layers only, not {others}")
    attention = sum(
        lightning_flops_per_token(config, decode)
        if t == "lightning"
        else softmax_flops_per_token(config, context, decode)
        for t in config.layer_types
    )
    head = 0 if lm_head else config.vocab_size * config.hidden_size
    return 2 * (matmul_params_per_token(config) - head) + attention


def train_flops_per_token(config: HybridConfig, context: int) -> float:
    """Training FLOPs per token: forward + backward = 3 × forward (the model's own work;
    activation checkpointing's recomputed forward is not counted)."""
    return 3 * forward_flops_per_token(config, context)
