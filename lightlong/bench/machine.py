"""What machine a benchmark ran on, its measured roofline (copy, GEMM and matrix-vector
rates) and memory use."""

from __future__ import annotations

import functools
import math
import os
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch.nn import functional as F


def describe_machine(device: str = "cpu") -> dict:
    """CPU model, cores, threads, torch version, and the GPU's name on CUDA."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": device,
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def _best_seconds(fn: Callable[[], object], device: str, reps: int, budget_s: float) -> float:
    """Best wall time of fn after one warm-up call: at least `reps` runs, more while the
    runs so far took under budget_s."""
    fn()
    best, spent, n = float("inf"), 0.0, 0
    while n < reps or spent < budget_s:
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        dt = time.perf_counter() - t0
        best, spent, n = min(best, dt), spent + dt, n + 1
        if n >= 50:
            break
    return best


def matmul_gflops(
    n: int = 4096,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    reps: int = 5,
    budget_s: float = 0.0,
) -> float:
    """Best achieved GFLOP/s of an n×n×n matmul: the machine's practical peak (at least
    `reps` runs, more while they took under budget_s)."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    out = torch.empty(n, n, dtype=dtype, device=device)
    seconds = _best_seconds(lambda: torch.matmul(a, b, out=out), device, reps, budget_s)
    return 2 * n**3 / seconds / 1e9


