"""keep_freed_memory: freed large blocks stay with the process for reuse (glibc only)."""

from __future__ import annotations

import subprocess
import sys

import pytest

SCRIPT = """
import sys, torch
from lightlong.bench.machine import rss_bytes
from lightlong.runtime import keep_freed_memory, release_freed_memory
keep = sys.argv[1] == "keep"
assert keep_freed_memory(keep)
before = rss_bytes()[0]
x = torch.ones(64 * 2**20 // 4)   # 64 MiB, over glibc's largest mmap threshold
del x
release_freed_memory() if not keep else None
print((rss_bytes()[0] - before) / 2**20)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tuning")
@pytest.mark.parametrize("mode", ["keep", "default"])
def test_freed_memory_is_kept_only_when_asked(mode):
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True
    )
    retained_mib = float(out.stdout.strip())
    if mode == "keep":
        assert retained_mib > 60, retained_mib
    else:
        assert retained_mib < 8, retained_mib
