"""Process-level settings for long sequences on the CPU (called by applications, not on import).

PyTorch's CPU allocator is plain malloc. glibc serves every block over 32 MiB with a fresh
mmap and unmaps it on free, so each large activation is page-faulted in again on every
use: at T ≥ 16K with a 512-wide model most tensors cross that line, and prefill ran 1.6x
slower at 64K than with freed memory kept for reuse (measured on a 2-core VM). `lightlong`
commands and benchmark workers call `keep_freed_memory()` at start-up; library users opt in.
Training does not: its step ran no faster with it, and the heap fragmented to 2.5x the live
peak (a 64K-token step of `small` went from ~7 GB to past 23 GB).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_DEFAULT_MMAP_MAX = 65536
_DEFAULT_TRIM_THRESHOLD = 128 * 1024


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "mallopt") else None


def keep_freed_memory(keep: bool = True) -> bool:
    """keep=True: malloc serves large blocks from its heap and never returns freed memory
    to the OS, so repeated large allocations reuse pages (a caching allocator's behaviour);
    keep=False: glibc's defaults. Returns False where malloc is not glibc's (nothing done)."""
    libc = _glibc()
    if libc is None:
        return False
    mmap_max, trim = (0, 2**31 - 1) if keep else (_DEFAULT_MMAP_MAX, _DEFAULT_TRIM_THRESHOLD)
    return bool(libc.mallopt(_M_MMAP_MAX, mmap_max)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, trim))


def release_freed_memory() -> None:
    """Returns the heap's free pages to the OS (malloc_trim), e.g. before measuring memory."""
    libc = _glibc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def check_device(name: str | torch.device) -> torch.device:
    """`name` as a torch device, or ValueError saying why it cannot be used here (CUDA or MPS
    not available, a GPU index past the count, an unknown device type)."""
    import torch

    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"device {str(name)!r}: {e}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else "no visible GPU"
            raise ValueError(f"device {str(name)!r}: CUDA is not available ({build} of torch)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(
                f"device {str(name)!r}: only {torch.cuda.device_count()} CUDA device(s)"
            )
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {str(name)!r}: MPS is not available")
    elif device.type == "meta":
        raise ValueError(f"device {str(name)!r}: the meta device holds no data; use cpu or cuda")
    return device


DTYPE_NAMES = ("float32", "bfloat16", "float16", "float64")
"""The torch dtypes lightlong's commands and configs name."""


def parse_dtype(name: str, allowed: tuple[str, ...] = DTYPE_NAMES, what: str = "dtype"):
    """The torch dtype `name` ("bfloat16", ...), or ValueError naming `what` and `allowed`."""
    import torch

    if name not in allowed:
        raise ValueError(f"{what} must be one of {list(allowed)}, got {name!r}")
    return getattr(torch, name)
