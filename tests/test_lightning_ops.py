"""Lightning-attention ops: the tiled `lightning_attn` against its two references.

`lightning_attn_naive` (quadratic form, computed in the inputs' dtype: float64 is the
oracle) and `lightning_attn_recurrent` (token loop) are built on different algorithms;
a loop written here from ARCHITECTURE.md's formula pins the semantics all three share
(λ = exp(−s), decay before the update, default scale K**-0.5). Every comparison checks
the output, the final state and every gradient (q, k, v, initial_state) under random
cotangents on both outputs.

# B batch, T tokens, H heads, K/V head dims, C block, N sequences, G blocks per group
"""

from __future__ import annotations

import functools
import itertools
import math

import pytest
import torch
from conftest import TRITON_INTERPRETED, assert_close, rel_err, requires_triton, triton_device
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lightlong.ops.lightning.api as api_module
from lightlong.ops import (
    alibi_slopes,
    decay_rates,
    lightning_attn,
    lightning_attn_naive,
    lightning_attn_recurrent,
)
from lightlong.ops.lightning._inputs import TRITON_BLOCK_SIZES

TOL64 = 1e-10  # float64 op vs float64 reference
TOL32 = 1e-5  # float32 op vs float64 reference
OPS = [
    pytest.param(lightning_attn, id="chunk"),
    pytest.param(lightning_attn_naive, id="naive"),
    pytest.param(lightning_attn_recurrent, id="recurrent"),
]
KEYS = ("o", "final", "dq", "dk", "dv", "dinit")

# The tiled op's backends: "triton" runs on CUDA, or on the CPU interpreter under
# TRITON_INTERPRET=1 (`make test-triton-interpret`), and is skipped otherwise.
TRITON = pytest.param("triton", marks=[pytest.mark.triton, requires_triton])
BACKENDS = [pytest.param("torch"), TRITON]
skip_interpreted = pytest.mark.skipif(TRITON_INTERPRETED, reason="too slow on the interpreter")


def attn(backend: str):
    """`lightning_attn` on `backend`, called like it with CPU tensors: the inputs move to the
    backend's device and the outputs come back, differentiably. The kernels take block sizes
    16 ... 128 only; smaller ones become 16 (the result does not depend on the block size)."""
    if backend == "torch":
        return lightning_attn
    device = triton_device()

    def op(q, k, v, decay, *, initial_state=None, cu_seqlens=None, block_size=None, **kw):
        def to(x):
            return None if x is None else x.to(device)

        if block_size is not None and block_size not in TRITON_BLOCK_SIZES:
            block_size = 16
        o, final = lightning_attn(
            to(q), to(k), to(v), to(decay), initial_state=to(initial_state),
            cu_seqlens=to(cu_seqlens), block_size=block_size, backend="triton", **kw,
        )  # fmt: skip
        return o.cpu(), None if final is None else final.cpu()

    return op


TORCH_OPS = (lightning_attn, lightning_attn_naive, lightning_attn_recurrent)
OPS_AND_TRITON = [*OPS, pytest.param(attn("triton"), id="triton", marks=TRITON.marks)]


def dtype_on(backend: str, dtype: torch.dtype) -> torch.dtype:
    """The kernels have no float64: their variant of a float64 test runs in float32."""
    return torch.float32 if backend == "triton" and dtype == torch.float64 else dtype


def tol_of(dtype: torch.dtype) -> float:
    return TOL64 if dtype == torch.float64 else TOL32


# Rates spanning MiniMax's range (~0.9 down to ~4e-8), plus fast ones whose block-wide
# factors λ^C fall below float32's range and are flushed to 0 by the tiled path.
_RATES = (0.3, 0.02, 1.5, 1e-4, 0.7, 5e-3, 3.0, 4e-8)


def make_decay(H: int) -> torch.Tensor:
    return torch.tensor([_RATES[h % len(_RATES)] for h in range(H)], dtype=torch.float32)


def make_inputs(B, T, H, K, V, *, dtype=torch.float64, init=False, N=None, seed=0):
    """Leaf tensors q, k [B, T, H, K], v [B, T, H, V], initial state [N, H, K, V] or None.

    Values are drawn in float64 and rounded to dtype; the state is float32 (float64 for
    float64 inputs), as the API specifies.
    """
    g = torch.Generator().manual_seed(seed)
    state_dtype = torch.float64 if dtype == torch.float64 else torch.float32

    def leaf(shape, dt):
        return torch.randn(shape, generator=g, dtype=torch.float64).to(dt).requires_grad_()

    q = leaf((B, T, H, K), dtype)
    k = leaf((B, T, H, K), dtype)
    v = leaf((B, T, H, V), dtype)
    s = leaf((B if N is None else N, H, K, V), state_dtype) if init else None
    return q, k, v, s


def upcast(*xs):
    """float64 leaf copies of the same values (the reference's inputs)."""
    return tuple(None if x is None else x.detach().double().requires_grad_() for x in xs)


def call(op, decay, **kw):
    """fn(q, k, v, s) -> (o, final) for `fwd_bwd`."""
    return lambda q, k, v, s: op(q, k, v, decay, initial_state=s, **kw)


def fwd_bwd(fn, q, k, v, s, *, cot_dtype=None, seed=1) -> dict:
    """Runs fn and differentiates it under random cotangents for o and (if returned) final.

    Cotangents are rounded through cot_dtype (the lowest precision under comparison), so
    an op and its float64 reference are differentiated with identical cotangents.
    """
    o, final = fn(q, k, v, s)
    g = torch.Generator().manual_seed(seed)
    outs = [o] if final is None else [o, final]
    cots = [
        torch.randn(x.shape, generator=g, dtype=torch.float64).to(cot_dtype or q.dtype).to(x.dtype)
        for x in outs
    ]
    inputs = [x for x in (q, k, v, s) if x is not None]
    grads = torch.autograd.grad(outs, inputs, cots, materialize_grads=True)
    return {
        "cotangents": cots,
        "o": o,
        "final": final,
        "dq": grads[0],
        "dk": grads[1],
        "dv": grads[2],
        "dinit": grads[3] if s is not None else None,
    }


def assert_all_close(actual: dict, ref: dict, tol: float, where: str) -> None:
    for key in KEYS:
        assert_close(actual[key], ref[key], tol, f"{where}: {key}")


