"""Continuous batching below HTTP: the runner's rows joining and leaving mid-decode, the
scheduler's prefill budget, forks of one prefill, aborts, per-row sampling.

Every output is compared with the same prompt run alone through `Engine`.
"""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close
from test_infer import LINEAGE, VARIANTS, make_model, random_ids, tiny

from lightlong.infer import Engine, HybridCache, PrefixCache, Runner, SamplingParams
from lightlong.infer.sampling import process_logits, token_logprobs
from lightlong.serve.scheduler import QueueFull, Request, Scheduler

GREEDY = SamplingParams(max_new_tokens=8, ignore_eos=True)


def alone(model, prompt: list[int], params: SamplingParams = GREEDY) -> list[int]:
    return Engine(model, prefill_chunk=16).generate(prompt, params)[0].token_ids


def drain(runner: Runner, outputs: dict, steps: int | None = None) -> None:
    """Steps the runner (all of it, or `steps` times), collecting tokens per seq."""
    n = 0
    while runner.running and (steps is None or n < steps):
        for seq, ev in runner.step():
            outputs.setdefault(seq, []).append(ev.token_id)
        n += 1


@pytest.mark.parametrize("variant", ["hybrid", "softmax", *LINEAGE])
def test_rows_joining_mid_decode_match_each_prompt_alone(variant):
    """Sequences admitted at different steps, leaving at different steps (rows move when
    one in the middle leaves), give what each gives alone."""
    model = make_model(tiny(VARIANTS[variant]))
    runner = Runner(model, max_num_seqs=3, prefill_chunk=7)
    prompts = [random_ids(n, seed=60 + n).tolist() for n in (5, 23, 1, 40, 12)]
    lengths = [3, 9, 6, 8, 5]  # the first leaves early, from the middle of the pool later
    seqs = [
        runner.new_seq(p, SamplingParams(max_new_tokens=m, ignore_eos=True), seed=0, index=i)
        for i, (p, m) in enumerate(zip(prompts, lengths, strict=True))
    ]
    outputs: dict = {}
    pending = list(seqs)
    while pending or runner.running:
        while pending and len(runner.running) < runner.max_num_seqs:
            seq = pending.pop(0)
            while not seq.ready:
                runner.prefill(seq, 7)
            runner.admit(seq)
            drain(runner, outputs, steps=1)  # one step between admissions
        drain(runner, outputs, steps=2)
    for seq, p, m in zip(seqs, prompts, lengths, strict=True):
        expected = alone(model, p, SamplingParams(max_new_tokens=m, ignore_eos=True))
        assert outputs[seq] == expected, f"prompt of {len(p)} tokens"
    assert runner.cache.batch_size == 0


def test_forks_share_one_prefill_and_sample_on_their_own_seeds():
    model = make_model()
    runner = Runner(model, max_num_seqs=4)
    prompt = random_ids(30, seed=70).tolist()
    params = SamplingParams(max_new_tokens=10, temperature=1.0, ignore_eos=True)
    lead, *forks = [runner.new_seq(prompt, params, seed=s, index=s) for s in (1, 2, 3)]
    assert runner.prefill(lead, 10_000) == 30
    for f in forks:
        runner.admit(f, source=lead)
    runner.admit(lead)
    assert runner.stats.prefill_tokens == 30  # one prefill for three rows
    outputs: dict = {}
    drain(runner, outputs)
    for seq in (lead, *forks):
        ref = Engine(model).generate(prompt, SamplingParams(**{**vars(params), "seed": seq.index}))
        assert outputs[seq] == ref[0].token_ids
    assert len({tuple(o) for o in outputs.values()}) == 3
    with pytest.raises(ValueError, match="same prompt"):
        other = runner.new_seq([1, 2], params, seed=0)
        runner.admit(other, source=lead)


def test_release_frees_the_row_and_a_new_sequence_there_starts_fresh():
    model = make_model()
    runner = Runner(model, max_num_seqs=2)
    a, b = (runner.new_seq(random_ids(20, seed=s).tolist(), GREEDY, seed=0) for s in (71, 72))
    for seq in (a, b):
        runner.prefill(seq, 100)
        runner.admit(seq)
    outputs: dict = {}
    drain(runner, outputs, steps=3)
    runner.release(a)  # a row in the middle of its output
    assert runner.running == [b] and runner.cache.batch_size == 1
    c_prompt = random_ids(9, seed=73).tolist()
    c = runner.new_seq(c_prompt, GREEDY, seed=0)
    runner.prefill(c, 100)
    runner.admit(c)
    drain(runner, outputs)
    assert outputs[c] == alone(model, c_prompt)
    assert outputs[b] == alone(model, b.prompt)


