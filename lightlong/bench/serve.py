"""`lightlong bench serve`: an OpenAI-client load generator against a `lightlong serve`.

The bench starts the server itself (`python -m lightlong serve --port 0` on 127.0.0.1) and
drives it with `openai.AsyncOpenAI`, streaming `/v1/completions` whose prompts are token ids
and which set `ignore_eos`, so every request reads exactly `prompt_tokens` and writes exactly
`max_tokens`. Two servers run, one after the other:

1. prefix cache off (`--prefix-cache-bytes 0`): a warm-up request, then the shared-prefix
   workload;
2. prefix cache on (the server's default size): a warm-up request, the same shared-prefix
   workload, then the concurrency sweep.

Sweep: at each concurrency c, c workers each send a request, wait for its last chunk and
send the next (a closed loop) until the level's requests are sent. Worker i starts i/c·R
after the level begins, R being the median time of one request alone (the c = 1 level's
end-to-end p50; the warm-up's time to first token when 1 is not measured), so requests
arrive spread over one request's duration, as in a closed loop's steady state, instead of
as one synchronised burst of c prefills. Prompts are seeded random token ids, different in
every request, so no prefix is shared.

Shared prefix: `conversations` chats over one document of `document_tokens` ids, each
`turns` turns long; turn t's prompt is the document, the earlier turns' questions and
answers, then a new question. The answers in the history are seeded stand-ins of
`answer_tokens` ids (the server's own answers are noise from random weights), so both
servers receive identical prompts. One request at a time, turn 1 of every conversation,
then turn 2, ...

Per request: time to first token (send → the first chunk carrying a token), the gaps
between successive token chunks (inter-token latency), end-to-end time (send → the end of
the stream) and the token counts from the stream's `usage`. A chunk carries a token when
its text is non-empty or it has no finish reason (a token whose text is still incomplete
UTF-8); a closing chunk with only a finish reason does not. Times include the client's own
parsing; client and server share the machine's cores.

A level stops sending after `level_time_limit_s` and the bench after `time_limit_s`;
requests in flight then are cancelled and counted as cut, levels not reached are listed as
skipped, and whatever was measured is reported.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from lightlong.bench.machine import (
    Roofline,
    decode_bound_tok_s,
    describe_machine,
    fraction_of_bound,
    measure_roofline,
    slug,
)
from lightlong.bench.report import (
    check_overwrite,
    fmt,
    ratio,
    target,
    targets_line,
    write_results,
)
from lightlong.bench.roofline import decode_bytes_per_token, forward_flops_per_token
from lightlong.bench.worker import log
from lightlong.model import HybridLM
from lightlong.model.source import load_model_tokenizer, resolve_config
from lightlong.runtime import check_device, parse_dtype

FULL_LEVELS = [1, 4, 16, 64]
QUICK_LEVELS = [1, 4, 16]
WARMUP_TOKENS = 4
"""Output tokens of each server's warm-up request (its prompt is `prompt_tokens` long)."""
START_TIMEOUT_S = 300.0
"""Longest wait for a server to print its listening line and answer /health."""
STOP_TIMEOUT_S = 30.0
"""Wait after SIGTERM before a server is killed."""
_LISTENING = re.compile(r"listening on (http://\S+)")
_BUSY = re.compile(r"^lightlong_num_requests_(?:running|waiting) (\S+)$", re.MULTILINE)


