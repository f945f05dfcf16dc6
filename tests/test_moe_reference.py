"""MoE blocks and a whole `HybridLM` against references written out here from the weights.

The references read only the raw weight tensors (the state dict, by checkpoint name) and
compute in float64 with plain torch: router softmax -> top k -> weights renormalised over
the k -> each chosen expert's SwiGLU w2 · (silu(w1 · x) ⊙ (w3 · x)). Nothing comes from
`lightlong.nn` or `lightlong.ops`, so a mistake that a module shares with the code it would
otherwise be compared against (w1 and w3 swapped in `Expert.forward`, say) cannot cancel out.
The whole-model reference writes the mixers out from ARCHITECTURE.md's definitions too.

# B batch, T tokens, D model dim, E experts, k experts per token, F expert hidden dim,
# H heads, G key/value heads, P per-head dim, R rotary dims
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from conftest import assert_close

from lightlong import HybridConfig, HybridLM
from lightlong.infer import HybridCache
from lightlong.nn import MoE

TOL = 1e-12  # float64 module vs float64 reference (observed ~5e-16)


def silu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return weight * x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps)


def moe_reference(x_ND: torch.Tensor, w: dict, prefix: str, E: int, k: int):
    """The routed SwiGLU mixture of x [N, D] from the weights under `prefix`; also the
    Switch load-balancing loss E · Σ_e (assignments to e / N) · (mean router prob of e).

    Returns y [N, D] and the loss (float64).
    """
    logits_NE = x_ND @ w[prefix + "gate.weight"].T
    probs_NE = torch.softmax(logits_NE, dim=-1)
    top_w_Nk, top_e_Nk = probs_NE.topk(k, dim=-1)
    top_w_Nk = top_w_Nk / top_w_Nk.sum(-1, keepdim=True)
    y_ND = torch.zeros_like(x_ND)
    for n in range(x_ND.shape[0]):
        for j in range(k):
            e = int(top_e_Nk[n, j])
            w1_FD = w[f"{prefix}experts.{e}.w1.weight"]
            w2_DF = w[f"{prefix}experts.{e}.w2.weight"]
            w3_FD = w[f"{prefix}experts.{e}.w3.weight"]
            hidden_F = silu(w1_FD @ x_ND[n]) * (w3_FD @ x_ND[n])
            y_ND[n] += top_w_Nk[n, j] * (w2_DF @ hidden_F)
    N = x_ND.shape[0]
    share_E = torch.bincount(top_e_Nk.flatten(), minlength=E).double() / N
    aux = E * (share_E * probs_NE.mean(0)).sum()
    return y_ND, aux


def float64_weights(module: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Redraws every parameter (weights ~ N(0, 1/fan_in), norm scales ~ 1 ± 0.3) so that each
    term matters at float64 precision; returns detached copies by checkpoint name."""
    g = torch.Generator().manual_seed(seed)
    module.double()
    with torch.no_grad():
        for name, p in module.named_parameters():
            r = torch.randn(p.shape, generator=g, dtype=torch.float64)
            if p.dim() == 1:  # RMSNorm scales
                p.copy_(1 + 0.3 * r)
            elif "embed_tokens" in name:
                p.copy_(r)
            else:
                p.copy_(r / math.sqrt(p.shape[1]))
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


# --------------------------------------------------------------------------------- block

MOE_CASES = [
    pytest.param(2, 37, 6, 1, id="B2-T37-E6-top1"),
    pytest.param(2, 37, 6, 2, id="B2-T37-E6-top2"),
    pytest.param(1, 23, 5, 3, id="B1-T23-E5-top3"),
    pytest.param(1, 1, 6, 2, id="B1-T1-E6-top2"),
]


@pytest.mark.parametrize("with_aux", [True, False], ids=["aux", "no-aux"])
@pytest.mark.parametrize(("B", "T", "E", "k"), MOE_CASES)
def test_moe_block_matches_reference(B, T, E, k, with_aux):
    # T = 1 without the aux loss is the decode path (a token's k experts called one by one)
    D, F = 24, 40
    moe = MoE(D, F, E, k)
    w = float64_weights(moe, seed=10 * E + k)
    x = torch.randn(B, T, D, generator=torch.Generator().manual_seed(T), dtype=torch.float64)
    if B * T > 1:  # the tokens spread over every expert
        chosen = (x.reshape(-1, D) @ w["gate.weight"].T).topk(k).indices
        assert torch.bincount(chosen.flatten(), minlength=E).min() > 0
    y, aux = moe(x, with_aux=with_aux)
    y_ref, aux_ref = moe_reference(x.reshape(-1, D), w, "", E, k)
    assert y.shape == x.shape and y.dtype == torch.float64
    assert_close(y.reshape(-1, D), y_ref, TOL, "MoE output")
    if with_aux:
        assert_close(aux, aux_ref, TOL, "load-balancing loss")
    else:
        assert aux is None


