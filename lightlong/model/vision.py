"""MiniMax-VL-01: a CLIP-style ViT and an MLP projector in front of the hybrid text model
("ViT-MLP-LLM").

An image is cut into tiles (`lightlong.model.image`: a thumbnail, then the tiles of its best
grid); the ViT turns each tile into (S/P)² patch features (CLS dropped), the projector maps
them to the text model's width, and `pack_image_features` lays them out as the text model
reads them: the thumbnail's features, then the grid's rows (unpadded to the image's aspect),
each followed by the learned `image_newline`. The prompt holds one `<image>` token per
feature, which the features replace before the first decoder layer.

# B batch, T tokens, D text width, C vision width, N tiles, P patch, S tile side
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightlong.model.config import PRESETS, HybridConfig, read_json, write_config
from lightlong.model.hybrid import HybridLM, LMOutput
from lightlong.model.image import grid_shape, unpadded_rows_cols

if TYPE_CHECKING:
    from lightlong.infer.cache import HybridCache
    from lightlong.tokenizer import Tokenizer

ACTIVATIONS = {
    "gelu": lambda x: F.gelu(x),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
}
"""Activations of the ViT's MLP and the projector, by their `transformers` names."""
SELECT_STRATEGIES = ("default",)
"""vision_feature_select_strategy values run: "default" drops the CLS feature (MiniMax-VL-01;
LLaVA-NeXT's anyres packing has no room for it, so "full" is refused)."""
VL_MODEL_TYPE = "minimax_vl_01"
VL_ARCHITECTURE = "MiniMaxVL01ForConditionalGeneration"
_CLIP_DEFAULTS = {  # transformers' CLIPVisionConfig, for fields a config.json leaves out
    "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
    "num_attention_heads": 12, "num_channels": 3, "image_size": 224, "patch_size": 32,
    "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "initializer_range": 0.02,
}  # fmt: skip


@dataclass
class VisionConfig:
    """The ViT: CLIP's vision tower (pre-LayerNorm blocks, learned positions, a CLS token)."""

    hidden_size: int = 1024
    """Width C."""
    intermediate_size: int = 4096
    """MLP hidden units."""
    num_layers: int = 24
    num_heads: int = 16
    patch_size: int = 14
    """P: each tile is cut into (S/P)² patches."""
    image_size: int = 336
    """S: the side of a tile."""
    num_channels: int = 3
    hidden_act: str = "gelu"
    """MLP activation (`ACTIVATIONS`; MiniMax-VL-01's is exact GELU, CLIP's quick_gelu)."""
    layer_norm_eps: float = 1e-5
    initializer_range: float = 0.02

    def validate(self) -> VisionConfig:
        """ValueError naming the field; returns self."""
        for name in ("hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "patch_size", "image_size", "num_channels"):  # fmt: skip
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"vision {name} must be a positive int, got {v!r}")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"vision num_heads ({self.num_heads}) must divide hidden_size ({self.hidden_size})"
            )
        if self.image_size % self.patch_size:
            raise ValueError(
                f"vision patch_size ({self.patch_size}) must divide image_size ({self.image_size})"
            )
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(
                f"vision hidden_act must be one of {list(ACTIVATIONS)}, got {self.hidden_act!r}"
            )
        return self

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    def to_clip_dict(self) -> dict[str, Any]:
        """`transformers`' `clip_vision_model` fields (as the released config.json has them)."""
        return {
            "model_type": "clip_vision_model",
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "patch_size": self.patch_size,
            "image_size": self.image_size,
            "num_channels": self.num_channels,
            "hidden_act": self.hidden_act,
            "layer_norm_eps": self.layer_norm_eps,
            "initializer_range": self.initializer_range,
        }

    @classmethod
    def from_clip_dict(cls, d: dict[str, Any], source: str) -> VisionConfig:
        if not isinstance(d, dict):
            raise ValueError(f"{source}: vision_config must be an object, got {d!r}")
        g = {**_CLIP_DEFAULTS, **d}
        return cls(
            hidden_size=g["hidden_size"], intermediate_size=g["intermediate_size"],
            num_layers=g["num_hidden_layers"], num_heads=g["num_attention_heads"],
            patch_size=g["patch_size"], image_size=g["image_size"],
            num_channels=g["num_channels"], hidden_act=g["hidden_act"],
            layer_norm_eps=g["layer_norm_eps"], initializer_range=g["initializer_range"],
        )  # fmt: skip


