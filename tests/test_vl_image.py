"""MiniMax-VL-01's image side (`lightlong.model.image`): tiles, reading images, tokens."""

from __future__ import annotations

import base64
import io
import struct
import types
import warnings
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from lightlong.model.image import (
    CLIP_MEAN,
    CLIP_STD,
    PREPROCESSOR_CONFIG,
    ImageError,
    ImageProcessor,
    ProcessedImage,
    decode_data_url,
    encode_with_images,
    expand_image_tokens,
    fit_size,
    grid_shape,
    image_digest,
    load_image,
    select_best_resolution,
)
from lightlong.model.vision import MINIMAX_VL_PINPOINTS, VLConfig
from lightlong.tokenizer import ByteTokenizer

# (height, width): square, both orientations of 4:3 and 2:3, extreme slivers, a single pixel,
# sizes just off a tile and aspects whose short side is not a whole number of pixels.
SIZES = [
    (336, 336), (480, 640), (640, 480), (37, 1000), (1000, 37), (2000, 3000), (3000, 2000),
    (1, 1), (7, 5000), (5000, 7), (333, 500), (335, 337), (1080, 1920), (17, 29),
]  # fmt: skip
TINY_SIZES = [(28, 28), (1, 1), (20, 50), (50, 20), (100, 33), (57, 56), (9, 300), (61, 17)]


def noise(h: int, w: int, seed: int = 0) -> Image.Image:
    """Seeded random RGB pixels, (h, w)."""
    rng = np.random.default_rng(seed + 1000 * h + w)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def encoded(image: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt)
    return buf.getvalue()


def png_header(w: int, h: int) -> bytes:
    """A PNG that claims (w, h) RGB pixels but holds none."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


# -------------------------------------------------------------- equality with transformers


def _released_patch_output_size(image, target_resolution, input_data_format):
    """The released MiniMax-VL-01 rule for the grid's resize: the long side fills the canvas,
    the short one is ⌊W·h/w⌋ (int() of the same float expression the released code uses)."""
    from transformers.image_utils import get_image_size

    h, w = get_image_size(image, channel_dim=input_data_format)
    H, W = target_resolution
    if w / h > W / H:
        return int(W * h / w), W
    return H, int(H * w / h)


@pytest.fixture
def hf_llava(monkeypatch):
    """`transformers`' LLaVA-NeXT PIL image processor module with the one documented
    difference from the released MiniMax-VL-01 processor removed.

    transformers 5.24 has no MiniMax-VL-01 processor; the released one is LLaVA-NeXT's
    "anyres" except that, resizing an image into its grid, it rounds the short side down
    (⌊W·h/w⌋) where transformers' `get_patch_output_size` rounds up (min(⌈·⌉, W)). That rule
    is patched to the released one here; everything else is transformers' own code."""
    pytest.importorskip("transformers")
    from transformers.models.llava_next import image_processing_pil_llava_next as m

    monkeypatch.setattr(m, "get_patch_output_size", _released_patch_output_size)
    return m


def _hf_processor(m, tile: int, pinpoints):
    S = {"height": tile, "width": tile}
    return m.LlavaNextImageProcessorPil(
        size=S, crop_size=S, do_center_crop=False, image_grid_pinpoints=pinpoints
    )


def _hf_pixels(proc, image: Image.Image) -> np.ndarray:
    out = proc(image)
    assert [tuple(s) for s in out["image_sizes"]] == [(image.height, image.width)]
    return np.asarray(out["pixel_values"][0])


