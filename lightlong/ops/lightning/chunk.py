"""Lightning attention, tiled: the torch path, with a hand-written backward.

The token axis is cut into blocks of C tokens. Inside a block the masked quadratic form
(intra); across blocks a running K×V state (inter):

    O_c     = scale · [ (Q_c K_cᵀ ⊙ D) V_c + (Q_c ⊙ a) S_c ]      D[i, j] = λ^(i−j) for j ≤ i
    S_{c+1} = λ^L · S_c + (K_c ⊙ b)ᵀ V_c                         a[i] = λ^(i+1), b[j] = λ^(L−1−j)

L is the block's length (C, or less for the last block of a sequence). Every exponent is
−s·n with 0 ≤ n ≤ C, so nothing over- or underflows at any sequence length.

Blocks are processed G at a time ("groups"): one batched matmul per term over G·H blocks,
then a short loop over the G blocks to pass the state along. Packed sequences are blocked
one by one (a sequence's first block starts at its first token), so no state crosses a
sequence boundary; partial blocks are zero-padded. The forward keeps only the state at
each group's entry (one K×V per head per G·C tokens); the backward recomputes the rest
group by group, in reverse.

# B batch, T tokens, H heads, K/V head dims, C block, N sequences, M blocks, G blocks per group
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable


@dataclass(frozen=True)
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
    lam_GH11: Tensor
    """[G, H, 1, 1] decay across each block, λ^L."""

    @property
    def full(self) -> bool:
        return self.rows is None


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


def make_plan(
    offsets: list[int], s: Tensor, scale: float, C: int, G: int, dtype: torch.dtype
) -> _Plan:
    """Blocks each sequence [offsets[n], offsets[n+1]) by C, then groups blocks by G.

    The attention scale is folded into D and a, the two tables every output term uses.
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
    for m0 in range(0, M, G):
        m1 = min(m0 + G, M)
        if all(L == C for L in length[m0:m1]):
            lam = lam_full.expand(m1 - m0, -1, -1, -1)
            groups.append(_Group(m0, m1, start[m0], None, None, b_full, lam))
            continue
        L_G = torch.tensor(length[m0:m1], device=device, dtype=dtype)
        slot_GC = torch.tensor(start[m0:m1], device=device)[:, None] + torch.arange(
            C, device=device
        )
        keep_GC = pos[None, :] < L_G[:, None]
        gap_GC = (L_G[:, None] - 1 - pos).clamp(min=0)
        b_GHC = decay(gap_GC).transpose(0, 1) * keep_GC[:, None, :]
        lam = decay(L_G).T[:, :, None, None]
        rows = slot_GC.clamp(max=last_token).reshape(-1)
        groups.append(_Group(m0, m1, start[m0], rows, keep_GC.reshape(-1), b_GHC[..., None], lam))
    return _Plan(C, seq, first, last, groups, D_HCC, a_1HC1)


class _Workspace:
    """Buffers for one group, allocated once per call and reused: fresh large allocations
    cost a page fault per 4 KiB on the CPU, which would rival the matmuls themselves."""

    def __init__(self, G: int, H: int, C: int, K: int, V: int, like: Tensor, backward: bool):
        def buf(*shape: int) -> Tensor:
            return torch.empty(shape, dtype=like.dtype, device=like.device)

        D = max(K, V)
        self.q, self.k, self.v = buf(G, H, C, K), buf(G, H, C, K), buf(G, H, C, V)
        self.kd, self.qa = buf(G, H, C, K), buf(G, H, C, K)
        self.scores = buf(G, H, C, C)
        self.o = buf(G, H, C, V)
        self.dS, self.S_in, self.carry = buf(G, H, K, V), buf(G, H, K, V), buf(H, K, V)
        if backward:
            self.do, self.dS_out = buf(G, H, C, V), buf(G, H, K, V)
            self.dq, self.dk = buf(G, H, C, K), buf(G, H, C, K)
            self.tmp = buf(G, H, C, D)

    @staticmethod
    def take(x: Tensor, G: int) -> Tensor:
        """The first G blocks of a buffer (the last group may be short)."""
        return x[:G]