def test_cache_insert_zeroes_what_the_row_held_before():
    model = make_model()
    pool = HybridCache.for_model(model, 0, max_batch_size=2)
    big = HybridCache.for_model(model, 1)
    small = HybridCache.for_model(model, 1)
    with torch.no_grad():
        model(random_ids(50, seed=74)[None], cache=big)
        model(random_ids(5, seed=75)[None], cache=small)
    pool.insert(big)
    pool.remove(0)
    pool.insert(small)
    assert pool.lengths == [5]
    for i, k in pool.keys.items():
        assert torch.equal(k[0, :, :5], small.keys[i][0, :, :5])
        assert not k[0, :, 5:50].any(), "the earlier row's keys must not survive"
    with pytest.raises(ValueError, match="max_batch_size"):
        pool.insert(small)
        pool.insert(small)


def scheduler(model, *, rows: int = 4, budget: int = 16, waiting: int = 8, prefix=None):
    runner = Runner(model, max_num_seqs=rows, prefill_chunk=budget, prefix_cache=prefix)
    return Scheduler(runner, max_prefill_tokens=budget, max_waiting=waiting)


def run_all(s: Scheduler) -> tuple[dict, list]:
    """Steps until idle; returns tokens per (request, choice) and the admitted per step."""
    out: dict = {}
    admissions = []
    while s.has_work:
        admitted, updates = s.step()
        admissions.append(admitted)
        for u in updates:
            out.setdefault((u.request, u.choice), []).append(u.event.token_id)
    return out, admissions


def test_long_prompt_is_prefilled_over_steps_while_running_rows_keep_decoding():
    model = make_model()
    s = scheduler(model, budget=16)
    short = Request(random_ids(4, seed=80).tolist(), SamplingParams(max_new_tokens=12))
    s.add(short)
    s.step()  # short is admitted and decoding
    long = Request(random_ids(100, seed=81).tolist(), SamplingParams(max_new_tokens=3))
    s.add(long)
    steps_to_admit, long_tokens = 0, 0
    while long.admitted is None:
        before, short_running = s.runner.stats.prefill_tokens, not short.done
        _, updates = s.step()
        steps_to_admit += 1
        assert s.runner.stats.prefill_tokens - before <= 16, "the budget bounds each step"
        assert [u.request for u in updates].count(short) == short_running  # a token each step
        long_tokens += [u.request for u in updates].count(long)
    assert steps_to_admit == 7  # ceil(100 / 16): the long prompt never stalls the short one
    assert long_tokens == 1  # its first token comes in the step that admits it
    out, _ = run_all(s)
    assert len(out[(long, 0)]) == 2


def test_greedy_outputs_under_interleaving_equal_each_prompt_alone():
    model = make_model()
    s = scheduler(model, rows=3, budget=10)
    shared = random_ids(40, seed=82).tolist()
    prompts = [random_ids(n, seed=83 + n).tolist() for n in (3, 17, 55)]
    prompts += [[*shared, 1, 2], [*shared, 3], random_ids(2, seed=90).tolist()]
    requests = [Request(p, SamplingParams(max_new_tokens=5 + i)) for i, p in enumerate(prompts)]
    out: dict = {}
    for r in requests:  # one arrives every step
        s.add(r)
        _, updates = s.step()
        for u in updates:
            out.setdefault((u.request, u.choice), []).append(u.event.token_id)
    more, _ = run_all(s)
    for key, tokens in more.items():
        out.setdefault(key, []).extend(tokens)
    for r in requests:
        assert out[(r, 0)] == alone(model, r.prompt, r.params), f"prompt of {len(r.prompt)}"


def test_prefix_cache_hits_across_requests_without_changing_outputs():
    model = make_model()
    s = scheduler(model, budget=32, prefix=PrefixCache(16, 1 << 26))
    shared = random_ids(50, seed=91).tolist()
    first = Request([*shared, 5, 6], SamplingParams(max_new_tokens=6))
    second = Request([*shared, 7, 8, 9], SamplingParams(max_new_tokens=6))
    s.add(first)
    run_all(s)
    s.add(second)
    out, _ = run_all(s)
    assert second.reused == 48 and first.reused == 0
    assert out[(second, 0)] == alone(model, second.prompt, second.params)


