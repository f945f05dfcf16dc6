"""Training with sequence parallelism (`parallel.sequence`) under torchrun (gloo on the CPU):
the same steps, losses and weights as one process, resumable with another degree."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from conftest import assert_close, rel_err
from test_train import free_port, read_metrics, run_to_end

from lightlong import HybridConfig, HybridLM
from lightlong.model.source import load_model
from lightlong.train import ParallelConfig, TrainConfig, Trainer

# tiny: lightning and softmax layers, MoE with the load-balancing loss (over the whole row)
ARGS = ["model=tiny", "num_pairs=4", "num_queries=4", "seq_len=61", "batch_size=4",
        "warmup_steps=1", "eval_every=0", "eval_batches=1", "log_every=1", "progress=false",
        "keep_last=0"]  # fmt: skip
STEPS, SAVED = 5, 4


def torchrun(cwd: Path, nproc: int, args: list[str]):
    """`lightlong train ARGS` on nproc gloo processes (one torch thread each, a timeout)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
           "--master-port", str(free_port()), "-m", "lightlong", "train", *args]  # fmt: skip
    return run_to_end(cmd, cwd)


def one_process(out: Path, *extra: str) -> Trainer:
    trainer = Trainer(TrainConfig.load(None, [*ARGS, f"out_dir={out}", *extra]))
    trainer.fit()
    return trainer


def weights(path: Path) -> dict[str, torch.Tensor]:
    return HybridLM.from_pretrained(path, dtype=torch.float32).state_dict()


def assert_same_run(
    rows: list[dict],
    expected: list[dict],
    got: dict,
    want: dict,
    keys: tuple[str, ...] = ("loss", "lm_loss", "aux_loss", "grad_norm"),
) -> None:
    """Losses, gradient norms and weights equal (fp32). AdamW divides by the gradients' RMS,
    so rounding differences in rarely used experts grow past 1e-5 in the weights; a wrong
    reduction or a lost chunk is off by far more."""
    assert [r["step"] for r in rows] == [r["step"] for r in expected]
    for r, e in zip(rows, expected, strict=True):
        for key in keys:
            assert r[key] == pytest.approx(e[key], rel=1e-5, abs=1e-7), (r["step"], key)
    assert got.keys() == want.keys()
    for k, w in want.items():
        assert_close(got[k], w, 5e-5, k)


@pytest.fixture(scope="module")
def sp2_run(tmp_path_factory) -> Path:
    """5 steps of `tiny` with parallel.sequence=2 on 2 processes, saving at step 4 and 5."""
    out = tmp_path_factory.mktemp("sp2") / "run"
    proc = torchrun(out.parent, 2, [*ARGS, f"steps={STEPS}", f"save_every={SAVED}",
                                    "parallel.sequence=2", f"out_dir={out}"])  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.mark.timeout(300)
def test_sequence_parallel_training_equals_one_process(sp2_run, tmp_path):
    """Rows of 2 × 61 tokens (odd: the chunks differ by a token, samples cross the chunk
    boundary) split over 2 ranks train as one process does."""
    one = one_process(tmp_path / "one", f"steps={STEPS}")
    rows, expected = read_metrics(sp2_run), read_metrics(tmp_path / "one")
    assert_same_run(rows, expected, weights(sp2_run / f"step-{STEPS}"), weights(one.out / "step-5"))
    start = load_model("tiny", seed=0).state_dict()
    assert max(rel_err(w, start[k]) for k, w in weights(one.out / "step-5").items()) > 1e-3


@pytest.mark.timeout(300)
def test_a_sequence_parallel_checkpoint_resumes_in_one_process(sp2_run, tmp_path):
    """Step 5 from the SP = 2 checkpoint of step 4, in one process, is SP = 2's step 5."""
    one_process(tmp_path / "resumed", f"steps={STEPS}", f"resume={sp2_run / f'step-{SAVED}'}")
    rows = read_metrics(tmp_path / "resumed")
    assert [r["step"] for r in rows] == [STEPS]
    assert_same_run(rows, read_metrics(sp2_run)[SAVED:], weights(tmp_path / "resumed" / "step-5"),
                    weights(sp2_run / "step-5"))  # fmt: skip


