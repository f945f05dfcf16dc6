"""Expert parallelism and the global load-balancing loss on gloo ranks equal one process.

EP = 2: each rank runs its own rows of the batch through the `tiny` model with its half of
the experts; one process runs the concatenated batch with all of them. Logits, the loss
(with the aux loss, whose coefficient is raised so that a wrong router gradient would show),
the aux loss on every rank and every parameter gradient must match: a local expert's
gradient is the single-process one; a replicated parameter's, summed over the ranks (each
rank backpropagates its share, loss / R). A split row's aux loss is the whole row's.

Each case spawns its ranks (`test_parallel.spawn_ranks`: one torch thread each, a file
rendezvous, a timeout on the join so that a hang fails).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import assert_close
from test_parallel import CASES, gloo_group, model_and_row, spawn_ranks

from lightlong import HybridConfig, HybridLM
from lightlong.parallel import (
    SequenceSplit,
    apply_expert_parallel,
    expert_parameters,
    full_state_dict,
)

R, B, T = 2, 2, 16  # ranks, rows per rank, tokens per row
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}
ROUTINGS = ("random", "rank0-sends-nothing-to-rank1", "no-token-reaches-rank1")


def model_and_batch(routing: str, dtype: torch.dtype) -> tuple[HybridLM, torch.Tensor]:
    """The tiny model and a batch [R·B, T] (rank r's rows are r·B … r·B + B − 1).

    Other than "random", layer 0's router is forced by one embedding feature f: the gate
    scores +20·f for experts 0, 1 (rank 0's) and −20·f for 2, 3 (rank 1's). Rank 0's tokens
    have f = +1, so they choose experts 0 and 1 only; rank 1's tokens have f = ±1 by token
    parity ("rank0-sends-nothing-to-rank1") or +1 ("no-token-reaches-rank1": rank 1's
    experts get no token in layer 0).
    """
    cfg = dataclasses.replace(HybridConfig.from_preset("tiny"), router_aux_loss_coef=0.5)
    torch.manual_seed(0)
    model = HybridLM(cfg).to(dtype)
    V, half = cfg.vocab_size, cfg.vocab_size // 2
    g = torch.Generator().manual_seed(1)
    if routing == "random":
        return model, torch.randint(0, V, (R * B, T), generator=g)
    ids = torch.cat([torch.randint(0, half, (B, T), generator=g),
                     torch.randint(half, V, (B, T), generator=g)])  # fmt: skip
    with torch.no_grad():
        f = torch.ones(V, dtype=dtype)
        if routing == "rank0-sends-nothing-to-rank1":
            f[half + 1 :: 2] = -1
        model.model.embed_tokens.weight[:, 0] = f
        model.model.layers[0].block_sparse_moe.gate.weight[:, 0] = torch.tensor(
            [20.0, 20.0, -20.0, -20.0]
        )
    return model, ids


def rank_expert_parallel(rank, world, rendezvous, routing, dtype, out):
    torch.set_num_threads(1)
    with gloo_group(rank, world, rendezvous):
        model, ids = model_and_batch(routing, dtype)
        apply_expert_parallel(model)
        mine = ids[rank * B : (rank + 1) * B]
        o = model(mine, labels=mine)
        (o.loss / world).backward()  # this rank's share of the batch's loss
        torch.save({"logits": o.logits.detach(), "loss": o.loss.detach(),
                    "aux": o.aux_loss.detach(), "experts": list(expert_parameters(model)),
                    "grads": {n: p.grad for n, p in model.named_parameters()},
                    "full": full_state_dict(model)}, f"{out}/rank{rank}.pt")  # fmt: skip


def routed_layer0(model: HybridLM, ids: torch.Tensor) -> torch.Tensor:
    """int64 [R·B, T, k]: the experts layer 0 routes each token to."""
    seen = []
    gate = model.model.layers[0].block_sparse_moe.gate
    hook = gate.register_forward_hook(lambda m, i, o: seen.append(o.detach()))
    with torch.no_grad():
        model(ids)
    hook.remove()
    k = model.config.experts_per_token
    return seen[0].topk(k, dim=-1).indices.view(*ids.shape, k)


@pytest.mark.timeout(180)
@pytest.mark.parametrize(
    ("routing", "dtype"),
    [("random", torch.float64), ("random", torch.float32),
     ("rank0-sends-nothing-to-rank1", torch.float64),
     ("no-token-reaches-rank1", torch.float64)],
    ids=["random-float64", "random-float32", "rank0-sends-nothing-to-rank1-float64",
         "no-token-reaches-rank1-float64"],
)  # fmt: skip
def test_expert_parallel_equals_one_process(routing, dtype, tmp_path):
    results = spawn_ranks(rank_expert_parallel, R, tmp_path, routing, dtype, tmp_path,
                          timeout=150)  # fmt: skip
    model, ids = model_and_batch(routing, dtype)
    tol = TOL[dtype]
    on_rank1 = routed_layer0(model, ids) >= 2  # [R·B, T, k]: an expert that rank 1 holds
    if routing != "random":  # the forced routing took effect
        assert not on_rank1[:B].any()
        assert on_rank1[B:].any() == (routing == "rank0-sends-nothing-to-rank1")
    else:  # tokens cross in both directions
        assert on_rank1[:B].any() and not on_rank1[B:].all()

    o = model(ids, labels=ids)
    o.loss.backward()
    assert_close(torch.cat([r["logits"] for r in results]), o.logits, tol, "logits")
    assert_close(sum(r["loss"] for r in results) / R, o.loss, tol, "loss")
    for rank, r in enumerate(results):
        assert_close(r["aux"], o.aux_loss, tol, f"aux loss on rank {rank}")

    # experts 0, 1 of every layer on rank 0, 2, 3 on rank 1, under their global names
    experts = [n for n, _ in model.named_parameters() if ".experts." in n]
    assert sorted(results[0]["experts"] + results[1]["experts"]) == sorted(experts)
    for rank, r in enumerate(results):
        assert {int(n.split(".experts.")[1].split(".")[0]) for n in r["experts"]} == {
            2 * rank, 2 * rank + 1
        }  # fmt: skip
    for name, p in model.named_parameters():
        if name in experts:  # the only copy: the single-process gradient
            (owner,) = (r for r in results if name in r["experts"])
            assert_close(owner["grads"][name], p.grad, tol, name)
        else:  # replicated: each rank holds its share
            assert_close(sum(r["grads"][name] for r in results), p.grad, tol, name)

    # every rank gathers the full state dict, in the released names and order
    state = model.state_dict()
    for r in results:
        assert list(r["full"]) == list(state)
        assert all(torch.equal(r["full"][k], v) for k, v in state.items())


def rank_refuses(rank, world, rendezvous, out):
    torch.set_num_threads(1)
    with gloo_group(rank, world, rendezvous):
        cfg = dataclasses.replace(HybridConfig.from_preset("tiny"), num_experts=3)
        errors = []
        for model in (HybridLM(cfg), HybridLM(HybridConfig.from_preset("tiny"))):
            try:
                apply_expert_parallel(model)
                apply_expert_parallel(model)
            except ValueError as e:
                errors.append(str(e))
        torch.save({"errors": errors}, f"{out}/rank{rank}.pt")


@pytest.mark.timeout(120)
def test_expert_parallel_refuses_bad_degree_and_a_second_call(tmp_path):
    for r in spawn_ranks(rank_refuses, R, tmp_path, tmp_path):
        bad_degree, twice = r["errors"]
        assert "parallel.expert" in bad_degree and "2 must divide num_experts" in bad_degree
        assert "num_local_experts" in bad_degree and "= 3" in bad_degree
        assert "already applied" in twice


def rank_split_aux(rank, world, rendezvous, lengths, offsets, out):
    torch.set_num_threads(1)
    with gloo_group(rank, world, rendezvous):
        model, ids, _ = model_and_row("tiny", sum(lengths))
        split = SequenceSplit.of(lengths, offsets)
        aux = model(ids[:, split.start : split.start + lengths[rank]], split=split).aux_loss
        (aux / world).backward()
        torch.save({"aux": aux.detach(),
                    "grads": {n: p.grad for n, p in model.named_parameters()}},
                   f"{out}/rank{rank}.pt")  # fmt: skip


@pytest.mark.timeout(120)
def test_aux_loss_of_a_split_row_equals_one_process(tmp_path):
    """Every rank's aux loss is the row's, and the gradients of the ranks' shares add up to
    the single-process aux loss's (router and everything before it, float64)."""
    lengths, offsets = CASES["2-ranks-document-starts-at-the-boundary"]
    results = spawn_ranks(rank_split_aux, len(lengths), tmp_path, lengths, offsets, tmp_path)
    model, ids, _ = model_and_row("tiny", sum(lengths))
    aux = model(ids, cu_seqlens=torch.tensor(offsets)).aux_loss
    aux.backward()
    for rank, r in enumerate(results):
        assert_close(r["aux"], aux.detach(), 1e-10, f"aux loss on rank {rank}")
    for name, p in model.named_parameters():
        shares = [r["grads"][name] for r in results if r["grads"][name] is not None]
        assert_close(sum(shares) if shares else None, p.grad, 1e-10, f"aux gradient of {name}")
