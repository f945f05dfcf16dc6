"""Lightning attention, tiled: the torch path, with a hand-written backward.

The token axis is cut into blocks of C tokens. Inside a block the masked quadratic form
(intra); across blocks a running K×V state (inter):

    O_c     = scale · [ (Q_c K_cᵀ ⊙ D) V_c + (Q_c ⊙ a) S_c ]      D[i, j] = λ^(i−j) for j ≤ i
    S_{c+1} = λ^L · S_c + (K_c ⊙ b)ᵀ V_c                         a[i] = λ^(i+1), b[j] = λ^(L−1−j)

L is the block's length (C, or less for the last block of a sequence). Every exponent is
−s·n with 0 ≤ n ≤ C, so nothing over- or underflows at any sequence length.

The two output terms are one matmul: O_c = [P_c | Q_c ⊙ a] @ [V_c ; S_c] with
P_c = Q_c K_cᵀ ⊙ D, a contraction over C + K instead of two over C and K. P_c and Q_c ⊙ a
are written side by side into one buffer X, and V_c and S_c into one buffer Y (the scan
writes each block's entering state straight into Y), so the fusion costs no copy.

Blocks are processed G at a time ("groups"): one batched matmul per term over G·H blocks,
then a short loop over the G blocks to pass the state along. Packed sequences are blocked
one by one (a sequence's first block starts at its first token), so no state crosses a
sequence boundary; partial blocks are zero-padded. The forward keeps only the state at
each group's entry (one K×V per head per G·C tokens); the backward recomputes the rest
group by group, in reverse.

bfloat16 inputs run the output matmuls (Q Kᵀ and [P | Q ⊙ a] @ [V ; S]) in bfloat16 with
float32 accumulation; the state path (K ⊙ b, (K ⊙ b)ᵀ V, the scan) stays float32, so the
states are float32-accurate and only the output sees bfloat16 rounding. Other dtypes, and
the backward, compute in the plan's dtype (float32, or float64 for float64 inputs).

Each group's buffers come from a workspace kept between calls (`_take` / `_give_back`): a
call of the same H, C, K, V, dtypes and device reuses it. On the CPU a large output reuses
the memory of the previous call's output once the caller has dropped it (`_new_output`).
Both spare the allocator returning memory to the OS and faulting it back in on every call
(glibc does so for every block over 32 MiB), which made long calls slower per token than
short ones. Both are bounded, and `release_workspace()` frees them.

# B batch, T tokens, H heads, K/V head dims, C block, N sequences, M blocks, G blocks per group
"""

from __future__ import annotations

import functools
import itertools
import math
import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable


@dataclass(frozen=True, slots=True)
class _Group:
    """G consecutive blocks and what it takes to read, write and decay them."""

    m0: int
    m1: int
    t0: int
    """First token; a full group is the contiguous tokens [t0, t0 + G·C)."""
    rows: Tensor | None
    """[G·C] int64 source token of each slot (pads clamped); None for a full group."""
    keep: Tensor | None
    """[G·C] bool, slots holding real tokens; None for a full group."""
    b_G1C1: Tensor
    """[G or 1, H, C, 1] key decay λ^(L−1−j), zero on pads."""
    lam_H11: tuple[Tensor, ...]
    """G × [H, 1, 1]: the decay across each block, λ^L."""
    full: bool
    """G blocks of C tokens each: no pads, no index tables."""


@dataclass(frozen=True)
class _Plan:
    """How one call cuts its tokens into blocks and groups, with the decay tables."""

    C: int
    seq: list[int]  # [M] sequence of each block
    first: list[bool]  # [M] block opens its sequence
    last: list[bool]  # [M] block closes its sequence
    groups: list[_Group]
    D_HCC: Tensor  # intra-block decay mask, times scale
    a_1HC1: Tensor  # query decay of the inter term, times scale
    mm_dtype: torch.dtype  # dtype of the forward's output matmuls (bf16 or D_HCC's)

    @property
    def G_max(self) -> int:
        return max((g.m1 - g.m0 for g in self.groups), default=1)