# ------------------------------------------------------------------------- whole model


def alibi_decay(H: int, layer: int, L: int) -> torch.Tensor:
    """ARCHITECTURE.md's rates for H a power of two, 2^(-8(h+1)/H) · (1 − l/(L−1) + 1e-5),
    rounded to float32 as the API keeps them (the rounding alone moves logits by ~1e-9)."""
    assert H & (H - 1) == 0
    depth = 1 - layer / (L - 1) + 1e-5
    rates = [2 ** (-8 * (h + 1) / H) * depth for h in range(H)]
    return torch.tensor(rates, dtype=torch.float32).double()


def lightning_reference(x_TD, w, p, c: HybridConfig, layer: int):
    """SiLU(qkv) -> o_t = Σ_{j<=t} λ^(t−j) (q_t · k_j) v_j per head (scale 1) -> RMSNorm over
    all heads (eps 1e-6) -> sigmoid(output_gate · x) ⊙ -> out_proj."""
    T, H, P = x_TD.shape[0], c.num_heads, c.head_dim
    qkv_TH3P = silu(x_TD @ w[p + "qkv_proj.weight"].T).view(T, H, 3 * P)
    q_THP, k_THP, v_THP = qkv_TH3P.split(P, dim=-1)
    s_H = alibi_decay(H, layer, c.num_layers)
    pos = torch.arange(T, dtype=torch.float64)
    gap_TT = pos[:, None] - pos[None, :]
    mask_HTT = torch.exp(-s_H[:, None, None] * gap_TT.clamp(min=0)) * (gap_TT >= 0)
    scores_HTT = torch.einsum("thp,jhp->htj", q_THP, k_THP) * mask_HTT
    o_TX = torch.einsum("htj,jhp->thp", scores_HTT, v_THP).reshape(T, H * P)
    o_TX = rms_norm(o_TX, w[p + "norm.weight"], 1e-6)
    o_TX = torch.sigmoid(x_TD @ w[p + "output_gate.weight"].T) * o_TX
    return o_TX @ w[p + "out_proj.weight"].T


def rotate(x_THP: torch.Tensor, R: int, theta: float) -> torch.Tensor:
    """RoPE on the first R dims in the GPT-NeoX layout (dim i pairs with i + R/2), positions
    0 … T−1; the other dims pass through."""
    T, half = x_THP.shape[0], R // 2
    inv_freq = theta ** (-torch.arange(half, dtype=torch.float64) * 2 / R)
    angle_T1R = (torch.arange(T, dtype=torch.float64)[:, None] * inv_freq)[:, None, :]
    x1, x2, rest = x_THP[..., :half], x_THP[..., half:R], x_THP[..., R:]
    cos, sin = angle_T1R.cos(), angle_T1R.sin()
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], dim=-1)


def softmax_reference(x_TD, w, p, c: HybridConfig):
    """Causal softmax attention, GQA (head h reads key/value head h // (H/G)), RoPE on
    q and k, scale 1/√P, then o_proj."""
    T, H, G, P = x_TD.shape[0], c.num_heads, c.num_kv_heads, c.head_dim
    q_THP = rotate((x_TD @ w[p + "q_proj.weight"].T).view(T, H, P), c.rotary_dim, c.rope_theta)
    k_TGP = rotate((x_TD @ w[p + "k_proj.weight"].T).view(T, G, P), c.rotary_dim, c.rope_theta)
    v_TGP = (x_TD @ w[p + "v_proj.weight"].T).view(T, G, P)
    out_THP = torch.empty(T, H, P, dtype=torch.float64)
    causal_TT = torch.ones(T, T, dtype=torch.bool).tril()
    for h in range(H):
        g = h // (H // G)
        scores_TT = (q_THP[:, h] @ k_TGP[:, g].T) / math.sqrt(P)
        out_THP[:, h] = (
            torch.softmax(scores_TT.masked_fill(~causal_TT, -math.inf), -1) @ v_TGP[:, g]
        )
    return out_THP.reshape(T, H * P) @ w[p + "o_proj.weight"].T


def model_reference(ids_T: torch.Tensor, w: dict, c: HybridConfig) -> torch.Tensor:
    """Logits [T, V] of one sequence: embed -> layers (x ← α·r + β·mixer(norm x), then
    x ← α'·r' + β'·moe(norm x), r the normed input under postnorm, else x) -> norm -> head."""
    x_TD = w["model.embed_tokens.weight"][ids_T]
    for i, kind in enumerate(c.layer_types):
        p = f"model.layers.{i}."
        h_TD = rms_norm(x_TD, w[p + "input_layernorm.weight"], c.rms_norm_eps)
        if kind == "lightning":
            mixed = lightning_reference(h_TD, w, p + "self_attn.", c, i)
            alpha, beta = c.linear_attn_alpha, c.linear_attn_beta
        else:
            assert kind == "softmax"
            mixed = softmax_reference(h_TD, w, p + "self_attn.", c)
            alpha, beta = c.full_attn_alpha, c.full_attn_beta
        x_TD = (h_TD if c.postnorm else x_TD) * alpha + mixed * beta
        h_TD = rms_norm(x_TD, w[p + "post_attention_layernorm.weight"], c.rms_norm_eps)
        y_TD, _ = moe_reference(
            h_TD, w, p + "block_sparse_moe.", c.num_experts, c.experts_per_token
        )
        x_TD = (h_TD if c.postnorm else x_TD) * c.mlp_alpha + y_TD * c.mlp_beta
    h_TD = rms_norm(x_TD, w["model.norm.weight"], c.rms_norm_eps)
    return h_TD @ w["lm_head.weight"].T