@dataclass
class ServeBenchConfig:
    """What `lightlong bench serve` measures."""

    model: str = "small"
    """Preset, checkpoint or run directory the server serves (a preset has random weights)."""
    dtype: str = "float32"
    """Server weight and KV dtype."""
    device: str = "cpu"
    """Server torch device; files are named serve-cpu.* or serve-cuda-<gpu>.*."""
    threads: int = 0
    """Torch CPU threads of the server; 0 means one per core but one, which the load
    generator and the server's HTTP thread need (with every core given to torch, its threads
    wait on each other whenever the client runs: 2 threads on 2 cores measured 0.6x the
    output tok/s of 1 thread at concurrency 16)."""
    quick: bool = False
    """Levels up to 16 only; the files get -quick, so the committed ones stay."""
    levels: list[int] = field(default_factory=list)
    """Concurrency levels of the sweep; empty means 1, 4, 16, 64 (quick: 1, 4, 16)."""
    prompt_tokens: int = 1000
    """Prompt length of every sweep request and warm-up, in tokens."""
    max_tokens: int = 256
    """Output tokens of every sweep request (ignore_eos: exactly this many)."""
    requests: int = 0
    """Requests per level; 0 means max(2·c, 8) at concurrency c."""
    level_time_limit_s: float = 600.0
    """Seconds after which a level sends no more requests and cancels those in flight."""
    time_limit_s: float = 1500.0
    """Seconds after which the whole bench stops the same way (server start-ups count)."""
    max_prefill_tokens: int = 512
    """Server --max-prefill-tokens: prompt tokens per scheduler step."""
    max_num_seqs: int = 64
    """Server --max-num-seqs: sequences run at once; at least the largest level."""
    seed: int = 0
    """Seed of every prompt's token ids."""
    document_tokens: int = 2000
    """Shared-prefix workload: length of the document every conversation starts with."""
    question_tokens: int = 32
    """Shared-prefix workload: tokens of each turn's question."""
    answer_tokens: int = 32
    """Shared-prefix workload: output tokens of each turn, and of its stand-in in the history."""
    conversations: int = 4
    """Shared-prefix workload: conversations over the document."""
    turns: int = 3
    """Shared-prefix workload: turns per conversation."""
    out_dir: str = "benchmarks/results"
    """Where the JSON, Markdown and PNG go."""
    overwrite: bool = False
    """Replace result files already in out_dir (else the run stops before measuring)."""

    def validate(self) -> None:
        """Raises ValueError naming the field that is out of range."""
        model = resolve_config(self.model)
        parse_dtype(self.dtype)
        check_device(self.device)
        if self.threads < 0:
            raise ValueError(f"threads must be >= 0 (0 = one per core but one), got {self.threads}")
        if any(c < 1 for c in self.levels):
            raise ValueError(f"levels must be >= 1, got {self.levels}")
        for name in ("prompt_tokens", "max_prefill_tokens", "document_tokens",
                     "question_tokens", "answer_tokens", "conversations", "turns"):  # fmt: skip
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_tokens < 2:
            raise ValueError(
                f"max_tokens must be >= 2 (one inter-token gap), got {self.max_tokens}"
            )
        top = max(self.resolved_levels())
        if self.requests != 0 and self.requests < top:
            raise ValueError(
                f"requests must be 0 (max(2·c, 8)) or >= the largest level {top}, "
                f"got {self.requests}"
            )
        if self.max_num_seqs < top:
            raise ValueError(
                f"max_num_seqs must be >= the largest level {top}, got {self.max_num_seqs}"
            )
        for name in ("level_time_limit_s", "time_limit_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        longest = max(
            self.prompt_tokens + self.max_tokens,
            self.shared_prompt_tokens(self.turns) + self.answer_tokens,
        )
        if longest > model.max_position_embeddings:
            raise ValueError(
                f"prompt_tokens + max_tokens and the last shared-prefix turn must fit in "
                f"{self.model}'s {model.max_position_embeddings:,} positions, need {longest:,}"
            )

    def resolved_levels(self) -> list[int]:
        """The concurrency levels measured, ascending."""
        return sorted(set(self.levels or (QUICK_LEVELS if self.quick else FULL_LEVELS)))

    def level_requests(self, c: int) -> int:
        """Requests sent at concurrency c."""
        return self.requests or max(2 * c, 8)

    def shared_prompt_tokens(self, turn: int) -> int:
        """Prompt length of shared-prefix turn `turn` (1-based), in tokens."""
        return self.document_tokens + turn * self.question_tokens + (turn - 1) * self.answer_tokens