def test_abort_frees_rows_and_the_queue_refuses_past_its_limit():
    model = make_model()
    s = scheduler(model, rows=1, waiting=1)
    a = Request(random_ids(8, seed=92).tolist(), SamplingParams(max_new_tokens=50))
    b = Request(random_ids(8, seed=93).tolist(), SamplingParams(max_new_tokens=4))
    s.add(a)
    s.step()
    s.add(b)
    with pytest.raises(QueueFull):
        s.add(Request([1, 2], SamplingParams()))
    for _ in range(3):
        s.step()
    assert b.admitted is None  # no free row
    s.abort(a)
    assert s.runner.running == [] and not s.running
    out, _ = run_all(s)
    assert out[(b, 0)] == alone(model, b.prompt, b.params)
    with pytest.raises(ValueError, match="n must be"):
        s.add(Request([1], SamplingParams(), n=2))


def test_per_row_processing_equals_each_row_alone():
    g = torch.Generator().manual_seed(94)
    logits = torch.randn(4, 50, generator=g)
    presence = torch.rand(4, 50, generator=g) < 0.3
    counts = torch.randint(0, 3, (4, 50), generator=g)
    rows = [
        SamplingParams(temperature=0.0, repetition_penalty=1.5),
        SamplingParams(temperature=0.7, top_k=5, presence_penalty=0.5),
        SamplingParams(temperature=1.3, top_p=0.6, frequency_penalty=-1.0),
        SamplingParams(temperature=1.0, top_k=3, top_p=0.9, repetition_penalty=0.8,
                       presence_penalty=1.0, frequency_penalty=0.5),
    ]  # fmt: skip
    together = process_logits(logits, rows, presence, counts)
    for b, p in enumerate(rows):
        one = process_logits(logits[b : b + 1], p, presence[b : b + 1], counts[b : b + 1])
        assert torch.equal(together[b : b + 1].isinf(), one.isinf()), f"row {b} kept set"
        assert_close(together[b : b + 1].nan_to_num(), one.nan_to_num(), 1e-6, f"row {b}")
    # presence/frequency penalties as OpenAI defines them, on one row
    p = rows[3]
    by_hand = logits[3] - p.presence_penalty * (counts[3] > 0) - p.frequency_penalty * counts[3]
    by_hand = torch.where(
        presence[3], torch.where(logits[3] > 0, logits[3] / 0.8, logits[3] * 0.8), logits[3]
    ) - (logits[3] - by_hand)
    ref = process_logits(by_hand[None], SamplingParams(temperature=1.0, top_k=3, top_p=0.9))
    assert_close(together[3:4].nan_to_num(), ref.nan_to_num(), 1e-6, "penalties by hand")


def test_token_logprobs_are_the_log_softmax():
    g = torch.Generator().manual_seed(95)
    logits = torch.randn(3, 40, generator=g)
    chosen = torch.tensor([4, 0, 39])
    lp, top_ids, top_lp = token_logprobs(logits, chosen, 5)
    ref = torch.log_softmax(logits.double(), dim=-1)
    assert_close(lp, ref[torch.arange(3), chosen], 1e-6, "chosen")
    assert torch.equal(top_ids, ref.topk(5, dim=-1).indices)
    assert (top_lp[:, :-1] >= top_lp[:, 1:]).all() and (top_lp <= 0).all()


