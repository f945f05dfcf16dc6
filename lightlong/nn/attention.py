"""The two token mixers of the hybrid: lightning attention and softmax attention (GQA).

Parameter names follow MiniMax-Text-01's checkpoint keys.
# B batch, T tokens, D model dim, H heads, G key/value heads, E head dim
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightlong.nn.norm import RMSNorm
from lightlong.ops import decay_rates, lightning_attn, lightning_attn_step
from lightlong.ops.attention import apply_rotary, cached_attention, causal_attention


class LayerCache(Protocol):
    """What the model and its mixers use of an inference cache (`lightlong.infer.HybridCache`)."""

    batch_size: int
    length: int
    """Slots filled before this forward pass; the new tokens take the next T."""

    @property
    def seen(self) -> Tensor:
        """int64 [B] tokens each row has seen."""
        ...

    def advance(self, num_tokens: int) -> None:
        """Marks the new tokens as stored, after the last layer."""
        ...

    @property
    def pad(self) -> Tensor | None:
        """int64 [B] left-padding slots per row, or None."""
        ...

    def linear_state(self, layer_idx: int) -> Tensor:
        """fp32 [B, H, K, V], updated in place."""
        ...

    def append_kv(self, layer_idx: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Stores k, v [B, T, G, D]; returns all keys and values [B, G, length + T, D]."""
        ...


@dataclass(frozen=True)
class SequenceInfo:
    """What every token mixer of one forward pass shares: packing, rotary tables, cache."""

    cu_seqlens: Tensor | None
    """int64 [N + 1] offsets of packed sequences (B == 1), or None."""
    rope: tuple[Tensor, Tensor]
    """cos, sin [T, R] or [B, T, R] at each token's position within its sequence."""
    cache: LayerCache | None = None
    """Inference cache the mixers read and extend, or None (a full-sequence pass)."""


class LightningAttention(nn.Module):
    """MiniMax's lightning layer: SiLU(qkv) -> lightning attention (no scale, per-head decay)
    -> RMSNorm over all heads -> sigmoid gate from the layer input -> output projection."""

    def __init__(self, hidden_size: int, num_heads: int, head_dim: int, layer_idx: int,
                 num_layers: int, block_size: int):  # fmt: skip
        super().__init__()
        self.num_heads, self.head_dim, self.block_size = num_heads, head_dim, block_size
        self.layer_idx = layer_idx
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
        decay = self.decay(x.device)
        if seq.cache is None:
            o_BTHE, _ = lightning_attn(
                q, k, v, decay, scale=1.0, cu_seqlens=seq.cu_seqlens, block_size=self.block_size
            )
        elif T == 1:
            o_BTHE = lightning_attn_step(
                q, k, v, decay, seq.cache.linear_state(self.layer_idx), scale=1.0
            )
        else:
            state = seq.cache.linear_state(self.layer_idx)
            o_BTHE, final = lightning_attn(
                q, k, v, decay, scale=1.0, initial_state=state, output_final_state=True,
                block_size=self.block_size,
            )  # fmt: skip
            state.copy_(final)
        o_BTX = self.norm(o_BTHE.reshape(B, T, -1))
        return self.out_proj(torch.sigmoid(self.output_gate(x)) * o_BTX)


class SoftmaxAttention(nn.Module):
    """Causal softmax attention with GQA and RoPE on the first `rotary_dim` dims of each head."""

    def __init__(
        self, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int, layer_idx: int
    ):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.layer_idx = layer_idx
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
        if seq.cache is None:
            o_BTHE = causal_attention(q_BTHE, k_BTGE, v_BTGE, cu_seqlens=seq.cu_seqlens)
        else:
            start = seq.cache.length
            k_BGLE, v_BGLE = seq.cache.append_kv(self.layer_idx, k_BTGE, v_BTGE)
            o_BTHE = cached_attention(q_BTHE, k_BGLE, v_BGLE, start=start, pad=seq.cache.pad)
        return self.o_proj(o_BTHE.reshape(B, T, -1))