def _pinpoints(side: int, most: int, tiles: int | None = None) -> list[list[int]]:
    """Every (height, width) of whole tiles of `side` up to `most` pixels a side (and at most
    `tiles` tiles), rows first."""
    sides = range(side, most + 1, side)
    return [[h, w] for h in sides for w in sides if tiles is None or h * w <= tiles * side**2]


MINIMAX_VL_PINPOINTS = _pinpoints(336, 2016, tiles=18)
"""MiniMax-VL-01's 28 grids: 336 px tiles, up to 6 a side and 18 in all."""


@dataclass
class VLConfig:
    """A vision-language model: the text model's config, the ViT's, and how they meet."""

    text: HybridConfig = field(default_factory=HybridConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    image_token_id: int = 200025
    """The `<image>` token: the prompt holds one per image feature."""
    vision_feature_layer: int = -1
    """The ViT hidden state fed to the projector: 0 is the embeddings, i the output of layer
    i, negative counts from the last (-1: the last layer's output, no final norm; MiniMax's.
    A config.json without the field gets LLaVA-NeXT's default, -2)."""
    vision_feature_select_strategy: str = "default"
    """'default' drops the CLS feature: (S/P)² features per tile (`SELECT_STRATEGIES`)."""
    projector_hidden_act: str = "gelu"
    image_grid_pinpoints: list[list[int]] = field(
        default_factory=lambda: [list(p) for p in MINIMAX_VL_PINPOINTS]
    )
    """Candidate (height, width) resolutions of an image's tile grid."""
    model_type: str = VL_MODEL_TYPE

    def validate(self) -> VLConfig:
        """ValueError naming the field; returns self."""
        self.text.validate()
        self.vision.validate()
        t = self.image_token_id
        if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < self.text.vocab_size:
            raise ValueError(
                f"image_token_id must be a token id in [0, vocab_size={self.text.vocab_size}), "
                f"got {t!r}"
            )
        n = self.vision.num_layers
        layer = self.vision_feature_layer
        if not isinstance(layer, int) or isinstance(layer, bool) or not -(n + 1) <= layer <= n:
            raise ValueError(
                f"vision_feature_layer must be an int in [{-(n + 1)}, {n}] (a hidden state of "
                f"the {n}-layer ViT), got {layer!r}"
            )
        if self.vision_feature_select_strategy not in SELECT_STRATEGIES:
            raise ValueError(
                f"vision_feature_select_strategy must be one of {SELECT_STRATEGIES} (CLS "
                f"dropped, as MiniMax-VL-01 runs), got {self.vision_feature_select_strategy!r}"
            )
        if self.projector_hidden_act not in ACTIVATIONS:
            raise ValueError(
                f"projector_hidden_act must be one of {list(ACTIVATIONS)}, got "
                f"{self.projector_hidden_act!r}"
            )
        S = self.vision.image_size
        pins = self.image_grid_pinpoints
        if not isinstance(pins, list) or not pins or not all(
            isinstance(p, (list, tuple)) and len(p) == 2
            and all(
                isinstance(v, int) and not isinstance(v, bool) and v > 0 and v % S == 0 for v in p
            )
            for p in pins
        ):  # fmt: skip
            raise ValueError(
                f"image_grid_pinpoints must be a non-empty list of [height, width] multiples of "
                f"the tile side {S}, got {pins!r}"
            )
        self.image_grid_pinpoints = [list(p) for p in pins]
        return self

    @property
    def feature_layer_count(self) -> int:
        """ViT layers that run: those up to vision_feature_layer."""
        n, layer = self.vision.num_layers, self.vision_feature_layer
        return layer if layer >= 0 else n + 1 + layer

    @property
    def tile_tokens(self) -> int:
        """Features per tile: (S/P)² (the CLS dropped)."""
        return self.vision.patches_per_side**2

    def num_image_tokens(self, image_size: tuple[int, int]) -> int:
        """`<image>` tokens (features) of an image of (height, width) pixels: the thumbnail's
        tile, then the unpadded grid's rows, each with a newline."""
        rows, cols = unpadded_rows_cols(
            image_size, self.image_grid_pinpoints, self.vision.image_size,
            self.vision.patches_per_side,
        )  # fmt: skip
        return self.tile_tokens + rows * (cols + 1)

    # ------------------------------------------------------------------ presets

    @classmethod
    def from_preset(cls, name: str) -> VLConfig:
        """A named configuration: see `VL_PRESETS`."""
        if name not in VL_PRESETS:
            raise ValueError(f"unknown VL preset {name!r}; valid: {sorted(VL_PRESETS)}")
        return _copy(VL_PRESETS[name])

    # ------------------------------------------------------------------ JSON

    def to_minimax_dict(self) -> dict[str, Any]:
        """The released MiniMax-VL-01 `config.json` (the text model's released config nested
        as `text_config`)."""
        return {
            "architectures": [VL_ARCHITECTURE],
            "model_type": self.model_type,
            "image_token_index": self.image_token_id,
            "vision_feature_layer": self.vision_feature_layer,
            "vision_feature_select_strategy": self.vision_feature_select_strategy,
            "projector_hidden_act": self.projector_hidden_act,
            "image_grid_pinpoints": self.image_grid_pinpoints,
            "tie_word_embeddings": self.text.tie_word_embeddings,
            "text_config": self.text.to_minimax_dict(),
            "vision_config": self.vision.to_clip_dict(),
        }

    def to_hf_dict(self) -> dict[str, Any]:
        """`transformers`' `llava_next` config (MiniMax-VL-01's architecture) around its
        `minimax` text config; ValueError when transformers would run another model."""
        return {
            "architectures": ["LlavaNextForConditionalGeneration"],
            "model_type": "llava_next",
            "image_token_index": self.image_token_id,
            "vision_feature_layer": self.vision_feature_layer,
            "vision_feature_select_strategy": self.vision_feature_select_strategy,
            "projector_hidden_act": self.projector_hidden_act,
            "multimodal_projector_bias": True,
            "image_grid_pinpoints": self.image_grid_pinpoints,
            "tie_word_embeddings": self.text.tie_word_embeddings,
            "text_config": self.text.to_hf_dict(),
            "vision_config": self.vision.to_clip_dict(),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, source: str = "config") -> VLConfig:
        """From the released MiniMax-VL-01 config.json or `transformers`' llava_next one."""
        if not isinstance(d, dict):
            raise ValueError(f"{source}: expected a JSON object, got {type(d).__name__}")
        for key in ("text_config", "vision_config"):
            if not isinstance(d.get(key), dict):
                raise ValueError(
                    f"{source}: a vision-language config needs {key} as an object, got "
                    f"{d.get(key)!r}"
                )
        strategy = d.get("vision_feature_select_strategy", "default")
        layer = d.get("vision_feature_layer", -2)
        if isinstance(layer, list):
            raise ValueError(
                f"{source}: vision_feature_layer must be one layer, got the list {layer}"
            )
        text = d["text_config"]
        if isinstance(text, dict) and "tie_word_embeddings" in d:
            text = {**text, "tie_word_embeddings": d["tie_word_embeddings"]}
        try:
            return cls(
                text=HybridConfig.from_dict(text, source=f"{source} text_config"),
                vision=VisionConfig.from_clip_dict(d["vision_config"], source),
                image_token_id=d.get("image_token_index", d.get("image_token_id", 200025)),
                vision_feature_layer=layer,
                vision_feature_select_strategy=strategy,
                projector_hidden_act=d.get("projector_hidden_act", "gelu"),
                image_grid_pinpoints=d.get("image_grid_pinpoints", MINIMAX_VL_PINPOINTS),
                model_type=VL_MODEL_TYPE,
            ).validate()
        except (TypeError, KeyError) as e:
            raise ValueError(f"{source}: a field has the wrong type or value ({e})") from None
        except ValueError as e:
            if str(e).startswith(source):
                raise
            raise ValueError(f"{source}: {e}") from None

    @classmethod
    def from_json(cls, path: str | Path) -> VLConfig:
        """Reads a config.json: the released MiniMax-VL-01 one or transformers' llava_next."""
        return cls.from_dict(read_json(path), source=str(path))

    def save_json(self, path: str | Path, *, format: str = "minimax") -> None:
        """Writes config.json: the released format, or "transformers"' llava_next."""
        write_config(self, path, format)


def is_vl_config(d: Any) -> bool:
    """Whether a config.json's contents describe a vision-language model."""
    return isinstance(d, dict) and ("vision_config" in d or d.get("model_type") == VL_MODEL_TYPE)


def _copy(c: VLConfig) -> VLConfig:
    text = dataclasses.replace(c.text, layer_types=list(c.text.layer_types))
    return dataclasses.replace(
        c, text=text, vision=dataclasses.replace(c.vision),
        image_grid_pinpoints=[list(p) for p in c.image_grid_pinpoints],
    )  # fmt: skip


VL_PRESETS: dict[str, VLConfig] = {
    # MiniMax-VL-01 as released: the 303M ViT at 336 px, tiles up to 2016 px a side.
    "minimax-vl-01": VLConfig(text=PRESETS["minimax-text-01"]),
    # tests and the CPU demo: the tiny hybrid (its byte tokenizer's ids are 0..256, so
    # <image> is 257) behind a 2-layer ViT on 28 px tiles of 7 px patches (16 per tile).
    "tiny-vl": VLConfig(
        text=PRESETS["tiny"],
        vision=VisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_layers=2,
            num_heads=2,
            patch_size=7,
            image_size=28,
        ),
        image_token_id=257,
        image_grid_pinpoints=_pinpoints(28, 56),
    ),
}


