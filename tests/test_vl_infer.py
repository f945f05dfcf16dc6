"""Generation with images (`Engine` over a `HybridVLM`): chunked prefill across an image,
batches mixing image and text prompts, prefix reuse keyed on image content, bad inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from lightlong import HybridConfig, HybridLM, HybridVLM, VLConfig
from lightlong.infer import Engine, SamplingParams
from lightlong.model.image import ImageProcessor

IMAGE = 257  # tiny-vl's <image>


@pytest.fixture(scope="module")
def model() -> HybridVLM:
    torch.manual_seed(0)
    return HybridVLM(VLConfig.from_preset("tiny-vl")).eval()


def picture(h: int, w: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def text(n: int, seed: int) -> list[int]:
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


GREEDY = SamplingParams(max_new_tokens=6, temperature=0.0)


def one_pass_logits(model: HybridVLM, ids: list[int], images: list[Image.Image]) -> torch.Tensor:
    """The last position's logits from one forward over the expanded prompt (no cache)."""
    processor = ImageProcessor.for_config(model.config)
    done = [processor(im) for im in images]
    counts = [model.config.num_image_tokens(p.image_size) for p in done]
    expanded, k = [], 0
    for t in ids:
        expanded += [t] * (counts[k] if t == IMAGE else 1)
        k += t == IMAGE
    with torch.no_grad():
        out = model(
            torch.tensor([expanded]),
            pixel_values=torch.cat([p.pixel_values for p in done]),
            image_sizes=[p.image_size for p in done],
        )
    return out.logits[:, -1]


@pytest.mark.parametrize("chunk", [5, 16, 33, 4096])
def test_chunked_prefill_across_images_equals_one_pass(model, chunk):
    """Chunks of 5, 16 and 33 tokens cut through both images' runs of features (36 and 72
    tokens long); the prefill equals one pass over the whole prompt."""
    images = [picture(40, 30, 1), picture(30, 50, 2)]
    ids = [*text(7, 0), IMAGE, *text(9, 1), IMAGE, *text(5, 2)]
    engine = Engine(model, prefill_chunk=chunk)
    cache, logits = engine.prefill(ids, images=images)
    assert cache.length == len(ids) - 2 + sum(
        model.config.num_image_tokens(im.size[::-1]) for im in images
    )
    torch.testing.assert_close(logits, one_pass_logits(model, ids, images), atol=2e-5, rtol=0)


def test_generation_is_the_same_in_any_chunking(model):
    images = [picture(50, 20, 3)]
    ids = [*text(11, 3), IMAGE, *text(6, 4)]
    outs = [
        Engine(model, prefill_chunk=chunk).generate(ids, GREEDY, images=[images])[0].token_ids
        for chunk in (7, 4096)
    ]
    assert outs[0] == outs[1] and IMAGE not in outs[0]


def test_batch_with_and_without_images_equals_each_alone(model):
    prompts = [
        [*text(5, 5), IMAGE, *text(4, 6)],
        text(12, 7),
        [IMAGE, *text(3, 8), IMAGE, *text(2, 9)],
    ]
    images = [[picture(28, 28, 4)], [], [picture(60, 25, 5), picture(10, 90, 6)]]
    engine = Engine(model, prefill_chunk=16)
    together = engine.generate(prompts, GREEDY, images=images)
    for p, ims, got in zip(prompts, images, together, strict=True):
        alone = engine.generate(p, GREEDY, images=[ims])[0]
        assert got.token_ids == alone.token_ids
        assert got.prompt_tokens == alone.prompt_tokens


def test_the_image_changes_the_output(model):
    """Different pictures at the same <image> token give different next-token logits."""
    ids = [*text(4, 10), IMAGE, *text(4, 11)]
    engine = Engine(model)
    a = engine.prefill(ids, images=[picture(40, 40, 7)])[1]
    b = engine.prefill(ids, images=[picture(40, 40, 8)])[1]
    assert not torch.allclose(a, b)


def test_prefix_reuse_is_keyed_on_image_content(model):
    """A repeated prompt with the same image restores its last snapshot; the same tokens
    with another image reuse only the chunks before that image starts."""
    chunk = 8
    ids = [*text(20, 12), IMAGE, *text(30, 13)]
    first, other = picture(40, 30, 9), picture(40, 30, 10)
    engine = Engine(model, prefill_chunk=chunk, prefix_cache_bytes=1 << 26)
    engine.generate([*ids[:20], 5], GREEDY)  # text only: stores the snapshot at 16 tokens
    a = engine.generate(ids, GREEDY, images=[[first]])[0]
    assert engine.stats.reused_tokens == 16
    again = engine.generate(ids, GREEDY, images=[[first]])[0]
    assert engine.stats.reused_tokens == (a.prompt_tokens - 1) // chunk * chunk
    assert again.token_ids == a.token_ids
    b = engine.generate(ids, GREEDY, images=[[other]])[0]
    assert engine.stats.reused_tokens == 16  # not first's snapshots past the image's start
    fresh = Engine(model, prefill_chunk=chunk).generate(ids, GREEDY, images=[[other]])[0]
    assert b.token_ids == fresh.token_ids


