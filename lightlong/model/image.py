"""Images for MiniMax-VL-01: reading them, the tiles the ViT sees ("anyres", LLaVA-NeXT style)
and the `<image>` tokens a prompt holds for them.

An image of (h, w) pixels becomes 1 + rows·cols tiles of S×S pixels (S = the ViT's
`image_size`), as the released MiniMax-VL-01 processor ("anyres" mode) makes them:

1. the grid: the pinpoint (H, W) that keeps the most of the image's pixels after an aspect-
   keeping resize, then wastes the least (`select_best_resolution`); rows = H/S, cols = W/S;
2. the image resized (bicubic) to fit (H, W) keeping its aspect: the width fills the canvas
   and the height is ⌊W·h/w⌋ when the image is wider than the canvas (w/h > W/H), else the
   height fills it and the width is ⌊H·w/h⌋; centred on a black (H, W) canvas;
3. the thumbnail first (the whole image squashed to S×S, bicubic, aspect not kept), then the
   canvas cut into S×S tiles row by row, left to right;
4. each tile scaled to [0, 1] and normalised with CLIP's mean and std, channels first.

`transformers`' LLaVA-NeXT processor makes the same tiles except in step 2, where it rounds
the short side up (min(⌈W·h/w⌉, W)) instead of down.

Sizes are (height, width) in pixels throughout; grid pinpoints are [height, width]. (The
released code reads both width first. Its 28 pinpoints hold every grid in both orientations,
so only the order of ties could differ; for every image up to 3000×3000 the grid is the
same.)

# N tiles (1 + rows·cols), S tile side, H×W the grid's canvas
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import io
import json
import re
import struct
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor

from lightlong.model.config import read_json

if TYPE_CHECKING:
    from lightlong.model.vision import VLConfig
    from lightlong.tokenizer import Tokenizer

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
"""OpenAI CLIP's per-channel (R, G, B) mean, on pixels scaled to [0, 1]."""
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
"""OpenAI CLIP's per-channel (R, G, B) standard deviation."""
DEFAULT_MAX_PIXELS = 50_000_000
"""The most pixels (h·w) an image may have: an 8K frame (33 MP) or a 50 MP phone photo
passes; decoded as RGB that is at most 150 MB. Anything bigger is refused before it is
decoded (a small file can claim a huge size: a "decompression bomb"). Pillow's own guard
still applies: past `PIL.Image.MAX_IMAGE_PIXELS` (~89 MP) it warns (DecompressionBombWarning;
an ImageError where warnings are errors), past twice that it refuses (an ImageError)."""
IMAGE_PLACEHOLDER = "<image>"
"""The text that stands for an image in a prompt (`encode_with_images`)."""
PREPROCESSOR_CONFIG = "preprocessor_config.json"
"""The checkpoint file that describes the image processor."""


# ------------------------------------------------------------------------------ the grid


def select_best_resolution(
    image_size: tuple[int, int], pinpoints: Sequence[Sequence[int]]
) -> tuple[int, int]:
    """The pinpoint (height, width) an image of `image_size` (height, width) fits best.

    For each pinpoint the image is scaled to fit inside it keeping its aspect (up or down);
    the winner keeps the most of the image's own pixels (⌊w·s⌋·⌊h·s⌋, at most h·w), then
    wastes the least canvas; ties go to the first in list order. This is the released rule
    and `transformers`' `select_best_resolution` (floats and all)."""
    h, w = image_size
    best, best_kept, best_waste = None, -1, None
    for ph, pw in pinpoints:
        scale = min(pw / w, ph / h)
        kept = min(int(w * scale) * int(h * scale), w * h)
        waste = pw * ph - kept
        if kept > best_kept or (kept == best_kept and waste < best_waste):
            best, best_kept, best_waste = (ph, pw), kept, waste
    if best is None:
        raise ValueError("image_grid_pinpoints is empty")
    return best


def grid_shape(
    image_size: tuple[int, int], pinpoints: Sequence[Sequence[int]], tile: int
) -> tuple[int, int]:
    """(rows, cols) of the `tile`-pixel tiles an image of `image_size` (height, width) is
    cut into: its best pinpoint divided by the tile side."""
    ph, pw = select_best_resolution(image_size, pinpoints)
    return ph // tile, pw // tile


