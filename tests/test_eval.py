"""Long-context evaluation: generators (depth, length, seeds), scoring (oracle, empty,
partial), MR-NIAH files, perplexity by position, the heatmap, the CLI, bad data files."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import matplotlib
import numpy as np
import pytest
import torch
from conftest import lightlong_cli

from lightlong.eval import mrniah, runner, text
from lightlong.eval.logprobs import token_logprobs
from lightlong.eval.perplexity import documents, perplexity_by_position, position_bins
from lightlong.eval.runner import EvalConfig, evaluate, oracle_generate, run_eval
from lightlong.eval.tasks import (
    NeedleTask,
    string_match_all,
    string_match_part,
)
from lightlong.model.source import load_model
from lightlong.tokenizer import ByteTokenizer, train_bpe

MRNIAH_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "mr-niah"
GENERATION = runner.GENERATION_TASKS


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    """A byte-level BPE trained on generated haystack text (so words merge into tokens)."""
    d = tmp_path_factory.mktemp("bpe")
    rng = np.random.default_rng(0)
    stream = text.generated_sentences(rng)
    (d / "corpus.txt").write_text(" ".join(next(stream) for _ in range(3000)))
    return train_bpe([d / "corpus.txt"], 600, d / "tok")


@pytest.fixture(params=["bytes", "bpe"])
def tokenizer(request, bpe):
    return ByteTokenizer() if request.param == "bytes" else bpe


def task(name: str, haystack="generated"):
    return runner.make_task(name, EvalConfig(model="oracle", haystack=haystack))


# -- generators ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", GENERATION)
@pytest.mark.parametrize("length", [1500, 4096, 20000])
def test_prompt_length_within_two_percent(name, length, tokenizer):
    t = task(name)
    s = t.sample(tokenizer, length, seed=3, depth=0.5 if t.uses_depth else None)
    n = len(tokenizer.encode(s.prompt))
    assert s.prompt_tokens == n
    assert abs(n - length) <= 0.02 * length, f"{name}: {n} tokens for a target of {length}"


def _depth_of(prompt: str, head_end: int, tail_start: int, target: str, others: list[str],
              tokenizer) -> tuple[float, int]:  # fmt: skip
    """(fraction of haystack tokens before `target`, tokens of the longest haystack piece)."""
    context = prompt[head_end:tail_start]
    for o in others:
        context = context.replace(o, "")
    i = context.index(target)
    before, after = context[:i], context[i + len(target) :]
    nb, na = len(tokenizer.encode(before)), len(tokenizer.encode(after))
    return nb / (nb + na), nb + na


@pytest.mark.parametrize("name", ["niah", "niah_single", "niah_multikey"])
@pytest.mark.parametrize("depth", [0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0])
def test_needle_is_at_its_depth(name, depth, tokenizer):
    t = task(name)
    s = t.sample(tokenizer, 8192, seed=5, depth=depth)
    target, others = s.meta["needles"][0], s.meta["needles"][1:]
    assert s.references[0] in target  # the first needle is the one asked about
    head_end = s.prompt.index("\n") + 1
    tail_start = s.prompt.rindex("\n")
    measured, haystack = _depth_of(s.prompt, head_end, tail_start, target, others, tokenizer)
    # Needles go at the sentence boundary nearest to the depth: off by half a sentence.
    sentences = s.prompt[head_end:tail_start].split(". ")
    longest = max(len(tokenizer.encode(x + ". ")) for x in sentences)
    assert abs(measured - depth) <= (longest / 2 + 1) / haystack, (measured, depth)


@pytest.mark.parametrize("depth", [0.25, 0.5, 0.75])
def test_mr_niah_needle_at_its_depth_and_the_question_matches(depth, tokenizer):
    t = task("mr_niah")
    s = t.sample(tokenizer, 16384, seed=7, depth=depth)
    answer = s.answer.strip()
    assert s.prompt.count(answer) == 1
    head_end = s.prompt.index("\n\n") + 2
    tail_start = s.prompt.rindex("\n\nUser:")
    target, others = s.meta["needles"][0], s.meta["needles"][1:]
    assert target.endswith(answer)
    measured, haystack = _depth_of(s.prompt, head_end, tail_start, target, others, tokenizer)
    longest = max(len(tokenizer.encode(x)) for x in s.prompt[head_end:tail_start].split("User:"))
    assert abs(measured - depth) <= (longest / 2 + 2) / haystack, (measured, depth)
    # The asked-for answer is the first or second of two answers to the same request, as
    # the question says.
    request = s.prompt[: s.prompt.index(answer)].rsplit("User: ", 1)[1].split("\n")[0]
    positions = [i for i in range(len(s.prompt)) if s.prompt.startswith("User: " + request, i)]
    assert len(positions) == 2
    mine = s.prompt[: s.prompt.index(answer)].rindex("User: " + request)
    assert s.meta["ordinal"] == ("first" if mine == positions[0] else "second")
    assert s.meta["query"] in s.prompt[tail_start:]


@pytest.mark.parametrize("name", GENERATION)
def test_same_seed_same_sample_other_seed_other_sample(name):
    t, tok = task(name), ByteTokenizer()
    d = 0.25 if t.uses_depth else None
    a, b = t.sample(tok, 2048, seed=11, depth=d), t.sample(tok, 2048, seed=11, depth=d)
    c = t.sample(tok, 2048, seed=12, depth=d)
    assert a == b
    assert c.prompt != a.prompt and c.references != a.references


def test_haystack_files_are_used(tmp_path):
    f = tmp_path / "essay.txt"
    f.write_text("Zebras graze at noon. " * 50 + "Owls hunt at night. " * 50)
    s = task("niah", [str(f)]).sample(ByteTokenizer(), 2048, seed=0, depth=0.5)
    assert "Zebras graze at noon." in s.prompt and "Owls hunt at night." in s.prompt
    assert "The grass is green" not in s.prompt


def test_too_short_length_is_a_clear_error():
    with pytest.raises(ValueError, match=r"length 200 is too short"):
        task("niah_multiquery").sample(ByteTokenizer(), 200, seed=0)
    with pytest.raises(ValueError, match=r"depth must be in \[0, 1\]"):
        task("niah").sample(ByteTokenizer(), 2048, seed=0, depth=1.5)
    with pytest.raises(ValueError, match="does not take a depth"):
        task("common_words").sample(ByteTokenizer(), 2048, seed=0, depth=0.5)


def test_rarer_words_are_strictly_rarer():
    tok = ByteTokenizer()
    for name in ("common_words", "frequent_words"):
        s = task(name).sample(tok, 8192, seed=2)
        body = s.prompt.split("\n")[1]
        words = [w for w in body.split() if w.isalpha()]
        counts = {w: words.count(w) for w in set(words)}
        top = sorted(counts.values(), reverse=True)[len(s.references)]
        assert min(counts[r] for r in s.references) > top, name


def test_variable_tracking_chain_is_consistent():
    s = task("variable_tracking").sample(ByteTokenizer(), 4096, seed=4)
    value = s.meta["value"]
    bound = {}
    for name, rhs in ((m[0], m[1]) for m in _assignments(s.prompt)):
        bound[name] = bound.get(rhs, rhs)
    assert sorted(n for n, v in bound.items() if v == value) == sorted(s.references)


def _assignments(prompt: str):
    import re

    for m in re.finditer(r"VAR ([A-Z]{5}) = (?:VAR )?([A-Z]{5}|\d+)\.", prompt):
        yield m.group(1), m.group(2)


# -- scoring -------------------------------------------------------------------------------


def test_string_match_metrics():
    refs = ["1234567", "7654321", "5555555", "abc"]
    assert string_match_all("the numbers: 1234567 and 5555555", refs) == 0.5
    assert string_match_all("ABC 1234567 7654321 5555555", refs) == 1.0
    assert string_match_part("only 7654321", refs) == 1.0
    assert string_match_part("none of them", refs) == 0.0


@pytest.mark.parametrize(
    "answer, items",
    [
        ("1. Apple\n2. Banana", ["Apple", "Banana"]),
        ("Vast and blue, waves surging, cradle of life.", ["Vast and blue", "waves surging",
                                                          "cradle of life"]),
        ("- red\n* green\n3) blue", ["red", "green", "blue"]),
        ("体型小巧，羽毛灰褐，\n喜欢在城市中觅食。", ["体型小巧", "羽毛灰褐", "喜欢在城市中觅食"]),
    ],
)  # fmt: skip
def test_key_items_rule(answer, items):
    assert mrniah.key_items(answer) == items


def test_adjusted_recall_partial_credit_and_refusal():
    poem = "Line one here,\nline two here,\nline three here,\nline four here."
    assert mrniah.adjusted_recall(poem, poem) == 1.0
    assert mrniah.adjusted_recall("LINE ONE   here\nline two here", poem) == 0.5
    assert mrniah.adjusted_recall("line four here", poem) == 0.25
    assert mrniah.adjusted_recall("", poem) == 0.0
    assert mrniah.adjusted_recall("Sorry, " + poem, poem) == 0.0
    assert mrniah.adjusted_recall("抱歉，" + poem, poem) == 0.0
    assert mrniah.adjusted_recall("There is no previous conversation.", poem) == 0.0


@pytest.mark.parametrize("name", GENERATION)
def test_oracle_scores_one_and_empty_scores_zero(name):
    t, tok = task(name), ByteTokenizer()
    samples = runner.make_samples(t, EvalConfig(model="oracle", lengths=[1200, 3000],
                                                depths=[0.0, 1.0], samples=2), tok)  # fmt: skip
    assert [r["score"] for r in evaluate(t, samples, oracle_generate)] == [1.0] * len(samples)
    empty = evaluate(t, samples, lambda batch, task: [""] * len(batch))
    assert [r["score"] for r in empty] == [0.0] * len(samples)


def test_partial_answers_get_partial_credit():
    t, tok = task("niah_multivalue"), ByteTokenizer()
    s = t.sample(tok, 2048, seed=0)
    assert len(s.references) == 4
    assert t.score(s, f" {s.references[0]}, {s.references[2]}") == 0.5
    t = task("mr_niah")
    s = t.sample(tok, 2048, seed=1, depth=0.5)
    items = mrniah.key_items(s.answer)
    assert t.score(s, items[0]) == pytest.approx(1 / len(items))


def test_oracle_scores_one_on_every_task_through_the_cli(tmp_path):
    proc = lightlong_cli("eval", "all", "--model", "oracle", "--lengths", "1500", "3000",
                         "--depths", "0", "0.5", "1", "--samples", "1",
                         "--out-dir", str(tmp_path))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(summary["tasks"]) == set(GENERATION)  # perplexity needs a model
    for name, t in summary["tasks"].items():
        assert t["score"] == 1.0, name
        report = json.loads((tmp_path / f"{name}.json").read_text())
        assert all(r["score"] == 1.0 for r in report["records"])
        assert (tmp_path / f"{name}.png").stat().st_size > 0
    assert "| niah | match_all | 1.000 |" in (tmp_path / "summary.md").read_text()


# -- MR-NIAH files -------------------------------------------------------------------------

needs_mrniah = pytest.mark.skipif(
    not MRNIAH_DATA.is_dir(), reason="../shared/data/mr-niah is not present"
)


@needs_mrniah
def test_published_mr_niah_files_run_as_they_are():
    files = sorted(MRNIAH_DATA.glob("*/*_tokens.jsonl"))
    assert len(files) == 4
    samples = mrniah.file_samples(files, ByteTokenizer())
    assert len(samples) == 120
    assert {s.length for s in samples} == {2048, 10240}
    for f in files:  # each file cycles the target through the three needle slots
        depths = [s.depth for s in samples if s.meta["file"] == str(f)]
        assert sorted(set(depths)) == [0.25, 0.5, 0.75]
        assert all(depths.count(d) == 10 for d in set(depths))
    t = mrniah.MRNIAH()
    for s in samples:
        assert s.prompt.endswith("Assistant:") and s.answer in s.prompt
        assert t.score(s, s.answer) == 1.0
        assert t.score(s, "抱歉，我不记得。" + s.answer) == 0.0
    # Another row's answer scores below 1 (the labels are distinct).
    a, b = samples[0], next(s for s in samples[:30] if s.answer != samples[0].answer)
    assert t.score(a, b.answer) < 1.0


@needs_mrniah
def test_mr_niah_files_through_the_runner(tmp_path):
    files = [str(f) for f in sorted(MRNIAH_DATA.glob("english/*_tokens.jsonl"))]
    cfg = EvalConfig(model="oracle", data=files, out_dir=str(tmp_path))
    report = run_eval("mr_niah", cfg, quiet=True)
    assert report["score"] == 1.0
    assert set(report["by_length"]) == {"2048", "10240"}
    assert set(report["by_depth"]) == {"0.25", "0.5", "0.75"}
    assert report["by_file"] == dict.fromkeys(files, 1.0)
    assert len(report["records"]) == 60


# -- bad data files ------------------------------------------------------------------------

GOOD_ROW = {"messages": [{"role": "user", "content": "Write a list"},
                         {"role": "assistant", "content": "1. A\n2. B"},
                         {"role": "user", "content": "Please repeat the list"}],
            "label": "1. A\n2. B", "length_class": 2048}  # fmt: skip


@pytest.mark.parametrize(
    "bad, message",
    [
        ("{not json", r"not valid JSON"),
        ("[1, 2]", r"expected a JSON object"),
        (json.dumps({**GOOD_ROW, "messages": []}), r"'messages' must be a non-empty list"),
        (json.dumps({**GOOD_ROW, "messages": [{"role": "bot", "content": "x"}]}),
         r"messages\[0\] must be"),
        (json.dumps({**GOOD_ROW, "messages": GOOD_ROW["messages"][:2]}), r"last message"),
        (json.dumps({**GOOD_ROW, "label": 3}), r"'label' must be a string"),
        (json.dumps({**GOOD_ROW, "label": " ,. "}), r"at least one key item"),
        (json.dumps({**GOOD_ROW, "length_class": "long"}), r"'length_class'"),
    ],
)  # fmt: skip
def test_malformed_mr_niah_file_names_file_and_line(tmp_path, bad, message):
    f = tmp_path / "rows.jsonl"
    f.write_text(json.dumps(GOOD_ROW) + "\n\n" + bad + "\n")
    with pytest.raises(ValueError, match=rf"{f}:3: .*{message}"):
        mrniah.load_rows(f)


def test_malformed_files_through_the_cli(tmp_path):
    f = tmp_path / "rows.jsonl"
    f.write_text(json.dumps(GOOD_ROW) + "\n" + '{"messages": 1}\n')
    proc = lightlong_cli("eval", "mr_niah", "--model", "oracle", "--data", str(f),
                         "--out-dir", str(tmp_path / "out"))  # fmt: skip
    assert proc.returncode == 2
    assert f"{f}:2: 'messages' must be a non-empty list" in proc.stderr
    docs = tmp_path / "docs.jsonl"
    docs.write_text('{"text": "fine"}\n{"txt": "wrong key"}\n')
    proc = lightlong_cli("eval", "perplexity", "--model", "tiny", "--data", str(docs),
                         "--out-dir", str(tmp_path / "out"))  # fmt: skip
    assert proc.returncode == 2 and f"{docs}:2:" in proc.stderr
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("caf\xe9 au lait. ".encode("latin-1") * 10)
    proc = lightlong_cli("eval", "niah", "--model", "oracle", "--haystack", str(latin),
                         "--out-dir", str(tmp_path / "out"))  # fmt: skip
    assert proc.returncode == 2 and f"haystack file {latin}" in proc.stderr
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ValueError, match=rf"{empty}: no rows"):
        mrniah.load_rows(empty)


def test_cli_rejects_bad_arguments(tmp_path):
    proc = lightlong_cli("eval", "niah", "--model", "oracle", "--lengths", "1",
                         "--out-dir", str(tmp_path))  # fmt: skip
    assert proc.returncode == 2 and "lengths must be token counts >= 2" in proc.stderr
    proc = lightlong_cli("eval", "nope", "--model", "oracle")
    assert proc.returncode == 2 and "invalid choice: 'nope'" in proc.stderr
    proc = lightlong_cli("eval", "perplexity", "--model", "oracle", "--out-dir", str(tmp_path))
    assert proc.returncode == 2 and "perplexity needs a model" in proc.stderr
    proc = lightlong_cli("eval", "niah", "--model", str(tmp_path))
    assert proc.returncode == 2 and "no config.json and no complete step-N" in proc.stderr


# -- perplexity ----------------------------------------------------------------------------


def test_token_logprobs_equal_one_forward():
    model = load_model("tiny").eval()
    ids = torch.randint(0, 512, (301,), generator=torch.Generator().manual_seed(0))
    logprobs, greedy = token_logprobs(model, ids, chunk=64)
    with torch.no_grad():
        logits = model(ids[None]).logits[0, :-1].float()
    ref = torch.log_softmax(logits, -1).gather(-1, ids[1:, None]).squeeze(-1)
    torch.testing.assert_close(logprobs, ref, atol=1e-4, rtol=0)
    assert torch.equal(greedy, logits.argmax(-1) == ids[1:])
    with pytest.raises(ValueError, match="at least 2 tokens"):
        token_logprobs(model, [3])
    with pytest.raises(ValueError, match=r"token ids in \[0, vocab_size=512\)"):
        token_logprobs(model, [3, 512])


def test_perplexity_by_position_is_the_mean_loss_per_bin():
    model = load_model("tiny").eval()
    g = torch.Generator().manual_seed(1)
    docs = [torch.randint(0, 512, (n,), generator=g).tolist() for n in (200, 120)]
    result = perplexity_by_position(model, docs, chunk=50)
    losses = np.full((2, 200), np.nan)
    for i, d in enumerate(docs):
        with torch.no_grad():
            logits = model(torch.tensor(d)[None]).logits[0, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits, torch.tensor(d[1:]), reduction="none")
        losses[i, 1 : len(d)] = nll.numpy()
    edges = position_bins(200)
    assert edges[0] == 1 and edges[-1] == 200 and np.all(np.diff(edges) > 0)
    assert result["bins"] == [[int(a), int(b)] for a, b in itertools.pairwise(edges)]
    for (a, b), loss, n in zip(result["bins"], result["loss"], result["tokens"], strict=True):
        cell = losses[:, a:b]
        assert n == np.isfinite(cell).sum()
        assert loss == pytest.approx(np.nanmean(cell), abs=1e-4)
    assert result["loss_all"] == pytest.approx(np.nanmean(losses[:, 1:]), abs=1e-4)
    assert result["perplexity"] == pytest.approx(np.exp(result["loss_all"]))


def test_perplexity_documents_from_files_and_generated(tmp_path):
    tok = ByteTokenizer()
    (tmp_path / "a.txt").write_text("x" * 500)
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "y" * 50}) + "\n")
    docs = documents(tok, 300, 5, files=[tmp_path / "b.jsonl", tmp_path / "a.txt"])
    assert [len(d) for d in docs] == [300, 50]  # truncated, longest first
    gen = documents(tok, 300, 2, seed=3)
    assert all(290 <= len(d) <= 300 for d in gen) and gen[0] != gen[1]
    assert gen == documents(tok, 300, 2, seed=3)


# -- a trained model, the engine, the heatmap ----------------------------------------------


def _heatmap_cells(png: Path, depths: int, lengths: int) -> np.ndarray:
    """Reads the heatmap's cell colours back to scores through the colour map's inverse."""
    image = matplotlib.image.imread(png)[..., :3]
    rows, cols = image.shape[:2]
    fig_w, fig_h = runner.HEATMAP_FIGSIZE
    assert (cols, rows) == (round(fig_w * runner.HEATMAP_DPI), round(fig_h * runner.HEATMAP_DPI))
    left, bottom, width, height = runner.HEATMAP_AXES
    lut = matplotlib.colormaps[runner.HEATMAP_CMAP](np.linspace(0, 1, 256))[:, :3]
    out = np.empty((depths, lengths))
    for i in range(depths):
        for j in range(lengths):
            # A point in the cell's upper part, clear of the number printed at its centre.
            x = (left + width * (j + 0.5) / lengths) * cols
            y = (1 - bottom - height + height * (i + 0.15) / depths) * rows
            rgb = image[int(y), int(x)]
            out[i, j] = np.argmin(((lut - rgb) ** 2).sum(-1)) / 255
    return out


def test_heatmap_cells_match_json(tmp_path):
    """Scores that differ by cell (a fake model that answers only some samples) are read back
    from the PNG in the right place."""
    t, tok = task("niah"), ByteTokenizer()
    cfg = EvalConfig(model="fake", lengths=[1200, 2400, 4800], depths=[0.0, 0.5, 1.0],
                     samples=4)  # fmt: skip
    samples = runner.make_samples(t, cfg, tok)

    def fake(batch, task):  # right for a share of samples that grows with length and depth
        return [s.answer if (s.seed % 4) < (s.length // 1200 + 2 * s.depth) else ""
                for s in batch]  # fmt: skip

    records = evaluate(t, samples, fake)
    report = {"task": "niah", "model": "fake", "metric": t.metric, "uses_depth": True,
              "config": {"train_length": 0}, **runner.summarize(records)}  # fmt: skip
    runner.plot_report(report, tmp_path / "niah.png")
    m = runner.heatmap_matrix(report)[2]
    assert len(set(m.flatten().tolist())) >= 3  # the check below can tell cells apart
    np.testing.assert_allclose(_heatmap_cells(tmp_path / "niah.png", 3, 3), m, atol=0.01)


def test_trained_demo_model_niah_heatmap_matches_its_json(tmp_path):
    from lightlong.train.demo import DemoConfig, run_demo

    run_demo(DemoConfig(presets=["tiny"], steps=20, batch_size=4, eval_batches=1,
                        length_factors=[1], out_dir=str(tmp_path / "demo")))  # fmt: skip
    proc = lightlong_cli("eval", "niah", "--model", str(tmp_path / "demo" / "tiny"),
                         "--lengths", "600", "1200", "--depths", "0", "0.5", "1",
                         "--samples", "2", "--out-dir", str(tmp_path / "eval"))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "niah: 100%" in proc.stderr  # the progress bar
    report = json.loads((tmp_path / "eval" / "niah.json").read_text())
    assert len(report["records"]) == 12
    for c in report["cells"]:
        rs = [
            r for r in report["records"] if (r["length"], r["depth"]) == (c["length"], c["depth"])
        ]
        assert c["score"] == pytest.approx(np.mean([r["score"] for r in rs]))
    lengths, depths, m = runner.heatmap_matrix(report)
    assert (lengths, depths) == ([600, 1200], [0.0, 0.5, 1.0])
    np.testing.assert_allclose(_heatmap_cells(tmp_path / "eval" / "niah.png", 3, 2), m,
                               atol=0.01)  # fmt: skip


def test_engine_outputs_are_the_models_greedy_continuations():
    from lightlong.infer import Engine

    model, tok = load_model("tiny"), ByteTokenizer()
    t = NeedleTask("niah", "generated")
    samples = [t.sample(tok, n, seed=i, depth=0.5) for i, n in enumerate([700, 900, 1100])]
    engine = Engine(model, tok, prefill_chunk=256)
    outputs = runner.engine_generate(engine, batch_size=2, max_new_tokens=12)(samples, t)
    for s, out in zip(samples, outputs, strict=True):
        ids = tok.encode(s.prompt)
        with torch.no_grad():  # greedy by full forwards over the tokenizer's ids, to eos
            for _ in range(12):
                ids.append(int(model(torch.tensor([ids])).logits[0, -1, : tok.vocab_size].argmax()))
                if ids[-1] == tok.eos_token_id:
                    break
        expected = tok.decode(ids[len(tok.encode(s.prompt)) :]).split("\n")[0]
        assert out == expected