def test_prompt_logprobs_are_the_full_forward_log_softmax():
    """Scoring a prompt (echo + logprobs, lm-eval's loglikelihood) in prefill chunks gives
    the log-softmax of the full forward at every position; with max_new_tokens=0 the request
    ends at admission with no token generated."""
    model = make_model()
    prompt = random_ids(45, seed=96).tolist()
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([prompt])).logits[0].double(), dim=-1)
    s = scheduler(model, budget=16, prefix=PrefixCache(16, 1 << 26))
    s.add(Request(prompt[:40], SamplingParams(max_new_tokens=2)))  # stores a prefix snapshot
    run_all(s)
    r = Request(prompt, SamplingParams(max_new_tokens=0, prompt_logprobs=3))
    s.add(r)
    out, _ = run_all(s)
    assert out == {} and r.done and r.admitted is not None
    assert r.reused == 0  # scoring needs every position's logits: no prefix restored
    scored = r.seqs[0].prompt_logprobs
    assert len(scored) == len(prompt) - 1
    got = torch.tensor([lp for lp, _ in scored], dtype=torch.float64)
    assert_close(got, ref[torch.arange(44), torch.tensor(prompt[1:])], 1e-5, "prompt logprobs")
    for t, (_, top) in enumerate(scored):
        assert [i for i, _ in top] == ref[t].topk(3).indices.tolist()
    assert s.runner.running == [] and not s.has_work
    # the kept next-token logits are one row, not the last chunk's [T, V]
    assert r.seqs[0].logits.untyped_storage().nbytes() == model.config.vocab_size * 4
    with pytest.raises(ValueError, match="released"):
        s.runner.prefill(r.seqs[0], 10)
    # scoring takes no row: it is admitted while every row decodes
    busy = scheduler(model, rows=1)
    busy.add(Request([1, 2, 3], SamplingParams(max_new_tokens=50)))
    busy.step()
    scored_only = Request(prompt[:10], SamplingParams(max_new_tokens=0, prompt_logprobs=0))
    busy.add(scored_only)
    busy.step()
    assert scored_only.done and len(scored_only.seqs[0].prompt_logprobs) == 9
    with pytest.raises(ValueError, match="0 only with prompt_logprobs"):
        SamplingParams(max_new_tokens=0).validate(512)


# -------------------------------------------------------------- the engine thread's failures


def async_engine(model, **kw):
    from lightlong.serve.engine import AsyncEngine
    from lightlong.serve.metrics import Metrics

    runner = Runner(model, max_num_seqs=2)
    engine = AsyncEngine(runner, max_prefill_tokens=64, max_waiting=1, metrics=Metrics(), **kw)
    engine.start()
    return engine


async def tokens_of(engine, prompt, max_new_tokens=3):
    out = []
    async for updates in engine.submit(Request(prompt, SamplingParams(max_new_tokens))):
        out += [u.event.token_id for u in updates]
    return out


def test_a_failed_step_ends_its_requests_and_the_engine_goes_on(monkeypatch):
    """A step that raises after admitting a request: the request gets the error, leaves the
    waiting count (else a full queue forever), and the next request runs normally."""
    import asyncio

    model = make_model()
    engine = async_engine(model)
    step, calls = engine.runner.step, []

    def failing_once():
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("out of memory")
        return step()

    monkeypatch.setattr(engine.runner, "step", failing_once)
    prompt = random_ids(6, seed=97).tolist()
    try:
        with pytest.raises(RuntimeError, match="the engine failed: RuntimeError: out of memory"):
            asyncio.run(tokens_of(engine, prompt))
        assert engine.num_waiting == 0 and engine.runner.running == []
        assert asyncio.run(tokens_of(engine, prompt)) == alone(model, prompt, SamplingParams(3))
    finally:
        engine.stop()


def test_a_broken_engine_answers_everyone_and_refuses_new_requests(monkeypatch):
    """When freeing rows fails too (a device that no longer answers), the engine thread ends:
    open requests get an error, new ones are refused at once instead of hanging."""
    import asyncio

    from lightlong.serve.engine import EngineStopped

    engine = async_engine(make_model())

    def broken(*_):
        raise RuntimeError("device lost")

    monkeypatch.setattr(engine.runner, "step", broken)
    monkeypatch.setattr(engine.scheduler, "abort", broken)
    try:
        with pytest.raises(RuntimeError, match="device lost"):
            asyncio.run(tokens_of(engine, [1, 2, 3]))
        engine._thread.join(timeout=10)
        assert engine.stopped and "device lost" in engine.failure
        with pytest.raises(EngineStopped, match="device lost"):
            asyncio.run(tokens_of(engine, [1, 2, 3]))
    finally:
        engine.stop()


def test_an_event_stream_aborts_its_requests_however_it_ends():
    """The client gone before the first event: the body's generators never start, so the
    response itself must abort the requests."""
    import asyncio

    from lightlong.serve.app import _SSE

    aborted = []

    class Run:
        request = "r"
        engine = type("E", (), {"abort": staticmethod(aborted.append)})

    async def events():
        yield b"data: never\n\n"

    async def receive():
        return {"type": "http.disconnect"}

    async def send(message):
        raise OSError("connection reset")

    scope = {"type": "http", "asgi": {"spec_version": "2.3"}, "method": "POST", "path": "/"}
    with pytest.raises(OSError):
        asyncio.run(_SSE(events(), [Run(), Run()])(scope, receive, send))
    assert aborted == ["r", "r"]