def make_plan(
    offsets: list[int],
    s: Tensor,
    scale: float,
    C: int,
    G: int,
    dtype: torch.dtype,
    mm_dtype: torch.dtype | None = None,
) -> _Plan:
    """Blocks each sequence [offsets[n], offsets[n+1]) by C, then groups blocks by G.

    The attention scale is folded into D and a, the two tables every output term uses.
    dtype is the compute dtype (states, decay tables); mm_dtype (None: dtype) that of the
    forward's output matmuls.
    """
    device = s.device
    start, length, seq = [], [], []
    for n, (a, b) in enumerate(itertools.pairwise(offsets)):
        for t in range(a, b, C):
            start.append(t)
            length.append(min(C, b - t))
            seq.append(n)
    M = len(seq)
    first = [m == 0 or seq[m - 1] != seq[m] for m in range(M)]
    last = [m == M - 1 or seq[m + 1] != seq[m] for m in range(M)]

    s = s.to(dtype)
    # Decay factors below sqrt(tiny) (1e-19 in float32, far under its 1e-7 resolution)
    # become 0, so that neither a factor nor a product of two is subnormal: subnormal
    # arithmetic is ~30x slower on x86, and large blocks with fast decay would hit it.
    tiny = torch.finfo(dtype).tiny ** 0.5

    def decay(n: Tensor) -> Tensor:
        """λ_h^n for exponents n >= 0 of any shape: [H, *n.shape], flushed to 0 below tiny."""
        f = torch.exp(-s.view(-1, *([1] * n.dim())) * n)
        return f.masked_fill(f < tiny, 0.0)

    pos = torch.arange(C, device=device, dtype=dtype)
    gap_CC = pos[:, None] - pos[None, :]
    D_HCC = decay(gap_CC.clamp(min=0)) * (gap_CC >= 0) * scale
    a_1HC1 = decay(pos + 1)[None, :, :, None] * scale
    b_full = decay(C - 1 - pos)[None, :, :, None]
    lam_full = decay(torch.tensor(float(C), dtype=dtype, device=device))[None, :, None, None]

    groups = []
    last_token = offsets[-1] - 1
    lam_full_H11 = lam_full[0]
    for m0 in range(0, M, G):
        m1 = min(m0 + G, M)
        if all(L == C for L in length[m0:m1]):
            lam = (lam_full_H11,) * (m1 - m0)
            groups.append(_Group(m0, m1, start[m0], None, None, b_full, lam, True))
            continue
        L_G = torch.tensor(length[m0:m1], device=device, dtype=dtype)
        slot_GC = torch.tensor(start[m0:m1], device=device)[:, None] + torch.arange(
            C, device=device
        )
        keep_GC = pos[None, :] < L_G[:, None]
        gap_GC = (L_G[:, None] - 1 - pos).clamp(min=0)
        b_GHC = decay(gap_GC).transpose(0, 1) * keep_GC[:, None, :]
        lam = tuple(decay(L_G).T[:, :, None, None])
        rows = slot_GC.clamp(max=last_token).reshape(-1)
        keep = keep_GC.reshape(-1)
        groups.append(_Group(m0, m1, start[m0], rows, keep, b_GHC[..., None], lam, False))
    return _Plan(C, seq, first, last, groups, D_HCC, a_1HC1, mm_dtype or dtype)


# ------------------------------------------------------------------------- workspace


class _Workspace:
    """A group's buffers, named; kept between calls (see `_take`). Every buffer is fully
    written before it is read within a call, so what a previous call left never leaks."""

    def __init__(self, key: tuple, G: int, shapes: dict[str, tuple[tuple[int, ...], torch.dtype]]):
        self.key, self.G = key, G
        device = key[-1]
        with torch.inference_mode(False):  # normal tensors: usable in and out of that mode
            self.bufs = {
                n: torch.empty(s, dtype=dt, device=device) for n, (s, dt) in shapes.items()
            }
        self.nbytes = sum(b.numel() * b.element_size() for b in self.bufs.values())

    def __getitem__(self, name: str) -> Tensor:
        return self.bufs[name]


