"""Shared test helpers: seeding and error-reporting comparisons.

Errors are relative Frobenius norms measured in float64 against a reference (ideally one
computed in float64): err = ||actual − ref||_F / ||ref||_F.
"""

from __future__ import annotations

import importlib.util
import io
import os
import subprocess
import sys
import warnings
from collections.abc import Iterator

import pytest
import torch
from torch import Tensor

SEED = 0


@pytest.fixture(autouse=True)
def _seed() -> None:
    """Every test starts from the same global RNG state (tests should still prefer their own
    torch.Generator, so that results do not depend on test order)."""
    torch.manual_seed(SEED)


def rel_err(actual: Tensor, ref: Tensor) -> float:
    """||actual − ref||_F / ||ref||_F, in float64; the absolute error when ref is all zeros.

    NaN or inf anywhere gives NaN or inf, which no tolerance accepts.
    """
    if actual.shape != ref.shape:
        raise AssertionError(f"shape mismatch: {tuple(actual.shape)} vs {tuple(ref.shape)}")
    a = actual.detach().to(torch.float64)
    b = ref.detach().to(torch.float64)
    diff = torch.linalg.vector_norm(a - b).item()
    denom = torch.linalg.vector_norm(b).item()
    return diff if denom == 0.0 else diff / denom


def assert_close(actual: Tensor | None, ref: Tensor | None, tol: float, name: str) -> float:
    """Raises AssertionError, stating the observed error, unless rel_err(actual, ref) <= tol.

    Both None passes (an output that was not requested). Returns the error.
    """
    if actual is None or ref is None:
        if actual is None and ref is None:
            return 0.0
        raise AssertionError(
            f"{name}: one side is None (actual={type(actual).__name__}, ref={type(ref).__name__})"
        )
    err = rel_err(actual, ref)
    if not err <= tol:  # also catches NaN
        raise AssertionError(
            f"{name}: relative error {err:.3e} exceeds tolerance {tol:.1e} "
            f"(shape {tuple(actual.shape)}, {actual.dtype} vs {ref.dtype})"
        )
    return err


def make(cfg, seed: int = 0):
    """A `HybridLM` of `cfg` in eval mode, seeded, with norms drawn from [0.5, 1.5] so that
    a swapped weight would show (all-ones norms hide some)."""
    from lightlong import HybridLM

    torch.manual_seed(seed)
    model = HybridLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.uniform_(0.5, 1.5)
    return model


def lightlong_cli(*args: str) -> subprocess.CompletedProcess:
    """Runs `python -m lightlong ARGS` and captures its output."""
    return subprocess.run(
        [sys.executable, "-m", "lightlong", *args], capture_output=True, text=True
    )


def triton_device() -> str | None:
    """Where lightning's backend "triton" runs in this process: "cpu" on the Triton
    interpreter (TRITON_INTERPRET=1), "cuda" with a GPU and triton, else None."""
    if importlib.util.find_spec("triton") is None:
        return None
    if os.environ.get("TRITON_INTERPRET") == "1":
        return "cpu"
    return "cuda" if torch.cuda.is_available() else None


TRITON_INTERPRETED = triton_device() == "cpu"
requires_triton = pytest.mark.skipif(
    triton_device() is None,
    reason="backend 'triton' needs CUDA and triton, or TRITON_INTERPRET=1 "
    "(make test-triton-interpret)",
)


@pytest.fixture
def cli(monkeypatch, capsys):
    """Runs `lightlong ARGS` in this process; returns (exit code, stdout, stderr)."""
    from lightlong.cli import main
    from lightlong.runtime import keep_freed_memory

    monkeypatch.setattr(warnings, "formatwarning", warnings.formatwarning)  # main sets it
    monkeypatch.setenv("COLUMNS", "100")

    def run(*argv: str, stdin: str | None = None) -> tuple[int, str, str]:
        if stdin is not None:
            monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
        code = 0
        try:
            main(list(argv))
        except SystemExit as e:
            code = e.code
        finally:
            keep_freed_memory(False)  # main keeps freed memory; not for the test process
        out = capsys.readouterr()
        return code, out.out, out.err

    return run


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """Runs a module's offline references on one torch thread, as its servers and
    subprocesses do (two threads on two cores shared with a server run many times slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