def run_serve_bench(cfg: ServeBenchConfig) -> dict:
    """Starts the servers, measures, prints the table, writes JSON + Markdown + PNG; returns
    the report."""
    cfg.validate()
    check_overwrite(results_stem(cfg, describe_machine(cfg.device)), cfg.overwrite)
    threads = cfg.threads or max(1, (os.cpu_count() or 1) - 1)
    roofline = _roofline(cfg.device, threads)
    log(roofline.summary())
    t0 = time.perf_counter()
    deadline = t0 + cfg.time_limit_s
    tokenizer = load_model_tokenizer(cfg.model)
    special = {tokenizer.eos_token_id, tokenizer.bos_token_id}
    vocab = min(tokenizer.vocab_size, resolve_config(cfg.model).vocab_size)
    pool = [i for i in range(vocab) if i not in special]
    with _server(cfg, threads, prefix_cache_bytes=0) as url:
        off = asyncio.run(_shared_phase(cfg, url, pool, "off", deadline))
    with _server(cfg, threads, prefix_cache_bytes=None) as url:
        on = asyncio.run(_shared_phase(cfg, url, pool, "on", deadline))
        sweep, skipped = asyncio.run(_sweep(cfg, url, pool, on["warmup"]["ttft_s"], deadline))
    ceiling = _engine_decode(cfg, threads, pool, [r["concurrency"] for r in sweep])
    report = _summarise(cfg, threads, sweep, skipped, {"off": off, "on": on}, t0)
    report["roofline"] = roofline.to_dict()
    report["engine_decode"] = _with_bounds(ceiling, cfg, roofline)
    print(format_table(report))
    _write(report, cfg)
    return report


