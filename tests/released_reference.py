"""MiniMax-Text-01 / MiniMax-M1's forward written out from the released modeling code's
description, in float64 and without lightlong's modules or `transformers`: the reference the
model's logits are held to (tests/test_released_reference.py, tests/test_hf_parity.py)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from lightlong import HybridLM
from lightlong.ops import lightning_attn_naive


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
        if c.shared_intermediate_size:  # the released shared expert, mixed by a sigmoid gate
            s_ = f"{p}shared_mlp."
            mlp = (F.silu(h @ W[s_ + "gate_proj.weight"].T) * (h @ W[s_ + "up_proj.weight"].T)) @ W[
                s_ + "down_proj.weight"
            ].T
            # the released code computes the gate in float32 whatever the model's dtype
            gate_w = W[p + "coefficient.weight"].float()
            coef = torch.sigmoid(h.float() @ gate_w.T).double()
            y = y * (1 - coef) + mlp * coef
        x = (h if c.postnorm else x) * c.mlp_alpha + y * c.mlp_beta
    return rms(x, W["model.norm.weight"], c.rms_norm_eps) @ W["lm_head.weight"].T
