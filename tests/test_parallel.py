"""Lightning attention with a packed row split across gloo ranks equals the single-process
op: outputs and the gradients of q, k, v and the initial state (float64).

Each case spawns its ranks with torch.multiprocessing (one torch thread each, a file
rendezvous, a timeout on the join so that a hang fails).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import assert_close

from lightlong import HybridConfig, HybridLM
from lightlong.ops.attention import causal_attention
from lightlong.ops.lightning import lightning_attn
from lightlong.parallel import SequenceSplit, lightning_attn_split, softmax_attn_split

H, K = 3, 8
CASES = {  # ranks' chunk lengths, document offsets of the row (None: one document)
    "2-ranks-one-document": ([37, 29], None),
    "2-ranks-document-starts-at-the-boundary": ([20, 17], [0, 9, 20, 37]),
    "4-ranks-documents-across-boundaries": ([13, 1, 30, 22], [0, 5, 40, 66]),
    "4-ranks-one-token-rank-starts-a-document": ([10, 1, 12, 9], [0, 10, 11, 32]),
    "4-ranks-a-rank-within-one-document": ([7, 16, 3, 11], [0, 2, 30, 37]),
}


def inputs(T: int):
    g = torch.Generator().manual_seed(T)
    q, k = (torch.randn(1, T, H, K, generator=g, dtype=torch.float64) for _ in range(2))
    v = torch.randn(1, T, H, K, generator=g, dtype=torch.float64)
    w = torch.randn(1, T, H, K, generator=g, dtype=torch.float64)  # the loss's weights
    init = torch.randn(H, K, K, generator=g, dtype=torch.float64)
    decay = torch.tensor([0.0, 0.05, 0.7])  # 0: plain linear attention
    return q, k, v, w, init, decay


def rank_main(rank, world, rendezvous, lengths, offsets, with_init, out, op="lightning"):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank,
                            world_size=world)  # fmt: skip
    try:
        T = sum(lengths)
        q, k, v, w, init, decay = inputs(T)
        a = sum(lengths[:rank])
        b = a + lengths[rank]
        mine = [x[:, a:b].clone().requires_grad_() for x in (q, k, v)]
        init = init.clone().requires_grad_() if with_init else None
        split = SequenceSplit.of(lengths, offsets)
        if op == "softmax":  # GQA: 3 query heads share one key/value head; row: K, V
            o, kv = softmax_attn_split(mine[0], mine[1][:, :, :1], mine[2][:, :, :1], split,
                                       output_kv=True)  # fmt: skip
            row = torch.stack(kv)
        else:  # row: the final state
            o, row = lightning_attn_split(*mine, decay, split, scale=0.5, initial_state=init,
                                          output_final_state=True, block_size=4)  # fmt: skip
        (o * w[:, a:b]).sum().backward()
        dinit = init.grad if with_init else None
        torch.save({"o": o.detach(), "grads": [x.grad for x in mine], "dinit": dinit,
                    "row": row.detach()}, f"{out}/rank{rank}.pt")  # fmt: skip
    finally:
        dist.destroy_process_group()


@contextlib.contextmanager
def gloo_group(rank: int, world: int, rendezvous) -> Iterator[None]:
    """This process as `rank` of a gloo group of `world` (file rendezvous), left on exit."""
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank,
                            world_size=world)  # fmt: skip
    try:
        yield
    finally:
        dist.destroy_process_group()


def spawn_ranks(target, world: int, tmp_path, *args, timeout: float = 90) -> list[dict]:
    """Runs target(rank, world, rendezvous, *args) on `world` spawned processes (killed past
    the timeout); returns what each rank saved as tmp_path/rank{r}.pt."""
    ctx = mp.get_context("spawn")
    procs = [
        ctx.Process(target=target, args=(r, world, tmp_path / "rdv", *args)) for r in range(world)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=timeout)
    for p in procs:
        if p.is_alive():
            p.kill()
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]


def run_ranks(lengths, offsets, with_init, tmp_path, op="lightning") -> list[dict]:
    """The attention ops on len(lengths) ranks; each rank's results."""
    return spawn_ranks(rank_main, len(lengths), tmp_path, lengths, offsets, with_init,
                       tmp_path, op)  # fmt: skip