def test_text_prompt_with_image_tag(model):
    """'<image>' in a text prompt is the image token (the byte tokenizer has no such id)."""
    from lightlong.tokenizer import ByteTokenizer

    engine = Engine(model, ByteTokenizer())
    im = picture(30, 30, 11)
    by_text = engine.generate("look: <image> what?", GREEDY, images=[[im]])[0]
    by_ids = engine.generate([*list(b"look: "), IMAGE, *list(b" what?")], GREEDY, images=[[im]])[0]
    assert by_text.token_ids == by_ids.token_ids
    assert by_text.prompt_tokens == len("look:  what?") + model.config.num_image_tokens((30, 30))


def test_bad_requests_are_named(model):
    engine = Engine(model)
    im = picture(30, 30, 12)
    with pytest.raises(ValueError, match=r"2 <image> tokens \(id 257\) but 1 image was"):
        engine.generate([IMAGE, 5, IMAGE], GREEDY, images=[[im]])
    with pytest.raises(ValueError, match=r"0 <image> tokens \(id 257\) but 1 image was"):
        engine.generate([5, 6], GREEDY, images=[[im]])
    with pytest.raises(ValueError, match=r"1 <image> token \(id 257\) but 0 images were"):
        engine.generate([5, IMAGE, 6], GREEDY)
    with pytest.raises(ValueError, match="one list per prompt"):
        engine.generate([[5, IMAGE]], GREEDY, images=[[im], [im]])
    with pytest.raises(ValueError, match="PIL image or a ProcessedImage"):
        engine.generate([5, IMAGE], GREEDY, images=[["x.png"]])
    text_only = Engine(HybridLM(HybridConfig.from_preset("tiny")))
    with pytest.raises(ValueError, match="takes no images"):
        text_only.generate([5, 6], GREEDY, images=[[im]])


def test_prefilled_image_prompt_continues_in_generate(model):
    """`Engine.prefill` with images, then `generate(prefilled=...)` with the same prompt and
    images (their ViT is not run again) equals generating in one call."""
    ids = [*text(6, 14), IMAGE, *text(5, 15)]
    images = [picture(45, 35, 13)]
    engine = Engine(model, prefill_chunk=16)
    calls = []
    original = model.image_features

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    pre = engine.prefill(ids, images=images)
    model.image_features = counted
    try:
        got = engine.generate(ids, GREEDY, images=[images], prefilled=[pre])[0]
    finally:
        del model.image_features
    assert not calls
    assert got.token_ids == engine.generate(ids, GREEDY, images=[images])[0].token_ids


def test_vit_skips_images_a_prefix_snapshot_covers(model):
    chunk = 8
    ids = [*text(3, 16), IMAGE, *text(40, 17)]
    images = [picture(28, 28, 14)]
    engine = Engine(model, prefill_chunk=chunk, prefix_cache_bytes=1 << 26)
    first = engine.generate(ids, GREEDY, images=[images])[0]
    calls = []
    original = model.image_features

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    model.image_features = counted
    try:
        again = engine.generate(ids, GREEDY, images=[images])[0]
    finally:
        del model.image_features
    assert engine.stats.reused_tokens > 3 + model.config.num_image_tokens((28, 28))
    assert not calls and again.token_ids == first.token_ids


def test_malformed_images_are_refused_before_running(model):
    from lightlong.infer import Runner

    engine = Engine(model)
    im = picture(30, 30, 15)
    with pytest.raises(ValueError, match="one list of images per prompt"):
        engine.generate([5, IMAGE], GREEDY, images=[im])
    processed = ImageProcessor.for_config(model.config)(im)
    wrong = type(processed)(processed.pixel_values[:1], (60, 60), processed.digest)
    with pytest.raises(ValueError, match=r"pixel_values must be \[5, 3, 28, 28\]"):
        engine.stream([5, IMAGE], GREEDY, images=[[wrong]])
    runner = Runner(model, max_num_seqs=1)
    with pytest.raises(ValueError, match="must be a ProcessedImage"):
        runner.new_seq([5, IMAGE], GREEDY, seed=0, images=[im])
    scored = SamplingParams(max_new_tokens=1, prompt_logprobs=1)
    with pytest.raises(ValueError, match="prompt_logprobs"):
        runner.new_seq([5, IMAGE], scored, seed=0, images=[processed])
