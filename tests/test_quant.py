"""int8 weight-only quantization (`lightlong.nn.quant`): Int8Linear against the dequantized
float reference on awkward shapes, which modules `quantize_int8` replaces, a quantized
model's logits against the float model, cached decode against a no-cache argmax loop,
state dicts, errors, and `--quantize int8` on the command line.

# N rows, I in features, O out features, B batch, T tokens, V vocab
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from conftest import assert_close, make, rel_err
from torch import nn

from lightlong import HybridConfig, HybridLM
from lightlong.infer import Engine, HybridCache, SamplingParams
from lightlong.model.source import load_model
from lightlong.nn import Int8Linear, quantize_int8
from lightlong.nn.quant import KERNEL_MAX_ROWS, quantize_weight
from lightlong.serve.config import ServerConfig

# x @ (q·s)ᵀ in x's dtype: fp32 rounding; bf16 output rounding (2^-8)
TOL = {torch.float32: 1e-6, torch.bfloat16: 4e-3}
DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
# (O, I): in/out not multiples of 8 (and one of 16 in, for the bf16 kernel)
SHAPES = [(37, 53), (5, 7), (33, 48), (101, 80), (1, 16)]
ROWS = [1, 3, 19]  # one token, a few (kernel under auto), many (dense under auto)
QUANT_ERR = 1e-2  # int8 vs the float Linear, Gaussian weights: measured 7.6e-3 at most
LOGITS_ERR = 0.05  # quantized tiny vs float, random weights, D = 64: measured 2.5e-2 (dense),
# 3.7e-2 (kernel, 8 tokens)


def linear(O: int, I: int, *, bias: bool = False, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    lin = nn.Linear(I, O, bias=bias)
    with torch.no_grad():
        lin.weight.normal_(0.0, 0.02)
    return lin


def xs(N: int, I: int, dtype: torch.dtype, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, N, I, generator=g).to(dtype)  # [2, N, I]: leading dims kept


def dequantized(m: Int8Linear) -> torch.Tensor:
    """q · s [O, I] in float64, exactly."""
    return m.weight.double() * m.scales.double()[:, None]


# -- Int8Linear --------------------------------------------------------------------------------


def test_quantize_weight_is_symmetric_per_row_and_bounded():
    w = torch.randn(37, 53) * torch.logspace(-3, 1, 37)[:, None]  # rows of very different size
    w[5] = 0.0
    q, s = quantize_weight(w)
    assert q.dtype == torch.int8 and s.dtype == torch.bfloat16  # fp32 weights: bf16 scales
    assert int(q.abs().max()) <= 127 and int(q[5].abs().max()) == 0
    assert (q.abs().amax(dim=1)[torch.arange(37) != 5] == 127).all()  # each row spans ±127
    err = (w.double() - q.double() * s.double()[:, None]).abs()
    assert (err <= s.double()[:, None] / 2 + 1e-12).all(), "|w − q·s| must stay within s/2"


@DTYPES
@pytest.mark.parametrize("N", ROWS)
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{o}x{i}" for o, i in SHAPES])
def test_torch_backend_equals_the_dequantized_reference(shape, N, dtype):
    O, I = shape
    m = Int8Linear.from_linear(linear(O, I), backend="torch")
    x = xs(N, I, dtype)
    y = m(x)
    assert y.shape == (2, N, O) and y.dtype == dtype
    assert_close(y, x.double() @ dequantized(m).T, TOL[dtype], f"torch backend {dtype}")


@DTYPES
@pytest.mark.parametrize("N", ROWS)
@pytest.mark.parametrize("shape", [s for s in SHAPES if s[1] % 16 == 0],
                         ids=[f"{o}x{i}" for o, i in SHAPES if i % 16 == 0])  # fmt: skip
def test_int8pack_kernel_equals_the_dequantized_reference(shape, N, dtype):
    """The CPU kernel takes bf16 activations (fp32 x is rounded to bf16) and rounds its
    output to bf16: the reference is x rounded to bf16 times q · s, in float64."""
    O, I = shape
    m = Int8Linear.from_linear(linear(O, I), backend="int8pack")
    x = xs(N, I, dtype)
    y = m(x)
    assert y.shape == (2, N, O) and y.dtype == dtype
    ref = x.to(torch.bfloat16).double() @ dequantized(m).T
    assert_close(y, ref, TOL[torch.bfloat16], f"int8pack {dtype}")


@DTYPES
@pytest.mark.parametrize("backend", ["auto", "torch", "int8pack"])
def test_int8_is_close_to_the_float_linear(backend, dtype):
    lin = linear(384, 512, bias=True)
    m = Int8Linear.from_linear(lin, backend=backend)
    for N in (1, 40):
        x = xs(N, 512, dtype)
        ref = x.double() @ lin.weight.double().T + lin.bias.double()
        assert_close(m(x), ref, QUANT_ERR, f"{backend} {dtype} N={N} vs float")


@DTYPES
def test_auto_runs_the_kernel_for_few_rows_and_the_dense_path_for_many(dtype):
    lin = linear(33, 48)
    auto, kernel, dense = (Int8Linear.from_linear(lin, backend=b)
                           for b in ("auto", "int8pack", "torch"))  # fmt: skip
    few, many = xs(KERNEL_MAX_ROWS // 2, 48, dtype), xs(KERNEL_MAX_ROWS, 48, dtype)
    assert torch.equal(auto(few[:1]), kernel(few[:1]))  # [1, 4, I]: 4 rows
    assert torch.equal(auto(many), dense(many))  # [2, 8, I]: 16 rows
    odd = Int8Linear.from_linear(linear(33, 53), backend="auto")  # I % 16 != 0: no kernel
    x = xs(1, 53, dtype)
    assert torch.equal(odd(x), Int8Linear.from_linear(linear(33, 53), backend="torch")(x))


def test_int8pack_refuses_what_it_cannot_run():
    m = Int8Linear.from_linear(linear(33, 53), backend="int8pack")
    with pytest.raises(ValueError, match=r"in_features % 16 == 0, not 53"):
        m(torch.randn(1, 53))
    with pytest.raises(ValueError, match="float64"):
        Int8Linear.from_linear(linear(33, 48), backend="int8pack")(torch.randn(1, 48).double())
    with pytest.raises(ValueError, match="backend must be one of"):
        Int8Linear.from_linear(linear(3, 16), backend="int4")
    with pytest.raises(ValueError, match=r"x must be \[\.\.\., 16\]"):
        Int8Linear.from_linear(linear(3, 16))(torch.randn(2, 17))


def test_bias_scales_dtype_and_repr():
    lin = linear(37, 48, bias=True).to(torch.bfloat16)
    m = Int8Linear.from_linear(lin)
    assert m.dtype == torch.bfloat16 and m.scales.dtype == torch.bfloat16
    x = xs(1, 48, torch.bfloat16)
    ref = x.double() @ dequantized(m).T + lin.bias.double()
    assert_close(m(x), ref, TOL[torch.bfloat16], "bias")
    assert "in_features=48, out_features=37, bias=True, scales=bfloat16" in repr(m)
    assert not list(m.parameters()) and m.weight.dtype == torch.int8


# -- quantize_int8 on models ------------------------------------------------------------------

FLOAT_KEPT = ("embed_tokens", "norm", "layernorm", "block_sparse_moe.gate", "coefficient")


def expected_quantized(model: HybridLM) -> set[str]:
    """The names quantize_int8 must replace: every Linear of a mixer or an expert, and the
    LM head unless it is tied to the embedding."""
    owners = (".self_attn.", ".experts.", ".shared_mlp.")
    head = set() if model.config.tie_word_embeddings else {"lm_head"}
    return head | {n for n, m in model.named_modules()
                   if isinstance(m, nn.Linear) and any(o in n for o in owners)}  # fmt: skip


NARROW = {"hidden_size": 64, "intermediate_size": 32, "vocab_size": 512}
"""small's layers, experts and projections, at tiny widths (the same modules, built fast)."""