# ---------------------------------------------------------------------------------- modules


class VisionEmbeddings(nn.Module):
    """Patches (a stride-P convolution), a CLS token and learned positions:
    pixels [N, 3, S, S] -> [N, 1 + (S/P)², C]."""

    def __init__(self, c: VisionConfig):
        super().__init__()
        self.class_embedding = nn.Parameter(torch.empty(c.hidden_size))
        self.patch_embedding = nn.Conv2d(
            c.num_channels, c.hidden_size, c.patch_size, stride=c.patch_size, bias=False
        )
        self.position_embedding = nn.Embedding(c.patches_per_side**2 + 1, c.hidden_size)

    def forward(self, pixels_NCHW: Tensor) -> Tensor:
        w = self.patch_embedding.weight
        patches_NLC = self.patch_embedding(pixels_NCHW.to(w.dtype)).flatten(2).transpose(1, 2)
        cls_N1C = self.class_embedding.expand(patches_NLC.shape[0], 1, -1)
        return torch.cat([cls_N1C, patches_NLC], dim=1) + self.position_embedding.weight


class VisionAttention(nn.Module):
    """Bidirectional multi-head attention with biased projections: [N, L, C] -> [N, L, C]."""

    def __init__(self, c: VisionConfig):
        super().__init__()
        self.num_heads = c.num_heads
        self.q_proj = nn.Linear(c.hidden_size, c.hidden_size)
        self.k_proj = nn.Linear(c.hidden_size, c.hidden_size)
        self.v_proj = nn.Linear(c.hidden_size, c.hidden_size)
        self.out_proj = nn.Linear(c.hidden_size, c.hidden_size)

    def forward(self, x_NLC: Tensor) -> Tensor:
        N, L, C = x_NLC.shape
        q, k, v = (
            p(x_NLC).view(N, L, self.num_heads, -1).transpose(1, 2)
            for p in (self.q_proj, self.k_proj, self.v_proj)
        )
        o_NHLE = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(o_NHLE.transpose(1, 2).reshape(N, L, C))


