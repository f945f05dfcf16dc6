"""The two token mixers of the hybrid: lightning attention and softmax attention (GQA).

Parameter names follow MiniMax-Text-01's checkpoint keys.
# B batch, T tokens, D model dim, H heads, G key/value heads, E head dim
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightlong.nn.norm import RMSNorm
from lightlong.ops import decay_rates, lightning_attn
from lightlong.ops.attention import apply_rotary, causal_attention


@dataclass(frozen=True)
class SequenceInfo:
    """What every token mixer of one forward pass shares: packing and rotary tables."""

    cu_seqlens: Tensor | None
    """int64 [N + 1] offsets of packed sequences (B == 1), or None."""
    rope: tuple[Tensor, Tensor]
    """cos, sin [T, R] at each token's position within its sequence."""


class LightningAttention(nn.Module):
    """MiniMax's lightning layer: SiLU(qkv) -> lightning attention (no scale, per-head decay)
    -> RMSNorm over all heads -> sigmoid gate from the layer input -> output projection."""

    def __init__(self, hidden_size: int, num_heads: int, head_dim: int, layer_idx: int,
                 num_layers: int, block_size: int):  # fmt: skip
        super().__init__()
        self.num_heads, self.head_dim, self.block_size = num_heads, head_dim, block_size
        inner = num_heads * head_dim
        self.qkv_proj = nn.Linear(hidden_size, 3 * inner, bias=False)
        self.output_gate = nn.Linear(hidden_size, inner, bias=False)
        self.out_proj = nn.Linear(inner, hidden_size, bias=False)
        self.norm = RMSNorm(inner, eps=1e-6)
        # fp32 rates kept outside the module's buffers: neither .to(bf16) nor a meta-device
        # build may touch them; copied to each device once.
        self._decay = {torch.device("cpu"): decay_rates(num_heads, layer_idx, num_layers)}

    def decay(self, device: torch.device) -> Tensor:
        """The layer's decay rates [H] (fp32) on `device`."""
        if device not in self._decay:
            self._decay[device] = self._decay[torch.device("cpu")].to(device)
        return self._decay[device]

    def forward(self, x: Tensor, seq: SequenceInfo) -> Tensor:
        """x [B, T, D] -> [B, T, D]."""
        B, T, _ = x.shape
        qkv_BTH3E = F.silu(self.qkv_proj(x)).view(B, T, self.num_heads, 3 * self.head_dim)
        q, k, v = qkv_BTH3E.split(self.head_dim, dim=-1)
        o_BTHE, _ = lightning_attn(
            q, k, v, self.decay(x.device), scale=1.0, cu_seqlens=seq.cu_seqlens,
            block_size=self.block_size,
        )  # fmt: skip
        o_BTX = self.norm(o_BTHE.reshape(B, T, -1))
        return self.out_proj(torch.sigmoid(self.output_gate(x)) * o_BTX)


class SoftmaxAttention(nn.Module):
    """Causal softmax attention with GQA and RoPE on the first `rotary_dim` dims of each head."""

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.q_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=False)

    def forward(self, x: Tensor, seq: SequenceInfo) -> Tensor:
        """x [B, T, D] -> [B, T, D]."""
        B, T, _ = x.shape
        q_BTHE = self.q_proj(x).view(B, T, self.num_heads, self.head_dim)
        k_BTGE = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim)
        v_BTGE = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim)
        q_BTHE, k_BTGE = apply_rotary(q_BTHE, *seq.rope), apply_rotary(k_BTGE, *seq.rope)
        o_BTHE = causal_attention(q_BTHE, k_BTGE, v_BTGE, cu_seqlens=seq.cu_seqlens)
        return self.o_proj(o_BTHE.reshape(B, T, -1))