def _roofline(device: str, threads: int) -> Roofline:
    """The roofline measured with the server's torch thread count."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return measure_roofline(device)
    finally:
        torch.set_num_threads(before)


def _with_bounds(rows: list[dict], cfg: ServeBenchConfig, roofline: Roofline) -> list[dict]:
    """Engine decode rows with their bounds: batch 1 as a fraction of the matrix-vector
    bandwidth bound ("of_bound", bytes read per token at `prompt_tokens` of context), larger
    batches of the GEMM peak of the dtype ("of_gemm"); None where the dtype or the model's
    layer types have no bound."""
    config = resolve_config(cfg.model)
    for r in rows:
        r["of_bound"] = r["of_gemm"] = None
        try:
            if r["batch"] == 1:
                nbytes = decode_bytes_per_token(config, cfg.prompt_tokens, cfg.dtype)["total"]
                bound = decode_bound_tok_s(nbytes, roofline.matvec(cfg.dtype))
                r["of_bound"] = fraction_of_bound(r["output_tok_s"], bound)
            else:
                flops = forward_flops_per_token(config, cfg.prompt_tokens, decode=True)
                r["of_gemm"] = r["output_tok_s"] * flops / 1e9 / roofline.gemm(cfg.dtype)
        except ValueError as e:  # no rate measured for the dtype; layer types not counted
            log(f"engine decode batch {r['batch']}: no bound ({e})")
    return rows


ENGINE_STEPS = 16
"""Decode steps timed per batch size by `_engine_decode`."""


def _engine_decode(
    cfg: ServeBenchConfig, threads: int, pool: list[int], levels: list[int]
) -> list[dict]:
    """The engine's own decode rate without HTTP, in this process with the server's thread
    count: rows of `prompt_tokens`-token prompts (different ones) decoding together, for
    batch 1 and 16 when the sweep measured those levels. It bounds what the server can reach
    at that concurrency, prefill aside (output tok/s = rows ÷ step time)."""
    from lightlong.infer import Runner, SamplingParams
    from lightlong.model.source import load_model

    sizes = [b for b in (1, 16) if b in levels]
    if not sizes:
        return []
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        device = check_device(cfg.device)
        model = load_model(cfg.model, dtype=parse_dtype(cfg.dtype), device=device, seed=cfg.seed)
        params = SamplingParams(max_new_tokens=ENGINE_STEPS + 2, ignore_eos=True)
        rows = []
        for B in sizes:
            runner = Runner(model, max_num_seqs=B)
            for b in range(B):
                seq = runner.new_seq(_ids(pool, cfg.prompt_tokens, cfg.seed, "engine", b), params,
                                     seed=b, index=b)  # fmt: skip
                runner.prefill(seq, cfg.prompt_tokens)
                runner.admit(seq)
            runner.step()  # the first token comes from the prefill's logits: no forward
            t = time.perf_counter()
            for _ in range(ENGINE_STEPS):
                runner.step()
            step_s = (time.perf_counter() - t) / ENGINE_STEPS
            rows.append({"batch": B, "step_s": step_s, "output_tok_s": B / step_s})
            log(f"engine decode, batch {B}: {step_s * 1e3:,.1f} ms a step, {B / step_s:,.1f} tok/s")
        return rows
    finally:
        torch.set_num_threads(before)


@contextmanager
def _server(cfg: ServeBenchConfig, threads: int, prefix_cache_bytes: int | None) -> Iterator[str]:
    """A `lightlong serve` subprocess on 127.0.0.1 for the duration; yields its base URL.
    prefix_cache_bytes None leaves the server's default. Always stopped: SIGTERM, then
    SIGKILL after STOP_TIMEOUT_S."""
    cmd = _server_command(cfg, threads, prefix_cache_bytes)
    with tempfile.TemporaryDirectory() as tmp:
        log_path = Path(tmp) / "server.log"
        with open(log_path, "ab") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        try:
            url = _wait_until_serving(proc, log_path)
            log(f"server (prefix cache {'off' if prefix_cache_bytes == 0 else 'on'}) at {url}")
            yield url
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=STOP_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                    log(f"server did not stop within {STOP_TIMEOUT_S:g} s of SIGTERM: killed")
            if proc.returncode not in (0, -signal.SIGKILL):
                log(f"server exited with {proc.returncode}: {_tail(log_path)}")


def _server_command(
    cfg: ServeBenchConfig, threads: int, prefix_cache_bytes: int | None
) -> list[str]:
    cmd = [sys.executable, "-m", "lightlong", "serve", "--model", cfg.model,
           "--host", "127.0.0.1", "--port", "0", "--dtype", cfg.dtype, "--device", cfg.device,
           "--threads", str(threads), "--max-num-seqs", str(cfg.max_num_seqs),
           "--max-prefill-tokens", str(cfg.max_prefill_tokens)]  # fmt: skip
    if prefix_cache_bytes is not None:
        cmd += ["--prefix-cache-bytes", str(prefix_cache_bytes)]
    return cmd


def _wait_until_serving(proc: subprocess.Popen, log_path: Path) -> str:
    """The server's URL once it printed its listening line and /health answers 200."""
    import httpx

    give_up = time.perf_counter() + START_TIMEOUT_S
    url = None
    while time.perf_counter() < give_up:
        if proc.poll() is not None:
            raise RuntimeError(
                f"lightlong serve exited with {proc.returncode} before serving: {_tail(log_path)}"
            )
        if url is None:
            found = _LISTENING.search(log_path.read_text(errors="replace"))
            url = found and found.group(1).rstrip("/")
        if url is not None:
            try:
                if httpx.get(f"{url}/health", timeout=5.0).status_code == 200:
                    return url
            except httpx.HTTPError:
                pass
        time.sleep(0.05)
    raise RuntimeError(
        f"lightlong serve not serving after {START_TIMEOUT_S:g} s: {_tail(log_path)}"
    )


def _tail(log_path: Path, lines: int = 5) -> str:
    return " | ".join(log_path.read_text(errors="replace").strip().splitlines()[-lines:])


def _ids(pool: list[int], n: int, *key: object) -> list[int]:
    """n token ids drawn from pool by a generator seeded with `key` (same key, same ids)."""
    return random.Random(":".join(map(str, key))).choices(pool, k=n)


def _client(url: str, timeout_s: float):
    from openai import AsyncOpenAI

    return AsyncOpenAI(base_url=f"{url}/v1", api_key="bench", max_retries=0, timeout=timeout_s)


