"""The model against MiniMax's released modeling code (written out in float64 in
released_reference.py, no `transformers` needed), read through each config.json dialect:
released Text-01 / M1 fields and their defaults, the shared expert, `transformers`' native
`minimax` schema, and what an export to `transformers`' format refuses."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import assert_close, make
from released_reference import reference_logits
from safetensors import safe_open

from lightlong import HybridConfig, HybridLM
from lightlong.model.config import PRESETS


def released(**kw) -> dict:
    """A small released-format config.json (MiniMax-Text-01's field names)."""
    d = {
        "architectures": ["MiniMaxText01ForCausalLM"], "model_type": "minimax_text_01",
        "vocab_size": 97, "hidden_size": 32, "num_hidden_layers": 4,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
        "attn_type_list": [0, 0, 1, 0], "rotary_dim": 4, "rope_theta": 10000.0,
        "num_local_experts": 4, "num_experts_per_tok": 2, "intermediate_size": 24,
        "postnorm": True, "layernorm_linear_attention_alpha": 1.7,
        "layernorm_full_attention_alpha": 1.3, "layernorm_mlp_alpha": 1.5,
        "layernorm_mlp_beta": 0.8, "block_size": 16, "hidden_act": "silu",
    }  # fmt: skip
    d.update(kw)
    return d


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"num_attention_heads": 6, "num_key_value_heads": 2, "rotary_dim": 8},
        {"num_attention_heads": 3, "num_key_value_heads": 1, "rotary_dim": 2, "postnorm": False},
        {"num_key_value_heads": 4, "rotary_dim": 0},
        {"shared_intermediate_size": 24, "shared_moe_mode": "sigmoid"},
        {
            "architectures": ["MiniMaxM1ForCausalLM"],
            "model_type": "minimax_m1",
            "shared_intermediate_size": [16],
        },
    ],
    ids=["partial-rope", "six-heads", "three-heads-prenorm", "no-rope", "shared-expert", "m1"],
)
def test_logits_equal_the_released_model(fields):
    cfg = HybridConfig.from_dict(released(**fields))
    model = make(cfg).double()
    ids = torch.randint(0, 97, (2, 45), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert_close(model(ids).logits, reference_logits(model, ids), 1e-12, "logits vs reference")


def test_missing_fields_take_the_released_defaults():
    """The released configuration class and modeling code's defaults, not lightlong's."""
    cfg = HybridConfig.from_dict({"attn_type_list": [0, 1], "num_hidden_layers": 2})
    assert (cfg.postnorm, cfg.num_kv_heads, cfg.rope_theta) == (False, 8, 1e6)
    assert (cfg.vocab_size, cfg.hidden_size, cfg.num_heads, cfg.head_dim) == (32000, 4096, 32, 128)
    assert (cfg.num_experts, cfg.experts_per_token, cfg.intermediate_size) == (8, 2, 14336)
    assert cfg.rotary_dim == cfg.head_dim  # getattr(config, "rotary_dim", head_dim)
    assert (cfg.max_position_embeddings, cfg.block_size) == (4096 * 32, 256)
    assert cfg.shared_intermediate_size == 0 and cfg.model_type == "minimax_text_01"
    with pytest.raises(ValueError, match="attn_type_list"):
        HybridConfig.from_dict({"model_type": "minimax_text_01", "num_hidden_layers": 2})


def test_transformers_native_schema_as_transformers_runs_it():
    """transformers' MiniMax: post-norm, RoPE over the whole head whatever
    partial_rotary_factor says, alternating layers (full first) by default."""
    cfg = HybridConfig.from_dict(
        {"model_type": "minimax", "num_hidden_layers": 4, "hidden_size": 128,
         "num_attention_heads": 8, "partial_rotary_factor": 0.5, "mlp_alpha_factor": 2.0}
    )  # fmt: skip
    assert cfg.layer_types == ["softmax", "lightning"] * 2
    assert cfg.postnorm and cfg.rotary_dim == cfg.head_dim == 16
    assert (cfg.num_kv_heads, cfg.rope_theta, cfg.mlp_alpha) == (8, 1e6, 2.0)
    with pytest.raises(ValueError, match="rope_type 'yarn'"):
        HybridConfig.from_dict(
            {"model_type": "minimax", "num_hidden_layers": 2, "num_attention_heads": 8,
             "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6}}
        )  # fmt: skip


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
        ({"attn_type_list": [0, 2, 1, 0]}, r"attn_type_list\[1\] = 2"),
        ({"architectures": ["LlamaForCausalLM"]}, "LlamaForCausalLM"),
        ({"shared_intermediate_size": 8, "shared_moe_mode": "softmax"}, "shared_moe_mode"),
        ({"shared_intermediate_size": [8, 0, 0, 0]}, "differs by layer"),
        ({"attn_type_list": [0, 1]}, "attn_type_list has 2 entries, num_hidden_layers is 4"),
    ],
)
def test_unsupported_released_fields_are_refused_by_name(fields, match):
    with pytest.raises(ValueError, match=match):
        HybridConfig.from_dict(released(**fields))


