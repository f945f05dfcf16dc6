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
from lightlong.infer import Engine, HybridCache, Runner, SamplingParams
from lightlong.nn import DecodeLinear, Int8Linear, decode, decode_layout, quantize_int8
from lightlong.nn.decode import MAX_ROWS, linear_group

TINY = HybridConfig.from_preset("tiny")


@pytest.fixture(autouse=True)
def split_small_weights(monkeypatch):
    """Splits weights of any size here (the tests' are small; `MIN_SPLIT_BYTES` keeps
    small weights whole in use, tested on its own)."""
    monkeypatch.setattr(decode, "MIN_SPLIT_BYTES", 0)


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
    x = torch.randn(1, rows, I + 3)[..., :I]  # leading dims, rows not contiguous
    assert x.numel() // I == rows and (rows == 1 or not x.is_contiguous())  # MAX_ROWS: edge
    y = dec(x)
    assert y.shape == (*x.shape[:-1], O)
    assert_close(y, F.linear(x, ref_w, lin.bias), 1e-6, "DecodeLinear")


def test_split_runs_for_few_fp32_rows_only(threads, bmm_calls, monkeypatch):
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
    threads(2)
    monkeypatch.setattr(decode, "MIN_SPLIT_BYTES", 130 * 64 * 4 + 1)  # just over its bytes
    DecodeLinear.from_linear(linear(130, 64))(torch.randn(1, 64))  # in cache: F.linear
    assert len(bmm_calls) == 3


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


def test_runner_and_engine_lay_out_the_model(threads):
    threads(2)
    alone = make(TINY)
    Runner(alone, max_num_seqs=1)
    assert isinstance(alone.model.layers[0].self_attn.qkv_proj, DecodeLinear)
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


def _fused_model() -> tuple[HybridLM, HybridLM]:
    """(a tiny model laid out for decoding, an untouched copy of it)."""
    ref = make(TINY)
    model = copy.deepcopy(ref)
    decode_layout(model)
    return model, ref


def test_projections_of_one_input_share_a_buffer(threads, bmm_calls):
    threads(2)
    model, ref = _fused_model()
    attn, expert = (
        model.model.layers[0].self_attn,
        model.model.layers[0].block_sparse_moe.experts[1],
    )
    soft = model.model.layers[3].self_attn  # tiny's softmax layer
    groups = [(attn, ("qkv_proj", "output_gate")), (expert, ("w1", "w3")),
              (soft, ("q_proj", "k_proj", "v_proj"))]  # fmt: skip
    x = torch.randn(1, 1, TINY.hidden_size)
    for owner, names in groups:
        linears = [getattr(owner, n) for n in names]
        group = linears[0].group
        assert group is not None and all(m.group is group for m in linears)
        assert group.holds_weights()
        O = sum(m.out_features for m in linears)
        assert all(m.weight.stride() == (1, O) for m in linears)
        refs = [dict(ref.named_modules())[_name(model, m)] for m in linears]
        bmm_calls.clear()
        with torch.no_grad():
            got = linear_group(x, *linears)
        assert len(bmm_calls) == 1  # one product for the group: its outputs share memory
        assert len({y.untyped_storage().data_ptr() for y in got}) == 1
        for y, r in zip(got, refs, strict=True):
            assert_close(y, F.linear(x, r.weight), 1e-6, f"{names} fused")
        with torch.enable_grad():
            apart = linear_group(x, *linears)  # autograd on: one by one
        assert len({y.untyped_storage().data_ptr() for y in apart}) == len(linears)
        assert all(y.requires_grad for y in apart)


def _name(model: nn.Module, module: nn.Module) -> str:
    return next(n for n, m in model.named_modules() if m is module)


def test_layout_repaired_after_deepcopy_and_steps_aside_when_weights_change(threads, bmm_calls):
    threads(2)
    model, ref = _fused_model()
    twin = copy.deepcopy(model)  # Parameters clone their data: the buffer is not shared
    expert = twin.model.layers[1].block_sparse_moe.experts[0]
    assert expert.w1.group is None and expert.w3.group is None  # no copy of the buffer
    x = torch.randn(1, TINY.hidden_size)
    with torch.no_grad():
        apart = linear_group(x, expert.w1, expert.w3)  # right, one by one
    assert len({y.untyped_storage().data_ptr() for y in apart}) == 2
    assert decode_layout(twin) == 0  # nothing to replace, the layout repaired
    assert expert.w1.group.members == (expert.w1, expert.w3)  # the copy's own modules
    assert expert.w1.group.holds_weights() and expert.w1.weight.stride(0) == 1
    assert twin.lm_head.weight.stride(0) == 1
    # replace one weight: the buffer no longer holds it, and the group runs one by one
    new_w3 = torch.randn_like(expert.w3.weight)
    expert.w3.load_state_dict({"weight": new_w3}, assign=True)
    assert not expert.w1.group.holds_weights()
    with torch.no_grad():
        h1, h3 = linear_group(x, expert.w1, expert.w3)
    assert_close(h3, F.linear(x, new_w3), 1e-6, "replaced weight")
    w1_ref = ref.model.layers[1].block_sparse_moe.experts[0].w1.weight
    assert_close(h1, F.linear(x, w1_ref), 1e-6, "its neighbour")
    # a whole model converted: new tensors, right results
    ids = torch.randint(0, TINY.vocab_size, (1, 9))
    with torch.no_grad():
        got = _prefill_decode(model.double(), ids, 3)
        want = _prefill_decode(ref.double(), ids, 3)
    assert_close(got, want, 1e-12, "float64 after the layout")


