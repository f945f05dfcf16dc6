"""The hybrid model: config, MoE, packing, logits selection, losses, checkpoints."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close

from lightlong import HybridConfig, HybridLM
from lightlong.model import checkpoint as ckpt
from lightlong.model.config import PRESETS
from lightlong.nn import MoE
from lightlong.ops.moe import load_balancing_loss, route


def tiny(**overrides) -> HybridConfig:
    cfg = HybridConfig.from_preset("tiny")
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg.validate()


def make_model(seed: int = 0, **overrides) -> HybridLM:
    torch.manual_seed(seed)
    return HybridLM(tiny(**overrides))


# ------------------------------------------------------------------------- config


def test_minimax_text_01_parameter_counts_match_published():
    with torch.device("meta"):
        model = HybridLM(HybridConfig.from_preset("minimax-text-01"))
    counts = model.param_count()
    assert abs(counts["total"] / 456e9 - 1) < 0.005, counts
    assert abs(counts["active"] / 45.9e9 - 1) < 0.005, counts
    assert next(model.parameters()).device.type == "meta"


def test_minimax_text_01_layer_pattern():
    cfg = HybridConfig.from_preset("minimax-text-01")
    softmax = [i for i, t in enumerate(cfg.layer_types) if t == "softmax"]
    assert softmax == list(range(7, 80, 8))
    assert (cfg.head_dim, cfg.rotary_dim, cfg.rope_theta) == (128, 64, 1e7)


@pytest.mark.parametrize("name", ["tiny", "small", "demo"])
def test_preset_sizes_and_variants(name):
    with torch.device("meta"):
        counts = {
            v: HybridLM(PRESETS[f"{name}{v}"]).param_count()["total"]
            for v in ("", "-linear", "-softmax")
        }
    if name in ("tiny", "demo"):
        assert counts[""] < 2e6
    else:
        assert 40e6 < counts[""] < 60e6
    # the variants differ only in their mixers: same size within the GQA difference (and
    # the output gate, 6 % of demo's two layers)
    assert abs(counts["-linear"] / counts[""] - 1) < 0.07
    assert PRESETS[f"{name}-linear"].layer_types == ["lightning"] * PRESETS[name].num_layers
    assert PRESETS[f"{name}-softmax"].layer_types == ["softmax"] * PRESETS[name].num_layers


def test_unknown_preset_lists_valid_names():
    with pytest.raises(ValueError, match="tiny-linear"):
        HybridConfig.from_preset("tinny")


def test_from_preset_returns_a_copy():
    cfg = HybridConfig.from_preset("tiny")
    cfg.layer_types[0] = "softmax"
    assert HybridConfig.from_preset("tiny").layer_types[0] == "lightning"


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("hidden_size", 0, "hidden_size"),
        ("num_kv_heads", 3, "num_kv_heads"),
        ("layer_types", ["lightning"] * 3, "layer_types"),
        ("layer_types", ["lightning"] * 3 + ["mamba"], "layer_types"),
        ("rotary_dim", 7, "rotary_dim"),
        ("rotary_dim", 64, "rotary_dim"),
        ("experts_per_token", 5, "experts_per_token"),
        ("rope_theta", -1.0, "rope_theta"),
        ("router_aux_loss_coef", -0.1, "router_aux_loss_coef"),
        ("decay_slope_heads", 2, "decay_slope_heads"),
        ("decay_slope_heads", -1, "decay_slope_heads"),
    ],
)
def test_config_validation_names_the_field(field, value, match):
    cfg = HybridConfig.from_preset("tiny")
    setattr(cfg, field, value)
    with pytest.raises(ValueError, match=match):
        cfg.validate()


def test_config_round_trips_through_released_json(tmp_path):
    cfg = HybridConfig.from_preset("minimax-text-01")
    cfg.save_json(tmp_path / "config.json")
    raw = json.loads((tmp_path / "config.json").read_text())
    assert raw["attn_type_list"][:8] == [0] * 7 + [1]
    assert raw["layernorm_mlp_alpha"] == pytest.approx(160**0.25)
    assert HybridConfig.from_json(tmp_path / "config.json") == cfg


def test_decay_slope_heads_sets_the_rates_and_round_trips(tmp_path):
    """decay_slope_heads = R gives the lightning layers the first H of R heads' rates; it
    is kept in config.json; every other preset keeps MiniMax's rule (0)."""
    from lightlong.ops import decay_rates

    cfg = HybridConfig.from_preset("demo")
    assert cfg.decay_slope_heads == 64
    assert all(p.decay_slope_heads == 0 for n, p in PRESETS.items() if not n.startswith("demo"))
    model = HybridLM(cfg)
    layer = model.model.layers[0].self_attn
    assert torch.equal(layer.decay(torch.device("cpu")), decay_rates(64, 0, 2)[:4])
    plain = HybridLM(tiny())
    assert torch.equal(
        plain.model.layers[0].self_attn.decay(torch.device("cpu")), decay_rates(4, 0, 4)
    )
    cfg.save_json(tmp_path / "config.json")
    assert json.loads((tmp_path / "config.json").read_text())["decay_slope_heads"] == 64
    assert HybridConfig.from_json(tmp_path / "config.json") == cfg
    with pytest.raises(ValueError, match="decay_slope_heads"):
        cfg.to_hf_dict()