async def _request(client, model: str, prompt: list[int], max_tokens: int) -> dict:
    """One streamed completion: start (perf_counter s), ttft_s, itl_s (gaps between token
    chunks, s), e2e_s, prompt / output / cached token counts (from usage). RuntimeError when
    the usage contradicts the request."""
    start = time.perf_counter()
    stream = await client.completions.create(
        model=model, prompt=prompt, max_tokens=max_tokens, temperature=0.0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
    )  # fmt: skip
    arrivals, usage = [], None
    async for chunk in stream:
        now = time.perf_counter()
        if any(c.text or c.finish_reason is None for c in chunk.choices):
            arrivals.append(now)
        usage = chunk.usage or usage
    end = time.perf_counter()
    if usage is None or not arrivals:
        raise RuntimeError("a streamed completion ended without a token or without usage")
    if usage.completion_tokens != max_tokens or usage.prompt_tokens != len(prompt):
        raise RuntimeError(
            f"asked {len(prompt)} prompt + {max_tokens} output tokens (ignore_eos), the usage "
            f"says {usage.prompt_tokens} + {usage.completion_tokens}"
        )
    if len(arrivals) > max_tokens:
        raise RuntimeError(f"{len(arrivals)} token chunks for {max_tokens} tokens")
    details = usage.prompt_tokens_details
    return {
        "start": start,
        "end": end,
        "ttft_s": arrivals[0] - start,
        "itl_s": [b - a for a, b in itertools.pairwise(arrivals)],
        "e2e_s": end - start,
        "prompt_tokens": usage.prompt_tokens,
        "output_tokens": usage.completion_tokens,
        "cached_tokens": (details.cached_tokens or 0) if details else 0,
    }


async def _served_model(client) -> str:
    return (await client.models.list()).data[0].id


async def _warmup(client, model: str, cfg: ServeBenchConfig, pool: list[int], name: str) -> dict:
    prompt = _ids(pool, cfg.prompt_tokens, cfg.seed, "warmup", name)
    r = await _request(client, model, prompt, WARMUP_TOKENS)
    log(f"warm-up ({name}): TTFT {r['ttft_s'] * 1e3:,.0f} ms for {cfg.prompt_tokens:,} tokens")
    return {"ttft_s": r["ttft_s"], "e2e_s": r["e2e_s"]}


async def _shared_phase(
    cfg: ServeBenchConfig, url: str, pool: list[int], name: str, deadline: float
) -> dict:
    """Warm-up, then the shared-prefix workload one request at a time, on the server at
    `url` (prefix cache `name`: on or off); its row."""
    async with _client(url, cfg.level_time_limit_s) as client:
        model = await _served_model(client)
        warm = await _warmup(client, model, cfg, pool, f"prefix cache {name}")
        document = _ids(pool, cfg.document_tokens, cfg.seed, "document")
        history = [list(document) for _ in range(cfg.conversations)]
        order = [(t, k) for t in range(1, cfg.turns + 1) for k in range(cfg.conversations)]
        end = min(time.perf_counter() + cfg.level_time_limit_s, deadline)
        records = []
        for turn, k in order:
            history[k] += _ids(pool, cfg.question_tokens, cfg.seed, "question", k, turn)
            try:
                r = await asyncio.wait_for(
                    _request(client, model, history[k], cfg.answer_tokens),
                    end - time.perf_counter(),
                )
            except asyncio.TimeoutError:  # not yet the builtin TimeoutError on Python 3.10
                break
            records.append({**r, "turn": turn, "conversation": k})
            history[k] += _ids(pool, cfg.answer_tokens, cfg.seed, "answer", k, turn)
    return {**_shared_row(records, cfg.turns), "cut": len(order) - len(records), "warmup": warm}


def _shared_row(records: list[dict], turns: int) -> dict:
    ttft = [r["ttft_s"] for r in records]
    return {
        "requests": len(records),
        "prompt_tokens": sum(r["prompt_tokens"] for r in records),
        "cached_tokens": sum(r["cached_tokens"] for r in records),
        "ttft_p50_s": percentile(ttft, 50),
        "ttft_p99_s": percentile(ttft, 99),
        "turn_ttft_p50_s": [
            percentile([r["ttft_s"] for r in records if r["turn"] == t], 50)
            for t in range(1, turns + 1)
        ],
        "samples": [
            {k: r[k] for k in ("conversation", "turn", "ttft_s", "prompt_tokens", "cached_tokens")}
            for r in records
        ],
    }


