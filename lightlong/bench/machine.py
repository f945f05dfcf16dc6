"""What machine a benchmark ran on, and its measured matmul peak and memory use."""

from __future__ import annotations

import os
import platform
import time

import torch


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


def matmul_gflops(
    n: int = 4096, dtype: torch.dtype = torch.float32, device: str = "cpu", reps: int = 5
) -> float:
    """Best achieved GFLOP/s of an n×n×n matmul: the machine's practical peak."""
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    out = torch.empty(n, n, dtype=dtype, device=device)
    torch.matmul(a, b, out=out)
    best = float("inf")
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        torch.matmul(a, b, out=out)
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def copy_gbps(nbytes: int = 2**30, device: str = "cpu", reps: int = 5) -> float:
    """Best achieved GB/s of copying nbytes (each byte read once and written once)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * nbytes / best / 1e9


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
