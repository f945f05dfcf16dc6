"""`HybridConfig`: the one description of a MiniMax-01-style hybrid model.

Three `config.json` dialects are read, each with its own defaults for missing fields:

- released: MiniMax-Text-01 (`MiniMaxText01ForCausalLM`, `minimax_text_01`) and MiniMax-M1
  (`MiniMaxM1ForCausalLM`, `minimax_m1`; the same architecture) — `attn_type_list`,
  `layernorm_*_alpha/beta`, `postnorm`, `rotary_dim`, `shared_intermediate_size`; missing
  fields take the released configuration class's and modeling code's defaults;
- `transformers`' native `minimax` — `layer_types`, `*_alpha_factor/*_beta_factor`; read as
  `transformers` runs it (always post-norm, RoPE over the whole head);
- lightlong's own field names (`HybridConfig.to_dict`).

The released dialect is written (lightlong's other mixers go to `lightlong_layer_types`
only), and `transformers`' when the model can be expressed there.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

LAYER_TYPES = ("lightning", "softmax", "cosformer", "norm_linear", "diag_softmax", "window_softmax")
"""Token mixers: MiniMax's two, and the lineage it was chosen from (see `lightlong.nn`)."""
LINEAR_TYPES = ("lightning", "cosformer", "norm_linear")
"""Mixers whose whole past is a fixed-size state (they take the linear residual scales)."""
LOCAL_TYPES = ("diag_softmax", "window_softmax")
"""Softmax mixers over a bounded span of recent tokens (a bounded KV cache)."""
LAYER_LETTERS = {"lightning": "L", "softmax": "S", "cosformer": "C", "norm_linear": "N",
                 "diag_softmax": "D", "window_softmax": "W"}  # fmt: skip
"""One letter per layer type, for layer patterns like LLLS."""
CONFIG_FORMATS = ("minimax", "transformers")
MODEL_TYPES = {"minimax_text_01": "MiniMaxText01ForCausalLM", "minimax_m1": "MiniMaxM1ForCausalLM"}
"""The released families (same architecture) and the `architectures` name each writes."""
ACTIVATIONS = ("silu", "swish")
"""`hidden_act` values the released code runs as SiLU (lightning q/k/v and the experts)."""
_HF_LAYER_TYPES = {"linear_attention": "lightning", "full_attention": "softmax"}


