"""Lightning attention's Triton backend: the kernels against the references, and dispatch.

Tests marked `triton` run the kernels: on CUDA when present, else on the CPU interpreter under
TRITON_INTERPRET=1 (`make test-triton-interpret`: small float32 shapes, seconds each), else
they are skipped. The dispatch tests run everywhere and never import triton.

# B batch, T tokens, H heads, K/V head dims, C block (chunk), N sequences
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import (
    TRITON_INTERPRETED,
    assert_close,
    lightlong_cli,
    requires_triton,
    triton_device,
)

import lightlong.ops.lightning._inputs as inputs_module
from lightlong.ops import lightning_attn, lightning_attn_naive, lightning_attn_step
from lightlong.ops.lightning._inputs import resolve_backend

TOL32 = 1e-5  # float32 kernels vs the float64 reference
DEVICE = triton_device()
KEYS = ("o", "final", "dq", "dk", "dv", "dinit")

# MiniMax-like rates, a zero rate, the slowest MiniMax rate, and rates whose chunk factors
# underflow to 0
DECAYS = {
    "minimax": [0.5, 0.03],
    "zero": [0.0, 0.0],
    "slow-fast": [3.9e-8, 8.0],
    "extreme": [60.0, 1e-9],
}


def leaves(B, T, H, K, V, *, N=None, init=True, seed=0):
    """float32 leaves q, k [B, T, H, K], v [B, T, H, V], initial state [N, H, K, V] (or
    None) on the kernels' device."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(B, T, H, K), (B, T, H, K), (B, T, H, V)]
    if init:
        shapes.append((B if N is None else N, H, K, V))
    xs = [torch.randn(shape, generator=g).to(DEVICE).requires_grad_() for shape in shapes]
    return xs if init else [*xs, None]


def run(op, xs, decay, cot_seed=1, use_o=True, **kw) -> dict:
    """op's outputs and gradients under random cotangents (none on o unless use_o), on CPU
    float64 for comparison."""
    q, k, v, s = xs
    o, final = op(q, k, v, decay.to(q.device), initial_state=s, output_final_state=True, **kw)
    g = torch.Generator().manual_seed(cot_seed)
    do, dfinal = (torch.randn(x.shape, generator=g).to(x.device, x.dtype) for x in (o, final))
    outs, cots = ([o, final], [do, dfinal]) if use_o else ([final], [dfinal])
    present = [x for x in xs if x is not None]
    grads = torch.autograd.grad(outs, present, cots, materialize_grads=True)
    named = dict(zip(("dq", "dk", "dv", "dinit"), grads, strict=False))
    return {key: x.detach().cpu().double() for key, x in dict(o=o, final=final, **named).items()}


def against_naive(xs, decay, use_o=True, **kw) -> dict:
    """Triton's outputs and gradients vs the float64 naive reference on the same values;
    asserts each within TOL32 and returns the errors."""
    out = run(lightning_attn, xs, decay, use_o=use_o, backend="triton", **kw)
    ref_xs = [None if x is None else x.detach().cpu().double().requires_grad_() for x in xs]
    kw.pop("block_size", None)
    ref = run(lightning_attn_naive, ref_xs, decay, use_o=use_o, **kw)
    return {key: assert_close(out[key], ref[key], TOL32, key) for key in out}


# ------------------------------------------------------------------ forward and backward

# (B, T, H, K, V, C): odd lengths, partial last chunks, K != V, head dims below 16
SHAPES = [
    pytest.param(1, 1, 1, 4, 4, 16, id="T1"),
    pytest.param(2, 77, 2, 20, 12, 16, id="B2-T77-K20-V12-C16"),
    pytest.param(1, 65, 2, 16, 16, 64, id="T=C+1-C64"),
    pytest.param(1, 101, 2, 32, 24, 32, id="T101-K32-V24-C32"),
    pytest.param(1, 300, 1, 8, 32, 128, id="T300-K8-V32-C128"),
    pytest.param(2, 45, 2, 5, 7, None, id="T45-K5-V7-Cdefault"),
]