def definition(q, k, v, decay, scale, init):
    """ARCHITECTURE.md's recurrence, token by token, in float64; per batch row and head.

    S_t = exp(−s_h) · S_{t−1} + k_tᵀ v_t,   o_t = scale · q_t S_t
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    q, k, v = (x.detach().double() for x in (q, k, v))
    o = torch.zeros(B, T, H, V, dtype=torch.float64)
    final = torch.zeros(B, H, K, V, dtype=torch.float64)
    for b, h in itertools.product(range(B), range(H)):
        lam = math.exp(-float(decay[h]))
        S = torch.zeros(K, V, dtype=torch.float64) if init is None else init[b, h].double()
        for t in range(T):
            S = lam * S + torch.outer(k[b, t, h], v[b, t, h])
            o[b, t, h] = scale * (q[b, t, h] @ S)
        final[b, h] = S
    return o, final


# --------------------------------------------------------------------------- helpers


def test_assert_close_reports_error_and_rejects_nan():
    ref = torch.ones(4, dtype=torch.float64)
    assert assert_close(ref + 1e-12, ref, 1e-10, "tiny") < 1e-10
    with pytest.raises(AssertionError, match=r"big: relative error 5\.000e-01 exceeds"):
        assert_close(ref * 1.5, ref, 1e-3, "big")
    with pytest.raises(AssertionError, match="nan"):
        assert_close(torch.full((4,), float("nan")), ref, 1e-3, "nan")
    with pytest.raises(AssertionError, match="None"):
        assert_close(None, ref, 1e-3, "missing")
    with pytest.raises(AssertionError, match="shape"):
        assert_close(ref[:3], ref, 1e-3, "shape")
    assert rel_err(torch.zeros(3), torch.zeros(3)) == 0.0


# --------------------------------------------------------------- definition of the op


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("scale", [None, 1.0, 0.25], ids=["scale=None", "scale=1", "scale=.25"])
def test_ops_match_definition(op, scale):
    q, k, v, s = make_inputs(2, 9, 2, 3, 4, init=True)
    decay = torch.tensor([0.4, 0.0])
    o, final = op(q, k, v, decay, scale=scale, initial_state=s, output_final_state=True)
    o_ref, final_ref = definition(q, k, v, decay, 3**-0.5 if scale is None else scale, s)
    assert_close(o, o_ref, 1e-12, "o")
    assert_close(final, final_ref, 1e-12, "final")


# ------------------------------------------------------------- chunk vs naive, shapes

# (B, T, H, K, V, block_size)
SHAPES = [
    pytest.param(1, 1, 1, 4, 4, 16, id="T=1"),
    pytest.param(2, 15, 3, 8, 8, 16, id="T=C-1"),
    pytest.param(1, 16, 3, 8, 8, 16, id="T=C"),
    pytest.param(2, 17, 1, 8, 8, 16, id="T=C+1-H1"),
    pytest.param(1, 53, 3, 8, 8, 16, id="T=3C+5"),
    pytest.param(2, 29, 3, 5, 7, 4, id="K5-V7-C4"),
    pytest.param(1, 70, 2, 24, 5, 64, id="K24-V5-C64"),
    pytest.param(2, 197, 2, 7, 24, None, id="K7-V24-T=3C+5-Cdefault"),
    pytest.param(1, 40, 3, 6, 3, 1, id="C1"),
]


def _chunk_vs_naive(B, T, H, K, V, C, init, final, dtype, tol, backend="torch"):
    q, k, v, s = make_inputs(B, T, H, K, V, dtype=dtype, init=init)
    decay = make_decay(H)
    out = fwd_bwd(call(attn(backend), decay, output_final_state=final, block_size=C), q, k, v, s)
    ref = fwd_bwd(
        call(lightning_attn_naive, decay, output_final_state=final),
        *upcast(q, k, v, s),
        cot_dtype=dtype,
    )
    assert out["o"].dtype == dtype and out["o"].shape == (B, T, H, V)
    if final:
        assert out["final"].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        assert out["final"].shape == (B, H, K, V)
    else:
        assert out["final"] is None
    assert_all_close(out, ref, tol, f"{backend} {dtype} vs naive float64")


@pytest.mark.parametrize("final", [False, True], ids=["no-final", "final"])
@pytest.mark.parametrize("init", [False, True], ids=["no-init", "init"])
@pytest.mark.parametrize(("B", "T", "H", "K", "V", "C"), SHAPES)
def test_chunk_matches_naive_float64(B, T, H, K, V, C, init, final):
    _chunk_vs_naive(B, T, H, K, V, C, init, final, torch.float64, TOL64)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("final", [False, True], ids=["no-final", "final"])
@pytest.mark.parametrize("init", [False, True], ids=["no-init", "init"])
@pytest.mark.parametrize(("B", "T", "H", "K", "V", "C"), SHAPES)
def test_chunk_matches_naive_float32(B, T, H, K, V, C, init, final, backend):
    _chunk_vs_naive(B, T, H, K, V, C, init, final, torch.float32, TOL32, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_extreme_decays_match_naive(dtype, backend):
    """Rates whose block factors underflow (flushed to 0) next to rates that barely decay."""
    dtype = dtype_on(backend, dtype)
    q, k, v, s = make_inputs(2, 150, 4, 8, 8, dtype=dtype, init=True)
    decay = torch.tensor([60.0, 1e-9, 0.0, 8.0])
    out = fwd_bwd(call(attn(backend), decay, output_final_state=True), q, k, v, s)
    ref = fwd_bwd(
        call(lightning_attn_naive, decay, output_final_state=True),
        *upcast(q, k, v, s),
        cot_dtype=dtype,
    )
    assert_all_close(out, ref, tol_of(dtype), f"{backend} {dtype}")


@pytest.mark.parametrize("G", [1, 2, 3])
def test_chunk_matches_naive_across_groups(G, monkeypatch):
    """Blocks are processed G at a time; at test sizes one group usually holds every block,
    so shrink the group budget to exercise the state hand-off between groups, forward and
    backward, with packed sequences whose boundaries fall inside blocks and groups."""
    H, K, V, C = 2, 5, 6, 4
    monkeypatch.setattr(api_module, "group_blocks", lambda *shape: G)
    plans = []
    make_plan = api_module.make_plan
    monkeypatch.setattr(
        api_module, "make_plan", lambda *a, **kw: plans.append(make_plan(*a, **kw)) or plans[-1]
    )
    lengths = (6, 13, 0, 1, 21)
    cu = torch.tensor([0, *itertools.accumulate(lengths)])
    q, k, v, s = make_inputs(1, sum(lengths), H, K, V, init=True, N=len(lengths))
    decay = make_decay(H)
    kw = dict(output_final_state=True, cu_seqlens=cu)
    out = fwd_bwd(call(lightning_attn, decay, block_size=C, **kw), q, k, v, s)
    ref = fwd_bwd(call(lightning_attn_naive, decay, **kw), *upcast(q, k, v, s))
    assert len(plans[-1].groups) > 1, "the group budget did not split the blocks into groups"
    assert max(g.m1 - g.m0 for g in plans[-1].groups) == G
    assert_all_close(out, ref, TOL64, f"G={G}")


DEFAULT_GROUP_LENGTHS = [
    pytest.param((813,), id="one-sequence"),
    # blocks restart at each sequence: 4 + 1 + 6 + 5 blocks in groups of 3, so sequences
    # start and end inside groups (and blocks), and the last two span three groups each
    pytest.param((200, 1, 350, 262), id="packed"),
]


@pytest.fixture
def one_thread():
    """torch at one thread for the test (the group budget is per thread), restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("lengths", DEFAULT_GROUP_LENGTHS)
