"""The attention benchmark and the CLI plumbing around config dataclasses."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import lightlong_cli

from lightlong.bench import attention as bench
from lightlong.bench.attention import AttentionBenchConfig, lightning_flops, run_attention_bench
from lightlong.bench.report import fit_power
from lightlong.cli import build_parser
from lightlong.config import config_from_args, field_docs


def test_lightning_flops_counts_intra_and_inter_terms():
    # per token and head: 2·C·(K+V) for the masked block product, 4·K·V for the state terms
    assert lightning_flops(T=10, B=2, H=3, K=4, V=5, C=8) == 2 * 10 * 3 * (2 * 8 * 9 + 4 * 20)


def test_power_fit_recovers_exponent():
    xs = [1024.0, 2048.0, 4096.0]
    c, p = fit_power([(x, 3e-9 * x**2) for x in xs])
    assert p == pytest.approx(2.0, abs=1e-9)
    assert c == pytest.approx(3e-9, rel=1e-6)


@pytest.mark.parametrize(
    ("field", "value"),
    [("heads", 0), ("head_dim", -1), ("dtype", "int8"), ("block_size", -2), ("lengths", [0])],
)
def test_config_validation_names_the_field(field, value):
    cfg = AttentionBenchConfig(**{field: value})
    with pytest.raises(ValueError, match=field):
        cfg.validate()


def test_every_config_field_has_a_docstring():
    docs = field_docs(AttentionBenchConfig)
    names = [f for f in AttentionBenchConfig.__dataclass_fields__]
    assert all(docs.get(n) for n in names), sorted(set(names) - set(docs))


def test_config_file_then_flags(tmp_path):
    path = tmp_path / "bench.json"
    path.write_text(json.dumps({"heads": 4, "head_dim": 32}))
    args = build_parser().parse_args(
        ["bench", "attention", "--config", str(path), "--head-dim", "16"]
    )
    cfg = config_from_args(AttentionBenchConfig, args)
    assert (cfg.heads, cfg.head_dim) == (4, 16)


def test_config_file_unknown_key_is_named(tmp_path):
    path = tmp_path / "bench.toml"
    path.write_text("heads = 4\nhaeds = 2\n")
    args = build_parser().parse_args(["bench", "attention", "--config", str(path)])
    with pytest.raises(ValueError, match="haeds"):
        config_from_args(AttentionBenchConfig, args)


def test_cli_print_config():
    out = lightlong_cli("bench", "attention", "--quick", "--print-config")
    assert json.loads(out.stdout)["quick"] is True


def test_cli_bad_value_is_a_clear_error():
    proc = lightlong_cli("bench", "attention", "--heads", "0")
    assert proc.returncode == 2
    assert "heads must be >= 1" in proc.stderr


def test_bench_end_to_end_small(tmp_path):
    cfg = AttentionBenchConfig(lengths=[96, 200], heads=2, head_dim=16, out_dir=str(tmp_path))
    report = run_attention_bench(cfg)
    assert report["reference_max_rel_err"] < 1e-4
    saved = json.loads((tmp_path / "attention-cpu.json").read_text())
    assert [r["T"] for r in saved["rows"]] == [96, 200]
    for row in saved["rows"]:
        assert row["fwd_tok_s"] == pytest.approx(row["T"] / row["fwd_s"])
        assert row["sdpa_fwd_s"] > 0 and row["fwdbwd_peak_mb"] >= 0
        assert row["speedup_fwd"] == pytest.approx(row["sdpa_fwd_s"] / row["fwd_s"])
    assert (tmp_path / "attention-cpu.png").stat().st_size > 0
    assert "| 200 |" in (tmp_path / "attention-cpu.md").read_text()


def test_bench_refuses_to_time_a_wrong_op(tmp_path, monkeypatch, capsys):
    def broken(q, k, v, decay, **kw):
        return v + 0.01 * (q + k).sum(-1, keepdim=True), None

    monkeypatch.setattr(bench, "lightning_attn", broken)
    cfg = AttentionBenchConfig(lengths=[64], heads=2, head_dim=16, out_dir=str(tmp_path))
    with pytest.raises(SystemExit, match="reference check failed"):
        run_attention_bench(cfg)
    assert not list(tmp_path.iterdir())
    assert "|" not in capsys.readouterr().out


def test_info_on_the_full_model_preset():
    out = lightlong_cli("info", "minimax-text-01", "--context", "1000000").stdout
    assert "LLLLLLLS" * 10 in out
    assert "total 456B, active/token 45.9B" in out


def test_info_memory_plan_grows_only_with_softmax_kv():
    from lightlong.model import HybridConfig
    from lightlong.model.info import memory_plan

    cfg = HybridConfig.from_preset("minimax-text-01")
    short, long = (memory_plan(cfg, T, 1, torch.bfloat16) for T in (1000, 1_000_000))
    assert (
        short["lightning_state_bytes"] == long["lightning_state_bytes"] == 70 * 64 * 128 * 128 * 4
    )
    assert (
        long["softmax_kv_bytes"] == 1000 * short["softmax_kv_bytes"] == 10 * 2 * 8 * 128 * 2 * 10**6
    )


def test_info_on_a_checkpoint_dir_and_bad_names(tmp_path):
    from lightlong.model import HybridConfig, HybridLM

    HybridLM(HybridConfig.from_preset("tiny")).save_pretrained(tmp_path / "ck")
    out = lightlong_cli("info", str(tmp_path / "ck")).stdout
    assert "LLLS" in out
    proc = lightlong_cli("info", "no-such-model")
    assert proc.returncode == 2 and "presets:" in proc.stderr


def test_targets_report_met_missed_and_unmeasured():
    from lightlong.bench.report import target, targets_line

    line = targets_line(
        {
            "a": target(0.9, ">=", 0.85, "flat"),
            "b": target(5.0, "<=", 4.4, "memory"),
            "c": target(None, ">=", 20, "speedup", ".0f"),
        }
    )
    assert line == (
        "targets: flat = 0.90 (>= 0.85, met); memory = 5.00 (<= 4.4, MISSED); "
        "speedup = - (>= 20, not measured)"
    )