@pytest.mark.timeout(300)
def test_expert_parallel_training_equals_one_process_and_resumes_without_it(tmp_path):
    """tiny's 4 experts over 2 ranks, each with its own samples (2 replicas): the same
    steps as one process on all 4 samples (the load-balancing loss over both ranks' tokens,
    as one process computes it), full weights and moments in the checkpoint: step 3 resumed
    in one process from EP = 2's step 2 is EP = 2's step 3, and the other way round."""
    args = [*ARGS, "steps=3", "save_every=2"]
    out = tmp_path / "ep2"
    proc = torchrun(tmp_path, 2, [*args, "parallel.expert=2", f"out_dir={out}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = one_process(tmp_path / "one", "steps=3", "save_every=2")
    # rank 0 logs its own samples' loss; the aux loss and the gradient are the batch's
    assert_same_run(read_metrics(out), read_metrics(one.out), weights(out / "step-3"),
                    weights(one.out / "step-3"), keys=("aux_loss", "grad_norm"))  # fmt: skip
    resumed = tmp_path / "resumed"
    one_process(resumed, "steps=3", f"resume={out / 'step-2'}")
    assert_same_run(read_metrics(resumed), read_metrics(out)[2:], weights(resumed / "step-3"),
                    weights(out / "step-3"), keys=("aux_loss", "grad_norm"))  # fmt: skip
    # and the other way: one process's step 2 resumed with its experts spread over 2 ranks
    back = tmp_path / "back"
    proc = torchrun(tmp_path, 2, [*args, "parallel.expert=2", f"resume={one.out / 'step-2'}",
                                  f"out_dir={back}"])  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_run(read_metrics(back), read_metrics(one.out)[2:], weights(back / "step-3"),
                    weights(one.out / "step-3"), keys=("aux_loss", "grad_norm"))  # fmt: skip


@pytest.mark.timeout(120)
def test_an_expert_degree_that_does_not_divide_the_experts_fails_before_training(tmp_path):
    config = HybridConfig.from_preset("tiny")
    config.num_experts = 3
    config.validate().save_json(tmp_path / "three.json")
    proc = torchrun(tmp_path, 2, [*ARGS, f"model={tmp_path / 'three.json'}", "steps=1",
                                  "parallel.expert=2", f"out_dir={tmp_path / 'run'}"])  # fmt: skip
    assert proc.returncode != 0
    assert "lightlong: error: parallel.expert=2 must divide the model's 3 experts" in proc.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_data_2_by_sequence_2_equals_one_process(tmp_path):
    """4 processes: 2 replicas of 2 samples per step, each replica's row split over 2
    ranks; the held-out evaluation runs split too. Without the load-balancing loss, which
    each replica computes over its own row (as under DDP)."""
    config = HybridConfig.from_preset("tiny")
    config.router_aux_loss_coef = 0.0
    config.validate().save_json(tmp_path / "tiny.json")
    args = [*ARGS, f"model={tmp_path / 'tiny.json'}", "steps=2", "eval_every=2"]
    proc = torchrun(tmp_path, 4, [*args, "parallel.sequence=2", f"out_dir={tmp_path / 'dp2sp2'}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = Trainer(TrainConfig.load(None, [*args, f"out_dir={tmp_path / 'one'}"]))
    one.fit()
    rows, expected = read_metrics(tmp_path / "dp2sp2"), read_metrics(tmp_path / "one")
    # the logged training loss is replica 0's row; the evaluation covers all replicas
    assert rows[-1]["eval_loss"] == pytest.approx(expected[-1]["eval_loss"], rel=1e-5)
    assert rows[-1]["eval_accuracy"] == expected[-1]["eval_accuracy"]
    for r, e in zip(rows, expected, strict=True):
        assert r["grad_norm"] == pytest.approx(e["grad_norm"], rel=1e-5), r["step"]
    got = weights(tmp_path / "dp2sp2" / "step-2")
    for k, w in weights(tmp_path / "one" / "step-2").items():
        assert_close(got[k], w, 5e-5, k)


@pytest.mark.timeout(120)
def test_a_degree_that_does_not_divide_the_processes_fails_before_training(tmp_path):
    proc = torchrun(tmp_path, 2, [*ARGS, "steps=1", "parallel.sequence=3",
                                  f"out_dir={tmp_path / 'run'}"])  # fmt: skip
    assert proc.returncode != 0  # each rank exits 2 with the one-line error; torchrun 1
    assert (
        "lightlong: error: parallel.sequence=3 must divide the number of processes (2)"
        in proc.stderr
    )
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["parallel.sequence=0"], "parallel.sequence must be >= 1"),
        (["parallel.expert=-1"], "parallel.expert must be >= 1"),
        (["parallel.data=zero3"], "parallel.data must be 'ddp' or 'fsdp'"),
        (["parallel=fsdp", "parallel.sequence=2"], "parallel.data='fsdp' runs without"),
        (["parallel.chunks=2"], r"unknown keys \['parallel.chunks'\]"),
        (["parallel.sequence=two"], "override parallel.sequence='two': expected int"),
    ],
)
def test_bad_parallel_keys_are_named(overrides, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig.load(None, overrides)


def test_parallel_takes_a_table_or_the_data_mode(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('model = "tiny"\n[parallel]\nsequence = 4\nexpert = 2\n')
    assert TrainConfig.load(toml).parallel == ParallelConfig("ddp", 4, 2)
    assert TrainConfig.load(None, ["parallel=fsdp"]).parallel == ParallelConfig("fsdp", 1, 1)
    # the data mode alone keeps the table's other keys, from the file or the command line
    assert TrainConfig.load(toml, ["parallel=ddp"]).parallel == ParallelConfig("ddp", 4, 2)
    both = TrainConfig.load(None, ["parallel.sequence=2", "parallel=ddp"]).parallel
    assert both == ParallelConfig("ddp", 2, 1)
    assert TrainConfig(parallel="fsdp").validate().parallel == ParallelConfig("fsdp", 1, 1)
    with pytest.raises(ValueError, match=r"parallel.expert=2 must divide the number of processes"):
        ParallelConfig(expert=2).check_world(3)


def test_a_layer_type_that_cannot_run_split_is_refused_before_training(tmp_path, monkeypatch):
    """A lineage mixer (window softmax here) under parallel.sequence: refused by name when
    the trainer is built, not at the first step."""
    import lightlong.train.loop as loop

    monkeypatch.setattr(loop, "_init_distributed", lambda device: (0, 2))
    monkeypatch.setattr(loop.Trainer, "_mesh", lambda self: (None, 0, 1))
    config = HybridConfig.from_preset("tiny")
    config.layer_types = ["lightning", "window_softmax", "lightning", "softmax"]
    config.validate().save_json(tmp_path / "window.json")
    model, out = tmp_path / "window.json", tmp_path / "run"
    cfg = TrainConfig.load(None, [*ARGS, f"model={model}", "parallel.sequence=2", f"out_dir={out}"])
    with pytest.raises(ValueError, match=r"parallel.sequence=2: a row split across ranks runs"):
        Trainer(cfg)


def test_an_evaluation_length_too_short_to_split_is_refused_before_training(tmp_path, monkeypatch):
    """4 held-out samples of 2 tokens are 8 tokens: too few for 16 ranks, found at setup."""
    import lightlong.train.loop as loop

    monkeypatch.setattr(loop, "_init_distributed", lambda device: (0, 16))
    monkeypatch.setattr(loop.Trainer, "_mesh", lambda self: (None, 0, 1))
    cfg = TrainConfig.load(None, [*ARGS, "eval_lengths=2", "parallel.sequence=16",
                                  f"out_dir={tmp_path / 'run'}"])  # fmt: skip
    with pytest.raises(ValueError, match=r"parallel.sequence=16 splits rows of 8 tokens"):
        Trainer(cfg)