def _fwd_shapes(G, H, C, K, V, cd, md) -> dict:
    shapes = {
        "q": ((G, H, C, K), md),
        "k": ((G, H, C, K), md),
        "scores": ((G, H, C, C), md),  # q kᵀ (contiguous: bmm into a strided out ran 2x slower)
        "X": ((G, H, C, C + K), md),  # [P | q ⊙ a]
        "Y": ((G, H, C + K, V), md),  # [v ; S_in]
        "o": ((G, H, C, V), md),
        "kd": ((G, H, C, K), cd),
        "dS": ((G, H, K, V), cd),
    }
    if md != cd:  # the state path's own float32 copies
        shapes["v"] = ((G, H, C, V), cd)
        shapes["S_in"] = ((G, H, K, V), cd)
    return shapes


def _bwd_shapes(G, H, C, K, V, cd, md) -> dict:
    D = max(K, V)
    names = {
        "q": (C, K), "k": (C, K), "v": (C, V), "kd": (C, K), "qa": (C, K), "scores": (C, C),
        "o": (C, V), "dS": (K, V), "S_in": (K, V), "do": (C, V), "dS_out": (K, V),
        "dq": (C, K), "dk": (C, K), "tmp": (C, D),
    }  # fmt: skip
    return {n: ((G, H, *s), cd) for n, s in names.items()}


# Bytes of workspace kept between calls, all keys together. One workspace is a few groups'
# worth of q, k, v (see api._GROUP_BYTES), so this holds a forward and a backward
# workspace for a few layer shapes; the least recently used go first.
_CACHE_BYTES = 256 * 2**20
_cache: OrderedDict[tuple, _Workspace] = OrderedDict()
_lock = threading.Lock()


def _take(kind: str, G: int, H, C, K, V, cd, md, device) -> _Workspace:
    """A workspace for G blocks: the cached one for these sizes, dtypes and device if it
    has room for G, else a new one. It is out of the cache until `_give_back`, so
    concurrent calls (threads) never share buffers."""
    key = (kind, H, C, K, V, cd, md, torch.device(device))
    with _lock:
        ws = None if torch.compiler.is_compiling() else _cache.pop(key, None)
    if ws is None or ws.G < G:
        ws = None  # the smaller one is dropped before the larger one is allocated
        shapes = (_fwd_shapes if kind == "fwd" else _bwd_shapes)(G, H, C, K, V, cd, md)
        ws = _Workspace(key, G, shapes)
    return ws


def _give_back(ws: _Workspace) -> None:
    """Returns a workspace to the cache (most recent last); evicts the least recently used
    ones beyond _CACHE_BYTES, always keeping this one. Nothing is kept while tracing."""
    if torch.compiler.is_compiling():
        return
    with _lock:
        _cache[ws.key] = ws
        _cache.move_to_end(ws.key)
        while len(_cache) > 1 and sum(w.nbytes for w in _cache.values()) > _CACHE_BYTES:
            _cache.popitem(last=False)


# Outputs of these sizes are recycled on the CPU (see `_new_output`): from 32 MiB, glibc's
# largest heap block, every allocation is a fresh mapping faulted in page by page (0.3 s per
# 512 MiB on a 2-core EPYC VM, beside ~0.9 s for the op at 128K tokens, H=8, K=V=128);
# up to 1 GiB is kept for reuse.
_RECYCLE_MIN_BYTES = 32 * 2**20
_RECYCLE_MAX_BYTES = 2**30
_output: tuple[tuple, torch.UntypedStorage] | None = None
# How many tensors and storage objects share a storage: torch's own (private) counter, as
# its tests use it. Without it (another torch) outputs are simply not recycled.
_use_count = getattr(torch._C, "_storage_Use_Count", None)