def _compare(proc, ours: ImageProcessor, sizes, tile: int, pinpoints) -> float:
    from transformers.image_processing_utils import select_best_resolution as hf_best

    worst = 0.0
    for h, w in sizes:
        image = noise(h, w)
        got = ours(image)
        H, W = hf_best((h, w), pinpoints)
        assert select_best_resolution((h, w), pinpoints) == (H, W), (h, w)
        assert got.image_size == (h, w)
        assert got.pixel_values.dtype == torch.float32
        assert got.pixel_values.shape == (1 + (H // tile) * (W // tile), 3, tile, tile)
        assert got.num_tiles == 1 + (H // tile) * (W // tile)
        want = _hf_pixels(proc, image)
        assert want.shape == tuple(got.pixel_values.shape), (h, w)
        diff = float(np.abs(got.pixel_values.numpy() - want).max())
        assert diff < 1e-5, f"{(h, w)}: max |ours - transformers| = {diff}"
        worst = max(worst, diff)
    return worst


def test_tiles_equal_transformers_minimax(hf_llava):
    ours = ImageProcessor.for_config(VLConfig())
    hf = _hf_processor(hf_llava, 336, MINIMAX_VL_PINPOINTS)
    worst = _compare(hf, ours, SIZES, 336, MINIMAX_VL_PINPOINTS)
    print(f"max |ours - transformers| over {len(SIZES)} images: {worst:.3g}")


def test_tiles_equal_transformers_tiny_vl(hf_llava):
    cfg = VLConfig.from_preset("tiny-vl")
    S, pins = cfg.vision.image_size, cfg.image_grid_pinpoints
    assert S == 28 and sorted(map(tuple, pins)) == [(28, 28), (28, 56), (56, 28), (56, 56)]
    ours = ImageProcessor.for_config(cfg)
    _compare(_hf_processor(hf_llava, S, pins), ours, TINY_SIZES, S, pins)


def test_rounding_is_the_documented_difference(hf_llava, monkeypatch):
    """Unpatched, transformers differs where ⌈·⌉ and ⌊·⌋ differ: a (37, 1000) image goes
    into a 336×1008 canvas as 1008 × 37.296 pixels: 37 rows (released), 38 (transformers)."""
    from transformers.image_processing_utils import get_patch_output_size

    assert select_best_resolution((37, 1000), MINIMAX_VL_PINPOINTS) == (336, 1008)
    assert fit_size((37, 1000), (336, 1008)) == (37, 1008)
    monkeypatch.setattr(hf_llava, "get_patch_output_size", get_patch_output_size)
    hf = _hf_processor(hf_llava, 336, MINIMAX_VL_PINPOINTS)
    ours = ImageProcessor.for_config(VLConfig())
    image = noise(37, 1000)
    assert not np.allclose(ours(image).pixel_values.numpy(), _hf_pixels(hf, image), atol=1e-3)
    image = noise(480, 640)  # into 672×672 as 672 × 504 exactly: no rounding to differ
    assert np.allclose(ours(image).pixel_values.numpy(), _hf_pixels(hf, image), atol=1e-5)


@pytest.mark.parametrize("preset", ["minimax-vl-01", "tiny-vl"])
def test_token_count_equals_transformers(preset):
    pytest.importorskip("transformers")
    from transformers.models.llava_next.modeling_llava_next import unpad_image
    from transformers.models.llava_next.processing_llava_next import LlavaNextProcessor

    cfg = VLConfig.from_preset(preset)
    S, P, pins = cfg.vision.image_size, cfg.vision.patch_size, cfg.image_grid_pinpoints
    q = S // P
    # LlavaNextProcessor's own count, on an instance built without a tokenizer
    proc = object.__new__(LlavaNextProcessor)
    proc.__dict__.update(
        image_processor=types.SimpleNamespace(image_grid_pinpoints=pins),
        patch_size=P,
        num_additional_image_tokens=1,  # CLIP's CLS
        vision_feature_select_strategy="default",
    )
    sizes = SIZES if S == 336 else TINY_SIZES
    for h, w in sizes:
        hf = proc._get_number_of_features(h, w, S, S) - 1  # "default": the CLS dropped
        rows, cols = grid_shape((h, w), pins, S)
        fmap = unpad_image(torch.zeros(1, rows * q, cols * q), (h, w))
        _, fh, fw = fmap.shape
        assert cfg.num_image_tokens((h, w)) == hf == q * q + fh * (fw + 1), (h, w)
        assert ImageProcessor.for_config(cfg)(noise(h, w)).num_tiles == 1 + rows * cols


def test_preprocessor_config_loads_in_transformers(hf_llava, tmp_path):
    """The preprocessor_config.json we write makes transformers' LLaVA-NeXT processor (given
    the released rounding) produce our tiles, and reads back as the same processor."""
    cfg = VLConfig()
    ours = ImageProcessor.for_config(cfg)
    (tmp_path / PREPROCESSOR_CONFIG).write_text(ours.to_json())
    hf = hf_llava.LlavaNextImageProcessorPil.from_pretrained(tmp_path)
    for h, w in [(480, 640), (37, 1000), (700, 300)]:
        image = noise(h, w)
        np.testing.assert_allclose(
            ours(image).pixel_values.numpy(), _hf_pixels(hf, image), rtol=0, atol=1e-5
        )
    back = ImageProcessor.from_pretrained(tmp_path, cfg)
    assert (back.tile, back.pinpoints, back.mean, back.std) == (
        ours.tile, ours.pinpoints, ours.mean, ours.std,
    )  # fmt: skip


# -------------------------------------------------------------- the tiles themselves


def test_tile_layout_and_normalisation():
    """A 2x1-tile canvas: the thumbnail first, then the tiles left to right, channels first,
    (x/255 - mean)/std; the padding is black."""
    S = 4
    proc = ImageProcessor(S, [[S, S], [S, 2 * S]])
    left, right = (255, 0, 0), (0, 0, 255)
    a = np.zeros((S, 2 * S, 3), np.uint8)
    a[:, :S], a[:, S:] = left, right
    got = proc(Image.fromarray(a))
    assert got.pixel_values.shape == (3, 3, S, S) and got.image_size == (S, 2 * S)
    mean, std = torch.tensor(CLIP_MEAN), torch.tensor(CLIP_STD)

    def norm(rgb):
        return ((torch.tensor(rgb, dtype=torch.float32) / 255 - mean) / std).view(3, 1, 1)

    torch.testing.assert_close(got.pixel_values[1], norm(left).expand(3, S, S))
    torch.testing.assert_close(got.pixel_values[2], norm(right).expand(3, S, S))
    # a (2S, 3S) image goes into the (S, 2S) canvas S tall and ⌊S·3S/2S⌋ = 6 of 8 wide,
    # centred: one black column at each side
    b = proc(Image.new("RGB", (3 * S, 2 * S), (255, 255, 255)))
    black = norm((0, 0, 0))[:, 0, 0]
    assert b.pixel_values.shape[0] == 3
    torch.testing.assert_close(b.pixel_values[1][:, :, 0], black.view(3, 1).expand(3, S))
    torch.testing.assert_close(b.pixel_values[2][:, :, -1], black.view(3, 1).expand(3, S))
    white = norm((255, 255, 255))[:, 0, 0]
    torch.testing.assert_close(b.pixel_values[1][:, :, 1], white.view(3, 1).expand(3, S))


def test_fit_size_released_rule():
    assert fit_size((37, 1000), (336, 2016)) == (74, 2016)  # 74.592 -> 74
    assert fit_size((1000, 37), (2016, 336)) == (2016, 74)
    assert fit_size((37, 1000), (336, 1008)) == (37, 1008)  # 37.296 -> 37
    assert fit_size((480, 640), (1008, 1344)) == (1008, 1344)  # exact
    assert fit_size((2, 5), (4, 8)) == (3, 8)  # 3.2 -> 3, wider than the canvas
    assert fit_size((5, 2), (8, 4)) == (8, 3)
    assert fit_size((1, 99999), (336, 2016)) == (1, 2016)  # a sliver keeps 1 row


def test_sliver_image():
    proc = ImageProcessor.for_config(VLConfig())
    got = proc(noise(1, 20000))
    rows, cols = grid_shape((1, 20000), MINIMAX_VL_PINPOINTS, 336)
    assert got.pixel_values.shape == (1 + rows * cols, 3, 336, 336)
    assert torch.isfinite(got.pixel_values).all()


def test_modes_become_rgb():
    proc = ImageProcessor(2, [[2, 2]])
    black = proc(Image.new("RGB", (2, 2), (0, 0, 0))).pixel_values
    # transparent -> black (the padding's colour), whatever colour it hides
    clear = Image.new("RGBA", (2, 2), (255, 255, 255, 0))
    torch.testing.assert_close(proc(clear).pixel_values, black)
    la = Image.new("LA", (2, 2), (200, 0))
    torch.testing.assert_close(proc(la).pixel_values, black)
    opaque = Image.new("RGBA", (2, 2), (10, 20, 30, 255))
    rgb = Image.new("RGB", (2, 2), (10, 20, 30))
    torch.testing.assert_close(proc(opaque).pixel_values, proc(rgb).pixel_values)
    assert proc(opaque).digest == proc(rgb).digest
    gray = Image.new("L", (2, 2), 77)
    torch.testing.assert_close(
        proc(gray).pixel_values, proc(Image.new("RGB", (2, 2), (77, 77, 77))).pixel_values
    )
    pal = Image.new("RGB", (2, 2), (10, 200, 30)).convert("P")
    torch.testing.assert_close(proc(pal).pixel_values, proc(pal.convert("RGB")).pixel_values)
    # 16-bit grayscale is scaled to 8 bits, not clipped
    sixteen = Image.fromarray(np.full((2, 2), 32896, np.uint16))  # 128·257
    assert sixteen.mode == "I;16"
    torch.testing.assert_close(
        proc(sixteen).pixel_values, proc(Image.new("RGB", (2, 2), (128,) * 3)).pixel_values
    )
    cmyk = Image.new("CMYK", (2, 2), (0, 0, 0, 0))
    white = proc(Image.new("RGB", (2, 2), (255, 255, 255))).pixel_values
    torch.testing.assert_close(proc(cmyk).pixel_values, white)


def test_processor_rejects_bad_images_and_settings():
    proc = ImageProcessor(28, [[28, 28]], max_pixels=1000)
    with pytest.raises(ValueError, match="zero size"):
        proc(Image.new("RGB", (0, 5)))
    with pytest.raises(ValueError, match=r"40x30 = 1200 pixels.*limit of 1000"):
        proc(Image.new("RGB", (40, 30)))
    with pytest.raises(TypeError):
        proc(np.zeros((4, 4, 3), np.uint8))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="multiples of the tile side 28"):
        ImageProcessor(28, [[28, 30]])
    with pytest.raises(ValueError, match="pinpoints"):
        ImageProcessor(28, [])
    with pytest.raises(ValueError, match="std must be 3 positive numbers"):
        ImageProcessor(28, [[28, 28]], std=(1.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="max_pixels"):
        ImageProcessor(28, [[28, 28]], max_pixels=0)


# -------------------------------------------------------------- digest


def test_digest_same_pixels_any_format():
    image = noise(31, 45)
    proc = ImageProcessor(28, [[28, 28], [28, 56]])
    digests = {
        proc(load_image(encoded(image, fmt))).digest for fmt in ("PNG", "BMP", "TIFF", "PPM")
    }
    assert digests == {proc(image).digest}
    assert len(proc(image).digest) == 16
    assert image_digest(image) == proc(image).digest
    changed = np.asarray(image).copy()
    changed[30, 44, 2] ^= 1
    assert proc(Image.fromarray(changed)).digest != proc(image).digest
    # the same bytes in another shape are another image
    flat = np.asarray(image).reshape(45, 31, 3)
    assert proc(Image.fromarray(flat)).digest != proc(image).digest
    assert image_digest(noise(8, 8, seed=1)) != image_digest(noise(8, 8, seed=2))


def test_processed_image_is_frozen():
    got = ImageProcessor(28, [[28, 28]])(noise(5, 5))
    assert isinstance(got, ProcessedImage)
    with pytest.raises(AttributeError):
        got.image_size = (1, 1)  # type: ignore[misc]


# -------------------------------------------------------------- reading images


def test_load_image_reads_files_and_bytes(tmp_path):
    image = noise(20, 30)
    path = tmp_path / "a.png"
    image.save(path)
    for source in (path, str(path), path.read_bytes()):
        got = load_image(source, max_pixels=1000)
        assert got.size == (30, 20)
        assert np.array_equal(np.asarray(got.convert("RGB")), np.asarray(image))


def test_load_image_missing_file(tmp_path):
    with pytest.raises(ImageError, match=r"nope\.png: no such file"):
        load_image(tmp_path / "nope.png", max_pixels=100)
    with pytest.raises(ImageError, match="a URL"):
        load_image("https://example.com/cat.png", max_pixels=100)


def test_load_image_directory(tmp_path):
    with pytest.raises(ImageError, match="directory"):
        load_image(tmp_path, max_pixels=100)


def test_load_image_text_file(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("not pixels at all\n")
    with pytest.raises(ImageError, match=r"notes\.png: not an image"):
        load_image(path, max_pixels=100)
    with pytest.raises(ImageError, match="image data: not an image"):
        load_image(b"hello", max_pixels=100)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_load_image_truncated(tmp_path, fmt):
    data = encoded(noise(64, 64), fmt)
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match=r"cut\.\w+: the image data is truncated"):
        load_image(path, max_pixels=10_000)
    with pytest.raises(ImageError, match="image data: the image data is truncated"):
        load_image(data[: len(data) // 2], max_pixels=10_000)


def test_load_image_zero_size(monkeypatch):
    try:
        data = encoded(Image.new("RGB", (0, 3)), "PNG")
    except (ValueError, OSError):  # Pillow writes no empty image: fake one being read
        data = b"fake"
        monkeypatch.setattr(Image, "open", lambda fp: Image.new("RGB", (0, 3)))
    with pytest.raises(ImageError, match=r"image data: .*zero size \(0x3"):
        load_image(data, max_pixels=100)


def test_load_image_too_many_pixels():
    with pytest.raises(ImageError, match=r"100x100 = 10000 pixels, more than the limit of 5000"):
        load_image(encoded(noise(100, 100), "PNG"), max_pixels=5000)
    # a header claiming 10000² pixels: refused from the header, whatever Pillow warns
    with (
        pytest.warns(Image.DecompressionBombWarning),
        pytest.raises(ImageError, match="100000000 pixels, more than the limit of 50000000"),
    ):
        load_image(png_header(10_000, 10_000), max_pixels=50_000_000)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ImageError, match="image data: too many pixels"):
            load_image(png_header(10_000, 10_000), max_pixels=50_000_000)
    # past Pillow's own bomb limit it refuses at open; still an ImageError
    with pytest.raises(ImageError, match="too many pixels"):
        load_image(png_header(30_000, 30_000), max_pixels=10**10)


def test_load_image_applies_exif_orientation():
    image = noise(10, 20)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90° clockwise: stored 20 wide, shown 20 tall
    buf = io.BytesIO()
    image.save(buf, "PNG", exif=exif)
    got = load_image(buf.getvalue(), max_pixels=1000)
    assert got.size == (10, 20)
    assert np.array_equal(np.asarray(got), np.asarray(image.transpose(Image.Transpose.ROTATE_270)))


def _data_url(data: bytes, media: str = "image/png") -> str:
    return f"data:{media};base64,{base64.b64encode(data).decode()}"


def test_decode_data_url():
    image = noise(9, 13)
    png = encoded(image, "PNG")
    for url in (
        _data_url(png),
        _data_url(png).rstrip("="),  # unpadded
        "DATA:Image/PNG;BASE64," + base64.b64encode(png).decode(),
        _data_url(png)[:40] + "\n" + _data_url(png)[40:],  # wrapped
    ):
        got = decode_data_url(url, max_pixels=1000, max_bytes=10_000)
        assert np.array_equal(np.asarray(got), np.asarray(image))


def test_decode_data_url_errors():
    png = encoded(noise(9, 13), "PNG")
    cases = [
        ("data:image/png;base64,@@not*base64@@", "not valid base64"),
        (_data_url(b"hello there", "text/plain"), "'text/plain', not an image"),
        ("data:;base64,aGVsbG8=", "'text/plain', not an image"),
        (_data_url(b"hello there, not a picture"), r"data URL \(image/png\): not an image"),
        ("data:image/png," + "x" * 10, "not base64"),
        ("data:image/png;base64", "no ','"),
        ("https://example.com/a.png", "not a data: URL"),
        (_data_url(png[: len(png) // 2]), "truncated"),
        (_data_url(png), "more than the limit of 100"),
        ("data:image/png;base64,", "empty"),
    ]
    for url, problem in cases:
        with pytest.raises(ImageError, match=problem):
            decode_data_url(url, max_pixels=1000, max_bytes=100 if "limit" in problem else 10**6)
    with pytest.raises(ImageError, match="117 pixels, more than the limit of 100"):
        decode_data_url(_data_url(png), max_pixels=100, max_bytes=10**6)


# -------------------------------------------------------------- preprocessor_config.json


def test_from_pretrained(tmp_path):
    cfg = VLConfig.from_preset("tiny-vl")
    # no file: the config's processor
    p = ImageProcessor.from_pretrained(tmp_path, cfg)
    assert (p.tile, p.pinpoints) == (28, tuple(map(tuple, cfg.image_grid_pinpoints)))
    file = tmp_path / PREPROCESSOR_CONFIG
    pins = cfg.image_grid_pinpoints
    # the released file's shape: size as [width, height], no crop_size
    file.write_text(
        '{"process_image_mode": "anyres", "size": [28, 28], "patch_size": 7, '
        f'"image_mean": [0.5, 0.5, 0.5], "image_std": 0.25, "image_grid_pinpoints": {pins}}}'
    )
    p = ImageProcessor.from_pretrained(tmp_path, cfg, max_pixels=123)
    assert (p.mean, p.std, p.max_pixels) == ((0.5,) * 3, (0.25,) * 3, 123)
    # transformers' LLaVA-NeXT shape: shortest_edge + crop_size
    file.write_text('{"size": {"shortest_edge": 28}, "crop_size": {"height": 28, "width": 28}}')
    assert ImageProcessor.from_pretrained(tmp_path, cfg).tile == 28

    bad = [
        ("{not json", "malformed JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"size": {"height": 336, "width": 336}}', "size must give the vision tower's tile"),
        ('{"crop_size": {"height": 28, "width": 56}}', "crop_size must be square"),
        ('{"size": {"foo": 1}}', "size must have"),
        ('{"image_mean": [0.5, 0.5]}', "image_mean must be 3 numbers"),
        ('{"image_std": [0.5, 0, 0.5]}', "image_std must be 3 positive numbers"),
        ('{"image_grid_pinpoints": [[28, 28]]}', "must equal config.json's"),
        ('{"image_grid_pinpoints": "28x28"}', "image_grid_pinpoints must be a list"),
        ('{"process_image_mode": "resize"}', "process_image_mode must be"),
        ('{"do_normalize": false}', "do_normalize must be true"),
        ('{"resample": 2}', "resample must be 3"),
        ('{"rescale_factor": 1}', "rescale_factor must be 1/255"),
    ]
    for text, problem in bad:
        file.write_text(text)
        with pytest.raises(ValueError, match=problem) as e:
            ImageProcessor.from_pretrained(tmp_path, cfg)
        assert PREPROCESSOR_CONFIG in str(e.value), text


def test_to_json_fields():
    import json

    d = json.loads(ImageProcessor.for_config(VLConfig()).to_json())
    assert d["image_processor_type"] == "LlavaNextImageProcessor"
    assert d["process_image_mode"] == "anyres"
    assert d["size"] == d["crop_size"] == {"height": 336, "width": 336}
    assert d["image_grid_pinpoints"] == [list(p) for p in MINIMAX_VL_PINPOINTS]
    assert (d["do_center_crop"], d["do_pad"], d["resample"]) == (False, True, 3)
    assert d["image_mean"] == list(CLIP_MEAN) and d["image_std"] == list(CLIP_STD)
    assert d["rescale_factor"] == 1 / 255
    assert all(d[k] for k in ("do_resize", "do_rescale", "do_normalize", "do_convert_rgb"))


# -------------------------------------------------------------- tokens


def test_expand_image_tokens():
    assert expand_image_tokens([1, 9, 2, 9, 3], 9, [2, 3]) == [1, 9, 9, 2, 9, 9, 9, 3]
    assert expand_image_tokens([1, 2], 9, []) == [1, 2]
    assert expand_image_tokens([9], 9, [1]) == [9]
    with pytest.raises(ValueError, match=r"has 2 <image> tokens .* but 1 image was given"):
        expand_image_tokens([9, 1, 9], 9, [4])
    with pytest.raises(ValueError, match=r"has 0 <image> tokens .* but 2 images were given"):
        expand_image_tokens([1], 9, [4, 4])
    with pytest.raises(ValueError, match=r"has 1 <image> token .* but 0 images were given"):
        expand_image_tokens([9], 9, [])
    with pytest.raises(ValueError, match="positive int"):
        expand_image_tokens([9], 9, [0])


def test_encode_with_images_byte_tokenizer():
    tok, img = ByteTokenizer(), 257
    assert encode_with_images(tok, "a<image>b", img) == [97, img, 98]
    assert encode_with_images(tok, "<image><image>", img) == [img, img]
    assert encode_with_images(tok, "no images", img) == tok.encode("no images")
    assert encode_with_images(tok, "", img) == []
    text = "Describe <image> and é<image>."
    ids = encode_with_images(tok, text, img)
    assert tok.decode([t for t in ids if t != img]) == text.replace("<image>", "")
    # the tiny VL model's prompt, each <image> expanded to its image's features
    cfg = VLConfig.from_preset("tiny-vl")
    sizes = [(20, 50), (61, 17)]
    counts = [cfg.num_image_tokens(s) for s in sizes]
    full = expand_image_tokens(ids, cfg.image_token_id, counts)
    assert full.count(cfg.image_token_id) == sum(counts)
    assert len(full) == len(ids) - 2 + sum(counts)