@pytest.mark.parametrize("init", [False, True], ids=["no-init", "init"])
@pytest.mark.parametrize(("B", "T", "H", "K", "V", "C"), SHAPES)
@pytest.mark.parametrize("decay", list(DECAYS), ids=list(DECAYS))
@pytest.mark.triton
@requires_triton
def test_kernels_match_naive(B, T, H, K, V, C, init, decay):
    """Output, final state and the gradients of q, k, v and the initial state."""
    rates = torch.tensor(DECAYS[decay][:H])
    against_naive(leaves(B, T, H, K, V, init=init), rates, block_size=C)


@pytest.mark.parametrize("scale", [None, 1.0], ids=["scale=None", "scale=1"])
@pytest.mark.triton
@requires_triton
def test_no_final_state_and_scale(scale):
    """output_final_state=False returns None; scale None means K**-0.5."""
    q, k, v, s = leaves(1, 40, 2, 9, 6)
    decay = torch.tensor(DECAYS["minimax"]).to(DEVICE)
    o, final = lightning_attn(q, k, v, decay, initial_state=s, scale=scale, backend="triton")
    q64, k64, v64, s64 = (x.detach().cpu().double() for x in (q, k, v, s))
    ref, _ = lightning_attn_naive(q64, k64, v64, decay.cpu(), initial_state=s64, scale=scale)
    assert final is None and o.dtype == torch.float32 and o.shape == (1, 40, 2, 6)
    assert_close(o.cpu(), ref, TOL32, "o")


@pytest.mark.triton
@requires_triton
def test_gradient_through_the_final_state_only():
    """No cotangent reaches o: the kernels' backward gets do = None."""
    xs = leaves(2, 50, 2, 12, 10)
    against_naive(xs, torch.tensor(DECAYS["minimax"]), use_o=False, block_size=16)


# -------------------------------------------------------------------------------- varlen

# Chunk 16: sequences start at 0, 5, 42, 42, 43, 113 (none after the first is aligned),
# one is empty and one a single token.
VARLEN = (5, 37, 0, 1, 70, 20)


@pytest.mark.parametrize("init", [False, True], ids=["no-init", "init"])
@pytest.mark.triton
@requires_triton
def test_varlen_unaligned_starts_and_empty_sequence(init):
    offsets = [0, *itertools.accumulate(VARLEN)]
    cu = torch.tensor(offsets, device=DEVICE)
    xs = leaves(1, offsets[-1], 2, 12, 20, N=len(VARLEN), init=init)
    decay = torch.tensor(DECAYS["minimax"])
    errs = against_naive(xs, decay, cu_seqlens=cu, block_size=16)
    assert max(errs.values()) < TOL32

    # each sequence alone gives the same outputs and final state
    q, k, v, s = (None if x is None else x.detach() for x in xs)
    o, final = lightning_attn(q, k, v, decay.to(DEVICE), initial_state=s, cu_seqlens=cu,
                              output_final_state=True, block_size=16, backend="triton")  # fmt: skip
    for n, (a, b) in enumerate(itertools.pairwise(offsets)):
        o_n, final_n = lightning_attn(
            q[:, a:b], k[:, a:b], v[:, a:b], decay.to(DEVICE), block_size=16, backend="triton",
            initial_state=None if s is None else s[n : n + 1], output_final_state=True,
        )  # fmt: skip
        assert_close(o[:, a:b].cpu(), o_n.cpu(), 1e-6, f"sequence {n} o")
        assert_close(final[n : n + 1].cpu(), final_n.cpu(), 1e-6, f"sequence {n} final")
    if s is not None:
        assert torch.equal(final[2], s[2]), "the empty sequence's final state is its initial one"


@pytest.mark.triton
@requires_triton
def test_chunk_tables_cover_every_token_once():
    from lightlong.ops.lightning.triton._common import chunk_tables

    offsets = [0, *itertools.accumulate(VARLEN)]
    t = chunk_tables(offsets, 16, torch.device("cpu"))
    spans = t.spans.tolist()
    assert t.first.tolist() == [0, 1, 4, 4, 5, 10, 12] and t.num_chunks == 12
    assert spans[:5] == [[0, 5], [5, 42], [21, 42], [37, 42], [42, 43]]
    covered = [t for start, end in spans for t in range(start, min(start + 16, end))]
    assert covered == list(range(offsets[-1]))


@pytest.mark.triton
@requires_triton
def test_interpreter_runs_one_autotune_config():
    from lightlong.ops.lightning.triton._common import INTERPRETED, autotune_configs

    assert INTERPRETED == TRITON_INTERPRETED
    assert len(autotune_configs()) == (1 if INTERPRETED else 6)


