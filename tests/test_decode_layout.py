"""The decode weight layout (`lightlong.nn.decode`): DecodeLinear against `F.linear` on the
same weight (odd shapes, few and many rows, bias, leading dims, gradients), which path runs,
and a model after `decode_layout` against the untouched model (prefill and cached decode,
tied head, int8 after it, checkpoints, the Runner applying it).

# N rows, I in features, O out features, P parts
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close, make
from torch import nn

from lightlong import HybridConfig, HybridLM
from lightlong.infer import Engine, HybridCache, SamplingParams
from lightlong.nn import DecodeLinear, Int8Linear, decode_layout, quantize_int8
from lightlong.nn.decode import MAX_ROWS

TINY = HybridConfig.from_preset("tiny")


@pytest.fixture
def threads():
    """Sets torch's thread count for a test (the split runs one part per thread)."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


@pytest.fixture
def bmm_calls(monkeypatch):
    """Counts torch.bmm calls (the split path's one product)."""
    calls = []
    real = torch.bmm

    def spy(*args, **kwargs):
        calls.append(args[1].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "bmm", spy)
    return calls


def linear(O: int, I: int, *, bias: bool = False, dtype=torch.float32) -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(I, O, bias=bias).to(dtype)


@pytest.mark.parametrize("O,I", [(96, 53), (130, 64), (64, 7), (200, 33)])
@pytest.mark.parametrize("rows", [1, 3, MAX_ROWS, MAX_ROWS + 1, 100])
@pytest.mark.parametrize("bias", [False, True])
def test_decode_linear_equals_linear(O, I, rows, bias, threads):
    threads(2)
    lin = linear(O, I, bias=bias)
    ref_w = lin.weight.detach().clone()
    dec = DecodeLinear.from_linear(copy.deepcopy(lin))
    assert dec.weight.stride() == (1, O) and torch.equal(dec.weight, ref_w)
    x = torch.randn(2, rows, I)[:, :rows]  # leading dims; one row each for rows=1
    x = x[:1] if rows == 1 else x
    y = dec(x)
    assert y.shape == (*x.shape[:-1], O)
    assert_close(y, F.linear(x, ref_w, lin.bias), 1e-6, "DecodeLinear")


def test_split_runs_for_few_fp32_rows_only(threads, bmm_calls):
    threads(2)
    dec = DecodeLinear.from_linear(linear(130, 64))  # 130 = 2 × 65
    dec(torch.randn(1, 64))
    assert bmm_calls == [(2, 64, 65)]  # P = 2 blocks of 65 columns, one product
    dec(torch.randn(MAX_ROWS, 64))
    assert len(bmm_calls) == 2
    dec(torch.randn(MAX_ROWS + 1, 64))  # many rows: F.linear
    dec(torch.randn(0, 64))  # no rows
    dec.to(torch.bfloat16)(torch.randn(1, 64, dtype=torch.bfloat16))  # bf16: F.linear
    threads(1)
    DecodeLinear.from_linear(linear(130, 64))(torch.randn(1, 64))  # one thread: one part
    threads(4)
    DecodeLinear.from_linear(linear(130, 64))(torch.randn(1, 64))  # 130 % 4, 130 % 3: P = 2
    DecodeLinear.from_linear(linear(60, 64))(torch.randn(1, 64))  # 30 < MIN_PART: P = 1
    assert len(bmm_calls) == 3 and bmm_calls[-1] == (2, 64, 65)


def test_row_major_weight_falls_back(threads, bmm_calls):
    """A weight replaced by a row-major tensor (load_state_dict(assign=True), .data = ...)
    still multiplies right, through F.linear."""
    threads(2)
    dec = DecodeLinear.from_linear(linear(96, 32))
    w = torch.randn(96, 32)
    dec.load_state_dict({"weight": w}, assign=True)
    x = torch.randn(1, 32)
    assert_close(dec(x), F.linear(x, w), 1e-6, "row-major weight")
    assert not bmm_calls


def test_gradients_match_linear(threads):
    threads(2)
    lin = linear(96, 40, bias=True)
    dec = DecodeLinear.from_linear(copy.deepcopy(lin))
    x = torch.randn(3, 40)
    gx = torch.randn(3, 96)
    for m in (lin, dec):
        m.zero_grad()
        xg = x.clone().requires_grad_()
        m(xg).backward(gx)
        m.gx = xg.grad
    assert_close(dec.gx, lin.gx, 1e-6, "grad x")
    assert_close(dec.weight.grad, lin.weight.grad, 1e-6, "grad w")
    assert_close(dec.bias.grad, lin.bias.grad, 1e-6, "grad b")
    # float64 runs F.linear: gradcheck on the layout itself
    d64 = DecodeLinear.from_linear(linear(8, 5, bias=True).double())
    torch.autograd.gradcheck(d64, (torch.randn(2, 5, dtype=torch.float64, requires_grad=True),))


