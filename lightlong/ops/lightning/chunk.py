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
    D_HCC: Tensor  # intra-block decay mask
    a_1HC1: Tensor  # query decay of the inter term


def make_plan(offsets: list[int], s: Tensor, C: int, G: int, dtype: torch.dtype) -> _Plan:
    """Blocks each sequence [offsets[n], offsets[n+1]) by C, then groups blocks by G."""
    device = s.device
    start, length, seq = [], [], []
    for n, (a, b) in enumerate(zip(offsets[:-1], offsets[1:], strict=True)):
        for t in range(a, b, C):
            start.append(t)
            length.append(min(C, b - t))
            seq.append(n)
    M = len(seq)
    first = [m == 0 or seq[m - 1] != seq[m] for m in range(M)]
    last = [m == M - 1 or seq[m + 1] != seq[m] for m in range(M)]

    s = s.to(dtype)
    pos = torch.arange(C, device=device, dtype=dtype)
    gap_CC = pos[:, None] - pos[None, :]
    D_HCC = torch.exp(-s[:, None, None] * gap_CC.clamp(min=0)) * (gap_CC >= 0)
    a_1HC1 = torch.exp(-s[:, None] * (pos + 1))[None, :, :, None]
    b_full = torch.exp(-s[:, None] * (C - 1 - pos))[None, :, :, None]
    lam_full = torch.exp(-s * C)[None, :, None, None]

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
        gap_GHC = (L_G[:, None, None] - 1 - pos).clamp(min=0).expand(-1, len(s), -1)
        b_GHC = torch.exp(-s[:, None] * gap_GHC) * keep_GC[:, None, :]
        lam = torch.exp(-s[None, :] * L_G[:, None])[:, :, None, None]
        rows = slot_GC.clamp(max=last_token).reshape(-1)
        groups.append(_Group(m0, m1, start[m0], rows, keep_GC.reshape(-1), b_GHC[..., None], lam))
    return _Plan(C, seq, first, last, groups, D_HCC, a_1HC1)


def _load(x_TD: Tensor, g: _Group, C: int, dtype: torch.dtype) -> Tensor:
    """Reads a group's tokens from x [T_total, H, D] into blocks [G, H, C, D], pads zeroed."""
    G = g.m1 - g.m0
    H, D = x_TD.shape[1:]
    src = x_TD[g.t0 : g.t0 + G * C] if g.full else x_TD.index_select(0, g.rows)
    out = torch.empty((G, H, C, D), dtype=dtype, device=x_TD.device)
    out.copy_(src.view(G, C, H, D).permute(0, 2, 1, 3))
    if not g.full:
        out.mul_(g.keep.view(G, 1, C, 1))
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
    k: Tensor, v: Tensor, g: _Group, plan: _Plan, S_HKV: Tensor, init: Tensor | None,
    final: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """States entering each block of a group, and the state leaving it.

    k [G, H, C, K], v [G, H, C, V], S_HKV the state entering the group.
    Returns S_in [G, H, K, V] and the outgoing state [H, K, V]; writes each finished
    sequence's state into final [N, H, K, V] when given.
    """
    dS_GHKV = torch.matmul((k * g.b_G1C1).transpose(-1, -2), v)
    S_in = torch.empty_like(dS_GHKV)
    for i in range(g.m1 - g.m0):
        m = g.m0 + i
        if plan.first[m]:
            S_HKV = init[plan.seq[m]] if init is not None else torch.zeros_like(S_HKV)
        S_in[i] = S_HKV
        S_HKV = torch.addcmul(dS_GHKV[i], S_HKV, g.lam_GH11[i])
        if final is not None and plan.last[m]:
            final[plan.seq[m]] = S_HKV
    return S_in, S_HKV