@pytest.mark.parametrize(
    "preset, overrides",
    [("tiny", {}), ("small", NARROW),
     ("tiny", {"shared_intermediate_size": 128}),
     ("tiny", {"layer_types": ["cosformer", "norm_linear", "window_softmax", "softmax"]})],
    ids=["tiny", "small", "tiny-shared-expert", "tiny-lineage"],
)  # fmt: skip
def test_quantize_replaces_mixer_projections_and_experts_only(preset, overrides):
    cfg = dataclasses.replace(HybridConfig.from_preset(preset), **overrides).validate()
    model = HybridLM(cfg).eval()
    want = expected_quantized(model)
    quantize_int8(model)
    got = {n for n, m in model.named_modules() if isinstance(m, Int8Linear)}
    assert got == want
    per_layer = {n.split(".", 3)[3] for n in got - {"lm_head"}}
    experts = {f"block_sparse_moe.experts.{e}.{w}" for e in (0, 1) for w in ("w1", "w2", "w3")}
    assert {"self_attn.out_proj", *experts} <= per_layer
    if cfg.shared_intermediate_size:
        assert {"shared_mlp.gate_proj", "shared_mlp.up_proj", "shared_mlp.down_proj"} <= per_layer
    for name, p in model.named_parameters():  # what is left is float and kept by name
        assert p.is_floating_point() and any(k in name for k in FLOAT_KEPT), name
    assert type(model.lm_head) is Int8Linear and type(model.model.embed_tokens) is nn.Embedding
    assert all(type(layer.block_sparse_moe.gate) is nn.Linear for layer in model.model.layers)