# -------------------------------------------------------------------------------- decode


def qkv_views(B, H, K, seed):
    """q, k, v [B, 1, H, K] as the model makes them: views into one packed projection."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(B, 1, H, 3 * K, generator=g).to(DEVICE)
    return qkv.split(K, dim=-1)


@pytest.mark.parametrize(("B", "H", "K"), [(3, 2, 32), (2, 2, 128), (1, 1, 5)])
@pytest.mark.triton
@requires_triton
def test_decode_kernel_matches_torch_step_in_place(B, H, K):
    decay = torch.tensor([0.5, 3.9e-8][:H]).to(DEVICE)
    state = torch.randn(B, H, K, K, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    ref_state = state.clone()
    ptr = state.data_ptr()
    for step in range(3):
        q, k, v = qkv_views(B, H, K, seed=step)
        assert B * H == 1 or not q.is_contiguous()
        o = lightning_attn_step(q, k, v, decay, state, backend="triton")
        o_ref = lightning_attn_step(q, k, v, decay, ref_state, backend="torch")
        assert o.shape == (B, 1, H, K) and o.dtype == q.dtype
        assert_close(o.cpu(), o_ref.cpu(), 1e-6, f"step {step} o")
        assert_close(state.cpu(), ref_state.cpu(), 1e-6, f"step {step} state")
    assert state.data_ptr() == ptr


@pytest.mark.triton
@requires_triton
def test_prefill_then_decode_equals_one_forward():
    """Triton prefill, then Triton decode steps from its final state, equals one forward."""
    B, T, H, K, V, prefill = 2, 24, 2, 8, 16, 17
    q, k, v, s = (x.detach() for x in leaves(B, T, H, K, V))
    decay = torch.tensor(DECAYS["minimax"]).to(DEVICE)
    kw = dict(output_final_state=True, block_size=16, backend="triton")
    o_ref, final_ref = lightning_attn(q, k, v, decay, initial_state=s, **kw)
    o, state = lightning_attn(q[:, :prefill], k[:, :prefill], v[:, :prefill], decay,
                              initial_state=s, **kw)  # fmt: skip
    outs = [o]
    for t in range(prefill, T):
        sl = slice(t, t + 1)
        outs.append(lightning_attn_step(q[:, sl], k[:, sl], v[:, sl], decay, state))
    assert_close(torch.cat(outs, dim=1).cpu(), o_ref.cpu(), 1e-6, "decoded o")
    assert_close(state.cpu(), final_ref.cpu(), 1e-6, "decoded state")


# ------------------------------------------------------------------------------ dispatch


def _cpu_args():
    q, k, v = (torch.randn(1, 8, 2, 4) for _ in range(3))
    return q, k, v, torch.tensor([0.1, 0.2])


@pytest.mark.parametrize("op", ["lightning_attn", "lightning_attn_step"])
def test_triton_on_cpu_needs_the_interpreter(op, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(inputs_module, "triton_installed", lambda: True)
    q, k, v, decay = _cpu_args()
    with pytest.raises(
        ValueError, match=r"backend='triton' expects CUDA tensors.*TRITON_INTERPRET"
    ):
        if op == "lightning_attn":
            lightning_attn(q, k, v, decay, backend="triton")
        else:
            state = torch.zeros(1, 2, 4, 4)
            lightning_attn_step(q[:, :1], k[:, :1], v[:, :1], decay, state, backend="triton")


def test_triton_not_installed_is_named(monkeypatch):
    monkeypatch.setattr(inputs_module, "triton_installed", lambda: False)
    with pytest.raises(ValueError, match=r"backend='triton' needs the triton package"):
        lightning_attn(*_cpu_args(), backend="triton")


@pytest.mark.parametrize(
    ("overrides", "pattern"),
    [
        pytest.param(dict(dtype=torch.float64), "float64", id="float64"),
        pytest.param(dict(block_size=8), "block_size", id="block-8"),
        pytest.param(dict(block_size=256), "block_size", id="block-256"),
        pytest.param(dict(block_size=48), "block_size", id="block-48"),
    ],
)
def test_triton_rejects_what_the_kernels_lack(overrides, pattern, monkeypatch):
    """Checked before triton is imported, so these run on any machine."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(inputs_module, "triton_installed", lambda: True)
    q, k, v, decay = _cpu_args()
    dtype = overrides.pop("dtype", torch.float32)
    with pytest.raises(ValueError, match=pattern):
        lightning_attn(q.to(dtype), k.to(dtype), v.to(dtype), decay, backend="triton", **overrides)