async def _sweep(
    cfg: ServeBenchConfig, url: str, pool: list[int], ramp_s: float, deadline: float
) -> tuple[list[dict], list[int]]:
    """The concurrency sweep: one row per level measured, and the levels skipped because the
    bench's time limit had passed."""
    rows, skipped = [], []
    async with _client(url, cfg.level_time_limit_s) as client:
        model = await _served_model(client)
        for c in cfg.resolved_levels():
            if time.perf_counter() >= deadline:
                skipped.append(c)
                continue
            row = await _level(client, model, cfg, pool, c, ramp_s, deadline)
            rows.append(row)
            if c == 1 and row["e2e_p50_s"]:  # later levels arrive over one request's time
                ramp_s = row["e2e_p50_s"]
            if row["cut"]:
                await _wait_idle(url)
            log(
                f"concurrency {c}: {row['requests']} requests ({row['cut']} cut), "
                f"{fmt(row['output_tok_s'], ',.1f')} output tok/s, "
                f"TTFT p50 {fmt(_ms(row['ttft_p50_s']), ',.0f')} ms"
            )
    return rows, skipped


async def _level(
    client,
    model: str,
    cfg: ServeBenchConfig,
    pool: list[int],
    c: int,
    ramp_s: float,
    deadline: float,
) -> dict:
    """One closed-loop level: c workers, worker i starting i/c·ramp_s after the first."""
    n = cfg.level_requests(c)
    end = min(time.perf_counter() + cfg.level_time_limit_s, deadline)
    records: list[dict] = []
    sent = 0

    async def worker(i: int) -> None:
        nonlocal sent
        await asyncio.sleep(i * ramp_s / c)
        while sent < n and time.perf_counter() < end:
            prompt = _ids(pool, cfg.prompt_tokens, cfg.seed, "sweep", c, sent)
            sent += 1
            records.append(await _request(client, model, prompt, cfg.max_tokens))

    tasks = [asyncio.ensure_future(worker(i)) for i in range(c)]
    try:  # at the level's end (or a failed request) the requests in flight are cancelled
        done, _ = await asyncio.wait(
            tasks, timeout=end - time.perf_counter(), return_when=asyncio.FIRST_EXCEPTION
        )
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    for t in done:
        if t.exception() is not None:
            raise t.exception()
    return _level_row(c, records, sent, ramp_s)


def _level_row(c: int, records: list[dict], sent: int, ramp_s: float) -> dict:
    first = min((r["start"] for r in records), default=None)
    wall = max(r["end"] for r in records) - first if records else None
    output = sum(r["output_tokens"] for r in records)
    ttft = [r["ttft_s"] for r in records]
    itl = [g for r in records for g in r["itl_s"]]
    return {
        "concurrency": c,
        "requests": len(records),
        "cut": sent - len(records),
        "ramp_s": ramp_s,
        "wall_s": wall,
        "output_tokens": output,
        "output_tok_s": output / wall if wall else None,
        "ttft_p50_s": percentile(ttft, 50),
        "ttft_p99_s": percentile(ttft, 99),
        "itl_p50_s": percentile(itl, 50),
        "itl_p99_s": percentile(itl, 99),
        "e2e_p50_s": percentile([r["e2e_s"] for r in records], 50),
        "samples": [
            {
                "start_s": r["start"] - first,
                "ttft_s": r["ttft_s"],
                "e2e_s": r["e2e_s"],
                "output_tokens": r["output_tokens"],
            }
            for r in records
        ],
    }


async def _wait_idle(url: str) -> None:
    """Returns once the server's /metrics shows no request running or waiting: requests cut
    at a time limit are aborted between engine steps, and must not spill into the next level."""
    import httpx

    give_up = time.perf_counter() + STOP_TIMEOUT_S
    async with httpx.AsyncClient() as http:
        while True:
            text = (await http.get(f"{url}/metrics")).text
            busy = [float(v) for v in _BUSY.findall(text)]
            if len(busy) != 2:
                raise RuntimeError(f"{url}/metrics lacks lightlong_num_requests_running/waiting")
            if not any(busy):
                return
            if time.perf_counter() > give_up:
                raise RuntimeError(f"cut requests still running after {STOP_TIMEOUT_S:g} s")
            await asyncio.sleep(0.05)


