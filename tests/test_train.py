"""Training: synthetic and packed text data, TrainConfig, the Trainer (non-finite steps,
accumulation, checkpoints and exact resume, signals), several processes, the CLI, the demo."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_close, rel_err
from test_bench_cli import lightlong_cli

from lightlong import HybridConfig, HybridLM
from lightlong.cli import build_parser
from lightlong.tokenizer import load_tokenizer
from lightlong.train import (
    NonFiniteLossError,
    SyntheticData,
    SyntheticTask,
    TextData,
    TrainConfig,
    Trainer,
    loop,
)
from lightlong.train.checkpoint import (
    MARKER,
    STATE_FILE,
    complete_checkpoints,
    load_trainer_state,
    resume_candidates,
    save_checkpoint,
)
from lightlong.train.data import IGNORE, TASKS, _ranges
from lightlong.train.demo import DemoConfig, format_demo, run_demo, summarize

TIMEOUT_S = 240  # a subprocess that runs longer has hung


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The tiny model's matmuls are too small to gain from threads: one is faster (and
    matches the one thread torchrun gives each worker)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _no_peak_measurement(monkeypatch):
    """fit() times a 1024³ matmul for its flops_frac metric; these tests do not need it."""
    monkeypatch.setattr(loop, "matmul_gflops", lambda *a, **k: 100.0)


@pytest.fixture(scope="module")
def moe_model(tmp_path_factory) -> str:
    """A checkpoint: the tiny preset with 32 small top-1 experts and no load-balancing loss.

    The load-balancing loss couples the samples of a batch (each rank and micro-batch computes
    it over its own tokens), so splitting a batch changes it: it is off where a split batch
    must match the whole. Many experts make ranks route to different sets of them.
    """
    cfg = HybridConfig.from_preset("tiny")
    cfg.router_aux_loss_coef = 0.0
    cfg.num_experts, cfg.experts_per_token, cfg.intermediate_size = 32, 1, 16
    path = tmp_path_factory.mktemp("moe") / "model"
    torch.manual_seed(0)
    HybridLM(cfg.validate()).save_pretrained(path)
    return str(path)


def train_cfg(out: Path, **overrides) -> TrainConfig:
    """A run of a few seconds: tiny model, short recall samples, metrics every step."""
    values = dict(
        model="tiny", task="recall", num_pairs=4, num_queries=4, seq_len=64, batch_size=4,
        steps=4, warmup_steps=1, eval_every=0, eval_batches=1, log_every=1, progress=False,
        out_dir=str(out),
    )  # fmt: skip
    values.update(overrides)
    return TrainConfig(**values).validate()


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def without_timing(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in ("tok_s", "flops_frac")} for r in rows]


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{len(differ)} tensors differ, e.g. {differ[:3]}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_to_end(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """Runs cmd in its own process group; kills the group and fails if it hangs."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)  # fmt: skip
    try:
        out, err = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{cmd[:6]} hung for {TIMEOUT_S} s; stderr tail:\n{err[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


# ---------------------------------------------------------------------- synthetic data


def test_synthetic_sample_depends_only_on_seed_and_index():
    task = SyntheticTask("recall", 512, num_pairs=4, num_queries=4)
    a, b = SyntheticData(task, 64, 4, seed=3), SyntheticData(task, 64, 4, seed=3)
    first_a, first_b = next(a), next(b)
    assert torch.equal(first_a.input_ids, first_b.input_ids)
    assert torch.equal(first_a.labels, first_b.labels)
    assert not torch.equal(next(a).input_ids, first_a.input_ids)  # the next samples differ
    assert not np.array_equal(a.sample(0)[0], a.sample(1)[0])
    assert not np.array_equal(a.sample(0)[0], SyntheticData(task, 64, 4, seed=4).sample(0)[0])
    # four samples of 64 tokens packed in one row, with a boundary at each sample
    assert first_a.input_ids.shape == (1, 256)
    assert first_a.cu_seqlens.tolist() == [0, 64, 128, 192, 256]


def test_recall_labels_are_the_values_of_the_queried_keys():
    n, q, T = 6, 5, 48
    ids, labels = SyntheticTask("recall", 512, n, q).sample(np.random.default_rng(7), T)
    keys, values, filler = _ranges(512)
    pairs = dict(zip(ids[1 : 2 * n : 2].tolist(), ids[2 : 2 * n + 1 : 2].tolist(), strict=True))
    assert len(pairs) == n and all(k in keys for k in pairs)
    assert all(v in values for v in pairs.values())
    assert all(t in filler for t in ids[1 + 2 * n : T - 2 * q].tolist())  # filler in the middle
    start = T - 2 * q
    queried = ids[start::2].tolist()
    assert labels[start + 1 :: 2].tolist() == [pairs[k] for k in queried]
    assert ids[start + 1 :: 2].tolist() == [pairs[k] for k in queried]
    # the answers are the only supervised tokens
    assert (labels[: start + 1] == IGNORE).all() and (labels[start::2] == IGNORE).all()


def test_recall_min_pairs_mixes_pair_counts_and_held_out_data_keeps_num_pairs(tmp_path):
    task = SyntheticTask("recall", 128, num_pairs=8, num_queries=8, min_pairs=2)
    keys, values, filler = _ranges(128)
    seen = set()
    for i in range(300):
        ids, labels = task.sample(np.random.default_rng(i), 48)
        n = next(j for j in range(9) if j == 8 or ids[1 + 2 * j] not in keys)
        pairs = dict(zip(ids[1 : 2 * n : 2].tolist(), ids[2 : 2 * n + 1 : 2].tolist(),
                         strict=True))  # fmt: skip
        assert all(v in values for v in pairs.values())
        assert all(t in filler for t in ids[1 + 2 * n : 48 - 16].tolist())
        assert labels[33::2].tolist() == [pairs[k] for k in ids[32::2].tolist()]
        seen.add(n)
    assert seen == set(range(2, 9))
    with pytest.raises(ValueError, match="min_pairs"):
        SyntheticTask("recall", 128, num_pairs=4, min_pairs=5)
    with pytest.raises(ValueError, match="min_pairs"):
        TrainConfig(num_pairs=4, min_pairs=5).validate()
    cfg = TrainConfig(model="demo", num_pairs=8, num_queries=8, min_pairs=1, seq_len=48,
                      out_dir=str(tmp_path))  # fmt: skip
    trainer = Trainer(cfg)
    assert trainer.data.task.min_pairs == 1 and trainer.eval_data.task.min_pairs == 0


@pytest.mark.parametrize("name", [t for t in TASKS if t not in ("recall", "retrieval")])
def test_other_tasks_answer_with_tokens_given_earlier(name):
    n, T = 5, 40
    ids, labels = SyntheticTask(name, 512, n).sample(np.random.default_rng(1), T)
    answer = labels != IGNORE
    assert answer[T - n :].all() and not answer[: T - n].any()
    assert (labels[T - n :] == ids[T - n :]).all()
    values = _ranges(512)[1]
    early = [t for t in ids[: T - n - 1].tolist() if t in values]  # value tokens before the end
    assert early == labels[T - n :].tolist()


def test_retrieval_samples_are_recall_or_passkey_by_a_seeded_coin():
    kinds = []
    for seed in range(20):
        ids, labels = SyntheticTask("retrieval", 512, 4, 6).sample(np.random.default_rng(seed), 60)
        rng = np.random.default_rng(seed)
        kind = "recall" if rng.random() < 0.5 else "passkey"
        ref_ids, ref_labels = SyntheticTask(kind, 512, 4, 6).sample(rng, 60)
        assert (ids == ref_ids).all() and (labels == ref_labels).all()
        kinds.append(kind)
    assert set(kinds) == {"recall", "passkey"}


def test_synthetic_position_round_trips_and_ranks_split_the_batch():
    task = SyntheticTask("copy", 512, num_pairs=4)
    data = SyntheticData(task, 32, 4, seed=1)
    next(data)
    state = data.state_dict()
    assert state == {"position": 4}
    expected = next(data)
    again = SyntheticData(task, 32, 4, seed=1)
    again.load_state_dict(state)
    assert torch.equal(next(again).input_ids, expected.input_ids)
    # two ranks take disjoint halves of the same global batch
    halves = [SyntheticData(task, 32, 4, seed=1, rank=r, world_size=2) for r in (0, 1)]
    for h in halves:
        h.load_state_dict(state)
    joined = torch.cat([next(h).input_ids for h in halves], dim=1)
    assert torch.equal(joined, expected.input_ids)


def test_synthetic_rejects_short_sequences():
    with pytest.raises(ValueError, match="seq_len 20 is too short for recall"):
        SyntheticData(SyntheticTask("recall", 512, 8, 8), 20, 2)


# -------------------------------------------------------------------- packed text data

DOC1 = "The quick brown fox jumps over a lazy dog."
DOC1_OTHER = "Zzzz yyyy ~~~~ 12345 !!!!! abcdefgh ijklmn"  # as many bytes as DOC1
DOC2 = "Lightning attention keeps one fixed-size state per head, ok."
DOC3 = "A third document, long enough for a second window of text. " * 2


def write_docs(root: Path, first: str = DOC1) -> list[Path]:
    """a.txt holds one document, b.jsonl two (one per line)."""
    root.mkdir(exist_ok=True)
    (root / "a.txt").write_text(first)
    lines = [json.dumps({"text": DOC2}), "", json.dumps({"text": DOC3})]
    (root / "b.jsonl").write_text("\n".join(lines) + "\n")
    return [root / "a.txt", root / "b.jsonl"]


def test_text_data_cu_seqlens_fall_at_document_starts(tmp_path):
    tok = load_tokenizer(None)
    eos = tok.eos_token_id
    data = TextData(write_docs(tmp_path), tok, seq_len=50, batch_size=2)
    lengths = [len(d.encode()) + 1 for d in (DOC1, DOC2, DOC3)]  # each ends with eos
    starts = np.cumsum([0, *lengths[:-1]])
    assert data.doc_starts.tolist() == starts.tolist()
    assert data.tokens[np.cumsum(lengths) - 1].tolist() == [eos] * 3
    stream = data.tokens.tolist()
    assert tok.decode(stream[: lengths[0]]) == DOC1
    assert data.num_windows == len(stream) // 50 == 4
    for i in range(0, 6, 2):  # the third batch wraps around to windows 0 and 1
        batch = next(data)
        # cuts at each window's start and at each document start inside a window
        expected, row = [], []
        for j, w in enumerate((i % 4, (i + 1) % 4)):
            inside = [int(s) - 50 * w for s in starts if 50 * w < s < 50 * (w + 1)]
            expected += [50 * j + c for c in (0, *inside)]
            row += stream[50 * w : 50 * (w + 1)]
        assert batch.cu_seqlens.tolist() == [*expected, 100]
        assert batch.input_ids[0].tolist() == row
        assert torch.equal(batch.labels, batch.input_ids)  # every token is supervised
    assert data.state_dict() == {"position": 6}


def test_packed_second_document_equals_it_alone(tmp_path):
    # two documents in one row (TextData's cu_seqlens) vs the second one alone, fp64
    tok = load_tokenizer(None)
    n1 = len(DOC1.encode()) + 1
    seq_len = n1 + len(DOC2.encode()) + 1  # the first window holds exactly DOC1 and DOC2
    batch = next(TextData(write_docs(tmp_path), tok, seq_len, batch_size=1))
    assert batch.cu_seqlens.tolist() == [0, n1, seq_len]
    torch.manual_seed(0)
    model = HybridLM(HybridConfig.from_preset("tiny")).double()
    ids, cu = batch.input_ids, batch.cu_seqlens
    packed = model(ids, cu_seqlens=cu).logits
    alone = model(ids[:, n1:], labels=ids[:, n1:])
    assert_close(packed[:, n1:], alone.logits, 1e-12, "second document's logits")
    # the loss of the second document alone: mask the first's labels in the packed row
    labels = ids.clone()
    labels[:, :n1] = IGNORE
    packed_loss = model(ids, cu_seqlens=cu, labels=labels).lm_loss
    assert packed_loss.item() == pytest.approx(alone.lm_loss.item(), rel=1e-12)
    # other tokens in the first document leave the second's logits unchanged (to float64
    # rounding: the first document's routing changes the MoE's per-expert matmul sizes, and
    # some CPUs' BLAS then sums in another order)
    other = next(TextData(write_docs(tmp_path / "other", DOC1_OTHER), tok, seq_len, 1))
    assert not torch.equal(other.input_ids[:, :n1], ids[:, :n1])
    assert torch.equal(other.input_ids[:, n1:], ids[:, n1:])
    changed = model(other.input_ids, cu_seqlens=other.cu_seqlens).logits
    assert_close(changed[:, n1:], packed[:, n1:], 1e-12, "second document after changing the first")
    assert not torch.allclose(changed[:, :n1], packed[:, :n1])


def test_text_data_rejects_bad_files(tmp_path):
    tok = load_tokenizer(None)
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: expected an object with a string 'text'"):
        TextData([tmp_path / "bad.jsonl"], tok, 4, 1)
    (tmp_path / "short.txt").write_text("tiny")
    with pytest.raises(ValueError, match="fewer than seq_len 64"):
        TextData([tmp_path / "short.txt"], tok, 64, 1)
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match=r"x\.csv: expected \.txt or \.jsonl"):
        TextData([tmp_path / "short.txt", tmp_path / "x.csv"], tok, 4, 1)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        TextData([tmp_path / "missing.txt"], tok, 4, 1)


def test_text_task_trains_and_evaluates_on_the_last_file(tmp_path):
    files = write_docs(tmp_path / "docs")
    cfg = train_cfg(tmp_path / "run", task="text", data_files=[str(f) for f in files],
                    seq_len=32, batch_size=2, steps=2, eval_batches=2)  # fmt: skip
    trainer = Trainer(cfg)
    assert trainer.data.tokens.tolist()[:-1] == list(DOC1.encode())  # trains on a.txt
    assert len(trainer.eval_data.doc_starts) == 2  # holds out b.jsonl
    final = trainer.fit()
    assert final["step"] == 2 and np.isfinite(final["eval_loss"])
    assert 0 <= final["eval_accuracy"] <= 1
    assert complete_checkpoints(tmp_path / "run") == [tmp_path / "run" / "step-2"]


# ------------------------------------------------------------------------------ config


def test_config_file_then_overrides(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('steps = 7\nlr = 1\neval_lengths = [128, 256]\ntask = "copy"\n')
    cfg = TrainConfig.load(path, ["lr=0.01", "progress=false", "data_files=a.txt,b.txt"])
    assert (cfg.steps, cfg.lr, cfg.task, cfg.progress) == (7, 0.01, "copy", False)
    assert cfg.eval_lengths == [128, 256] and cfg.data_files == ["a.txt", "b.txt"]
    json_path = tmp_path / "run.json"
    json_path.write_text(json.dumps({"seq_len": 96}))
    assert TrainConfig.load(json_path, ["eval_lengths=[192]"]).eval_lengths == [192]


def test_config_file_unknown_key_is_named(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text("steps = 7\nstpes = 8\n")
    with pytest.raises(ValueError, match=r"unknown keys \['stpes'\]"):
        TrainConfig.load(path)
    path.write_text('steps = "seven"\n')
    with pytest.raises(ValueError, match="steps must be int"):
        TrainConfig.load(path)


BAD_OVERRIDES = [
    (["lr=-1"], "lr must be > 0"),
    (["steps=abc"], "steps='abc': expected int"),
    (["dtype=fp8"], "dtype must be 'float32' or 'bfloat16', got 'fp8'"),
    (["nokey=1"], "unknown key 'nokey'"),
    (["batch_size=6", "grad_accum=4"], "batch_size 6 must be a multiple of grad_accum 4"),
    (["steps"], "override 'steps': expected key=value"),
    (["progress=maybe"], "progress='maybe': expected bool"),
    (["parallel=zero3"], "parallel.data must be"),
    (["task=text"], "data_files"),
    (["eval_lengths=64,1"], "eval_lengths must be >= 2"),
    (["beta2=1"], "beta2 must be in"),
]


@pytest.mark.parametrize(
    ("overrides", "match"), BAD_OVERRIDES, ids=[" ".join(o) for o, _ in BAD_OVERRIDES]
)
def test_bad_override_names_the_key(overrides, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig.load(None, overrides)


def test_cli_bad_key_fails_before_training(tmp_path):
    out = tmp_path / "run"
    proc = lightlong_cli("train", "nokey=1", f"out_dir={out}")
    assert proc.returncode == 2
    assert "nokey" in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists()


def test_cli_setup_error_comes_before_training(tmp_path):
    # what the config cannot check alone (a sample longer than seq_len) fails in Trainer()
    out = tmp_path / "run"
    args = build_parser().parse_args(["train", "seq_len=16", "num_pairs=8", f"out_dir={out}"])
    with pytest.raises(ValueError, match="seq_len 16 is too short"):
        args.func(args)
    assert not out.exists()


def test_cli_print_config(tmp_path, capsys):
    args = build_parser().parse_args(["train", "--print-config", "steps=3", "lr=0.5"])
    args.func(args)
    printed = json.loads(capsys.readouterr().out)
    assert (printed["steps"], printed["lr"], printed["model"]) == (3, 0.5, "tiny")


# ----------------------------------------------------------------------------- trainer


@pytest.mark.parametrize("where", ["loss", "gradient"])
def test_nonfinite_step_is_skipped(tmp_path, where):
    trainer = Trainer(train_cfg(tmp_path, max_nonfinite=3))
    if where == "loss":
        real = trainer._loss

        def _loss(batch):
            out = real(batch)
            out.loss = out.loss * float("inf")
            return out

        trainer._loss = _loss
    else:  # the loss is finite, one parameter's gradient is not
        hook = trainer.model.lm_head.weight.register_hook(lambda g: g * float("nan"))
    before = snapshot(trainer.model)
    m = trainer.train_step()
    assert m["skipped"] and (where == "gradient") == np.isfinite(m["loss"])
    assert_same_weights(snapshot(trainer.model), before)
    assert not trainer.optimizer.state  # AdamW took no step
    assert all(p.grad is None for p in trainer.model.parameters())
    assert (trainer.nonfinite_total, trainer.nonfinite_run, trainer.step) == (1, 1, 1)
    # a finite step trains again and ends the run of skips, not the total
    if where == "loss":
        del trainer._loss
    else:
        hook.remove()
    m = trainer.train_step()
    assert not m["skipped"] and np.isfinite(m["grad_norm"])
    assert not torch.equal(trainer.model.lm_head.weight, before["lm_head.weight"])
    assert (trainer.nonfinite_total, trainer.nonfinite_run) == (1, 0)


def test_max_nonfinite_steps_in_a_row_raise(tmp_path):
    trainer = Trainer(train_cfg(tmp_path, max_nonfinite=3))
    with torch.no_grad():
        trainer.model.model.norm.weight[0] = float("nan")  # every logit is NaN
    trainer.train_step()
    trainer.train_step()
    assert trainer.nonfinite_run == 2
    with pytest.raises(NonFiniteLossError, match=r"3 non-finite steps in a row \(max_nonfinite=3"):
        trainer.train_step()


def test_grad_accum_equals_one_big_batch(tmp_path, moe_model):
    runs = {}
    for accum in (1, 2):
        cfg = train_cfg(tmp_path / f"a{accum}", model=moe_model, grad_accum=accum, steps=2)
        trainer = Trainer(cfg)
        metrics = [trainer.train_step() for _ in range(2)]
        assert all(m["tokens"] == 4 * 64 for m in metrics)
        runs[accum] = snapshot(trainer.model), [m["loss"] for m in metrics]
    (w1, loss1), (w2, loss2) = runs[1], runs[2]
    assert loss2 == pytest.approx(loss1, rel=1e-6)
    for k in w1:
        assert_close(w2[k], w1[k], 1e-5, k)


def test_activation_checkpointing_and_bfloat16(tmp_path):
    results = {}
    for name, extra in {"plain": {}, "checkpointed": {"activation_checkpointing": True},
                        "bf16": {"dtype": "bfloat16"}}.items():  # fmt: skip
        trainer = Trainer(train_cfg(tmp_path / name, steps=1, **extra))
        m = trainer.train_step()
        results[name] = m["loss"], m["grad_norm"], snapshot(trainer.model)
        assert all(p.dtype == torch.float32 for p in trainer.model.parameters())
    loss, norm, weights = results["plain"]
    # recomputing the activations gives the same gradients
    assert results["checkpointed"][:2] == pytest.approx((loss, norm), rel=1e-6)
    for k in weights:
        assert_close(results["checkpointed"][2][k], weights[k], 1e-6, k)
    # bf16 autocast: the same loss to bf16 precision
    assert results["bf16"][0] == pytest.approx(loss, rel=2e-2)


def test_resume_equals_uninterrupted_run(tmp_path):
    N, k = 6, 3
    cfg = dict(steps=N, save_every=2, keep_last=2, eval_every=3)
    straight = Trainer(train_cfg(tmp_path / "straight", **cfg))
    straight.fit()
    # keep_last=2: of the checkpoints at steps 2, 4 and 6, the last two stay
    names = [p.name for p in complete_checkpoints(tmp_path / "straight")]
    assert names == ["step-4", "step-6"]

    # the same run, stopped by SIGINT after step k: fit() saves step-k and returns
    out = tmp_path / "resumed"
    first = Trainer(train_cfg(out, **cfg))
    real_step = first.train_step

    def step_then_signal():
        m = real_step()
        if first.step == k:
            # fit()'s handler, not Python's KeyboardInterrupt (that would stop pytest)
            assert signal.getsignal(signal.SIGINT) is not signal.default_int_handler
            signal.raise_signal(signal.SIGINT)
        return m

    first.train_step = step_then_signal
    first.fit()
    assert first.step == k
    assert [p.name for p in complete_checkpoints(out)] == ["step-2", f"step-{k}"]
    # debris of a crash mid-save is not resumed from: a hidden partial directory (even one
    # with a marker) and a step directory without its COMPLETE marker
    partial = out / f".step-{k + 2}.partial-123"
    no_marker = out / f"step-{k + 2}"
    for junk in (partial, no_marker):
        junk.mkdir()
        (junk / STATE_FILE).write_bytes((out / f"step-{k}" / STATE_FILE).read_bytes())
    (partial / MARKER).write_text(f"{k + 2}\n")
    assert next(resume_candidates("auto", out)) == out / f"step-{k}"

    second = Trainer(train_cfg(out, resume="auto", **cfg))
    assert second.resumed_from == out / f"step-{k}" and second.step == k
    second.fit()
    assert second.step == N
    assert not partial.exists()  # fit() clears partial directories
    assert_same_weights(snapshot(second.model), snapshot(straight.model))
    # the metrics file holds each step once, as the uninterrupted run wrote it
    assert without_timing(read_metrics(out)) == without_timing(read_metrics(tmp_path / "straight"))
    assert [r["step"] for r in read_metrics(out)] == list(range(1, N + 1))
    assert [p.name for p in complete_checkpoints(out)] == ["step-4", "step-6"]
    # a checkpoint is a model directory: HybridLM loads it
    loaded = HybridLM.from_pretrained(out / f"step-{N}", dtype=torch.float32)
    assert_same_weights(loaded.state_dict(), snapshot(second.model))
    state = load_trainer_state(out / f"step-{N}")
    assert state["step"] == N and state["data"] == {"position": N * 4}


def drop_labels_at_random(trainer: Trainer) -> None:
    """Makes the trainer's steps draw from the global torch RNG: each step ignores a random
    30 % of its labels (a stand-in for dropout, which the model does not have)."""
    real = trainer._loss

    def _loss(batch):
        drop = torch.rand(batch.labels.shape) < 0.3
        return real(dataclasses.replace(batch, labels=batch.labels.masked_fill(drop, IGNORE)))

    trainer._loss = _loss


def nan_loss_at(trainer: Trainer, steps: set[int]) -> None:
    """Makes the loss NaN at the given values of trainer.step (0 is the first step)."""
    real = trainer._loss

    def _loss(batch):
        out = real(batch)
        if trainer.step in steps:
            out.loss = out.loss * float("nan")
        return out

    trainer._loss = _loss


def test_resume_restores_the_torch_rng_state(tmp_path):
    # training that draws from the global RNG: a resumed run draws what the uninterrupted
    # one drew after step k only if the checkpoint's RNG state is restored
    N, k = 4, 2
    straight = Trainer(train_cfg(tmp_path / "straight", steps=N, save_every=k))
    drop_labels_at_random(straight)
    straight.fit()
    ckpt = tmp_path / "straight" / f"step-{k}"
    saved = load_trainer_state(ckpt)["rng"]["torch"]

    resumed = Trainer(train_cfg(tmp_path / "resumed", steps=N, resume=str(ckpt)))
    assert resumed.step == k
    assert torch.equal(torch.get_rng_state(), saved), "the torch RNG state was not restored"
    drop_labels_at_random(resumed)
    resumed.fit()
    assert_same_weights(snapshot(resumed.model), snapshot(straight.model))
    rows = without_timing(read_metrics(tmp_path / "resumed"))
    assert [r["step"] for r in rows] == list(range(k + 1, N + 1))
    assert rows == without_timing(read_metrics(tmp_path / "straight"))[k:]


def test_resume_restores_the_nonfinite_counters(tmp_path):
    # steps 1 and 3 are non-finite: the checkpoint at step 3 holds 2 skipped steps in all,
    # the last 1 of them in a row
    N, k = 5, 3
    cfg = dict(steps=N, save_every=k, max_nonfinite=2)
    straight = Trainer(train_cfg(tmp_path / "straight", **cfg))
    nan_loss_at(straight, {0, 2})
    straight.fit()
    straight_rows = without_timing(read_metrics(tmp_path / "straight"))
    assert [r["nonfinite"] for r in straight_rows] == [1, 1, 2, 2, 2]
    ckpt = tmp_path / "straight" / f"step-{k}"
    state = load_trainer_state(ckpt)
    assert (state["nonfinite_total"], state["nonfinite_run"]) == (2, 1)

    resumed = Trainer(train_cfg(tmp_path / "resumed", resume=str(ckpt), **cfg))
    assert (resumed.step, resumed.nonfinite_total, resumed.nonfinite_run) == (k, 2, 1)
    resumed.fit()
    assert_same_weights(snapshot(resumed.model), snapshot(straight.model))
    assert without_timing(read_metrics(tmp_path / "resumed")) == straight_rows[k:]

    # the run of skips goes on across the resume: one more non-finite step makes 2 in a row
    again = Trainer(train_cfg(tmp_path / "again", resume=str(ckpt), **cfg))
    nan_loss_at(again, {k})
    with pytest.raises(NonFiniteLossError, match=r"2 non-finite steps in a row"):
        again.train_step()
    assert again.nonfinite_total == 3


def test_checkpoint_discovery_and_keep_last(tmp_path):
    cfg = HybridConfig.from_preset("tiny")
    cfg.num_layers, cfg.layer_types = 1, ["lightning"]  # small and quick to write
    weights = HybridLM(cfg.validate()).state_dict()

    def auto():
        return list(resume_candidates("auto", tmp_path))

    assert complete_checkpoints(tmp_path / "none") == []
    assert auto() == [] and list(resume_candidates("", tmp_path)) == []
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, cfg, weights, {"step": step}, keep_last=2)
    assert complete_checkpoints(tmp_path) == [tmp_path / "step-2", tmp_path / "step-3"]
    (tmp_path / "step-3" / MARKER).unlink()  # as if its save had been cut short
    (tmp_path / ".step-4.partial-99").mkdir()
    assert auto() == [tmp_path / "step-2"]
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        resume_candidates(str(tmp_path / "step-3"), tmp_path)
    with pytest.raises(FileNotFoundError, match="step-7"):
        resume_candidates(str(tmp_path / "step-7"), tmp_path)
    (given,) = resume_candidates(str(tmp_path / "step-2"), tmp_path)
    assert load_trainer_state(given)["step"] == 2
    # step-10 sorts after step-2 by number, not by name; auto tries the newest first
    save_checkpoint(tmp_path, 10, cfg, weights, {"step": 10}, keep_last=0)
    assert auto() == [tmp_path / "step-10", tmp_path / "step-2"]


def test_sigterm_saves_a_checkpoint_and_exits_zero(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "lightlong", "train", "steps=100000", "log_every=1",
           "seq_len=64", "batch_size=2", "num_pairs=4", "num_queries=4", "eval_every=0",
           "eval_batches=1", "progress=false", f"out_dir={out}"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + TIMEOUT_S
        metrics = out / "metrics.jsonl"
        while not (metrics.is_file() and metrics.read_text().strip()):
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "no metrics line"
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=TIMEOUT_S)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert proc.returncode == 0, stderr[-3000:]
    (ckpt,) = complete_checkpoints(out)
    step = load_trainer_state(ckpt)["step"]
    assert ckpt.name == f"step-{step}" and 1 <= step < 100000
    assert json.loads(stdout.splitlines()[-1])["step"] == step  # the last metrics line


# ------------------------------------------------------------------- several processes

INJECT = """
import sys

from lightlong.cli import main
from lightlong.train import loop

real = loop.Trainer._loss


def _loss(self, batch):
    out = real(self, batch)
    if self.rank == 1 and self.step == 1:  # the second step's loss is NaN on rank 1 only
        out.loss = out.loss * float("nan")
    return out


loop.Trainer._loss = _loss
main(sys.argv[1:])
"""


def experts_chosen(model: HybridLM, ids: torch.Tensor, cu: torch.Tensor) -> list[set[int]]:
    """Per layer, the experts that some token of the row is routed to."""
    chosen, hooks = [], []
    for layer in model.model.layers:
        k = layer.block_sparse_moe.top_k

        def record(module, args, logits, k=k):
            chosen.append(set(logits.topk(k).indices.flatten().tolist()))

        hooks.append(layer.block_sparse_moe.gate.register_forward_hook(record))
    with torch.no_grad():
        model(ids, cu_seqlens=cu)
    for h in hooks:
        h.remove()
    return chosen


def torchrun_2(cwd: Path, target: list[str]) -> None:
    """Runs `torch.distributed.run --nproc-per-node 2 TARGET` (gloo on the CPU) to its end."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-port", str(free_port()), *target]  # fmt: skip
    proc = run_to_end(cmd, cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_match_one(tmp_path, moe_model, parallel):
    # 2 gloo processes with 2 samples each vs 1 process with all 4; step 2's loss is NaN on
    # rank 1 only (and in the one process): every rank must skip it together
    args = [f"model={moe_model}", "steps=3", "num_pairs=4", "num_queries=4", "seq_len=64",
            "batch_size=4", "warmup_steps=1", "eval_every=0", "eval_batches=2", "log_every=1",
            "progress=false"]  # fmt: skip
    # the ranks route to different experts: experts without a gradient on one rank only
    model = HybridLM.from_pretrained(moe_model)
    task = SyntheticTask("recall", 512, 4, 4)
    per_rank = [next(SyntheticData(task, 64, 4, 0, r, 2)) for r in (0, 1)]
    routed = [experts_chosen(model, b.input_ids, b.cu_seqlens) for b in per_rank]
    assert any(a != b for a, b in zip(*routed, strict=True))

    script = tmp_path / "inject.py"
    script.write_text(INJECT)
    out = tmp_path / parallel
    torchrun_2(tmp_path, [str(script), "train", *args, f"parallel={parallel}", f"out_dir={out}"])

    one = Trainer(TrainConfig.load(None, [*args, f"out_dir={tmp_path / 'one'}"]))
    real = one._loss

    def _loss(batch):
        out = real(batch)
        if one.step == 1:
            out.loss = out.loss * float("nan")
        return out

    one._loss = _loss
    one.fit()
    two_rows, one_rows = read_metrics(out), read_metrics(tmp_path / "one")
    assert [r["nonfinite"] for r in two_rows] == [r["nonfinite"] for r in one_rows] == [0, 1, 1]
    assert two_rows[-1]["eval_loss"] == pytest.approx(one_rows[-1]["eval_loss"], rel=1e-5)
    two = HybridLM.from_pretrained(out / "step-3", dtype=torch.float32).state_dict()
    start = HybridLM.from_pretrained(moe_model).state_dict()
    # AdamW divides by the gradient's running RMS, so rounding differences of rarely used
    # experts' small gradients grow to ~1e-5; a wrong reduction is off by far more.
    for k, w in snapshot(one.model).items():
        assert_close(two[k], w, 5e-5, k)
    assert max(rel_err(w, start[k]) for k, w in two.items()) > 1e-3  # and they did train


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_resume_equals_uninterrupted_run(tmp_path, moe_model, parallel):
    # 2 processes train N steps and save at step k; 2 processes resume from step-k to N and
    # must end where the uninterrupted run did. Step 2's loss is NaN on rank 1 (INJECT), so
    # the checkpoint also carries a skipped step.
    N, k = 4, 2
    args = [f"model={moe_model}", f"steps={N}", f"save_every={k}", "num_pairs=4",
            "num_queries=4", "seq_len=64", "batch_size=4", "warmup_steps=1", "eval_every=0",
            "eval_batches=2", "log_every=1", "progress=false", f"parallel={parallel}"]  # fmt: skip
    script = tmp_path / "inject.py"
    script.write_text(INJECT)
    straight = tmp_path / "straight"
    torchrun_2(tmp_path, [str(script), "train", *args, f"out_dir={straight}"])
    ckpt = straight / f"step-{k}"
    resumed = tmp_path / "resumed"
    torchrun_2(tmp_path, ["-m", "lightlong", "train", *args, f"resume={ckpt}",
                          f"out_dir={resumed}"])  # fmt: skip

    rows, straight_rows = read_metrics(resumed), read_metrics(straight)
    assert [r["step"] for r in rows] == list(range(k + 1, N + 1))  # it did resume at k
    assert [r["nonfinite"] for r in straight_rows] == [0, 1, 1, 1]
    assert [r["nonfinite"] for r in rows] == [1, 1]
    for r, s in zip(rows, straight_rows[k:], strict=True):
        for key in ("loss", "grad_norm", "lr"):
            assert r[key] == pytest.approx(s[key], rel=1e-5), (r["step"], key)
    assert rows[-1]["eval_loss"] == pytest.approx(straight_rows[-1]["eval_loss"], rel=1e-5)
    final = HybridLM.from_pretrained(resumed / f"step-{N}", dtype=torch.float32).state_dict()
    expected = HybridLM.from_pretrained(straight / f"step-{N}", dtype=torch.float32).state_dict()
    at_k = HybridLM.from_pretrained(ckpt, dtype=torch.float32).state_dict()
    assert final.keys() == expected.keys()
    for key, w in expected.items():  # tolerance as in test_two_processes_match_one
        assert_close(final[key], w, 5e-5, key)
    assert max(rel_err(w, at_k[key]) for key, w in expected.items()) > 1e-3  # steps k+1… train


@pytest.mark.slow
def test_two_processes_evaluate_the_same_held_out_text_as_one(tmp_path, moe_model):
    # each held-out batch is 4 windows over both ranks: batches 0, 1, 2 are windows 0-11
    docs = [
        json.dumps({"text": f"Held-out document {i}: " + "abc xyz " * (3 + i)}) for i in range(12)
    ]
    (tmp_path / "held.jsonl").write_text("\n".join(docs) + "\n")
    files = [str(write_docs(tmp_path)[0]), str(tmp_path / "held.jsonl")]
    args = [f"model={moe_model}", "task=text", f"data_files={','.join(files)}", "seq_len=32",
            "batch_size=4", "steps=1", "warmup_steps=1", "eval_every=0", "eval_batches=3",
            "progress=false"]  # fmt: skip
    torchrun_2(tmp_path, ["-m", "lightlong", "train", *args, f"out_dir={tmp_path / 'two'}"])
    one = Trainer(TrainConfig.load(None, [*args, f"out_dir={tmp_path / 'one'}"]))
    assert one.eval_data.num_windows >= 12  # so that other windows would give another loss
    one.fit()
    two_rows, one_rows = read_metrics(tmp_path / "two"), read_metrics(tmp_path / "one")
    assert two_rows[-1]["eval_loss"] == pytest.approx(one_rows[-1]["eval_loss"], rel=1e-5)


# -------------------------------------------------------------------------------- demo


def test_demo_trains_three_models_and_reports_accuracy(tmp_path, capsys):
    cfg = DemoConfig(seq_len=64, num_pairs=4, num_queries=4, steps=2, batch_size=2,
                     length_factors=[1, 2], eval_batches=1, out_dir=str(tmp_path))  # fmt: skip
    report = run_demo(cfg)
    results = report["results"]
    assert list(results) == ["demo", "demo-linear", "demo-softmax"]
    assert [r["layers"] for r in results.values()] == ["LS", "LL", "SS"]
    for r in results.values():
        acc = r["accuracy"]
        assert list(acc) == [64, 128] and all(0 <= a <= 1 for a in acc.values())
        assert [step for step, _ in r["curve"]] == [1, 2]
    saved = json.loads((tmp_path / "report.json").read_text())
    acc = results["demo"]["accuracy"]
    assert saved["results"]["demo"]["accuracy"] == {"64": acc[64], "128": acc[128]}
    assert (tmp_path / "loss.png").is_file() and (tmp_path / "accuracy.png").is_file()
    printed = capsys.readouterr().out
    assert "| demo-softmax | SS |" in printed
    assert "associative recall, 4 pairs (1–4 in training), 4 queries, trained at 64" in printed
    assert saved["summary"] == summarize(report) and saved["summary"] in printed


def _made_up(hybrid: dict, linear: dict, softmax: dict | None = None) -> dict:
    results = {"h": {"layers": "LS", "accuracy": hybrid}, "l": {"layers": "LL", "accuracy": linear}}
    if softmax is not None:
        results["s"] = {"layers": "SS", "accuracy": softmax}
    return {"results": results}


def test_demo_summary_says_what_the_numbers_show():
    wins = summarize(_made_up({48: 0.97, 192: 0.91}, {48: 0.2, 192: 0.1}, {48: 1.0, 192: 0.55}))
    assert "hybrid h (LS) answers 0.97" in wins and "all-lightning l 0.20" in wins
    assert "the softmax layer gives the retrieval" in wins
    assert "At 192 tokens the hybrid answers 0.91 and the all-softmax s 0.55." in wins
    loses = summarize(_made_up({48: 0.1, 192: 0.1}, {48: 0.8, 192: 0.7}))
    assert "retrieves worse than all-lightning" in loses and "gives the retrieval" not in loses
    assert loses.endswith("At 192 tokens the hybrid answers 0.10.")
    alike = summarize(_made_up({48: 0.5}, {48: 0.4}))
    assert "retrieve alike" in alike and "At " not in alike.split(": ")[-1]
    # the boundary: a gap of exactly 0.3 counts as a difference
    assert "gives the retrieval" in summarize(_made_up({48: 0.8}, {48: 0.5}))
    assert "no hybrid" in summarize({"results": {"s": {"layers": "SS", "accuracy": {48: 1}}}})


def _previous_token_loss(steps: int, **model) -> float:
    """A one-layer lightning model of the demo preset's width and decay (with `model`
    overrides) trained to output the token before the current one, the step that MQAR
    needs from the hybrid's lightning layer: held-out loss after `steps` steps."""
    config = dataclasses.replace(HybridConfig.from_preset("demo"), num_layers=1,
                                 layer_types=["lightning"], **model)  # fmt: skip
    torch.manual_seed(0)
    net = HybridLM(config)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)

    def batch(rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.randint(1, config.vocab_size, (rows, 32), generator=gen)
        labels = torch.full_like(ids, IGNORE)
        labels[:, 2:] = ids[:, :-2]  # the model shifts labels: position t predicts ids[t - 1]
        return ids, labels

    for _ in range(steps):
        ids, labels = batch(16)
        net(ids, labels=labels, logits_to_keep=0).lm_loss.backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        ids, labels = batch(64)
        return float(net(ids, labels=labels, logits_to_keep=0).lm_loss)


def test_demo_lightning_layer_learns_to_carry_the_previous_token():
    """What the demo's hybrid needs from its lightning layer (docs/hybrid-recall.md): in 60
    steps the demo preset's layer (decay of a 64-head model's first 4 heads) copies the
    previous token (loss 0.16–0.19 over three seeds when written; ln 127 = 4.84 at chance).
    With MiniMax's own 4-head rates the same run ends at 1.99, and without decay at 3.82."""
    assert _previous_token_loss(60) < 0.6
    assert _previous_token_loss(60, decay_slope_heads=0) > 1.2


@pytest.mark.slow
def test_full_demo_hybrid_recalls_at_the_training_length(tmp_path):
    """`make run`'s demo on seed 0: the hybrid answers >= 0.9 of held-out MQAR queries at
    the training length and all-lightning at least 0.3 fewer."""
    report = run_demo(DemoConfig(out_dir=str(tmp_path)))
    acc = {name: r["accuracy"][48] for name, r in report["results"].items()}
    assert acc["demo"] >= 0.9 and acc["demo-linear"] <= acc["demo"] - 0.3, acc


def test_demo_table_cells_are_the_report_numbers():
    report = {
        "task": "copy 16 tokens, trained at 64 tokens",
        "machine": {"cpu": "x", "torch_threads": 2},
        "results": {
            "m": {"layers": "LS", "params": 1.5e6, "train_seconds": 12.4, "eval_loss": 0.1234,
                  "accuracy": {64: 0.987, 256: 0.25}},
        },
    }  # fmt: skip
    row = next(line for line in format_demo(report).splitlines() if line.startswith("| m |"))
    assert row == "| m | LS | 1.50M | 12 | 0.123 | 0.99 | 0.25 |"


@pytest.mark.parametrize(
    ("field", "value"),
    [("presets", []), ("length_factors", [2, 4]), ("length_factors", [0, 1]), ("task", "text")],
)
def test_demo_config_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        DemoConfig(**{field: value}).validate()


def test_metrics_go_to_tensorboard_when_it_is_installed(tmp_path, monkeypatch):
    """With a SummaryWriter importable, every logged metric is a scalar at its step."""
    written: list[tuple[str, float, int]] = []

    class Writer:
        def __init__(self, log_dir: str):
            assert log_dir == str(tmp_path / "tensorboard")

        def add_scalar(self, key: str, value: float, step: int) -> None:
            written.append((key, value, step))

        def close(self) -> None:
            written.append(("closed", 0.0, 0))

    fake = types.ModuleType("torch.utils.tensorboard")
    fake.SummaryWriter = Writer
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", fake)
    Trainer(train_cfg(tmp_path, steps=2)).fit()
    rows = read_metrics(tmp_path)
    expected = [(k, v, r["step"]) for r in rows for k, v in r.items() if k != "step"]
    assert written == [*expected, ("closed", 0.0, 0)]
