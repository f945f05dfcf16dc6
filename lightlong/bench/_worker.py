"""One attention measurement in a fresh process, so that its peak memory is its own.

Run as `python -m lightlong.bench._worker SPEC_JSON`; prints one JSON line of results.
"""

from __future__ import annotations

import json
import sys
import time

import torch
import torch.nn.functional as F

from lightlong.bench.machine import reset_peak_rss, rss_bytes, sync
from lightlong.ops import decay_rates, lightning_attn

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_MAX_REPS = 3
_REPEAT_BELOW_S = 2.0


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


def _time(fn, device: str) -> float:
    """Best wall time of fn over up to _MAX_REPS runs (one run when it is slow).

    One untimed run first: on virtual machines the first touch of fresh memory can cost
    several times the op itself, which is the host's cost, not the op's.
    """
    fn()
    best = float("inf")
    for _ in range(_MAX_REPS):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        elapsed = time.perf_counter() - t0
        best = min(best, elapsed)
        if elapsed > _REPEAT_BELOW_S:
            break
    return best


def measure(spec: dict) -> dict:
    """Times the forward, then forward+backward, of one op at one length; peak memory of each.

    spec: op ("lightning" | "sdpa"), T, B, H, K, V, dtype, device, block_size, modes.
    Peak memory is what the op adds beyond its inputs (CPU: resident set; CUDA: allocator).
    """
    op, T, B, H, K, V = (spec[x] for x in ("op", "T", "B", "H", "K", "V"))
    dtype, device = _DTYPES[spec["dtype"]], spec["device"]
    torch.manual_seed(0)
    if op == "lightning":
        shape_q, shape_v = (B, T, H, K), (B, T, H, V)
        decay = decay_rates(H, 0, 80).to(device)

        def run(q, k, v):
            return lightning_attn(q, k, v, decay, block_size=spec["block_size"])[0]
    elif op == "sdpa":
        shape_q, shape_v = (B, H, T, K), (B, H, T, V)

        def run(q, k, v):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    else:
        raise ValueError(f"op must be 'lightning' or 'sdpa', got {op!r}")

    q = torch.randn(shape_q, dtype=dtype, device=device)
    k = torch.randn(shape_q, dtype=dtype, device=device)
    v = torch.randn(shape_v, dtype=dtype, device=device)
    result = {"inputs_bytes": sum(x.numel() * x.element_size() for x in (q, k, v))}

    if "fwd" in spec["modes"]:
        before = _reset_peak(device)
        with torch.no_grad():
            result["fwd_s"] = _time(lambda: run(q, k, v), device)
        result["fwd_peak_bytes"] = _peak_since(device, before)

    if "fwdbwd" in spec["modes"]:
        for x in (q, k, v):
            x.requires_grad_(True)
        do = torch.randn(shape_v, dtype=dtype, device=device)
        before = _reset_peak(device)

        def step():
            for x in (q, k, v):
                x.grad = None
            run(q, k, v).backward(do)

        result["fwdbwd_s"] = _time(step, device)
        result["fwdbwd_peak_bytes"] = _peak_since(device, before)
    return result


if __name__ == "__main__":
    print(json.dumps(measure(json.loads(sys.argv[1]))))