def test_chunk_matches_naive_across_default_groups(lengths, one_thread):
    """The group budget as shipped (nothing patched, one thread): these heads make a group
    3 blocks of 64, so 813 tokens (12 blocks and a 45-token tail) take five groups;
    o, final states and every gradient against the float64 naive reference."""
    H, K, V, C = 8, 64, 32, api_module.DEFAULT_BLOCK_SIZE
    group_tokens = api_module.group_blocks(H, K, V, C) * C
    assert group_tokens == 3 * C, group_tokens
    T = sum(lengths)
    assert T % C and math.ceil(T / group_tokens) >= 4, (T, group_tokens)  # tail; 4+ groups
    cu = torch.tensor([0, *itertools.accumulate(lengths)])
    q, k, v, s = make_inputs(1, T, H, K, V, init=True, N=len(lengths), seed=len(lengths))
    decay = make_decay(H)
    kw = dict(output_final_state=True, cu_seqlens=cu)
    out = fwd_bwd(call(lightning_attn, decay, **kw), q, k, v, s)
    ref = fwd_bwd(call(lightning_attn_naive, decay, **kw), *upcast(q, k, v, s))
    assert_all_close(out, ref, TOL64, f"default groups of {group_tokens} tokens")


def test_block_size_does_not_change_result():
    q, k, v, s = make_inputs(2, 45, 2, 6, 5, init=True)
    decay = make_decay(2)
    outs = {
        C: fwd_bwd(call(lightning_attn, decay, output_final_state=True, block_size=C), q, k, v, s)
        for C in (1, 3, 8, 16, 45, 64, None)
    }
    for C, out in outs.items():
        assert_all_close(out, outs[None], 1e-12, f"block_size={C} vs default")


@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_rows_match_single_row_calls(backend):
    q, k, v, s = make_inputs(3, 37, 2, 5, 6, dtype=dtype_on(backend, torch.float64), init=True)
    decay = make_decay(2)
    op = attn(backend)
    o, final = op(q, k, v, decay, initial_state=s, output_final_state=True)
    for b in range(3):
        o_b, final_b = op(
            q[b : b + 1],
            k[b : b + 1],
            v[b : b + 1],
            decay,
            initial_state=s[b : b + 1],
            output_final_state=True,
        )
        assert_close(o[b : b + 1], o_b, 1e-12, f"row {b} o")
        assert_close(final[b : b + 1], final_b, 1e-12, f"row {b} final")