def test_config_reads_transformers_format():
    transformers = pytest.importorskip("transformers")
    cfg = tiny(rotary_dim=16, postnorm=True, mlp_alpha=2.5, linear_attn_beta=0.5)
    hf = transformers.MiniMaxConfig(
        **{k: v for k, v in cfg.to_hf_dict().items() if k != "model_type"}
    )
    back = HybridConfig.from_dict(hf.to_dict())
    for field in (
        "layer_types",
        "num_kv_heads",
        "head_dim",
        "mlp_alpha",
        "linear_attn_beta",
        "rotary_dim",
    ):
        assert getattr(back, field) == getattr(cfg, field), field


def test_malformed_config_json_is_named(tmp_path):
    (tmp_path / "config.json").write_text('{"hidden_size": 64,,}')
    with pytest.raises(ValueError, match=r"config\.json.*line 1"):
        HybridConfig.from_json(tmp_path / "config.json")


def test_config_missing_required_field_is_named(tmp_path):
    """attn_type_list has no released default (other missing fields take the released
    defaults: tests/test_released_reference.py)."""
    raw = HybridConfig.from_preset("tiny").to_minimax_dict()
    del raw["attn_type_list"]
    with pytest.raises(ValueError, match="attn_type_list"):
        HybridConfig.from_dict(raw)


# ---------------------------------------------------------------------------- MoE


def dense_moe(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """Every expert on every token, weighted by the (renormalised) top-k router weights."""
    x_ND = x.reshape(-1, x.shape[-1])
    probs = torch.softmax(moe.gate(x_ND), dim=-1)  # float64 here: no cast
    top_w, top_e = probs.topk(moe.top_k, dim=-1)
    w_NE = torch.zeros_like(probs).scatter(1, top_e, top_w / top_w.sum(-1, keepdim=True))
    y = sum(w_NE[:, e : e + 1] * expert(x_ND) for e, expert in enumerate(moe.experts))
    return y.view_as(x)


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_moe_grouped_dispatch_equals_dense(top_k):
    torch.manual_seed(0)
    moe = MoE(hidden_size=24, intermediate_size=40, num_experts=5, top_k=top_k).double()
    x = torch.randn(3, 17, 24, dtype=torch.float64)
    y, _ = moe(x)
    assert_close(y, dense_moe(moe, x), 1e-12, "grouped MoE vs dense")


def test_moe_gradients_reach_router_and_every_used_expert():
    torch.manual_seed(1)
    moe = MoE(hidden_size=16, intermediate_size=32, num_experts=4, top_k=2)
    y, aux = moe(torch.randn(2, 50, 16))
    (y.square().mean() + aux).backward()
    assert moe.gate.weight.grad is not None and moe.gate.weight.grad.abs().sum() > 0
    used = [e for e, ex in enumerate(moe.experts) if ex.w1.weight.grad is not None]
    assert used and all(moe.experts[e].w2.weight.grad.abs().sum() > 0 for e in used)


def test_aux_loss_on_a_hand_made_case():
    # 4 tokens, 2 experts, top-1: tokens 0-2 pick expert 0, token 3 picks expert 1
    logits = torch.log(torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.6, 0.4], [0.3, 0.7]]))
    r = route(logits, top_k=1)
    f = torch.tensor([3 / 4, 1 / 4])
    P = torch.tensor([0.9 + 0.8 + 0.6 + 0.3, 0.1 + 0.2 + 0.4 + 0.7]) / 4
    assert load_balancing_loss(r).item() == pytest.approx((2 * (f * P).sum()).item(), rel=1e-6)
    balanced = route(torch.zeros(8, 4), top_k=2)
    assert load_balancing_loss(balanced).item() == pytest.approx(2.0, rel=1e-6)


# ------------------------------------------------------------------- the model


@pytest.mark.parametrize("preset", ["tiny", "tiny-linear", "tiny-softmax"])
def test_packed_batch_equals_documents_one_by_one(preset):
    torch.manual_seed(0)
    model = HybridLM(HybridConfig.from_preset(preset)).double()
    lengths = [37, 1, 64, 66]
    ids = torch.randint(0, 512, (1, sum(lengths)))
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    packed = model(ids, cu_seqlens=cu).logits
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
        alone = model(ids[:, a:b]).logits
        assert_close(packed[:, a:b], alone, 1e-12, f"document [{a}, {b})")


