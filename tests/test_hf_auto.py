"""`lightlong.hf`: lightlong checkpoints through `transformers`' AutoConfig,
AutoModelForCausalLM, `generate` and `pipeline`, against `HybridLM` on the same files."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import assert_close, make

from lightlong import HybridConfig, HybridLM
from lightlong.infer import Engine, SamplingParams
from lightlong.tokenizer import train_bpe

transformers = pytest.importorskip("transformers")
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

from lightlong import hf  # noqa: E402

V = 300  # >= the 257 ids of the byte tokenizer and a tiny BPE's 300
HYBRID = ["lightning", "lightning", "softmax", "lightning"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The tiny model's matmuls are too small to gain from threads: one is faster (and
    many times faster when other processes share the cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def config(**kw) -> HybridConfig:
    base = dict(
        vocab_size=V, hidden_size=32, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=8,
        layer_types=HYBRID, rotary_dim=8, rope_theta=10000.0, block_size=16, num_experts=4,
        experts_per_token=2, intermediate_size=24, postnorm=True, linear_attn_alpha=1.7,
        full_attn_alpha=1.3, mlp_alpha=1.5, mlp_beta=0.8,
    )  # fmt: skip
    base.update(kw)
    return HybridConfig(**base).validate()


def ids(B: int, T: int, seed: int) -> torch.Tensor:
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


def greedy(lm: HybridLM, prompt: torch.Tensor, n: int) -> torch.Tensor:
    """n argmax tokens [B, n], recomputing the whole prefix each step (no cache)."""
    x = prompt
    with torch.no_grad():
        for _ in range(n):
            x = torch.cat([x, lm(x).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return x[:, prompt.shape[1] :]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A lightlong-saved checkpoint (no tokenizer, so no eos stops generation early)."""
    hf.register()
    path = tmp_path_factory.mktemp("ck") / "text01"
    make(config()).save_pretrained(path, tokenizer="random ids")
    return path


@pytest.fixture(scope="module")
def pair(ckpt):
    """(AutoModelForCausalLM, HybridLM), both loaded from `ckpt` in float32."""
    return AutoModelForCausalLM.from_pretrained(ckpt).eval(), HybridLM.from_pretrained(ckpt)


@pytest.mark.parametrize("model_type", ["minimax_text_01", "minimax_m1"])
def test_auto_classes_load_released_layout(tmp_path, model_type):
    hf.register()
    ours = make(config(model_type=model_type))
    ours.save_pretrained(tmp_path / "ck", tokenizer="random ids")
    cfg = AutoConfig.from_pretrained(tmp_path / "ck")
    expected = {"minimax_text_01": hf.MiniMaxText01Config, "minimax_m1": hf.MiniMaxM1Config}
    assert type(cfg) is expected[model_type]
    assert cfg.attn_type_list == [0, 0, 1, 0]  # the released fields, kept as they are
    assert cfg.hybrid_config() == ours.config
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "ck")
    assert type(model).__name__ == ours.config.to_minimax_dict()["architectures"][0]
    assert model.state_dict().keys() == ours.state_dict().keys()  # the released names
    x = ids(2, 37, seed=1)  # two blocks and a tail
    with torch.no_grad():
        assert_close(model(x).logits, ours(x).logits, 1e-6, "logits")


def test_native_minimax_stays_transformers(tmp_path):
    hf.register()
    make(config()).save_pretrained(tmp_path / "ck", config_format="transformers")
    cfg = AutoConfig.from_pretrained(tmp_path / "ck")
    assert type(cfg) is transformers.MiniMaxConfig
    assert AutoModelForCausalLM._model_mapping[type(cfg)] is transformers.MiniMaxForCausalLM


@pytest.mark.parametrize("T", [1, 16, 23])
def test_logits_and_loss_match_hybrid_lm(pair, T):
    model, lm = pair
    x = ids(2, T, seed=T)
    with torch.no_grad():
        labels = x if T > 1 else None  # one token predicts nothing
        out, ref = model(x, labels=labels), lm(x, labels=labels)
        assert_close(out.logits, ref.logits, 1e-6, "logits")
        assert_close(out.loss, ref.loss, 1e-6, "loss")
        last = model(x, logits_to_keep=1).logits
        assert_close(last, ref.logits[:, -1:], 1e-6, "logits_to_keep=1")


@pytest.mark.parametrize("use_cache", [True, False], ids=["cache", "recompute"])
def test_greedy_generate_matches_lightlong(pair, use_cache):
    model, lm = pair
    prompt = ids(2, 19, seed=2)
    out = model.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=use_cache)
    assert torch.equal(out[:, :19], prompt)
    assert out[:, 19:].tolist() == greedy(lm, prompt, 8).tolist()
    engine = Engine(lm).generate(prompt.tolist(), SamplingParams(max_new_tokens=8, temperature=0))
    assert out[:, 19:].tolist() == [g.token_ids for g in engine]