def unpadded_rows_cols(
    image_size: tuple[int, int], pinpoints: Sequence[Sequence[int]], tile: int, per_tile: int
) -> tuple[int, int]:
    """(rows, cols) of the grid's feature map ([rows·per_tile, cols·per_tile] features,
    per_tile a tile side) once the padding around the resized image is cut away: the
    released rule, new = ⌊old·cur/orig⌋, the padding split evenly (the odd one kept)."""
    h, w = image_size
    rows, cols = grid_shape(image_size, pinpoints, tile)
    fh, fw = rows * per_tile, cols * per_tile
    if w * fh > h * fw:  # wider than the grid: rows are padded
        new_h = h * fw // w
        return fh - 2 * ((fh - new_h) // 2), fw
    new_w = w * fh // h
    return fh, fw - 2 * ((fw - new_w) // 2)


def fit_size(image_size: tuple[int, int], canvas: tuple[int, int]) -> tuple[int, int]:
    """(height, width) an image of `image_size` is resized to inside `canvas` (height,
    width), keeping its aspect: the released rule, the side that fills the canvas exactly
    and the other ⌊·⌋ (at least 1 pixel; the released code fails on such slivers)."""
    h, w = image_size
    H, W = canvas
    if w * H > h * W:  # wider than the canvas: fill its width
        return max(1, W * h // w), W
    return H, max(1, H * w // h)


# ------------------------------------------------------------------------------ reading


class ImageError(ValueError):
    """An image that cannot be used: missing, not an image, truncated, empty or too big.
    The message names the file (or "image data") and the problem."""


def load_image(source: str | Path | bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Reads an image file (a path) or encoded image bytes (PNG, JPEG, WebP, GIF, BMP, ...:
    whatever Pillow reads) into a decoded Pillow image in its own mode.

    The pixel count is checked against `max_pixels` from the header before any pixel is
    decoded; the image is then decoded in full, so a truncated file fails here, not later.
    A multi-frame image (GIF, APNG, TIFF) gives its first frame. The EXIF orientation is
    applied (as `transformers.image_utils.load_image` does), so a phone photo comes out
    upright; its size is then the turned size.

    Raises:
        ImageError: naming the file (or "image data") and the problem: no such file, not an
            image, truncated or undecodable, zero size, more than `max_pixels` pixels.
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        return _decode(io.BytesIO(bytes(source)), "image data", max_pixels)
    if not isinstance(source, (str, Path)):
        raise TypeError(f"load_image takes a path or bytes, got {type(source).__name__}")
    name = str(source)
    _check_max_pixels(max_pixels)
    try:
        f = open(source, "rb")  # noqa: SIM115 - closed below, once the pixels are decoded
    except FileNotFoundError:
        hint = ""
        if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]+:", name) and not Path(name).drive:
            hint = " (a URL? load_image reads files; data: URLs go to decode_data_url)"
        raise ImageError(f"{name}: no such file{hint}") from None
    except IsADirectoryError:
        raise ImageError(f"{name}: is a directory, not an image file") from None
    except PermissionError:
        raise ImageError(f"{name}: permission denied") from None
    except OSError as e:
        raise ImageError(f"{name}: cannot open the file ({e.strerror or e})") from None
    with f:
        return _decode(f, name, max_pixels)


def decode_data_url(
    url: str, *, max_pixels: int = DEFAULT_MAX_PIXELS, max_bytes: int = 20_000_000
) -> Image.Image:
    """The image in a `data:image/<type>;base64,<data>` URL (RFC 2397), decoded
    (`load_image`'s checks apply). Whitespace and percent-escapes in the data are tolerated,
    and so is missing `=` padding.

    Raises:
        ImageError: the URL is not a data URL, its media type is not image/*, it is not
            base64 or its base64 is malformed, its data is over `max_bytes`, or the data is
            not a readable image (see `load_image`).
    """
    if not isinstance(url, str) or url[:5].lower() != "data:":
        head = url[:40] if isinstance(url, str) else type(url).__name__
        raise ImageError(f"not a data: URL ({head!r}...)")
    header, comma, payload = url[5:].partition(",")
    if not comma:
        raise ImageError("data URL: no ',' between the media type and the data")
    params = [p.strip().lower() for p in header.split(";")]
    media = params[0] or "text/plain"
    if not media.startswith("image/"):
        raise ImageError(f"data URL: the media type is {media!r}, not an image (image/...)")
    if "base64" not in params[1:]:
        raise ImageError(
            "data URL: the data is not base64 (';base64' is missing); only base64 images "
            "are accepted"
        )
    if "%" in payload:
        payload = urllib.parse.unquote(payload)
    payload = re.sub(r"\s+", "", payload)
    if len(payload) // 4 * 3 > max_bytes:
        raise ImageError(
            f"data URL: the image is {len(payload) // 4 * 3} bytes, more than the limit of "
            f"{max_bytes}"
        )
    try:
        data = base64.b64decode(payload + "=" * (-len(payload) % 4), validate=True)
    except (binascii.Error, ValueError) as e:
        raise ImageError(f"data URL: the data is not valid base64 ({e})") from None
    if not data:
        raise ImageError("data URL: the data is empty")
    if len(data) > max_bytes:
        raise ImageError(
            f"data URL: the image is {len(data)} bytes, more than the limit of {max_bytes}"
        )
    return _decode(io.BytesIO(data), f"data URL ({media})", max_pixels)


def _decode(fp: BinaryIO, name: str, max_pixels: int) -> Image.Image:
    """Opens, checks and decodes one image from an open file (see `load_image`); the image
    keeps no use of the file once this returns."""
    _check_max_pixels(max_pixels)
    try:
        # Pillow's own guard: DecompressionBombWarning past Image.MAX_IMAGE_PIXELS (the
        # size is then checked below; not silenced here, as catch_warnings is not
        # thread-safe), DecompressionBombError past twice that
        image = Image.open(fp)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(f"{name}: too many pixels ({e}); the limit is {max_pixels}") from None
    except UnidentifiedImageError:
        raise ImageError(f"{name}: not an image (Pillow cannot identify the data)") from None
    except MemoryError:
        raise
    except Exception as e:  # decoders of untrusted data raise anything
        raise ImageError(f"{name}: cannot read the image ({type(e).__name__}: {e})") from None
    w, h = image.size
    if w <= 0 or h <= 0:
        raise ImageError(f"{name}: the image has zero size ({w}x{h} pixels)")
    if w * h > max_pixels:
        raise ImageError(
            f"{name}: the image has {w}x{h} = {w * h} pixels, more than the limit of {max_pixels}"
        )
    try:
        image.load()
    except MemoryError:
        raise
    except Exception as e:
        what = "is truncated" if "truncated" in str(e) else "cannot be decoded"
        raise ImageError(f"{name}: the image data {what} ({type(e).__name__}: {e})") from None
    with contextlib.suppress(Exception):  # malformed EXIF: keep the image as stored
        ImageOps.exif_transpose(image, in_place=True)
    return image


def _check_max_pixels(max_pixels: int) -> None:
    if not isinstance(max_pixels, int) or isinstance(max_pixels, bool) or max_pixels < 1:
        raise ValueError(f"max_pixels must be a positive int, got {max_pixels!r}")


# ------------------------------------------------------------------------------ tiles


@dataclass(frozen=True, eq=False)
class ProcessedImage:
    """One image as the model takes it."""

    pixel_values: Tensor
    """float32 [1 + rows·cols, 3, S, S]: the thumbnail, then the grid's tiles row by row,
    normalised."""
    image_size: tuple[int, int]
    """(height, width) of the image as given, before any resize."""
    digest: bytes
    """16-byte BLAKE2b of the image's RGB pixels and size: equal for the same pixels whatever
    file they came from, different for different images (the prefix cache keys on it)."""

    @property
    def num_tiles(self) -> int:
        """N = 1 + rows·cols."""
        return self.pixel_values.shape[0]


class ImageProcessor:
    """MiniMax-VL-01's image processor ("anyres"): a Pillow image -> `ProcessedImage`.

    Colour: an image is first made 8-bit RGB. One with transparency (RGBA, LA, PA, a palette
    or RGB with a transparent colour) is laid on black, the colour of the padding; the
    released code resizes such an image with its alpha and then drops the alpha, which shows
    fully transparent areas black too, and `transformers` lays them on white. 16-bit
    grayscale (I;16) is scaled to 8 bits (Pillow's own conversion would clip it to 255);
    every other mode (L, P, CMYK, YCbCr, 1, I, F, ...) is Pillow's `convert("RGB")` (the
    released code's conversion; ICC profiles are not applied, CMYK is converted naively,
    I and F values are clipped to [0, 255]).
    """

    def __init__(
        self,
        tile: int,
        pinpoints: Sequence[Sequence[int]],
        *,
        mean: Sequence[float] = CLIP_MEAN,
        std: Sequence[float] = CLIP_STD,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ):
        """
        Args:
            tile: S, the side of a tile (the ViT's image_size).
            pinpoints: the candidate grids, [height, width] multiples of `tile`.
            mean, std: per-channel (R, G, B) normalisation of pixels in [0, 1].
            max_pixels: the most pixels (h·w) an image may have (`DEFAULT_MAX_PIXELS`).
        """
        if not isinstance(tile, int) or isinstance(tile, bool) or tile < 1:
            raise ValueError(f"tile must be a positive int, got {tile!r}")
        pins = [tuple(p) for p in pinpoints] if isinstance(pinpoints, Sequence) else None
        if not pins or not all(
            len(p) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in p)
            and p[0] % tile == 0
            and p[1] % tile == 0
            for p in pins
        ):
            raise ValueError(
                f"pinpoints must be a non-empty list of [height, width] multiples of the tile "
                f"side {tile}, got {pinpoints!r}"
            )
        self.tile = tile
        self.pinpoints: tuple[tuple[int, int], ...] = tuple(pins)  # type: ignore[arg-type]
        self.mean = _channel_values(mean, "mean", positive=False)
        self.std = _channel_values(std, "std", positive=True)
        _check_max_pixels(max_pixels)
        self.max_pixels = max_pixels
        self._mean_13 = torch.tensor(self.mean, dtype=torch.float32).view(1, 3, 1, 1)
        self._std_13 = torch.tensor(self.std, dtype=torch.float32).view(1, 3, 1, 1)

    def __repr__(self) -> str:
        return (
            f"ImageProcessor(tile={self.tile}, pinpoints={len(self.pinpoints)} grids, "
            f"mean={self.mean}, std={self.std}, max_pixels={self.max_pixels})"
        )

    @classmethod
    def for_config(
        cls, config: VLConfig, *, max_pixels: int = DEFAULT_MAX_PIXELS
    ) -> ImageProcessor:
        """The processor of a model: its tile side and grids, CLIP's normalisation."""
        return cls(config.vision.image_size, config.image_grid_pinpoints, max_pixels=max_pixels)

    @classmethod
    def from_pretrained(
        cls, path: str | Path, config: VLConfig, *, max_pixels: int = DEFAULT_MAX_PIXELS
    ) -> ImageProcessor:
        """The processor a checkpoint directory describes: its preprocessor_config.json (the
        released one, or `transformers`' LLaVA-NeXT one) when there is one, else
        `for_config(config)`.

        Read from the file: image_mean and image_std (3 numbers, or 1 for all channels);
        the tile side from crop_size and size ({"height", "width"}, {"shortest_edge"}, the
        released [width, height] or a number), which must agree with each other and with
        the ViT's image_size; image_grid_pinpoints, which must be config.json's.

        Raises:
            ValueError: naming the file and the field: malformed JSON, a field of the wrong
                shape, a mode other than "anyres", settings this processor does not do
                (no resize / rescale / normalise, another resample or rescale factor), or a
                disagreement with config.json.
        """
        file = Path(path) / PREPROCESSOR_CONFIG
        if not file.is_file():
            return cls.for_config(config, max_pixels=max_pixels)
        d = read_json(file)
        if not isinstance(d, dict):
            raise ValueError(f"{file}: expected a JSON object, got {type(d).__name__}")
        return cls._from_dict(d, config, str(file), max_pixels)

    @classmethod
    def _from_dict(
        cls, d: dict[str, Any], config: VLConfig, source: str, max_pixels: int
    ) -> ImageProcessor:
        def bad(field: str, why: str) -> ValueError:
            return ValueError(f"{source}: {field} {why}, got {d.get(field)!r}")

        mode = d.get("process_image_mode", "anyres")
        if mode != "anyres":
            raise bad("process_image_mode", 'must be "anyres" (the only mode supported)')
        for flag in ("do_resize", "do_rescale", "do_normalize"):
            if d.get(flag, True) is not True:
                raise bad(flag, "must be true (the only setting supported)")
        if d.get("resample", 3) != 3:
            raise bad("resample", "must be 3 (bicubic, the only one supported)")
        factor = d.get("rescale_factor", 1 / 255)
        if not isinstance(factor, (int, float)) or abs(factor * 255 - 1) > 1e-6:
            raise bad("rescale_factor", "must be 1/255 (the only one supported)")

        S = config.vision.image_size
        sides = {f: _side(d[f], f, bad) for f in ("crop_size", "size") if d.get(f) is not None}
        for f, side in sides.items():
            if side != S:
                raise bad(f, f"must give the vision tower's tile side {S} (config.json)")

        pins = d.get("image_grid_pinpoints", config.image_grid_pinpoints)
        if not isinstance(pins, list) or not all(
            isinstance(p, list)
            and len(p) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in p)
            for p in pins
        ):
            raise bad("image_grid_pinpoints", "must be a list of [height, width] pairs")
        if [list(p) for p in pins] != [list(p) for p in config.image_grid_pinpoints]:
            raise bad(
                "image_grid_pinpoints",
                "must equal config.json's image_grid_pinpoints (the model counts image tokens "
                "with those)",
            )
        try:
            mean = _channel_values(d.get("image_mean", CLIP_MEAN), "image_mean", positive=False)
            std = _channel_values(d.get("image_std", CLIP_STD), "image_std", positive=True)
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from None
        return cls(S, pins, mean=mean, std=std, max_pixels=max_pixels)

    def to_dict(self) -> dict[str, Any]:
        """The preprocessor_config.json fields: `transformers`' LLaVA-NeXT processor's (its
        LlavaNextImageProcessor and LlavaNextImageProcessorPil load them and make the same
        tiles but for the rounding described in the module docstring) plus the released
        process_image_mode."""
        S = self.tile
        return {
            "image_processor_type": "LlavaNextImageProcessor",
            "process_image_mode": "anyres",
            "do_convert_rgb": True,
            "do_resize": True,
            "size": {"height": S, "width": S},
            "resample": 3,
            "do_center_crop": False,
            "crop_size": {"height": S, "width": S},
            "do_rescale": True,
            "rescale_factor": 1 / 255,
            "do_normalize": True,
            "image_mean": list(self.mean),
            "image_std": list(self.std),
            "do_pad": True,
            "image_grid_pinpoints": [list(p) for p in self.pinpoints],
        }

    def to_json(self) -> str:
        """preprocessor_config.json's text (`to_dict`)."""
        return json.dumps(self.to_dict(), indent=2) + "\n"

    def __call__(self, image: Image.Image) -> ProcessedImage:
        """An image's tiles.

        Args:
            image: a Pillow image of any mode (see the class docstring for colour).

        Returns:
            `ProcessedImage`: pixel_values float32 [1 + rows·cols, 3, S, S] (the thumbnail,
            then the grid row by row), image_size (h, w) as given, digest.

        Raises:
            ValueError: a zero-size image, or one of more than max_pixels pixels.
        """
        if not isinstance(image, Image.Image):
            raise TypeError(f"expected a PIL image, got {type(image).__name__}")
        w, h = image.size
        if w <= 0 or h <= 0:
            raise ValueError(f"the image has zero size ({w}x{h} pixels)")
        if w * h > self.max_pixels:
            raise ValueError(
                f"the image has {w}x{h} = {w * h} pixels, more than the limit of {self.max_pixels}"
            )
        rgb = to_rgb(image)
        S = self.tile
        H, W = select_best_resolution((h, w), self.pinpoints)
        new_h, new_w = fit_size((h, w), (H, W))
        canvas = Image.new("RGB", (W, H), (0, 0, 0))
        canvas.paste(
            rgb.resize((new_w, new_h), Image.Resampling.BICUBIC),
            ((W - new_w) // 2, (H - new_h) // 2),
        )
        thumb = np.asarray(rgb.resize((S, S), Image.Resampling.BICUBIC))
        rows, cols = H // S, W // S
        grid = np.asarray(canvas).reshape(rows, S, cols, S, 3).transpose(0, 2, 4, 1, 3)
        tiles_NCSS = np.concatenate(
            [thumb.transpose(2, 0, 1)[None], grid.reshape(rows * cols, 3, S, S)]
        )
        x = torch.from_numpy(tiles_NCSS).to(torch.float32).div_(255)
        x.sub_(self._mean_13).div_(self._std_13)
        return ProcessedImage(pixel_values=x, image_size=(h, w), digest=image_digest(rgb))


def to_rgb(image: Image.Image) -> Image.Image:
    """The image as 8-bit RGB (see `ImageProcessor` for each mode); an RGB image is returned
    as it is."""
    if image.mode == "RGB" and "transparency" not in image.info:
        return image
    if image.mode.startswith("I;16"):
        a = np.asarray(image).astype(np.uint32)
        return Image.fromarray(((a * 255 + 32767) // 65535).astype(np.uint8), "L").convert("RGB")
    if "A" in image.getbands() or "transparency" in image.info:
        rgba = image.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(black, rgba).convert("RGB")
    return image.convert("RGB")


def image_digest(rgb: Image.Image) -> bytes:
    """16-byte BLAKE2b of an RGB image's size and pixel bytes (read in slices of ~4 MP)."""
    if rgb.mode != "RGB":
        raise ValueError(f"image_digest takes an RGB image, got mode {rgb.mode}")
    w, h = rgb.size
    hasher = hashlib.blake2b(digest_size=16, person=b"lightlong-rgb8")
    hasher.update(struct.pack("<QQ", h, w))
    step = max(1, (1 << 22) // max(w, 1))
    for y in range(0, h, step):
        hasher.update(rgb.crop((0, y, w, min(h, y + step))).tobytes())
    return hasher.digest()


def _channel_values(v: Any, name: str, *, positive: bool) -> tuple[float, float, float]:
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        v = [v] * 3
    ok = (
        isinstance(v, Sequence)
        and not isinstance(v, str)
        and len(v) == 3
        and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)
        and all(np.isfinite(x) and (x > 0 or not positive) for x in v)
    )
    if not ok:
        need = "positive " if positive else ""
        raise ValueError(f"{name} must be 3 {need}numbers (R, G, B), got {v!r}")
    return (float(v[0]), float(v[1]), float(v[2]))


def _side(v: Any, field: str, bad: Any) -> int:
    """The tile side a size / crop_size field gives: {"height", "width"} (equal),
    {"shortest_edge"}, [width, height] (the released file; equal) or a number."""
    if isinstance(v, dict):
        if "height" in v or "width" in v:
            sides = {v.get("height"), v.get("width")}
        elif "shortest_edge" in v:
            sides = {v["shortest_edge"]}
        else:
            raise bad(field, 'must have "height" and "width" or "shortest_edge"')
    elif isinstance(v, list):
        sides = set(v) if len(v) == 2 else set()
    else:
        sides = {v}
    if len(sides) != 1:
        raise bad(field, "must be square (tiles are S×S)")
    (side,) = sides
    if not isinstance(side, int) or isinstance(side, bool) or side < 1:
        raise bad(field, "must give a positive int side")
    return side


# ------------------------------------------------------------------------------ tokens


def expand_image_tokens(
    ids: Sequence[int], image_token_id: int, counts: Sequence[int]
) -> list[int]:
    """A prompt with each `<image>` token (image_token_id) replaced by its image's run of
    counts[i] of them (the i-th occurrence takes counts[i]; `VLConfig.num_image_tokens`).

    Raises:
        ValueError: the prompt has a different number of `<image>` tokens than counts, or a
            count is not a positive int.
    """
    ids = list(ids)
    n = sum(1 for t in ids if t == image_token_id)
    if n != len(counts):
        have = f"{n} <image> token{'s' if n != 1 else ''}"
        given = f"{len(counts)} image{'s were' if len(counts) != 1 else ' was'}"
        raise ValueError(
            f"the prompt has {have} (id {image_token_id}) but {given} given: each image needs "
            "exactly one <image> in the prompt"
        )
    for i, c in enumerate(counts):
        if not isinstance(c, int) or isinstance(c, bool) or c < 1:
            raise ValueError(f"image {i}: its token count must be a positive int, got {c!r}")
    out: list[int] = []
    k = 0
    for t in ids:
        if t == image_token_id:
            out.extend([image_token_id] * counts[k])
            k += 1
        else:
            out.append(t)
    return out


def encode_with_images(tokenizer: Tokenizer, text: str, image_token_id: int) -> list[int]:
    """Token ids of `text` in which each literal "<image>" is one image_token_id: the text
    between them is encoded piece by piece with `tokenizer.encode` (empty pieces give no
    tokens), so "<image>" never depends on how a tokenizer splits it."""
    out: list[int] = []
    for i, piece in enumerate(text.split(IMAGE_PLACEHOLDER)):
        if i:
            out.append(image_token_id)
        if piece:
            out.extend(tokenizer.encode(piece))
    return out
