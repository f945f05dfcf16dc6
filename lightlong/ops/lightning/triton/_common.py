"""Pieces every lightning Triton kernel shares: launch tables, tile loads, decay factors.

Tokens are cut into chunks of BT per sequence: a sequence's first chunk starts at its first
token, wherever that falls, and its last chunk is partial (rows past the end load as zeros
and are never stored). No chunk spans two sequences, so no state crosses a boundary.

Every offset that can pass 2³¹ (token · stride, chunk · H·K·V) is computed in int64: token
starts are loaded from int64 tables, and chunk and head indices are cast before multiplying.

# T tokens (all sequences, flattened), H heads, K/V head dims, BT chunk, N sequences,
# NT chunks (all sequences), BK/BV tiles of K/V
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from .._inputs import TRITON_BLOCK_SIZES

CHUNK_SIZES = TRITON_BLOCK_SIZES
"""Chunk lengths BT the kernels take (`lightning_attn`'s block_size)."""

INTERPRETED = bool(triton.knobs.runtime.interpret)
"""The kernels run on the CPU interpreter (TRITON_INTERPRET=1 when triton was imported)."""


def autotune_configs() -> list[triton.Config]:
    """Launch configurations to autotune over; one on the interpreter (more crash it)."""
    configs = [
        triton.Config({}, num_warps=w, num_stages=s)
        for w, s in ((4, 2), (4, 3), (8, 2), (8, 3), (2, 2), (4, 1))
    ]
    return configs[:1] if INTERPRETED else configs


def tile(n: int, cap: int = 64) -> int:
    """Tile width for a head dim of n: a power of two in [16, cap] (tl.dot needs >= 16)."""
    return min(cap, max(16, triton.next_power_of_2(n)))


def dot_precisions(dtype: torch.dtype) -> tuple[str, str]:
    """tl.dot input precisions (for outputs, for the state), all operands being float32.

    The state is carried in float32 across chunks and returned (final state, d initial
    state), so its products use 3xTF32: float32 accuracy on tensor cores, where plain TF32
    (10-bit mantissa) would err ~1e-4. Outputs in bfloat16/float16 use TF32: exact for
    their inputs, and its 2^-11 on the float32 operands is below their own rounding. Float32
    outputs use 3xTF32 too (the float32 contract is 1e-5 relative). The interpreter computes
    every dot in float32, so only a GPU exercises these choices.
    """
    return ("tf32x3", "tf32x3") if dtype == torch.float32 else ("tf32", "tf32x3")


@dataclass(frozen=True)
class Chunks:
    """Where each chunk and each sequence lies, as device tables for the kernels."""

    cu: Tensor
    """int64 [N + 1] sequence offsets on the flattened token axis."""
    first: Tensor
    """int64 [N + 1] index of each sequence's first chunk (last entry: NT)."""
    spans: Tensor
    """int64 [NT, 2] (first token, end of its sequence) of each chunk."""
    num_chunks: int
    """NT."""


@functools.lru_cache(maxsize=64)
def _chunks_cached(offsets: tuple[int, ...], BT: int, device: torch.device) -> Chunks:
    off = torch.tensor(offsets, dtype=torch.int64)
    counts_N = (off[1:] - off[:-1] + BT - 1) // BT
    first = torch.cat([off.new_zeros(1), counts_N.cumsum(0)])
    NT = int(first[-1])
    seq_NT = torch.repeat_interleave(torch.arange(len(counts_N)), counts_N)
    start_NT = off[seq_NT] + (torch.arange(NT) - first[seq_NT]) * BT
    spans = torch.stack([start_NT, off[1:][seq_NT]], dim=1)
    return Chunks(off.to(device), first.to(device), spans.to(device).contiguous(), NT)


def chunk_tables(offsets: list[int], BT: int, device: torch.device) -> Chunks:
    """Chunks of BT tokens for sequences [offsets[n], offsets[n+1]) (cached per layout)."""
    assert all(b >= a for a, b in itertools.pairwise(offsets)), offsets
    return _chunks_cached(tuple(offsets), BT, torch.device(device))


def flat(x: Tensor) -> Tensor:
    """x [B, T, H, D] as [B·T, H, D] with unit stride along D (a view where possible)."""
    B, T, H, D = x.shape
    x = x.reshape(B * T, H, D)
    return x if x.stride(-1) == 1 else x.contiguous()


@triton.jit
def load_rows(x, t0, L, stride_t, col0, D: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr):
    """[BT, BD] float32 tile: rows t0 ... t0 + BT of x (one head's [T, D] rows, row stride
    stride_t), columns col0 ... col0 + BD; rows >= L and columns >= D read as 0."""
    o_t = tl.arange(0, BT)
    o_d = col0 + tl.arange(0, BD)
    ptrs = x + t0 * stride_t + o_t[:, None] * stride_t + o_d[None, :]
    mask = (o_t < L)[:, None] & (o_d < D)[None, :]
    return tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def store_rows(y, t0, L, stride_t, col0, val, D: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr):
    """Writes a [BT, BD] tile to rows t0 ... t0 + L of y, columns col0 ... min(col0 + BD, D)."""
    o_t = tl.arange(0, BT)
    o_d = col0 + tl.arange(0, BD)
    ptrs = y + t0 * stride_t + o_t[:, None] * stride_t + o_d[None, :]
    mask = (o_t < L)[:, None] & (o_d < D)[None, :]
    tl.store(ptrs, val.to(y.dtype.element_ty), mask=mask)


@triton.jit
def state_tile(x, idx, i_k, i_v, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr,
               BV: tl.constexpr):  # fmt: skip
    """Pointers and mask of the [BK, BV] tile (i_k, i_v) of state idx in x [*, K, V]."""
    o_k = i_k * BK + tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    ptrs = x + idx.to(tl.int64) * (K * V) + o_k[:, None] * V + o_v[None, :]
    return ptrs, (o_k < K)[:, None] & (o_v < V)[None, :]


@triton.jit
def decay_state(b_s, x):
    """λ^n · S for x = s·n >= 0. Near λ^n = 1 as S + expm1(−x)·S, with expm1 as its Taylor
    series to x⁵: exact to float32 where exp(−x) itself rounds to 1 (MiniMax's slowest heads
    have s = 4e-8). Elsewhere as exp(−x)·S, exact also where λ^n is tiny."""
    expm1 = -x * (1.0 - x * (0.5 - x * (1.0 / 6.0 - x * (1.0 / 24.0 - x / 120.0))))
    return tl.where(x < 0.1, b_s + expm1 * b_s, tl.exp(-x) * b_s)


@triton.jit
def intra_decay(s, BT: tl.constexpr):
    """[BT, BT] causal decay D[i, j] = λ^(i−j) for j <= i, else 0 (λ = exp(−s))."""
    o_t = tl.arange(0, BT)
    gap = o_t[:, None] - o_t[None, :]
    return tl.where(gap >= 0, tl.exp(-s * tl.maximum(gap, 0).to(tl.float32)), 0.0)


@triton.jit
def query_decay(s, BT: tl.constexpr):
    """[BT] a[i] = λ^(i+1): how much of the state entering a chunk reaches its row i."""
    return tl.exp(-s * (tl.arange(0, BT) + 1).to(tl.float32))


@triton.jit
def key_decay(s, L, BT: tl.constexpr):
    """[BT] b[j] = λ^(L−1−j) for rows j < L (0 past the chunk's end): how much of key j
    reaches the state leaving a chunk of L tokens."""
    o_t = tl.arange(0, BT)
    gap = tl.maximum(L - 1 - o_t, 0).to(tl.float32)
    return tl.where(o_t < L, tl.exp(-s * gap), 0.0)
