"""The lm-evaluation-harness adapter, checked against full forwards without a cache, against
`Engine.generate`, and end to end through `lm_eval.simple_evaluate` on built-in task configs
fed local data (the Hugging Face hub is not needed).

# T tokens, V vocabulary
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")

import lm_eval
import lm_eval.tasks
import torch
from lm_eval.api.instance import Instance
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from lightlong.eval.harness import LightlongLM
from lightlong.infer import Engine, SamplingParams
from lightlong.model.source import load_model
from lightlong.tokenizer import ByteTokenizer

EOS = ByteTokenizer.eos_token_id
TOL = 1e-4  # fp32 sums of a few dozen log-probs, chunked cache path vs one full forward
BUILTIN_TASKS = Path(lm_eval.tasks.__file__).parent


@pytest.fixture(scope="module")
def ascii_model():
    """The tiny preset (seeded random weights) with an LM head that prefers ASCII bytes
    sharply, so greedy continuations are printable text and argmax has clear margins."""
    model = load_model("tiny", seed=0).eval()
    with torch.no_grad():
        model.lm_head.weight[:128] *= 20
        model.lm_head.weight[128:] = 0
    return model


def make_lm(model, **kwargs) -> LightlongLM:
    return LightlongLM(pretrained=model, prefill_chunk=16, **kwargs)


def requests(kind: str, args: list[tuple]) -> list[Instance]:
    return [Instance(kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


@torch.no_grad()
def reference_score(model, ids: list[int], n: int) -> tuple[float, bool]:
    """Log-probability of the last n of `ids` and whether each is the argmax, from one full
    forward without a cache (fp32)."""
    ids_T = torch.tensor(ids)
    logits_TV = model(ids_T[None]).logits[0, :-1].float()
    target_T = ids_T[1:]
    logprobs_T = torch.log_softmax(logits_TV, -1).gather(-1, target_T[:, None]).squeeze(-1)
    greedy_T = logits_TV.argmax(-1) == target_T
    return float(logprobs_T[-n:].sum()), bool(greedy_T[-n:].all())


@torch.no_grad()
def greedy_text(model, prompt: str, n: int) -> str:
    """n greedy bytes after `prompt`, one full forward per token."""
    ids = list(prompt.encode())
    for _ in range(n):
        ids.append(int(model(torch.tensor(ids)[None]).logits[0, -1].argmax()))
    out = ids[len(prompt.encode()) :]
    assert all(i < 128 for i in out), f"expected ASCII greedy bytes, got {out}"
    return bytes(out).decode()


def assert_logprob_close(actual: float, ref: float, name: str) -> None:
    err = abs(actual - ref) / max(1.0, abs(ref))
    assert err <= TOL, f"{name}: {actual} vs reference {ref}, relative error {err:.2e} > {TOL}"


def test_loglikelihood_matches_full_forward(ascii_model):
    lm = make_lm(ascii_model)
    greedy = greedy_text(ascii_model, "The answer is", 6)
    long_context = "A fairly long context that is longer than the prefill chunk. " * 2
    cases = [
        # (context, continuation, reference ids, continuation tokens scored)
        ("The quick brown", " fox jumps", b"The quick brown fox jumps", 10),
        # trailing whitespace of the context is scored as part of the continuation
        ("Answer:  ", "yes", b"Answer:  yes", 5),
        ("", "Hello", [EOS, *b"Hello"], 5),  # empty context: conditioned on eos
        ("The answer is", greedy, b"The answer is" + greedy.encode(), 6),
        (long_context, " end.", (long_context + " end.").encode(), 6),
    ]
    results = lm.loglikelihood(requests("loglikelihood", [c[:2] for c in cases]))
    assert len(results) == len(cases)
    for (context, cont, ids, n), (logprob, is_greedy) in zip(cases, results, strict=True):
        ref, ref_greedy = reference_score(ascii_model, list(ids), n)
        assert_logprob_close(logprob, ref, f"({context!r}, {cont!r})")
        assert is_greedy == ref_greedy, f"({context!r}, {cont!r}): is_greedy {is_greedy}"
    assert results[3][1] is True, "the model's own greedy continuation must be greedy"
    assert results[0][1] is False


def test_loglikelihood_left_truncates_to_max_length(ascii_model):
    lm = make_lm(ascii_model, max_length=32)
    context, cont = "0123456789" * 6, " tail"
    [(logprob, is_greedy)] = lm.loglikelihood(requests("loglikelihood", [(context, cont)]))
    # the model reads max_length tokens; the last of the max_length + 1 kept is only predicted
    ref, ref_greedy = reference_score(ascii_model, list((context + cont).encode())[-33:], 5)
    assert_logprob_close(logprob, ref, "truncated")
    assert is_greedy == ref_greedy
    with pytest.raises(ValueError, match="more than max_length=32"):
        lm.loglikelihood(requests("loglikelihood", [("x", "y" * 33)]))


def test_loglikelihood_rolling_matches_windows(ascii_model):
    text = "Rolling windows score every token exactly once, with as much context as fits. " * 2
    tokens = list(text.encode())
    lm = make_lm(ascii_model, max_length=64)
    windows = [
        make_disjoint_window(w)
        for w in get_rolling_token_windows(tokens, EOS, max_seq_len=64, context_len=1)
    ]
    assert len(windows) >= 3
    assert sum(len(cont) for _, cont in windows) == len(tokens)
    ref = sum(reference_score(ascii_model, ctx + cont, len(cont))[0] for ctx, cont in windows)

    whole = make_lm(ascii_model)  # max_length fits the text: one window, eos + text
    ref_whole, _ = reference_score(ascii_model, [EOS, *tokens], len(tokens))

    args = [(text,), ("",), ("Hi",)]
    short = reference_score(ascii_model, [EOS, *b"Hi"], 2)[0]
    got = lm.loglikelihood_rolling(requests("loglikelihood_rolling", args))
    assert_logprob_close(got[0], ref, "rolling, max_length 64")
    assert got[1] == 0.0
    assert_logprob_close(got[2], short, "rolling, short text")
    [got_whole] = whole.loglikelihood_rolling(requests("loglikelihood_rolling", [(text,)]))
    assert_logprob_close(got_whole, ref_whole, "rolling, one window")
    # windows with less context score the text differently: the windows really are used
    assert abs(got[0] - got_whole) > 1e-3


def test_generate_until_matches_engine(ascii_model):
    tok = ByteTokenizer()
    engine = Engine(ascii_model, tok, prefill_chunk=16)
    prompts = ["Once upon a time", "The weather today", "", "x" * 100, "In the beginning"]
    # stop strings taken from the middle of each greedy output, so cuts really happen
    free = [engine.generate(p or [EOS], SamplingParams(max_new_tokens=12))[0].text for p in prompts]
    assert all(len(t) == 12 for t in free), free
    greedy_a = {"until": [free[0][5:7]], "max_gen_toks": 12}
    greedy_b = {"until": free[1][4], "max_gen_toks": 12, "do_sample": False, "temperature": 0.7}
    sampled = {"max_gen_toks": 6, "do_sample": True, "temperature": 0.8, "top_k": 5, "top_p": 0.9}
    kwargs = [greedy_a, greedy_b, greedy_a, greedy_b, sampled]

    lm = make_lm(ascii_model, batch_size=2, max_length=64, seed=3)
    got = lm.generate_until(requests("generate_until", list(zip(prompts, kwargs, strict=True))))

    def cut(text: str, stops: list[str]) -> str:
        return min((text[: text.find(s)] for s in stops if s in text), key=len, default=text)

    expected = [
        cut(free[0], greedy_a["until"]),
        cut(free[1], [greedy_b["until"]]),
        cut(free[2], greedy_a["until"]),
        # 100-byte prompt left-truncated to max_length - max_gen_toks = 52 tokens
        cut(engine.generate("x" * 52, SamplingParams(max_new_tokens=12))[0].text, [free[1][4]]),
        engine.generate(
            prompts[4],
            SamplingParams(max_new_tokens=6, temperature=0.8, top_k=5, top_p=0.9, seed=3),
        )[0].text,
    ]
    assert got == expected
    assert len(got[0]) < 12 and len(got[1]) < 12, "the stop strings must cut the output"


def test_sampling_params_mapping(ascii_model):
    lm = make_lm(ascii_model, max_gen_toks=7)
    p = lm.sampling_params({"until": ["\n\n", ""]})
    assert (p.stop, p.max_new_tokens, p.temperature) == (["\n\n"], 7, 0.0)
    assert lm.sampling_params({"do_sample": True}).temperature == 1.0
    assert lm.sampling_params({"do_sample": False, "temperature": 0.5}).temperature == 0.0
    assert lm.sampling_params({"temperature": 0.5}).temperature == 0.5
    p = lm.sampling_params({"max_gen_toks": "5", "top_k": 3, "top_p": 0.5, "temperature": 1})
    assert (p.max_new_tokens, p.top_k, p.top_p) == (5, 3, 0.5)


def test_bad_input_is_rejected(ascii_model):
    lm = make_lm(ascii_model)
    bad = requests("generate_until", [("hi", {"until": ["."], "num_beams": 4, "penalty": 1})])
    with pytest.raises(ValueError, match=r"unsupported gen_kwargs \['num_beams', 'penalty'\]"):
        lm.generate_until(bad)
    with pytest.raises(ValueError, match="no_such_model"):
        LightlongLM(pretrained="no_such_model")
    with pytest.raises(ValueError, match=r"device 'cuda:99' is not available.*--device cpu"):
        LightlongLM(pretrained="tiny", device="cuda:99")
    with pytest.raises(ValueError, match="dtype"):
        LightlongLM(pretrained="tiny", dtype="float8")
    with pytest.raises(ValueError, match="max_length"):
        make_lm(ascii_model, max_length=ascii_model.config.max_position_embeddings + 1)
    with pytest.raises(ValueError, match="batch_size"):
        make_lm(ascii_model, batch_size="auto")
    with pytest.raises(ValueError, match="max_gen_toks=60"):
        make_lm(ascii_model, max_length=32).generate_until(
            requests("generate_until", [("hi", {"max_gen_toks": 60})])
        )


# -- built-in tasks on local data ------------------------------------------------------------

ARC_DOCS = [
    ("What is two plus two?", ["four", "five", "six"], "A"),
    ("What colour is a clear sky?", ["green", "blue", "red"], "B"),
    ("What does a cat say?", ["woof", "moo", "meow"], "C"),
    ("What is the opposite of hot?", ["cold", "warm"], "A"),
    ("Which is a fruit?", ["carrot", "apple", "potato", "onion"], "B"),
    ("Which animal barks?", ["cow", "dog"], "B"),
]
WIKI_PAGES = [
    "The cat sat on the mat and looked at the dog. The dog was asleep by the door.",
    "Hello world, once again.",
]


def write_local_tasks(root: Path) -> None:
    """arc_easy and wikitext, the built-in configs included as they are, with local JSONL
    data in place of their Hugging Face hub datasets."""
    letters = "ABCD"
    arc = [
        {"id": str(i), "question": q, "answerKey": key,
         "choices": {"text": choices, "label": list(letters[: len(choices)])}}
        for i, (q, choices, key) in enumerate(ARC_DOCS)
    ]  # fmt: skip
    (root / "arc.jsonl").write_text("".join(json.dumps(d) + "\n" for d in arc))
    (root / "wiki.jsonl").write_text("".join(json.dumps({"page": p}) + "\n" for p in WIKI_PAGES))
    for task, builtin, data in [
        ("arc_easy_local", "arc/arc_easy.yaml", "arc.jsonl"),
        ("wikitext_local", "wikitext/wikitext.yaml", "wiki.jsonl"),
    ]:
        (root / f"{task}.yaml").write_text(
            f"include: {BUILTIN_TASKS / builtin}\n"
            f"task: {task}\n"
            "tag: []\n"
            "dataset_path: json\n"
            "dataset_name: null\n"
            "dataset_kwargs:\n"
            f"  data_files: {{test: {root / data}}}\n"
            f"  cache_dir: {root / 'hf_cache'}\n"
            "training_split: null\n"
            "validation_split: null\n"
            "test_split: test\n"
        )


def independent_metrics(lm: LightlongLM) -> dict[str, float]:
    """acc and acc_norm of the arc docs, word_perplexity and bits_per_byte of the pages,
    from the adapter's loglikelihood calls and the metrics' definitions."""
    acc, acc_norm = [], []
    for question, choices, key in ARC_DOCS:
        args = [(f"Question: {question}\nAnswer:", f" {c}") for c in choices]
        lls = [ll for ll, _ in lm.loglikelihood(requests("loglikelihood", args))]
        gold = "ABCD".index(key)
        acc.append(max(range(len(lls)), key=lls.__getitem__) == gold)
        norm = [ll / len(c) for ll, c in zip(lls, choices, strict=True)]
        acc_norm.append(max(range(len(norm)), key=norm.__getitem__) == gold)
    total = sum(
        lm.loglikelihood_rolling(requests("loglikelihood_rolling", [(p,) for p in WIKI_PAGES]))
    )
    words = sum(len(p.split()) for p in WIKI_PAGES)
    nbytes = sum(len(p.encode()) for p in WIKI_PAGES)
    return {
        "acc": sum(acc) / len(acc),
        "acc_norm": sum(acc_norm) / len(acc_norm),
        "word_perplexity": math.exp(-total / words),
        "bits_per_byte": -total / nbytes / math.log(2),
    }


def test_runs_builtin_tasks_through_simple_evaluate(tmp_path):
    """Runs one built-in loglikelihood task (arc_easy's config) and one rolling task
    (wikitext's) on a tiny model when lm_eval is installed."""
    write_local_tasks(tmp_path)
    manager = lm_eval.tasks.TaskManager(include_path=str(tmp_path), include_defaults=False)
    # model by its registered name and a --model_args string: arguments arrive as strings
    out = lm_eval.simple_evaluate(
        model="lightlong",
        model_args="pretrained=tiny,max_length=48,prefill_chunk=16,dtype=float32,seed=0",
        tasks=["arc_easy_local", "wikitext_local"],
        task_manager=manager,
    )
    arc, wiki = out["results"]["arc_easy_local"], out["results"]["wikitext_local"]
    assert arc["sample_len"] == len(ARC_DOCS) and wiki["sample_len"] == len(WIKI_PAGES)
    assert 0.0 <= arc["acc,none"] <= 1.0 and 0.0 <= arc["acc_norm,none"] <= 1.0

    ref = independent_metrics(LightlongLM(pretrained="tiny", max_length=48, prefill_chunk=16))
    assert arc["acc,none"] == pytest.approx(ref["acc"], abs=1e-12)
    assert arc["acc_norm,none"] == pytest.approx(ref["acc_norm"], abs=1e-12)
    assert wiki["word_perplexity,none"] == pytest.approx(ref["word_perplexity"], rel=1e-6)
    assert wiki["bits_per_byte,none"] == pytest.approx(ref["bits_per_byte"], rel=1e-6)
    # random weights: about log2(512) = 9 bits per byte
    assert 7.0 < wiki["bits_per_byte,none"] < 11.0


@pytest.mark.slow
def test_cli_runs_a_task(tmp_path):
    """`python -m lightlong.eval.harness` registers "lightlong" for lm_eval's CLI (slow: the
    CLI indexes every built-in task)."""
    write_local_tasks(tmp_path)
    cmd = [
        sys.executable, "-m", "lightlong.eval.harness", "run", "--model", "lightlong",
        "--model_args", "pretrained=tiny,max_length=48", "--tasks", "arc_easy_local",
        "--include_path", str(tmp_path), "--output_path", str(tmp_path / "out"), "--device", "cpu",
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [result] = (tmp_path / "out").rglob("results_*.json")
    acc = json.loads(result.read_text())["results"]["arc_easy_local"]["acc,none"]
    ref = independent_metrics(LightlongLM(pretrained="tiny", max_length=48))
    assert acc == pytest.approx(ref["acc"], abs=1e-12)
