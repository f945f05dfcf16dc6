"""The benchmarks' roofline (machine.Roofline, roofline.py's byte and FLOP counts), their
refusal to overwrite results, failed points reported as not measured, and predictions that
are only predictions."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from lightlong.bench import generate, machine, model, train, worker
from lightlong.bench.generate import GenerateBenchConfig, run_generate_bench
from lightlong.bench.machine import Roofline, decode_bound_tok_s, fraction_of_bound
from lightlong.bench.model import ModelBenchConfig, predict_seconds
from lightlong.bench.report import check_overwrite, fit_power, target, write_results
from lightlong.bench.roofline import (
    decode_bytes_per_token,
    forward_flops_per_token,
    int8_bytes_per_token,
    matmul_params_per_token,
    train_flops_per_token,
    weight_bytes_per_token,
)
from lightlong.bench.train import TrainBenchConfig
from lightlong.model import HybridConfig


def tiny_roofline() -> Roofline:
    """Measured at sizes far below the caches: milliseconds, numbers of no meaning."""
    return machine.measure_roofline(
        "cpu", gemm_n=64, matvec_bytes=2**16, copy_bytes=2**16, budget_s=0.0
    )


FAKE = Roofline(
    copy_gbps=20.0,
    gemm_gflops={"float32": 200.0, "bfloat16": 600.0},
    matvec_gbps={"float32": 24.0, "bfloat16": 12.0, "int8:float32": 1.0, "int8:bfloat16": 15.0},
)

# -- the roofline --------------------------------------------------------------------------


def test_roofline_rates_are_positive_and_finite():
    r = tiny_roofline()
    assert set(r.gemm_gflops) == {"float32", "bfloat16"}
    assert {"float32", "bfloat16"} <= set(r.matvec_gbps)
    for rate in [r.copy_gbps, *r.gemm_gflops.values(), *r.matvec_gbps.values()]:
        assert math.isfinite(rate) and rate > 0, r
    assert Roofline.from_dict(json.loads(json.dumps(r.to_dict()))) == r
    assert r.threads == torch.get_num_threads() and r.device == "cpu"


def test_roofline_bounds_by_dtype():
    assert FAKE.gemm("bfloat16") == 600.0
    assert FAKE.matvec("float32") == 24.0
    # int8 weights: the kernel's best rate over the activation dtypes measured
    assert FAKE.matvec("float32", "int8") == 15.0
    with pytest.raises(ValueError, match="float16"):
        FAKE.gemm("float16")
    line = FAKE.summary()
    assert line.startswith("roofline: copy 20.0 GB/s; GEMM fp32 200, bf16 600 GFLOP/s")
    assert "int8 (bf16 x) 15.0" in line
    assert decode_bound_tok_s(94e6, 24.0) == pytest.approx(24e9 / 94e6)
    assert fraction_of_bound(50.0, 200.0) == 0.25
    assert fraction_of_bound(None, 200.0) is None


# -- bytes and FLOPs per token, by hand on `tiny` ------------------------------------------
# tiny: D = 64, layers L L L S, H = 4, G = 2, E = 16, C = 64, 4 experts top-2 of I = 128,
# vocab 512, untied LM head.
D, H, G, E, C, I, V = 64, 4, 2, 16, 64, 128, 512
LIGHTNING = 3 * H * E * D + H * E * D + D * H * E  # qkv, output gate, out_proj
SOFTMAX = H * E * D + 2 * G * E * D + D * H * E  # q, k, v, o
MOE = 4 * D + 2 * 3 * I * D  # router, 2 of 4 SwiGLU experts
HEAD = V * D
NORMS = 4 * 2 * D + 3 * H * E + D  # per layer 2, each lightning layer's output norm, final


def test_matmul_params_and_weight_bytes_by_hand():
    c = HybridConfig.from_preset("tiny")
    matmul = 3 * LIGHTNING + SOFTMAX + 4 * MOE + HEAD
    assert matmul_params_per_token(c) == matmul == 304_128
    assert weight_bytes_per_token(c) == 4 * (matmul + NORMS)
    assert weight_bytes_per_token(c, "bfloat16") == 2 * (matmul + NORMS)
    # int8: projections, experts and the (untied) LM head one byte a weight + one bf16
    # scale per output row; the router and norms stay fp32
    quantized = 3 * LIGHTNING + SOFTMAX + 4 * 2 * 3 * I * D + HEAD
    rows = 3 * (3 * H * E + H * E + D) + (H * E + 2 * G * E + D) + 4 * 2 * (I + D + I) + V
    kept = 4 * 4 * D + NORMS
    assert weight_bytes_per_token(c, "float32", "int8") == quantized + 2 * rows + 4 * kept
    assert int8_bytes_per_token(c) == quantized + 2 * rows
    # tied, the head is the embedding's and stays fp32
    tied = dataclasses.replace(c, tie_word_embeddings=True)
    assert weight_bytes_per_token(tied, "float32", "int8") == (
        quantized - HEAD + 2 * (rows - V) + 4 * (kept + HEAD)
    )


def test_decode_bytes_by_hand():
    c = HybridConfig.from_preset("tiny")
    L = 1000
    got = decode_bytes_per_token(c, L)
    assert got["lightning_state"] == 3 * 2 * H * E * E * 4  # fp32 state read and written
    assert got["softmax_kv"] == 1 * 2 * L * G * E * 4  # K and V of every position
    assert got["total"] == weight_bytes_per_token(c) + got["lightning_state"] + got["softmax_kv"]
    assert decode_bytes_per_token(c, L, "bfloat16")["softmax_kv"] == 2 * L * G * E * 2


def test_forward_and_train_flops_by_hand():
    c = HybridConfig.from_preset("tiny")
    L = 1000
    matmul = 2 * (3 * LIGHTNING + SOFTMAX + 4 * MOE + HEAD)
    # lightning, tiled: H·(2·C·(K+V) + 4·K·V); softmax at the mean position L/2: 4·H·E·L/2
    prefill = matmul + 3 * H * (2 * C * 2 * E + 4 * E * E) + 2 * H * E * L
    assert forward_flops_per_token(c, L) == prefill
    # decode: the recurrent step 4·H·E·E; softmax over all L positions
    assert forward_flops_per_token(c, L, decode=True) == matmul + 3 * 4 * H * E * E + 4 * H * E * L
    assert forward_flops_per_token(c, L, lm_head=False) == prefill - 2 * HEAD
    assert train_flops_per_token(c, L) == 3 * prefill


def test_flops_refuse_layer_types_they_do_not_count():
    c = HybridConfig.from_preset("tiny")
    c.layer_types = ["lightning", "cosformer", "lightning", "softmax"]
    with pytest.raises(ValueError, match="cosformer"):
        forward_flops_per_token(c, 100)


def test_small_decode_reads_the_issues_94_mb():
    c = HybridConfig.from_preset("small")
    assert weight_bytes_per_token(c) == pytest.approx(94.0e6, rel=0.01)


# -- results are not overwritten -----------------------------------------------------------


def test_write_results_refuses_existing_files_unless_overwrite(tmp_path):
    stem = tmp_path / "x-cpu"
    (tmp_path / "x-cpu.md").write_text("committed\n")
    drawn = []
    with pytest.raises(ValueError, match=r"x-cpu\.md already exist.*--overwrite"):
        write_results(stem, {"a": 1}, "new", lambda r, p: drawn.append(p))
    assert (tmp_path / "x-cpu.md").read_text() == "committed\n" and not drawn
    write_results(stem, {"a": 1}, "new", lambda r, p: p.write_bytes(b"png"), overwrite=True)
    assert (tmp_path / "x-cpu.md").read_text() == "new\n"
    assert json.loads((tmp_path / "x-cpu.json").read_text()) == {"a": 1}
    check_overwrite(tmp_path / "elsewhere", overwrite=False)  # nothing there: no error


@pytest.mark.parametrize(
    ("module", "cfg", "stem"),
    [
        (generate, GenerateBenchConfig(preset="tiny"), "generate-cpu"),
        (model, ModelBenchConfig(preset="tiny"), "model-cpu"),
        (train, TrainBenchConfig(preset="tiny"), "train-cpu"),
    ],
    ids=["generate", "model", "train"],
)
def test_bench_refuses_before_measuring(tmp_path, monkeypatch, module, cfg, stem):
    def never(*a, **k):
        raise AssertionError("measured although the results could not be written")

    monkeypatch.setattr(module, "measure_roofline", never)
    monkeypatch.setattr(module, "run_in_fresh_process", never)
    (tmp_path / f"{stem}.json").write_text("{}")
    cfg.out_dir, cfg.transformers = str(tmp_path), False
    run = getattr(module, f"run_{module.__name__.rsplit('.', 1)[1]}_bench")
    with pytest.raises(ValueError, match="--overwrite"):
        run(cfg)


def test_cli_names_the_files_and_the_flag(tmp_path):
    from conftest import lightlong_cli

    (tmp_path / "model-cpu.png").write_bytes(b"")
    proc = lightlong_cli("bench", "model", "--preset", "tiny", "--out-dir", str(tmp_path))
    assert proc.returncode == 2
    assert "model-cpu.png already exist: pass --overwrite" in proc.stderr


# -- failed points are failed, not met -----------------------------------------------------


def test_prefix_shorter_than_the_prefill_chunk_is_refused_before_running():
    cfg = GenerateBenchConfig(preset="tiny", prefix=1000, prefill_chunk=4096)
    with pytest.raises(ValueError, match=r"prefix \(1000\) must be a multiple of prefill_chunk"):
        cfg.validate()
    GenerateBenchConfig(preset="tiny", prefix=8192, prefill_chunk=4096).validate()


def test_a_failed_point_is_reported_failed_never_met(tmp_path, monkeypatch, capsys):
    """Every continuation and int8 point fails; one context only: the old report printed
    the flat-decode target 'met' (a length against itself)."""

    def fake(spec: dict, timeout_s: float, failed: list | None = None) -> dict | None:
        if spec["mode"] == "continuation" or spec.get("quantize"):
            failed.append({"what": worker.describe_spec(spec), "error": "RuntimeError: boom"})
            return None
        if spec["mode"] == "batched":
            return {"decode_tok_s_b1": 100.0, f"decode_tok_s_b{spec['batch']}": 900.0}
        return {"prefill_s": 0.5, "decode_tok_s": 100.0, "peak_bytes": 2**20,
                "cache_bytes": {"total": 2**20}}  # fmt: skip

    monkeypatch.setattr(generate, "run_in_fresh_process", fake)
    monkeypatch.setattr(generate, "measure_roofline", lambda device: FAKE)
    cfg = GenerateBenchConfig(preset="tiny", contexts=[64], long_prompt=0, transformers=False,
                              prefix=64, prefill_chunk=64, precision_context=64,
                              out_dir=str(tmp_path))  # fmt: skip
    report = run_generate_bench(cfg)
    t = report["targets"]
    assert t["linear_decode_flat"]["met"] is None
    assert t["continuation_vs_fresh"]["met"] is None
    assert t["tiny:int8_decode_vs_float32"]["met"] is None
    assert not any(v["met"] for v in t.values() if v["value"] is None)
    assert len(report["failed"]) == 2 + 2  # continuation and int8 of tiny and tiny-linear
    out = capsys.readouterr().out
    assert "failed (not measured): generate lightlong mode=continuation" in out
    assert "| lightlong:tiny | - | - | failed" in out
    assert "tiny-linear decode tok/s 64/64 = - (>= 0.9, not measured)" in out
    # the rows that ran carry their bounds: decode by bandwidth, prefill by GEMM
    c = report["context"]["lightlong:tiny"][0]
    nbytes = decode_bytes_per_token(model.comparable_config("tiny"), 64)["total"]
    assert c["decode_of_bound"] == pytest.approx(100.0 / (24e9 / nbytes))
    flops = forward_flops_per_token(model.comparable_config("tiny"), 64, lm_head=False)
    assert c["prefill_of_gemm"] == pytest.approx(128 * flops / 1e9 / 200.0)
    bf16 = next(e for e in report["precision"] if e["dtype"] == "bfloat16")
    half = decode_bytes_per_token(model.comparable_config("tiny"), 64, "bfloat16")["total"]
    assert bf16["decode_vs_float32"] == 1.0
    assert bf16["decode_bound_tok_s"] == pytest.approx(12e9 / half)  # bf16 matvec GB/s


def test_targets_with_no_value_are_never_met():
    for op in (">=", "<="):
        assert target(None, op, 1.0, "x")["met"] is None


# -- predictions stay predictions ----------------------------------------------------------


def test_prediction_from_noisy_points_is_bounded():
    # two short, noisy points: 1K 1 ms, 2K 100 ms (a power of 6.6) once predicted 64K at
    # ~1e9 s; the exponent is clamped at 3
    noisy = [(1024, 0.001), (2048, 0.1)]
    assert predict_seconds(noisy, 65536) == pytest.approx(0.1 * 32**3)
    exact = [(1024, 1.0), (2048, 4.0), (4096, 16.0)]
    assert predict_seconds(exact, 8192) == pytest.approx(64.0)
    assert fit_power(exact)[1] == pytest.approx(2.0)
    assert predict_seconds([(1024, 1.0)], 2048) == 4.0


def test_a_predicted_point_is_marked_and_not_joined():
    from lightlong import plot

    fig, ax = plot.pyplot().subplots()
    ax.plot([1, 2], [1, 4], label="measured")
    plot.predicted(ax, 1024, 1e6, "C3", "softmax at 1M")
    (point,) = [ln for ln in ax.get_lines() if "predicted" in ln.get_label()]
    assert len(point.get_xdata()) == 1 and point.get_linestyle() == "None"
    assert point.get_markerfacecolor() == "none"
    assert any(t.get_text() == "predicted" for t in ax.texts)
    plot.pyplot().close(fig)


# -- the worker's precisions ---------------------------------------------------------------


@pytest.fixture
def tiny_checkpoint(tmp_path):
    return model.save_random_checkpoint(model.comparable_config("tiny"), tmp_path / "tiny")


def test_worker_decodes_with_int8_and_bf16_weights(tiny_checkpoint, monkeypatch):
    spec = {"kind": "generate", "impl": "lightlong", "checkpoint": str(tiny_checkpoint),
            "mode": "context", "context": 32, "new_tokens": 3, "batch": 1, "suffix": 1,
            "prefill_chunk": 64, "device": "cpu"}  # fmt: skip
    for dtype, quantize in (("float32", "int8"), ("bfloat16", None)):
        r = worker.measure_generate({**spec, "dtype": dtype, "quantize": quantize})
        assert r["decode_tok_s"] > 0 and r["prefill_s"] > 0
    with pytest.raises(ValueError, match="quantize"):
        worker.measure_generate({**spec, "dtype": "float32", "quantize": "int4"})


@pytest.mark.parametrize("mode", ["context", "batched"])
def test_worker_prefills_once_and_keeps_the_best_of_repeated_decodes(
    tiny_checkpoint, monkeypatch, mode
):
    from lightlong.infer import Engine

    prefills, decodes = [], []  # prompt lengths; (prefilled?, decode tok/s) per generate
    real_prefill, real_generate = Engine.prefill, Engine.generate

    def prefill(self, prompt, **kwargs):
        prefills.append(len(prompt))
        return real_prefill(self, prompt, **kwargs)

    def generate(self, prompts, params=None, **kwargs):
        out = real_generate(self, prompts, params, **kwargs)
        decodes.append((kwargs.get("prefilled") is not None, self.stats.decode_tok_s))
        return out

    monkeypatch.setattr(Engine, "prefill", prefill)
    monkeypatch.setattr(Engine, "generate", generate)
    spec = {"kind": "generate", "impl": "lightlong", "checkpoint": str(tiny_checkpoint),
            "mode": mode, "context": 24, "new_tokens": 3, "batch": 2, "suffix": 1,
            "prefill_chunk": 64, "device": "cpu", "dtype": "float32", "repeats": 3}  # fmt: skip
    r = worker.measure_generate(spec)
    assert not decodes[0][0]  # the warm-up
    runs = decodes[1:]
    assert all(pre for pre, _ in runs)  # every measured decode starts from prefilled caches
    rates = [rate for _, rate in runs]
    if mode == "context":
        assert prefills == [24] and len(runs) == 3  # one prefill, three decodes
        assert r["decode_tok_s"] == max(rates) and r["prefill_s"] > 0
    else:  # one row, then two: each prompt prefilled once, each batch decoded 3 times
        assert prefills == [24] * 3 and len(runs) == 6
        assert r["decode_tok_s_b1"] == max(rates[:3]) and r["decode_tok_s_b2"] == max(rates[3:])


def test_worker_trains_in_bf16_autocast(tiny_checkpoint):
    spec = {"kind": "train", "impl": "lightlong", "checkpoint": str(tiny_checkpoint), "T": 16,
            "tokens": 32, "device": "cpu"}  # fmt: skip
    assert worker.measure_train({**spec, "dtype": "bfloat16"})["step_s"] > 0
    with pytest.raises(ValueError, match="dtype"):
        worker.measure_train({**spec, "dtype": "float16"})


@pytest.mark.parametrize("cls", [ModelBenchConfig, TrainBenchConfig], ids=["model", "train"])
def test_dtypes_are_checked(cls):
    for bad in (["bfloat16"], ["float32", "float16"], ["float32", "float32"]):
        with pytest.raises(ValueError, match="dtypes"):
            cls(preset="tiny", dtypes=bad).validate()


def test_generate_refuses_to_time_a_broken_int8_path(tmp_path, monkeypatch, capsys):
    import lightlong.nn.quant as quant

    def broken(m):
        for p in m.parameters():
            p.data.zero_()
        return m

    def never(*a, **k):
        raise AssertionError("timed although the int8 logits are wrong")

    monkeypatch.setattr(quant, "quantize_int8", broken)
    monkeypatch.setattr(generate, "measure_roofline", lambda device: FAKE)
    monkeypatch.setattr(generate, "run_in_fresh_process", never)
    cfg = GenerateBenchConfig(preset="tiny", transformers=False, prefix=64, prefill_chunk=64,
                              out_dir=str(tmp_path))  # fmt: skip
    with pytest.raises(SystemExit, match="precision check failed: tiny:float32\\+int8"):
        run_generate_bench(cfg)
    assert not list(tmp_path.iterdir()) and "|" not in capsys.readouterr().out