def test_logits_to_keep():
    model = make_model()
    ids = torch.randint(0, 512, (2, 45))
    full = model(ids).logits
    last = model(ids, logits_to_keep=1).logits
    assert last.shape == (2, 1, 512)
    assert_close(last, full[:, -1:], 1e-6, "last position")
    idx = torch.tensor([0, 7, 44])
    assert_close(model(ids, logits_to_keep=idx).logits, full[:, idx], 1e-6, "chosen positions")


def test_loss_is_shifted_cross_entropy_plus_aux():
    model = make_model()
    ids = torch.randint(0, 512, (2, 33))
    labels = ids.clone()
    labels[0, 5] = -100
    out = model(ids, labels=labels)
    ref = F.cross_entropy(
        out.logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100
    )
    assert out.lm_loss.item() == pytest.approx(ref.item(), rel=1e-5)
    coef = model.config.router_aux_loss_coef
    assert out.loss.item() == pytest.approx((ref + coef * out.aux_loss).item(), rel=1e-5)


def test_packed_loss_does_not_predict_across_documents():
    model = make_model()
    ids = torch.randint(0, 512, (1, 40))
    cu = torch.tensor([0, 15, 40])
    packed = model(ids, cu_seqlens=cu, labels=ids).lm_loss
    a = model(ids[:, :15], labels=ids[:, :15]).lm_loss
    b = model(ids[:, 15:], labels=ids[:, 15:]).lm_loss
    assert packed.item() == pytest.approx(((a * 14 + b * 24) / 38).item(), rel=1e-5)


def test_training_step_reduces_loss():
    model = make_model()
    ids = torch.randint(0, 512, (2, 48))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(8):
        loss = model(ids, labels=ids).loss
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first * 0.9


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"input_ids": torch.zeros(5, dtype=torch.long)}, "input_ids"),
        ({"input_ids": torch.zeros(1, 5)}, "input_ids must be int64"),
        ({"input_ids": torch.full((1, 5), 512)}, "vocab_size"),
        (
            {"input_ids": torch.zeros(2, 5, dtype=torch.long), "cu_seqlens": torch.tensor([0, 5])},
            "B == 1",
        ),
        (
            {"input_ids": torch.zeros(1, 5, dtype=torch.long), "cu_seqlens": torch.tensor([0, 4])},
            "end at T=5",
        ),
        ({"input_ids": torch.zeros(1, 5, dtype=torch.long), "logits_to_keep": 9}, "logits_to_keep"),
        (
            {
                "input_ids": torch.zeros(1, 5, dtype=torch.long),
                "labels": torch.zeros(1, 4, dtype=torch.long),
            },
            "labels",
        ),
    ],
)
def test_bad_inputs_are_named(kwargs, match):
    model = make_model()
    with pytest.raises(ValueError, match=match):
        model(**kwargs)


def test_sequence_over_limit_is_rejected():
    model = make_model(max_position_embeddings=16)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(torch.zeros(1, 17, dtype=torch.long))


# ------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("shard", ["5GB", "60KB"])
@pytest.mark.parametrize("tied", [False, True])
def test_save_load_round_trip(tmp_path, shard, tied):
    model = make_model(tie_word_embeddings=tied)
    model.save_pretrained(tmp_path / "ck", max_shard_size=shard)
    files = sorted(p.name for p in (tmp_path / "ck").iterdir())
    assert ("model.safetensors.index.json" in files) == (shard == "60KB")
    loaded = HybridLM.from_pretrained(tmp_path / "ck")
    ids = torch.randint(0, 512, (1, 50))
    assert torch.equal(loaded(ids).logits, model(ids).logits)
    assert loaded.config == model.config


def test_load_with_dtype(tmp_path):
    model = make_model()
    model.save_pretrained(tmp_path / "ck")
    loaded = HybridLM.from_pretrained(tmp_path / "ck", dtype=torch.bfloat16)
    assert next(loaded.parameters()).dtype == torch.bfloat16
    ids = torch.randint(0, 512, (1, 20))
    assert torch.isfinite(loaded(ids).logits.float()).all()


