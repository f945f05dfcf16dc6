"""What the tiled `lightning_attn` keeps between calls, and that results never depend on it.

The torch path keeps its block buffers (a workspace per H, C, K, V, dtypes, device and
direction) and, on the CPU, reuses the memory of its previous large output once the caller
has dropped it. `release_workspace()` frees both. Every test here checks identity of
results bit for bit: a warm call equals a fresh one, also after calls of other shapes and
with every kept byte overwritten by NaN (a read of stale memory cannot hide), and an
output the caller still holds is never written.

# B batch, T tokens, H heads, K/V head dims, C block, N sequences
"""

from __future__ import annotations

import itertools
import threading

import numpy as np
import pytest
import torch
from conftest import rel_err

from lightlong.ops import lightning_attn, lightning_attn_naive
from lightlong.ops.lightning import chunk
from lightlong.ops.lightning.api import release_workspace, workspace_bytes

RATES = (0.3, 0.02, 1.5, 1e-4)


@pytest.fixture(autouse=True)
def fresh():
    """Each test starts and ends with nothing kept."""
    release_workspace()
    yield
    release_workspace()


def inputs(T, H, K, V, *, dtype=torch.float32, N=1, B=1, seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)

    def leaf(*shape, dt=dtype):
        return torch.randn(shape, generator=g, dtype=torch.float64).to(dt).requires_grad_(grad)

    state_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    q, k, v = leaf(B, T, H, K), leaf(B, T, H, K), leaf(B, T, H, V)
    return q, k, v, leaf(N, H, K, V, dt=state_dtype)


def decay(H):
    return torch.tensor([RATES[h % len(RATES)] for h in range(H)])


def run(x, *, cu=None, C=16, backward=True) -> list[torch.Tensor]:
    """o, final and (backward) dq, dk, dv, dinit under fixed cotangents, detached."""
    q, k, v, s = (t.detach().requires_grad_(backward) for t in x)
    cu_t = None if cu is None else torch.tensor(cu)
    o, final = lightning_attn(
        q, k, v, decay(q.shape[2]), initial_state=s, output_final_state=True, cu_seqlens=cu_t,
        block_size=C,
    )  # fmt: skip
    outs = [o.detach().clone(), final.detach().clone()]
    if backward:
        g = torch.Generator().manual_seed(7)
        do = torch.randn(o.shape, generator=g).to(o.dtype)
        dfinal = torch.randn(final.shape, generator=g).to(final.dtype)
        outs += torch.autograd.grad([o, final], [q, k, v, s], [do, dfinal])
    return outs


def assert_identical(a: list[torch.Tensor], b: list[torch.Tensor], where: str) -> None:
    names = ("o", "final", "dq", "dk", "dv", "dinit")
    for name, x, y in zip(names[: len(a)], a, b, strict=True):
        assert torch.equal(x, y), f"{where}: {name} differs (max {(x - y).abs().max():.3e})"


def poison_everything_kept() -> int:
    """NaN into every buffer the op keeps (workspaces and a recycled output); how many."""
    n = 0
    for ws in chunk._cache.values():
        for buf in ws.bufs.values():
            buf.fill_(float("nan"))
            n += 1
    if chunk._output is not None and not chunk._storage_in_use(chunk._output[1]):
        (shape, dtype, _), storage = chunk._output
        torch.empty(0, dtype=dtype).set_(storage, 0, shape).fill_(float("nan"))
        n += 1
    return n


# (T, H, K, V, C, cu_seqlens, B): a tail block, packed sequences with boundaries inside
# blocks and groups (an empty one, a one-token one), and a batch of rows
CASES = [
    pytest.param(150, 2, 8, 6, 16, None, 1, id="T150-tail"),
    pytest.param(91, 3, 5, 7, 16, (0, 5, 5, 6, 40, 91), 1, id="packed"),
    pytest.param(37, 2, 4, 4, 8, None, 3, id="batch3"),
]
DTYPES = [
    pytest.param(torch.float64, id="fp64"),
    pytest.param(torch.float32, id="fp32"),
    pytest.param(torch.bfloat16, id="bf16"),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("T", "H", "K", "V", "C", "cu", "B"), CASES)
def test_warm_workspace_gives_what_a_fresh_one_gives(T, H, K, V, C, cu, B, dtype, monkeypatch):
    """Fresh, then after a larger call of the same head sizes (which leaves other values in
    every buffer), then after every kept byte is set to NaN: o, final state and every
    gradient bit-identical. Outputs are recycled from any size here."""
    monkeypatch.setattr(chunk, "_RECYCLE_MIN_BYTES", 0)
    N = B if cu is None else len(cu) - 1
    x = inputs(T, H, K, V, dtype=dtype, N=N, B=B)
    fresh = run(x, cu=cu, C=C)
    assert workspace_bytes() > 0

    other = inputs(5 * T + 3, H, K, V, dtype=dtype, N=2, seed=1)  # longer: more blocks
    run(other, cu=(0, 2 * T + 1, 5 * T + 3), C=C)
    assert_identical(run(x, cu=cu, C=C), fresh, "after a call of another length")

    assert poison_everything_kept() >= 2  # a forward and a backward workspace at least
    assert_identical(run(x, cu=cu, C=C), fresh, "after NaN in every kept buffer")


