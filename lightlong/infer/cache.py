"""`HybridCache`: what a hybrid model remembers between forward calls.

A lightning layer's whole past is one fp32 state per head, [B, H, K, V], whatever the
context length (a norm_linear layer's too; a cosformer layer's is [B, H, 2K, V + 1]). Local
softmax layers (window, diag) keep their last S keys and values with their positions,
[B, G, S, D] and [B, S] (−1: empty). Only softmax layers keep keys and values that grow,
[B, G, L, D] for L slots.

Rows are independent sequences of their own lengths: row b's tokens sit at slots
0 … length_b − 1 of its KV, and its next token is at position length_b. A row can be
freed (`reset`, `remove`) and refilled (`insert`) while the others keep decoding, which is
what continuous batching needs. Buffers are allocated for `max_batch_size` rows; the
model sees the first `batch_size` of them.

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
    """A copy of a cache's rows; `HybridCache.restore` resumes from it."""

    states: dict[int, Tensor]
    keys: dict[int, Tensor]
    values: dict[int, Tensor]
    lengths: tuple[int, ...]
    """Tokens of each row."""
    local: dict[int, tuple[Tensor, Tensor, Tensor]] = field(default_factory=dict)

    @property
    def length(self) -> int:
        """Tokens of the longest row."""
        return max(self.lengths)

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
        batch_size: rows B the model sees now.
        device, dtype: where and in which dtype KV lives (the model's); states are fp32
            (fp64 for an fp64 model).
        capacity: KV slots per row to allocate up front; KV grows by doubling past it.
        max_batch_size: rows to allocate (>= batch_size), for rows `insert`ed later.
    """

    def __init__(
        self,
        config: HybridConfig,
        batch_size: int = 1,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        capacity: int = 0,
        max_batch_size: int | None = None,
    ):
        rows = batch_size if max_batch_size is None else max_batch_size
        if batch_size < 0 or rows < max(batch_size, 1):
            raise ValueError(
                f"need 0 <= batch_size <= max_batch_size and max_batch_size >= 1, got "
                f"batch_size={batch_size}, max_batch_size={max_batch_size}"
            )
        c = self.config = config
        self.device, self.dtype = torch.device(device), dtype
        state_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        self.batch_size, self.max_batch_size = batch_size, rows
        K = V = c.head_dim
        self._states = {
            i: torch.zeros(rows, c.num_heads, *((2 * K, V + 1) if t == "cosformer" else (K, V)),
                           dtype=state_dtype, device=device)
            for i, t in enumerate(c.layer_types)
            if t in LINEAR_TYPES
        }  # fmt: skip
        self._local = {
            i: empty_local_cache(
                rows, c.num_kv_heads, c.window_size if t == "window_softmax" else c.diag_block_size,
                c.head_dim, dtype, device,
            )
            for i, t in enumerate(c.layer_types)
            if t in LOCAL_TYPES
        }  # fmt: skip
        kv_shape = (rows, c.num_kv_heads, _round_up(capacity), c.head_dim)
        softmax = [i for i, t in enumerate(c.layer_types) if t == "softmax"]
        self._keys = {i: torch.zeros(kv_shape, dtype=dtype, device=device) for i in softmax}
        self._values = {i: torch.zeros(kv_shape, dtype=dtype, device=device) for i in softmax}
        self._lengths = [0] * rows  # on the host: no device sync to read them
        self._lengths_t = torch.zeros(rows, dtype=torch.int64, device=device)

    @classmethod
    def for_model(
        cls, model: HybridLM, batch_size: int = 1, capacity: int = 0, **kwargs: int
    ) -> HybridCache:
        """An empty cache for `model` on its device and in its dtype."""
        weight = model.model.embed_tokens.weight  # float whatever is quantized
        return cls(
            model.config, batch_size, device=weight.device, dtype=weight.dtype,
            capacity=capacity, **kwargs,
        )  # fmt: skip

    @classmethod
    def row_bytes(cls, config: HybridConfig, dtype: torch.dtype) -> tuple[int, int]:
        """Bytes one row needs: (constant: linear states and local KV, softmax KV per token)."""
        held = cls(config, 1, device="meta", dtype=dtype, capacity=_SLOT_ROUND).memory_bytes()
        return held["lightning"] + held["local_kv"], held["softmax_kv"] // _SLOT_ROUND

    # -- the rows the model sees -----------------------------------------------------------

    @property
    def states(self) -> dict[int, Tensor]:
        """Lightning-type layers' states [B, H, K, V] (views)."""
        return {i: s[: self.batch_size] for i, s in self._states.items()}

    @property
    def keys(self) -> dict[int, Tensor]:
        """Softmax layers' keys [B, G, capacity, D] (views)."""
        return {i: k[: self.batch_size] for i, k in self._keys.items()}

    @property
    def values(self) -> dict[int, Tensor]:
        """Softmax layers' values [B, G, capacity, D] (views)."""
        return {i: v[: self.batch_size] for i, v in self._values.items()}

    @property
    def local(self) -> dict[int, tuple[Tensor, Tensor, Tensor]]:
        """Local layers' keys, values [B, G, S, D] and positions [B, S] (views)."""
        B = self.batch_size
        return {i: tuple(t[:B] for t in kvp) for i, kvp in self._local.items()}

    @property
    def lengths(self) -> list[int]:
        """Tokens each row has seen."""
        return self._lengths[: self.batch_size]

    @property
    def length(self) -> int:
        """Tokens of the longest row (KV slots in use)."""
        return max(self.lengths, default=0)

    @property
    def seen(self) -> Tensor:
        """int64 [B] tokens each row has seen (its position for the next token)."""
        return self._lengths_t[: self.batch_size]

    @property
    def start(self) -> int | Tensor:
        """Where the next tokens go: one slot when every row has the same length, else
        int64 [B] per row."""
        lengths = self.lengths
        return lengths[0] if len(set(lengths)) == 1 else self.seen

    @property
    def capacity(self) -> int:
        """Slots allocated per row for softmax-layer KV."""
        return next(iter(self._keys.values())).shape[2] if self._keys else 0

    # -- what the layers use ---------------------------------------------------------------

    def linear_state(self, layer_idx: int) -> Tensor:
        """The state [B, H, K, V] of lightning layer `layer_idx`, updated in place."""
        return self._states[layer_idx][: self.batch_size]

    def local_kv(self, layer_idx: int) -> tuple[Tensor, Tensor, Tensor]:
        """Local layer `layer_idx`'s last keys, values [B, G, S, D] and positions [B, S]."""
        return self.local[layer_idx]

    def set_local_kv(self, layer_idx: int, k: Tensor, v: Tensor, pos: Tensor) -> None:
        """Replaces local layer `layer_idx`'s buffers (same shapes as `local_kv`'s)."""
        bufs = self.local[layer_idx]
        if pos.shape != bufs[2].shape:
            raise ValueError(f"pos must be {tuple(bufs[2].shape)}")
        for dst, src in zip(bufs, (k, v, pos), strict=True):
            if dst.data_ptr() != src.data_ptr():
                dst.copy_(src)

    def append_kv(self, layer_idx: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Writes k, v [B, T, G, D] at slots length_b … length_b + T − 1 of each row of
        softmax layer `layer_idx`; returns its keys and values [B, G, max length + T, D]
        (views; a row's slots past its own length + T hold stale values no query sees)."""
        B, T = k.shape[:2]
        end = self.length + T
        self.reserve(end)
        keys, values = self._keys[layer_idx][:B], self._values[layer_idx][:B]
        start = self.start
        if isinstance(start, int):
            keys[:, :, start : start + T] = k.transpose(1, 2)
            values[:, :, start : start + T] = v.transpose(1, 2)
        else:  # rows of different lengths: slot start_b + t of row b
            rows_BT = torch.arange(B, device=k.device)[:, None].expand(B, T)
            slots_BT = start[:, None] + torch.arange(T, device=k.device)
            keys.permute(0, 2, 1, 3)[rows_BT, slots_BT] = k
            values.permute(0, 2, 1, 3)[rows_BT, slots_BT] = v
        return keys[:, :, :end], values[:, :, :end]

    def advance(self, num_tokens: int) -> None:
        """Marks `num_tokens` more tokens as stored in every row (after every layer)."""
        B = self.batch_size
        for b in range(B):
            self._lengths[b] += num_tokens
        self._lengths_t[:B] += num_tokens

    # -- memory ----------------------------------------------------------------------------

    def reserve(self, slots: int) -> None:
        """Makes room for `slots` slots of KV per row; grows at least 2x so that appends copy
        O(L) in all."""
        if slots <= self.capacity or not self._keys:
            return
        new, used = _round_up(max(slots, 2 * self.capacity)), max(self._lengths)
        for kv in (self._keys, self._values):
            for i, old in kv.items():
                grown = old.new_zeros(*old.shape[:2], new, old.shape[3])
                grown[:, :, :used] = old[:, :, :used]
                kv[i] = grown

    def memory_bytes(self) -> dict[str, int]:
        """Bytes held (all allocated rows): `lightning` (linear states), `local_kv`
        (window/diag buffers), `softmax_kv` (allocated KV slots), `total`."""
        states = sum(s.numel() * s.element_size() for s in self._states.values())
        local = sum(t.numel() * t.element_size() for kvp in self._local.values() for t in kvp)
        kv = sum(
            t.numel() * t.element_size() for d in (self._keys, self._values) for t in d.values()
        )
        return {"lightning": states, "local_kv": local, "softmax_kv": kv,
                "total": states + local + kv}  # fmt: skip

    # -- batch changes ---------------------------------------------------------------------

    def select(self, indices: Sequence[int] | Tensor) -> HybridCache:
        """Keeps rows `indices` (in that order, repeats allowed); the batch size becomes
        len(indices). In place (a copy of the kept rows); returns self."""
        idx = self._rows(indices, "indices")
        if not len(idx):
            raise ValueError("indices must keep at least one row")
        for d in (self._states, self._keys, self._values):
            for i, t in d.items():
                d[i] = t.index_select(0, idx)
        for i, kvp in self._local.items():
            self._local[i] = tuple(t.index_select(0, idx) for t in kvp)
        self._lengths = [self._lengths[b] for b in idx.tolist()]
        self._lengths_t = self._lengths_t.index_select(0, idx)
        self.batch_size = self.max_batch_size = len(idx)
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
        token starts a sequence at position 0."""
        idx = self._rows(rows, "rows")
        for d in (self._states, self._keys, self._values):
            for t in d.values():
                t.index_fill_(0, idx, 0.0)
        for k, v, pos in self._local.values():
            k.index_fill_(0, idx, 0.0)
            v.index_fill_(0, idx, 0.0)
            pos.index_fill_(0, idx, -1)
        for b in idx.tolist():
            self._lengths[b] = 0
        self._lengths_t.index_fill_(0, idx, 0)

    def insert(self, source: HybridCache, row: int = 0) -> int:
        """Appends a copy of `source`'s row `row` as a new last row (B grows by one); the
        rest of the new row's buffers are zeroed. Returns its index."""
        if self.batch_size == self.max_batch_size:
            raise ValueError(f"all max_batch_size={self.max_batch_size} rows are in use")
        if source.config is not self.config and source.config != self.config:
            raise ValueError("source is a cache of another model")
        n = source._lengths[row]
        self.reserve(n)
        b = self.batch_size
        self._copy_row(source, row, b, n)
        self.batch_size += 1
        return b

    def remove(self, row: int) -> None:
        """Drops row `row`: the last row moves into its place (B shrinks by one; the order of
        the others is kept except for that move)."""
        last = self.batch_size - 1
        if not 0 <= row <= last:
            raise ValueError(f"row must be in [0, {self.batch_size}), got {row}")
        if row != last:
            self._copy_row(self, last, row, self._lengths[last])
        self.batch_size -= 1

    def _copy_row(self, source: HybridCache, src: int, dst: int, n: int) -> None:
        """Row dst := source's row src (its first n KV slots; the rest zeroed)."""
        for i, s in source._states.items():
            self._states[i][dst] = s[src]
        for i, kvp in source._local.items():
            for d, t in zip(self._local[i], kvp, strict=True):
                d[dst] = t[src]
        for mine, theirs in ((self._keys, source._keys), (self._values, source._values)):
            for i, t in theirs.items():
                mine[i][dst, :, :n] = t[src, :, :n]
                mine[i][dst, :, n : max(self._lengths[dst], n)] = 0
        self._lengths[dst] = n
        self._lengths_t[dst] = n

    def crop(self, length: int) -> None:
        """Not possible: a lightning state cannot forget tokens. Restore a snapshot instead."""
        raise ValueError(
            "HybridCache cannot be cropped: a lightning layer's state has folded every token "
            "into one K×V matrix per head; take a snapshot() before and restore() it instead"
        )

    # -- snapshots -------------------------------------------------------------------------

    def snapshot(self) -> CacheSnapshot:
        """A copy of the rows as they are now (KV up to the longest row only)."""
        n = self.length
        return CacheSnapshot(
            states={i: s.clone() for i, s in self.states.items()},
            keys={i: k[:, :, :n].clone() for i, k in self.keys.items()},
            values={i: v[:, :, :n].clone() for i, v in self.values.items()},
            lengths=tuple(self.lengths),
            local={i: tuple(t.clone() for t in kvp) for i, kvp in self.local.items()},
        )

    def restore(self, snap: CacheSnapshot) -> None:
        """Sets the rows to `snap` (taken from a cache of the same model and batch size)."""
        same = set(snap.states) == set(self._states) and set(snap.local) == set(self._local)
        if not same or set(snap.keys) != set(self._keys):
            raise ValueError("snapshot is from a model with other layer types")
        B = self.batch_size
        if len(snap.lengths) != B:
            raise ValueError(f"snapshot has {len(snap.lengths)} rows, the cache has batch_size={B}")
        self.reserve(snap.length)
        for i, s in snap.states.items():
            self._states[i][:B] = s
        for i, kvp in snap.local.items():
            for dst, src in zip(self._local[i], kvp, strict=True):
                dst[:B] = src
        for dst, src in ((self._keys, snap.keys), (self._values, snap.values)):
            for i, t in src.items():
                dst[i][:B, :, : snap.length] = t
        self._lengths[:B] = snap.lengths
        self._lengths_t[:B] = torch.tensor(snap.lengths, dtype=torch.int64)

    @classmethod
    def stack(cls, caches: Sequence[HybridCache], capacity: int = 0) -> HybridCache:
        """One batched cache holding copies of single-row caches of any lengths."""
        if not caches or any(c.batch_size != 1 for c in caches):
            raise ValueError("caches must be a non-empty list of batch_size=1 caches")
        first = caches[0]
        out = cls(
            first.config, 0, device=first.device, dtype=first.dtype, max_batch_size=len(caches),
            capacity=max([capacity] + [c.length for c in caches]),
        )  # fmt: skip
        for c in caches:
            out.insert(c)
        return out

    def _rows(self, rows: Sequence[int] | Tensor, name: str) -> Tensor:
        idx = torch.as_tensor(rows, dtype=torch.int64).reshape(-1)
        if len(idx) and (int(idx.min()) < 0 or int(idx.max()) >= self.batch_size):
            raise ValueError(f"{name} must be row numbers in [0, {self.batch_size})")
        return idx.to(self.device)


def _round_up(n: int) -> int:
    return -(-n // _SLOT_ROUND) * _SLOT_ROUND
