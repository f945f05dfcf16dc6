"""MiniMax-VL-01 (`HybridVLM`): configs, sizing, the image-feature path, checkpoints in the
released and `transformers`' layouts, and logits equal to `transformers`' LLaVA-NeXT built
around its MiniMax (MiniMax-VL-01's architecture)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from conftest import assert_close

from lightlong import HybridLM, HybridVLM, VLConfig
from lightlong.model.checkpoint import CheckpointError
from lightlong.model.config import HybridConfig
from lightlong.model.vision import MINIMAX_VL_PINPOINTS, VisionConfig, _tile_count


def tiny_config(text: HybridConfig | None = None, **kw) -> VLConfig:
    base = VLConfig.from_preset("tiny-vl")
    if text is not None:
        base = dataclasses.replace(base, text=text, image_token_id=text.vocab_size - 1)
    return dataclasses.replace(base, **kw).validate()


def images_for(config: VLConfig, sizes: list[tuple[int, int]], seed: int = 0):
    """Random tiles for images of these sizes, and each image's <image> count."""
    tiles = sum(_tile_count(s, config) for s in sizes)
    S = config.vision.image_size
    g = torch.Generator().manual_seed(seed)
    return torch.randn(tiles, 3, S, S, generator=g), [config.num_image_tokens(s) for s in sizes]