def test_calls_of_other_shapes_leave_no_trace():
    """Interleaved calls of different H, K, V, dtype and block size, each equal to itself
    run alone on a fresh process state."""
    shapes = [(70, 2, 8, 8, 16), (33, 3, 5, 9, 8), (129, 2, 8, 8, 64), (70, 2, 8, 8, 32)]
    xs = [inputs(T, H, K, V, seed=i) for i, (T, H, K, V, _) in enumerate(shapes)]
    alone = []
    for x, shape in zip(xs, shapes, strict=True):
        release_workspace()
        alone.append(run(x, C=shape[-1]))
    for x, shape, expected in itertools.chain(*[zip(xs, shapes, alone, strict=True)] * 2):
        assert_identical(run(x, C=shape[-1]), expected, f"shape {shape} after the others")


def test_workspace_is_reused_bounded_and_released(monkeypatch):
    x = inputs(200, 2, 8, 8)
    run(x, backward=False)
    (ws,) = chunk._cache.values()
    ptrs = {name: buf.data_ptr() for name, buf in ws.bufs.items()}
    held = workspace_bytes()
    assert held == ws.nbytes > 0

    run(x, backward=False)
    run(inputs(37, 2, 8, 8, seed=1), backward=False)  # fewer blocks: the same buffers fit
    (again,) = chunk._cache.values()
    assert again is ws and {n: b.data_ptr() for n, b in ws.bufs.items()} == ptrs
    assert workspace_bytes() == held

    run(x)  # the backward keeps its own workspace beside the forward's
    assert {key[0] for key in chunk._cache} == {"fwd", "bwd"}
    both = workspace_bytes()
    assert both > held
    assert release_workspace() == both
    assert workspace_bytes() == 0 and not chunk._cache

    # bounded: beyond _CACHE_BYTES the least recently used workspaces go
    monkeypatch.setattr(chunk, "_CACHE_BYTES", 1)
    for H in (1, 2, 3):
        run(inputs(50, H, 4, 4), backward=False)
        assert len(chunk._cache) == 1 and next(iter(chunk._cache))[1] == H


def test_every_shape_stays_within_the_bound():
    """Many shapes, forward and backward: what is kept never exceeds the documented bound."""
    for H, K, C in itertools.product((1, 4), (8, 32), (16, 64)):
        run(inputs(100, H, K, K), C=C)
        assert workspace_bytes() <= chunk._CACHE_BYTES + chunk._RECYCLE_MAX_BYTES


def test_output_memory_comes_back_only_once_dropped(monkeypatch):
    """A dropped output's memory is the next output's; one still held (directly, by a view,
    by numpy, by autograd) is never written."""
    monkeypatch.setattr(chunk, "_RECYCLE_MIN_BYTES", 0)
    x1, x2 = inputs(300, 2, 8, 8, seed=1), inputs(300, 2, 8, 8, seed=2)
    d = decay(2)

    def op(x, **kw):
        return lightning_attn(x[0], x[1], x[2], d, **kw)[0]

    o1 = op(x1)
    kept1 = o1.clone()
    o2 = op(x2)  # o1 is held: fresh memory
    assert o2.data_ptr() != o1.data_ptr() and torch.equal(o1, kept1)
    kept2, p2 = o2.clone(), o2.data_ptr()
    del o2
    o3 = op(x1)  # o2 was dropped: its memory comes back
    assert o3.data_ptr() == p2 and torch.equal(o3, kept1)

    view = o3[:, 10:20]
    del o3
    o4 = op(x2)
    assert o4.data_ptr() != p2 and torch.equal(view, kept1[:, 10:20])
    arr = o4.numpy()
    p4 = o4.data_ptr()
    del o4
    o5 = op(x1)
    assert o5.data_ptr() != p4 and np.array_equal(arr, kept2.numpy())

    # autograd saves the output for the product's backward: it must stay intact
    xg = [t.detach().requires_grad_() for t in x1[:3]]
    o6 = lightning_attn(*xg, d)[0]
    loss = (o6 * o6).sum()
    p6 = o6.data_ptr()
    del o6, o5
    o7 = op(x2)
    assert o7.data_ptr() != p6 and torch.equal(o7, kept2)
    grads = torch.autograd.grad(loss, xg)
    fresh = [t.detach().requires_grad_() for t in x1[:3]]
    o_ref = lightning_attn(*fresh, d)[0]
    expected = torch.autograd.grad((o_ref * o_ref).sum(), fresh)
    for a, b in zip(grads, expected, strict=True):
        assert torch.equal(a, b)