@pytest.mark.parametrize("backend", BACKENDS)
def test_noncontiguous_inputs_and_cotangents(backend):
    """Views in other layouts (heads-first storage, a slice of a wider head dim) give the
    same values and gradients as contiguous copies."""
    B, T, H, K, V = 2, 23, 3, 4, 5
    g = torch.Generator().manual_seed(3)
    dtype = dtype_on(backend, torch.float64)
    device = triton_device() if backend == "triton" else "cpu"
    op = functools.partial(lightning_attn, backend=backend)

    def strided(D):
        base = torch.randn(B, H, T, D + 3, generator=g, dtype=torch.float64).to(device, dtype)
        return base.transpose(1, 2)[..., 1 : D + 1].requires_grad_()

    q, k, v = strided(K), strided(K), strided(V)
    assert not q.is_contiguous()
    decay = make_decay(H).to(device)
    o, final = op(q, k, v, decay, output_final_state=True, block_size=16)
    do = torch.randn(B, H, T, V, generator=g, dtype=torch.float64).to(device, dtype)
    do = do.transpose(1, 2)
    grads = torch.autograd.grad([o, final], [q, k, v], [do, torch.ones_like(final)])

    qc, kc, vc = (x.detach().contiguous().requires_grad_() for x in (q, k, v))
    oc, finalc = op(qc, kc, vc, decay, output_final_state=True, block_size=16)
    gradsc = torch.autograd.grad(
        [oc, finalc], [qc, kc, vc], [do.contiguous(), torch.ones_like(finalc)]
    )
    assert_close(o, oc, 1e-14, "o")
    assert_close(final, finalc, 1e-14, "final")
    for name, a, b in zip(("dq", "dk", "dv"), grads, gradsc, strict=True):
        assert_close(a, b, 1e-14, name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_of_sum_and_of_final_state_alone(backend):
    """Cotangents torch builds itself: expanded ones (o.sum()), and none reaching o at all."""
    dtype = dtype_on(backend, torch.float64)
    q, k, v, s = make_inputs(2, 30, 2, 5, 4, dtype=dtype, init=True)
    decay = make_decay(2)
    for name, pick in (("o.sum()", lambda o, f: o.sum()), ("final.sum()", lambda o, f: f.sum())):
        grads = [
            torch.autograd.grad(
                pick(*op(*xs[:3], decay, initial_state=xs[3], output_final_state=True)),
                xs,
                materialize_grads=True,
            )
            for op, xs in (
                (attn(backend), (q, k, v, s)),
                (lightning_attn_naive, upcast(q, k, v, s)),
            )
        ]
        for key, a, b in zip(("dq", "dk", "dv", "dinit"), *grads, strict=True):
            assert_close(a, b, tol_of(dtype), f"{name}: {key}")


# ------------------------------------------------------------------ recurrent vs naive


@pytest.mark.parametrize(
    ("B", "T", "H", "K", "V", "cu"),
    [
        pytest.param(1, 1, 1, 3, 3, None, id="T=1"),
        pytest.param(2, 21, 3, 5, 7, None, id="B2-K5-V7"),
        pytest.param(1, 30, 2, 4, 6, (0, 7, 7, 8, 30), id="varlen"),
    ],
)
def test_recurrent_matches_naive(B, T, H, K, V, cu):
    N = B if cu is None else len(cu) - 1
    q, k, v, s = make_inputs(B, T, H, K, V, init=True, N=N)
    decay = make_decay(H)
    kw = dict(output_final_state=True, cu_seqlens=None if cu is None else torch.tensor(cu))
    out = fwd_bwd(call(lightning_attn_recurrent, decay, **kw), q, k, v, s)
    ref = fwd_bwd(call(lightning_attn_naive, decay, **kw), q, k, v, s)
    assert_all_close(out, ref, TOL64, "recurrent vs naive")


# ------------------------------------------------------------------------- hypothesis


@st.composite
def _cases(draw):
    H = draw(st.integers(1, 3))
    K = draw(st.integers(1, 9))
    V = draw(st.integers(1, 9))
    if draw(st.booleans()):
        lengths = draw(st.lists(st.integers(0, 40), min_size=1, max_size=4))
        lengths[0] += 1 if sum(lengths) == 0 else 0
        B, T = 1, sum(lengths)
        cu = [0, *itertools.accumulate(lengths)]
    else:
        B, T, cu = draw(st.integers(1, 2)), draw(st.integers(1, 70)), None
    return dict(
        B=B,
        T=T,
        H=H,
        K=K,
        V=V,
        cu=cu,
        C=draw(st.sampled_from([1, 2, 3, 5, 8, 16, None])),
        decay=draw(st.lists(st.floats(0.0, 4.0, width=32), min_size=H, max_size=H)),
        scale=draw(st.sampled_from([None, 1.0, 0.37])),
        init=draw(st.booleans()),
        final=draw(st.booleans()),
        seed=draw(st.integers(0, 2**16)),
    )


def _check_case(case: dict, backend: str = "torch") -> None:
    N = case["B"] if case["cu"] is None else len(case["cu"]) - 1
    shape = (case[d] for d in "BTHKV")
    dtype = dtype_on(backend, torch.float64)
    q, k, v, s = make_inputs(*shape, dtype=dtype, init=case["init"], N=N, seed=case["seed"])
    decay = torch.tensor(case["decay"], dtype=torch.float32)
    kw = dict(
        scale=case["scale"],
        output_final_state=case["final"],
        cu_seqlens=None if case["cu"] is None else torch.tensor(case["cu"]),
    )
    out = fwd_bwd(call(attn(backend), decay, block_size=case["C"], **kw), q, k, v, s)
    ref = fwd_bwd(call(lightning_attn_naive, decay, **kw), *upcast(q, k, v, s), cot_dtype=dtype)
    assert_all_close(out, ref, tol_of(dtype), f"{backend} {case}")


_HYPOTHESIS = dict(
    derandomize=True, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=25, **_HYPOTHESIS)
@given(case=_cases())
def test_chunk_matches_naive_random_shapes(case, backend):
    _check_case(case, backend)


@pytest.mark.slow
@settings(max_examples=500, **_HYPOTHESIS)
@given(case=_cases())
def test_chunk_matches_naive_random_shapes_exhaustive(case):
    _check_case(case)


@pytest.mark.slow
@pytest.mark.parametrize("C", [1, 4, 16])
def test_chunk_matches_naive_every_length(C):
    """Every T from 1 to 3C + 6 (every position of the tail block), fp64 and fp32."""
    decay = make_decay(3)
    for T, dtype in itertools.product(range(1, 3 * C + 7), (torch.float64, torch.float32)):
        q, k, v, s = make_inputs(2, T, 3, 5, 7, dtype=dtype, init=True, seed=T)
        out = fwd_bwd(
            call(lightning_attn, decay, output_final_state=True, block_size=C), q, k, v, s
        )
        ref = fwd_bwd(
            call(lightning_attn_naive, decay, output_final_state=True),
            *upcast(q, k, v, s),
            cot_dtype=dtype,
        )
        assert_all_close(out, ref, TOL64 if dtype == torch.float64 else TOL32, f"T={T} {dtype}")


# ----------------------------------------------------------------------------- varlen

LENGTHS = (5, 37, 0, 1, 20)  # block 16: boundaries inside blocks, an empty and a 1-token one
VARLEN_C = 16


def per_sequence(op, decay, offsets, **kw):
    """fn(q, k, v, s): one call of op per sequence, outputs concatenated."""

    def fn(q, k, v, s):
        outs, finals = [], []
        for n, (a, b) in enumerate(itertools.pairwise(offsets)):
            o, final = op(
                q[:, a:b],
                k[:, a:b],
                v[:, a:b],
                decay,
                initial_state=None if s is None else s[n : n + 1],
                output_final_state=True,
                **kw,
            )
            outs.append(o)
            finals.append(final)
        return torch.cat(outs, dim=1), torch.cat(finals)

    return fn


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("init", [False, True], ids=["no-init", "init"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_varlen_matches_per_sequence_calls(dtype, init, backend):
    dtype = dtype_on(backend, dtype)
    offsets = [0, *itertools.accumulate(LENGTHS)]
    cu = torch.tensor(offsets)
    H = 3
    q, k, v, s = make_inputs(1, offsets[-1], H, 6, 5, dtype=dtype, init=init, N=len(LENGTHS))
    decay = make_decay(H)
    op = attn(backend)
    packed = fwd_bwd(
        call(op, decay, output_final_state=True, cu_seqlens=cu, block_size=VARLEN_C),
        *(q, k, v, s),
    )
    alone = fwd_bwd(per_sequence(op, decay, offsets, block_size=VARLEN_C), q, k, v, s)
    naive = fwd_bwd(
        call(lightning_attn_naive, decay, output_final_state=True, cu_seqlens=cu),
        *upcast(q, k, v, s),
        cot_dtype=dtype,
    )
    fp64 = dtype == torch.float64
    assert_all_close(packed, alone, 1e-12 if fp64 else 1e-6, "packed vs per-sequence chunk")
    assert_all_close(packed, naive, TOL64 if fp64 else TOL32, "packed chunk vs naive float64")


def test_varlen_int32_offsets_accepted():
    offsets = [0, *itertools.accumulate(LENGTHS)]
    q, k, v, _ = make_inputs(1, offsets[-1], 2, 4, 4)
    decay = make_decay(2)
    o64, f64 = lightning_attn(
        q, k, v, decay, cu_seqlens=torch.tensor(offsets), output_final_state=True
    )
    o32, f32 = lightning_attn(
        q, k, v, decay, cu_seqlens=torch.tensor(offsets, dtype=torch.int32), output_final_state=True
    )
    assert torch.equal(o64, o32) and torch.equal(f64, f32)


@pytest.mark.parametrize("op", OPS_AND_TRITON)
def test_varlen_empty_sequence_passes_state_through(op):
    """An empty sequence's final state is its initial state; so is the gradient."""
    offsets = [0, 4, 4, 9]
    dtype = torch.float64 if op in TORCH_OPS else torch.float32
    q, k, v, s = make_inputs(1, 9, 2, 3, 4, dtype=dtype, init=True, N=3)
    out = fwd_bwd(
        call(op, make_decay(2), output_final_state=True, cu_seqlens=torch.tensor(offsets)),
        *(q, k, v, s),
    )
    assert torch.equal(out["final"][1], s[1].detach())
    _, dfinal = out["cotangents"]
    assert torch.equal(out["dinit"][1], dfinal[1])


PERTURB_LENGTHS = (5, 37, 1, 20)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("changed", range(len(PERTURB_LENGTHS)), ids=lambda n: f"perturb-seq{n}")
def test_varlen_no_state_leaks_between_sequences(changed, backend):
    """Changing one sequence's tokens and initial state leaves every other sequence's
    outputs and final state bit-identical."""
    offsets = [0, *itertools.accumulate(PERTURB_LENGTHS)]
    cu = torch.tensor(offsets)
    dtype = dtype_on(backend, torch.float64)
    inputs = make_inputs(1, offsets[-1], 2, 6, 5, dtype=dtype, init=True, N=4)
    q, k, v, s = (x.detach() for x in inputs)
    decay = make_decay(2)
    a, b = offsets[changed], offsets[changed + 1]
    q2, k2, v2, s2 = (x.clone() for x in (q, k, v, s))
    for x in (q2, k2, v2):
        x[:, a:b] += 10 * torch.randn_like(x[:, a:b])
    s2[changed] += 10
    kw = dict(output_final_state=True, cu_seqlens=cu, block_size=VARLEN_C)
    o, final = attn(backend)(q, k, v, decay, initial_state=s, **kw)
    o2, final2 = attn(backend)(q2, k2, v2, decay, initial_state=s2, **kw)
    assert not torch.equal(o[:, a:b], o2[:, a:b]), "the perturbation did not change its sequence"
    for n, (a_n, b_n) in enumerate(itertools.pairwise(offsets)):
        if n != changed:
            assert torch.equal(o[:, a_n:b_n], o2[:, a_n:b_n]), f"sequence {n}'s outputs changed"
            assert torch.equal(final[n], final2[n]), f"sequence {n}'s final state changed"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    ("layout", "poisoned"),
    [("packed", 0), ("packed", 1), ("packed", 2), ("batch", 0), ("batch", 1)],
    ids=lambda x: str(x),
)
def test_nonfinite_values_stay_in_their_sequence(layout, poisoned, backend):
    """NaN in one packed document or one batch row must not reach any other sequence's
    outputs or gradients (sequences end inside a block, so their last block is padded)."""
    if layout == "packed":
        offsets, B = [0, *itertools.accumulate((5, 37, 20))], 1
        cu = torch.tensor(offsets)
    else:
        offsets, B, cu = [0, 20, 40], 2, None  # T = 20: rows end inside a 16-token block
    dtype = dtype_on(backend, torch.float64)
    q, k, v = (x.detach() for x in make_inputs(B, offsets[-1] // B, 2, 4, 4, dtype=dtype)[:3])
    flat = [x.view(B * x.shape[1], 2, 4) for x in (q, k, v)]  # [B·T, H, D] views
    a, b = offsets[poisoned], offsets[poisoned + 1]
    for x in flat:
        x[a:b] = float("nan")
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    o, _ = attn(backend)(q, k, v, make_decay(2), cu_seqlens=cu, block_size=VARLEN_C)
    do = torch.ones_like(o)
    do.view(-1, 2, 4)[a:b] = 0
    dq, dk, dv = torch.autograd.grad(o, (q, k, v), do)
    for n, (a_n, b_n) in enumerate(itertools.pairwise(offsets)):
        if n == poisoned:
            continue
        for name, x in (("o", o), ("dq", dq), ("dk", dk), ("dv", dv)):
            bad = (~torch.isfinite(x.reshape(-1, 2, 4)[a_n:b_n])).any(dim=(1, 2))
            assert not bad.any(), (
                f"NaN in {layout} sequence {poisoned} reached {name} of sequence {n} at "
                f"tokens {(bad.nonzero().flatten() + a_n).tolist()}"
            )


@pytest.mark.parametrize("backend", BACKENDS)
def test_varlen_no_gradient_leaks_between_sequences(backend):
    """Cotangents on one sequence only: every other sequence's gradients are exactly 0."""
    offsets = [0, *itertools.accumulate(PERTURB_LENGTHS)]
    dtype = dtype_on(backend, torch.float64)
    q, k, v, s = make_inputs(1, offsets[-1], 2, 6, 5, dtype=dtype, init=True, N=4)
    o, final = attn(backend)(
        q,
        k,
        v,
        make_decay(2),
        initial_state=s,
        output_final_state=True,
        cu_seqlens=torch.tensor(offsets),
        block_size=VARLEN_C,
    )
    a, b = offsets[1], offsets[2]
    do = torch.zeros_like(o)
    do[:, a:b] = torch.randn_like(do[:, a:b])
    dfinal = torch.zeros_like(final)
    dfinal[1] = torch.randn_like(dfinal[1])
    dq, dk, dv, ds = torch.autograd.grad([o, final], [q, k, v, s], [do, dfinal])
    for x, name in ((dq, "dq"), (dk, "dk"), (dv, "dv")):
        outside = torch.cat([x[:, :a], x[:, b:]], dim=1)
        assert torch.count_nonzero(outside) == 0, f"{name} nonzero outside sequence 1"
        assert torch.count_nonzero(x[:, a:b]) > 0
    assert torch.count_nonzero(ds[[0, 2, 3]]) == 0, "dinit nonzero for other sequences"


# --------------------------------------------------------------------------- chaining


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("split", [1, 15, 16, 17, 33, 47], ids=lambda t: f"split@{t}")
def test_chained_calls_equal_one_call(split, backend):
    """[0, split) then [split, T) through final_state -> initial_state equals one call:
    outputs, final state and every gradient (through the chained state too)."""
    T, C = 48, 16
    dtype = dtype_on(backend, torch.float64)
    q, k, v, s = make_inputs(2, T, 2, 5, 6, dtype=dtype, init=True)
    decay = make_decay(2)
    op = attn(backend)

    def chained(q, k, v, s):
        kw = dict(output_final_state=True, block_size=C)
        o1, s1 = op(q[:, :split], k[:, :split], v[:, :split], decay, initial_state=s, **kw)
        o2, s2 = op(q[:, split:], k[:, split:], v[:, split:], decay, initial_state=s1, **kw)
        return torch.cat([o1, o2], dim=1), s2

    out = fwd_bwd(chained, q, k, v, s)
    ref = fwd_bwd(call(op, decay, output_final_state=True, block_size=C), q, k, v, s)
    assert_all_close(out, ref, 1e-12 if dtype == torch.float64 else 1e-6, f"split at {split}")


# ----------------------------------------------------------------------------- decode


@pytest.mark.parametrize(
    "step_op", [lightning_attn_recurrent, lightning_attn], ids=["recurrent", "chunk"]
)
@pytest.mark.parametrize("prefill", [0, 1, 8, 19], ids=lambda t: f"prefill{t}")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_decode_steps_match_one_forward(dtype, prefill, step_op):
    """Prefill with the tiled op, then T = 1 steps from the state, equals one forward."""
    B, T, H, K, V, C = 2, 32, 3, 6, 5, 8
    q, k, v, s = (x.detach() for x in make_inputs(B, T, H, K, V, dtype=dtype, init=True))
    decay = make_decay(H)
    o_ref, final_ref = lightning_attn(
        *upcast(q, k, v), decay, initial_state=s.double(), output_final_state=True, block_size=C
    )
    state, outs = s, []
    if prefill:
        o, state = lightning_attn(
            q[:, :prefill],
            k[:, :prefill],
            v[:, :prefill],
            decay,
            initial_state=state,
            output_final_state=True,
            block_size=C,
        )
        outs.append(o)
    for t in range(prefill, T):
        o, state = step_op(
            q[:, t : t + 1],
            k[:, t : t + 1],
            v[:, t : t + 1],
            decay,
            initial_state=state,
            output_final_state=True,
        )
        assert o.shape == (B, 1, H, V) and o.dtype == dtype
        assert state.dtype == s.dtype
        outs.append(o)
    tol = TOL64 if dtype == torch.float64 else TOL32
    assert_close(torch.cat(outs, dim=1), o_ref, tol, "decoded o")
    assert_close(state, final_ref, tol, "decoded final state")


# ---------------------------------------------------------------------------- gradcheck


@pytest.mark.parametrize(
    ("B", "T", "H", "K", "V", "C", "cu"),
    [
        pytest.param(2, 7, 2, 3, 2, 4, None, id="B2-T7-C4"),
        pytest.param(1, 9, 2, 2, 3, 4, (0, 3, 3, 4, 9), id="varlen-C4"),
        pytest.param(1, 1, 1, 2, 2, 16, None, id="T1"),
    ],
)
def test_gradcheck(B, T, H, K, V, C, cu):
    N = B if cu is None else len(cu) - 1
    q, k, v, s = make_inputs(B, T, H, K, V, init=True, N=N)
    decay = torch.tensor([0.5, 0.05][:H])
    cu_seqlens = None if cu is None else torch.tensor(cu)

    def fn(q, k, v, s):
        return lightning_attn(
            q,
            k,
            v,
            decay,
            initial_state=s,
            output_final_state=True,
            cu_seqlens=cu_seqlens,
            block_size=C,
        )

    assert torch.autograd.gradcheck(fn, (q, k, v, s), eps=1e-6, atol=1e-7, rtol=1e-5)


# ---------------------------------------------------------------------- bf16 and fp16


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize(
    ("B", "T", "H", "K", "V", "C"),
    [
        pytest.param(2, 150, 2, 32, 32, None, id="T150-K32"),
        pytest.param(2, 37, 3, 5, 7, 16, id="T37-K5-V7-C16"),
    ],
)
def test_low_precision_no_worse_than_twice_naive(B, T, H, K, V, C, dtype, backend):
    """flash-attention's rule: against a float64 oracle, the op's error is at most twice
    that of the plain implementation run in the low-precision dtype itself. Accumulation
    is float32, so o and the gradients also stay within one rounding of the low dtype and
    the (float32) final state is float32-accurate."""
    q, k, v, s = make_inputs(B, T, H, K, V, dtype=dtype, init=True)
    decay = make_decay(H)
    fast = fwd_bwd(call(attn(backend), decay, output_final_state=True, block_size=C), q, k, v, s)
    low = fwd_bwd(call(lightning_attn_naive, decay, output_final_state=True), q, k, v, s)
    ref = fwd_bwd(
        call(lightning_attn_naive, decay, output_final_state=True),
        *upcast(q, k, v, s),
        cot_dtype=dtype,
    )
    for key in ("o", "dq", "dk", "dv"):
        assert fast[key].dtype == dtype, f"{key} is {fast[key].dtype}"
    for key in ("final", "dinit"):
        assert fast[key].dtype == torch.float32, f"{key} is {fast[key].dtype}"
    one_rounding = torch.finfo(dtype).eps / 2
    for key in KEYS:
        err_fast, err_low = rel_err(fast[key], ref[key]), rel_err(low[key], ref[key])
        assert err_fast <= 2 * err_low, (
            f"{key}: lightning_attn {dtype} error {err_fast:.3e} > 2x naive's {err_low:.3e}"
        )
        ceiling = one_rounding if fast[key].dtype == dtype else 1e-5
        assert err_fast <= ceiling, f"{key}: error {err_fast:.3e} > {ceiling:.1e}"


# --------------------------------------------------------------------- decay 0 / scale


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_zero_decay_is_plain_linear_attention(dtype, backend):
    """decay = 0: o_t = scale · q_t Σ_{j≤t} k_jᵀ v_j, checked against naive and a cumsum."""
    B, T, H, K, V = 2, 140, 2, 6, 5
    dtype = dtype_on(backend, dtype)
    q, k, v, s = make_inputs(B, T, H, K, V, dtype=dtype, init=True)
    decay = torch.zeros(H)
    out = fwd_bwd(call(attn(backend), decay, output_final_state=True, scale=1.0), q, k, v, s)
    ref = fwd_bwd(
        call(lightning_attn_naive, decay, output_final_state=True, scale=1.0),
        *upcast(q, k, v, s),
        cot_dtype=dtype,
    )
    tol = TOL64 if dtype == torch.float64 else TOL32
    assert_all_close(out, ref, tol, "decay=0")
    q64, k64, v64, s64 = (x.detach().double() for x in (q, k, v, s))
    S_BTHKV = torch.einsum("bthk,bthv->bthkv", k64, v64).cumsum(1) + s64[:, None]
    assert_close(out["o"], torch.einsum("bthk,bthkv->bthv", q64, S_BTHKV), tol, "o vs cumsum")
    assert_close(out["final"], S_BTHKV[:, -1], tol, "final vs cumsum")


def test_scale_is_honoured():
    """scale=1.0 (MiniMax's layers) against naive, all gradients; None means K**-0.5 (K, not V)."""
    q, k, v, s = make_inputs(2, 40, 2, 9, 4, init=True)
    decay = make_decay(2)
    out = fwd_bwd(call(lightning_attn, decay, output_final_state=True, scale=1.0), q, k, v, s)
    ref = fwd_bwd(call(lightning_attn_naive, decay, output_final_state=True, scale=1.0), q, k, v, s)
    assert_all_close(out, ref, TOL64, "scale=1.0")
    o_default, _ = lightning_attn(q, k, v, decay, initial_state=s)
    assert_close(o_default, out["o"] / 3.0, 1e-14, "default scale vs 9**-0.5 · (scale=1)")
    o_two, final_two = lightning_attn(
        q, k, v, decay, initial_state=s, scale=2.0, output_final_state=True
    )
    assert_close(o_two, 2.0 * out["o"], 1e-14, "scale=2 vs 2 · (scale=1)")
    assert_close(final_two, out["final"], 0.0, "the state does not depend on scale")


# ---------------------------------------------------------------------- long sequence

LONG_T = 65536  # the float64 recurrent reference loops over tokens: ~3 s on 2 cores


@pytest.fixture(scope="module")
def long_case():
    """T = 65536, H = 2, K = V = 16, MiniMax's fastest and slowest rates as the two heads,
    and the float64 recurrence over the same (float32) values as the reference."""
    g = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(1, LONG_T, 2, 16, generator=g) for _ in range(3))
    decay = torch.stack([decay_rates(64, 0, 80).max(), decay_rates(64, 79, 80).min()])
    o_ref, final_ref = lightning_attn_recurrent(
        q.double(), k.double(), v.double(), decay, output_final_state=True
    )
    return q, k, v, decay, o_ref, final_ref


@pytest.mark.parametrize(
    "backend",
    [pytest.param("torch"), pytest.param("triton", marks=[*TRITON.marks, skip_interpreted])],
)
def test_long_sequence_matches_recurrence(long_case, backend):
    q, k, v, decay, o_ref, final_ref = long_case
    assert decay[0] > 0.9 and decay[1] < 4e-8
    o, final = attn(backend)(q, k, v, decay, output_final_state=True)
    assert o.dtype == torch.float32 and torch.isfinite(o).all() and torch.isfinite(final).all()
    for h in range(2):
        assert_close(o[:, :, h], o_ref[:, :, h], 1e-4, f"o head {h} (rate {decay[h]:.2e})")
        assert_close(final[:, h], final_ref[:, h], 1e-4, f"final head {h}")


def test_long_sequence_float32_recurrence_at_slowest_rate(long_case):
    """The float32 decode recurrence keeps the slowest MiniMax rate (s = 3.9e-8) exact.

    λ = exp(-s) itself rounds to 1 - 6e-8 in float32 (a 50 % error in the rate), which over
    65K tokens drifted the slowest head 1.25e-3 from the exact recurrence; the recurrence
    applies λ as S + expm1(-s)·S instead. What remains (4e-4 to 6e-4) is float32 rounding of 65K
    sequential additions into the state, which the tiled op avoids by summing per block.
    """
    q, k, v, decay, o_ref, final_ref = long_case
    o, final = lightning_attn_recurrent(q, k, v, decay, output_final_state=True)
    assert_close(o[:, :, 1], o_ref[:, :, 1], 1e-3, "recurrent fp32 o, slowest head")
    assert_close(final[:, 1], final_ref[:, 1], 1e-3, "recurrent fp32 final, slowest head")


@pytest.mark.slow
def test_million_tokens_matches_recurrence():
    """T = 2^20 (MiniMax's training length) at the fastest and slowest MiniMax rates, fp32
    tiled op against the float64 recurrence (~40 s of token loop)."""
    T = 2**20
    g = torch.Generator().manual_seed(12)
    q, k, v = (torch.randn(1, T, 2, 16, generator=g) for _ in range(3))
    decay = torch.stack([decay_rates(64, 0, 80).max(), decay_rates(64, 79, 80).min()])
    o, final = lightning_attn(q, k, v, decay, output_final_state=True)
    o_ref, final_ref = lightning_attn_recurrent(
        q.double(), k.double(), v.double(), decay, output_final_state=True
    )
    assert torch.isfinite(o).all()
    for h in range(2):
        assert_close(o[:, :, h], o_ref[:, :, h], 1e-4, f"o head {h}")
        assert_close(final[:, h], final_ref[:, h], 1e-4, f"final head {h}")


# --------------------------------------------------------------------- empty sequences


@pytest.mark.parametrize("op", OPS_AND_TRITON)
def test_zero_length_input(op):
    """T = 0 (e.g. every packed sequence empty): empty output, final state = initial state."""
    dtype = torch.float64 if op in TORCH_OPS else torch.float32
    q, k, v, s = (x.detach() for x in make_inputs(1, 0, 2, 3, 4, dtype=dtype, init=True))
    o, final = op(q, k, v, make_decay(2), initial_state=s, output_final_state=True)
    assert o.shape == (1, 0, 2, 4)
    assert torch.equal(final, s)


# ------------------------------------------------------------------------ decay rates


def alibi_reference(n: int) -> list[float]:
    """ALiBi's slopes as the paper's code builds them: a geometric series from
    2^(-8/n) with that ratio, for the closest lower power of two P; then every other
    slope of 2P until n are taken."""

    def power_of_2(n):
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start**i for i in range(n)]

    if math.log2(n).is_integer():
        return power_of_2(n)
    P = 2 ** math.floor(math.log2(n))
    return power_of_2(P) + alibi_reference(2 * P)[0::2][: n - P]


@pytest.fixture(scope="module")
def hf_minimax():
    return pytest.importorskip("transformers.models.minimax.modeling_minimax")


@pytest.mark.parametrize("L", [8, 80])
@pytest.mark.parametrize("H", [4, 8, 16, 64])
def test_decay_rates_match_transformers_minimax(H, L, hf_minimax):
    """transformers' factor is 1 − l/(L−1+1e-5) + 1e-5, the released one 1 − l/(L−1) + 1e-5:
    equal to ~1e-5 relative except at the last layer, where theirs is larger by 1/(L−1)."""
    config = hf_minimax.MiniMaxConfig(
        num_attention_heads=H,
        num_key_value_heads=H,
        head_dim=2,
        hidden_size=2 * H,
        num_hidden_layers=L,
        intermediate_size=4,
        num_local_experts=2,
    )
    last = hf_minimax.MiniMaxLightningAttention(config, layer_idx=L - 1)
    layer = hf_minimax.MiniMaxLightningAttention(config, layer_idx=0)
    for l in range(L):
        layer.layer_idx = l  # get_slope_rate reads the index; building 80 modules is slow
        theirs = layer.get_slope_rate().flatten().double()
        ours = decay_rates(H, l, L)
        assert ours.dtype == torch.float32 and ours.shape == (H,)
        theirs_factor = 1 - l / (L - 1 + 1e-5) + 1e-5
        released_factor = 1 - l / (L - 1) + 1e-5
        assert_close(ours, theirs * (released_factor / theirs_factor), 1e-6, f"layer {l}")
        if l < L - 1:
            torch.testing.assert_close(ours.double(), theirs, rtol=1e-4, atol=0.0)
        else:
            torch.testing.assert_close(theirs, last.slope_rate.flatten().double())
            torch.testing.assert_close(
                theirs / ours.double(),
                torch.full((H,), 1 + 1 / (L - 1), dtype=torch.float64),
                rtol=1e-4,
                atol=0.0,
            )


@pytest.mark.parametrize("H", [1, 2, 6, 12, 20, 40, 48, 64, 96])
def test_alibi_slopes_match_alibi_construction(H):
    ours = alibi_slopes(H)
    assert isinstance(ours, list) and len(ours) == H
    torch.testing.assert_close(
        torch.tensor(ours, dtype=torch.float64),
        torch.tensor(alibi_reference(H), dtype=torch.float64),
        rtol=1e-12,
        atol=0.0,
    )
    rates = decay_rates(H, 3, 8)
    torch.testing.assert_close(
        rates, torch.tensor(ours, dtype=torch.float32) * (1 - 3 / 7 + 1e-5), rtol=1e-6, atol=0.0
    )


def test_decay_rates_slope_heads_takes_a_wider_models_first_heads():
    assert torch.equal(decay_rates(4, 1, 6, slope_heads=4), decay_rates(4, 1, 6))
    assert torch.equal(decay_rates(4, 1, 6, slope_heads=64), decay_rates(64, 1, 6)[:4])
    # 4 heads of MiniMax's rule forget slowly in layer 0; the first 4 of 64 forget fast
    assert torch.exp(-decay_rates(4, 0, 4)).min() > 0.77
    assert torch.exp(-decay_rates(4, 0, 4, slope_heads=64)).max() < 0.5
    for bad in (2, 0, 4.0, True):
        with pytest.raises(ValueError, match="slope_heads"):
            decay_rates(4, 0, 2, slope_heads=bad)


def test_alibi_slopes_six_heads_by_hand():
    # P = 4: 2^-2, 2^-4, 2^-6, 2^-8; then 2P = 8: every other of 2^-1 ... 2^-8, first two
    assert alibi_slopes(6) == [2**-2, 2**-4, 2**-6, 2**-8, 2**-1, 2**-3]


def test_decay_rates_single_layer_and_depth_order():
    torch.testing.assert_close(
        decay_rates(8, 0, 1), torch.tensor(alibi_slopes(8)) * (1 + 1e-5), rtol=1e-6, atol=0.0
    )
    rates = torch.stack([decay_rates(8, l, 10) for l in range(10)])
    assert (rates > 0).all()
    assert (rates[1:] < rates[:-1]).all(), "deeper layers must decay slower"
    assert (rates[:, 1:] < rates[:, :-1]).all(), "later heads must decay slower"


@pytest.mark.parametrize(
    ("args", "names"),
    [
        pytest.param((8, -1, 8), "layer_idx", id="layer-negative"),
        pytest.param((8, 8, 8), "layer_idx", id="layer-past-end"),
        pytest.param((8, 1.0, 8), "layer_idx", id="layer-float"),
        pytest.param((8, 0, 0), "num_layers", id="zero-layers"),
        pytest.param((8, 0, 2.0), "num_layers", id="layers-float"),
        pytest.param((0, 0, 8), "num_heads", id="zero-heads"),
    ],
)
def test_decay_rates_rejects_bad_arguments(args, names):
    with pytest.raises(ValueError, match=names):
        decay_rates(*args)


@pytest.mark.parametrize("H", [0, -4, 2.0])
def test_alibi_slopes_rejects_bad_head_count(H):
    with pytest.raises(ValueError, match="num_heads"):
        alibi_slopes(H)


# --------------------------------------------------------------------------- validation


def _t(*shape, dtype=torch.float32):
    return torch.randn(shape).to(dtype)


_Q, _K, _V, _DECAY = _t(1, 8, 2, 4), _t(1, 8, 2, 4), _t(1, 8, 2, 3), torch.tensor([0.1, 0.2])

# overrides of (q, k, v, decay) and keyword arguments; the message must match the pattern
BAD_INPUTS = [
    pytest.param(dict(k=_t(1, 8, 2, 5)), r"\bk\b", id="k-head-dim"),
    pytest.param(dict(k=_t(2, 8, 2, 4)), r"\bk\b", id="k-batch"),
    pytest.param(dict(v=_t(1, 7, 2, 3)), r"\bv\b", id="v-T"),
    pytest.param(dict(v=_t(1, 8, 3, 3)), r"\bv\b", id="v-H"),
    pytest.param(dict(k=_t(1, 8, 2, 4, dtype=torch.float64)), r"q, k, v", id="dtype-mismatch"),
    pytest.param(dict(q=torch.ones(1, 8, 2, 4, dtype=torch.int64)), r"\bq\b.*float", id="q-int"),
    pytest.param(dict(v=torch.ones(1, 8, 2, 3, dtype=torch.int32)), r"\bv\b.*float", id="v-int"),
    pytest.param(dict(q=_t(8, 2, 4)), r"\bq\b.*4-D", id="q-3d"),
    pytest.param(dict(q=[[1.0]]), r"\bq\b", id="q-list"),
    pytest.param(
        dict(q=_t(2, 8, 2, 4), k=_t(2, 8, 2, 4), v=_t(2, 8, 2, 3), cu_seqlens=torch.tensor([0, 8])),
        "cu_seqlens",
        id="cu-batch2",
    ),
    pytest.param(dict(cu_seqlens=torch.tensor([1, 8])), "cu_seqlens", id="cu-start"),
    pytest.param(dict(cu_seqlens=torch.tensor([0, 7])), "cu_seqlens", id="cu-end-short"),
    pytest.param(dict(cu_seqlens=torch.tensor([0, 9])), "cu_seqlens", id="cu-end-long"),
    pytest.param(dict(cu_seqlens=torch.tensor([0, 5, 3, 8])), "cu_seqlens", id="cu-decreasing"),
    pytest.param(dict(cu_seqlens=torch.tensor([0.0, 8.0])), "cu_seqlens", id="cu-float"),
    pytest.param(dict(cu_seqlens=torch.tensor([[0, 8]])), "cu_seqlens", id="cu-2d"),
    pytest.param(dict(cu_seqlens=torch.tensor([0])), "cu_seqlens", id="cu-one-entry"),
    pytest.param(dict(decay=torch.rand(3)), "decay", id="decay-shape"),
    pytest.param(dict(decay=torch.rand(2, 1)), "decay", id="decay-2d"),
    pytest.param(dict(decay=torch.tensor([0.1, -0.1])), "decay", id="decay-negative"),
    pytest.param(dict(decay=torch.tensor([0.1, float("nan")])), "decay", id="decay-nan"),
    pytest.param(dict(decay=torch.tensor([float("inf"), 0.1])), "decay", id="decay-inf"),
    pytest.param(dict(decay=torch.tensor([1, 2])), "decay", id="decay-int"),
    pytest.param(dict(decay=[0.1, 0.2]), "decay", id="decay-list"),
    pytest.param(dict(initial_state=torch.zeros(1, 2, 4, 4)), "initial_state", id="init-V"),
    pytest.param(dict(initial_state=torch.zeros(2, 4, 3)), "initial_state", id="init-3d"),
    pytest.param(
        dict(initial_state=torch.zeros(1, 2, 4, 3), cu_seqlens=torch.tensor([0, 3, 8])),
        "initial_state",
        id="init-N",
    ),
    pytest.param(dict(scale=float("nan")), "scale", id="scale-nan"),
]

BAD_CHUNK_ONLY = [
    pytest.param(
        dict(decay=torch.tensor([0.1, 0.2], requires_grad=True)), "decay", id="decay-grad"
    ),
    pytest.param(dict(block_size=0), "block_size", id="block-0"),
    pytest.param(dict(block_size=-16), "block_size", id="block-negative"),
    pytest.param(dict(block_size=16.0), "block_size", id="block-float"),
    pytest.param(dict(block_size="16"), "block_size", id="block-str"),
    pytest.param(dict(backend="cuda"), "backend", id="backend-unknown"),
]


def _call_with(op, overrides):
    args = dict(q=_Q, k=_K, v=_V, decay=_DECAY)
    args.update(overrides)
    q, k, v, decay = (args.pop(name) for name in ("q", "k", "v", "decay"))
    return op(q, k, v, decay, **args)


@pytest.mark.parametrize(("overrides", "pattern"), BAD_INPUTS)
@pytest.mark.parametrize("op", OPS)
def test_bad_input_raises_value_error_naming_argument(op, overrides, pattern):
    with pytest.raises(ValueError, match=pattern):
        _call_with(op, overrides)


@pytest.mark.parametrize(("overrides", "pattern"), BAD_CHUNK_ONLY)
def test_bad_chunk_argument_raises_value_error_naming_argument(overrides, pattern):
    with pytest.raises(ValueError, match=pattern):
        _call_with(lightning_attn, overrides)


def test_good_inputs_pass_validation():
    """The baseline the bad inputs are derived from is itself valid (so each bad case
    fails for its own reason), and decay requiring grad is fine under no_grad."""
    for op in (lightning_attn, lightning_attn_naive, lightning_attn_recurrent):
        o, _ = _call_with(op, {})
        assert o.shape == (1, 8, 2, 3)
    o, _ = _call_with(lightning_attn, dict(cu_seqlens=torch.tensor([0, 3, 8]), block_size=3))
    assert o.shape == (1, 8, 2, 3)
    with torch.no_grad():
        _call_with(lightning_attn, dict(decay=torch.tensor([0.1, 0.2], requires_grad=True)))