def test_crash_mid_save_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    good = make_model(seed=0)
    good.save_pretrained(tmp_path / "ck", max_shard_size="60KB")
    before = {p.name: p.read_bytes() for p in (tmp_path / "ck").iterdir()}
    calls = {"n": 0}
    real_save = ckpt.save_file

    def crash_on_third(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError("disk full")
        return real_save(*args, **kwargs)

    monkeypatch.setattr(ckpt, "save_file", crash_on_third)
    with pytest.raises(OSError, match="disk full"):
        make_model(seed=1).save_pretrained(tmp_path / "ck", max_shard_size="60KB")
    after = {p.name: p.read_bytes() for p in (tmp_path / "ck").iterdir()}
    assert after == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def _saved(tmp_path):
    model = make_model()
    model.save_pretrained(tmp_path / "ck")
    return model, tmp_path / "ck"


def _edit_weights(path, edit):
    from safetensors.torch import load_file, save_file

    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors")


def test_missing_tensor_is_named(tmp_path):
    _, path = _saved(tmp_path)
    _edit_weights(path, lambda t: t.pop("model.layers.1.self_attn.output_gate.weight"))
    with pytest.raises(ValueError, match=r"layers\.1\.self_attn\.output_gate"):
        HybridLM.from_pretrained(path)


def test_unexpected_tensor_is_named(tmp_path):
    _, path = _saved(tmp_path)
    _edit_weights(path, lambda t: t.update({"model.layers.0.extra.weight": torch.zeros(2)}))
    with pytest.raises(ValueError, match=r"unexpected tensor 'model\.layers\.0\.extra\.weight'"):
        HybridLM.from_pretrained(path)


def test_misshaped_tensor_names_key_and_shapes(tmp_path):
    _, path = _saved(tmp_path)
    _edit_weights(path, lambda t: t.update({"model.norm.weight": torch.ones(7)}))
    with pytest.raises(ValueError, match=r"model\.norm\.weight.*\(7,\).*\(64,\)"):
        HybridLM.from_pretrained(path)


def test_transformers_derived_buffers_are_recognised(tmp_path):
    _, path = _saved(tmp_path)
    _edit_weights(
        path, lambda t: t.update({"model.layers.0.self_attn.slope_rate": torch.ones(4, 1, 1)})
    )
    HybridLM.from_pretrained(path)


def test_malformed_index_is_named(tmp_path):
    make_model().save_pretrained(tmp_path / "ck", max_shard_size="60KB")
    (tmp_path / "ck" / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(ValueError, match="malformed index"):
        HybridLM.from_pretrained(tmp_path / "ck")


def test_bad_shard_size_is_named():
    with pytest.raises(ValueError, match="max_shard_size"):
        ckpt.parse_size("lots")


def test_fp32_lm_head_computes_logits_and_loss_in_fp32():
    """bf16 weights: the fp32 head's logits are float32 and nearer the float64 head's than
    the bf16 head's; the loss and the gradient of the head follow the same path."""
    torch.manual_seed(0)
    model = HybridLM(tiny()).to(torch.bfloat16)
    ids = torch.randint(0, 512, (1, 40))
    with torch.no_grad():
        low = model(ids).logits
        model.fp32_lm_head = True
        high = model(ids).logits
    assert low.dtype == torch.bfloat16 and high.dtype == torch.float32
    # the same forward up to the head: compare each head on the model's own hidden states
    captured = {}
    model.model.norm.register_forward_hook(lambda m, i, o: captured.setdefault("h", o))
    with torch.no_grad():
        model(ids)
    h = captured["h"]
    exact = h.double() @ model.lm_head.weight.double().T
    bf16 = (h @ model.lm_head.weight.T).double()
    assert rel(high.double(), exact) < rel(bf16, exact) / 10
    out = model(ids, labels=ids, logits_to_keep=0)
    assert out.lm_loss.dtype == torch.float32
    out.loss.backward()
    assert model.lm_head.weight.grad is not None and torch.isfinite(model.lm_head.weight.grad).all()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_autocast_forward_is_the_same_with_and_without_autograd():
    """The residual stream stays fp32 under bf16 autocast whether or not autograd records
    (the no-grad path adds in place: it must not round the stream to the mixer's bf16),
    so evaluation under autocast computes what training does."""
    torch.manual_seed(0)
    model = HybridLM(HybridConfig.from_preset("tiny")).eval()
    ids = torch.randint(0, 512, (2, 19))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with_grad = model(ids).logits
        with torch.no_grad():
            without = model(ids).logits
    assert with_grad.requires_grad and not without.requires_grad
    assert torch.equal(with_grad.detach(), without)


def test_decode_refuses_a_cache_of_the_wrong_state_dtype():
    from lightlong.infer import HybridCache

    model = HybridLM(HybridConfig.from_preset("tiny")).double().eval()
    cache = HybridCache(model.config, 1)  # fp32 states by default: an fp64 model needs fp64
    with torch.no_grad(), pytest.raises(ValueError, match=r"states must be torch\.float64"):
        model(torch.tensor([[4]]), cache=cache)  # the first token: a decode step
