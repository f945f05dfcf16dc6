"""`lightlong bench serve`: end to end against real `lightlong serve` subprocesses, and its
config checks."""

from __future__ import annotations

import dataclasses
import json

import pytest
from conftest import lightlong_cli

from lightlong.bench import serve
from lightlong.bench.serve import ServeBenchConfig, percentile, run_serve_bench
from lightlong.cli import build_parser
from lightlong.config import config_from_args, field_docs


@pytest.mark.timeout(120)
def test_bench_end_to_end_against_the_server(tmp_path, capsys):
    # 300-token document: past one 256-token prefix block, so the cache has something to hit
    cfg = ServeBenchConfig(
        model="tiny", threads=1, levels=[1, 2], prompt_tokens=8, max_tokens=4, requests=4,
        document_tokens=300, question_tokens=4, answer_tokens=4, conversations=2, turns=2,
        out_dir=str(tmp_path),
    )  # fmt: skip
    report = run_serve_bench(cfg)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "serve-cpu.json", "serve-cpu.md", "serve-cpu.png"
    ]  # fmt: skip
    assert json.loads((tmp_path / "serve-cpu.json").read_text()) == report
    assert (tmp_path / "serve-cpu.png").stat().st_size > 0
    assert report["machine"]["torch_threads"] == 1
    assert report["skipped_levels"] == []
    assert [r["concurrency"] for r in report["sweep"]] == [1, 2]
    for row in report["sweep"]:
        assert (row["requests"], row["cut"], row["output_tokens"]) == (4, 0, 16)
        assert len(row["samples"]) == 4
        assert all(s["output_tokens"] == 4 for s in row["samples"])
        assert row["output_tok_s"] == pytest.approx(16 / row["wall_s"])
        assert all(0 < s["ttft_s"] < s["e2e_s"] <= row["wall_s"] for s in row["samples"])
        assert 0 < row["ttft_p50_s"] <= row["ttft_p99_s"]
        assert 0 < row["itl_p50_s"] <= row["itl_p99_s"]
    # level 2's workers start spread over one lone request's time (level 1's median)
    assert report["sweep"][1]["ramp_s"] == report["sweep"][0]["e2e_p50_s"]
    [engine] = report["engine_decode"]  # batch 1 only: 16 is not among the levels
    assert engine["batch"] == 1 and engine["output_tok_s"] == pytest.approx(1 / engine["step_s"])
    on, off = report["shared_prefix"]["on"], report["shared_prefix"]["off"]
    for row in (on, off):
        assert (row["requests"], row["cut"]) == (4, 0)
        # turn 1: document + question; turn 2: + answer + question
        assert row["prompt_tokens"] == 2 * 304 + 2 * 312
        assert 0 < row["ttft_p50_s"] <= row["ttft_p99_s"]
    assert off["cached_tokens"] == 0
    # all but the first request find the document's 256-token snapshot
    assert on["cached_tokens"] == 3 * 256
    assert set(report["targets"]) == {
        "throughput_16_vs_1", "ttft_16_vs_1", "shared_prefix_ttft"
    }  # fmt: skip
    assert report["targets"]["throughput_16_vs_1"]["met"] is None  # no level 16 here
    assert report["targets"]["shared_prefix_ttft"]["value"] == pytest.approx(
        on["ttft_p50_s"] / off["ttft_p50_s"]
    )
    out = capsys.readouterr().out
    assert out.startswith("| concurrency |")
    assert "| 2 | 4 |" in out and "| on | 4 |" in out and "targets:" in out
    assert (tmp_path / "serve-cpu.md").read_text() == out
    # a quick run writes beside the committed files, never over them
    serve._write(report, dataclasses.replace(cfg, quick=True))
    assert (tmp_path / "serve-cpu-quick.json").read_text() == (
        tmp_path / "serve-cpu.json"
    ).read_text()


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"levels": [0, 4]}, "levels must be >= 1"),
        ({"max_tokens": 1}, "max_tokens must be >= 2"),
        ({"prompt_tokens": 0}, "prompt_tokens must be >= 1"),
        ({"turns": 0}, "turns must be >= 1"),
        ({"levels": [128]}, "max_num_seqs must be >= the largest level 128"),
        ({"levels": [1, 4], "requests": 3}, "requests must be 0"),
        ({"threads": -1}, "threads must be >= 0"),
        ({"time_limit_s": 0}, "time_limit_s must be > 0"),
        ({"level_time_limit_s": -1.0}, "level_time_limit_s must be > 0"),
        ({"dtype": "int8"}, "dtype must be one of"),
        ({"device": "meta"}, "device 'meta'"),
        ({"model": "no-such-model"}, "presets:"),
        ({"model": "tiny", "prompt_tokens": 2**20}, "must fit in tiny's 1,048,576 positions"),
    ],
    ids=lambda v: "-".join(v) if isinstance(v, dict) else None,
)
def test_config_validation_names_the_field(fields, message):
    with pytest.raises(ValueError, match=message):
        ServeBenchConfig(**fields).validate()