class VisionMLP(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.act = ACTIVATIONS[c.hidden_act]
        self.fc1 = nn.Linear(c.hidden_size, c.intermediate_size)
        self.fc2 = nn.Linear(c.intermediate_size, c.hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class VisionLayer(nn.Module):
    """x ← x + attn(LN(x)); x ← x + mlp(LN(x))."""

    def __init__(self, c: VisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.self_attn = VisionAttention(c)
        self.layer_norm2 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.mlp = VisionMLP(c)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class VisionEncoder(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(VisionLayer(c) for _ in range(c.num_layers))


class VisionTransformer(nn.Module):
    """CLIP's vision model without the final LayerNorm (MiniMax-VL-01's checkpoint has none:
    its features are a hidden state, taken before any final norm)."""

    def __init__(self, c: VisionConfig):
        super().__init__()
        self.embeddings = VisionEmbeddings(c)
        self.pre_layrnorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)  # CLIP's spelling
        self.encoder = VisionEncoder(c)

    def forward(self, pixels_NCHW: Tensor, layers: int) -> Tensor:
        """The hidden state after `layers` encoder layers: [N, 1 + (S/P)², C]."""
        x = self.pre_layrnorm(self.embeddings(pixels_NCHW))
        for layer in self.encoder.layers[:layers]:
            x = layer(x)
        return x


class VisionTower(nn.Module):
    """Holds the ViT as `vision_model` (checkpoint prefix `vision_tower.vision_model.`)."""

    def __init__(self, c: VisionConfig):
        super().__init__()
        self.vision_model = VisionTransformer(c)


class Projector(nn.Module):
    """linear_1 (C -> D) -> activation -> linear_2 (D -> D), both biased: [..., C] -> [..., D]."""

    def __init__(self, vision_size: int, text_size: int, act: str):
        super().__init__()
        self.linear_1 = nn.Linear(vision_size, text_size)
        self.act = ACTIVATIONS[act]
        self.linear_2 = nn.Linear(text_size, text_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


class HybridVLM(nn.Module):
    """MiniMax-VL-01: `vision_tower` -> `multi_modal_projector` -> `language_model` (a
    `HybridLM`), with the learned `image_newline`; parameter names are the released
    checkpoint's keys."""

    def __init__(self, config: VLConfig):
        super().__init__()
        self.config = config.validate()
        self.vision_tower = VisionTower(config.vision)
        self.multi_modal_projector = Projector(
            config.vision.hidden_size, config.text.hidden_size, config.projector_hidden_act
        )
        self.image_newline = nn.Parameter(torch.empty(config.text.hidden_size))
        self.language_model = HybridLM(config.text)
        self.init_vision_weights()

    @torch.no_grad()
    def init_vision_weights(self) -> None:
        """Normal(0, initializer_range) for the ViT's and projector's weights (biases zero,
        LayerNorms one); image_newline Normal(0, 1/√D). The text model initialises itself."""
        std = self.config.vision.initializer_range
        for module in (self.vision_tower, self.multi_modal_projector):
            for m in module.modules():
                if isinstance(m, (nn.Linear, nn.Conv2d, nn.Embedding)):
                    m.weight.normal_(0.0, std)
                    if getattr(m, "bias", None) is not None:
                        m.bias.zero_()
                elif isinstance(m, nn.LayerNorm):
                    m.weight.fill_(1.0)
                    m.bias.zero_()
        self.vision_tower.vision_model.embeddings.class_embedding.normal_(0.0, std)
        self.image_newline.normal_(0.0, 1.0 / math.sqrt(self.config.text.hidden_size))

    def tie_weights(self) -> None:
        self.language_model.tie_weights()

    # -- images ----------------------------------------------------------------------------

    def image_features(
        self, pixel_values: Tensor, image_sizes: Sequence[tuple[int, int]]
    ) -> list[Tensor]:
        """Each image's features as the text model reads them.

        Args:
            pixel_values: [N, 3, S, S], the tiles of every image in order (each image's
                thumbnail first, then its grid row by row; `lightlong.model.image`).
            image_sizes: (height, width) of each image as given (before resizing).

        Returns:
            per image, [n_i, D] with n_i = `config.num_image_tokens(image_sizes[i])`.
        """
        c = self.config
        S = c.vision.image_size
        counts = [_tile_count(size, c) for size in image_sizes]
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != (3, S, S):
            raise ValueError(
                f"pixel_values must be [N, 3, {S}, {S}], got {tuple(pixel_values.shape)}"
            )
        if pixel_values.shape[0] != sum(counts):
            raise ValueError(
                f"pixel_values has {pixel_values.shape[0]} tiles; image_sizes {list(image_sizes)} "
                f"need {sum(counts)} (a thumbnail and the best grid each)"
            )
        hidden_NLC = self.vision_tower.vision_model(pixel_values, c.feature_layer_count)
        hidden_NLC = hidden_NLC[:, 1:]  # the CLS feature is dropped ("default")
        feats_NLD = self.multi_modal_projector(hidden_NLC)
        return [
            pack_image_features(f, size, c, self.image_newline)
            for f, size in zip(feats_NLD.split(counts), image_sizes, strict=True)
        ]

    # -- the model -------------------------------------------------------------------------

    def embed(
        self,
        input_ids: Tensor,
        image_features: Tensor | Sequence[Tensor] | None = None,
    ) -> Tensor:
        """Token embeddings [B, T, D] with the `<image>` positions (row-major) taking the rows
        of image_features ([M, D], or a list concatenated in order); M must equal the count
        of `<image>` tokens in input_ids."""
        c = self.config
        if not isinstance(input_ids, Tensor) or input_ids.dim() != 2:
            raise ValueError("input_ids must be an int tensor [B, T]")
        mask = input_ids == c.image_token_id
        need = 0
        if input_ids.numel():  # the range and the <image> count in one device sync
            lo, hi, need = torch.stack([input_ids.min(), input_ids.max(), mask.sum()]).tolist()
            if lo < 0 or hi >= c.text.vocab_size:
                raise ValueError(f"input_ids must be in [0, vocab_size={c.text.vocab_size})")
        x = self.language_model.model.embed_tokens(input_ids)
        if isinstance(image_features, (list, tuple)):
            image_features = torch.cat(image_features) if image_features else None
        have = 0 if image_features is None else image_features.shape[0]
        if have != need:
            raise ValueError(
                f"input_ids hold {need} <image> tokens (id {c.image_token_id}) but {have} image "
                "features were given: each image needs exactly config.num_image_tokens(size) "
                "<image> tokens (lightlong.model.image.expand_image_tokens)"
            )
        if need:
            D = c.text.hidden_size
            if image_features.dim() != 2 or image_features.shape[1] != D:
                raise ValueError(
                    f"image_features must be [M, {D}], got {tuple(image_features.shape)}"
                )
            feats = image_features.to(device=x.device, dtype=x.dtype)
            x = x.masked_scatter(mask[..., None], feats)
        return x

    def forward(
        self,
        input_ids: Tensor,
        *,
        pixel_values: Tensor | None = None,
        image_sizes: Sequence[tuple[int, int]] | None = None,
        image_features: Tensor | Sequence[Tensor] | None = None,
        cu_seqlens: Tensor | None = None,
        labels: Tensor | None = None,
        logits_to_keep: int | Tensor | None = None,
        cache: HybridCache | None = None,
    ) -> LMOutput:
        """Runs the model on a prompt holding `<image>` tokens.

        Args:
            input_ids: int64 [B, T]; each image's features replace its run of `<image>`
                tokens, images in row-major order.
            pixel_values, image_sizes: the images' tiles [N, 3, S, S] and their (height,
                width) (`lightlong.model.image.ImageProcessor`), run through the ViT here.
            image_features: or the features already computed (`image_features`), [M, D] for
                the M `<image>` tokens of input_ids (a prefill chunk passes its share).
            cu_seqlens, labels, logits_to_keep, cache: as `HybridLM.forward`. Labels at
                `<image>` positions should be -100 (nothing to predict there).

        Returns:
            the text model's `LMOutput`.
        """
        if pixel_values is not None:
            if image_features is not None:
                raise ValueError("pass pixel_values (with image_sizes) or image_features, not both")
            if image_sizes is None:
                raise ValueError("pixel_values need image_sizes: (height, width) per image")
            image_features = self.image_features(pixel_values, image_sizes)
        x = self.embed(input_ids, image_features)
        return self.language_model(
            None, inputs_embeds=x, cu_seqlens=cu_seqlens, labels=labels,
            logits_to_keep=logits_to_keep, cache=cache,
        )  # fmt: skip

    # -- checkpoints -----------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        dtype: torch.dtype | None = None,
        device: str | torch.device = "cpu",
    ) -> HybridVLM:
        """Loads MiniMax-VL-01's released layout (config.json with text_config and
        vision_config, safetensors shards) or `transformers`' llava_next layout, shard by
        shard into a model built on the meta device."""
        from lightlong.model.checkpoint import load_pretrained_vl

        return load_pretrained_vl(path, dtype=dtype, device=device)

    def save_pretrained(
        self,
        path: str | Path,
        *,
        tokenizer: Tokenizer | str | None = None,
        max_shard_size: int | str = "5GB",
        config_format: str = "minimax",
    ) -> None:
        """Writes config.json ("minimax": released MiniMax-VL-01; "transformers":
        llava_next around transformers' minimax), the released weight names in safetensors
        shards, preprocessor_config.json, the tokenizer and generation_config.json,
        atomically."""
        from lightlong.model.checkpoint import save_weights
        from lightlong.model.image import ImageProcessor

        processor = ImageProcessor.for_config(self.config)
        save_weights(
            self.config, self.state_dict(), path, tokenizer=tokenizer,
            max_shard_size=max_shard_size, config_format=config_format,
            extra_files={"preprocessor_config.json": processor.to_json().encode()},
        )  # fmt: skip

    def param_count(self) -> dict[str, int]:
        """Parameters: total, vision (ViT + projector + newline), the text model's embedding,
        and active per text token (the text model's: a token runs no vision part; the
        vision part runs once per image tile)."""
        text = self.language_model.param_count()
        vision = sum(
            p.numel() for n, p in self.named_parameters() if not n.startswith("language_model.")
        )
        return {
            "total": text["total"] + vision,
            "vision": vision,
            "embedding": text["embedding"],
            "active": text["active"],
        }


def _tile_count(image_size: tuple[int, int], c: VLConfig) -> int:
    """Tiles of an image: its thumbnail and its grid."""
    rows, cols = grid_shape(image_size, c.image_grid_pinpoints, c.vision.image_size)
    return 1 + rows * cols


def pack_image_features(
    feats_NLD: Tensor, image_size: tuple[int, int], c: VLConfig, newline_D: Tensor
) -> Tensor:
    """One image's tile features [N, L, D] (thumbnail first, then the grid's tiles row by
    row, L = (S/P)² patches each) -> [n, D]: the thumbnail's L features, then the grid as one
    feature map cut back to the image's aspect, row by row, each row followed by newline_D."""
    q = c.vision.patches_per_side
    rows, cols = grid_shape(image_size, c.image_grid_pinpoints, c.vision.image_size)
    base_LD, grid = feats_NLD[0], feats_NLD[1:]
    D = grid.shape[-1]
    # [rows, cols, q, q, D] -> [rows·q, cols·q, D]: the tiles' patches as one map
    map_HWD = grid.reshape(rows, cols, q, q, D).permute(0, 2, 1, 3, 4)
    map_HWD = map_HWD.reshape(rows * q, cols * q, D)
    h, w = unpadded_rows_cols(image_size, c.image_grid_pinpoints, c.vision.image_size, q)
    top, left = (rows * q - h) // 2, (cols * q - w) // 2
    map_HWD = map_HWD[top : top + h, left : left + w]
    newline = newline_D.to(map_HWD.dtype).expand(h, 1, D)
    return torch.cat([base_LD, torch.cat([map_HWD, newline], dim=1).reshape(-1, D)])


def text_model(model: HybridLM | HybridVLM) -> HybridLM:
    """The text model of a model: itself, or a vision-language model's `language_model`."""
    return model.language_model if isinstance(model, HybridVLM) else model