def percentile(xs: list[float], q: float) -> float | None:
    """The q-th percentile (0 ... 100) of xs, interpolated linearly between the closest
    ranks (numpy's default); None for no values."""
    if not xs:
        return None
    s = sorted(xs)
    pos = (len(s) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1e3


def _summarise(cfg, threads, sweep, skipped, shared, t0) -> dict:
    by_c = {r["concurrency"]: r for r in sweep}

    def at(c: int, key: str) -> float | None:
        return by_c.get(c, {}).get(key)

    targets = {
        "throughput_16_vs_1": target(
            ratio(at(16, "output_tok_s"), at(1, "output_tok_s")), ">=", 6,
            "output tok/s at concurrency 16 / 1",
        ),
        "ttft_16_vs_1": target(
            ratio(at(16, "ttft_p50_s"), at(1, "ttft_p50_s")), "<=", 3,
            f"TTFT p50 at concurrency 16 / 1 ({cfg.prompt_tokens:,}-token prompts)",
        ),
        "shared_prefix_ttft": target(
            ratio(shared["on"]["ttft_p50_s"], shared["off"]["ttft_p50_s"]), "<=", 0.3,
            "shared-prefix TTFT p50 with / without the prefix cache",
        ),
    }  # fmt: skip
    with torch.device("meta"):
        params = HybridLM(resolve_config(cfg.model)).param_count()
    machine = describe_machine(cfg.device)
    machine["torch_threads"] = threads  # the server's; the client is this process
    return {
        "benchmark": "serve",
        "config": asdict(cfg),
        "model": {"ref": cfg.model, "params": params},
        "machine": machine,
        "ramp_s": max((r["ramp_s"] for r in sweep), default=shared["on"]["warmup"]["ttft_s"]),
        "sweep": sweep,
        "skipped_levels": skipped,
        "shared_prefix": shared,
        "targets": targets,
        "wall_s": time.perf_counter() - t0,
    }


def format_table(report: dict) -> str:
    """Markdown: a row per concurrency level, a row per prefix-cache setting of the
    shared-prefix workload, how the load was made, the machine and the targets."""
    cfg = report["config"]
    lines = [
        "| concurrency | requests | output tok/s | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | "
        "ITL p99 ms | E2E p50 s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in report["sweep"]:
        cut = f" ({r['cut']} cut)" if r["cut"] else ""
        lines.append(
            f"| {r['concurrency']} | {r['requests']}{cut} | {fmt(r['output_tok_s'], ',.1f')} | "
            f"{fmt(_ms(r['ttft_p50_s']), ',.0f')} | {fmt(_ms(r['ttft_p99_s']), ',.0f')} | "
            f"{fmt(_ms(r['itl_p50_s']), ',.1f')} | {fmt(_ms(r['itl_p99_s']), ',.1f')} | "
            f"{fmt(r['e2e_p50_s'], ',.2f')} |"
        )
    for c in report["skipped_levels"]:
        lines.append(f"| {c} | skipped (time limit) | - | - | - | - | - | - |")
    lines += [
        "",
        "| prefix cache | requests | prompt tokens | cached tokens | TTFT p50 ms | TTFT p99 ms | "
        "TTFT p50 ms per turn |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in report["shared_prefix"].items():
        cut = f" ({r['cut']} cut)" if r["cut"] else ""
        turns = " / ".join(fmt(_ms(t), ",.0f") for t in r["turn_ttft_p50_s"])
        lines.append(
            f"| {name} | {r['requests']}{cut} | {r['prompt_tokens']:,} | {r['cached_tokens']:,} | "
            f"{fmt(_ms(r['ttft_p50_s']), ',.0f')} | {fmt(_ms(r['ttft_p99_s']), ',.0f')} | "
            f"{turns} |"
        )
    engine = report.get("engine_decode", [])
    if engine:
        lines += [
            "",
            "| engine decode, no HTTP | ms per step | output tok/s | of bound | of GEMM |",
            "|---|---|---|---|---|",
        ]
        lines += [
            f"| batch {r['batch']} | {r['step_s'] * 1e3:,.1f} | {r['output_tok_s']:,.1f} | "
            f"{fmt(r.get('of_bound'), '.2f')} | {fmt(r.get('of_gemm'), '.2f')} |"
            for r in engine
        ]
    m = report["machine"]
    lines += [
        "",
        f"sweep: closed loop, c workers, {cfg['prompt_tokens']:,} random prompt tokens and "
        f"{cfg['max_tokens']:,} output tokens (ignore_eos) per request; worker i starts "
        f"i/c × {report['ramp_s']:,.2f} s (one request alone, start to end) after the first. "
        f"shared prefix: {cfg['conversations']} conversations × {cfg['turns']} turns over a "
        f"{cfg['document_tokens']:,}-token document, {cfg['question_tokens']}-token questions, "
        f"{cfg['answer_tokens']}-token answers, one request at a time.",
        f"machine: {m['cpu']}{', ' + m['gpu'] if 'gpu' in m else ''}, {m['cores']} cores, "
        f"{m['torch_threads']} server threads, "
        f"torch {m['torch']}; {report['model']['ref']}: "
        f"{report['model']['params']['total'] / 1e6:.1f}M params, {cfg['dtype']}; "
        f"client and server on the same machine",
        *([Roofline.from_dict(report["roofline"]).summary()] if "roofline" in report else []),
        targets_line(report["targets"]),
    ]
    return "\n".join(lines)


def results_stem(cfg: ServeBenchConfig, machine: dict) -> Path:
    """Where the results go, without the suffix: serve-cpu, serve-cuda-<gpu>, -quick."""
    device = machine["device"].split(":")[0] + (
        f"-{slug(machine['gpu'])}" if "gpu" in machine else ""
    )
    return Path(cfg.out_dir) / (f"serve-{device}" + ("-quick" if cfg.quick else ""))


def _write(report: dict, cfg: ServeBenchConfig) -> None:
    write_results(
        results_stem(cfg, report["machine"]), report, format_table(report), plot_serve,
        overwrite=cfg.overwrite,
    )  # fmt: skip


def plot_serve(report: dict, path: Path) -> None:
    """Three panels: output tok/s and TTFT p50/p99 vs concurrency; shared-prefix TTFT
    p50/p99 with and without the prefix cache."""
    from lightlong.plot import bars, pyplot, save, series, tidy

    fig, (tput, ttft, shared) = pyplot().subplots(1, 3, figsize=(15, 4.2))
    rows = [r for r in report["sweep"] if r["requests"]]
    cs = [r["concurrency"] for r in rows]
    tput.plot(cs, [r["output_tok_s"] for r in rows], label="output tok/s", **series(0))
    tput.set_title("output throughput (tok/s)", fontsize=10)
    for i, q in enumerate((50, 99)):
        ttft.plot(cs, [r[f"ttft_p{q}_s"] for r in rows], label=f"p{q}", **series(i))
    ttft.set_title(f"TTFT (s), {report['config']['prompt_tokens']:,}-token prompts", fontsize=10)
    for ax in (tput, ttft):
        ax.set_xlabel("concurrency (requests in flight)")
        ax.grid(True, which="both", alpha=0.3)
        if rows:  # log scales need values: a level cut before any request ended has none
            ax.set_xscale("log", base=2)
            ax.legend(fontsize=8)
    if rows:
        ttft.set_yscale("log")
    names = list(report["shared_prefix"])
    for i, q in enumerate((50, 99)):
        values = [_ms(report["shared_prefix"][n][f"ttft_p{q}_s"]) or 0 for n in names]
        shared.bar([j + 0.4 * i for j in range(len(names))], values, width=0.4,
                   label=f"TTFT p{q}", **bars(i))  # fmt: skip
    shared.set_xticks([j + 0.2 for j in range(len(names))], [f"prefix cache {n}" for n in names])
    shared.set_ylabel("ms")
    shared.set_title("shared-prefix turns: TTFT (ms)", fontsize=10)
    shared.legend(fontsize=8)
    shared.grid(True, axis="y", alpha=0.3)
    m = report["machine"]
    fig.suptitle(
        f"lightlong serve, {report['model']['ref']} {report['config']['dtype']} — {m['cpu']} "
        f"({m['torch_threads']} server threads)",
        fontsize=9,
    )
    tidy(tput, ttft, shared)
    save(fig, path, dpi=120)