def small_config(postnorm: bool) -> HybridConfig:
    """Three layers (lightning, softmax, lightning), GQA, partial RoPE, 5 experts top-2,
    residual scales all different, lightning blocks of 8 (the sequences span several)."""
    cfg = HybridConfig.from_preset("tiny")
    for key, value in dict(
        vocab_size=97, hidden_size=32, num_layers=3, num_heads=4, num_kv_heads=2, head_dim=8,
        layer_types=["lightning", "softmax", "lightning"], rotary_dim=4, block_size=8,
        num_experts=5, experts_per_token=2, intermediate_size=24, postnorm=postnorm,
        linear_attn_alpha=1.3, linear_attn_beta=0.7, full_attn_alpha=1.1, full_attn_beta=0.9,
        mlp_alpha=1.2, mlp_beta=0.8,
    ).items():  # fmt: skip
        setattr(cfg, key, value)
    return cfg.validate()


def make_model(postnorm: bool, seed: int = 0) -> tuple[HybridLM, dict, HybridConfig]:
    cfg = small_config(postnorm)
    torch.manual_seed(seed)
    model = HybridLM(cfg).eval()
    w = float64_weights(model, seed)
    return model, w, cfg


def reference_keys(c: HybridConfig) -> set[str]:
    """Every weight the reference reads: the model must hold exactly these (none ignored)."""
    keys = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    for i, kind in enumerate(c.layer_types):
        p = f"model.layers.{i}."
        keys |= {p + "input_layernorm.weight", p + "post_attention_layernorm.weight"}
        mixer = ("qkv_proj", "output_gate", "out_proj", "norm")
        if kind == "softmax":
            mixer = ("q_proj", "k_proj", "v_proj", "o_proj")
        keys |= {f"{p}self_attn.{m}.weight" for m in mixer}
        keys.add(p + "block_sparse_moe.gate.weight")
        keys |= {
            f"{p}block_sparse_moe.experts.{e}.{m}.weight"
            for e in range(c.num_experts)
            for m in ("w1", "w2", "w3")
        }
    return keys


@pytest.mark.parametrize("postnorm", [False, True], ids=["prenorm", "postnorm"])
def test_hybrid_lm_matches_reference(postnorm):
    model, w, cfg = make_model(postnorm)
    assert set(w) == reference_keys(cfg)
    ids_BT = torch.randint(0, cfg.vocab_size, (2, 29), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(ids_BT).logits
    for b in range(2):
        assert_close(logits[b], model_reference(ids_BT[b], w, cfg), TOL, f"logits of row {b}")


def test_hybrid_lm_packed_documents_match_reference():
    # documents of 11, 1 and 19 tokens in one row: each is its own sequence in the reference
    model, w, cfg = make_model(postnorm=True, seed=3)
    lengths = (11, 1, 19)
    cu = torch.tensor([0, 11, 12, 31])
    ids_T = torch.randint(0, cfg.vocab_size, (sum(lengths),),
                          generator=torch.Generator().manual_seed(2))  # fmt: skip
    with torch.no_grad():
        logits = model(ids_T[None], cu_seqlens=cu).logits[0]
    ref = torch.cat([model_reference(ids_T[a:b], w, cfg) for a, b in itertools.pairwise(cu)])
    assert_close(logits, ref, TOL, "packed logits")


def test_hybrid_lm_decode_steps_match_reference():
    # a prefill of 17 tokens, then 3 tokens one at a time: the one-token MoE path
    model, w, cfg = make_model(postnorm=False, seed=5)
    ids_T = torch.randint(0, cfg.vocab_size, (20,), generator=torch.Generator().manual_seed(4))
    ref = model_reference(ids_T, w, cfg)
    cache = HybridCache(cfg, batch_size=1, dtype=torch.float64)
    with torch.no_grad():
        prefill = model(ids_T[None, :17], cache=cache, logits_to_keep=1).logits[0, -1]
        assert_close(prefill, ref[16], TOL, "prefill's last logits")
        for t in range(17, 20):
            step = model(ids_T[None, t : t + 1], cache=cache).logits[0, -1]
            assert_close(step, ref[t], TOL, f"decode step at position {t}")