def test_generate_keeps_a_hybrid_cache(pair):
    """The cached path runs the prompt once, then one token per step."""
    model, _ = pair
    lm, seen = model.hybrid, []
    forward = lm.forward

    def spy(input_ids, **kw):
        seen.append((input_ids.shape[1], kw.get("cache") is not None))
        return forward(input_ids, **kw)

    lm.forward = spy
    try:
        model.generate(ids(1, 11, seed=3), max_new_tokens=4, do_sample=False)
    finally:
        del lm.forward
    assert seen == [(11, True), (1, True), (1, True), (1, True)]


@pytest.mark.parametrize("use_cache", [True, False], ids=["cache", "recompute"])
def test_left_padded_batch_matches_rows_alone(pair, use_cache):
    model, lm = pair
    short, long = ids(1, 7, seed=4), ids(1, 21, seed=5)
    batch = torch.zeros(2, 21, dtype=torch.int64)
    mask = torch.zeros(2, 21, dtype=torch.int64)
    batch[0, 14:], mask[0, 14:] = short[0], 1
    batch[1], mask[1] = long[0], 1
    out = model.generate(
        batch, attention_mask=mask, max_new_tokens=6, do_sample=False, use_cache=use_cache
    )
    assert out[0, 21:].tolist() == greedy(lm, short, 6)[0].tolist()
    assert out[1, 21:].tolist() == greedy(lm, long, 6)[0].tolist()


@pytest.mark.parametrize(
    "side, use_cache",
    [("left", False), ("right", False), ("left", True)],
    ids=["left", "right", "left-cache"],
)
def test_padded_forward_matches_rows_alone(pair, side, use_cache):
    model, lm = pair
    row, other = ids(1, 9, seed=6), ids(1, 20, seed=7)
    batch, mask = torch.zeros(2, 20, dtype=torch.int64), torch.zeros(2, 20, dtype=torch.int64)
    span = slice(11, 20) if side == "left" else slice(0, 9)
    batch[0, span], mask[0, span] = row[0], 1
    batch[1], mask[1] = other[0], 1
    with torch.no_grad():
        logits = model(batch, attention_mask=mask, use_cache=use_cache).logits
        assert_close(logits[0, span], lm(row).logits[0], 1e-6, f"{side}-padded row")
        assert_close(logits[1], lm(other).logits[0], 1e-6, "unpadded row")
        assert not logits[0, mask[0] == 0].any()


def test_padding_errors(pair):
    model, _ = pair
    x = ids(2, 8, seed=8)
    right = torch.ones(2, 8, dtype=torch.int64)
    right[0, 6:] = 0
    with pytest.raises(ValueError, match="only left padding"):
        model.generate(x, attention_mask=right, max_new_tokens=2)
    gap = torch.ones(2, 8, dtype=torch.int64)
    gap[0, 3] = 0
    with pytest.raises(ValueError, match="one contiguous run"):
        model(x, attention_mask=gap)
    with pytest.raises(ValueError, match=r"attention_mask must be \[B=2, T=8\]"):
        model(x, attention_mask=right[:, :5])


def test_sampling_is_seeded_and_cache_independent(pair):
    model, _ = pair
    prompt = ids(2, 12, seed=9)
    runs = []
    for use_cache in (True, True, False):
        torch.manual_seed(123)
        runs.append(
            model.generate(prompt, max_new_tokens=8, do_sample=True, top_k=50, use_cache=use_cache)
        )
    assert runs[0].shape == (2, 20)
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[0], runs[2])
    assert int(runs[0].min()) >= 0 and int(runs[0].max()) < V


def test_beam_search_reorders_the_cache(pair):
    model, _ = pair
    prompt = ids(2, 10, seed=10)
    kw = dict(max_new_tokens=6, num_beams=3, num_return_sequences=3, do_sample=False)
    cached = model.generate(prompt, use_cache=True, **kw)
    assert torch.equal(cached, model.generate(prompt, use_cache=False, **kw))


def test_pipeline_with_bpe_tokenizer(tmp_path):
    hf.register()
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog. " * 40 + "hello world. " * 40)
    tok = train_bpe([corpus], V, tmp_path / "tok")
    lm = make(config())
    lm.save_pretrained(tmp_path / "ck", tokenizer=tok)
    pipe = transformers.pipeline("text-generation", model=str(tmp_path / "ck"))
    assert isinstance(pipe.model, hf.MiniMaxText01ForCausalLM)
    prompt = "hello world"
    text = pipe(prompt, max_new_tokens=6, do_sample=False)[0]["generated_text"]
    new = greedy(lm, torch.tensor([tok.encode(prompt)]), 6)[0].tolist()
    if tok.eos_token_id in new:  # generate stops at eos
        new = new[: new.index(tok.eos_token_id)]
    assert text == prompt + tok.decode(new)
    # a left-padded batch gives what each prompt gives alone
    pipe.tokenizer.pad_token, pipe.tokenizer.padding_side = "<|endoftext|>", "left"
    prompts = ["the quick brown fox", "hello"]
    batched = pipe(prompts, max_new_tokens=6, do_sample=False, batch_size=2)
    alone = [pipe(p, max_new_tokens=6, do_sample=False) for p in prompts]
    assert batched == alone