@dataclass
class HybridConfig:
    """Sizes and knobs of a hybrid lightning/softmax MoE language model."""

    vocab_size: int = 1024
    """Tokens in the vocabulary."""
    hidden_size: int = 128
    """Model width D."""
    num_layers: int = 4
    """Decoder layers L."""
    num_heads: int = 4
    """Attention heads H (lightning and softmax layers alike)."""
    num_kv_heads: int = 2
    """Key/value heads of the softmax layers (GQA); must divide num_heads."""
    head_dim: int = 32
    """Per-head dim."""
    layer_types: list[str] = field(default_factory=lambda: ["lightning"] * 3 + ["softmax"])
    """Mixer per layer: 'lightning' or 'softmax' (MiniMax-Text-01: softmax every 8th), or
    'cosformer', 'norm_linear', 'diag_softmax', 'window_softmax' (see LAYER_TYPES)."""
    rotary_dim: int = 16
    """Leading dims of each softmax head that RoPE rotates (64 of 128 in MiniMax)."""
    rope_theta: float = 10000.0
    """RoPE base (1e7 in MiniMax)."""
    block_size: int = 64
    """Lightning attention block size C."""
    decay_slope_heads: int = 0
    """Lightning decay: head h takes ALiBi's slope of head h of R = this many heads, the
    short memories of a wider model's first heads (0: R = num_heads, MiniMax's rule)."""
    window_size: int = 256
    """window_softmax: tokens each query sees (itself and the W − 1 before it)."""
    diag_block_size: int = 64
    """diag_softmax: softmax runs within blocks of this many tokens."""
    cosformer_max_len: int = 4096
    """cosformer: M of the cos((i − j)·π / 2M) re-weighting (distances past M weigh < 0)."""
    norm_linear_decay: bool = True
    """norm_linear: per-head decay as lightning's (False: plain linear attention)."""
    num_experts: int = 4
    """Experts per MoE block."""
    experts_per_token: int = 2
    """Top-k experts each token is routed to."""
    intermediate_size: int = 256
    """Hidden size of each SwiGLU expert."""
    router_aux_loss_coef: float = 0.001
    """Weight of the load-balancing loss in the total loss."""
    rms_norm_eps: float = 1e-5
    """Epsilon of the layer and final RMSNorms."""
    postnorm: bool = True
    """MiniMax's residual: the branch adds to the normed input (True) or the raw input."""
    linear_attn_alpha: float = 1.0
    """Residual scale of lightning layers: x ← alpha · residual + beta · attn(x)."""
    linear_attn_beta: float = 1.0
    """Branch scale of lightning layers."""
    full_attn_alpha: float = 1.0
    """Residual scale of softmax layers."""
    full_attn_beta: float = 1.0
    """Branch scale of softmax layers."""
    mlp_alpha: float = 1.0
    """Residual scale of MoE blocks."""
    mlp_beta: float = 1.0
    """Branch scale of MoE blocks."""
    tie_word_embeddings: bool = False
    """Share the embedding matrix with the LM head."""
    max_position_embeddings: int = 1 << 20
    """Longest sequence the model accepts."""
    initializer_range: float = 0.02
    """Std of the normal initialisation of weights."""
    shared_intermediate_size: int = 0
    """> 0: every layer adds the released shared expert, a SwiGLU MLP (`shared_mlp`, of
    intermediate_size hidden units as the released code builds it) mixed with the MoE
    output by a sigmoid gate: y = (1 − c)·moe + c·mlp, c = σ(h · coefficient)."""
    model_type: str = "minimax_text_01"
    """Released family written to config.json: 'minimax_text_01' or 'minimax_m1' (MiniMax-M1,
    the same architecture)."""

    def validate(self) -> HybridConfig:
        """Raises ValueError naming the field and its allowed range; returns self."""
        positive = (
            "vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
            "block_size", "num_experts", "experts_per_token", "intermediate_size",
            "max_position_embeddings", "window_size", "diag_block_size", "cosformer_max_len",
        )  # fmt: skip
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_kv_heads ({self.num_kv_heads}) must divide num_heads ({self.num_heads})"
            )
        if len(self.layer_types) != self.num_layers:
            raise ValueError(
                f"layer_types must have num_layers = {self.num_layers} entries, "
                f"got {len(self.layer_types)}"
            )
        bad = sorted({t for t in self.layer_types if t not in LAYER_TYPES})
        if bad:
            raise ValueError(f"layer_types entries must be one of {LAYER_TYPES}, got {bad}")
        R = self.decay_slope_heads
        if not isinstance(R, int) or isinstance(R, bool) or not (R == 0 or self.num_heads <= R):
            raise ValueError(
                f"decay_slope_heads must be 0 or an int >= num_heads ({self.num_heads}), got {R!r}"
            )
        if not 0 <= self.rotary_dim <= self.head_dim or self.rotary_dim % 2:
            raise ValueError(
                f"rotary_dim must be even and in [0, head_dim={self.head_dim}], "
                f"got {self.rotary_dim}"
            )
        if not self.experts_per_token <= self.num_experts:
            raise ValueError(
                f"experts_per_token ({self.experts_per_token}) must be <= num_experts "
                f"({self.num_experts})"
            )
        for name in ("rope_theta", "rms_norm_eps", "initializer_range"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
        if not self.router_aux_loss_coef >= 0:
            raise ValueError(f"router_aux_loss_coef must be >= 0, got {self.router_aux_loss_coef}")
        for name in ("postnorm", "tie_word_embeddings", "norm_linear_decay"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        shared = self.shared_intermediate_size
        if not isinstance(shared, int) or isinstance(shared, bool) or shared < 0:
            raise ValueError(f"shared_intermediate_size must be an int >= 0, got {shared!r}")
        if self.model_type not in MODEL_TYPES:
            raise ValueError(
                f"model_type must be one of {list(MODEL_TYPES)}, got {self.model_type!r}"
            )
        return self

    # ------------------------------------------------------------------ presets

    @classmethod
    def from_preset(cls, name: str) -> HybridConfig:
        """A named configuration: see `PRESETS` (exact names; `-linear`/`-softmax` variants)."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; valid presets: {sorted(PRESETS)}")
        return dataclasses.replace(PRESETS[name], layer_types=list(PRESETS[name].layer_types))

    @property
    def pattern(self) -> str:
        """The layer types as letters (`LAYER_LETTERS`), e.g. "LLLLLLLS"."""
        return "".join(LAYER_LETTERS[t] for t in self.layer_types)

    # ------------------------------------------------------------------ JSON

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_minimax_dict(self) -> dict[str, Any]:
        """The released MiniMax-Text-01 `config.json` fields; a model with other mixers than
        lightning and softmax adds `lightlong_layer_types` and their settings (its
        `attn_type_list` then says which layers are softmax-like)."""
        extra = {}
        if set(self.layer_types) - {"lightning", "softmax"}:
            extra = {"lightlong_layer_types": list(self.layer_types)} | {
                k: getattr(self, k) for k in _LINEAGE_FIELDS
            }
        if self.decay_slope_heads:
            extra["decay_slope_heads"] = self.decay_slope_heads
        return {
            "architectures": [MODEL_TYPES[self.model_type]],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "attn_type_list": [int(t not in LINEAR_TYPES) for t in self.layer_types],
            "rotary_dim": self.rotary_dim,
            "rope_theta": self.rope_theta,
            "block_size": self.block_size,
            "num_local_experts": self.num_experts,
            "num_experts_per_tok": self.experts_per_token,
            "intermediate_size": self.intermediate_size,
            "router_aux_loss_coef": self.router_aux_loss_coef,
            "rms_norm_eps": self.rms_norm_eps,
            "postnorm": self.postnorm,
            "layernorm_linear_attention_alpha": self.linear_attn_alpha,
            "layernorm_linear_attention_beta": self.linear_attn_beta,
            "layernorm_full_attention_alpha": self.full_attn_alpha,
            "layernorm_full_attention_beta": self.full_attn_beta,
            "layernorm_mlp_alpha": self.mlp_alpha,
            "layernorm_mlp_beta": self.mlp_beta,
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "initializer_range": self.initializer_range,
            "hidden_act": "silu",
            "shared_intermediate_size": self.shared_intermediate_size,
            "shared_moe_mode": "sigmoid",
            **extra,
        }

    def to_hf_dict(self) -> dict[str, Any]:
        """`transformers`' `minimax` config fields; ValueError naming the field when
        `transformers` would run a different model (its MiniMax is post-norm, rotates the
        whole head, has no shared expert and derives decay rates for power-of-two H only)."""
        other = sorted(set(self.layer_types) - {"lightning", "softmax"})
        if other:
            raise ValueError(f"transformers' MiniMax has no {other} layers")
        if self.decay_slope_heads:
            raise ValueError("transformers' MiniMax has no decay_slope_heads (its rates follow H)")
        if self.rotary_dim != self.head_dim and "softmax" in self.layer_types:
            raise ValueError(
                f"rotary_dim={self.rotary_dim}: transformers' MiniMax rotates all head_dim="
                f"{self.head_dim} dims (it ignores partial_rotary_factor), so its logits would "
                "differ; save with config_format='minimax'"
            )
        if not self.postnorm:
            raise ValueError("postnorm=False: transformers' MiniMax is always post-norm")
        if self.shared_intermediate_size:
            raise ValueError("shared_intermediate_size: transformers' MiniMax has no shared expert")
        if "lightning" in self.layer_types and self.num_heads & (self.num_heads - 1):
            raise ValueError(
                f"num_heads={self.num_heads}: transformers' MiniMax derives other decay rates "
                "than the released model when H is not a power of two"
            )
        return {
            "model_type": "minimax",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "layer_types": [
                "full_attention" if t == "softmax" else "linear_attention" for t in self.layer_types
            ],
            "rope_theta": self.rope_theta,
            "block_size": self.block_size,
            "num_local_experts": self.num_experts,
            "num_experts_per_tok": self.experts_per_token,
            "intermediate_size": self.intermediate_size,
            "router_aux_loss_coef": self.router_aux_loss_coef,
            "rms_norm_eps": self.rms_norm_eps,
            "linear_attn_alpha_factor": self.linear_attn_alpha,
            "linear_attn_beta_factor": self.linear_attn_beta,
            "full_attn_alpha_factor": self.full_attn_alpha,
            "full_attn_beta_factor": self.full_attn_beta,
            "mlp_alpha_factor": self.mlp_alpha,
            "mlp_beta_factor": self.mlp_beta,
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "initializer_range": self.initializer_range,
            "hidden_act": "silu",
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, source: str = "config") -> HybridConfig:
        """From lightlong's own fields, the released MiniMax format or `transformers`' format."""
        if not isinstance(d, dict):
            raise ValueError(f"{source}: expected a JSON object, got {type(d).__name__}")
        own = {f.name for f in dataclasses.fields(cls)}
        try:
            if set(d) <= own:  # lightlong's own field names (to_dict)
                pass
            elif d.get("model_type") == "minimax" or (
                "layer_types" in d and "num_hidden_layers" in d
            ):
                d = _from_transformers(d, source)
            elif (
                "attn_type_list" in d
                or d.get("model_type") in (*MODEL_TYPES, "MiniMaxText01", "MiniMaxM1")
                or "num_hidden_layers" in d
            ):
                d = _from_released(d, source)
        except (TypeError, KeyError, AttributeError, ValueError) as e:  # a field's type
            if str(e).startswith(source):
                raise
            raise ValueError(f"{source}: a field has the wrong type or value ({e})") from None
        unknown = sorted(set(d) - own)
        if unknown:
            raise ValueError(f"{source}: unknown fields {unknown}; valid: {sorted(own)}")
        try:
            return cls(**d).validate()
        except (TypeError, ValueError) as e:
            raise ValueError(f"{source}: {e}") from None

    @classmethod
    def from_json(cls, path: str | Path) -> HybridConfig:
        """Reads a `config.json` in any of the three formats."""
        return cls.from_dict(read_json(path), source=str(path))

    def save_json(self, path: str | Path, *, format: str = "minimax") -> None:
        """Writes config.json: the released MiniMax-Text-01 format, or "transformers"'."""
        write_config(self, path, format)


def write_config(config: Any, path: str | Path, format: str) -> None:
    """Writes a config's `to_minimax_dict()` ("minimax") or `to_hf_dict()` ("transformers")
    as JSON."""
    if format not in CONFIG_FORMATS:
        raise ValueError(f"format must be one of {CONFIG_FORMATS}, got {format!r}")
    d = config.to_minimax_dict() if format == "minimax" else config.to_hf_dict()
    Path(path).write_text(json.dumps(d, indent=2) + "\n")


def read_json(path: str | Path) -> Any:
    """A JSON file's contents; ValueError naming the file when it is not UTF-8 JSON."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: malformed JSON at line {e.lineno}: {e.msg}") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 (byte offset {e.start})") from None


# Defaults of the released configuration class (MiniMaxText01Config / MiniMaxM1Config) and,
# for fields it does not declare, of the released modeling code's getattr() fallbacks.
_RELEASED_DEFAULTS = {
    "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
    "max_position_embeddings": 4096 * 32, "initializer_range": 0.02, "rms_norm_eps": 1e-5,
    "rope_theta": 1e6, "num_experts_per_tok": 2, "num_local_experts": 8,
    "router_aux_loss_coef": 0.001, "tie_word_embeddings": False, "postnorm": False,
    "shared_intermediate_size": 0, "block_size": 256, "hidden_act": "silu",
}  # fmt: skip
_RELEASED_ARCHITECTURES = {*MODEL_TYPES.values(), "MiniMaxForCausalLM"}


def _check_common(d: dict[str, Any], source: str) -> None:
    """What both external dialects share: the activation and the architecture name."""
    act = d.get("hidden_act", "silu")
    if act not in ACTIVATIONS:
        raise ValueError(f"{source}: hidden_act {act!r} is not supported (only {ACTIVATIONS})")
    archs = d.get("architectures") or []
    unknown = [a for a in archs if a not in _RELEASED_ARCHITECTURES]
    if unknown:
        raise ValueError(
            f"{source}: architectures {unknown} is not a MiniMax-01 model; lightlong reads "
            f"{sorted(_RELEASED_ARCHITECTURES)}"
        )


def _shared_fields(d: dict[str, Any]) -> dict[str, Any]:
    """The fields both external dialects name alike (after their defaults are filled in)."""
    num_heads = d["num_attention_heads"]
    return {
        "vocab_size": d["vocab_size"],
        "hidden_size": d["hidden_size"],
        "num_layers": d["num_hidden_layers"],
        "num_heads": num_heads,
        "num_kv_heads": d["num_key_value_heads"],
        "head_dim": d.get("head_dim") or d["hidden_size"] // num_heads,
        "block_size": d["block_size"],
        "num_experts": d["num_local_experts"],
        "experts_per_token": d["num_experts_per_tok"],
        "intermediate_size": d["intermediate_size"],
        "router_aux_loss_coef": d["router_aux_loss_coef"],
        "rms_norm_eps": d["rms_norm_eps"],
        "tie_word_embeddings": d["tie_word_embeddings"],
        "max_position_embeddings": d["max_position_embeddings"],
        "initializer_range": d["initializer_range"],
    }


def _from_released(d: dict[str, Any], source: str) -> dict[str, Any]:
    """Released MiniMax-Text-01 / MiniMax-M1 fields onto HybridConfig's."""
    _check_common(d, source)
    if d.get("num_key_value_heads", 0) is None:  # the released class: None means MHA
        d = d | {"num_key_value_heads": d.get("num_attention_heads")}
    d = _RELEASED_DEFAULTS | {k: v for k, v in d.items() if v is not None}
    if "attn_type_list" not in d:
        raise ValueError(f"{source}: missing field 'attn_type_list' (0 lightning, 1 softmax)")
    codes = d["attn_type_list"]
    if len(codes) != d["num_hidden_layers"]:
        raise ValueError(
            f"{source}: attn_type_list has {len(codes)} entries, num_hidden_layers is "
            f"{d['num_hidden_layers']}"
        )
    bad = [(i, c) for i, c in enumerate(codes) if c not in (0, 1)]
    if bad:
        i, code = bad[0]
        raise ValueError(
            f"{source}: attn_type_list[{i}] = {code!r}: codes are 0 (lightning) and 1 "
            "(softmax); lightlong's other mixers are named in lightlong_layer_types"
        )
    if "lightlong_layer_types" in d:
        layer_types = list(d["lightlong_layer_types"])
    else:
        layer_types = ["softmax" if c else "lightning" for c in codes]
    shared = d["shared_intermediate_size"]
    if isinstance(shared, list):  # one entry for every layer (MiniMax-VL-01 writes [0])
        if len(set(shared)) > 1:
            raise ValueError(f"{source}: shared_intermediate_size differs by layer: {shared}")
        shared = shared[0] if shared else 0
    mode = d.get("shared_moe_mode", "sigmoid")
    if shared and mode != "sigmoid":
        raise ValueError(f"{source}: shared_moe_mode {mode!r}: the released code mixes by sigmoid")
    m1 = d.get("model_type") in ("minimax_m1", "MiniMaxM1")
    out = _shared_fields(d) | {
        "layer_types": layer_types,
        "rotary_dim": int(d.get("rotary_dim", -1)),
        "rope_theta": float(d["rope_theta"]),
        "postnorm": d["postnorm"],
        "shared_intermediate_size": shared,
        "model_type": "minimax_m1" if m1 else "minimax_text_01",
        **{k: d[k] for k in (*_LINEAGE_FIELDS, "decay_slope_heads") if k in d},
    }
    if out["rotary_dim"] < 0:  # getattr(config, "rotary_dim", head_dim)
        out["rotary_dim"] = out["head_dim"]
    for kind in ("linear", "full"):
        for part in ("alpha", "beta"):
            value = d.get(f"layernorm_{kind}_attention_{part}", 1.0)
            out[f"{kind}_attn_{part}"] = float(value)
    for part in ("alpha", "beta"):
        out[f"mlp_{part}"] = float(d.get(f"layernorm_mlp_{part}", 1.0))
    return out


# Defaults of transformers' MiniMaxConfig (rope_theta: top level, else in rope_parameters)
_TRANSFORMERS_DEFAULTS = {k: v for k, v in _RELEASED_DEFAULTS.items() if k != "rope_theta"}


def _from_transformers(d: dict[str, Any], source: str) -> dict[str, Any]:
    """`transformers`' `minimax` fields onto HybridConfig's, as `transformers` runs them:
    post-norm, RoPE over the whole head (it ignores partial_rotary_factor)."""
    _check_common(d, source)
    d = _TRANSFORMERS_DEFAULTS | {k: v for k, v in d.items() if v is not None}
    rope = d.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"{source}: rope_type {rope['rope_type']!r} is not supported")
    names = d.get("layer_types") or [
        "full_attention" if i % 2 == 0 else "linear_attention"
        for i in range(d["num_hidden_layers"])
    ]
    if len(names) != d["num_hidden_layers"]:
        raise ValueError(
            f"{source}: layer_types has {len(names)} entries, num_hidden_layers is "
            f"{d['num_hidden_layers']}"
        )
    unknown = sorted({t for t in names if t not in _HF_LAYER_TYPES})
    if unknown:
        raise ValueError(f"{source}: unknown layer_types {unknown}; valid: {list(_HF_LAYER_TYPES)}")
    out = _shared_fields(d) | {"layer_types": [_HF_LAYER_TYPES[t] for t in names]}
    out["rotary_dim"] = out["head_dim"]
    out["rope_theta"] = float(d.get("rope_theta", rope.get("rope_theta", 1e6)))
    out["postnorm"] = True
    for ours in ("linear_attn", "full_attn", "mlp"):
        for part in ("alpha", "beta"):
            out[f"{ours}_{part}"] = float(d.get(f"{ours}_{part}_factor", 1.0))
    return out


_LINEAGE_FIELDS = ("window_size", "diag_block_size", "cosformer_max_len", "norm_linear_decay")


def _every(n: int, num_layers: int) -> list[str]:
    """Softmax every n-th layer (layers n-1, 2n-1, ...), lightning elsewhere."""
    return ["softmax" if (i + 1) % n == 0 else "lightning" for i in range(num_layers)]


def _with_variants(name: str, base: HybridConfig) -> dict[str, HybridConfig]:
    """A preset and its all-lightning and all-softmax twins of the same size."""
    L = base.num_layers
    return {
        name: base,
        f"{name}-linear": dataclasses.replace(base, layer_types=["lightning"] * L),
        f"{name}-softmax": dataclasses.replace(base, layer_types=["softmax"] * L),
    }


_MINIMAX_RESIDUAL = (2 * 80) ** 0.25  # DeepNorm-style alpha of the released model

# MiniMax-Text-01 as released; MiniMax-M1 (its 40K and 80K thinking budgets) is the same
# architecture, trained further.
_TEXT01 = HybridConfig(
    vocab_size=200064, hidden_size=6144, num_layers=80, num_heads=64, num_kv_heads=8,
    head_dim=128, layer_types=_every(8, 80), rotary_dim=64, rope_theta=1e7,
    block_size=256, num_experts=32, experts_per_token=2, intermediate_size=9216,
    router_aux_loss_coef=0.001, rms_norm_eps=1e-5, postnorm=True,
    linear_attn_alpha=_MINIMAX_RESIDUAL, full_attn_alpha=_MINIMAX_RESIDUAL,
    mlp_alpha=_MINIMAX_RESIDUAL, max_position_embeddings=10240000,
)  # fmt: skip

PRESETS: dict[str, HybridConfig] = {
    **_with_variants("minimax-text-01", _TEXT01),
    "minimax-m1-40k": dataclasses.replace(_TEXT01, model_type="minimax_m1"),
    "minimax-m1-80k": dataclasses.replace(_TEXT01, model_type="minimax_m1"),
    # tiny is pre-norm: post-norm with alpha = 1 did not start learning within the demo's
    # budget (minutes on a CPU) at any learning rate tried; pre-norm did.
    **_with_variants(
        "tiny",
        HybridConfig(
            vocab_size=512, hidden_size=64, num_layers=4, num_heads=4, num_kv_heads=2,
            head_dim=16, layer_types=_every(4, 4), rotary_dim=8, num_experts=4,
            experts_per_token=2, intermediate_size=128, postnorm=False,
        ),
    ),
    # demo: the smallest hybrid that holds multi-query associative recall's two steps (a
    # lightning layer carries each key onto the next token, the softmax layer matches the
    # query against it), at a width that learns it in minutes on a CPU. Its 4 heads take the
    # decay rates of a 64-head model's first 4 (per-token 0.40 … 0.49 in layer 0): with
    # MiniMax's 4-head rates (0.78 … 0.996) no head forgets fast enough, and the slow heads
    # dominate the RMSNorm over heads; recall stayed at 0.19 (docs/hybrid-recall.md).
    **_with_variants(
        "demo",
        HybridConfig(
            vocab_size=128, hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
            head_dim=32, layer_types=["lightning", "softmax"], rotary_dim=8,
            decay_slope_heads=64, num_experts=4, experts_per_token=2, intermediate_size=128,
            postnorm=False,
        ),
    ),
    **_with_variants(
        "small",
        HybridConfig(
            vocab_size=8192, hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=2,
            head_dim=64, layer_types=_every(8, 8), rotary_dim=32, num_experts=8,
            experts_per_token=2, intermediate_size=384,
        ),
    ),
}  # fmt: skip