def prompt(config: VLConfig, counts: list[int], seed: int = 0) -> list[int]:
    """Random text around each image's run of <image> tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = []
    for n in counts:
        ids += torch.randint(0, config.image_token_id, (3,), generator=g).tolist()
        ids += [config.image_token_id] * n
    return ids + torch.randint(0, config.image_token_id, (4,), generator=g).tolist()


def test_minimax_vl_01_preset_sizes():
    """The released sizes: a 303M ViT (24 × 1024 wide, patch 14 at 336 px: 577 positions),
    the 1024 → 6144 → 6144 projector, 576 features a tile, and the text model of Text-01."""
    c = VLConfig.from_preset("minimax-vl-01")
    with torch.device("meta"):
        m = HybridVLM(c)
    counts = m.param_count()
    C, I, L = 1024, 4096, 24
    vit = 3 * 14 * 14 * C + C + 577 * C + 2 * C + L * (4 * (C * C + C) + 4 * C + 2 * C * I + I + C)
    projector = C * 6144 + 6144 + 6144 * 6144 + 6144
    assert 303e6 < vit < 304e6
    assert counts["vision"] == vit + projector + 6144
    with torch.device("meta"):
        text = HybridLM(c.text).param_count()
    assert counts["total"] == text["total"] + counts["vision"]
    assert counts["active"] == text["active"]
    assert c.tile_tokens == 576 and c.image_token_id == 200025
    assert len(c.image_grid_pinpoints) == 28 and c.image_grid_pinpoints == MINIMAX_VL_PINPOINTS
    # a 640×480 photo: the 672×672 grid (2×2 tiles), 36 of 48 rows kept, 48 + 1 per row
    assert c.num_image_tokens((480, 640)) == 576 + 36 * 49


def test_released_config_json_round_trip(tmp_path):
    """The released config.json's shape (facts of MiniMax-VL-01): nested released text
    config with shared_intermediate_size [0], CLIP vision config with exact GELU."""
    c = VLConfig.from_preset("minimax-vl-01")
    d = c.to_minimax_dict()
    assert d["model_type"] == "minimax_vl_01" and d["image_token_index"] == 200025
    assert d["vision_config"]["hidden_act"] == "gelu"
    d["text_config"]["shared_intermediate_size"] = [0]
    (tmp_path / "config.json").write_text(json.dumps(d))
    back = VLConfig.from_json(tmp_path / "config.json")
    assert back == c


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("image_token_id", 600, "image_token_id"),
        ("vision_feature_layer", 9, "vision_feature_layer"),
        ("vision_feature_select_strategy", "full", "vision_feature_select_strategy"),
        ("image_grid_pinpoints", [[28, 30]], "image_grid_pinpoints"),
        ("projector_hidden_act", "relu6", "projector_hidden_act"),
    ],
)
def test_bad_config_is_named(field, value, message):
    c = VLConfig.from_preset("tiny-vl")
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(c, **{field: value}).validate()


def test_malformed_config_json(tmp_path):
    d = VLConfig.from_preset("tiny-vl").to_minimax_dict()
    d["vision_config"]["patch_size"] = 5  # does not divide 28
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match=r"config.json.*patch_size"):
        VLConfig.from_json(tmp_path / "config.json")


def test_inputs_embeds_equals_input_ids():
    torch.manual_seed(0)
    m = HybridLM(HybridConfig.from_preset("tiny")).eval()
    ids = torch.randint(0, 512, (2, 37))
    with torch.no_grad():
        a = m(ids, labels=ids)
        b = m(None, inputs_embeds=m.model.embed_tokens(ids), labels=ids)
    torch.testing.assert_close(a.logits, b.logits, rtol=0, atol=0)
    torch.testing.assert_close(a.loss, b.loss, rtol=0, atol=0)
    with pytest.raises(ValueError, match="exactly one"):
        m(ids, inputs_embeds=m.model.embed_tokens(ids))


def test_image_features_enter_at_image_tokens():
    """The features replace the <image> embeddings, in order; text positions before the
    first image do not see it (causal), later ones do."""
    c = tiny_config()
    torch.manual_seed(0)
    m = HybridVLM(c).eval()
    sizes = [(40, 30), (20, 60)]
    px, counts = images_for(c, sizes)
    ids = torch.tensor([prompt(c, counts)])
    with torch.no_grad():
        feats = m.image_features(px, sizes)
        assert [f.shape[0] for f in feats] == counts
        x = m.embed(ids, feats)
        mask = ids[0] == c.image_token_id
        torch.testing.assert_close(x[0, mask], torch.cat(feats))
        torch.testing.assert_close(x[0, ~mask], m.language_model.model.embed_tokens(ids)[0, ~mask])
        a = m(ids, pixel_values=px, image_sizes=sizes).logits
        b = m(ids, image_features=feats).logits
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        px2 = px.clone()
        px2[-1] += 1.0  # the second image's last tile
        c2 = m(ids, pixel_values=px2, image_sizes=sizes).logits
    first_image = int(mask.nonzero()[0])
    second_end = int(mask.nonzero()[-1])
    assert torch.equal(a[0, :first_image], c2[0, :first_image])
    assert not torch.allclose(a[0, second_end:], c2[0, second_end:])


def test_training_step_reaches_the_vision_tower():
    c = tiny_config()
    torch.manual_seed(0)
    m = HybridVLM(c)
    sizes = [(28, 28)]
    px, counts = images_for(c, sizes)
    ids = torch.tensor([prompt(c, counts)])
    labels = ids.masked_fill(ids == c.image_token_id, -100)
    m(ids, pixel_values=px, image_sizes=sizes, labels=labels).loss.backward()
    for name in ("vision_tower.vision_model.embeddings.patch_embedding.weight",
                 "multi_modal_projector.linear_1.weight", "image_newline"):  # fmt: skip
        grad = dict(m.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_bad_image_inputs_are_named():
    c = tiny_config()
    m = HybridVLM(c).eval()
    sizes = [(40, 30)]
    px, counts = images_for(c, sizes)
    ids = torch.tensor([prompt(c, counts)])
    with pytest.raises(ValueError, match="<image> tokens"):
        m(ids[:, :-20], pixel_values=px, image_sizes=sizes)  # tokens cut off
    with pytest.raises(ValueError, match="tiles"):
        m(ids, pixel_values=px[:-1], image_sizes=sizes)
    with pytest.raises(ValueError, match=r"pixel_values must be \[N, 3, 28, 28\]"):
        m(ids, pixel_values=px[:, :, :14], image_sizes=sizes)
    with pytest.raises(ValueError, match="image_sizes"):
        m(ids, pixel_values=px)
    with pytest.raises(ValueError, match="0 image features"):
        m(ids)


def test_save_load_round_trip(tmp_path):
    c = tiny_config()
    torch.manual_seed(1)
    m = HybridVLM(c).eval()
    m.save_pretrained(tmp_path / "vl", max_shard_size="100KB")
    assert (tmp_path / "vl" / "model.safetensors.index.json").exists()
    assert (tmp_path / "vl" / "preprocessor_config.json").exists()
    back = HybridVLM.from_pretrained(tmp_path / "vl").eval()
    assert back.config == c
    for (n1, p1), (n2, p2) in zip(m.state_dict().items(), back.state_dict().items(), strict=True):
        assert n1 == n2 and torch.equal(p1, p2), n1
    index = json.loads((tmp_path / "vl" / "model.safetensors.index.json").read_text())
    keys = set(index["weight_map"])
    assert "image_newline" in keys and "language_model.lm_head.weight" in keys
    assert "vision_tower.vision_model.encoder.layers.1.mlp.fc2.bias" in keys
    assert "multi_modal_projector.linear_2.weight" in keys
    assert "language_model.model.layers.0.block_sparse_moe.experts.3.w2.weight" in keys


def test_checkpoint_errors_name_the_key(tmp_path):
    from safetensors.torch import load_file, save_file

    c = tiny_config()
    HybridVLM(c).save_pretrained(tmp_path / "vl")
    weights = load_file(tmp_path / "vl" / "model.safetensors")
    del weights["image_newline"]
    save_file(weights, tmp_path / "vl" / "model.safetensors")
    with pytest.raises(CheckpointError, match="image_newline"):
        HybridVLM.from_pretrained(tmp_path / "vl")
    weights["image_newline"] = torch.zeros(3)
    save_file(weights, tmp_path / "vl" / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"image_newline.*shape"):
        HybridVLM.from_pretrained(tmp_path / "vl")


# ------------------------------------------------------------------ transformers' LLaVA-NeXT


def hf_text_config() -> HybridConfig:
    """A text config `transformers`' MiniMax runs as the released model does."""
    return HybridConfig(
        vocab_size=97, hidden_size=32, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=8,
        layer_types=["lightning", "lightning", "softmax", "lightning"], rotary_dim=8,
        block_size=16, num_experts=4, experts_per_token=2, intermediate_size=24, postnorm=True,
        linear_attn_alpha=1.7, full_attn_alpha=1.3, mlp_alpha=1.5, mlp_beta=0.8,
    ).validate()  # fmt: skip