def _bmm(a: Tensor, b: Tensor, out: Tensor) -> Tensor:
    """Batched a @ b over the leading [G, H] dims, into out, without copies."""
    torch.bmm(a.flatten(0, 1), b.flatten(0, 1), out=out.flatten(0, 1))
    return out


def _T(x: Tensor) -> Tensor:
    return x.transpose(-1, -2)


def _load(x_TD: Tensor, g: _Group, out: Tensor) -> Tensor:
    """Reads a group's tokens from x [T_total, H, D] into blocks out [G, H, C, D], pads zeroed."""
    G, H, C, D = out.shape
    src = x_TD[g.t0 : g.t0 + G * C] if g.full else x_TD.index_select(0, g.rows)
    out.copy_(src.view(G, C, H, D).permute(0, 2, 1, 3))
    if not g.full:  # masked_fill, not a multiply: a NaN elsewhere must not leak in via 0 * NaN
        out.masked_fill_(~g.keep.view(G, 1, C, 1), 0.0)
    return out


def _store(y_TD: Tensor, y_GHCD: Tensor, g: _Group) -> None:
    """Writes blocks [G, H, C, D] back to their tokens in y [T_total, H, D]."""
    G, H, C, D = y_GHCD.shape
    y_GCHD = y_GHCD.permute(0, 2, 1, 3)
    if g.full:
        y_TD[g.t0 : g.t0 + G * C].view(G, C, H, D).copy_(y_GCHD)
    else:
        kept = y_GCHD.reshape(G * C, H, D)[g.keep]
        y_TD.index_copy_(0, g.rows[g.keep], kept.to(y_TD.dtype))


def _scan(
    g: _Group,
    plan: _Plan,
    dS: Tensor,
    S_in: Tensor,
    carry: Tensor,
    init: Tensor | None,
    final: Tensor | None,
) -> None:
    """Passes the state through a group's blocks: S_out = λ^L · S_in + dS, in place.

    dS [G, H, K, V] each block's own contribution; S_in [G, H, K, V] receives the state
    entering each block; carry [H, K, V] holds the state entering the group and receives
    the state leaving it. Each finished sequence's state is written into final [N, H, K, V].
    """
    G = g.m1 - g.m0
    for i in range(G):
        m = g.m0 + i
        if plan.first[m]:
            S_in[i].zero_() if init is None else S_in[i].copy_(init[plan.seq[m]])
        elif i == 0:
            S_in[0].copy_(carry)
        out = S_in[i + 1] if i + 1 < G else carry
        torch.addcmul(dS[i], S_in[i], g.lam_GH11[i], out=out)
        if final is not None and plan.last[m]:
            final[plan.seq[m]] = out


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
        torch.addcmul(dS_from_o[i], dS_out[i], g.lam_GH11[i], out=out)
        if plan.first[m]:
            dinit[plan.seq[m]] = out


def _block_states(g: _Group, plan: _Plan, ws: _Workspace, G: int, init, final) -> None:
    """k ⊙ b into ws.kd, each block's state contribution, then the scan (see `_scan`)."""
    kd = torch.mul(ws.take(ws.k, G), g.b_G1C1, out=ws.take(ws.kd, G))
    dS = _bmm(_T(kd), ws.take(ws.v, G), ws.take(ws.dS, G))
    _scan(g, plan, dS, ws.take(ws.S_in, G), ws.carry, init, final)


