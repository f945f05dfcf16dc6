"""The attention benchmark's lightning rows: the bf16 forward beside fp32, the fraction of
each dtype's GEMM peak, the plain-process measurement and the issue-18 targets.

# T tokens, H heads, K/V head dims, C block
"""

from __future__ import annotations

import pytest

from lightlong.bench import attention as bench
from lightlong.bench.attention import (
    AttentionBenchConfig,
    format_table,
    lightning_flops,
    run_attention_bench,
    run_plain_process,
)
from lightlong.bench.machine import Roofline

PEAKS = {"float32": 200.0, "bfloat16": 500.0}


def summary(plain: dict | None) -> dict:
    """_summarise over made-up timings: fp32 and bf16 forward at 4K and 64K."""
    cfg = AttentionBenchConfig(lengths=[4096, 65536], plain_lengths=[4096, 131072])
    rows = []
    for T, fwd_s, bf16_s in ((4096, 0.02, 0.015), (65536, 0.4, 0.25)):
        lit = {"fwd_s": fwd_s, "fwd_peak_bytes": 2**20, "fwdbwd_s": 3 * fwd_s,
               "fwdbwd_peak_bytes": 2**21}  # fmt: skip
        bf = {"fwd_s": bf16_s, "fwd_peak_bytes": 2**20}
        rows.append({"T": T, "lightning": lit, "lightning_bf16": bf})
    roofline = Roofline(10.0, dict(PEAKS), {"float32": 5.0}, threads=2)
    return bench._summarise(cfg, rows, 64, PEAKS, 1e-7, plain, None, roofline, [])


def test_summary_has_bf16_and_fraction_of_each_gemm():
    report = summary({"fwd_tok_s": {"4096": 100.0, "131072": 93.0}})
    row = next(r for r in report["rows"] if r["T"] == 65536)
    flops = lightning_flops(65536, 1, 8, 128, 128, 64)
    assert row["fwd_of_gemm"] == pytest.approx(flops / 0.4 / 1e9 / PEAKS["float32"])
    assert row["bf16_fwd_of_gemm"] == pytest.approx(flops / 0.25 / 1e9 / PEAKS["bfloat16"])
    assert row["bf16_speedup_fwd"] == pytest.approx(0.4 / 0.25)

    t = report["targets"]
    assert t["fwd_fp32_gemm_64K_d128"]["value"] == pytest.approx(row["fwd_of_gemm"])
    assert t["fwd_fp32_gemm_64K_d128"]["bound"] == 0.6
    assert t["bf16_speedup_64K"]["value"] == pytest.approx(1.6) and t["bf16_speedup_64K"]["met"]
    assert t["plain_flat"]["value"] == pytest.approx(0.93) and t["plain_flat"]["met"]
    assert t["plain_flat"]["label"] == "plain-process fwd tok/s 128K/4K"

    md = format_table(report)
    assert "% fp32 GEMM" in md and "bf16 / fp32" in md and "bf16 % bf16 GEMM" in md
    assert "| 65536 | 163,840 |" in md and "| 1.60 |" in md
    assert "plain process (no keep_freed_memory" in md and "4K 100, 128K 93; 0.93" in md
    assert "bf16 / fp32 fwd tok/s at 64K = 1.60 (>= 1.5, met)" in md


def test_summary_without_plain_process_marks_the_target_unmeasured():
    report = summary(None)
    assert report["targets"]["plain_flat"]["met"] is None
    assert "plain process" not in format_table(report)


def test_plain_process_measures_each_length_in_a_fresh_interpreter():
    spec = {"lengths": [64, 200], "B": 1, "H": 2, "K": 8, "V": 8, "dtype": "float32",
            "device": "cpu", "block_size": 16, "budget_s": 0.01, "rounds": 1}  # fmt: skip
    failed: list[dict] = []
    result = run_plain_process(spec, 300, failed)
    assert not failed and set(result["fwd_tok_s"]) == {"64", "200"}
    assert all(v > 0 for v in result["fwd_tok_s"].values())

    assert run_plain_process({**spec, "dtype": "int8"}, 300, failed) is None
    assert len(failed) == 1 and "plain process" in failed[0]["what"]


def test_bench_refuses_to_overwrite_results_before_measuring(tmp_path, monkeypatch):
    (tmp_path / "attention-cpu.json").write_text("{}")

    def never(*a, **kw):
        raise AssertionError("measured before refusing")

    monkeypatch.setattr(bench, "check_against_reference", never)
    cfg = AttentionBenchConfig(lengths=[64], heads=2, head_dim=16, out_dir=str(tmp_path))
    with pytest.raises(ValueError, match="already exist"):
        run_attention_bench(cfg)


def test_config_rejects_bad_plain_lengths():
    with pytest.raises(ValueError, match="plain_lengths"):
        AttentionBenchConfig(plain_lengths=[0]).validate()