@pytest.fixture(scope="module")
def hf_pair(tmp_path_factory):
    """A random LLaVA-NeXT (CLIP + projector + transformers' MiniMax) saved by
    transformers, and lightlong's model loaded from its files."""
    transformers = pytest.importorskip("transformers")
    vision = VisionConfig(hidden_size=16, intermediate_size=32, num_layers=3, num_heads=2,
                          patch_size=7, image_size=28)  # fmt: skip
    c = tiny_config(hf_text_config(), vision=vision, vision_feature_layer=-2)
    torch.manual_seed(0)
    theirs = transformers.LlavaNextForConditionalGeneration(
        transformers.LlavaNextConfig(**c.to_hf_dict())
    ).eval()
    path = tmp_path_factory.mktemp("hf") / "llava"
    theirs.save_pretrained(path)
    return c, theirs, HybridVLM.from_pretrained(path).eval()


def their_logits(theirs, ids: list[int], px: torch.Tensor, sizes, config: VLConfig):
    """transformers' logits: its pixel_values are [images, most tiles, 3, S, S]."""
    tiles = [_tile_count(s, config) for s in sizes]
    S = config.vision.image_size
    padded = torch.zeros(len(sizes), max(tiles), 3, S, S)
    for i, part in enumerate(px.split(tiles)):
        padded[i, : tiles[i]] = part
    with torch.no_grad():
        return theirs(
            input_ids=torch.tensor([ids]), pixel_values=padded, image_sizes=torch.tensor(sizes),
            use_cache=False,
        ).logits  # fmt: skip


@pytest.mark.parametrize(
    "sizes", [[(40, 30)], [(40, 30), (20, 60)], [(28, 28), (56, 13)]], ids=["one", "two", "odd"]
)
def test_logits_match_transformers(hf_pair, sizes):
    c, theirs, ours = hf_pair
    px, counts = images_for(c, sizes, seed=len(sizes))
    ids = prompt(c, counts, seed=3)
    with torch.no_grad():
        a = ours(torch.tensor([ids]), pixel_values=px, image_sizes=sizes).logits
    assert_close(a, their_logits(theirs, ids, px, sizes, c), 1e-4, "logits")


def test_lightlong_checkpoint_loads_in_transformers(hf_pair, tmp_path):
    transformers = pytest.importorskip("transformers")
    c, _theirs, ours = hf_pair
    ours.save_pretrained(tmp_path / "ours", config_format="transformers")
    back = transformers.LlavaNextForConditionalGeneration.from_pretrained(tmp_path / "ours")
    sizes = [(40, 30), (20, 60)]
    px, counts = images_for(c, sizes, seed=5)
    ids = prompt(c, counts, seed=5)
    with torch.no_grad():
        a = ours(torch.tensor([ids]), pixel_values=px, image_sizes=sizes).logits
    assert_close(their_logits(back.eval(), ids, px, sizes, c), a, 1e-4, "logits")