def test_save_pretrained_round_trip(pair, tmp_path):
    model, lm = pair
    model.save_pretrained(tmp_path / "out")
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert saved["model_type"] == "minimax_text_01"
    assert saved["architectures"] == ["MiniMaxText01ForCausalLM"]
    back = HybridLM.from_pretrained(tmp_path / "out")
    assert back.config == lm.config
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    x = ids(2, 33, seed=11)
    with torch.no_grad():  # lm may be laid out for decoding by an earlier test's Engine:
        ref = lm(x).logits  # the same weights, products summed in another order
        saved_logits = back(x).logits
        assert_close(saved_logits, ref, 1e-6, "HybridLM after the wrapper's save_pretrained")
        assert_close(again(x).logits, saved_logits, 0.0, "the wrapper after its save_pretrained")


def test_dtype_and_fp32_lm_head(ckpt):
    bf16 = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.bfloat16)
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
    x = ids(1, 12, seed=12)
    with torch.no_grad():
        assert bf16(x).logits.dtype == torch.bfloat16
        wide = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.bfloat16, fp32_lm_head=True)
        assert wide.config.fp32_lm_head and wide.hybrid.fp32_lm_head
        ref = HybridLM.from_pretrained(ckpt, dtype=torch.bfloat16)
        ref.fp32_lm_head = True
        logits = wide(x).logits
        assert logits.dtype == torch.float32
        assert_close(logits, ref(x).logits, 0.0, "fp32 LM head")


def test_config_from_hybrid_config():
    cfg = config(model_type="minimax_m1")
    made = hf.MiniMaxM1Config.from_hybrid_config(cfg)
    assert made.hybrid_config() == cfg
    assert isinstance(AutoModelForCausalLM.from_config(made), hf.MiniMaxM1ForCausalLM)
    with pytest.raises(ValueError, match="minimax_m1"):
        hf.MiniMaxText01Config.from_hybrid_config(cfg)


def test_register_is_idempotent(ckpt):
    hf.register()
    hf.register()
    assert type(AutoConfig.from_pretrained(ckpt)) is hf.MiniMaxText01Config


def test_bad_checkpoints_raise_clear_errors(ckpt, tmp_path):
    hf.register()
    with pytest.raises(OSError):
        AutoModelForCausalLM.from_pretrained(tmp_path / "missing")
    weightless = tmp_path / "weightless"
    weightless.mkdir()
    (weightless / "config.json").write_text((ckpt / "config.json").read_text())
    with pytest.raises(OSError, match=r"model\.safetensors"):
        AutoModelForCausalLM.from_pretrained(weightless)
    bad = tmp_path / "bad"
    shutil.copytree(ckpt, bad)
    fields = json.loads((bad / "config.json").read_text())
    fields["attn_type_list"] = fields["attn_type_list"][:-1]
    (bad / "config.json").write_text(json.dumps(fields))
    with pytest.raises(ValueError, match=r"config\.json: attn_type_list has 3 entries"):
        AutoModelForCausalLM.from_pretrained(bad)


def test_unsupported_inputs_raise(pair):
    model, _ = pair
    x = ids(1, 4, seed=13)
    with pytest.raises(ValueError, match="DynamicCache cannot hold"):
        model(x, past_key_values=transformers.DynamicCache())
    with pytest.raises(ValueError, match="inputs_embeds"):
        model(input_ids=x, inputs_embeds=torch.zeros(1, 4, 32))


def test_hybrid_shares_parameters(pair):
    """`model.hybrid` is a HybridLM over the very same parameters (for lightlong's Engine)."""
    model, lm = pair
    assert model.hybrid.config == lm.config
    ours, theirs = dict(model.named_parameters()), dict(model.hybrid.named_parameters())
    assert ours.keys() == theirs.keys()
    assert all(ours[k] is theirs[k] for k in ours)


def test_save_pretrained_after_the_engine_laid_the_model_out(ckpt, tmp_path):
    """An Engine lays the wrapper's model out for decoding (column-major views of shared
    buffers, `lightlong.nn.decode_layout`); the wrapper still saves, and what it saves is
    the same model."""
    model = AutoModelForCausalLM.from_pretrained(ckpt)
    x = ids(2, 17, seed=13)
    with torch.no_grad():
        ref = model(x).logits
    Engine(model.hybrid)
    w1 = model.hybrid.model.layers[0].block_sparse_moe.experts[0].w1
    assert type(w1).__name__ == "DecodeLinear" and not w1.weight.is_contiguous()
    assert model.get_output_embeddings() is model.hybrid.lm_head
    model.save_pretrained(tmp_path / "out")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    with torch.no_grad():
        assert_close(again(x).logits, ref, 0.0, "saved after the layout")
        assert_close(model(x).logits, ref, 1e-5, "laid out")