def copy_gbps(
    nbytes: int = 2**30, device: str = "cpu", reps: int = 5, budget_s: float = 0.0
) -> float:
    """Best achieved GB/s of copying nbytes (each byte read once and written once)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    seconds = _best_seconds(lambda: dst.copy_(src), device, reps, budget_s)
    return 2 * nbytes / seconds / 1e9


def matvec_gbps(
    nbytes: int = 256 * 2**20,
    dtype: str = "float32",
    device: str = "cpu",
    reps: int = 5,
    budget_s: float = 0.2,
) -> float:
    """Best achieved GB/s of weight bytes read by a matrix-vector product y = x Wᵀ: x [1, n],
    W [m, n] of about nbytes (sized past the caches, so the weights stream from memory).

    dtype: "float32" or "bfloat16" (`F.linear`, x in W's dtype), or "int8:float32" /
    "int8:bfloat16": `torch._weight_int8pack_mm` of int8 W with per-row scales, x (and the
    scales) in the dtype after the colon. Bytes counted: W's only (int8: one per weight)."""
    n = 4096
    weight, _, act = dtype.partition(":")
    if weight == "int8":
        if act not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype int8:<activations> needs float32/bfloat16, got {dtype!r}")
        x_dtype = getattr(torch, act)
        w = torch.ones(max(1, nbytes // n), n, dtype=torch.int8, device=device)
        scales = torch.full((w.shape[0],), 0.5, dtype=x_dtype, device=device)
        x = torch.full((1, n), 0.5, dtype=x_dtype, device=device)

        def run():
            return torch._weight_int8pack_mm(x, w, scales)
    else:
        if act or weight not in ("float32", "bfloat16", "float16"):
            raise ValueError(
                f"dtype must be float32, bfloat16 or int8:<activations>, got {dtype!r}"
            )
        wd = getattr(torch, weight)
        w = torch.full((max(1, nbytes // (n * wd.itemsize)), n), 0.5, dtype=wd, device=device)
        x = torch.full((1, n), 0.5, dtype=wd, device=device)

        def run():
            return F.linear(x, w)

    seconds = _best_seconds(run, device, reps, budget_s)
    return w.numel() * w.element_size() / seconds / 1e9


@dataclass(frozen=True)
class Roofline:
    """The machine's measured limits, once per benchmark run: what a row's rate is compared
    with ("fraction of bound").

    Decode at batch 1 reads every active weight once per token: its bound is matvec GB/s of
    the weights' dtype ÷ bytes per token. Prefill, training and batched decode are matmuls:
    their bound is the GEMM peak of the dtype they compute in.
    """

    copy_gbps: float
    """GB/s of a large copy, bytes read + bytes written."""
    gemm_gflops: dict[str, float]
    """GFLOP/s of an n×n×n matmul by dtype: "float32", "bfloat16" ("float16" on CUDA)."""
    matvec_gbps: dict[str, float]
    """GB/s of weights read by a [1, n] × [n, m] product, by weight dtype: "float32",
    "bfloat16" (F.linear), "int8:float32", "int8:bfloat16" (int8 weights with per-row
    scales, `torch._weight_int8pack_mm`, activations after the colon; absent where the
    device has no such kernel)."""
    device: str = "cpu"
    """Where it was measured."""
    threads: int = 0
    """torch threads during the measurement (CPU)."""

    def gemm(self, dtype: str) -> float:
        """GEMM GFLOP/s of the dtype the matmuls run in (bf16 autocast: "bfloat16")."""
        if dtype not in self.gemm_gflops:
            raise ValueError(f"no GEMM peak for {dtype!r}; measured: {sorted(self.gemm_gflops)}")
        return self.gemm_gflops[dtype]

    def matvec(self, dtype: str, quantize: str | None = None) -> float:
        """Matrix-vector GB/s bounding a model in `dtype` whose weights are not quantized
        (None), or are "int8": then the int8 kernel's best rate over the activation dtypes
        measured (a model may round its activations to the kernel's fastest)."""
        if quantize:
            rates = [v for k, v in self.matvec_gbps.items() if k.startswith(f"{quantize}:")]
            if not rates:
                raise ValueError(f"no {quantize} matvec rate; measured: {sorted(self.matvec_gbps)}")
            return max(rates)
        if dtype not in self.matvec_gbps:
            raise ValueError(f"no matvec rate for {dtype!r}; measured: {sorted(self.matvec_gbps)}")
        return self.matvec_gbps[dtype]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Roofline:
        return cls(**d)

    def summary(self) -> str:
        """One line for a report's footer: 'roofline: copy 19.9 GB/s; GEMM fp32 249, ...'."""
        short = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}

        def name(key: str) -> str:
            weight, _, act = key.partition(":")
            return f"{weight} ({short.get(act, act)} x)" if act else short.get(key, key)

        gemm = ", ".join(f"{name(k)} {v:,.0f}" for k, v in self.gemm_gflops.items())
        matvec = ", ".join(f"{name(k)} {v:,.1f}" for k, v in self.matvec_gbps.items())
        return (
            f"roofline: copy {self.copy_gbps:,.1f} GB/s; GEMM {gemm} GFLOP/s; "
            f"matrix-vector {matvec} GB/s"
        )


def measure_roofline(
    device: str = "cpu",
    *,
    gemm_n: int = 0,
    matvec_bytes: int = 128 * 2**20,
    copy_bytes: int = 256 * 2**20,
    budget_s: float = 0.2,
) -> Roofline:
    """Measures the roofline of `device` with the current torch threads (cached: once per
    process, arguments and thread count). gemm_n 0: 2048 on the CPU (near peak on a few
    cores in a fraction of a second), 8192 on CUDA. About one to three seconds on a 2-core
    CPU."""
    return _measure_roofline(
        device, gemm_n, matvec_bytes, copy_bytes, budget_s, torch.get_num_threads()
    )


@functools.cache
def _measure_roofline(
    device: str, gemm_n: int, matvec_bytes: int, copy_bytes: int, budget_s: float, threads: int
) -> Roofline:
    n = gemm_n or (8192 if device.startswith("cuda") else 2048)
    gemm_dtypes = ["float32", "bfloat16"] + (["float16"] if device.startswith("cuda") else [])
    gemm = {d: matmul_gflops(n, getattr(torch, d), device, 3, budget_s) for d in gemm_dtypes}
    matvec = {}
    for d in ("float32", "bfloat16", "int8:float32", "int8:bfloat16"):
        try:
            matvec[d] = matvec_gbps(matvec_bytes, d, device, 3, budget_s)
        except (RuntimeError, NotImplementedError):  # no int8 kernel for this device/dtype
            if not d.startswith("int8"):
                raise
    copy = copy_gbps(copy_bytes, device, 3, budget_s)
    rates = [copy, *gemm.values(), *matvec.values()]
    assert all(math.isfinite(v) and v > 0 for v in rates), rates
    return Roofline(copy, gemm, matvec, device=device, threads=threads)


def decode_bound_tok_s(bytes_per_token: float, gbps: float) -> float:
    """Tokens/s a decode step reading bytes_per_token could reach at gbps."""
    return gbps * 1e9 / bytes_per_token


def gemm_bound_tok_s(flops_per_token: float, gflops: float) -> float:
    """Tokens/s a step of flops_per_token could reach at gflops."""
    return gflops * 1e9 / flops_per_token


def fraction_of_bound(measured: float | None, bound: float | None) -> float | None:
    """measured / bound, or None when either is missing."""
    return measured / bound if measured is not None and bound else None


def slug(name: str) -> str:
    """A machine's name for file names: 'NVIDIA H200' -> 'nvidia-h200'."""
    return "-".join("".join(c if c.isalnum() else " " for c in name.lower()).split())


def sync(device: str) -> None:
    """Waits for queued GPU work; a no-op on the CPU."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def reset_peak_rss() -> None:
    """Resets this process's resident-memory high-water mark (VmHWM) to its current size.

    Linux >= 4.0 (`/proc/self/clear_refs`, value 5); raises OSError where unsupported.
    """
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def rss_bytes() -> tuple[int, int]:
    """(current, peak since the last reset) resident memory of this process, in bytes."""
    fields = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0]) * 1024
    return fields["VmRSS"], fields["VmHWM"]


def reset_peak(device: str) -> int:
    """Starts a peak-memory window; returns the baseline to subtract: the bytes allocated on
    CUDA, the resident memory (RSS) on the CPU."""
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    reset_peak_rss()
    return rss_bytes()[0]


def peak_since(device: str, baseline: int) -> int:
    """Peak memory above the baseline since `reset_peak`."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated(device) - baseline
    return max(0, rss_bytes()[1] - baseline)
