"""Local softmax attention (sliding window, causal blocks): fast paths against their naive
references, both against a per-query loop written from the definition, and the cached form
(chunked prefill, decode, left-padded batches) against the fast path.

# B batch, T tokens, H query heads, G key/value heads, D head dim, S cache slots
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from conftest import assert_close, rel_err

from lightlong.ops import (
    block_attention,
    block_attention_naive,
    empty_local_cache,
    local_attention_cached,
    window_attention,
    window_attention_naive,
)

TOL64 = 1e-10
TOL32 = 1e-5
FAST = {"window": window_attention, "block": block_attention}
NAIVE = {"window": window_attention_naive, "block": block_attention_naive}
KINDS = ["window", "block"]


def make_qkv(B, T, H, G, D, *, dtype=torch.float64, seed=0):
    """Leaf q [B, T, H, D], k/v [B, T, G, D]: drawn in float64, rounded to dtype."""
    g = torch.Generator().manual_seed(seed)

    def leaf(*shape):
        return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype).requires_grad_()

    return leaf(B, T, H, D), leaf(B, T, G, D), leaf(B, T, G, D)


def upcast(*xs):
    return tuple(x.detach().double().requires_grad_() for x in xs)


def fwd_bwd(fn, q, k, v, *, seed=1):
    """o and the gradients of q, k, v under a random float64-drawn cotangent."""
    o = fn(q, k, v)
    g = torch.Generator().manual_seed(seed)
    cot = torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.dtype)
    dq, dk, dv = torch.autograd.grad(o, (q, k, v), cot)
    return {"o": o, "dq": dq, "dk": dk, "dv": dv}


def op(table, kind, size, cu_seqlens=None):
    return lambda q, k, v: table[kind](q, k, v, **{kind: size}, cu_seqlens=cu_seqlens)


def definition(q, k, v, kind, size, cu_seqlens=None):
    """Each query's softmax over its visible keys, one query at a time, in float64."""
    q, k, v = (x.detach().double() for x in (q, k, v))
    B, T, H, D = q.shape
    group = H // k.shape[2]
    offsets = [0, T] if cu_seqlens is None else cu_seqlens.tolist()
    o = torch.zeros_like(q)
    for a, e in itertools.pairwise(offsets):
        for p in range(e - a):
            if kind == "window":
                keys = [j for j in range(p + 1) if j > p - size]
            else:
                keys = [j for j in range(p + 1) if j // size == p // size]
            idx = torch.tensor(keys) + a
            for b in range(B):
                for h in range(H):
                    s = k[b, idx, h // group] @ q[b, a + p, h] / math.sqrt(D)
                    o[b, a + p, h] = torch.softmax(s, 0) @ v[b, idx, h // group]
    return o


# (B, T, H, G, D, size)
SHAPES = [
    pytest.param(2, 37, 4, 2, 8, 8, id="T37-size8-gqa"),
    pytest.param(1, 11, 2, 2, 4, 16, id="size>T"),
    pytest.param(2, 9, 4, 2, 4, 1, id="size1"),
    pytest.param(1, 29, 3, 3, 8, 5, id="T29-size5-mha"),
    pytest.param(1, 1, 2, 1, 4, 3, id="T1"),
    pytest.param(2, 24, 4, 1, 4, 6, id="T=4·size-G1"),
]


@pytest.mark.parametrize("kind", KINDS)
def test_naive_matches_definition(kind):
    cu = torch.tensor([0, 6, 6, 19], dtype=torch.int64)
    for size in (1, 4, 30):
        q, k, v = make_qkv(1, 19, 4, 2, 3)
        ref = definition(q, k, v, kind, size, cu)
        assert_close(NAIVE[kind](q, k, v, **{kind: size}, cu_seqlens=cu), ref, 1e-12, "naive")
        assert_close(FAST[kind](q, k, v, **{kind: size}, cu_seqlens=cu), ref, 1e-12, "fast")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("B", "T", "H", "G", "D", "size"), SHAPES)
@pytest.mark.parametrize(
    ("dtype", "tol"), [(torch.float64, TOL64), (torch.float32, TOL32)], ids=["fp64", "fp32"]
)
def test_fast_matches_naive(kind, B, T, H, G, D, size, dtype, tol):
    q, k, v = make_qkv(B, T, H, G, D, dtype=dtype)
    out = fwd_bwd(op(FAST, kind, size), q, k, v)
    ref = fwd_bwd(op(NAIVE, kind, size), *upcast(q, k, v))
    assert out["o"].dtype == dtype and out["o"].shape == (B, T, H, D)
    for key in ("o", "dq", "dk", "dv"):
        assert_close(out[key], ref[key], tol, f"{kind} {dtype} {key}")


# starts not aligned to the window/block, an empty sequence, a length-1 sequence
PACKED = [0, 5, 5, 22, 23, 41]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("size", [1, 4, 8, 64], ids=lambda s: f"size{s}")
def test_packed_matches_naive_and_per_sequence(kind, size):
    cu = torch.tensor(PACKED, dtype=torch.int64)
    q, k, v = make_qkv(1, PACKED[-1], 4, 2, 8)
    out = fwd_bwd(op(FAST, kind, size, cu), q, k, v)
    ref = fwd_bwd(op(NAIVE, kind, size, cu), *upcast(q, k, v))
    for key in ("o", "dq", "dk", "dv"):
        assert_close(out[key], ref[key], TOL64, f"packed {kind} {key}")
    alone = [
        FAST[kind](q[:, a:e], k[:, a:e], v[:, a:e], **{kind: size})
        for a, e in itertools.pairwise(PACKED)
    ]
    assert_close(out["o"], torch.cat(alone, dim=1), TOL64, "packed vs per-sequence")


@pytest.mark.parametrize("kind", KINDS)
def test_local_differs_from_causal(kind):
    """The window/block actually restricts attention (guards against a no-op mask)."""
    q, k, v = make_qkv(1, 20, 2, 2, 4)
    small = FAST[kind](q, k, v, **{kind: 4})
    full = FAST[kind](q, k, v, **{kind: 20})
    assert rel_err(small[:, :4], full[:, :4]) < 1e-12  # the first 4 tokens see the same keys
    assert rel_err(small[:, 4:], full[:, 4:]) > 1e-2


@pytest.mark.parametrize("kind", KINDS)
def test_gradcheck(kind):
    q, k, v = make_qkv(1, 7, 2, 1, 3)
    cu = torch.tensor([0, 2, 7], dtype=torch.int64)
    assert torch.autograd.gradcheck(op(FAST, kind, 3), (q, k, v))
    assert torch.autograd.gradcheck(op(FAST, kind, 2, cu), (q, k, v))


@pytest.mark.parametrize("kind", KINDS)
def test_bfloat16_within_twice_naive_error(kind):
    q, k, v = make_qkv(2, 45, 4, 2, 16, dtype=torch.bfloat16)
    ref = NAIVE[kind](*(x.double() for x in (q, k, v)), **{kind: 8})
    fast_err = rel_err(FAST[kind](q, k, v, **{kind: 8}), ref)
    naive_err = rel_err(NAIVE[kind](q, k, v, **{kind: 8}), ref)
    assert fast_err <= 2 * naive_err, f"bf16 {kind}: fast {fast_err:.2e}, naive {naive_err:.2e}"
    assert naive_err < 3e-2


# ----------------------------------------------------------------------- cached form


def run_cached(kind, size, q, k, v, positions, chunks, S=None):
    """Feeds the tokens through `local_attention_cached` in chunks of the given sizes (the
    rest one token at a time); returns the concatenated outputs and the last caches."""
    B, T, _, D = q.shape
    G = k.shape[2]
    S = size if S is None else S
    cache = empty_local_cache(B, G, S, D, q.dtype, q.device)
    bounds = [0]
    for n in chunks:
        bounds.append(bounds[-1] + n)
    bounds += range(bounds[-1] + 1, T + 1)
    outs = []
    for a, e in itertools.pairwise(bounds):
        o, *cache = local_attention_cached(
            q[:, a:e], k[:, a:e], v[:, a:e], *cache, positions[:, a:e], **{kind: size}
        )
        assert o.shape == (B, e - a, *q.shape[2:]) and o.dtype == q.dtype
        assert cache[0].shape == cache[1].shape == (B, G, S, D)
        assert cache[2].shape == (B, S) and cache[2].dtype == torch.int64
        outs.append(o)
    return torch.cat(outs, dim=1), cache


def arange_positions(B, T):
    return torch.arange(T, dtype=torch.int64).expand(B, T)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("size", [8, 5, 1, 64], ids=lambda s: f"size{s}")
def test_cached_single_call_matches_fast(kind, size):
    q, k, v = make_qkv(2, 30, 4, 2, 8)
    o, _ = run_cached(kind, size, q, k, v, arange_positions(2, 30), [30])
    assert_close(o, FAST[kind](q, k, v, **{kind: size}), TOL64, "one call")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("size", [8, 3], ids=lambda s: f"size{s}")
@pytest.mark.parametrize("chunks", [[7, 13], [13, 7, 1], [], [1, 2]], ids=str)
def test_cached_prefill_then_decode_matches_fast(kind, size, chunks):
    B, T = 2, 33
    q, k, v = make_qkv(B, T, 4, 2, 8)
    o, (k_cache, v_cache, pos_cache) = run_cached(
        kind, size, q, k, v, arange_positions(B, T), chunks
    )
    assert_close(o, FAST[kind](q, k, v, **{kind: size}), TOL64, f"chunks {chunks}")
    # the cache holds the last S keys, oldest first
    assert pos_cache.tolist() == [list(range(T - size, T))] * B
    assert_close(k_cache, k[:, T - size :].transpose(1, 2), 0.0, "k_cache")
    assert_close(v_cache, v[:, T - size :].transpose(1, 2), 0.0, "v_cache")


@pytest.mark.parametrize("kind", KINDS)
def test_cached_float32_and_gradients(kind):
    q, k, v = make_qkv(1, 21, 4, 2, 8, dtype=torch.float32)
    o, _ = run_cached(kind, 8, q, k, v, arange_positions(1, 21), [7, 5])
    ref = NAIVE[kind](*upcast(q, k, v), **{kind: 8})
    assert_close(o, ref, TOL32, "cached float32")
    qd, kd, vd = upcast(q, k, v)
    out = fwd_bwd(
        lambda *x: run_cached(kind, 8, *x, arange_positions(1, 21), [7, 5])[0], qd, kd, vd
    )
    ref = fwd_bwd(op(NAIVE, kind, 8), *upcast(q, k, v))
    for key in ("o", "dq", "dk", "dv"):
        assert_close(out[key], ref[key], TOL64, f"cached {key}")


@pytest.mark.parametrize("kind", KINDS)
def test_cached_larger_cache_than_needed(kind):
    q, k, v = make_qkv(1, 19, 2, 2, 4)
    o, _ = run_cached(kind, 4, q, k, v, arange_positions(1, 19), [6], S=9)
    assert_close(o, FAST[kind](q, k, v, **{kind: 4}), TOL64, "S > size")


@pytest.mark.parametrize("kind", KINDS)
def test_cached_left_padded_rows_match_rows_alone(kind):
    """Row r has pads[r] pad tokens (position −1) in front; its real tokens are at
    positions 0, 1, …: each row's outputs match that row run alone without pads."""
    pads, T, size = [0, 3, 10], 27, 8
    B = len(pads)
    q, k, v = make_qkv(B, T, 4, 2, 8)
    positions = torch.stack([torch.arange(T, dtype=torch.int64) - p for p in pads]).clamp(min=-1)
    o, (_, _, pos_cache) = run_cached(kind, size, q, k, v, positions, [12, 5])
    assert torch.isfinite(o).all()
    for r, p in enumerate(pads):
        alone = FAST[kind](q[r : r + 1, p:], k[r : r + 1, p:], v[r : r + 1, p:], **{kind: size})
        assert_close(o[r : r + 1, p:], alone, TOL64, f"row {r} (pad {p})")
        assert (o[r, :p] == 0).all()
        assert pos_cache[r].tolist() == list(range(T - p - size, T - p))


def test_cached_query_without_visible_key_is_zero_not_nan():
    q, k, v = make_qkv(2, 3, 2, 1, 4)
    cache = empty_local_cache(2, 1, 4, 4, torch.float64, "cpu")
    positions = torch.tensor([[-1, -1, 0], [-1, -1, -1]])
    o, *_ = local_attention_cached(q, k, v, *cache, positions, window=4)
    assert torch.isfinite(o).all() and (o[:, :2] == 0).all() and (o[1] == 0).all()
    grads = torch.autograd.grad(o.sum(), (q, k, v))
    assert all(torch.isfinite(g).all() for g in grads)


def test_empty_local_cache():
    k_cache, v_cache, pos_cache = empty_local_cache(2, 3, 5, 4, torch.bfloat16, "cpu")
    assert k_cache.shape == v_cache.shape == (2, 3, 5, 4) and k_cache.dtype == torch.bfloat16
    assert (k_cache == 0).all() and (v_cache == 0).all()
    assert pos_cache.dtype == torch.int64 and (pos_cache == -1).all()


# ---------------------------------------------------------------------------- errors


def _bad_calls():
    q, k, v = make_qkv(1, 6, 4, 2, 8)
    cache = empty_local_cache(1, 2, 4, 8, torch.float64, "cpu")
    pos = arange_positions(1, 6)
    cached = local_attention_cached
    k3 = make_qkv(1, 6, 4, 3, 8)[1]
    return [
        ("window", lambda: window_attention(q, k, v, window=0)),
        ("window", lambda: window_attention_naive(q, k, v, window=-2)),
        ("window", lambda: window_attention(q, k, v, window=2.0)),
        ("block", lambda: block_attention(q, k, v, block=0)),
        ("block", lambda: block_attention_naive(q, k, v, block=True)),
        ("divide", lambda: window_attention(q, k3, k3, window=2)),
        ("k and v", lambda: block_attention(q, k, v[..., :4], block=2)),
        ("match q", lambda: block_attention(q, k[:, :5], v[:, :5], block=2)),
        ("q must", lambda: window_attention(q[0], k, v, window=2)),
        (
            "cu_seqlens",
            lambda: window_attention(q, k, v, window=2, cu_seqlens=torch.tensor([0, 5])),
        ),
        ("exactly one", lambda: cached(q, k, v, *cache, pos)),
        ("exactly one", lambda: cached(q, k, v, *cache, pos, window=4, block=4)),
        ("window", lambda: cached(q, k, v, *cache, pos, window=0)),
        ("window=5", lambda: cached(q, k, v, *cache, pos, window=5)),
        ("block=8", lambda: cached(q, k, v, *cache, pos, block=8)),
        ("k_cache", lambda: cached(q, k, v, cache[0][:, :1], cache[1], cache[2], pos, window=4)),
        ("v_cache", lambda: cached(q, k, v, cache[0], cache[1][..., :2], cache[2], pos, window=4)),
        ("k_cache", lambda: cached(q, k, v, cache[0].float(), cache[1], cache[2], pos, window=4)),
        ("pos_cache", lambda: cached(q, k, v, *cache[:2], cache[2][:, :3], pos, window=4)),
        ("positions", lambda: cached(q, k, v, *cache, pos[:, :5], window=4)),
        ("positions", lambda: cached(q, k, v, *cache, pos[0], window=4)),
        ("positions", lambda: cached(q, k, v, *cache, pos.int(), window=4)),
        ("match q", lambda: cached(q, k[:, :5], v[:, :5], *cache, pos, window=4)),
    ]


@pytest.mark.parametrize("i", range(len(_bad_calls())))
def test_bad_inputs_raise_value_error_naming_argument(i):
    match, call = _bad_calls()[i]
    with pytest.raises(ValueError, match=match):
        call()
