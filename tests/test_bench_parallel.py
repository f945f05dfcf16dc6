"""`lightlong bench parallel`: the longest-T search, the collective counter, the config
checks, and a --quick run end to end on gloo processes."""

from __future__ import annotations

import json

import pytest
import torch
import torch.distributed as dist
from conftest import lightlong_cli

from lightlong.bench.parallel import CollectiveCounter, ParallelBenchConfig, longest_within
from lightlong.parallel import SequenceSplit, lightning_attn_split


def test_longest_within_doubles_then_bisects_to_a_sixteenth():
    probed = []

    def probe(T: int) -> float:
        probed.append(T)
        return 100 + T  # the peak: a fixed part and one unit per token

    found = longest_within(1000, {256: 356, 512: 612}, probe, grain=64)
    # doubling from 512: 1024 is over; bisection in multiples of 64 down to a gap <= 512/16
    assert probed[0] == 1024 and all(T % 64 == 0 for T in probed)
    assert found["T"] <= 900 < found["over"] and found["over"] - found["T"] <= 64
    assert found["probes"] == [[T, 100 + T] for T in probed]


def test_longest_within_halves_when_nothing_measured_fits_and_stops_at_the_bound():
    found = longest_within(300, {1024: 1124}, lambda T: 100 + T, grain=64)
    assert found["T"] == 192 and found["over"] == 256
    assert [T for T, _ in found["probes"]][:2] == [512, 256]
    bounded = longest_within(10**9, {64: 164}, lambda T: 100 + T, grain=64, max_probes=3)
    assert bounded == {"T": 512, "over": None, "probes": [[128, 228], [256, 356], [512, 612]]}
    assert longest_within(50, {128: 228}, lambda T: 100 + T, grain=64)["T"] == 0


def test_counter_counts_the_lightning_state_forward_and_backward(tmp_path):
    """One rank: the op all-gathers its fp32 [H, K, V] end state forward and reduce-scatters
    its gradient backward, H·K·V·4 bytes each, whatever T is; an uncounted collective fails."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rdv'}", rank=0,
                            world_size=1)  # fmt: skip
    try:
        H, K, V = 3, 8, 5
        for T in (7, 300):
            q, k = (torch.randn(1, T, H, K).requires_grad_() for _ in range(2))
            v = torch.randn(1, T, H, V).requires_grad_()
            counter = CollectiveCounter(1)
            with counter:
                o, _ = lightning_attn_split(q, k, v, torch.full((H,), 0.1), SequenceSplit.of([T]))
                o.sum().backward()
            assert counter.other == {"forward": H * K * V * 4, "backward": H * K * V * 4, "ring": 0}
        uncounted = pytest.raises(RuntimeError, match="c10d::broadcast_ is not counted")
        with uncounted, CollectiveCounter(1):
            dist.broadcast(torch.zeros(3), src=0)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"presets": ["nope"]}, "unknown preset 'nope'"),
        ({"presets": ["tiny,tiny-softmax", "demo"]}, None),
        ({"sp": [2, 2]}, "sp must be distinct"),
        ({"sp": [1, 4], "lengths": [2]}, r"lengths must give every rank a token \(>= 4\)"),
        ({"reps": -1}, "reps must be >= 0"),
        ({"timeout_s": 0}, "timeout_s must be > 0"),
    ],
)
def test_config_checks_name_the_field(fields, message):
    cfg = ParallelBenchConfig(**fields)
    if message is None:
        assert cfg.presets == ["tiny", "tiny-softmax", "demo"]
        cfg.validate()
    else:
        with pytest.raises(ValueError, match=message):
            cfg.validate()


def test_cli_takes_the_flags():
    out = lightlong_cli(
        "bench", "parallel", "--quick", "--presets", "small-linear,small", "--sp", "1", "2", "4",
        "--budget-mib", "512", "--print-config",
    ).stdout  # fmt: skip
    cfg = json.loads(out)
    assert (cfg["quick"], cfg["presets"], cfg["sp"], cfg["budget_mib"]) == (
        True, ["small-linear", "small"], [1, 2, 4], 512.0
    )  # fmt: skip
    proc = lightlong_cli("bench", "parallel", "--presets", "tiny,cosformer-x")
    assert proc.returncode == 2 and "unknown preset 'cosformer-x'" in proc.stderr


@pytest.mark.slow  # ~15 s: two spawned ranks import torch and lightlong
@pytest.mark.timeout(120)
def test_quick_run_from_the_command_line(tmp_path):
    proc = lightlong_cli(
        "bench", "parallel", "--quick", "--presets", "tiny", "--sp", "2", "--lengths", "128",
        "--byte-lengths", "256", "1024", "--budget-mib", "4", "--out-dir", str(tmp_path),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["parallel-cpu-quick.json", "parallel-cpu-quick.md", "parallel-cpu-quick.png"]
    report = json.loads((tmp_path / "parallel-cpu-quick.json").read_text())
    [group] = report["groups"]
    assert (group["preset"], group["sp"], report["config"]["reps"]) == ("tiny", 2, 1)
    [row] = group["rows"]
    assert row["chunk"] == 64 and row["step_s"] > 0 and row["peak_bytes"] > 0
    # tiny: H = 4, K = V = 16, G = 2; layers LLLS
    assert [layer["type"] for layer in row["layers"]] == ["lightning"] * 3 + ["softmax"]
    assert row["sent_per_layer"] == {
        "lightning": 2 * 4 * 16 * 16 * 4,
        "softmax": 2 * 64 * 2 * 32 * 4,
    }
    assert row["sent_per_layer"] == row["formula_per_layer"]
    for layer in row["layers"]:  # as much forward as backward, each sent once to the other
        assert layer["forward"] == layer["backward"] == layer["ring"] / 2
    assert [(r["T"], r["forward"] + r["backward"]) for r in group["op_bytes"]] == [
        (256, 8192), (1024, 8192)
    ]  # fmt: skip
    assert report["targets"]["tiny:lightning_bytes_flat"]["met"] is True
    assert report["targets"]["tiny:lightning_bytes_formula"]["met"] is True
    longest = group["longest"]
    assert longest["T"] % 128 == 0 and (longest["over"] is None or longest["over"] > longest["T"])
    assert (tmp_path / "parallel-cpu-quick.md").read_text() == proc.stdout