def test_int8_projections_of_one_input_run_as_one_kernel_call(threads, monkeypatch):
    """After quantize_int8, the engine's decode_layout lays each group's int8 rows and
    scales side by side: one int8pack call per group, the same outputs as the members'."""
    threads(2)
    model = make(TINY)
    quantize_int8(model)
    decode_layout(model)
    expert = model.model.layers[2].block_sparse_moe.experts[3]
    attn = model.model.layers[1].self_attn
    calls = []
    real = torch._weight_int8pack_mm

    def spy(x, w, s):
        calls.append(tuple(w.shape))
        return real(x, w, s)

    monkeypatch.setattr(torch, "_weight_int8pack_mm", spy)
    x = torch.randn(1, 1, TINY.hidden_size)
    for linears in ((expert.w1, expert.w3), (attn.qkv_proj, attn.output_gate)):
        group = linears[0].group
        assert group is not None and group.holds_weights()
        assert all(m.weight.is_contiguous() for m in linears)  # the kernel's layout
        with torch.no_grad():
            calls.clear()
            got = linear_group(x, *linears)
            assert calls == [(sum(m.out_features for m in linears), TINY.hidden_size)]
            for y, m in zip(got, linears, strict=True):
                assert_close(y, m(x), 1e-6, f"{type(m).__name__} fused")
    ids = torch.randint(0, TINY.vocab_size, (2, 13))
    ref = make(TINY)
    quantize_int8(ref)
    with torch.no_grad():
        assert_close(_prefill_decode(model, ids, 4), _prefill_decode(ref, ids, 4), 1e-5,
                     "int8 model, fused")  # fmt: skip
    sd, sd_ref = model.state_dict(), ref.state_dict()
    assert sd.keys() == sd_ref.keys()
    assert all(torch.equal(sd[k], sd_ref[k]) for k in sd)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_only_fp32_weights_are_laid_out(dtype, threads):
    """Column-major fp16 weights multiply ~10x slower on the CPU; bf16 and fp64 gain
    nothing: other dtypes keep their Linears."""
    threads(2)
    model = make(TINY).to(dtype)
    assert decode_layout(model) == 0
    assert not any(isinstance(m, DecodeLinear) for m in model.modules())


def test_moving_a_laid_out_model_drops_its_groups(threads):
    """.to() / .double() give every weight a new tensor: the groups (and their buffers) go,
    and decode_layout on the fp32 model lays it out again."""
    threads(2)
    model, ref = _fused_model()
    experts = [layer.block_sparse_moe.experts[0] for layer in model.model.layers]
    model.double()
    assert all(e.w1.group is None and e.w3.group is None for e in experts)
    model.float()
    decode_layout(model)
    assert all(e.w1.group is not None and e.w1.group.holds_weights() for e in experts)
    ids = torch.randint(0, TINY.vocab_size, (1, 11))
    with torch.no_grad():
        assert_close(_prefill_decode(model, ids, 3), _prefill_decode(ref, ids, 3), 1e-5,
                     "moved and laid out again")  # fmt: skip


def test_hooks_keep_firing(threads):
    threads(2)
    model = make(TINY)
    attn = model.model.layers[0].self_attn
    seen = []
    attn.qkv_proj.register_forward_hook(lambda m, args, out: seen.append("before"))
    decode_layout(model)
    assert isinstance(attn.qkv_proj, DecodeLinear) and not attn.qkv_proj.training
    attn.output_gate.register_forward_hook(lambda m, args, out: seen.append("after"))
    ids = torch.randint(0, TINY.vocab_size, (1, 5))
    with torch.no_grad():
        _prefill_decode(model, ids, 2)  # hooked: the group runs one by one
    assert seen.count("before") == 3 and seen.count("after") == 3


@pytest.mark.slow  # compiles an expert: ~10-30 s on a CPU
def test_a_laid_out_expert_compiles_as_one_graph(threads):
    threads(2)
    model = make(TINY)
    decode_layout(model)
    expert = model.model.layers[0].block_sparse_moe.experts[0]
    x = torch.randn(1, TINY.hidden_size)
    with torch.no_grad():
        want = expert(x)
        got = torch.compile(expert, fullgraph=True, dynamic=False)(x)
    assert_close(got, want, 1e-5, "compiled laid-out expert")


def test_quantizing_a_laid_out_model_frees_its_float_buffers(threads):
    """quantize_int8 replaces every member of a group: the fp32 buffer is freed at once
    (no module <-> group cycle left for the garbage collector)."""
    import gc
    import weakref

    threads(2)
    model = make(TINY)
    decode_layout(model)
    expert = model.model.layers[0].block_sparse_moe.experts[0]
    buffer = weakref.ref(expert.w1.group.whole.weight)
    gc.disable()
    try:
        quantize_int8(model)
        assert buffer() is None
    finally:
        gc.enable()
