"""One prompt prefilled with its tokens split across gloo ranks (`prefill_split`) leaves on
the destination rank what a single-process prefill of the whole prompt leaves: every
lightning state, every softmax layer's keys and values and the last logits (float64,
1e-10); greedy decoding from there gives `Engine`'s tokens for the whole prompt. Under
torchrun, `lightlong generate --sequence-parallel` prints what one process prints.
"""

from __future__ import annotations

import sys

import pytest
import torch
from conftest import assert_close, lightlong_cli
from test_parallel import gloo_group, model_and_row, spawn_ranks
from test_train import run_to_end

from lightlong.infer import Engine, HybridCache, SamplingParams, prefill_split
from lightlong.parallel import SequenceSplit

NEW = 6  # tokens decoded after the prompt
CASES = {  # preset, ranks' chunk lengths, rank that receives the cache
    "tiny-2-ranks": ("tiny", [37, 29], 0),
    "tiny-4-ranks-one-token-rank-to-rank-2": ("tiny", [13, 1, 30, 22], 2),
    "tiny-linear-4-ranks-one-token-rank": ("tiny-linear", [10, 1, 12, 9], 0),
    "tiny-2-ranks-one-token-last-rank-to-it": ("tiny", [25, 1], 1),
}


def rank_prefill(rank, world, rendezvous, preset, lengths, dst, out):
    torch.set_num_threads(1)
    with gloo_group(rank, world, rendezvous):
        model, ids, _ = model_and_row(preset, sum(lengths))
        split = SequenceSplit.of(lengths)
        got = prefill_split(model, ids[:, split.span], split, dst=dst)
        saved = {"got": got is not None}
        if got is not None:
            cache, logits = got
            saved |= {"states": cache.states, "keys": cache.keys, "values": cache.values,
                      "lengths": cache.lengths, "logits": logits}  # fmt: skip
            [gen] = Engine(model).generate(ids[0], SamplingParams(max_new_tokens=NEW),
                                           prefilled=[got])  # fmt: skip
            saved["tokens"] = gen.token_ids
        torch.save(saved, f"{out}/rank{rank}.pt")


@pytest.mark.timeout(180)
@pytest.mark.parametrize("case", list(CASES))
def test_split_prefill_equals_one_process(case, tmp_path):
    preset, lengths, dst = CASES[case]
    T = sum(lengths)
    results = spawn_ranks(rank_prefill, len(lengths), tmp_path, preset, lengths, dst, tmp_path,
                          timeout=150)  # fmt: skip
    assert [r["got"] for r in results] == [r == dst for r in range(len(lengths))]
    got = results[dst]

    model, ids, _ = model_and_row(preset, T)
    ref = HybridCache.for_model(model, 1)
    with torch.no_grad():
        logits = model(ids, cache=ref, logits_to_keep=1).logits[:, -1]
    assert got["lengths"] == [T]
    assert ref.states and set(got["states"]) == set(ref.states)
    for i, state in ref.states.items():
        assert_close(got["states"][i], state, 1e-10, f"layer {i}'s state")
    assert set(got["keys"]) == set(ref.keys) and bool(ref.keys) == (preset == "tiny")
    for i in ref.keys:
        assert_close(got["keys"][i][:, :, :T], ref.keys[i][:, :, :T], 1e-10, f"layer {i}'s keys")
        assert_close(got["values"][i][:, :, :T], ref.values[i][:, :, :T], 1e-10,
                     f"layer {i}'s values")  # fmt: skip
    assert_close(got["logits"], logits, 1e-10, "the last position's logits")
    [gen] = Engine(model).generate(ids[0], SamplingParams(max_new_tokens=NEW))
    assert got["tokens"] == gen.token_ids


def test_one_rank_and_bad_input(tmp_path):
    with gloo_group(0, 1, tmp_path / "rdv"):
        model, ids, _ = model_and_row("tiny", 6)
        split = SequenceSplit.even(6)
        assert split.lengths == (6,) and split.span == slice(0, 6)
        with pytest.raises(ValueError, match="num_tokens must give each of the 1 ranks"):
            SequenceSplit.even(0)
        with pytest.raises(ValueError, match=r"dst must be a rank .* in \[0, 1\), got 1"):
            prefill_split(model, ids, split, dst=1)
        with pytest.raises(ValueError, match=r"input_ids must be \[1, 6\]"):
            prefill_split(model, ids[:, :5], split)
        used = HybridCache.for_model(model, 1)
        model(ids[:, :2], cache=used)
        with pytest.raises(ValueError, match="a cache must be empty with batch_size=1"):
            model(ids, split=split, cache=used)
        with pytest.raises(ValueError, match="the row one document"):
            model(ids, split=SequenceSplit.of([6], [0, 2, 6]), cache=HybridCache.for_model(model))
        # one rank: the split prefill is the plain one
        cache, logits = prefill_split(model, ids, split)
        engine, params = Engine(model), SamplingParams(max_new_tokens=3)
        [plain] = engine.generate(ids[0], params)
        assert engine.generate(ids[0], params, prefilled=[(cache, logits)]) == [plain]
        # the engine decodes from what it is given, without running the prompt again
        other = prefill_split(model, ids.flip(1), split)
        [steered] = engine.generate(ids[0], params, prefilled=[other])
        assert engine.stats.prefill_tokens == 0
        assert steered.token_ids == engine.generate(ids[0].flip(0), params)[0].token_ids
        assert steered.token_ids != plain.token_ids
        with pytest.raises(ValueError, match="prefilled must have one entry per prompt"):
            engine.generate([ids[0], ids[0]], params, prefilled=[(cache, logits)])
        with pytest.raises(ValueError, match=r"prompt's 5 tokens, got rows of lengths \[6\]"):
            engine.generate(ids[0, :5], params, prefilled=[(cache, logits)])
        with pytest.raises(ValueError, match=r"prefilled logits must be \[1, 512\]"):
            engine.generate(ids[0], params, prefilled=[(cache, logits[0])])
        scored = SamplingParams(max_new_tokens=1, prompt_logprobs=1)
        with pytest.raises(ValueError, match="prompt_logprobs score the prompt as it runs"):
            engine.generate(ids[0], scored, prefilled=[(cache, logits)])


GENERATE = ["generate", "--model", "tiny", "--prompt", "The quick brown fox jumps over the lazy "
            "dog. " * 3, "--max-new-tokens", "8", "--ignore-eos"]  # fmt: skip


@pytest.mark.timeout(300)
def test_cli_under_torchrun_prints_what_one_process_prints(tmp_path):
    one = lightlong_cli(*GENERATE)
    assert one.returncode == 0, one.stderr
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
           "2", "-m", "lightlong", *GENERATE, "--sequence-parallel"]  # fmt: skip
    two = run_to_end(cmd, tmp_path)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout == one.stdout  # rank 0 alone prints; greedy: the same tokens
    stats = [line for line in two.stderr.splitlines() if "prompt tokens at" in line]
    assert len(stats) == 1 and stats[0].startswith("[135 prompt tokens"), two.stderr[-3000:]


def test_cli_sequence_parallel_needs_torchrun():
    out = lightlong_cli(*GENERATE, "--sequence-parallel")
    assert out.returncode == 2 and out.stdout == ""
    assert "--sequence-parallel: not launched by torchrun" in out.stderr