def chunk_fwd(
    q: Tensor, k: Tensor, v: Tensor, init: Tensor | None, scale: float, plan: _Plan, N: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Forward over flat tokens: q, k [T, H, K], v [T, H, V], init [N, H, K, V] or None.

    Returns o [T, H, V] (q's dtype), final [N, H, K, V] and the state entering each group
    [num_groups, H, K, V], all states in the compute dtype (the plan's).
    """
    dt = plan.D_HCC.dtype
    T, H, K = q.shape
    V = v.shape[-1]
    o = torch.empty((T, H, V), dtype=q.dtype, device=q.device)
    final = init.to(dt).clone() if init is not None else q.new_zeros((N, H, K, V), dtype=dt)
    init = init.to(dt) if init is not None else None
    entries = q.new_empty((len(plan.groups), H, K, V), dtype=dt)
    S_HKV = q.new_zeros((H, K, V), dtype=dt)
    for gi, g in enumerate(plan.groups):
        entries[gi] = S_HKV
        qb = _load(q, g, plan.C, dt).mul_(scale)
        kb, vb = _load(k, g, plan.C, dt), _load(v, g, plan.C, dt)
        S_in, S_HKV = _scan(kb, vb, g, plan, S_HKV, init, final)
        attn_GHCC = torch.matmul(qb, kb.transpose(-1, -2)).mul_(plan.D_HCC)
        ob = torch.matmul(attn_GHCC, vb)
        ob += torch.matmul(qb.mul_(plan.a_1HC1), S_in)
        _store(o, ob, g)
    return o, final, entries


def chunk_bwd(
    q: Tensor, k: Tensor, v: Tensor, init: Tensor | None, scale: float, plan: _Plan,
    entries: Tensor, do: Tensor | None, dfinal: Tensor | None, N: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Backward of `chunk_fwd`, group by group in reverse, recomputing each group's states.

    do [T, H, V] and dfinal [N, H, K, V] may be None (no gradient reached them).
    Returns dq, dk, dv in the inputs' dtype and dinit [N, H, K, V] in the compute dtype.
    """
    dt = plan.D_HCC.dtype
    T, H, K = q.shape
    V = v.shape[-1]
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    zero_HKV = q.new_zeros((H, K, V), dtype=dt)
    dinit = dfinal.to(dt).clone() if dfinal is not None else q.new_zeros((N, H, K, V), dtype=dt)
    init = init.to(dt) if init is not None else None
    dS_HKV = zero_HKV  # gradient of the state entering the block after the current one
    for gi in reversed(range(len(plan.groups))):
        g = plan.groups[gi]
        G = g.m1 - g.m0
        qb = _load(q, g, plan.C, dt).mul_(scale)
        kb, vb = _load(k, g, plan.C, dt), _load(v, g, plan.C, dt)
        if do is not None:
            dob = _load(do, g, plan.C, dt)
        else:
            dob = qb.new_zeros(G, H, plan.C, V)
        S_in, _ = _scan(kb, vb, g, plan, entries[gi], init, None)

        qa = qb * plan.a_1HC1
        dS_from_o = torch.matmul(qa.transpose(-1, -2), dob)  # [G, H, K, V]
        dS_out = torch.empty_like(dS_from_o)
        for i in reversed(range(G)):
            m = g.m0 + i
            if plan.last[m]:
                dS_HKV = dfinal[plan.seq[m]].to(dt) if dfinal is not None else zero_HKV
            dS_out[i] = dS_HKV
            dS_HKV = torch.addcmul(dS_from_o[i], dS_HKV, g.lam_GH11[i])
            if plan.first[m]:
                dinit[plan.seq[m]] = dS_HKV

        kbd = kb * g.b_G1C1
        dP_GHCC = torch.matmul(dob, vb.transpose(-1, -2)).mul_(plan.D_HCC)
        dqb = torch.matmul(dP_GHCC, kb)
        dqb += torch.matmul(dob, S_in.transpose(-1, -2)).mul_(plan.a_1HC1)
        dqb.mul_(scale)
        dkb = torch.matmul(dP_GHCC.transpose(-1, -2), qb)
        dkb += torch.matmul(vb, dS_out.transpose(-1, -2)).mul_(g.b_G1C1)
        attn_GHCC = torch.matmul(qb, kb.transpose(-1, -2)).mul_(plan.D_HCC)
        dvb = torch.matmul(attn_GHCC.transpose(-1, -2), dob)
        dvb += torch.matmul(kbd, dS_out)
        _store(dq, dqb, g)
        _store(dk, dkb, g)
        _store(dv, dvb, g)
    return dq, dk, dv, dinit


class LightningChunkFn(torch.autograd.Function):
    """Autograd for the tiled form: `chunk_fwd` and the hand-written `chunk_bwd`."""

    @staticmethod
    def forward(ctx, q, k, v, init, scale, plan, num_seqs):
        o, final, entries = chunk_fwd(q, k, v, init, scale, plan, num_seqs)
        ctx.save_for_backward(q, k, v, init, entries)
        ctx.scale, ctx.plan, ctx.num_seqs = scale, plan, num_seqs
        ctx.set_materialize_grads(False)
        return o, final

    @staticmethod
    @once_differentiable
    def backward(ctx, do, dfinal):
        q, k, v, init, entries = ctx.saved_tensors
        dq, dk, dv, dinit = chunk_bwd(
            q, k, v, init, ctx.scale, ctx.plan, entries, do, dfinal, ctx.num_seqs
        )
        dinit = dinit.to(init.dtype) if init is not None and ctx.needs_input_grad[3] else None
        return dq, dk, dv, dinit, None, None, None
