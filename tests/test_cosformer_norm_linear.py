"""cosFormer and NormAttention ops: the fast paths (lightning attention on a feature form, or
followed by an RMSNorm) against their quadratic references.

`cosformer_attn_naive` builds the weights cos(π/2 · (i − j) / M) from the definition, a
different algorithm from the fast path's cos/sin features; a token loop written here pins
the definition itself. Comparisons check the output, the final state and every gradient
under random cotangents; float64 is the oracle.

# B batch, T tokens, H heads, K/V head dims, C block, N sequences, M max_len
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import assert_close, rel_err

from lightlong.ops import (
    cosformer_attn,
    cosformer_attn_naive,
    cosformer_step,
    decay_rates,
    lightning_attn_naive,
    norm_linear_attn,
    norm_linear_attn_naive,
)

TOL64 = 1e-10  # float64 op vs float64 reference
TOL32 = 1e-5  # float32 op vs float64 reference
DTYPES = [pytest.param(torch.float64, id="fp64"), pytest.param(torch.float32, id="fp32")]


def tol_of(dtype: torch.dtype) -> float:
    return TOL64 if dtype == torch.float64 else TOL32


def randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def qkv(B, T, H, K, V, seed=0):
    """float64 q, k [B, T, H, K], v [B, T, H, V]."""
    return tuple(randn(B, T, H, D, seed=seed + i) for i, D in enumerate((K, K, V)))


def leaves(dtype: torch.dtype, **xs) -> dict:
    """Leaf copies: q, k, v rounded to dtype; states and norm weights float32 (float64 for
    float64), as the API keeps them. None stays None."""
    wide = torch.float64 if dtype == torch.float64 else torch.float32
    return {
        name: None
        if x is None
        else x.detach().to(dtype if name in "qkv" else wide).clone().requires_grad_()
        for name, x in xs.items()
    }


def fwd_bwd(fn, xs: dict, *, cot_dtype=None, seed=1) -> dict:
    """fn(**xs) -> (o, final or None); returns o, final and d<name> for every tensor in xs,
    under random cotangents rounded through cot_dtype (default o's dtype), so that an op and
    its float64 reference are differentiated with identical cotangents."""
    o, final = fn(**xs)
    outs = [x for x in (o, final) if x is not None]
    g = torch.Generator().manual_seed(seed)
    cots = [
        torch.randn(x.shape, generator=g, dtype=torch.float64).to(cot_dtype or o.dtype).to(x.dtype)
        for x in outs
    ]
    names = [name for name, x in xs.items() if x is not None]
    grads = torch.autograd.grad(outs, [xs[n] for n in names], cots, materialize_grads=True)
    return {"o": o, "final": final, **{f"d{n}": gr for n, gr in zip(names, grads, strict=True)}}


def assert_all_close(actual: dict, ref: dict, tol: float, where: str) -> dict:
    """Every entry of ref (outputs and gradients) against actual; returns the errors."""
    return {key: assert_close(actual[key], ref[key], tol, f"{where}: {key}") for key in ref}


# ------------------------------------------------------------------------------ cosFormer


def cos_definition(q, k, v, M, starts, eps=1e-6):
    """The paper's causal cosFormer token by token, in float64, per row and head:
    o_i = Σ_{j≤i} a_ij w_ij v_j / max(Σ_{j≤i} a_ij w_ij, eps)."""
    B, T, H, _ = q.shape
    o = torch.zeros(B, T, H, v.shape[-1], dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            for i in range(T):
                num, den = torch.zeros(v.shape[-1], dtype=torch.float64), 0.0
                for j in range(i + 1):
                    a = float(torch.relu(q[b, i, h]) @ torch.relu(k[b, j, h]))
                    w = math.cos(math.pi / 2 * ((starts[b] + i) - (starts[b] + j)) / M)
                    num, den = num + a * w * v[b, j, h], den + a * w
                o[b, i, h] = num / max(den, eps)
    return o


def cos_state(N, H, K, V, *, seed, max_len=16, P=6):
    """A real float64 state [N, H, 2K, V + 1]: after P random tokens at positions 0 .. P − 1
    (its denominator column sums relu features, unlike a random tensor)."""
    q, k, v = qkv(N, P, H, K, V, seed=seed)
    return cosformer_attn(q, k, v, max_len=max_len, output_final_state=True)[1]


def cos_fast(max_len, **kw):
    return lambda q, k, v, initial_state=None: cosformer_attn(
        q, k, v, max_len=max_len, initial_state=initial_state, **kw
    )


def cos_naive(max_len, **kw):
    return lambda q, k, v: (cosformer_attn_naive(q, k, v, max_len=max_len, **kw), None)


@pytest.mark.parametrize("M", [3, 50], ids=lambda m: f"M{m}")
def test_cosformer_references_match_definition(M):
    """naive and the fast path equal the paper's formula, with per-row starts and (M = 3)
    weights that turn negative past distance M."""
    q, k, v = qkv(2, 7, 2, 3, 2)
    starts = [0, 1_000_003]
    ref = cos_definition(q, k, v, M, starts)
    kw = dict(max_len=M, start=torch.tensor(starts))
    assert_close(cosformer_attn_naive(q, k, v, **kw), ref, TOL64, "naive")
    assert_close(cosformer_attn(q, k, v, block_size=4, **kw)[0], ref, TOL64, "fast")


def test_cosformer_state_layout():
    """The final state is lightning's state of the feature form, as documented:
    S[:K] sums relu(k_j) cos θ_j ⊗ [v_j, 1], S[K:] the same with sin θ_j."""
    B, T, H, K, V, M = 2, 11, 2, 3, 4, 7
    q, k, v = qkv(B, T, H, K, V)
    start = torch.tensor([2, 40])
    _, final = cosformer_attn(q, k, v, max_len=M, start=start, output_final_state=True)
    theta_BT = (start[:, None] + torch.arange(T)).double() * math.pi / (2 * M)
    v1 = torch.cat([v, torch.ones(B, T, H, 1, dtype=torch.float64)], dim=-1)
    for trig, half in ((torch.cos, slice(0, K)), (torch.sin, slice(K, 2 * K))):
        kf = torch.relu(k) * trig(theta_BT)[..., None, None]
        assert_close(final[:, :, half], torch.einsum("bthk,bthv->bhkv", kf, v1), TOL64, "state")


COS_CASES = [
    pytest.param(2, 37, 2, 5, 3, 16, 64, 0, id="M>T"),
    pytest.param(2, 37, 2, 5, 3, 16, 9, 0, id="M<T"),
    pytest.param(1, 45, 3, 4, 6, 8, 50, 999_999, id="start-int"),
    pytest.param(2, 29, 2, 6, 4, 16, 40, (7, 1_000_003), id="start-per-row"),
    pytest.param(2, 37, 2, 5, 3, 16, 2**20, (0, 2**20 - 20), id="M2^20"),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("B", "T", "H", "K", "V", "C", "M", "start"), COS_CASES)
def test_cosformer_matches_naive(B, T, H, K, V, C, M, start, dtype):
    start = torch.tensor(start) if isinstance(start, tuple) else start
    q, k, v = qkv(B, T, H, K, V)
    out = fwd_bwd(cos_fast(M, start=start, block_size=C), leaves(dtype, q=q, k=k, v=v))
    ref = fwd_bwd(cos_naive(M, start=start), leaves(torch.float64, q=q, k=k, v=v))
    assert out["o"].dtype == dtype
    assert_all_close(out, ref, tol_of(dtype), f"{dtype}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_cosformer_packed_matches_naive_and_per_sequence_calls(dtype):
    """Packed sequences (one empty; boundaries off the block grid; starts per sequence):
    o and gradients equal the naive; with states, o and final states equal separate calls,
    and the empty sequence passes its state through."""
    cu = (0, 5, 5, 22, 41)
    H, K, V, C, M = 2, 4, 3, 8, 12
    q, k, v = qkv(1, cu[-1], H, K, V)
    kw = dict(start=torch.tensor([3, 0, 17, 1_000_001]), cu_seqlens=torch.tensor(cu))
    out = fwd_bwd(cos_fast(M, block_size=C, **kw), leaves(dtype, q=q, k=k, v=v))
    ref = fwd_bwd(cos_naive(M, **kw), leaves(torch.float64, q=q, k=k, v=v))
    assert_all_close(out, ref, tol_of(dtype), "packed vs naive")

    init = cos_state(4, H, K, V, seed=5, max_len=M)
    x = leaves(dtype, q=q, k=k, v=v, initial_state=init)
    o, final = cosformer_attn(
        **x, max_len=M, output_final_state=True, block_size=C, **kw
    )  # fmt: skip
    for n in range(4):
        a, b = cu[n], cu[n + 1]
        o_n, final_n = cosformer_attn(
            q[:, a:b], k[:, a:b], v[:, a:b], max_len=M, start=int(kw["start"][n]),
            initial_state=init[n : n + 1], output_final_state=True,
        )  # fmt: skip
        assert_close(o[:, a:b], o_n, tol_of(dtype), f"o of sequence {n}")
        assert_close(final[n : n + 1], final_n, tol_of(dtype), f"final of sequence {n}")
    assert torch.equal(final[1], x["initial_state"][1]), "empty sequence changed its state"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M", [10, 100], ids=lambda m: f"M{m}")
def test_cosformer_chunked_calls_equal_one_call(M, dtype):
    """Chunks at odd split points, each starting where the last ended and continuing from
    its final state, equal one call: o, final state and every gradient. The continuation
    also equals the naive over prefix + sequence (the state carries the prefix)."""
    B, T, H, K, V, C = 2, 41, 2, 5, 3, 8
    P = 6
    q, k, v = qkv(B, P + T, H, K, V)
    start = torch.tensor([0, 1_000_000])
    init = cosformer_attn(
        q[:, :P], k[:, :P], v[:, :P], max_len=M, start=start, output_final_state=True
    )[1]
    start = start + P
    x = leaves(dtype, q=q[:, P:], k=k[:, P:], v=v[:, P:], initial_state=init)

    def chunked(q, k, v, initial_state):
        outs, state = [], initial_state
        for a, b in ((0, 7), (7, 23), (23, T)):
            o, state = cosformer_attn(
                q[:, a:b], k[:, a:b], v[:, a:b], max_len=M, start=start + a,
                initial_state=state, output_final_state=True, block_size=C,
            )  # fmt: skip
            outs.append(o)
        return torch.cat(outs, dim=1), state

    out = fwd_bwd(chunked, x)
    one = cos_fast(M, start=start, output_final_state=True, block_size=C)
    ref = fwd_bwd(one, leaves(torch.float64, **x))
    assert_all_close(out, ref, tol_of(dtype), "chunked vs one call")
    full = cosformer_attn_naive(q, k, v, max_len=M, start=start - P)
    assert_close(out["o"], full[:, P:], tol_of(dtype), "continuation vs naive over prefix")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("prefill", [0, 1, 9], ids=lambda p: f"prefill{p}")
def test_cosformer_decode_steps_equal_one_call(prefill, dtype):
    """Prefill, then one `cosformer_step` per token at per-row positions, equals one call."""
    B, T, H, K, V, M = 3, 20, 2, 4, 3, 16
    q, k, v = qkv(B, T, H, K, V)
    start = torch.tensor([0, 11, 1_000_000])
    init = cos_state(B, H, K, V, seed=7)
    o_ref, final_ref = cosformer_attn(
        q, k, v, max_len=M, start=start, initial_state=init, output_final_state=True
    )
    x = leaves(dtype, q=q, k=k, v=v, initial_state=init)
    q, k, v, state = (t.detach() for t in x.values())
    outs = []
    if prefill:
        o, state = cosformer_attn(
            q[:, :prefill], k[:, :prefill], v[:, :prefill], max_len=M, start=start,
            initial_state=state, output_final_state=True, block_size=4,
        )  # fmt: skip
        outs.append(o)
    state = state.clone()
    for t in range(prefill, T):
        o = cosformer_step(
            q[:, t : t + 1], k[:, t : t + 1], v[:, t : t + 1], state, max_len=M,
            position=start + t,
        )  # fmt: skip
        assert o.shape == (B, 1, H, V) and o.dtype == dtype
        outs.append(o)
    assert_close(torch.cat(outs, dim=1), o_ref, tol_of(dtype), "decoded o")
    assert_close(state, final_ref, tol_of(dtype), "decoded state")


@pytest.mark.parametrize(
    ("B", "T", "H", "K", "V", "C", "M", "cu", "eps"),
    [
        pytest.param(2, 7, 2, 3, 2, 4, 20, None, 1e-6, id="B2-T7-C4"),
        pytest.param(1, 9, 2, 3, 2, 4, 4, (0, 3, 3, 4, 9), 0.05, id="varlen-M<T"),
    ],
)
def test_cosformer_gradcheck(B, T, H, K, V, C, M, cu, eps):
    """With M < T some denominators are negative and clamped to eps: o = num / eps there, so
    eps = 0.05 keeps o small enough for finite differences (at 1e-6, o ~ 1e6 and their
    rounding noise, ~1e-4, exceeds gradcheck's atol); no denominator lies near 0.05."""
    N = B if cu is None else len(cu) - 1
    q, k, v = qkv(B, T, H, K, V, seed=3)
    init = cos_state(N, H, K, V, seed=4, max_len=M)
    x = leaves(torch.float64, q=q, k=k, v=v, initial_state=init)
    kw = dict(max_len=M, start=torch.full((N,), 6), output_final_state=True, block_size=C)
    kw["eps"] = eps
    if cu is not None:
        kw["cu_seqlens"] = torch.tensor(cu)

    def fn(q, k, v, s):
        return cosformer_attn(q, k, v, initial_state=s, **kw)

    assert torch.autograd.gradcheck(fn, tuple(x.values()), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize(
    ("T", "K", "V", "C", "M"),
    [
        pytest.param(70, 16, 8, 16, 100, id="T70-K16-V8-M100"),
        pytest.param(37, 5, 7, 16, 12, id="T37-K5-V7-M12"),
    ],
)
def test_cosformer_bf16_no_worse_than_twice_naive(T, K, V, C, M):
    """Against the float64 oracle, the bf16 op's error is at most twice that of the naive
    run in bf16 itself (flash-attention's rule), for o and every gradient."""
    q, k, v = qkv(2, T, 2, K, V)
    start = torch.tensor([5, 123_457])
    low = leaves(torch.bfloat16, q=q, k=k, v=v)
    fast = fwd_bwd(cos_fast(M, start=start, block_size=C), low)
    naive = fwd_bwd(cos_naive(M, start=start), leaves(torch.bfloat16, **low))
    ref = fwd_bwd(cos_naive(M, start=start), leaves(torch.float64, **low), cot_dtype=torch.bfloat16)
    for key in ref:
        if ref[key] is None:
            continue
        err_fast, err_low = rel_err(fast[key], ref[key]), rel_err(naive[key], ref[key])
        assert fast[key].dtype == torch.bfloat16
        assert err_fast <= 2 * err_low, f"{key}: bf16 {err_fast:.3e} > 2x naive's {err_low:.3e}"


# -------------------------------------------------------------------------- NormAttention


def norm_fast(decay, **kw):
    return lambda q, k, v, initial_state=None, norm_weight=None: norm_linear_attn(
        q, k, v, decay, initial_state=initial_state, norm_weight=norm_weight, **kw
    )


def norm_naive(decay, **kw):
    return lambda q, k, v, initial_state=None, norm_weight=None: norm_linear_attn_naive(
        q, k, v, decay, initial_state=initial_state, norm_weight=norm_weight, **kw
    )


DECAYS = [
    pytest.param(None, id="no-decay"),
    pytest.param(decay_rates(3, 0, 4), id="decay-l0"),
    pytest.param(decay_rates(3, 3, 4), id="decay-l3"),
]


def test_norm_linear_normalises_over_all_heads():
    """o = o_raw / sqrt(mean over the token's H·V outputs of o_raw² + eps) · w, o_raw being
    lightning attention with scale 1 (not K**-0.5) and no decay for decay=None."""
    B, T, H, K, V, eps = 2, 9, 3, 4, 5, 1e-3
    q, k, v = qkv(B, T, H, K, V)
    w = randn(H * V, seed=9)
    o_raw, _ = lightning_attn_naive(q, k, v, torch.zeros(H), scale=1.0)
    rms_BT11 = o_raw.pow(2).mean(dim=(-2, -1), keepdim=True).add(eps).sqrt()
    ref = o_raw / rms_BT11 * w.view(H, V)
    for op in (norm_linear_attn, norm_linear_attn_naive):
        o, final = op(q, k, v, None, norm_weight=w, eps=eps)
        assert final is None
        assert_close(o, ref, TOL64, op.__name__)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("weighted", [False, True], ids=["w=None", "w"])
@pytest.mark.parametrize("decay", DECAYS)
def test_norm_linear_matches_naive(decay, weighted, dtype):
    B, T, H, K, V, C = 2, 37, 3, 5, 4, 16
    q, k, v = qkv(B, T, H, K, V)
    xs = dict(q=q, k=k, v=v, initial_state=randn(B, H, K, V, seed=4))
    xs["norm_weight"] = randn(H * V, seed=5) if weighted else None
    out = fwd_bwd(norm_fast(decay, output_final_state=True, block_size=C), leaves(dtype, **xs))
    ref = fwd_bwd(norm_naive(decay, output_final_state=True), leaves(torch.float64, **xs))
    assert out["o"].dtype == dtype
    assert_all_close(out, ref, tol_of(dtype), f"{dtype}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_norm_linear_packed_matches_naive(dtype):
    """Packed sequences, one empty, boundaries off the block grid: all outputs and
    gradients equal the naive's, and the empty sequence passes its state through."""
    cu = (0, 5, 5, 22, 41)
    H, K, V, C = 3, 4, 6, 8
    q, k, v = qkv(1, cu[-1], H, K, V)
    xs = dict(q=q, k=k, v=v, initial_state=randn(4, H, K, V, seed=4))
    xs["norm_weight"] = randn(H * V, seed=5)
    kw = dict(output_final_state=True, cu_seqlens=torch.tensor(cu))
    decay = decay_rates(H, 1, 4)
    x = leaves(dtype, **xs)
    out = fwd_bwd(norm_fast(decay, block_size=C, **kw), x)
    ref = fwd_bwd(norm_naive(decay, **kw), leaves(torch.float64, **xs))
    assert_all_close(out, ref, tol_of(dtype), "packed")
    assert torch.equal(out["final"][1], x["initial_state"][1]), "empty sequence changed its state"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("decay", DECAYS[:2])
def test_norm_linear_chunked_calls_equal_one_call(decay, dtype):
    B, T, H, K, V, C = 2, 41, 3, 5, 3, 8
    q, k, v = qkv(B, T, H, K, V)
    xs = dict(q=q, k=k, v=v, initial_state=randn(B, H, K, V, seed=4))
    xs["norm_weight"] = randn(H * V, seed=5)

    def chunked(q, k, v, initial_state, norm_weight):
        outs, state = [], initial_state
        for a, b in ((0, 7), (7, 23), (23, T)):
            o, state = norm_linear_attn(
                q[:, a:b], k[:, a:b], v[:, a:b], decay, norm_weight=norm_weight,
                initial_state=state, output_final_state=True, block_size=C,
            )  # fmt: skip
            outs.append(o)
        return torch.cat(outs, dim=1), state

    out = fwd_bwd(chunked, leaves(dtype, **xs))
    ref = fwd_bwd(norm_fast(decay, output_final_state=True), leaves(torch.float64, **xs))
    assert_all_close(out, ref, tol_of(dtype), "chunked vs one call")


@pytest.mark.parametrize("decay", [None, torch.tensor([0.5, 0.05])], ids=["no-decay", "decay"])
def test_norm_linear_gradcheck(decay):
    B, T, H, K, V, C = 2, 7, 2, 3, 2, 4
    q, k, v = qkv(B, T, H, K, V, seed=3)
    xs = leaves(
        torch.float64, q=q, k=k, v=v, initial_state=randn(B, H, K, V, seed=4),
        norm_weight=randn(H * V, seed=5),
    )  # fmt: skip

    def fn(q, k, v, s, w):
        return norm_linear_attn(
            q, k, v, decay, norm_weight=w, initial_state=s, output_final_state=True, block_size=C
        )

    assert torch.autograd.gradcheck(fn, tuple(xs.values()), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_norm_linear_bf16_no_worse_than_twice_naive():
    B, T, H, K, V, C = 2, 70, 2, 16, 8, 16
    q, k, v = qkv(B, T, H, K, V)
    xs = dict(q=q, k=k, v=v, initial_state=randn(B, H, K, V, seed=4))
    xs["norm_weight"] = randn(H * V, seed=5)
    decay = decay_rates(H, 1, 4)
    low = leaves(torch.bfloat16, **xs)
    fast = fwd_bwd(norm_fast(decay, output_final_state=True, block_size=C), low)
    naive = fwd_bwd(norm_naive(decay, output_final_state=True), leaves(torch.bfloat16, **low))
    ref = fwd_bwd(
        norm_naive(decay, output_final_state=True),
        leaves(torch.float64, **low),
        cot_dtype=torch.bfloat16,
    )
    for key in ref:
        err_fast, err_low = rel_err(fast[key], ref[key]), rel_err(naive[key], ref[key])
        assert err_fast <= 2 * err_low, f"{key}: bf16 {err_fast:.3e} > 2x naive's {err_low:.3e}"


# ------------------------------------------------------------------------------ bad input


def _t(*shape, dtype=torch.float32):
    return torch.zeros(shape, dtype=dtype)


_Q, _V = _t(1, 8, 2, 4), _t(1, 8, 2, 3)

COS_BAD = [
    pytest.param(dict(max_len=0), "max_len", id="max_len-0"),
    pytest.param(dict(max_len=2.5), "max_len", id="max_len-float"),
    pytest.param(dict(start=-1), "start", id="start-negative"),
    pytest.param(dict(start=1.5), "start", id="start-float"),
    pytest.param(dict(start=torch.tensor([0, 1])), "start", id="start-shape"),
    pytest.param(dict(start=torch.tensor([0.0])), "start", id="start-float-tensor"),
    pytest.param(dict(start=torch.tensor([-3])), "start", id="start-tensor-negative"),
    pytest.param(dict(eps=0.0), "eps", id="eps-0"),
    pytest.param(dict(eps=-1e-6), "eps", id="eps-negative"),
    pytest.param(dict(eps=float("nan")), "eps", id="eps-nan"),
    pytest.param(dict(q=_t(1, 8, 2, 5)), r"\bk\b", id="k-vs-q"),
    pytest.param(dict(q=[[1.0]]), r"\bq\b", id="q-list"),
    pytest.param(dict(cu_seqlens=torch.tensor([0, 7])), "cu_seqlens", id="cu-end"),
]
COS_FAST_BAD = [
    pytest.param(dict(initial_state=_t(1, 2, 4, 3)), "initial_state", id="init-lightning-shape"),
    pytest.param(dict(initial_state=_t(1, 2, 8, 3)), "initial_state", id="init-no-den-column"),
    pytest.param(dict(block_size=0), "block_size", id="block-0"),
]


def _cos_call(op, overrides):
    args = dict(q=_Q, k=_Q, v=_V, max_len=16)
    args.update(overrides)
    return op(args.pop("q"), args.pop("k"), args.pop("v"), **args)


@pytest.mark.parametrize(("overrides", "pattern"), COS_BAD)
@pytest.mark.parametrize("op", [cosformer_attn, cosformer_attn_naive])
def test_cosformer_bad_input_raises_value_error_naming_argument(op, overrides, pattern):
    with pytest.raises(ValueError, match=pattern):
        _cos_call(op, overrides)


@pytest.mark.parametrize(("overrides", "pattern"), COS_FAST_BAD)
def test_cosformer_bad_state_raises_value_error_naming_argument(overrides, pattern):
    with pytest.raises(ValueError, match=pattern):
        _cos_call(cosformer_attn, overrides)


STEP_BAD = [
    pytest.param(dict(position=torch.tensor([0, 1])), "position", id="position-shape"),
    pytest.param(dict(position=[3]), "position", id="position-list"),
    pytest.param(dict(position=torch.tensor([2.0])), "position", id="position-float"),
    pytest.param(dict(state=_t(1, 2, 4, 3)), "state", id="state-lightning-shape"),
    pytest.param(dict(state=_t(1, 2, 8, 4, dtype=torch.float64)), "state", id="state-dtype"),
    pytest.param(dict(q=_t(1, 2, 2, 4), k=_t(1, 2, 2, 4), v=_t(1, 2, 2, 3)), "q", id="T2"),
    pytest.param(dict(max_len=0), "max_len", id="max_len-0"),
    pytest.param(dict(eps=0.0), "eps", id="eps-0"),
]


@pytest.mark.parametrize(("overrides", "pattern"), STEP_BAD)
def test_cosformer_step_bad_input_raises_value_error_naming_argument(overrides, pattern):
    args = dict(q=_t(1, 1, 2, 4), k=_t(1, 1, 2, 4), v=_t(1, 1, 2, 3), state=_t(1, 2, 8, 4))
    args.update(max_len=16, position=torch.tensor([5]))
    args.update(overrides)
    with pytest.raises(ValueError, match=pattern):
        cosformer_step(args.pop("q"), args.pop("k"), args.pop("v"), args.pop("state"), **args)


NORM_BAD = [
    pytest.param(dict(eps=0.0), "eps", id="eps-0"),
    pytest.param(dict(eps=-1.0), "eps", id="eps-negative"),
    pytest.param(dict(norm_weight=_t(3)), "norm_weight", id="weight-per-head"),
    pytest.param(
        dict(norm_weight=torch.ones(6, dtype=torch.int64)), "norm_weight", id="weight-int"
    ),
    pytest.param(dict(initial_state=_t(1, 2, 4, 4)), "initial_state", id="init-shape"),
    pytest.param(dict(decay=torch.rand(3)), "decay", id="decay-shape"),
    pytest.param(dict(decay=torch.tensor([0.1, -0.1])), "decay", id="decay-negative"),
    pytest.param(dict(q=_t(1, 8, 3, 4)), r"\bk\b", id="k-vs-q"),
]


@pytest.mark.parametrize(("overrides", "pattern"), NORM_BAD)
@pytest.mark.parametrize("op", [norm_linear_attn, norm_linear_attn_naive])
def test_norm_linear_bad_input_raises_value_error_naming_argument(op, overrides, pattern):
    args = dict(q=_Q, k=_Q, v=_V, decay=None)
    args.update(overrides)
    with pytest.raises(ValueError, match=pattern):
        op(args.pop("q"), args.pop("k"), args.pop("v"), args.pop("decay"), **args)


def test_good_inputs_pass_validation():
    """The baselines the bad inputs derive from are valid, so each bad case fails for its
    own reason."""
    for op in (cosformer_attn, cosformer_attn_naive):
        o = _cos_call(op, dict(start=torch.tensor([3]), eps=1e-3))
        assert (o[0] if op is cosformer_attn else o).shape == (1, 8, 2, 3)
    o = cosformer_step(
        _t(1, 1, 2, 4), _t(1, 1, 2, 4), _t(1, 1, 2, 3), _t(1, 2, 8, 4), max_len=16,
        position=torch.tensor([5]),
    )  # fmt: skip
    assert o.shape == (1, 1, 2, 3)
    for op in (norm_linear_attn, norm_linear_attn_naive):
        assert op(_Q, _Q, _V, None, norm_weight=_t(6))[0].shape == (1, 8, 2, 3)