def test_a_head_tied_to_the_embedding_stays_float():
    cfg = dataclasses.replace(HybridConfig.from_preset("tiny"), tie_word_embeddings=True)
    model = HybridLM(cfg.validate()).eval()
    quantize_int8(model)
    assert type(model.lm_head) is nn.Linear
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_a_head_sharing_the_embedding_storage_stays_float():
    """load_state_dict(assign=True) leaves a tied head and the embedding two Parameters
    over one storage: still tied, still float."""
    cfg = dataclasses.replace(HybridConfig.from_preset("tiny"), tie_word_embeddings=True)
    model = HybridLM(cfg.validate()).eval()
    shared = nn.Parameter(model.model.embed_tokens.weight.detach().clone())
    model.model.embed_tokens.weight = shared
    model.lm_head.weight = nn.Parameter(shared.data)  # another Parameter, the same storage
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    quantize_int8(model)
    assert type(model.lm_head) is nn.Linear


def test_an_int8_head_with_fp32_lm_head_gives_the_dense_logits():
    torch.manual_seed(0)
    model = HybridLM(HybridConfig.from_preset("tiny")).eval()
    quantize_int8(model, skip=["*.self_attn.*", "*.experts.*"])
    model.fp32_lm_head = True
    ids = torch.randint(0, 512, (1, 5))  # <= 8 rows: the kernel's path without the flag
    with torch.no_grad():
        plain = model(ids).logits
        dense = model(ids, labels=ids).logits
    assert plain.dtype == torch.float32
    assert torch.equal(plain, dense)


def test_an_int8_head_gives_logits_and_a_loss_from_its_dequantized_weight():
    """The head's logits come from Int8Linear; with labels the loss uses q·s (the same
    matrix); the cache stays in the embedding's float dtype."""
    torch.manual_seed(0)
    model = HybridLM(HybridConfig.from_preset("tiny")).eval()
    ids = torch.randint(0, 512, (2, 21))
    ref = model(ids).logits
    quantize_int8(model, skip=["*.self_attn.*", "*.experts.*"])  # the head alone
    assert type(model.lm_head) is Int8Linear
    with torch.no_grad():
        out = model(ids, labels=ids)
        logits = model(ids).logits
    assert_close(logits, out.logits, 1e-5, "logits without and with labels")
    assert_close(logits, ref, 1e-2, "int8 head vs fp32 head")
    assert torch.isfinite(out.loss) and out.loss.item() > 0
    assert HybridCache.for_model(model, 1).dtype == torch.float32


