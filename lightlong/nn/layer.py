"""One decoder layer: token mixer and MoE, each with MiniMax's scaled residual."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from lightlong.nn.attention import (
    CosformerAttention,
    LightningAttention,
    LocalAttention,
    SequenceInfo,
    SoftmaxAttention,
)
from lightlong.nn.moe import MoE, SharedMLP
from lightlong.nn.norm import RMSNorm

if TYPE_CHECKING:  # the config is data; nn does not import the model package at run time
    from lightlong.model.config import HybridConfig


def make_mixer(config: HybridConfig, layer_idx: int) -> nn.Module:
    """The token mixer that `config.layer_types[layer_idx]` names."""
    c, kind = config, config.layer_types[layer_idx]
    if kind in ("lightning", "norm_linear"):
        return LightningAttention(
            c.hidden_size, c.num_heads, c.head_dim, layer_idx, c.num_layers, c.block_size,
            gated=kind == "lightning", decayed=kind == "lightning" or c.norm_linear_decay,
            slope_heads=c.decay_slope_heads or None,
        )  # fmt: skip
    if kind == "cosformer":
        return CosformerAttention(
            c.hidden_size, c.num_heads, c.head_dim, layer_idx, c.cosformer_max_len, c.block_size
        )
    if kind in ("window_softmax", "diag_softmax"):
        span = {"window": c.window_size} if kind == "window_softmax" else {
            "block": c.diag_block_size
        }  # fmt: skip
        return LocalAttention(
            c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, layer_idx, **span
        )
    return SoftmaxAttention(c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, layer_idx)


class DecoderLayer(nn.Module):
    """x ← α·r + β·mixer(norm(x)), then x ← α'·r' + β'·moe(norm(x)) (mixed with the shared
    expert when the config has one).

    r is the normed input when `postnorm` (MiniMax-Text-01), the raw input otherwise.
    """

    def __init__(self, config: HybridConfig, layer_idx: int):
        super().__init__()
        c = config
        self.postnorm = c.postnorm
        self.input_layernorm = RMSNorm(c.hidden_size, eps=c.rms_norm_eps)
        self.self_attn = make_mixer(c, layer_idx)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, eps=c.rms_norm_eps)
        self.block_sparse_moe = MoE(
            c.hidden_size, c.intermediate_size, c.num_experts, c.experts_per_token
        )
        self.shared_mlp = self.coefficient = None
        if c.shared_intermediate_size:  # sized by intermediate_size, as the released code does
            self.shared_mlp = SharedMLP(c.hidden_size, c.intermediate_size)
            self.coefficient = nn.Linear(c.hidden_size, 1, bias=False)
        lightning = c.layer_types[layer_idx] in ("lightning", "cosformer", "norm_linear")
        self.attn_alpha = c.linear_attn_alpha if lightning else c.full_attn_alpha
        self.attn_beta = c.linear_attn_beta if lightning else c.full_attn_beta
        self.mlp_alpha, self.mlp_beta = c.mlp_alpha, c.mlp_beta

    def forward(self, x: Tensor, seq: SequenceInfo) -> tuple[Tensor, Tensor | None]:
        """x [B, T, D] -> ([B, T, D], MoE aux loss; None with a cache, unless split)."""
        h = self.input_layernorm(x)
        x = _scaled_sum(h if self.postnorm else x, self.attn_alpha, self.self_attn(h, seq),
                        self.attn_beta)  # fmt: skip
        h = self.post_attention_layernorm(x)
        # no aux loss when decoding; a split row's is the whole row's, over its ranks (on
        # every rank, cache or not: a split prefill's cache is on some ranks only)
        with_aux = seq.cache is None or seq.split is not None
        y, aux = self.block_sparse_moe(h, with_aux=with_aux, split=seq.split)
        if self.shared_mlp is not None:  # y ← (1 − c)·y + c·mlp(h), c = σ(h · w) in fp32
            c = torch.sigmoid(h.float() @ self.coefficient.weight.float().T).to(h.dtype)
            y = y * (1 - c) + self.shared_mlp(h) * c
        return _scaled_sum(h if self.postnorm else x, self.mlp_alpha, y, self.mlp_beta), aux


def _scaled_sum(r: Tensor, alpha: float, y: Tensor, beta: float) -> Tensor:
    """α·r + β·y, the scaled residual, rounded as the released code rounds it (α·r and β·y
    each, then their sum). Without autograd, y (the layer's own new tensor) takes the
    result in place and a factor of 1 costs no kernel, unless the sum is wider than y
    (a bf16 y under autocast beside an fp32 stream)."""
    if y.requires_grad or y.dtype != torch.result_type(r, y):
        return r * alpha + y * beta
    if beta != 1.0:
        y.mul_(beta)
    return y.add_(r * alpha if alpha != 1.0 else r)