@pytest.mark.parametrize(
    ("device", "dtype", "installed", "expected"),
    [
        ("cuda", torch.bfloat16, True, "triton"),
        ("cuda", torch.float32, True, "triton"),
        ("cuda", torch.float64, True, "torch"),
        ("cuda", torch.bfloat16, False, "torch"),
        ("cpu", torch.float32, True, "torch"),
    ],
)
def test_auto_picks_triton_on_cuda_only(device, dtype, installed, expected, monkeypatch):
    monkeypatch.setattr(inputs_module, "triton_installed", lambda: installed)
    x = SimpleNamespace(device=torch.device(device), dtype=dtype)
    assert resolve_backend("auto", x, "test") == expected
    assert resolve_backend("torch", x, "test") == "torch"


def test_cpu_path_never_imports_triton():
    """backend "auto" on CPU tensors, forward, backward and decode, in a fresh process."""
    code = """
import sys, torch
from lightlong.ops import lightning_attn, lightning_attn_step
q, k, v = (torch.randn(1, 20, 2, 8, requires_grad=True) for _ in range(3))
o, final = lightning_attn(q, k, v, torch.tensor([0.1, 0.2]), output_final_state=True)
o.sum().backward()
lightning_attn_step(q[:, :1].detach(), k[:, :1].detach(), v[:, :1].detach(),
                    torch.tensor([0.1, 0.2]), final.detach().contiguous())
assert "triton" not in sys.modules, "the CPU path imported triton"
print("ok")
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


# ----------------------------------------------------------------------------- benchmark

CUDA_CONFIG = Path(__file__).resolve().parents[1] / "benchmarks" / "attention-cuda.toml"


def test_cuda_benchmark_cli_help_and_config():
    assert lightlong_cli("bench", "attention", "--device", "cuda", "--help").returncode == 0
    out = lightlong_cli("bench", "attention", "--config", str(CUDA_CONFIG), "--print-config")
    cfg = json.loads(out.stdout)
    assert (cfg["device"], cfg["dtype"], cfg["lengths"][-1]) == ("cuda", "bfloat16", 2**20)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without a GPU")
def test_cuda_benchmark_without_a_gpu_is_a_clear_error():
    proc = lightlong_cli("bench", "attention", "--config", str(CUDA_CONFIG))
    assert proc.returncode == 2, proc.stderr
    assert "device 'cuda': torch sees no CUDA device" in proc.stderr


@pytest.mark.slow  # ~1 min on the interpreter: ten worker processes
@pytest.mark.triton
@requires_triton
def test_gpu_benchmark_runs_end_to_end(tmp_path):
    """The GPU comparison at toy sizes: on the interpreter here, on the GPU where there is one."""
    from lightlong.bench.attention import AttentionBenchConfig
    from lightlong.bench.attention_cuda import run_attention_bench_cuda

    cfg = AttentionBenchConfig(
        device=DEVICE, dtype="float32", lengths=[32, 64], heads=2, head_dim=16, block_size=16,
        tokens=64, decode_batches=[1, 2], decode_heads=2, out_dir=str(tmp_path),
    )  # fmt: skip
    report = run_attention_bench_cuda(cfg)
    assert [(r["T"], r["B"]) for r in report["rows"]] == [(32, 2), (64, 1)]
    for row in report["rows"]:
        for op in ("triton", "torch", "sdpa"):
            assert row[f"{op}_fwd_ms"] > 0 and row[f"{op}_fwdbwd_tflops"] > 0, (op, row)
    assert [d["B"] for d in report["decode"]] == [1, 2]
    assert all(d["triton"]["us"] > 0 and d["torch"]["gbps"] > 0 for d in report["decode"])
    assert report["machine"]["reference_errors"]["triton"] < 1e-4
    (json_path,) = tmp_path.glob("attention-*.json")
    assert json.loads(json_path.read_text())["targets"]["decode_b64_vs_copy"]["met"] is None
    assert json_path.with_suffix(".png").stat().st_size > 0