def test_skip_patterns_leave_modules_in_float():
    model = HybridLM(HybridConfig.from_preset("tiny")).eval()
    quantize_int8(model, skip=["*.experts.*", "lm_head"])
    got = {n for n, m in model.named_modules() if isinstance(m, Int8Linear)}
    assert got and all(".self_attn." in n for n in got)


def test_quantize_refuses_training_meta_repeats_and_foreign_models():
    model = HybridLM(HybridConfig.from_preset("tiny"))
    with pytest.raises(ValueError, match=r"training mode.*model\.eval"):
        quantize_int8(model)
    with torch.device("meta"):
        meta = HybridLM(HybridConfig.from_preset("tiny")).eval()
    with pytest.raises(ValueError, match="meta device"):
        quantize_int8(meta)
    quantize_int8(model.eval())
    with pytest.raises(ValueError, match="already int8-quantized"):
        quantize_int8(model)
    with pytest.raises(ValueError, match="inference-only"):
        model.train()
    with pytest.raises(ValueError, match="no token-mixer projection or expert"):
        quantize_int8(nn.Sequential(nn.Linear(4, 4)).eval())
    with pytest.raises(ValueError, match="meta device"):
        Int8Linear.from_linear(nn.Linear(4, 4, device="meta"))


def test_quantized_logits_are_close_to_float():
    model = make(HybridConfig.from_preset("tiny"))
    ids_BT = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model(ids_BT).logits
        q = quantize_int8(copy.deepcopy(model))
        err = assert_close(q(ids_BT).logits, ref, LOGITS_ERR, "quantized logits (dense path)")
        last = q(ids_BT[:1, :KERNEL_MAX_ROWS]).logits  # 8 rows: the kernel
        assert_close(last, ref[:1, :KERNEL_MAX_ROWS], LOGITS_ERR, "quantized logits (kernel)")
    assert err > 1e-4  # the weights did change


# -- inference on a quantized model --------------------------------------------------------


@torch.no_grad()
def argmax_loop(model: HybridLM, prompt: list[int], n: int) -> list[int]:
    """Greedy tokens from full forwards without a cache (the reference for decode)."""
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt) :]


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_cached_greedy_decode_equals_no_cache_argmax(backend):
    """With "auto" the prompt and output fit KERNEL_MAX_ROWS, so both sides run the kernel."""
    model = quantize_int8(make(HybridConfig.from_preset("tiny")), backend=backend)
    prompt, n = ([3, 14, 15, 92, 65, 35], 10) if backend == "torch" else ([3, 14, 15], 5)
    engine = Engine(model, prefill_chunk=2)  # a chunked prefill too
    got = engine.generate(prompt, SamplingParams(max_new_tokens=n, ignore_eos=True))[0]
    assert got.token_ids == argmax_loop(model, prompt, n)


def test_decode_step_logits_match_the_full_forward():
    model = quantize_int8(make(HybridConfig.from_preset("tiny")), backend="torch")
    ids_BT = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = model(ids_BT).logits
        cache = HybridCache.for_model(model, batch_size=2)
        assert_close(model(ids_BT[:, :5], cache=cache).logits, ref[:, :5], 1e-5, "prefill")
        for t in range(5, 12):
            step = model(ids_BT[:, t : t + 1], cache=cache).logits[:, 0]
            assert_close(step, ref[:, t], 1e-5, f"decode position {t}")


def test_batched_generation_rows_match_single_prompts():
    engine = Engine(quantize_int8(make(HybridConfig.from_preset("tiny"))))
    prompts = [[1, 2, 3, 4, 5], [9], [7, 7, 8]]
    params = SamplingParams(max_new_tokens=4, ignore_eos=True)
    batched = engine.generate(prompts, params)
    for p, row in zip(prompts, batched, strict=True):
        assert row.token_ids == engine.generate(p, params)[0].token_ids