def chunk_fwd(
    q: Tensor, k: Tensor, v: Tensor, init: Tensor | None, plan: _Plan, N: int, keep_entries: bool
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Forward over flat tokens: q, k [T, H, K], v [T, H, V], init [N, H, K, V] or None.

    The scale is folded into the plan's D and a tables. Returns o [T, H, V] (q's dtype),
    final [N, H, K, V] and, if keep_entries (for the backward), the state entering each
    group [num_groups, H, K, V]; states in the compute dtype (the plan's).
    """
    dt = plan.D_HCC.dtype
    T, H, K = q.shape
    V = v.shape[-1]
    G_max = max((g.m1 - g.m0 for g in plan.groups), default=1)
    ws = _Workspace(G_max, H, plan.C, K, V, plan.D_HCC, backward=False)
    o = torch.empty((T, H, V), dtype=q.dtype, device=q.device)
    final = init.to(dt).clone() if init is not None else q.new_zeros((N, H, K, V), dtype=dt)
    init = init.to(dt) if init is not None else None
    entries = q.new_empty((len(plan.groups), H, K, V), dtype=dt) if keep_entries else None
    ws.carry.zero_()
    for gi, g in enumerate(plan.groups):
        G = g.m1 - g.m0
        if entries is not None:
            entries[gi] = ws.carry
        qb = _load(q, g, ws.take(ws.q, G))
        kb = _load(k, g, ws.take(ws.k, G))
        vb = _load(v, g, ws.take(ws.v, G))
        _block_states(g, plan, ws, G, init, final)
        scores = _bmm(qb, _T(kb), ws.take(ws.scores, G)).mul_(plan.D_HCC)
        ob = _bmm(scores, vb, ws.take(ws.o, G))
        qa = torch.mul(qb, plan.a_1HC1, out=ws.take(ws.qa, G))
        ob.flatten(0, 1).baddbmm_(qa.flatten(0, 1), ws.take(ws.S_in, G).flatten(0, 1))
        _store(o, ob, g)
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
    dt = plan.D_HCC.dtype
    _, H, K = q.shape
    V = v.shape[-1]
    G_max = max((g.m1 - g.m0 for g in plan.groups), default=1)
    ws = _Workspace(G_max, H, plan.C, K, V, plan.D_HCC, backward=True)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    dinit = dfinal.to(dt).clone() if dfinal is not None else q.new_zeros((N, H, K, V), dtype=dt)
    init = init.to(dt) if init is not None else None
    dcarry = q.new_zeros((H, K, V), dtype=dt)
    for gi in reversed(range(len(plan.groups))):
        g = plan.groups[gi]
        G = g.m1 - g.m0
        qb = _load(q, g, ws.take(ws.q, G))
        kb = _load(k, g, ws.take(ws.k, G))
        vb = _load(v, g, ws.take(ws.v, G))
        dob = ws.take(ws.do, G)
        if do is None:
            dob.zero_()
        else:
            _load(do, g, dob)
        ws.carry.copy_(entries[gi])
        _block_states(g, plan, ws, G, init, None)
        S_in, kd = ws.take(ws.S_in, G), ws.take(ws.kd, G)

        qa = torch.mul(qb, plan.a_1HC1, out=ws.take(ws.qa, G))
        dS_from_o = _bmm(_T(qa), dob, ws.take(ws.dS, G))
        dS_out = ws.take(ws.dS_out, G)
        _scan_back(g, plan, dS_from_o, dS_out, dcarry, dfinal, dinit)

        tmp_K = ws.take(ws.tmp, G)[..., :K]
        dP = _bmm(dob, _T(vb), ws.take(ws.scores, G)).mul_(plan.D_HCC)
        dqb = _bmm(dP, kb, ws.take(ws.dq, G))
        dqb.addcmul_(_bmm(dob, _T(S_in), tmp_K), plan.a_1HC1)
        dkb = _bmm(_T(dP), qb, ws.take(ws.dk, G))
        dkb.addcmul_(_bmm(vb, _T(dS_out), tmp_K), g.b_G1C1)
        _store(dq, dqb, g)
        _store(dk, dkb, g)
        scores = _bmm(qb, _T(kb), ws.take(ws.scores, G)).mul_(plan.D_HCC)
        dvb = _bmm(_T(scores), dob, ws.take(ws.o, G))
        dvb.flatten(0, 1).baddbmm_(kd.flatten(0, 1), dS_out.flatten(0, 1))
        _store(dv, dvb, g)
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
