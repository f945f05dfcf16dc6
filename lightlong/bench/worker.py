"""Benchmark measurements, each in a fresh process so that its peak memory is its own.

The parent calls `run_in_fresh_process(spec)`, which runs `python -m lightlong.bench.worker
SPEC_JSON` and reads one JSON line back. `spec["kind"]` picks what is measured.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable

import torch

from lightlong.bench.machine import reset_peak_rss, rss_bytes, sync
from lightlong.runtime import keep_freed_memory, release_freed_memory

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_MIN_REPS, _MAX_REPS = 3, 50
_BUDGET_S = 3.0
_SLOW_S = 15.0


def log(msg: str) -> None:
    """A progress line on stderr."""
    print(msg, file=sys.stderr, flush=True)


def run_in_fresh_process(spec: dict, timeout_s: float) -> dict | None:
    """Runs one measurement in a new interpreter; None (and a line on stderr) if it fails."""
    cmd = [sys.executable, "-m", "lightlong.bench.worker", json.dumps(spec)]
    what = f"{spec.get('kind')} {spec.get('op', spec.get('impl', ''))} T={spec.get('T')}"
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        log(f"  {what}: timed out after {timeout_s:.0f}s")
        return None
    if proc.returncode != 0:
        log(f"  {what}: failed\n{proc.stderr[-2000:]}")
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _reset_peak(device: str) -> int:
    """Starts a peak-memory window; returns the baseline to subtract."""
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    reset_peak_rss()
    return rss_bytes()[0]


def _peak_since(device: str, baseline: int) -> int:
    """Peak memory above the baseline since `_reset_peak`."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated(device) - baseline
    return max(0, rss_bytes()[1] - baseline)


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
    baseline = _reset_peak(device)
    first = once()
    peak = _peak_since(device, baseline)
    keep_freed_memory(True)
    once()  # the pages the timed runs reuse
    reps = 1 if first > _SLOW_S else max(_MIN_REPS, min(_MAX_REPS, int(_BUDGET_S / first)))
    return min(once() for _ in range(reps)), peak


def measure_attention(spec: dict) -> dict:
    """Forward, then forward+backward, of lightning attention or causal SDPA at one length.

    spec: op ("lightning" | "sdpa"), T, B, H, K, V, dtype, device, block_size, modes.
    """
    from torch.nn import functional as F

    from lightlong.ops import decay_rates, lightning_attn

    op, T, B, H, K, V = (spec[x] for x in ("op", "T", "B", "H", "K", "V"))
    dtype, device = DTYPES[spec["dtype"]], spec["device"]
    torch.manual_seed(0)
    if op == "lightning":
        shape_q, shape_v = (B, T, H, K), (B, T, H, V)
        decay = decay_rates(H, 0, 80, device=device)

        def run(q, k, v):
            return lightning_attn(q, k, v, decay, block_size=spec["block_size"])[0]
    elif op == "sdpa":
        shape_q, shape_v = (B, H, T, K), (B, H, T, V)

        def run(q, k, v):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    else:
        raise ValueError(f"op must be 'lightning' or 'sdpa', got {op!r}")

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


def measure_model(spec: dict) -> dict:
    """Prefill (last-position logits, no cache) and forward+backward of a whole model.

    spec: impl ("lightlong" | "transformers"), checkpoint (dir), T, modes, device, dtype.
    """
    impl, T, device = spec["impl"], spec["T"], spec["device"]
    dtype = DTYPES[spec["dtype"]]
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


_KINDS = {"attention": measure_attention, "model": measure_model}

if __name__ == "__main__":
    spec = json.loads(sys.argv[1])
    print(json.dumps(_KINDS[spec["kind"]](spec)))