# -- state dicts, checkpoints, loading ----------------------------------------------------------


@DTYPES
def test_state_dict_holds_dequantized_weights_and_round_trips(tmp_path, dtype):
    """save_pretrained writes an ordinary float checkpoint; quantizing it again gives the
    same int8 weights and scales, and the same logits."""
    model = quantize_int8(make(HybridConfig.from_preset("tiny")).to(dtype))
    sd = model.state_dict()
    qkv = model.model.layers[0].self_attn.qkv_proj
    key = "model.layers.0.self_attn.qkv_proj.weight"
    assert sd[key].dtype == dtype and not any(k.endswith("scales") for k in sd)
    assert torch.equal(sd[key].double(), dequantized(qkv).to(dtype).double())
    model.save_pretrained(tmp_path / "ck")
    loaded = HybridLM.from_pretrained(tmp_path / "ck").eval()
    assert type(loaded.model.layers[0].self_attn.qkv_proj) is nn.Linear
    again = quantize_int8(loaded)
    for (name, a), b in zip(model.named_modules(), again.modules(), strict=True):
        if isinstance(a, Int8Linear):
            assert torch.equal(a.weight, b.weight), name
            assert torch.equal(a.scales, b.scales), name
    ids = torch.randint(0, 512, (1, 20), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, again(ids).logits)
    fresh = quantize_int8(make(HybridConfig.from_preset("tiny"), seed=1).to(dtype))
    fresh.load_state_dict(sd)  # float weights into Int8Linear: quantized on the way in
    assert torch.equal(fresh.model.layers[0].self_attn.qkv_proj.weight, qkv.weight)


def test_load_model_quantizes_for_inference():
    model = load_model("tiny", quantize="int8")
    assert not model.training
    assert any(isinstance(m, Int8Linear) for m in model.modules())
    with pytest.raises(ValueError, match=r"quantize must be one of \['none', 'int8'\]"):
        load_model("tiny", quantize="int4")
    with pytest.raises(ValueError, match="quantize must be none or int8"):
        ServerConfig(quantize="int4").validate()


def test_generate_quantize_int8_on_a_checkpoint(tmp_path, monkeypatch, capsys):
    from lightlong.cli import main
    from lightlong.runtime import keep_freed_memory

    make(HybridConfig.from_preset("tiny")).save_pretrained(tmp_path / "ck")
    monkeypatch.setenv("COLUMNS", "100")
    args = ["generate", "--model", str(tmp_path / "ck"), "--prompt", "hello",
            "--max-new-tokens", "5", "--ignore-eos"]  # fmt: skip
    try:
        main([*args, "--quantize", "int8"])
        out, err = capsys.readouterr()
        assert "5 new at" in err and out.endswith("\n")
        with pytest.raises(SystemExit) as e:
            main([*args, "--quantize", "int4"])
        assert e.value.code == 2 and "invalid choice: 'int4'" in capsys.readouterr().err
    finally:
        keep_freed_memory(False)


def test_eval_perplexity_quantize_int8_is_close_to_float(tmp_path):
    from lightlong.eval.runner import EvalConfig, run_eval

    make(HybridConfig.from_preset("tiny")).save_pretrained(tmp_path / "ck")
    ppl = {}
    for q in ("none", "int8"):
        cfg = EvalConfig(model=str(tmp_path / "ck"), lengths=[64], samples=1, quantize=q,
                         out_dir=str(tmp_path / q))  # fmt: skip
        ppl[q] = run_eval("perplexity", cfg, quiet=True)["perplexity"]
    assert ppl["int8"] != ppl["none"]
    assert abs(ppl["int8"] / ppl["none"] - 1) < 0.02, ppl


def test_rel_err_helper_sees_quantization():  # the comparisons above can fail
    lin = linear(37, 48)
    m = Int8Linear.from_linear(lin, backend="torch")
    x = xs(3, 48, torch.float32)
    assert rel_err(m(x), x @ lin.weight.T) > TOL[torch.float32]
