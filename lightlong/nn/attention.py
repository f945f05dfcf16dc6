"""Token mixers: MiniMax's lightning and softmax (GQA) attention, and the lineage it chose
them from — cosFormer, NormAttention (`norm_linear`: lightning without its gate),
DiagAttention (softmax within blocks) and sliding-window softmax.

Parameter names follow MiniMax-Text-01's checkpoint keys (the lineage reuses them).
# B batch, T tokens, D model dim, H heads, G key/value heads, E head dim, S local span
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightlong.nn.decode import linear_group
from lightlong.nn.norm import RMSNorm
from lightlong.ops import (
    block_attention,
    cosformer_attn,
    cosformer_step,
    decay_rates,
    lightning_attn,
    lightning_attn_step,
    local_attention_cached,
    norm_linear_attn,
    window_attention,
)
from lightlong.ops.attention import apply_rotary, cached_attention, causal_attention
from lightlong.ops.lightning.recurrent import decode_step_
from lightlong.parallel import SequenceSplit, lightning_attn_split, softmax_attn_split


class LayerCache(Protocol):
    """What the model and its mixers use of an inference cache (`lightlong.infer.HybridCache`)."""

    batch_size: int

    @property
    def length(self) -> int:
        """Tokens of the longest row before this forward pass."""
        ...

    @property
    def start(self) -> int | Tensor:
        """Where the new tokens go (each row's length): one int for all rows, or int64 [B]."""
        ...

    def advance(self, num_tokens: int) -> None:
        """Marks the new tokens as stored, after the last layer."""
        ...

    def linear_state(self, layer_idx: int) -> Tensor:
        """fp32 [B, H, K, V], updated in place."""
        ...

    def append_kv(self, layer_idx: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Stores k, v [B, T, G, D]; returns all keys and values [B, G, length + T, D]."""
        ...

    def local_kv(self, layer_idx: int) -> tuple[Tensor, Tensor, Tensor]:
        """A local layer's recent keys, values [B, G, S, D] and their positions [B, S]."""
        ...

    def set_local_kv(self, layer_idx: int, k: Tensor, v: Tensor, pos: Tensor) -> None:
        """Replaces a local layer's buffers (same shapes)."""
        ...


@dataclass(frozen=True)
class SequenceInfo:
    """What every token mixer of one forward pass shares: packing, rotary tables, cache."""

    cu_seqlens: Tensor | None
    """int64 [N + 1] offsets of packed sequences (B == 1), or None."""
    rope: tuple[Tensor, Tensor]
    """cos, sin [T, R] or [B, T, R] at each token's position within its sequence (empty
    when the model has no layer that rotates)."""
    positions: Tensor
    """int64 [T] or [B, T]: each token's position within its sequence."""
    cache: LayerCache | None = None
    """Inference cache the mixers read and extend, or None (a full-sequence pass)."""
    split: SequenceSplit | None = None
    """This rank's chunk of a row split across ranks (sequence parallelism), or None. With
    a cache too (empty, one row), the mixers store the whole row's states and KV in it."""


def _row_positions(seq: SequenceInfo, B: int) -> Tensor:
    """int64 [B, T] positions of the new tokens of each row."""
    pos = seq.positions
    return pos.expand(B, -1) if pos.dim() == 1 else pos


class LightningAttention(nn.Module):
    """MiniMax's lightning layer: SiLU(qkv) -> lightning attention (no scale, per-head decay)
    -> RMSNorm over all heads -> sigmoid gate from the layer input -> output projection.

    With `gated=False` it is TransNormer's NormAttention (`norm_linear`): the same without
    the gate, and with `decayed=False` without decay too (plain linear attention, normed).
    """

    FUSED_INPUTS = (("qkv_proj", "output_gate"),)
    """Projections of one input (`lightlong.nn.decode_layout` lays them side by side)."""

    def __init__(self, hidden_size: int, num_heads: int, head_dim: int, layer_idx: int,
                 num_layers: int, block_size: int, *, gated: bool = True,
                 decayed: bool = True, slope_heads: int | None = None):  # fmt: skip
        super().__init__()
        self.num_heads, self.head_dim, self.block_size = num_heads, head_dim, block_size
        self.layer_idx, self.gated = layer_idx, gated
        inner = num_heads * head_dim
        self.qkv_proj = nn.Linear(hidden_size, 3 * inner, bias=False)
        if gated:
            self.output_gate = nn.Linear(hidden_size, inner, bias=False)
        self.out_proj = nn.Linear(inner, hidden_size, bias=False)
        self.norm = RMSNorm(inner, eps=1e-6)
        # fp32 rates kept outside the module's buffers: neither .to(bf16) nor a meta-device
        # build may touch them; copied to each device once.
        rates = decay_rates(num_heads, layer_idx, num_layers, slope_heads=slope_heads)
        self._decay = {torch.device("cpu"): rates if decayed else torch.zeros_like(rates)}
        self._lam_m1: dict[tuple[torch.device, torch.dtype], Tensor] = {}

    def decay(self, device: torch.device) -> Tensor:
        """The layer's decay rates [H] (fp32) on `device`."""
        if device not in self._decay:
            self._decay[device] = self._decay[torch.device("cpu")].to(device)
        return self._decay[device]

    def _decay_step(self, q: Tensor, k: Tensor, v: Tensor, state: Tensor) -> Tensor:
        """One decode step (T = 1) on the cache's state [B, H, K, V], updated in place.

        On the CPU the checked public step's work without its checks (the model checked
        its inputs), with λ − 1 = expm1(−decay) computed once per device and state dtype.
        """
        if q.device.type != "cpu":  # the fused Triton step where it applies
            return lightning_attn_step(q, k, v, self.decay(q.device), state, scale=1.0)
        key = (state.device, state.dtype)
        if key not in self._lam_m1:
            want = torch.float64 if q.dtype == torch.float64 else torch.float32
            if state.dtype != want:  # checked once: the step itself does not look
                raise ValueError(
                    f"the cache's states must be {want} for {q.dtype}, got {state.dtype}"
                )
            self._lam_m1[key] = torch.expm1(-self.decay(state.device).to(state.dtype))
        return decode_step_(q, k, v, self._lam_m1[key], state, 1.0)

    def forward(self, x: Tensor, seq: SequenceInfo) -> Tensor:
        """x [B, T, D] -> [B, T, D]."""
        B, T, _ = x.shape
        if self.gated:  # the gate's projection reads x too: one product where laid out so
            qkv_BTX, gate_BTX = linear_group(x, self.qkv_proj, self.output_gate)
        else:
            qkv_BTX = self.qkv_proj(x)
        qkv_BTH3E = F.silu(qkv_BTX).view(B, T, self.num_heads, 3 * self.head_dim)
        q, k, v = qkv_BTH3E.split(self.head_dim, dim=-1)
        decay = self.decay(x.device)
        if seq.cache is None and not self.gated:
            o_BTHE, _ = norm_linear_attn(
                q, k, v, decay, norm_weight=self.norm.weight, eps=self.norm.eps,
                cu_seqlens=seq.cu_seqlens, block_size=self.block_size,
            )  # fmt: skip
            return self.out_proj(o_BTHE.reshape(B, T, -1))
        if seq.split is not None:  # a cache (empty) takes the row's final state
            o_BTHE, final = lightning_attn_split(
                q, k, v, decay, seq.split, scale=1.0, output_final_state=seq.cache is not None,
                block_size=self.block_size,
            )  # fmt: skip
            if final is not None:
                seq.cache.linear_state(self.layer_idx).copy_(final[None])
        elif seq.cache is None:
            o_BTHE, _ = lightning_attn(
                q, k, v, decay, scale=1.0, cu_seqlens=seq.cu_seqlens, block_size=self.block_size
            )
        elif T == 1:
            o_BTHE = self._decay_step(q, k, v, seq.cache.linear_state(self.layer_idx))
        else:
            state = seq.cache.linear_state(self.layer_idx)
            o_BTHE, final = lightning_attn(
                q, k, v, decay, scale=1.0, initial_state=state, output_final_state=True,
                block_size=self.block_size,
            )  # fmt: skip
            state.copy_(final)
        o_BTX = self.norm(o_BTHE.reshape(B, T, -1))
        if self.gated:
            o_BTX = torch.sigmoid(gate_BTX) * o_BTX
        return self.out_proj(o_BTX)


class CosformerAttention(nn.Module):
    """cosFormer: ReLU features with the cos((i − j)·π / 2M) re-weighting, normalised by its
    own sum (no softmax), then an output projection. The cache holds one [2K, V + 1] state
    per head (`lightlong.ops.cosformer_attn`)."""

    def __init__(self, hidden_size: int, num_heads: int, head_dim: int, layer_idx: int,
                 max_len: int, block_size: int):  # fmt: skip
        super().__init__()
        self.num_heads, self.head_dim, self.block_size = num_heads, head_dim, block_size
        self.layer_idx, self.max_len = layer_idx, max_len
        inner = num_heads * head_dim
        self.qkv_proj = nn.Linear(hidden_size, 3 * inner, bias=False)
        self.out_proj = nn.Linear(inner, hidden_size, bias=False)

    def forward(self, x: Tensor, seq: SequenceInfo) -> Tensor:
        """x [B, T, D] -> [B, T, D]."""
        B, T, _ = x.shape
        q, k, v = (
            self.qkv_proj(x)
            .view(B, T, self.num_heads, 3 * self.head_dim)
            .split(self.head_dim, dim=-1)
        )
        if seq.cache is None:
            o_BTHE, _ = cosformer_attn(
                q, k, v, max_len=self.max_len, cu_seqlens=seq.cu_seqlens,
                block_size=self.block_size,
            )  # fmt: skip
        else:
            state = seq.cache.linear_state(self.layer_idx)
            start_B = _row_positions(seq, B)[:, 0]
            if T == 1:
                o_BTHE = cosformer_step(q, k, v, state, max_len=self.max_len, position=start_B)
            else:
                o_BTHE, final = cosformer_attn(
                    q, k, v, max_len=self.max_len, start=start_B, initial_state=state,
                    output_final_state=True, block_size=self.block_size,
                )  # fmt: skip
                state.copy_(final)
        return self.out_proj(o_BTHE.reshape(B, T, -1))


class SoftmaxAttention(nn.Module):
    """Causal softmax attention with GQA and RoPE on the first `rotary_dim` dims of each head."""

    FUSED_INPUTS = (("q_proj", "k_proj", "v_proj"),)
    """Projections of one input (`lightlong.nn.decode_layout` lays them side by side)."""

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
        q_BTX, k_BTX, v_BTX = linear_group(x, self.q_proj, self.k_proj, self.v_proj)
        q_BTHE = q_BTX.view(B, T, self.num_heads, self.head_dim)
        k_BTGE = k_BTX.view(B, T, self.num_kv_heads, self.head_dim)
        v_BTGE = v_BTX.view(B, T, self.num_kv_heads, self.head_dim)
        q_BTHE, k_BTGE = apply_rotary(q_BTHE, *seq.rope), apply_rotary(k_BTGE, *seq.rope)
        return self.o_proj(self.attend(q_BTHE, k_BTGE, v_BTGE, seq).reshape(B, T, -1))

    def attend(self, q: Tensor, k: Tensor, v: Tensor, seq: SequenceInfo) -> Tensor:
        """Causal attention of rotated q [B, T, H, E] over k, v [B, T, G, E] (and the
        cache's KV) -> [B, T, H, E]."""
        if seq.split is not None:  # a cache (empty) takes the row's keys and values
            o_BTHE, kv = softmax_attn_split(q, k, v, seq.split, output_kv=seq.cache is not None)
            if kv is not None:
                seq.cache.append_kv(self.layer_idx, *kv)
            return o_BTHE
        if seq.cache is None:
            return causal_attention(q, k, v, cu_seqlens=seq.cu_seqlens)
        return _attend_cached(q, k, v, seq.cache, self.layer_idx)


@torch.compiler.disable  # the KV grows every step: a compiled decode step attends eagerly
def _attend_cached(q: Tensor, k: Tensor, v: Tensor, cache: LayerCache, layer_idx: int) -> Tensor:
    """Appends k, v [B, T, G, E] to layer `layer_idx`'s KV in `cache`; attention of q
    [B, T, H, E] over all of it -> [B, T, H, E]."""
    start = cache.start
    k_BGLE, v_BGLE = cache.append_kv(layer_idx, k, v)
    return cached_attention(q, k_BGLE, v_BGLE, start=start)


class LocalAttention(SoftmaxAttention):
    """Softmax attention over a bounded span, with GQA and partial RoPE like `SoftmaxAttention`:
    a sliding window of `window` tokens (`window_softmax`), or TransNormer's DiagAttention,
    causal within non-overlapping blocks of `block` tokens (`diag_softmax`). The cache keeps
    the last S = window (or block) keys and values per row: bounded, whatever the context."""

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int,
                 layer_idx: int, *, window: int | None = None,
                 block: int | None = None):  # fmt: skip
        super().__init__(hidden_size, num_heads, num_kv_heads, head_dim, layer_idx)
        if (window is None) == (block is None):
            raise ValueError("LocalAttention takes exactly one of window and block")
        self.window, self.block = window, block

    def attend(self, q: Tensor, k: Tensor, v: Tensor, seq: SequenceInfo) -> Tensor:
        """Window or block attention of rotated q [B, T, H, E] over k, v [B, T, G, E] (and
        the cache's recent KV) -> [B, T, H, E]."""
        if seq.cache is None:
            if self.window is not None:
                return window_attention(q, k, v, window=self.window, cu_seqlens=seq.cu_seqlens)
            return block_attention(q, k, v, block=self.block, cu_seqlens=seq.cu_seqlens)
        k_BGSE, v_BGSE, pos_BS = seq.cache.local_kv(self.layer_idx)
        o_BTHE, k_BGSE, v_BGSE, pos_BS = local_attention_cached(
            q, k, v, k_BGSE, v_BGSE, pos_BS, _row_positions(seq, q.shape[0]),
            window=self.window, block=self.block,
        )  # fmt: skip
        seq.cache.set_local_kv(self.layer_idx, k_BGSE, v_BGSE, pos_BS)
        return o_BTHE