@pytest.mark.timeout(120)
@pytest.mark.parametrize("with_init", [False, True], ids=["zero-state", "initial-state"])
@pytest.mark.parametrize("case", list(CASES))
def test_split_row_equals_one_process(case, with_init, tmp_path):
    lengths, offsets = CASES[case]
    T = sum(lengths)
    results = run_ranks(lengths, offsets, with_init, tmp_path)

    q, k, v, w, init, decay = inputs(T)
    q, k, v = (x.clone().requires_grad_() for x in (q, k, v))
    init = init.clone().requires_grad_()
    cu = None if offsets is None else torch.tensor(offsets)
    N = 1 if offsets is None else len(offsets) - 1
    first = init if with_init else init * 0
    init_N = torch.cat([first[None], first.new_zeros(N - 1, H, K, K)])
    o, finals = lightning_attn(q, k, v, decay, scale=0.5, initial_state=init_N,
                               output_final_state=True, cu_seqlens=cu)  # fmt: skip
    (o * w).sum().backward()

    assert_close(torch.cat([r["o"] for r in results], dim=1), o, 1e-10, "o")
    for r, result in enumerate(results):  # every rank holds the row's last state
        assert_close(result["row"], finals[-1], 1e-10, f"final state on rank {r}")
    for i, name in enumerate(("dq", "dk", "dv")):
        got = torch.cat([r["grads"][i] for r in results], dim=1)
        assert_close(got, (q, k, v)[i].grad, 1e-10, name)
    if with_init:  # each rank holds its share of the replicated state's gradient
        shares = [r["dinit"] for r in results if r["dinit"] is not None]  # None: not used
        assert_close(sum(shares), init.grad, 1e-10, "d(initial state)")


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    "case", ["4-ranks-documents-across-boundaries", "4-ranks-one-token-rank-starts-a-document"]
)
def test_softmax_over_a_split_row_equals_one_process(case, tmp_path):
    """All-gathered keys and values (chunks of different lengths, GQA), causal within
    documents: output, dq and the dK, dV summed back to the rank holding them."""
    lengths, offsets = CASES[case]
    results = run_ranks(lengths, offsets, False, tmp_path, op="softmax")
    q, k, v, w, _, _ = inputs(sum(lengths))
    q, k, v = q.clone().requires_grad_(), k[:, :, :1].clone().requires_grad_(), v[:, :, :1]
    v = v.clone().requires_grad_()
    o = causal_attention(q, k, v, cu_seqlens=torch.tensor(offsets))
    (o * w).sum().backward()
    assert_close(torch.cat([r["o"] for r in results], dim=1), o, 1e-10, "o")
    for r, result in enumerate(results):  # every rank holds the row's keys and values
        assert torch.equal(result["row"], torch.stack([k, v]).detach()), f"K, V on rank {r}"
    for i, name in enumerate(("dq", "dk", "dv")):
        got = torch.cat([r["grads"][i] for r in results], dim=1)
        ref = (q, k, v)[i].grad
        if i:  # the ranks' k, v had 3 heads of which the op used the first
            assert not got[:, :, 1:].any()
            got = got[:, :, :1]
        assert_close(got, ref, 1e-10, name)


def test_split_is_checked(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rdv'}", rank=0,
                            world_size=1)  # fmt: skip
    try:
        with pytest.raises(ValueError, match="lengths must give each of the 1 ranks"):
            SequenceSplit.of([3, 4])
        with pytest.raises(ValueError, match="cu_seqlens must rise strictly from 0"):
            SequenceSplit.of([7], [0, 3, 3, 7])
        split = SequenceSplit.of([7], [0, 3, 7])
        assert split.cu_seqlens.tolist() == [0, 3, 7] and split.starts_document == (True,)
        assert split.first_continues  # the row's first document: from its initial state
        q = torch.randn(1, 5, H, K)
        with pytest.raises(ValueError, match=r"q must be \[1, 7, H, K\]"):
            lightning_attn_split(q, q, q, torch.zeros(H), split)
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------------- the model, split


def model_and_row(preset: str, T: int, dtype: torch.dtype = torch.float64):
    torch.manual_seed(0)
    model = HybridLM(HybridConfig.from_preset(preset)).to(dtype)
    g = torch.Generator().manual_seed(T + 1)
    ids = torch.randint(0, model.config.vocab_size, (1, T), generator=g)
    w = torch.randn(1, T, model.config.vocab_size, generator=g, dtype=torch.float64).to(dtype)
    return model, ids, w