def _prefill_decode(model: HybridLM, ids: torch.Tensor, steps: int) -> torch.Tensor:
    """Logits [B, 1 + steps, V]: the prompt's last, then `steps` greedy cached steps."""
    cache = HybridCache.for_model(model, batch_size=ids.shape[0])
    out = [model(ids, cache=cache, logits_to_keep=1).logits]
    for _ in range(steps):
        out.append(model(out[-1].argmax(-1), cache=cache).logits)
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("tied", [False, True])
def test_model_after_layout_computes_the_same(tied, threads):
    threads(2)
    cfg = dataclasses.replace(TINY, tie_word_embeddings=tied).validate()
    ref = make(cfg)
    model = copy.deepcopy(ref)
    n_linear = sum(type(m) is nn.Linear for m in model.modules())
    routers = cfg.num_layers  # MoE.gate stays a plain Linear
    replaced = decode_layout(model)
    assert replaced == n_linear - routers  # a tied head is a Linear too
    assert decode_layout(model) == 0  # idempotent
    assert sum(isinstance(m, DecodeLinear) for m in model.modules()) == replaced
    if tied:
        assert model.lm_head.weight is model.model.embed_tokens.weight
    for (name, p), (_, p_ref) in zip(model.state_dict().items(), ref.state_dict().items(),
                                     strict=True):  # fmt: skip
        assert torch.equal(p, p_ref), name
    ids = torch.randint(0, cfg.vocab_size, (3, 37))  # odd length, 3 rows
    with torch.no_grad():
        got, want = _prefill_decode(model, ids, 5), _prefill_decode(ref, ids, 5)
        assert_close(got, want, 1e-5, "logits after decode_layout")
        full = model(ids).logits
        assert_close(full, ref(ids).logits, 1e-5, "no-cache logits")
    loss = model(ids, labels=ids).loss
    loss.backward()  # still trainable
    assert model.model.layers[0].self_attn.qkv_proj.weight.grad is not None


def test_int8_after_layout_is_the_same_int8(threads):
    threads(2)
    ref = make(TINY)
    model = copy.deepcopy(ref)
    decode_layout(model)
    quantize_int8(model)
    quantize_int8(ref)
    qs = {n: m for n, m in model.named_modules() if isinstance(m, Int8Linear)}
    refs = {n: m for n, m in ref.named_modules() if isinstance(m, Int8Linear)}
    assert qs.keys() == refs.keys() and qs
    for n, m in qs.items():
        assert m.weight.is_contiguous(), n  # the int8 kernel reads row-major weights
        assert torch.equal(m.weight, refs[n].weight) and torch.equal(m.scales, refs[n].scales)


def test_checkpoint_of_a_laid_out_model(tmp_path, threads):
    threads(2)
    model = make(TINY)
    decode_layout(model)
    model.save_pretrained(tmp_path / "ck")
    loaded = HybridLM.from_pretrained(tmp_path / "ck")
    for (name, p), (_, q) in zip(model.state_dict().items(), loaded.state_dict().items(),
                                 strict=True):  # fmt: skip
        assert torch.equal(p, q), name


def test_runner_lays_out_the_model(threads):
    threads(2)
    model = make(TINY)
    ref = copy.deepcopy(model)
    engine = Engine(model)
    assert isinstance(model.model.layers[0].block_sparse_moe.experts[0].w1, DecodeLinear)
    assert isinstance(model.lm_head, DecodeLinear)
    prompt = torch.randint(0, TINY.vocab_size, (21,)).tolist()
    got = engine.generate([prompt], SamplingParams(max_new_tokens=6, temperature=0.0))
    with torch.no_grad():
        cache = HybridCache.for_model(ref, batch_size=1)
        logits = ref(torch.tensor([prompt]), cache=cache, logits_to_keep=1).logits
        want = []
        for _ in range(6):
            want.append(int(logits[0, -1].argmax()))
            logits = ref(torch.tensor([[want[-1]]]), cache=cache).logits
    assert got[0].token_ids == want