def _storage_in_use(storage: torch.UntypedStorage) -> bool:
    """Whether any tensor (or storage object) besides `storage` itself refers to its memory."""
    return _use_count(storage._cdata) > 1


def _new_output(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """torch.empty(shape), except that a large CPU output reuses the memory of the previous
    call's output of the same shape and dtype once nothing refers to it any more: a caller
    that drops each output before the next call gets the same pages back instead of new
    ones to fault in. An output still referenced (a view, .numpy(), a saved tensor) is
    never touched; the slot then moves to the new output."""
    global _output
    nbytes = math.prod(shape) * dtype.itemsize
    recyclable = device.type == "cpu" and _RECYCLE_MIN_BYTES <= nbytes <= _RECYCLE_MAX_BYTES
    if not recyclable or _use_count is None or torch.compiler.is_compiling():
        return torch.empty(shape, dtype=dtype, device=device)
    key = (shape, dtype, device)
    with _lock:  # the check and the claim are one step, so two threads never share it
        if _output is not None and _output[0] == key and not _storage_in_use(_output[1]):
            return torch.empty(0, dtype=dtype, device=device).set_(_output[1], 0, shape)
        _output = None  # an unused slot of another shape is freed before allocating
        out = torch.empty(shape, dtype=dtype, device=device)
        _output = (key, out.untyped_storage())
        return out


def release_workspace() -> int:
    """Frees the memory `lightlong.ops.lightning_attn` keeps between calls; returns its bytes.

    The torch path keeps its block buffers (one workspace per H, C, K, V, dtype, device and
    direction, at most 256 MiB in all) and, on the CPU, the memory of its last output of
    32 MiB to 1 GiB once the caller has dropped that output, so that repeated calls reuse
    memory instead of allocating and faulting it in again. A call after this one allocates
    afresh; results never depend on it.
    """
    global _output
    with _lock:
        freed = sum(w.nbytes for w in _cache.values())
        _cache.clear()
        if _output is not None and not _storage_in_use(_output[1]):
            freed += _output[1].nbytes()
        _output = None
    return freed


def workspace_bytes() -> int:
    """Bytes `lightning_attn` keeps between calls (workspaces, and a dropped output it will
    reuse): what `release_workspace()` would free now."""
    with _lock:
        held = sum(w.nbytes for w in _cache.values())
        if _output is not None and not _storage_in_use(_output[1]):
            held += _output[1].nbytes()
        return held


# ---------------------------------------------------------------------------- blocks


def _bmm(a: Tensor, b: Tensor, out: Tensor) -> Tensor:
    """Batched a @ b over the leading [G, H] dims, into out, without copies."""
    torch.bmm(a.flatten(0, 1), b.flatten(0, 1), out=out.flatten(0, 1))
    return out


def _T(x: Tensor) -> Tensor:
    return x.transpose(-1, -2)


class _Blocks:
    """x [T_total, H, D] (any strides) seen as blocks: `at(t0, G, C)` is the [G, H, C, D]
    view of the tokens [t0, t0 + G·C), one as_strided call."""

    def __init__(self, x_TD: Tensor):
        self.x = x_TD
        self.s_T, self.s_H, self.s_D = x_TD.stride()
        self.base = x_TD.storage_offset()

    def at(self, t0: int, G: int, C: int) -> Tensor:
        H, D = self.x.shape[1:]
        strides = (C * self.s_T, self.s_H, self.s_T, self.s_D)
        return self.x.as_strided((G, H, C, D), strides, self.base + t0 * self.s_T)


def _load(x: _Blocks, g: _Group, out: Tensor) -> Tensor:
    """Reads a group's tokens into blocks out [G, H, C, D], pads zeroed."""
    G, H, C, D = out.shape
    if g.full:
        return out.copy_(x.at(g.t0, G, C))
    src = x.x.index_select(0, g.rows)
    out.copy_(src.view(G, C, H, D).permute(0, 2, 1, 3))
    # masked_fill, not a multiply: a NaN elsewhere must not leak in via 0 * NaN
    return out.masked_fill_(~g.keep.view(G, 1, C, 1), 0.0)


def _store(y: _Blocks, y_GHCD: Tensor, g: _Group) -> None:
    """Writes blocks [G, H, C, D] back to their tokens."""
    G, H, C, D = y_GHCD.shape
    if g.full:
        y.at(g.t0, G, C).copy_(y_GHCD)
    else:
        kept = y_GHCD.permute(0, 2, 1, 3).reshape(G * C, H, D)[g.keep]
        y.x.index_copy_(0, g.rows[g.keep], kept.to(y.x.dtype))


def _scan(
    g: _Group, plan: _Plan, dS: Tensor, S_in: Tensor, init: Tensor | None, final: Tensor | None
) -> None:
    """Passes the state through a group's blocks but the last: S_out = λ^L · S_in + dS.

    dS [G, H, K, V] holds each block's own contribution; S_in [G, H, K, V] holds the state
    entering the group in S_in[0] and receives the state entering each block (a block that
    opens a sequence gets init [N, H, K, V], or zeros). Each sequence that ends before the
    group's last block has its state written into final [N, H, K, V].
    """
    G = g.m1 - g.m0
    for i in range(G):
        m = g.m0 + i
        if plan.first[m]:
            S_in[i].zero_() if init is None else S_in[i].copy_(init[plan.seq[m]])
        if i + 1 < G:
            torch.addcmul(dS[i], S_in[i], g.lam_H11[i], out=S_in[i + 1])
            if final is not None and plan.last[m]:
                final[plan.seq[m]] = S_in[i + 1]


def _scan_last(g: _Group, plan: _Plan, dS: Tensor, S_in: Tensor, final: Tensor | None) -> None:
    """The state leaving the group's last block into S_in[0] (the next group's entry), once
    the group's outputs no longer need S_in; into final too if it ends a sequence."""
    i, m = g.m1 - g.m0 - 1, g.m1 - 1
    torch.addcmul(dS[i], S_in[i], g.lam_H11[i], out=S_in[0])
    if final is not None and plan.last[m]:
        final[plan.seq[m]] = S_in[0]


def _scan_back(
    g: _Group,
    plan: _Plan,
    dS_from_o: Tensor,
    dS_out: Tensor,
    carry: Tensor,
    dfinal: Tensor | None,
    dinit: Tensor,
) -> None:
    """The reverse of `_scan`: gradients of the state leaving each block, in place.

    dS_from_o [G, H, K, V] the gradient each block's outputs send to its entering state;
    dS_out [G, H, K, V] receives the gradient of the state leaving each block; carry
    [H, K, V] holds the gradient of the state entering the next group and receives that
    of the state entering this one. Sequence starts write theirs into dinit [N, H, K, V].
    """
    for i in reversed(range(g.m1 - g.m0)):
        m = g.m0 + i
        if plan.last[m]:
            dS_out[i].zero_() if dfinal is None else dS_out[i].copy_(dfinal[plan.seq[m]])
        elif i == g.m1 - g.m0 - 1:
            dS_out[i].copy_(carry)
        out = dS_out[i - 1] if i > 0 else carry
        torch.addcmul(dS_from_o[i], dS_out[i], g.lam_H11[i], out=out)
        if plan.first[m]:
            dinit[plan.seq[m]] = out


class _FwdViews:
    """The forward workspace seen as the first G blocks: [G, H, ...] buffers and the
    [G·H, ...] operands of the batched matmuls, made once per call, not once per group."""

    def __init__(self, ws: _Workspace, G: int, C: int, split_state: bool):
        X, Y = ws["X"][:G], ws["Y"][:G]
        self.q, self.k, self.kd = ws["q"][:G], ws["k"][:G], ws["kd"][:G]
        self.qa, self.v = X[..., C:], Y[:, :, :C]  # q ⊙ a and v, in place for the fused matmul
        self.Y_S = Y[:, :, C:]
        # S_in: the state entering each block, float32; Y_S gets a bf16 copy when they differ
        self.S_in = ws["S_in"][:G] if split_state else self.Y_S
        self.v_state = ws["v"][:G] if split_state else self.v  # float32 v for the states
        self.dS = ws["dS"][:G]
        self.scores, self.P = ws["scores"][:G], X[..., :C]
        flat = functools.partial(torch.flatten, start_dim=0, end_dim=1)
        self.X_f, self.Y_f, self.o_f = flat(X), flat(Y), flat(ws["o"][:G])
        self.scores_f, self.q_f, self.kT_f = flat(self.scores), flat(self.q), flat(self.k).mT
        self.kdT_f, self.v_state_f, self.dS_f = flat(self.kd).mT, flat(self.v_state), flat(self.dS)
        self.o = ws["o"][:G]


def chunk_fwd(
    q: Tensor, k: Tensor, v: Tensor, init: Tensor | None, plan: _Plan, N: int, keep_entries: bool
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Forward over flat tokens: q, k [T, H, K], v [T, H, V], init [N, H, K, V] or None.

    The scale is folded into the plan's D and a tables. Returns o [T, H, V] (q's dtype),
    final [N, H, K, V] and, if keep_entries (for the backward), the state entering each
    group [num_groups, H, K, V]; states in the compute dtype (the plan's).
    """
    cd, md = plan.D_HCC.dtype, plan.mm_dtype
    T, H, K = q.shape
    V, C = v.shape[-1], plan.C
    o = _new_output((T, H, V), q.dtype, q.device)
    final = init.to(cd).clone() if init is not None else q.new_zeros((N, H, K, V), dtype=cd)
    init = init.to(cd) if init is not None else None
    entries = q.new_empty((len(plan.groups), H, K, V), dtype=cd) if keep_entries else None
    split = md != cd
    q, k, v, o_blocks = _Blocks(q), _Blocks(k), _Blocks(v), _Blocks(o)
    ws = _take("fwd", plan.G_max, H, C, K, V, cd, md, o.device)
    try:
        views: dict[int, _FwdViews] = {}
        for gi, g in enumerate(plan.groups):
            G = g.m1 - g.m0
            w = views.get(G) or views.setdefault(G, _FwdViews(ws, G, C, split))
            if gi == 0:
                w.S_in[0].zero_()  # the state entering the call (its first block resets it)
            if entries is not None:
                entries[gi] = w.S_in[0]
            qb, kb = _load(q, g, w.q), _load(k, g, w.k)
            _load(v, g, w.v)
            # the state path, in the compute dtype: (k ⊙ b)ᵀ v, then the scan
            torch.mul(kb, g.b_G1C1, out=w.kd)
            if split:
                w.v_state.copy_(w.v)
            torch.bmm(w.kdT_f, w.v_state_f, out=w.dS_f)
            _scan(g, plan, w.dS, w.S_in, init, final)
            if split:
                w.Y_S.copy_(w.S_in)  # S rounded to bf16 for the output matmul only
            # o = [q kᵀ ⊙ D | q ⊙ a] @ [v ; S_in], the scale in D and a
            torch.bmm(w.q_f, w.kT_f, out=w.scores_f)
            torch.mul(w.scores, plan.D_HCC, out=w.P)
            torch.mul(qb, plan.a_1HC1, out=w.qa)
            torch.bmm(w.X_f, w.Y_f, out=w.o_f)
            _scan_last(g, plan, w.dS, w.S_in, final)
            _store(o_blocks, w.o, g)
    finally:
        _give_back(ws)
    return o, final, entries


def chunk_bwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    init: Tensor | None,
    plan: _Plan,
    entries: Tensor,
    do: Tensor | None,
    dfinal: Tensor | None,
    N: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Backward of `chunk_fwd`, group by group in reverse, recomputing each group's states.

    do [T, H, V] and dfinal [N, H, K, V] may be None (no gradient reached them).
    Returns dq, dk, dv in the inputs' dtype and dinit [N, H, K, V] in the compute dtype.
    """
    cd = plan.D_HCC.dtype
    _, H, K = q.shape
    V = v.shape[-1]
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    dinit = dfinal.to(cd).clone() if dfinal is not None else q.new_zeros((N, H, K, V), dtype=cd)
    init = init.to(cd) if init is not None else None
    dcarry = q.new_zeros((H, K, V), dtype=cd)
    ws = _take("bwd", plan.G_max, H, plan.C, K, V, cd, cd, q.device)
    q, k, v = _Blocks(q), _Blocks(k), _Blocks(v)
    do = _Blocks(do) if do is not None else None
    dq_b, dk_b, dv_b = _Blocks(dq), _Blocks(dk), _Blocks(dv)
    try:
        for gi in reversed(range(len(plan.groups))):
            g = plan.groups[gi]
            G = g.m1 - g.m0

            def buf(name: str, G: int = G) -> Tensor:
                return ws[name][:G]

            qb, kb, vb = _load(q, g, buf("q")), _load(k, g, buf("k")), _load(v, g, buf("v"))
            dob = buf("do")
            if do is None:
                dob.zero_()
            else:
                _load(do, g, dob)
            S_in, kd = buf("S_in"), buf("kd")
            S_in[0].copy_(entries[gi])
            torch.mul(kb, g.b_G1C1, out=kd)
            _scan(g, plan, _bmm(_T(kd), vb, buf("dS")), S_in, init, None)

            qa = torch.mul(qb, plan.a_1HC1, out=buf("qa"))
            dS_from_o = _bmm(_T(qa), dob, buf("dS"))
            dS_out = buf("dS_out")
            _scan_back(g, plan, dS_from_o, dS_out, dcarry, dfinal, dinit)

            tmp_K = buf("tmp")[..., :K]
            dP = _bmm(dob, _T(vb), buf("scores")).mul_(plan.D_HCC)
            dqb = _bmm(dP, kb, buf("dq"))
            dqb.addcmul_(_bmm(dob, _T(S_in), tmp_K), plan.a_1HC1)
            dkb = _bmm(_T(dP), qb, buf("dk"))
            dkb.addcmul_(_bmm(vb, _T(dS_out), tmp_K), g.b_G1C1)
            _store(dq_b, dqb, g)
            _store(dk_b, dkb, g)
            scores = _bmm(qb, _T(kb), buf("scores")).mul_(plan.D_HCC)
            dvb = _bmm(_T(scores), dob, buf("o"))
            dvb.flatten(0, 1).baddbmm_(kd.flatten(0, 1), dS_out.flatten(0, 1))
            _store(dv_b, dvb, g)
    finally:
        _give_back(ws)
    return dq, dk, dv, dinit


class LightningChunkFn(torch.autograd.Function):
    """Autograd for the tiled form: `chunk_fwd` and the hand-written `chunk_bwd`."""

    @staticmethod
    def forward(ctx, q, k, v, init, plan, num_seqs, needs_grad):
        o, final, entries = chunk_fwd(q, k, v, init, plan, num_seqs, needs_grad)
        ctx.save_for_backward(q, k, v, init, entries)
        ctx.plan, ctx.num_seqs = plan, num_seqs
        ctx.set_materialize_grads(False)
        return o, final

    @staticmethod
    @once_differentiable
    def backward(ctx, do, dfinal):
        q, k, v, init, entries = ctx.saved_tensors
        dq, dk, dv, dinit = chunk_bwd(q, k, v, init, ctx.plan, entries, do, dfinal, ctx.num_seqs)
        dinit = dinit.to(init.dtype) if init is not None and ctx.needs_input_grad[3] else None
        return dq, dk, dv, dinit, None, None, None