def rank_model(rank, world, rendezvous, lengths, offsets, preset, out, dtype):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank,
                            world_size=world)  # fmt: skip
    try:
        model, ids, w = model_and_row(preset, sum(lengths), dtype)
        split = SequenceSplit.of(lengths, offsets)
        a, b = split.start, split.start + lengths[rank]
        logits = model(ids[:, a:b], split=split).logits
        (logits * w[:, a:b]).sum().backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad()
        share = model(ids[:, a:b], split=split, labels=ids[:, a:b], logits_to_keep=0).loss
        share.backward()
        loss_grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        torch.save({"logits": logits.detach(), "grads": grads, "loss": share.detach(),
                    "loss_grads": loss_grads}, f"{out}/rank{rank}.pt")  # fmt: skip
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(180)
@pytest.mark.parametrize(
    ("preset", "case", "dtype"),
    [("tiny", "2-ranks-document-starts-at-the-boundary", "float64"),
     ("tiny", "4-ranks-documents-across-boundaries", "float64"),
     ("tiny-linear", "4-ranks-one-token-rank-starts-a-document", "float64"),
     ("tiny", "4-ranks-documents-across-boundaries", "float32"),
     ("tiny-linear", "2-ranks-document-starts-at-the-boundary", "float32")],
)  # fmt: skip
def test_model_on_a_split_row_equals_one_process(preset, case, dtype, tmp_path):
    """tiny (lightning + softmax) and tiny-linear: every rank's logits equal the
    single-process forward's for its tokens, and the parameter gradients summed over the
    ranks equal the single-process ones (float64 to 1e-10, float32 to 1e-5)."""
    lengths, offsets = CASES[case]
    tol = {"float64": 1e-10, "float32": 1e-5}[dtype]
    dtype = getattr(torch, dtype)
    results = spawn_ranks(rank_model, len(lengths), tmp_path, lengths, offsets, preset,
                          tmp_path, dtype, timeout=150)  # fmt: skip

    model, ids, w = model_and_row(preset, sum(lengths), dtype)
    cu = torch.tensor(offsets)
    logits = model(ids, cu_seqlens=cu).logits
    (logits * w).sum().backward()
    assert_close(torch.cat([r["logits"] for r in results], dim=1), logits, tol, "logits")
    for name, p in model.named_parameters():
        shares = [r["grads"][name] for r in results if name in r["grads"]]
        assert_close(sum(shares), p.grad, tol, name)
    # the next-token loss across rank boundaries and the row's aux loss: the ranks' shares
    # add up to the row's
    model.zero_grad()
    loss = model(ids, cu_seqlens=cu, labels=ids, logits_to_keep=0).loss
    loss.backward()
    assert_close(sum(r["loss"] for r in results), loss.detach(), tol, "loss")
    for name, p in model.named_parameters():
        shares = [r["loss_grads"][name] for r in results if name in r["loss_grads"]]
        assert_close(sum(shares), p.grad, tol, f"loss gradient of {name}")


def test_model_refuses_what_cannot_run_split(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rdv'}", rank=0,
                            world_size=1)  # fmt: skip
    try:
        split = SequenceSplit.of([6], [0, 6])
        model, ids, _ = model_and_row("tiny", 6)
        with pytest.raises(ValueError, match=r"input_ids must be \[1, 6\]"):
            model(ids[:, :5], split=split)
        with pytest.raises(ValueError, match="no cu_seqlens"):
            model(ids, split=split, cu_seqlens=torch.tensor([0, 6]))
        cfg = HybridConfig.from_preset("tiny")
        windowed = HybridLM(dataclasses.replace(cfg, layer_types=["window_softmax"] * 4))
        with pytest.raises(ValueError, match=r"'window_softmax'"):
            windowed(ids, split=split)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("start", [0, 5, 36])
def test_the_state_only_pass_equals_the_ops_final_state(start):
    """chunk_state (no outputs) is the state lightning_attn ends a chunk with, from the last
    document's start (37 tokens: not a multiple of any block; decay 0 included)."""
    from lightlong.parallel.lightning import chunk_state

    q, k, v, _, _, decay = inputs(37)
    k, v = k.clone().requires_grad_(), v.clone().requires_grad_()
    cu = torch.tensor([0, start, 37] if start else [0, 37])
    _, finals = lightning_attn(q, k, v, decay, output_final_state=True, cu_seqlens=cu,
                               block_size=8)  # fmt: skip
    w = torch.randn_like(finals[-1])
    (finals[-1] * w).sum().backward()
    expected = finals[-1].detach(), k.grad.clone(), v.grad.clone()
    k.grad = v.grad = None
    state = chunk_state(k, v, decay, start)
    (state * w).sum().backward()
    for got, want, name in zip(
        (state.detach(), k.grad, v.grad), expected, ("M", "dk", "dv"), strict=True
    ):
        assert_close(got, want, 1e-12, name)
