"""Parity with `transformers`' MiniMax (through the checkpoint files users exchange) and with
an independent reference of the released model for what `transformers` does differently."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close

from lightlong import HybridConfig, HybridLM
from lightlong.ops import lightning_attn_naive

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


def make(cfg: HybridConfig, seed: int = 0) -> HybridLM:
    torch.manual_seed(seed)
    model = HybridLM(cfg).eval()
    with torch.no_grad():  # non-trivial norms so that a swapped weight would show
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.uniform_(0.5, 1.5)
    return model


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


# --------------------------------------------- the released model, where transformers differs


def alibi(H: int) -> list[float]:
    """ALiBi slopes, derived independently: geometric with ratio 2^(-8/P) for P = 2^k ≥ H."""
    P = 2 ** math.floor(math.log2(H))
    first = [2 ** (-8 * (i + 1) / P) for i in range(P)]
    extra = [2 ** (-8 * (i + 1) / (2 * P)) for i in range(0, 2 * (H - P), 2)]
    return first + extra


def rms(x, w, eps):
    return w * (x.double() / torch.sqrt(x.double().pow(2).mean(-1, keepdim=True) + eps))


def reference_logits(model: HybridLM, ids: torch.Tensor) -> torch.Tensor:
    """MiniMax-Text-01's forward written out from its description, in float64: explicit
    masked softmax, RoPE on the first rotary_dim dims by angle pairs, dense MoE."""
    c = model.config
    W = {k: v.double() for k, v in model.state_dict().items()}
    B, T = ids.shape
    x = W["model.embed_tokens.weight"][ids]
    H, E, G, R = c.num_heads, c.head_dim, c.num_kv_heads, c.rotary_dim
    pos = torch.arange(T, dtype=torch.float64)
    for i, kind in enumerate(c.layer_types):
        p = f"model.layers.{i}."
        h = rms(x, W[p + "input_layernorm.weight"], c.rms_norm_eps)
        if kind == "lightning":
            qkv = F.silu(h @ W[p + "self_attn.qkv_proj.weight"].T).view(B, T, H, 3, E)
            q, k, v = qkv.unbind(3)
            depth = 1 - i / (c.num_layers - 1) + 1e-5
            # the model keeps its rates in float32 (the op's contract), so round them alike
            s = (torch.tensor(alibi(H), dtype=torch.float64) * depth).float().double()
            o, _ = lightning_attn_naive(q, k, v, s, scale=1.0)
            o = rms(o.reshape(B, T, H * E), W[p + "self_attn.norm.weight"], 1e-6)
            o = torch.sigmoid(h @ W[p + "self_attn.output_gate.weight"].T) * o
            a = o @ W[p + "self_attn.out_proj.weight"].T
            alpha, beta = c.linear_attn_alpha, c.linear_attn_beta
        else:
            q = (h @ W[p + "self_attn.q_proj.weight"].T).view(B, T, H, E)
            k = (h @ W[p + "self_attn.k_proj.weight"].T).view(B, T, G, E)
            v = (h @ W[p + "self_attn.v_proj.weight"].T).view(B, T, G, E)

            def rope(t):
                out = t.clone()
                for j in range(R // 2):  # dims j and j + R/2 rotate by pos · θ^(-2j/R)
                    ang = pos * c.rope_theta ** (-2 * j / R)
                    c_, s_ = torch.cos(ang)[None, :, None], torch.sin(ang)[None, :, None]
                    a_, b_ = t[..., j], t[..., j + R // 2]
                    out[..., j], out[..., j + R // 2] = a_ * c_ - b_ * s_, b_ * c_ + a_ * s_
                return out

            q, k = rope(q), rope(k)
            k, v = (t.repeat_interleave(H // G, dim=2) for t in (k, v))
            scores = torch.einsum("bthe,bshe->bhts", q, k) / math.sqrt(E)
            scores = scores.masked_fill(torch.ones(T, T).triu(1).bool(), float("-inf"))
            o = torch.einsum("bhts,bshe->bthe", scores.softmax(-1), v).reshape(B, T, H * E)
            a = o @ W[p + "self_attn.o_proj.weight"].T
            alpha, beta = c.full_attn_alpha, c.full_attn_beta
        x = (h if c.postnorm else x) * alpha + a * beta
        h = rms(x, W[p + "post_attention_layernorm.weight"], c.rms_norm_eps)
        probs = (h @ W[p + "block_sparse_moe.gate.weight"].T).softmax(-1)
        top_w, top_e = probs.topk(c.experts_per_token, dim=-1)
        gate = torch.zeros_like(probs).scatter(-1, top_e, top_w / top_w.sum(-1, keepdim=True))
        y = 0
        for e in range(c.num_experts):
            q_ = f"{p}block_sparse_moe.experts.{e}."
            ff = F.silu(h @ W[q_ + "w1.weight"].T) * (h @ W[q_ + "w3.weight"].T)
            y = y + gate[..., e : e + 1] * (ff @ W[q_ + "w2.weight"].T)
        x = (h if c.postnorm else x) * c.mlp_alpha + y * c.mlp_beta
    return rms(x, W["model.norm.weight"], c.rms_norm_eps) @ W["lm_head.weight"].T


@pytest.mark.parametrize(
    ("num_heads", "num_kv_heads", "rotary_dim", "postnorm"),
    [(4, 2, 4, True), (6, 2, 8, True), (3, 1, 2, False), (4, 4, 0, True)],
    ids=["partial-rope", "six-heads", "three-heads-prenorm", "no-rope"],
)
def test_released_model_reference(num_heads, num_kv_heads, rotary_dim, postnorm):
    cfg = config(
        HYBRID, num_heads=num_heads, num_kv_heads=num_kv_heads, rotary_dim=rotary_dim,
        postnorm=postnorm,
    )  # fmt: skip
    model = make(cfg).double()
    ids = torch.randint(0, 97, (2, 45), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert_close(model(ids).logits, reference_logits(model, ids), 1e-10, "logits vs reference")


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
