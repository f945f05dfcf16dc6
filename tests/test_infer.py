"""Inference: the hybrid cache, chunked prefill, decode, batching, prefix reuse, sampling.

Every cached path is checked against the model's full-sequence forward without a cache
(or, for the ops, against an explicit reference written here).
# B batch, T tokens, H heads, G key/value heads, K/V/D head dims, L cache slots, V vocab
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import assert_close

from lightlong import HybridConfig, HybridLM
from lightlong.infer import CacheSnapshot, Engine, HybridCache, PrefixCache, SamplingParams
from lightlong.infer.sampling import process_logits, sample
from lightlong.nn import decode, decode_layout
from lightlong.ops import attention as attention_ops
from lightlong.ops.attention import cached_attention
from lightlong.ops.lightning.recurrent import lightning_attn_recurrent, lightning_attn_step
from lightlong.tokenizer import ByteTokenizer

TOL = {torch.float32: 1e-5, torch.float64: 1e-12}
DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
VARIANTS = {
    "hybrid": None,
    "lightning": ["lightning"] * 4,
    "softmax": ["softmax"] * 4,
    # the lineage (issue 8), each in the hybrid's place of lightning
    "cosformer": ["cosformer"] * 3 + ["softmax"],
    "norm_linear": ["norm_linear"] * 3 + ["softmax"],
    "window": ["window_softmax"] * 3 + ["softmax"],
    "diag": ["diag_softmax"] * 3 + ["softmax"],
}
LINEAGE = ["cosformer", "norm_linear", "window", "diag"]


def tiny(layer_types: list[str] | None = None, **overrides) -> HybridConfig:
    """The tiny preset with 16-token lightning blocks, 8-token windows and diagonal blocks
    (shorter than the tests' sequences) and weights large enough that every token visibly
    moves the logits (a lost or stale state is far above the tolerances)."""
    settings = {"block_size": 16, "initializer_range": 0.1, "window_size": 8,
                "diag_block_size": 8, "cosformer_max_len": 64} | overrides  # fmt: skip
    cfg = dataclasses.replace(HybridConfig.from_preset("tiny"), **settings)
    if layer_types is not None:
        cfg = dataclasses.replace(cfg, layer_types=list(layer_types), num_layers=len(layer_types))
    return cfg.validate()


def make_model(cfg: HybridConfig | None = None, *, seed: int = 0, dtype=torch.float32) -> HybridLM:
    torch.manual_seed(seed)
    return HybridLM(cfg or tiny()).to(dtype).eval()


def random_ids(n: int, *, vocab: int = 512, seed: int = 0, batch: int | None = None):
    g = torch.Generator().manual_seed(seed)
    shape = (n,) if batch is None else (batch, n)
    return torch.randint(0, vocab, shape, generator=g)


@torch.no_grad()
def full_logits(model: HybridLM, ids) -> torch.Tensor:
    """Logits [B, T, V] of the full-sequence forward without a cache."""
    ids = torch.as_tensor(ids)
    return model(ids if ids.dim() == 2 else ids[None]).logits


# ---------------------------------------------------------------------- chunked prefill


@DTYPES
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_chunked_prefill_matches_single_pass(variant, dtype):
    model = make_model(tiny(VARIANTS[variant]), dtype=dtype)
    ids = random_ids(37).tolist()  # 2 lightning blocks of 16 + a tail of 5
    ref = full_logits(model, ids)[:, -1].float()
    caches = {}
    for chunk in (1, 5, 7, 13, 37, 64):
        cache, logits = Engine(model, prefill_chunk=chunk).prefill(ids)
        assert cache.length == 37 and cache.batch_size == 1
        assert_close(logits, ref, TOL[dtype], f"chunk={chunk} last logits")
        caches[chunk] = cache
    # chunk >= 37 is one forward pass: its states are the single pass's final states
    single = caches[64]
    for chunk in (1, 5, 7, 13, 37):
        for i, s in single.states.items():
            assert_close(caches[chunk].states[i], s, TOL[dtype], f"chunk={chunk} state {i}")
        for i, k in single.keys.items():
            assert_close(caches[chunk].keys[i][:, :, :37], k[:, :, :37], TOL[dtype], f"keys {i}")
            v_ref = single.values[i][:, :, :37]
            assert_close(caches[chunk].values[i][:, :, :37], v_ref, TOL[dtype], f"values {i}")


@DTYPES
def test_chunked_forward_with_cache_matches_full_logits_batched(dtype):
    model = make_model(dtype=dtype)
    ids_BT = random_ids(29, batch=3, seed=1)
    ref_BTV = full_logits(model, ids_BT)
    cache = HybridCache.for_model(model, batch_size=3)
    outs = []
    with torch.no_grad():
        for a, b in ((0, 3), (3, 4), (4, 15), (15, 29)):  # 3, 1 (a decode step), 11, 14
            outs.append(model(ids_BT[:, a:b], cache=cache).logits)
    assert cache.length == 29
    assert_close(torch.cat(outs, dim=1), ref_BTV, TOL[dtype], "logits of every position")


def test_prefill_final_state_matches_lightning_reference():
    """The cache's state of the first lightning layer equals the recurrence's final state,
    computed from that layer's own q, k, v (an independent path to the same state)."""
    model = make_model(dtype=torch.float64)
    ids = random_ids(21, seed=2)
    cache, _ = Engine(model, prefill_chunk=6).prefill(ids.tolist())
    layer = model.model.layers[0]
    with torch.no_grad():
        h = layer.input_layernorm(model.model.embed_tokens(ids[None]))
        mixer = layer.self_attn
        qkv = torch.nn.functional.silu(mixer.qkv_proj(h)).view(1, 21, mixer.num_heads, -1)
        q, k, v = qkv.split(mixer.head_dim, dim=-1)
        _, final = lightning_attn_recurrent(
            q, k, v, mixer.decay(h.device), scale=1.0, output_final_state=True
        )
    assert_close(cache.states[0], final, 1e-12, "state of layer 0")


# ------------------------------------------------------------------------------ decode


@DTYPES
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_decode_step_by_step_matches_full_forward(variant, dtype):
    model = make_model(tiny(VARIANTS[variant]), dtype=dtype)
    ids_BT = random_ids(23, batch=2, seed=3)
    ref_BTV = full_logits(model, ids_BT)
    cache = HybridCache.for_model(model, batch_size=2)
    with torch.no_grad():
        out = model(ids_BT[:, :5], cache=cache).logits
        assert_close(out, ref_BTV[:, :5], TOL[dtype], "prefill of 5")
        for t in range(5, 23):
            step = model(ids_BT[:, t : t + 1], cache=cache).logits
            assert_close(step[:, 0], ref_BTV[:, t], TOL[dtype], f"decode position {t}")
    assert cache.length == 23


def decode_logits(model: HybridLM, ids_BT, prefill: int, drop_row_at: int | None = None):
    """Logits [B, V] of each decode step after a prefill of `prefill` tokens; with
    `drop_row_at`, the last row leaves the batch at that step (the batch size changes)."""
    B, T = ids_BT.shape
    cache = HybridCache.for_model(model, batch_size=B, max_batch_size=B)
    steps = []
    with torch.no_grad():
        model(ids_BT[:, :prefill], cache=cache)
        for t in range(prefill, T):
            if t == drop_row_at:
                cache.remove(B - 1)
                ids_BT, B = ids_BT[:-1], B - 1
            steps.append(model(ids_BT[:, t : t + 1], cache=cache).logits[:, 0])
    return steps


@pytest.mark.slow  # compiles the layers: ~30-80 s on a CPU
@pytest.mark.parametrize("layout", [False, True], ids=["row-major", "decode-layout"])
def test_compiled_decode_matches_eager_decode(layout, monkeypatch):
    """`compile_decode`: the compiled step (lightning, softmax with growing KV, MoE for one
    token and for a batch) computes the eager step's logits, and a batch size that changes
    mid-decode is still right; prefill (T > 1) stays eager. Also with the projections in
    the decode layout (`lightlong.nn.decode_layout`, as the engine runs them)."""
    model = make_model(tiny(["lightning", "softmax"]))
    if layout:  # split even these small weights (`MIN_SPLIT_BYTES`)
        monkeypatch.setattr(decode, "MIN_SPLIT_BYTES", 0)
        decode_layout(model)
    ids_BT = random_ids(12, batch=2, seed=8)
    eager = decode_logits(model, ids_BT, 5, drop_row_at=9)
    one = decode_logits(model, ids_BT[:1], 5)
    model.compile_decode()
    try:
        compiled = decode_logits(model, ids_BT, 5, drop_row_at=9)
        assert_close(torch.stack(compiled[4:]), torch.stack(eager[4:]), 1e-5, "after a row left")
        for t, (c, e) in enumerate(zip(compiled[:4], eager[:4], strict=True)):
            assert_close(c, e, 1e-5, f"decode step {t}, batch of 2")
        single = decode_logits(model, ids_BT[:1], 5)  # one row: the one-token MoE path
        assert_close(torch.stack(single), torch.stack(one), 1e-5, "batch of 1")
        assert model._decode_layers is not None
    finally:
        model.compile_decode(False)
    assert model._decode_layers is None
    assert all(layer.block_sparse_moe.decode_experts is None for layer in model.model.layers)


# ------------------------------------------------------------------ batched == single


PROMPT_LENGTHS = [
    int(n) for n in torch.randint(1, 20, (5,), generator=torch.Generator().manual_seed(4))
]


def random_prompts(seed: int = 5) -> list[list[int]]:
    lengths = [*PROMPT_LENGTHS, 1]  # random left-pad lengths, and a one-token prompt
    return [random_ids(n, seed=seed + i).tolist() for i, n in enumerate(lengths)]


SAMPLING = {
    "greedy": SamplingParams(max_new_tokens=6),
    "sampled": SamplingParams(
        max_new_tokens=6, temperature=0.8, top_k=40, top_p=0.9, repetition_penalty=1.3, seed=7
    ),
}


@pytest.mark.parametrize("mode", list(SAMPLING))
def test_generate_batch_rows_match_single_prompts(mode):
    engine = Engine(make_model(), prefill_chunk=8)
    prompts = random_prompts()
    assert len({len(p) for p in prompts}) > 1
    params = SAMPLING[mode]
    batched = engine.generate(prompts, params)
    for i, p in enumerate(prompts):
        alone = engine.generate(p, params)[0]
        assert batched[i].token_ids == alone.token_ids, f"row {i} (prompt of {len(p)})"
        assert batched[i].finish_reason == alone.finish_reason == "length"
        assert batched[i].prompt_tokens == len(p)
        assert len(alone.token_ids) == 6
    assert engine.generate(prompts, params)[0].token_ids == batched[0].token_ids  # seeded


@pytest.mark.parametrize("variant", ["hybrid", "softmax", *LINEAGE])
def test_stacked_cache_decode_matches_single_row_caches(variant):
    model = make_model(tiny(VARIANTS[variant]))
    engine = Engine(model, prefill_chunk=8)
    prompts = random_prompts(seed=11)
    singles, first = zip(*(engine.prefill(p) for p in prompts), strict=True)
    stacked = HybridCache.stack(singles)
    longest = max(len(p) for p in prompts)
    assert stacked.length == longest
    assert stacked.lengths == stacked.seen.tolist() == [len(p) for p in prompts]
    assert isinstance(stacked.start, torch.Tensor)  # rows of different lengths
    tokens_SB = random_ids(4, batch=len(prompts), seed=12).T  # 4 steps
    # the full forward of each prompt + its tokens, from the last prompt position on
    full = [
        full_logits(model, [*p, *tokens_SB[:, b].tolist()])[:, len(p) - 1 :]
        for b, p in enumerate(prompts)
    ]
    for b in range(len(prompts)):
        assert_close(first[b], full[b][:, 0], 1e-5, f"prefill logits row {b}")
    with torch.no_grad():
        for s in range(4):
            logits_BV = model(tokens_SB[s][:, None], cache=stacked).logits[:, -1]
            for b, c in enumerate(singles):
                alone = model(tokens_SB[s][b].view(1, 1), cache=c).logits[:, -1]
                assert_close(logits_BV[b : b + 1], alone, 1e-5, f"step {s} row {b}")
                assert_close(alone, full[b][:, s + 1], 1e-5, f"step {s} row {b} vs full")


@pytest.mark.parametrize("variant", ["hybrid", "softmax", *LINEAGE])
def test_batch_of_one_reset_matches_fresh_sequence(variant):
    """A cache whose only row was freed by reset (and that row stacked alone): a new
    sequence run through it, in a multi-token chunk and then token by token, equals the
    full forward."""
    model = make_model(tiny(VARIANTS[variant]))
    old, new = random_ids(9, seed=13), random_ids(12, seed=14)
    ref = full_logits(model, new)
    cache = HybridCache.for_model(model)
    with torch.no_grad():
        model(old[None], cache=cache)
        cache.reset([0])
        assert cache.lengths == [0]
        stacked = HybridCache.stack([cache])
        assert stacked.lengths == [0] and stacked.batch_size == 1
        for c in (cache, stacked):
            out = [model(new[None, :5], cache=c).logits]
            out += [model(new[None, t : t + 1], cache=c).logits for t in range(5, 12)]
            assert_close(torch.cat(out, dim=1), ref, 1e-5, "padded B=1 logits")


# ---------------------------------------------------------------------- cached_attention


def reference_cached_attention(q, k_cache, v_cache, start):
    """Explicit masked softmax in fp64: GQA by repeat_interleave, one mask entry at a time;
    start is one slot or a list of one per row."""
    B, T, H, D = q.shape
    G, L = k_cache.shape[1], k_cache.shape[2]
    k = k_cache.double().repeat_interleave(H // G, dim=1)  # [B, H, L, D]
    v = v_cache.double().repeat_interleave(H // G, dim=1)
    scores_BHTL = torch.einsum("bthd,bhld->bhtl", q.double(), k) / D**0.5
    mask_BTL = torch.zeros(B, T, L, dtype=torch.bool)
    for b in range(B):
        for t in range(T):
            slot = (start if isinstance(start, int) else start[b]) + t
            mask_BTL[b, t, : slot + 1] = True
    scores_BHTL = scores_BHTL.masked_fill(~mask_BTL[:, None], float("-inf"))
    return torch.einsum("bhtl,bhld->bthd", scores_BHTL.softmax(dim=-1), v)


CACHED_CASES = {  # B, T, start (one, or per row), slots past the longest row's new tokens
    "B1-T1": (1, 1, 6, 0),
    "B3-T1": (3, 1, 10, 0),
    "B1-T1-extra": (1, 1, 9, 4),
    "B1-T5-start": (1, 5, 7, 2),
    "B3-T1-rows": (3, 1, [11, 6, 0], 0),
    "B2-T7-start": (2, 7, 5, 3),
    "B3-T6-rows": (3, 6, [4, 9, 0], 5),
    "B2-T1-rows-equal": (2, 1, [3, 3], 0),
}


@DTYPES
@pytest.mark.parametrize("chunked", [False, True], ids=["one-mask", "mask-chunks"])
@pytest.mark.parametrize("case", list(CACHED_CASES))
def test_cached_attention_matches_masked_reference(case, chunked, dtype, monkeypatch):
    B, T, start, extra = CACHED_CASES[case]
    H, G, D = 4, 2, 8
    longest = start if isinstance(start, int) else max(start)
    L = longest + T + extra  # slots past a row's new tokens hold garbage no query may see
    g = torch.Generator().manual_seed(20)
    q = torch.randn(B, T, H, D, generator=g, dtype=dtype)
    k_cache = torch.randn(B, G, L, D, generator=g, dtype=dtype)
    v_cache = torch.randn(B, G, L, D, generator=g, dtype=dtype)
    for b in range(B):
        end = (start if isinstance(start, int) else start[b]) + T
        k_cache[b, :, end:] = 1e4
        v_cache[b, :, end:] = 1e4
    start_arg = start if isinstance(start, int) else torch.tensor(start)
    if chunked:  # a mask budget of two query rows: several SDPA calls
        monkeypatch.setattr(attention_ops, "_MASK_BYTES", 2 * B * L)
    out = cached_attention(q, k_cache, v_cache, start=start_arg)
    assert out.shape == (B, T, H, D) and out.dtype == dtype
    ref = reference_cached_attention(q, k_cache, v_cache, start)
    assert_close(out, ref, {torch.float32: 1e-5, torch.float64: 1e-12}[dtype], case)


# ---------------------------------------------------------------------- lightning step


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("scale", [None, 1.0])
def test_lightning_attn_step_matches_recurrent(dtype, tol, scale):
    B, T, H, K, V = 3, 9, 4, 8, 6
    g = torch.Generator().manual_seed(21)
    q, k = (torch.randn(B, T, H, K, generator=g, dtype=dtype) for _ in range(2))
    v = torch.randn(B, T, H, V, generator=g, dtype=dtype)
    decay = torch.tensor([0.0, 1e-3, 0.3, 2.0])
    state_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    s0 = torch.randn(B, H, K, V, generator=g, dtype=state_dtype)
    o_ref, final_ref = lightning_attn_recurrent(
        q, k, v, decay, scale=scale, initial_state=s0, output_final_state=True
    )
    state = s0.clone()
    ptr = state.data_ptr()
    outs = [lightning_attn_step(q[:, t : t + 1], k[:, t : t + 1], v[:, t : t + 1], decay, state,
                                scale=scale) for t in range(T)]  # fmt: skip
    assert state.data_ptr() == ptr, "state must be updated in place"
    assert_close(torch.cat(outs, dim=1), o_ref, tol, "outputs")
    assert_close(state, final_ref, tol, "state after T steps")
    assert outs[0].dtype == dtype and outs[0].shape == (B, 1, H, V)


def test_lightning_attn_step_rejects_bad_inputs():
    q = torch.randn(2, 2, 4, 8)
    state = torch.zeros(2, 4, 8, 8)
    with pytest.raises(ValueError, match="T=2"):
        lightning_attn_step(q, q, q, torch.zeros(4), state)
    with pytest.raises(ValueError, match=r"state must be torch\.float32"):
        lightning_attn_step(q[:, :1], q[:, :1], q[:, :1], torch.zeros(4), state.double())
    with pytest.raises(ValueError, match="contiguous"):
        lightning_attn_step(q[:, :1], q[:, :1], q[:, :1], torch.zeros(4), state.transpose(2, 3))


# -------------------------------------------------------------- snapshots and prefixes


def test_snapshot_restore_then_suffix_matches_full_prefill():
    model = make_model()
    prefix, other, suffix = random_ids(17, seed=30), random_ids(6, seed=31), random_ids(9, seed=32)
    full = torch.cat([prefix, suffix])
    ref_logits = full_logits(model, full)[:, -1]
    ref_cache, _ = Engine(model, prefill_chunk=64).prefill(full.tolist())
    cache = HybridCache.for_model(model)
    with torch.no_grad():
        model(prefix[None], cache=cache)
        snap = cache.snapshot()
        states_before = {i: s.clone() for i, s in cache.states.items()}
        model(other[None], cache=cache)  # a different continuation, then undone
        for i, s in snap.states.items():  # the snapshot is a copy, not a view
            assert torch.equal(s, states_before[i])
        cache.restore(snap)
        assert cache.length == 17
        logits = model(suffix[None], cache=cache).logits[:, -1]
    assert_close(logits, ref_logits, 1e-5, "prefix snapshot + suffix")
    for i, s in ref_cache.states.items():
        assert_close(cache.states[i], s, 1e-5, f"state {i}")
    for i, k in ref_cache.keys.items():
        assert_close(cache.keys[i][:, :, :26], k[:, :, :26], 1e-5, f"keys {i}")


def test_prefix_cache_reuses_shared_prefix():
    model = make_model()
    shared = random_ids(27, seed=33).tolist()
    first = [*shared, *random_ids(5, seed=34).tolist()]  # 32 tokens: snapshot at 24
    second = [*shared, *random_ids(6, seed=35).tolist()]  # 33 tokens, shares 24 of them
    params = SamplingParams(max_new_tokens=5)
    plain = Engine(model, prefill_chunk=8)
    reuse = Engine(model, prefill_chunk=8, prefix_cache_bytes=1 << 26)

    reuse.generate(first, params)
    assert (reuse.stats.reused_tokens, reuse.stats.prefill_tokens) == (0, 32)
    assert len(reuse.prefix_cache) == 1
    out = reuse.generate(second, params)[0]
    assert (reuse.stats.reused_tokens, reuse.stats.prefill_tokens) == (24, 9)
    assert reuse.prefix_cache.hits == 1
    assert out.token_ids == plain.generate(second, params)[0].token_ids
    assert plain.stats.reused_tokens == 0 and plain.stats.prefill_tokens == 33

    cache_reused, logits_reused = reuse.prefill(second)
    cache_plain, logits_plain = plain.prefill(second)
    assert_close(logits_reused, logits_plain, 1e-5, "logits after a restored prefix")
    assert_close(logits_plain, full_logits(model, second)[:, -1], 1e-5, "logits vs full")
    for i, s in cache_plain.states.items():
        assert_close(cache_reused.states[i], s, 1e-5, f"state {i}")

    # a prompt sharing less than one chunk reuses nothing
    reuse.generate([*shared[:7], 1, 2, 3, 4, 5, 6, 7, 8, 9], params)
    assert reuse.stats.reused_tokens == 0 and reuse.stats.prefill_tokens == 16


def fake_snapshot(length: int, nbytes: int) -> CacheSnapshot:
    state = torch.zeros(nbytes // 4, dtype=torch.float32)
    return CacheSnapshot({0: state}, {}, {}, (length,))


def test_prefix_cache_evicts_least_recently_used_by_bytes():
    pc = PrefixCache(chunk_size=4, max_bytes=2500)
    a, b, c = ([x] * 4 for x in (1, 2, 3))
    pc.insert(a, fake_snapshot(4, 1000))
    pc.insert(b, fake_snapshot(4, 1000))
    assert len(pc) == 2 and pc.nbytes == 2000
    assert pc.lookup([*a, 9])[0] == 4  # a becomes the most recently used
    pc.insert(c, fake_snapshot(4, 1000))  # over budget: b goes
    assert len(pc) == 2 and pc.nbytes == 2000
    assert pc.lookup([*b, 9]) == (0, None)
    assert pc.lookup([*a, 9])[0] == 4 and pc.lookup([*c, 9])[0] == 4
    pc.insert(a, fake_snapshot(4, 1000))  # replacing an entry does not count it twice
    assert pc.nbytes == 2000
    pc.insert([5] * 4, fake_snapshot(4, 4000))  # larger than the budget: not stored
    assert len(pc) == 2 and pc.nbytes == 2000
    # the longest stored prefix wins, and a whole-prompt match leaves one token to run
    pc.insert([*a, *c], fake_snapshot(8, 400))
    assert pc.lookup([*a, *c, 7])[0] == 8
    assert pc.lookup([*a, *c])[0] == 4


@pytest.mark.parametrize(
    ("tokens", "length"),
    [([1, 2, 3], 3), ([], 0), ([1] * 8, 4)],
    ids=["not-boundary", "empty", "length"],
)
def test_prefix_cache_insert_validation(tokens, length):
    with pytest.raises(ValueError, match="chunk_size=4"):
        PrefixCache(chunk_size=4).insert(tokens, fake_snapshot(length, 16))


def test_prefix_cache_constructor_validation():
    with pytest.raises(ValueError, match="chunk_size"):
        PrefixCache(chunk_size=0)


# ---------------------------------------------------------------------- batch changes


def three_row_cache(model: HybridLM) -> HybridCache:
    engine = Engine(model, prefill_chunk=8)
    return HybridCache.stack(
        [engine.prefill(random_ids(n, seed=40 + n).tolist())[0] for n in (5, 11, 8)]
    )


def test_reorder_permutes_states_kv_and_lengths():
    model = make_model()
    cache = three_row_cache(model)
    perm = [2, 0, 1]
    before = cache.snapshot()
    assert cache.reorder(perm) is cache
    assert cache.batch_size == 3
    for i, s in before.states.items():
        assert torch.equal(cache.states[i], s[perm])
    for i, k in before.keys.items():
        assert torch.equal(cache.keys[i][:, :, : cache.length], k[perm])
        assert torch.equal(cache.values[i][:, :, : cache.length], before.values[i][perm])
    assert cache.lengths == [before.lengths[i] for i in perm]
    with pytest.raises(ValueError, match="beam_idx"):
        cache.reorder([0, 1])


def test_select_shrinks_and_rows_keep_decoding():
    model = make_model()
    cache, ref = three_row_cache(model), three_row_cache(model)
    cache.select([2, 2])
    assert cache.batch_size == 2 and cache.lengths == [8, 8]
    assert all(s.shape[0] == 2 for s in cache.states.values())
    tok = torch.tensor([[7], [7], [7]])
    with torch.no_grad():
        out = model(tok[:2], cache=cache).logits[:, -1]
        out_ref = model(tok, cache=ref).logits[:, -1]
    assert_close(out, out_ref[[2, 2]], 1e-6, "selected rows")
    cache.select([1])
    assert cache.batch_size == 1 and cache.lengths == [9]  # row 2: 8 tokens + 1 decoded
    with pytest.raises(ValueError, match="indices"):
        cache.select([])
    with pytest.raises(ValueError, match="indices"):
        cache.select([1])


def test_reset_row_is_zeroed_and_restarts_at_position_zero():
    model = make_model()
    cache, untouched = three_row_cache(model), three_row_cache(model)
    cache.reset([1])
    for s in cache.states.values():
        assert not s[1].any() and s[0].any() and s[2].any()
    for kv in (cache.keys, cache.values):
        for t in kv.values():
            assert not t[1].any() and t[0].any()
    assert cache.seen.tolist() == [5, 0, 8]
    new = torch.tensor([[3, 9, 4], [100, 200, 300], [5, 6, 7]])
    with torch.no_grad():
        got = torch.cat([model(new[:, t : t + 1], cache=cache).logits for t in range(3)], 1)
        ref = torch.cat([model(new[:, t : t + 1], cache=untouched).logits for t in range(3)], 1)
        fresh = full_logits(model, new[1:2])  # a new sequence at positions 0, 1, 2
    assert_close(got[[0, 2]], ref[[0, 2]], 1e-6, "rows that were not reset")
    assert_close(got[1:2], fresh, 1e-5, "the reset row")


# ---------------------------------------------------------------------- memory and KV


def test_lightning_cache_memory_is_constant_over_10k_tokens():
    cfg = tiny(["lightning"])
    model = make_model(cfg)
    cache = HybridCache.for_model(model)
    tokens = random_ids(10_000, seed=50).view(-1, 1, 1)
    expected = cfg.num_layers * cfg.num_heads * cfg.head_dim**2 * 4  # fp32 [H, K, V] per layer
    with torch.no_grad():
        for step in range(10_000):
            model(tokens[step], cache=cache)
            if step + 1 == 10:
                at_10 = cache.memory_bytes()
                ptr_10 = cache.states[0].data_ptr()
    at_10k = cache.memory_bytes()
    assert cache.length == 10_000 and cache.seen.tolist() == [10_000]
    assert at_10["lightning"] == at_10k["lightning"] == expected
    assert at_10k["softmax_kv"] == 0 and at_10k["total"] == expected
    assert cache.states[0].data_ptr() == ptr_10  # the same buffer, updated in place
    assert torch.isfinite(cache.states[0]).all() and cache.states[0].any()


def test_crop_raises_a_clear_error():
    cache = HybridCache.for_model(make_model())
    with pytest.raises(ValueError, match=r"cannot be cropped.*snapshot"):
        cache.crop(3)


def test_kv_growth_keeps_earlier_entries():
    cfg = tiny()
    cache = HybridCache(cfg, batch_size=2)
    assert cache.capacity == 0
    g = torch.Generator().manual_seed(51)
    G, D = cfg.num_kv_heads, cfg.head_dim
    layer = cfg.layer_types.index("softmax")
    ks, vs = [], []
    for T in (200, 100, 300):  # past 256, then past 512
        k, v = torch.randn(2, T, G, D, generator=g), torch.randn(2, T, G, D, generator=g)
        old_capacity = cache.capacity
        keys, values = cache.append_kv(layer, k, v)
        cache.advance(T)
        ks.append(k)
        vs.append(v)
        assert cache.capacity >= max(cache.length, 2 * old_capacity)
        assert torch.equal(keys, torch.cat(ks, dim=1).transpose(1, 2))
        assert torch.equal(values, torch.cat(vs, dim=1).transpose(1, 2))
    assert cache.length == 600


def test_decode_across_kv_growth_matches_full_forward():
    model = make_model()
    ids = random_ids(262, seed=52)
    ref = full_logits(model, ids)
    cache = HybridCache.for_model(model)  # no slots reserved: grows at 256
    with torch.no_grad():
        model(ids[None, :250], cache=cache)
        assert cache.capacity == 256
        out = [model(ids[None, t : t + 1], cache=cache).logits for t in range(250, 262)]
    assert cache.capacity == 512
    assert_close(torch.cat(out, dim=1), ref[:, 250:], 1e-5, "decode across the growth")


# ---------------------------------------------------------------------- bad inputs


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine(make_model(), prefill_chunk=8)


@pytest.mark.parametrize(
    ("prompts", "match"),
    [
        ([], "at least one prompt"),
        ([[1, 2], []], r"prompts\[1\] is empty"),
        ([1, 512], r"prompts\[0\] must be token ids in \[0, vocab_size=512\)"),
        ([[3], [1, -1]], r"prompts\[1\] must be token ids in \[0, vocab_size=512\)"),
    ],
    ids=["no-prompts", "empty-prompt", "id-too-large", "id-negative"],
)
def test_generate_rejects_bad_prompts(engine, prompts, match):
    with pytest.raises(ValueError, match=match):
        engine.generate(prompts, SamplingParams(max_new_tokens=2))
    with pytest.raises(ValueError, match=match):
        next(engine.stream(prompts, SamplingParams(max_new_tokens=2)))


def test_prefill_rejects_empty_prompt(engine):
    with pytest.raises(ValueError, match="prompt is empty"):
        engine.prefill([])


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("max_new_tokens", 0, "max_new_tokens"),
        ("max_new_tokens", 2.0, "max_new_tokens"),
        ("temperature", -0.5, "temperature"),
        ("temperature", float("nan"), "temperature"),
        ("top_k", -1, "top_k"),
        ("top_p", 0.0, "top_p"),
        ("top_p", 1.5, "top_p"),
        ("repetition_penalty", 0.0, "repetition_penalty"),
        ("repetition_penalty", -1.0, "repetition_penalty"),
        ("stop_token_ids", [512], r"stop_token_ids must be in \[0, vocab_size=512\)"),
        ("stop_token_ids", [-1], "stop_token_ids"),
        ("stop", [""], "stop must be non-empty strings"),
    ],
)
def test_generate_rejects_bad_sampling_params(engine, field, value, match):
    params = dataclasses.replace(SamplingParams(max_new_tokens=2), **{field: value})
    with pytest.raises(ValueError, match=match):
        engine.generate([1, 2, 3], params)
    with pytest.raises(ValueError, match=match):
        params.validate(512)
    with pytest.raises(ValueError, match=match):  # at the call, before any token is asked for
        engine.stream([1, 2, 3], params)


def test_generate_rejects_more_tokens_than_max_position_embeddings():
    engine = Engine(make_model(tiny(max_position_embeddings=16)))
    prompt = list(range(10))
    with pytest.raises(ValueError, match="max_position_embeddings=16"):
        engine.generate(prompt, SamplingParams(max_new_tokens=7))
    assert len(engine.generate(prompt, SamplingParams(max_new_tokens=6))[0].token_ids) == 6
    cache = HybridCache.for_model(engine.model)
    with torch.no_grad():
        engine.model(torch.tensor([prompt]), cache=cache)
        with pytest.raises(ValueError, match="max_position_embeddings=16"):
            engine.model(torch.zeros(1, 7, dtype=torch.int64), cache=cache)


def test_stop_strings_and_text_prompts_need_a_tokenizer(engine):
    with pytest.raises(ValueError, match="stop strings need a tokenizer"):
        engine.generate([1, 2], SamplingParams(max_new_tokens=2, stop=["a"]))
    with pytest.raises(ValueError, match="text prompts need a tokenizer"):
        engine.generate("hello", SamplingParams(max_new_tokens=2))


def test_model_rejects_cache_of_other_batch_size(engine):
    cache = HybridCache.for_model(engine.model, batch_size=3)
    with pytest.raises(ValueError, match=r"input_ids must be \[B=3, T\]"):
        engine.model(torch.zeros(2, 4, dtype=torch.int64), cache=cache)


def test_cache_and_engine_constructor_validation(engine):
    with pytest.raises(ValueError, match="batch_size"):
        HybridCache(tiny(), batch_size=0)
    with pytest.raises(ValueError, match="prefill_chunk"):
        Engine(engine.model, prefill_chunk=0)
    with pytest.raises(ValueError, match="vocab_size=512"):
        Engine(engine.model, _BigTokenizer())
    two = HybridCache.for_model(engine.model, batch_size=2)
    with pytest.raises(ValueError, match="batch_size=1"):
        HybridCache.stack([two])
    with pytest.raises(ValueError, match="batch_size=2"):
        two.restore(HybridCache.for_model(engine.model).snapshot())


class _BigTokenizer(ByteTokenizer):
    vocab_size = 1000


# -------------------------------------------------------------------- stops and streaming


@pytest.fixture(scope="module")
def text_engine() -> Engine:
    """tiny with a 257-token vocabulary for the byte tokenizer; the LM head can only favour
    printable ASCII (other rows zeroed: their logits are 0, below the largest of 95 random
    ones), so greedy text is plain characters and never eos."""
    model = make_model(tiny(vocab_size=257))
    with torch.no_grad():
        printable = torch.zeros(257, dtype=torch.bool)
        printable[32:127] = True
        model.lm_head.weight[~printable] = 0.0
    return Engine(model, ByteTokenizer(), prefill_chunk=8)


GREEDY_TEXT = SamplingParams(max_new_tokens=24, repetition_penalty=1.5)


def test_greedy_text_is_the_decoded_tokens(text_engine):
    ref = text_engine.generate("The cache", GREEDY_TEXT)[0]
    assert ref.finish_reason == "length" and len(ref.token_ids) == 24
    assert ref.text == ByteTokenizer().decode(ref.token_ids)
    assert ref.prompt_tokens == len("The cache")


def test_stop_token_ids_end_generation(text_engine):
    ref = text_engine.generate("The cache", GREEDY_TEXT)[0]
    stop = ref.token_ids[2]
    end = ref.token_ids.index(stop) + 1  # its first occurrence
    params = dataclasses.replace(GREEDY_TEXT, stop_token_ids=[stop])
    out = text_engine.generate("The cache", params)[0]
    assert out.finish_reason == "stop"
    assert out.token_ids == ref.token_ids[:end]  # the stop token is kept ...
    assert out.text == ByteTokenizer().decode(ref.token_ids[: end - 1])  # ... not its text


@pytest.mark.parametrize("at", [3, 10], ids=["early", "late"])
def test_stop_string_cuts_text_right_before_it(text_engine, at):
    ref = text_engine.generate("The cache", GREEDY_TEXT)[0]
    stop = ref.text[at : at + 3]
    cut = ref.text.find(stop)
    params = dataclasses.replace(GREEDY_TEXT, stop=[stop, "not in the text \x00"])
    out = text_engine.generate("The cache", params)[0]
    assert out.finish_reason == "stop"
    assert out.text == ref.text[:cut]
    # generation ended with the token that completed the stop string
    assert out.token_ids == ref.token_ids[: cut + len(stop)]
    events = list(text_engine.stream("The cache", params))
    assert "".join(e.text for e in events) == out.text
    assert [e.token_id for e in events] == out.token_ids


def test_stream_events_concatenate_to_generate(text_engine):
    prompts = ["The cache", "A", "lightning layers"]
    params = SamplingParams(max_new_tokens=12, temperature=0.9, top_k=50, seed=3)
    results = text_engine.generate(prompts, params)
    events = list(text_engine.stream(prompts, params))
    for row, res in enumerate(results):
        mine = [e for e in events if e.row == row]
        assert "".join(e.text for e in mine) == res.text
        assert [e.token_id for e in mine] == res.token_ids
        assert [e.finish_reason for e in mine[:-1]] == [None] * (len(mine) - 1)
        assert mine[-1].finish_reason == res.finish_reason == "length"
        assert res.text == ByteTokenizer().decode(res.token_ids)


@pytest.mark.parametrize("temperature", [0.0, 1.0], ids=["greedy", "sampled"])
def test_generate_never_picks_ids_the_tokenizer_lacks(temperature):
    """tiny has 512 ids, the byte tokenizer 257: ids it cannot decode are never picked."""
    model = make_model()
    params = SamplingParams(max_new_tokens=24, temperature=temperature, seed=1, ignore_eos=True)
    plain = Engine(model, prefill_chunk=8).generate(list(b"The cache"), params)[0]
    assert max(plain.token_ids) >= 257  # without the tokenizer the model does pick them
    out = Engine(model, ByteTokenizer(), prefill_chunk=8).generate("The cache", params)[0]
    assert len(out.token_ids) == 24 and max(out.token_ids) < 257
    assert out.text == ByteTokenizer().decode(out.token_ids)


def test_unseeded_generation_leaves_global_rng_alone(engine):
    """Greedy generation with seed=None must not reseed torch's global generator."""
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    engine.generate([1, 2, 3], SamplingParams(max_new_tokens=2))
    assert torch.equal(torch.rand(4), expected)


# ---------------------------------------------------------------------- sampling


def random_logits(B: int = 4, V: int = 50, seed: int = 60) -> torch.Tensor:
    return torch.randn(B, V, generator=torch.Generator().manual_seed(seed)) * 3


@pytest.mark.parametrize("k", [1, 7, 49])
def test_top_k_keeps_exactly_k_largest(k):
    logits = random_logits()
    out = process_logits(logits, SamplingParams(temperature=1.0, top_k=k), None)
    finite = torch.isfinite(out)
    assert finite.sum(dim=-1).tolist() == [k] * 4
    top = torch.zeros_like(finite).scatter(-1, logits.topk(k, dim=-1).indices, True)
    assert torch.equal(finite, top)
    assert torch.equal(out[finite], logits[finite])
    assert torch.isfinite(
        process_logits(logits, SamplingParams(temperature=1.0, top_k=50), None)
    ).all()


@pytest.mark.parametrize("p", [1e-6, 0.3, 0.75, 0.95])
def test_top_p_keeps_smallest_prefix_reaching_p(p):
    logits = random_logits(seed=61)
    temperature = 0.7
    out = process_logits(logits, SamplingParams(temperature=temperature, top_p=p), None)
    probs = (logits.double() / temperature).softmax(dim=-1)
    for b in range(logits.shape[0]):
        sorted_p, order = probs[b].sort(descending=True)
        cum = sorted_p.cumsum(0)
        assert (cum - p).abs().min() > 1e-6, "p too close to a cumulative sum for fp32"
        m = int((cum < p).sum()) + 1  # smallest prefix whose mass reaches p
        kept = torch.zeros(logits.shape[1], dtype=torch.bool)
        kept[order[:m]] = True
        assert torch.equal(torch.isfinite(out[b]), kept), f"row {b}"
    assert_close(
        out[torch.isfinite(out)], (logits / temperature)[torch.isfinite(out)], 1e-7, "kept"
    )


def test_repetition_penalty_divides_positive_and_multiplies_negative():
    logits = random_logits(seed=62)
    presence = torch.rand(logits.shape, generator=torch.Generator().manual_seed(63)) < 0.4
    out = process_logits(logits, SamplingParams(repetition_penalty=1.5), presence)
    for b in range(logits.shape[0]):
        for j in range(logits.shape[1]):
            x = float(logits[b, j])
            want = (x / 1.5 if x > 0 else x * 1.5) if presence[b, j] else x
            assert float(out[b, j]) == pytest.approx(want, rel=1e-6, abs=1e-7), (b, j)
    assert torch.equal(process_logits(logits, SamplingParams(), presence), logits)


def test_greedy_is_argmax():
    logits = random_logits(seed=64)
    params = SamplingParams()
    processed = process_logits(logits, params, None)
    assert torch.equal(processed, logits)
    assert torch.equal(sample(processed, params, []), logits.argmax(dim=-1))


def test_seeded_sampling_is_reproducible_and_follows_the_distribution():
    logits = random_logits(B=1, V=6, seed=65) / 3
    params = SamplingParams(temperature=1.0, seed=0)
    processed = process_logits(logits, params, None)

    def draws(seed: int) -> list[int]:
        gen = [torch.Generator().manual_seed(seed)]
        return [int(sample(processed, params, gen)) for _ in range(20)]

    assert draws(5) == draws(5)
    assert draws(5) != draws(6)
    # 4000 rows, one generator each: the frequencies follow softmax(logits)
    n = 4000
    rows = processed.expand(n, -1)
    gens = [torch.Generator().manual_seed(i) for i in range(n)]
    freq = torch.bincount(sample(rows, params, gens), minlength=6) / n
    probs = processed.softmax(dim=-1)[0]
    assert (freq - probs).abs().max() < 0.03, (freq, probs)
    # with top_k, draws never leave the kept set
    topk = SamplingParams(temperature=1.0, top_k=2)
    kept = process_logits(logits, topk, None).expand(200, -1)
    picked = sample(kept, topk, gens[:200])
    assert set(picked.tolist()) <= set(logits.topk(2).indices[0].tolist())


@pytest.mark.parametrize("variant", ["hybrid", "window", "cosformer"])
def test_row_bytes_is_what_a_row_holds(variant):
    """The server's memory plan: a row's constant state, plus softmax KV per token."""
    cfg = tiny(VARIANTS[variant])
    constant, per_token = HybridCache.row_bytes(cfg, torch.float32)
    cache = HybridCache(cfg, batch_size=3, capacity=512)
    held = cache.memory_bytes()
    assert held["lightning"] + held["local_kv"] == 3 * constant
    assert held["softmax_kv"] == 3 * 512 * per_token
    softmax_layers = cfg.layer_types.count("softmax")
    assert per_token == 2 * softmax_layers * cfg.num_kv_heads * cfg.head_dim * 4