def test_m1_and_text01_round_trip_with_their_architecture_names(tmp_path):
    for model_type, arch in (("minimax_m1", "MiniMaxM1ForCausalLM"),
                             ("minimax_text_01", "MiniMaxText01ForCausalLM")):  # fmt: skip
        cfg = HybridConfig.from_dict(released(model_type=model_type, architectures=[arch]))
        assert cfg.model_type == model_type
        written = cfg.to_minimax_dict()
        assert written["architectures"] == [arch] and written["model_type"] == model_type
        assert HybridConfig.from_dict(written) == cfg
    for name in ("minimax-m1-40k", "minimax-m1-80k"):
        m1, text01 = PRESETS[name], PRESETS["minimax-text-01"]
        assert m1.model_type == "minimax_m1"
        assert m1.to_minimax_dict() | {"architectures": 0, "model_type": 0} == (
            text01.to_minimax_dict() | {"architectures": 0, "model_type": 0}
        )


def test_m1_preset_sizes_as_published():
    """MiniMax-M1: 456B parameters, 45.9B active per token (built on the meta device)."""
    with torch.device("meta"):
        counts = HybridLM(HybridConfig.from_preset("minimax-m1-80k")).param_count()
    assert counts["total"] / 1e9 == pytest.approx(456, rel=0.01)
    assert counts["active"] / 1e9 == pytest.approx(45.9, rel=0.01)  # without embeddings


def test_shared_expert_weights_have_the_released_names(tmp_path):
    cfg = HybridConfig.from_dict(released(shared_intermediate_size=24))
    model = make(cfg).float()
    model.save_pretrained(tmp_path / "ck")
    with safe_open(tmp_path / "ck" / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    for name in ("shared_mlp.gate_proj", "shared_mlp.up_proj", "shared_mlp.down_proj",
                 "coefficient"):  # fmt: skip
        assert f"model.layers.3.{name}.weight" in keys
    saved = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert saved["shared_intermediate_size"] == 24 and saved["shared_moe_mode"] == "sigmoid"
    back = HybridLM.from_pretrained(tmp_path / "ck")
    ids = torch.randint(0, 97, (1, 20))
    with torch.no_grad():
        assert torch.equal(back(ids).logits, model(ids).logits)


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"rotary_dim": 4}, "rotary_dim=4"),
        ({"postnorm": False, "rotary_dim": 8}, "postnorm"),
        ({"shared_intermediate_size": 24, "rotary_dim": 8}, "shared expert"),
        ({"num_attention_heads": 6, "num_key_value_heads": 2, "rotary_dim": 8}, "power of two"),
    ],
)
def test_transformers_export_refuses_what_it_would_run_differently(tmp_path, fields, match):
    model = HybridLM(HybridConfig.from_dict(released(**fields)))
    with pytest.raises(ValueError, match=match):
        model.save_pretrained(tmp_path / "ck", config_format="transformers")
    assert not (tmp_path / "ck").exists()
    model.save_pretrained(tmp_path / "ck")  # the released format holds it