def test_large_outputs_are_recycled_by_default():
    """The shipped threshold: a 32 MiB output (T=65536, H=8, V=16 float32) is reused."""
    x = inputs(65536, 8, 4, 16)
    d = decay(8)
    with torch.no_grad():
        o = lightning_attn(x[0], x[1], x[2], d)[0]
        assert o.numel() * 4 >= chunk._RECYCLE_MIN_BYTES
        p = o.data_ptr()
        del o
        assert workspace_bytes() >= 32 * 2**20
        assert lightning_attn(x[0], x[1], x[2], d)[0].data_ptr() == p


def test_calls_in_and_out_of_inference_mode(monkeypatch):
    """A workspace and an output made under torch.inference_mode serve later normal calls
    (and the other way round): same values, and the normal call's output is a normal tensor
    that autograd and in-place ops accept."""
    monkeypatch.setattr(chunk, "_RECYCLE_MIN_BYTES", 0)
    x = inputs(100, 2, 8, 8)
    expected = run(x)
    release_workspace()
    with torch.inference_mode():
        o = run(x, backward=False)
        assert_identical(o, expected[:2], "in inference mode")
    assert_identical(run(x), expected, "normal, after inference mode")
    o = lightning_attn(*x[:3], decay(2))[0]
    assert not o.is_inference()
    o.add_(1.0)
    with torch.inference_mode():
        assert_identical(run(x, backward=False), expected[:2], "inference mode again")


def test_concurrent_calls_from_threads():
    """Two threads calling the op at once (same and different shapes) get what sequential
    calls get: a workspace is taken out of the cache while a call uses it."""
    xs = [inputs(150, 2, 8, 8, seed=i) for i in range(3)] + [inputs(90, 3, 5, 7, seed=9)]
    expected = [run(x) for x in xs]
    errors: list[str] = []

    def worker(order: list[int]) -> None:
        for _ in range(8):
            for i in order:
                got = run(xs[i])
                if not all(torch.equal(a, b) for a, b in zip(got, expected[i], strict=True)):
                    errors.append(f"input {i}")

    orders = ([0, 1, 3], [3, 2, 0], [1, 3, 2])
    threads = [threading.Thread(target=worker, args=(o,)) for o in orders]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


# ------------------------------------------------------------------- bf16 block matmuls


@pytest.mark.parametrize(
    ("T", "H", "K", "V", "C", "cu"),
    [
        pytest.param(131, 2, 32, 32, None, None, id="T131"),
        pytest.param(197, 3, 24, 40, 16, None, id="T197-K24-V40-C16"),
        pytest.param(333, 2, 64, 64, None, (0, 5, 70, 71, 200, 333), id="packed"),
        pytest.param(90, 2, 16, 16, 16, (0, 17, 17, 50, 90), id="packed-empty-C16"),
    ],
)
def test_bf16_block_matmuls_within_the_rule(T, H, K, V, C, cu, monkeypatch):
    """bf16 inputs run the output matmuls in bf16 (checked: bmm sees bf16 operands, and the
    state path float32 ones); odd lengths and packed documents stay within the op's rule
    (`test_low_precision_no_worse_than_twice_naive`): error against the float64 oracle at
    most twice that of the naive op run in bf16, within one bf16 rounding for o and the
    gradients, float32-accurate (1e-5) for the final state and d(initial state)."""
    seen: set[torch.dtype] = set()
    bmm = torch.bmm

    def spy(a, b, **kw):
        seen.add(a.dtype)
        return bmm(a, b, **kw)

    N = 1 if cu is None else len(cu) - 1
    x = inputs(T, H, K, V, dtype=torch.bfloat16, N=N)
    monkeypatch.setattr(torch, "bmm", spy)
    fast = run(x, cu=cu, C=C)
    monkeypatch.setattr(torch, "bmm", bmm)
    assert seen == {torch.bfloat16, torch.float32}, seen

    cu_t = None if cu is None else torch.tensor(cu)

    def naive(xs):
        q, k, v, s = (t.detach().requires_grad_() for t in xs)
        o, final = lightning_attn_naive(
            q, k, v, decay(H), initial_state=s, output_final_state=True, cu_seqlens=cu_t
        )
        g = torch.Generator().manual_seed(7)
        do = torch.randn(o.shape, generator=g).to(torch.bfloat16).to(o.dtype)
        dfinal = torch.randn(final.shape, generator=g).to(final.dtype)
        return [o, final, *torch.autograd.grad([o, final], [q, k, v, s], [do, dfinal])]

    low = naive(x)
    ref = naive([t.detach().double() for t in x])
    names = ("o", "final", "dq", "dk", "dv", "dinit")
    one_rounding = torch.finfo(torch.bfloat16).eps / 2
    for name, a, lo, r in zip(names, fast, low, ref, strict=True):
        err, err_low = rel_err(a, r), rel_err(lo, r)
        assert err <= 2 * err_low, f"{name}: error {err:.3e} > 2x naive bf16's {err_low:.3e}"
        ceiling = 1e-5 if name in ("final", "dinit") else one_rounding
        assert err <= ceiling, f"{name}: error {err:.3e} > {ceiling:.1e}"
