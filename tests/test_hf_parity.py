"""Parity with `transformers`' MiniMax (through the checkpoint files users exchange) and with
an independent reference of the released model for what `transformers` does differently."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import assert_close, make
from released_reference import reference_logits

from lightlong import HybridConfig, HybridLM

transformers = pytest.importorskip("transformers")
from lightlong.model.hf import from_transformers, to_transformers  # noqa: E402


def config(layer_types: list[str], **kw) -> HybridConfig:
    """A tiny config `transformers` can express: power-of-two heads, full-head RoPE."""
    base = dict(
        vocab_size=97, hidden_size=32, num_layers=len(layer_types), num_heads=4, num_kv_heads=2,
        head_dim=8, layer_types=layer_types, rotary_dim=8, rope_theta=10000.0, block_size=16,
        num_experts=4, experts_per_token=2, intermediate_size=24, postnorm=True,
        linear_attn_alpha=1.7, full_attn_alpha=1.3, mlp_alpha=1.5, mlp_beta=0.8,
    )  # fmt: skip
    base.update(kw)
    return HybridConfig(**base).validate()


HYBRID = ["lightning", "lightning", "softmax", "lightning"]
LINEAR = ["lightning"] * 3


@pytest.fixture(scope="module", params=[("hybrid", HYBRID), ("linear", LINEAR)], ids=lambda p: p[0])
def pair(request):
    ours = make(config(request.param[1]))
    return ours, to_transformers(ours)


@pytest.mark.parametrize("T", [1, 15, 16, 17, 63, 300, 700])
def test_logits_match_transformers(pair, T):
    ours, theirs = pair
    ids = torch.randint(0, 97, (2, T), generator=torch.Generator().manual_seed(T))
    with torch.no_grad():
        a = ours(ids).logits
        b = theirs(input_ids=ids, use_cache=False).logits
    assert_close(a, b, 1e-4, f"logits T={T}")


def test_checkpoint_saved_by_transformers_loads_in_lightlong(pair, tmp_path):
    ours, theirs = pair
    theirs.save_pretrained(tmp_path / "hf")
    back = HybridLM.from_pretrained(tmp_path / "hf")
    assert back.config == ours.config
    ids = torch.randint(0, 97, (1, 40))
    with torch.no_grad():
        assert_close(
            back(ids).logits, theirs(input_ids=ids, use_cache=False).logits, 1e-5, "logits"
        )


def test_fused_expert_checkpoint_loads(pair, tmp_path):
    """`transformers` can also save its in-memory layout (mlp.experts.gate_up_proj ...)."""
    ours, theirs = pair
    theirs.save_pretrained(tmp_path / "fused", save_original_format=False)
    ids = torch.randint(0, 97, (1, 33))
    with torch.no_grad():
        assert_close(
            HybridLM.from_pretrained(tmp_path / "fused")(ids).logits,
            ours(ids).logits,
            1e-5,
            "logits",
        )


def test_from_transformers_round_trip(pair):
    ours, theirs = pair
    back = from_transformers(theirs)
    for (n1, p1), (n2, p2) in zip(ours.named_parameters(), back.named_parameters(), strict=True):
        assert n1 == n2 and torch.equal(p1, p2), n1


def test_reference_agrees_with_transformers_where_they_overlap():
    """The reference itself is checked against transformers on a config both express."""
    model = make(config(HYBRID))
    theirs = to_transformers(model)  # float32: its MoE kernel has no float64 path
    ids = torch.randint(0, 97, (1, 30))
    with torch.no_grad():
        assert_close(
            reference_logits(model, ids),
            theirs(input_ids=ids, use_cache=False).logits,
            1e-5,  # float32 transformers against the float64 reference
            "reference vs transformers",
        )


def test_config_fields_reach_transformers():
    ours = make(config(HYBRID))
    theirs = to_transformers(ours)
    assert theirs.config.layer_types == [
        "linear_attention",
        "linear_attention",
        "full_attention",
        "linear_attention",
    ]
    assert theirs.config.mlp_alpha_factor == pytest.approx(1.5)
    assert dataclasses.replace(ours.config) == HybridConfig.from_dict(theirs.config.to_dict())
