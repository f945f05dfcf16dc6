"""Benchmark measurements, each in a fresh process so that its peak memory is its own.

The parent calls `run_in_fresh_process(spec)`, which runs `python -m lightlong.bench.worker
SPEC_JSON` and reads one JSON line back. `spec["kind"]` picks what is measured.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import time
from collections.abc import Callable

import torch

from lightlong.bench.machine import peak_since, reset_peak, sync
from lightlong.runtime import keep_freed_memory, parse_dtype, release_freed_memory

_MIN_REPS, _MAX_REPS = 3, 50
_BUDGET_S = 3.0
_SLOW_S = 15.0


def log(msg: str) -> None:
    """A progress line on stderr."""
    print(msg, file=sys.stderr, flush=True)


def describe_spec(spec: dict) -> str:
    """A measurement in a few words: 'generate lightlong mode=context context=32 ...'."""
    parts = [str(spec.get("kind")), str(spec.get("op", spec.get("impl", "")))]
    for key in ("mode", "T", "context", "batch", "dtype", "quantize", "modes"):
        if spec.get(key) is not None:
            parts.append(f"{key}={spec[key]}")
    return " ".join(parts)


def run_in_fresh_process(
    spec: dict,
    timeout_s: float,
    failed: list[dict] | None = None,
    *,
    module: str = "lightlong.bench.worker",
    what: str | None = None,
) -> dict | None:
    """Runs one measurement in a new interpreter (`python -m module SPEC_JSON`, whose last
    stdout line is the result's JSON); None (and a line on stderr) if it fails, also
    appended to `failed` as {"what", "error"} (the error's last line)."""
    cmd = [sys.executable, "-m", module, json.dumps(spec)]
    what = what or describe_spec(spec)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        error = f"timed out after {timeout_s:.0f}s"
    else:
        if proc.returncode == 0:
            return json.loads(proc.stdout.strip().splitlines()[-1])
        lines = proc.stderr.strip().splitlines()
        error = lines[-1] if lines else f"exit code {proc.returncode}"
        log(proc.stderr[-2000:])
    log(f"  {what}: failed: {error}")
    if failed is not None:
        failed.append({"what": what, "error": error})
    return None


def time_and_peak(fn: Callable[[], object], device: str) -> tuple[float, int]:
    """Best wall time of fn over repeated runs, and the peak memory one run adds.

    The first run measures memory, with glibc's default malloc and the heap's free pages
    returned first, so the peak is what the op really touches. The timed runs then keep
    freed memory for reuse (`keep_freed_memory`), as `lightlong` commands do: enough runs to
    fill ~_BUDGET_S, at least _MIN_REPS, or one when a run takes over _SLOW_S.
    """

    def once() -> float:
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        return time.perf_counter() - t0

    keep_freed_memory(False)
    release_freed_memory()
    baseline = reset_peak(device)
    first = once()
    peak = peak_since(device, baseline)
    keep_freed_memory(True)
    once()  # the pages the timed runs reuse
    reps = 1 if first > _SLOW_S else max(_MIN_REPS, min(_MAX_REPS, int(_BUDGET_S / first)))
    return min(once() for _ in range(reps)), peak


def measure_attention(spec: dict) -> dict:
    """Forward, then forward+backward, of one attention op at one length.

    spec: op ("lightning" | "sdpa" | "fla"), T, B, H, K, V, dtype, device, block_size, modes,
    backend (lightning's; default "auto"). "sdpa" is causal softmax, on CUDA in bf16/fp16 with
    the FlashAttention kernel; "fla" is flash-linear-attention's chunk_simple_gla with
    g_gamma = −decay (the same op as lightning's).
    """
    from contextlib import nullcontext

    from torch.nn import functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from lightlong.ops import decay_rates, lightning_attn

    op, T, B, H, K, V = (spec[x] for x in ("op", "T", "B", "H", "K", "V"))
    dtype, device = parse_dtype(spec["dtype"]), spec["device"]
    torch.manual_seed(0)
    decay = decay_rates(H, 0, 80, device=device)
    shape_q, shape_v = (B, T, H, K), (B, T, H, V)
    if op == "lightning":
        backend = spec.get("backend", "auto")

        def run(q, k, v):
            return lightning_attn(q, k, v, decay, block_size=spec["block_size"], backend=backend)[0]
    elif op == "sdpa":
        shape_q, shape_v = (B, H, T, K), (B, H, T, V)
        flash = device.startswith("cuda") and dtype != torch.float32

        def run(q, k, v):
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION) if flash else nullcontext():
                return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    elif op == "fla":
        from fla.ops.simple_gla import chunk_simple_gla

        def run(q, k, v):
            return chunk_simple_gla(q, k, v, g_gamma=-decay, scale=K**-0.5)[0]
    else:
        raise ValueError(f"op must be 'lightning', 'sdpa' or 'fla', got {op!r}")

    q, k = (torch.randn(shape_q, dtype=dtype, device=device) for _ in range(2))
    v = torch.randn(shape_v, dtype=dtype, device=device)
    result = {"inputs_bytes": sum(x.numel() * x.element_size() for x in (q, k, v))}
    if "fwd" in spec["modes"]:
        with torch.no_grad():
            result["fwd_s"], result["fwd_peak_bytes"] = time_and_peak(lambda: run(q, k, v), device)
    if "fwdbwd" in spec["modes"]:
        for x in (q, k, v):
            x.requires_grad_(True)
        do = torch.randn(shape_v, dtype=dtype, device=device)

        def step():
            for x in (q, k, v):
                x.grad = None
            run(q, k, v).backward(do)

        result["fwdbwd_s"], result["fwdbwd_peak_bytes"] = time_and_peak(step, device)
    return result


def measure_decode(spec: dict) -> dict:
    """µs per decode step (`lightning_attn_step`) for B sequences, and the bytes it moves.

    spec: B, H, K, V, dtype, device, backend, steps (timed back to back, so that launch
    overhead overlaps the GPU's work as in a decode loop).
    """
    from lightlong.ops import decay_rates, lightning_attn_step

    B, H, K, V, device = (spec[x] for x in ("B", "H", "K", "V", "device"))
    dtype = parse_dtype(spec["dtype"])
    gen = torch.Generator().manual_seed(0)
    q, k = (torch.randn(B, 1, H, K, generator=gen).to(device, dtype) for _ in range(2))
    v = torch.randn(B, 1, H, V, generator=gen).to(device, dtype)
    state = torch.zeros(B, H, K, V, dtype=torch.float32, device=device)
    decay = decay_rates(H, 0, 80, device=device)

    def steps():
        for _ in range(spec["steps"]):
            lightning_attn_step(q, k, v, decay, state, backend=spec["backend"])

    seconds, _ = time_and_peak(steps, device)
    state_bytes = state.numel() * state.element_size()
    io_bytes = (q.numel() + k.numel() + 2 * v.numel()) * q.element_size()  # q, k, v in; o out
    return {"step_s": seconds / spec["steps"], "bytes": 2 * state_bytes + io_bytes,
            "state_bytes": state_bytes}  # fmt: skip


def measure_model(spec: dict) -> dict:
    """Prefill (last-position logits, no cache) and forward+backward of a whole model.

    spec: impl ("lightlong" | "transformers"), checkpoint (dir), T, modes, device, dtype.
    """
    impl, T, device = spec["impl"], spec["T"], spec["device"]
    dtype = parse_dtype(spec["dtype"])
    if impl == "lightlong":
        from lightlong.model import HybridLM

        model = HybridLM.from_pretrained(spec["checkpoint"], dtype=dtype, device=device)
        vocab = model.config.vocab_size

        def prefill():
            return model(ids, logits_to_keep=1).logits

        def loss():
            return model(ids, labels=ids).loss
    elif impl == "transformers":
        from transformers import MiniMaxForCausalLM

        model = MiniMaxForCausalLM.from_pretrained(spec["checkpoint"], dtype=dtype).to(device)
        vocab = model.config.vocab_size

        def prefill():
            return model(input_ids=ids, use_cache=False, logits_to_keep=1).logits

        def loss():
            return model(input_ids=ids, labels=ids, use_cache=False).loss
    else:
        raise ValueError(f"impl must be 'lightlong' or 'transformers', got {impl!r}")
    ids = torch.randint(0, vocab, (1, T), generator=torch.Generator().manual_seed(0)).to(device)
    result = {}
    if "prefill" in spec["modes"]:
        model.eval()
        with torch.no_grad():
            result["prefill_s"], result["prefill_peak_bytes"] = time_and_peak(prefill, device)
    if "fwdbwd" in spec["modes"]:
        model.train()

        def step():
            model.zero_grad(set_to_none=True)
            loss().backward()

        result["fwdbwd_s"], result["fwdbwd_peak_bytes"] = time_and_peak(step, device)
    return result


def _timed(fn: Callable[[], object], device: str) -> tuple[float, object]:
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def measure_generate(spec: dict) -> dict:
    """Inference at one context length: prefill, then greedy decode; or, by spec["mode"]:

    - "context": a `context`-token prompt, then `new_tokens` decoded (batch 1): prefill_s,
      decode_tok_s, peak_bytes (prefill + decode), cache_bytes.
    - "batched": decode tok/s of `batch` prompts of `context` tokens, and of one.
    - "continuation": a `context`-token prefix is cached, then `suffix` more tokens arrive:
      continued_s (prefill of the suffix from the cache) and fresh_s (the suffix alone,
      from nothing).

    spec: impl ("lightlong" | "transformers"), checkpoint, mode, context, new_tokens,
    batch, suffix, prefill_chunk, device, dtype (the weights' and activations'), quantize
    (lightlong: "int8" quantizes the weights after loading, `lightlong.nn.quant`; absent or
    None: not), repeats (decode runs per measurement, default 1: each from the same
    prefilled cache, the best tok/s kept; the prompt is prefilled once).
    """
    impl, device, mode, L = spec["impl"], spec["device"], spec["mode"], spec["context"]
    repeats = spec.get("repeats", 1)
    dtype, quantize = parse_dtype(spec["dtype"]), spec.get("quantize")
    if quantize not in (None, "int8") or (quantize and impl != "lightlong"):
        raise ValueError(f"quantize: None, or 'int8' with impl lightlong; got {quantize!r}")
    # One run per point (a 1M-token prefill takes minutes), timed as `lightlong` runs: with
    # freed memory kept for reuse. The peak is the process's high-water mark above the
    # loaded model, so it counts what the allocator holds, not only live tensors.
    keep_freed_memory(True)
    gen = torch.Generator().manual_seed(0)
    if impl == "lightlong":
        from lightlong.infer import Engine, SamplingParams
        from lightlong.model import HybridLM

        model = HybridLM.from_pretrained(spec["checkpoint"], dtype=dtype, device=device).eval()
        if quantize == "int8":
            from lightlong.nn.quant import quantize_int8

            quantize_int8(model)
        vocab = model.config.vocab_size
    elif impl == "transformers":
        from transformers import MiniMaxForCausalLM

        model = MiniMaxForCausalLM.from_pretrained(spec["checkpoint"], dtype=dtype).to(device)
        model.eval()
        vocab = model.config.vocab_size
    else:
        raise ValueError(f"impl must be 'lightlong' or 'transformers', got {impl!r}")

    def prompt(n: int) -> list[int]:
        return torch.randint(0, vocab, (n,), generator=gen).tolist()

    def hf_decode(ids: list[list[int]], new: int, runs: int = 1) -> tuple[float, float]:
        """transformers: prefill seconds, then greedy decode tok/s with its cache (the best
        of `runs`, each from a copy of the prefilled cache)."""
        x = torch.tensor(ids, device=device)
        best = 0.0
        with torch.no_grad():
            t_pre, out = _timed(
                lambda: model(input_ids=x, use_cache=True, logits_to_keep=1), device
            )
            for _ in range(runs):
                cache = copy.deepcopy(out.past_key_values) if runs > 1 else out.past_key_values
                nxt = out.logits[:, -1].argmax(-1, keepdim=True)
                sync(device)
                t0 = time.perf_counter()
                for _ in range(new - 1):
                    step = model(input_ids=nxt, past_key_values=cache, use_cache=True)
                    nxt = step.logits[:, -1].argmax(-1, keepdim=True)
                sync(device)
                best = max(best, len(ids) * (new - 1) / (time.perf_counter() - t0))
        return t_pre, best

    def ours(chunk: int = spec["prefill_chunk"], prefix_bytes: int = 0) -> Engine:
        return Engine(model, prefill_chunk=chunk, prefix_cache_bytes=prefix_bytes)

    def ours_decode(engine: Engine, prompts: list[list[int]]) -> tuple[float, float]:
        """Prefills each prompt once, then decodes them together `repeats` times from the
        same prefilled caches: (the best decode tok/s, the prefills' seconds)."""
        prefilled, prefill_s = [], 0.0
        for ids in prompts:
            prefilled.append(engine.prefill(ids))
            prefill_s += engine.stats.prefill_seconds
        best = 0.0
        for _ in range(repeats):
            engine.generate(prompts, greedy, prefilled=prefilled)
            best = max(best, engine.stats.decode_tok_s)
        return best, prefill_s

    greedy = SamplingParams(max_new_tokens=spec["new_tokens"]) if impl == "lightlong" else None
    if impl == "lightlong":  # warm-up: threads, allocator, first-call paths
        ours().generate(prompt(300), SamplingParams(max_new_tokens=4))
    else:
        hf_decode([prompt(300)], 4)
    result: dict = {}
    if mode == "context":
        ids = prompt(L)
        baseline = reset_peak(device)
        if impl == "lightlong":
            engine = ours()
            result["decode_tok_s"], result["prefill_s"] = ours_decode(engine, [ids])
            result["cache_bytes"] = engine.stats.cache_bytes
        else:
            result["prefill_s"], result["decode_tok_s"] = hf_decode(
                [ids], spec["new_tokens"], repeats
            )
        result["peak_bytes"] = peak_since(device, baseline)
    elif mode == "batched":
        for B in (1, spec["batch"]):
            prompts = [prompt(L) for _ in range(B)]
            if impl == "lightlong":
                result[f"decode_tok_s_b{B}"] = ours_decode(ours(), prompts)[0]
            else:
                result[f"decode_tok_s_b{B}"] = hf_decode(prompts, spec["new_tokens"], repeats)[1]
    elif mode == "continuation":
        prefix, suffix = prompt(L), prompt(spec["suffix"])
        if impl == "lightlong":
            engine = ours(prefix_bytes=8 << 30)
            one = SamplingParams(max_new_tokens=1)
            engine.generate([*prefix, suffix[0]], one)  # caches the prefix
            engine.generate([*prefix, *suffix], one)
            if engine.stats.reused_tokens != L:
                raise RuntimeError(f"prefix not reused: {engine.stats}")
            result["continued_s"] = engine.stats.prefill_seconds
            fresh = ours()
            fresh.generate(suffix, one)
            result["fresh_s"] = fresh.stats.prefill_seconds
        else:
            with torch.no_grad():
                x = torch.tensor([prefix], device=device)
                cache = model(input_ids=x, use_cache=True, logits_to_keep=1).past_key_values
                y = torch.tensor([suffix], device=device)
                result["continued_s"] = _timed(
                    lambda: model(input_ids=y, past_key_values=cache, logits_to_keep=1), device
                )[0]
                result["fresh_s"] = _timed(
                    lambda: model(input_ids=y, use_cache=True, logits_to_keep=1), device
                )[0]
    else:
        raise ValueError(f"mode must be context, batched or continuation, got {mode!r}")
    return result


def measure_train(spec: dict) -> dict:
    """One training step (forward, backward, AdamW) on `tokens` tokens as rows of T, with
    activation checkpointing: its time and peak memory. A first step on one short row
    allocates the optimizer state and warms the code paths.

    spec: impl ("lightlong" | "transformers"), checkpoint, T, tokens, device, dtype
    ("float32", or "bfloat16": autocast with fp32 weights and optimizer, as `lightlong
    train` runs it).
    """
    from contextlib import nullcontext

    impl, T, device = spec["impl"], spec["T"], spec["device"]
    if spec["dtype"] not in ("float32", "bfloat16"):
        raise ValueError(f"dtype must be float32 or bfloat16, got {spec['dtype']!r}")
    bf16 = spec["dtype"] == "bfloat16"
    rows = spec["tokens"] // T
    warm = min(T, 1024)
    gen = torch.Generator().manual_seed(0)
    if impl == "lightlong":
        from lightlong.model import HybridLM

        model = HybridLM.from_pretrained(spec["checkpoint"], dtype=torch.float32, device=device)
        model.gradient_checkpointing = True
        ids = torch.randint(0, model.config.vocab_size, (1, rows * T), generator=gen).to(device)

        def loss(n_rows: int, length: int):
            n = n_rows * length
            cu = torch.arange(0, n + 1, length, dtype=torch.int64, device=device)
            x = ids[:, :n]
            return model(x, cu_seqlens=cu, labels=x, logits_to_keep=0).loss
    elif impl == "transformers":
        from transformers import MiniMaxForCausalLM

        model = MiniMaxForCausalLM.from_pretrained(spec["checkpoint"], dtype=torch.float32)
        model = model.to(device)
        model.gradient_checkpointing_enable()
        ids = torch.randint(0, model.config.vocab_size, (rows, T), generator=gen).to(device)

        def loss(n_rows: int, length: int):
            x = ids[:n_rows, :length]
            return model(input_ids=x, labels=x, use_cache=False).loss
    else:
        raise ValueError(f"impl must be 'lightlong' or 'transformers', got {impl!r}")
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step(n_rows: int, length: int):
        opt.zero_grad(set_to_none=True)
        with (
            torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
            if bf16
            else nullcontext()
        ):
            value = loss(n_rows, length)
        value.backward()
        opt.step()

    step(1, warm)
    baseline = reset_peak(device)
    seconds, _ = _timed(lambda: step(rows, T), device)
    return {"step_s": seconds, "peak_bytes": peak_since(device, baseline)}


_KINDS = {
    "attention": measure_attention,
    "decode": measure_decode,
    "model": measure_model,
    "generate": measure_generate,
    "train": measure_train,
}

if __name__ == "__main__":
    spec = json.loads(sys.argv[1])
    print(json.dumps(_KINDS[spec["kind"]](spec)))