def test_quick_levels_and_requests_per_level():
    assert ServeBenchConfig().resolved_levels() == [1, 4, 16, 64]
    assert ServeBenchConfig(quick=True).resolved_levels() == [1, 4, 16]
    assert ServeBenchConfig(levels=[4, 1, 4]).resolved_levels() == [1, 4]
    assert [ServeBenchConfig().level_requests(c) for c in (1, 4, 16)] == [8, 8, 32]
    assert ServeBenchConfig(requests=20).level_requests(1) == 20


def test_every_config_field_has_a_docstring():
    docs = field_docs(ServeBenchConfig)
    names = list(ServeBenchConfig.__dataclass_fields__)
    assert all(docs.get(n) for n in names), sorted(set(names) - set(docs))


def test_percentile_interpolates_between_ranks():
    assert percentile([], 50) is None
    assert percentile([3.0], 99) == 3.0
    assert percentile([4.0, 1.0, 3.0, 2.0], 50) == 2.5
    assert percentile([1.0, 2.0, 3.0, 4.0], 99) == pytest.approx(3.97)
    assert percentile([1.0, 2.0, 3.0, 4.0], 0) == 1.0


def test_cli_flags_and_a_bad_value(tmp_path):
    path = tmp_path / "serve.toml"
    path.write_text("levels = [1, 2]\nmax_tokens = 8\n")
    args = build_parser().parse_args(
        ["bench", "serve", "--config", str(path), "--max-tokens", "16", "--quick"]
    )
    cfg = config_from_args(ServeBenchConfig, args)
    assert (cfg.levels, cfg.max_tokens, cfg.quick) == ([1, 2], 16, True)
    proc = lightlong_cli("bench", "serve", "--max-tokens", "1")
    assert proc.returncode == 2
    assert "max_tokens must be >= 2" in proc.stderr


@pytest.mark.timeout(120)
def test_a_level_past_its_time_limit_is_cut_and_reported(tmp_path):
    cfg = ServeBenchConfig(
        model="tiny", threads=1, levels=[2], prompt_tokens=8, max_tokens=4000, requests=4,
        level_time_limit_s=1.0, document_tokens=4, question_tokens=2, answer_tokens=2,
        conversations=1, turns=1, out_dir=str(tmp_path),
    )  # fmt: skip
    report = run_serve_bench(cfg)
    (row,) = report["sweep"]
    # both workers' first requests were in flight at the limit; the server was idle after
    assert (row["requests"], row["cut"], row["output_tok_s"]) == (0, 2, None)
    assert report["targets"]["ttft_16_vs_1"]["met"] is None
    assert "| 2 | 0 (2 cut) | - |" in (tmp_path / "serve-cpu.md").read_text()
