"""`HybridCache`: what a hybrid model remembers between forward calls.

A lightning layer's whole past is one fp32 state per head, [B, H, K, V], whatever the
context length (a norm_linear layer's too; a cosformer layer's is [B, H, 2K, V + 1]). Local
softmax layers (window, diag) keep their last S keys and values with their positions,
[B, G, S, D] and [B, S] (−1: empty). Only softmax layers keep keys and values that grow,
[B, G, L, D] for L cache slots.
All rows share one slot axis: row b's first `pad[b]` slots are left padding (rows whose
prompts were shorter than the longest, see `stack`), and its tokens start there.

# B batch, H heads, G key/value heads, K/V/D head dims, L slots, T new tokens
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from lightlong.model import HybridConfig, HybridLM
from lightlong.model.config import LINEAR_TYPES, LOCAL_TYPES
from lightlong.ops.local import empty_local_cache

# Slots are allocated in multiples of this many tokens.
_SLOT_ROUND = 256


@dataclass(frozen=True)
class CacheSnapshot:
    """A copy of a cache at one length; `HybridCache.restore` resumes from it."""

    states: dict[int, Tensor]
    keys: dict[int, Tensor]
    values: dict[int, Tensor]
    length: int
    pad: Tensor
    local: dict[int, tuple[Tensor, Tensor, Tensor]] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        """Bytes held by the copy."""
        tensors = [*self.states.values(), *self.keys.values(), *self.values.values()]
        tensors += [t for kvp in self.local.values() for t in kvp]
        return sum(t.numel() * t.element_size() for t in tensors)


class HybridCache:
    """Linear states and local KV (constant size), softmax-layer KV (grows with the context).

    Args:
        config: the model's config.
        batch_size: rows B.
        device, dtype: where and in which dtype KV lives (the model's); states are fp32
            (fp64 for an fp64 model).
        capacity: slots to allocate up front; KV grows by doubling past it.
    """

    def __init__(
        self,
        config: HybridConfig,
        batch_size: int = 1,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        capacity: int = 0,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        c = self.config = config
        self.device, self.dtype = torch.device(device), dtype
        state_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        B = self.batch_size = batch_size
        K = V = c.head_dim
        self.states = {
            i: torch.zeros(B, c.num_heads, *((2 * K, V + 1) if t == "cosformer" else (K, V)),
                           dtype=state_dtype, device=device)
            for i, t in enumerate(c.layer_types)
            if t in LINEAR_TYPES
        }  # fmt: skip
        self.local = {
            i: empty_local_cache(
                B, c.num_kv_heads, c.window_size if t == "window_softmax" else c.diag_block_size,
                c.head_dim, dtype, device,
            )
            for i, t in enumerate(c.layer_types)
            if t in LOCAL_TYPES
        }  # fmt: skip
        kv_shape = (B, c.num_kv_heads, _round_up(capacity), c.head_dim)
        softmax = [i for i, t in enumerate(c.layer_types) if t == "softmax"]
        self.keys = {i: torch.zeros(kv_shape, dtype=dtype, device=device) for i in softmax}
        self.values = {i: torch.zeros(kv_shape, dtype=dtype, device=device) for i in softmax}
        self.length = 0
        self._pad = torch.zeros(B, dtype=torch.int64, device=device)
        self._padded = False

    @classmethod
    def for_model(cls, model: HybridLM, batch_size: int = 1, capacity: int = 0) -> HybridCache:
        """An empty cache for `model` on its device and in its dtype."""
        weight = model.lm_head.weight
        return cls(
            model.config, batch_size, device=weight.device, dtype=weight.dtype, capacity=capacity
        )

    # -- what the layers use ---------------------------------------------------------------

    @property
    def pad(self) -> Tensor | None:
        """int64 [B] left-padding slots per row, or None when no row is padded."""
        return self._pad if self._padded else None

    @property
    def seen(self) -> Tensor:
        """int64 [B] tokens each row has seen (its position for the next token)."""
        return self.length - self._pad

    @property
    def capacity(self) -> int:
        """Slots allocated for softmax-layer KV."""
        return next(iter(self.keys.values())).shape[2] if self.keys else 0

    def linear_state(self, layer_idx: int) -> Tensor:
        """The state [B, H, K, V] of lightning layer `layer_idx`, updated in place."""
        return self.states[layer_idx]

    def local_kv(self, layer_idx: int) -> tuple[Tensor, Tensor, Tensor]:
        """Local layer `layer_idx`'s last keys, values [B, G, S, D] and positions [B, S]."""
        return self.local[layer_idx]

    def set_local_kv(self, layer_idx: int, k: Tensor, v: Tensor, pos: Tensor) -> None:
        """Replaces local layer `layer_idx`'s buffers (same shapes as `local_kv`'s)."""
        if pos.shape != self.local[layer_idx][2].shape:
            raise ValueError(f"pos must be {tuple(self.local[layer_idx][2].shape)}")
        self.local[layer_idx] = (k, v, pos)

    def append_kv(self, layer_idx: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Writes k, v [B, T, G, D] at slots length … length + T − 1 of softmax layer
        `layer_idx`; returns its keys and values [B, G, length + T, D] (views)."""
        end = self.length + k.shape[1]
        self.reserve(end)
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        keys[:, :, self.length : end] = k.transpose(1, 2)
        values[:, :, self.length : end] = v.transpose(1, 2)
        return keys[:, :, :end], values[:, :, :end]

    def advance(self, num_tokens: int) -> None:
        """Marks `num_tokens` more slots as filled (after every layer has seen them)."""
        self.length += num_tokens

    # -- memory ----------------------------------------------------------------------------

    def reserve(self, slots: int) -> None:
        """Makes room for `slots` slots of KV; grows at least 2x so that appends copy O(L)."""
        if slots <= self.capacity or not self.keys:
            return
        new = _round_up(max(slots, 2 * self.capacity))
        for kv in (self.keys, self.values):
            for i, old in kv.items():
                grown = old.new_zeros(*old.shape[:2], new, old.shape[3])
                grown[:, :, : self.length] = old[:, :, : self.length]
                kv[i] = grown

    def memory_bytes(self) -> dict[str, int]:
        """Bytes held: `lightning` (linear states), `local_kv` (window/diag buffers),
        `softmax_kv` (allocated KV slots), `total`."""
        states = sum(s.numel() * s.element_size() for s in self.states.values())
        local = sum(t.numel() * t.element_size() for kvp in self.local.values() for t in kvp)
        kv = sum(t.numel() * t.element_size() for d in (self.keys, self.values) for t in d.values())
        return {"lightning": states, "local_kv": local, "softmax_kv": kv,
                "total": states + local + kv}  # fmt: skip

    # -- batch changes ---------------------------------------------------------------------

    def select(self, indices: Sequence[int] | Tensor) -> HybridCache:
        """Keeps rows `indices` (in that order, repeats allowed); the batch size becomes
        len(indices). In place; returns self."""
        idx = self._rows(indices, "indices")
        if not len(idx):
            raise ValueError("indices must keep at least one row")
        for d in (self.states, self.keys, self.values):
            for i, t in d.items():
                d[i] = t.index_select(0, idx)
        for i, kvp in self.local.items():
            self.local[i] = tuple(t.index_select(0, idx) for t in kvp)
        self._pad = self._pad.index_select(0, idx)
        self._padded = bool(self._pad.any())
        self.batch_size = len(idx)
        return self

    def reorder(self, beam_idx: Sequence[int] | Tensor) -> HybridCache:
        """Row b becomes old row beam_idx[b] (beam search); len(beam_idx) must equal B."""
        if len(beam_idx) != self.batch_size:
            raise ValueError(
                f"beam_idx must have one entry per row ({self.batch_size}), got {len(beam_idx)}"
            )
        return self.select(beam_idx)

    def reset(self, rows: Sequence[int] | Tensor) -> None:
        """Frees rows for new sequences: zeroes their states and KV; a freed row's next
        token starts a sequence at position 0 (its earlier slots become padding)."""
        idx = self._rows(rows, "rows")
        for s in self.states.values():
            s.index_fill_(0, idx, 0.0)
        for d in (self.keys, self.values):
            for t in d.values():
                t.index_fill_(0, idx, 0.0)
        for k, v, pos in self.local.values():
            k.index_fill_(0, idx, 0.0)
            v.index_fill_(0, idx, 0.0)
            pos.index_fill_(0, idx, -1)
        self._pad.index_fill_(0, idx, self.length)
        self._padded = bool(self._pad.any())

    def crop(self, length: int) -> None:
        """Not possible: a lightning state cannot forget tokens. Restore a snapshot instead."""
        raise ValueError(
            "HybridCache cannot be cropped: a lightning layer's state has folded every token "
            "into one K×V matrix per head; take a snapshot() before and restore() it instead"
        )

    # -- snapshots -------------------------------------------------------------------------

    def snapshot(self) -> CacheSnapshot:
        """A copy of the cache as it is now (KV up to `length` only)."""
        return CacheSnapshot(
            states={i: s.clone() for i, s in self.states.items()},
            keys={i: k[:, :, : self.length].clone() for i, k in self.keys.items()},
            values={i: v[:, :, : self.length].clone() for i, v in self.values.items()},
            length=self.length,
            pad=self._pad.clone(),
            local={i: tuple(t.clone() for t in kvp) for i, kvp in self.local.items()},
        )

    def restore(self, snap: CacheSnapshot) -> None:
        """Sets the cache to `snap` (taken from a cache of the same model and batch size)."""
        same = set(snap.states) == set(self.states) and set(snap.local) == set(self.local)
        if not same or set(snap.keys) != set(self.keys):
            raise ValueError("snapshot is from a model with other layer types")
        if len(snap.pad) != self.batch_size:
            raise ValueError(
                f"snapshot has {len(snap.pad)} rows, the cache has batch_size={self.batch_size}"
            )
        for i, s in snap.states.items():
            self.states[i].copy_(s)
        self.local = {i: tuple(t.clone() for t in kvp) for i, kvp in snap.local.items()}
        self.length = 0
        self.reserve(snap.length)
        for dst, src in ((self.keys, snap.keys), (self.values, snap.values)):
            for i, t in src.items():
                dst[i][:, :, : snap.length] = t
        self.length = snap.length
        self._pad = snap.pad.clone()
        self._padded = bool(self._pad.any())

    @classmethod
    def stack(cls, caches: Sequence[HybridCache], capacity: int = 0) -> HybridCache:
        """One batched cache from single-row caches of different lengths, right-aligned:
        row b gets `length − caches[b].length` padding slots in front. Rows are unchanged."""
        if not caches or any(c.batch_size != 1 for c in caches):
            raise ValueError("caches must be a non-empty list of batch_size=1 caches")
        first = caches[0]
        length = max(c.length for c in caches)
        out = cls(
            first.config, len(caches), device=first.device, dtype=first.dtype,
            capacity=max(capacity, length),
        )  # fmt: skip
        for b, c in enumerate(caches):
            lead = length - c.length
            for i, s in c.states.items():
                out.states[i][b] = s[0]
            for i, kvp in c.local.items():  # positions are explicit: no alignment needed
                for dst, src in zip(out.local[i], kvp, strict=True):
                    dst[b] = src[0]
            for dst, src in ((out.keys, c.keys), (out.values, c.values)):
                for i, t in src.items():
                    dst[i][b, :, lead:length] = t[0, :, : c.length]
            out._pad[b] = lead + c._pad[0]
        out.length = length
        out._padded = bool(out._pad.any())
        return out

    def _rows(self, rows: Sequence[int] | Tensor, name: str) -> Tensor:
        idx = torch.as_tensor(rows, dtype=torch.int64).reshape(-1)
        if len(idx) and (int(idx.min()) < 0 or int(idx.max()) >= self.batch_size):
            raise ValueError(f"{name} must be row numbers in [0, {self.batch_size})")
        return idx.to(self.device)


def _round_up(n: int) -> int:
    return -(-n // _SLOT_ROUND) * _SLOT_ROUND
