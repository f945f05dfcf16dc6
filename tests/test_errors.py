"""The first hour: every failure that touches a file or a device is one line naming the file,
key or argument (exit 2, no traceback; `--debug` shows it), the Python API raises ValueError /
FileNotFoundError subclasses with the same text, checkpoints carry their tokenizer, and
model references (preset, checkpoint, run directory) resolve alike everywhere."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lightlong import HybridConfig, HybridLM
from lightlong.cli import main
from lightlong.model.checkpoint import CheckpointError
from lightlong.model.source import load_model, load_model_tokenizer, resolve_model
from lightlong.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer, train_bpe
from lightlong.train import TrainConfig, Trainer
from lightlong.train.checkpoint import STATE_FILE, complete_checkpoints

TIMEOUT_S = 240


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def cli(capsys, *args: str) -> tuple[int, str, str]:
    """Runs `lightlong ARGS` in this process: (exit code, stdout, stderr)."""
    try:
        main(list(args))
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(err: str, *needles: str) -> None:
    lines = [ln for ln in err.splitlines() if ln.startswith("lightlong: error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def tiny_checkpoint(path: Path, **save) -> HybridLM:
    torch.manual_seed(0)
    model = HybridLM(HybridConfig.from_preset("tiny"))
    model.save_pretrained(path, **save)
    return model


def train_cfg(out: Path, **kw) -> TrainConfig:
    base = dict(model="tiny", seq_len=64, batch_size=2, num_pairs=4, num_queries=4,
                steps=4, eval_every=0, eval_batches=1, log_every=1, warmup_steps=1,
                progress=False, out_dir=str(out))  # fmt: skip
    base.update(kw)
    return TrainConfig(**base)


# -------------------------------------------------------------------- checkpoint files


def test_truncated_safetensors_is_named(tmp_path, capsys):
    tiny_checkpoint(tmp_path / "ck")
    file = tmp_path / "ck" / "model.safetensors"
    for size in (file.stat().st_size // 2, 5):  # cut in the tensors, cut in the header
        with open(file, "r+b") as f:
            f.truncate(size)
        with pytest.raises(CheckpointError, match=r"model\.safetensors.*truncated"):
            HybridLM.from_pretrained(tmp_path / "ck")
        code, _, err = cli(capsys, "generate", "--model", str(tmp_path / "ck"), "--prompt", "hi")
        assert code == 2
        one_line_error(err, "model.safetensors")


def test_directory_without_config_and_missing_paths(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"no config\.json and no complete step-N"):
        HybridLM.from_pretrained(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="nope"):
        HybridLM.from_pretrained(tmp_path / "nope")
    for command in (["info", str(tmp_path / "empty")],
                    ["generate", "--model", str(tmp_path / "empty"), "--prompt", "x"],
                    ["eval", "niah", "--model", str(tmp_path / "empty")]):  # fmt: skip
        code, _, err = cli(capsys, *command)
        assert code == 2, command
        one_line_error(err, "empty", "config.json")
    code, _, err = cli(capsys, "info", "no-such-preset")
    assert code == 2
    one_line_error(err, "no-such-preset", "tiny")  # names the presets


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(CheckpointError):
        main(["--debug", "info", str(tmp_path)])
    with pytest.raises(CheckpointError):  # after the command too
        main(["info", str(tmp_path), "--debug"])


def test_run_directory_resolves_to_its_newest_complete_checkpoint(tmp_path, capsys, monkeypatch):
    trainer = Trainer(train_cfg(tmp_path / "run", save_every=2, keep_last=0))
    trainer.fit()
    (tmp_path / "run" / "step-4" / "COMPLETE").unlink()  # as if its save was cut short
    assert resolve_model(tmp_path / "run") == tmp_path / "run" / "step-2"
    loaded = load_model(str(tmp_path / "run"))
    saved = HybridLM.from_pretrained(tmp_path / "run" / "step-2")
    for (name, a), b in zip(loaded.state_dict().items(), saved.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    code, out, _ = cli(capsys, "info", str(tmp_path / "run"), "--context", "1000")
    assert code == 0 and "LLLS" in out
    with pytest.warns(UserWarning, match=r"trained on token ids \(synthetic task recall\)"):
        code, out, err = cli(capsys, "generate", "--model", str(tmp_path / "run"), "--prompt",
                             "hi", "--max-new-tokens", "2")  # fmt: skip
    assert code == 0, err
    # a preset name wins over a directory of that name that holds no checkpoint
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny").mkdir()
    assert isinstance(resolve_model("tiny"), HybridConfig)


# -------------------------------------------------------------------- tokenizers


def test_checkpoints_carry_their_tokenizer(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    train_bpe([corpus], 300, tmp_path / "tok")
    trainer = Trainer(train_cfg(tmp_path / "run", task="text", data_files=[str(corpus)],
                                tokenizer=str(tmp_path / "tok"), steps=2))  # fmt: skip
    trainer.fit()
    ck = tmp_path / "run" / "step-2"
    assert (ck / "tokenizer.json").is_file()
    tok = load_model_tokenizer(str(tmp_path / "run"))
    assert isinstance(tok, HFTokenizer)
    text = "the lazy fox"
    assert tok.encode(text) == HFTokenizer(tmp_path / "tok").encode(text) != list(text.encode())
    generation = json.loads((ck / "generation_config.json").read_text())
    assert generation["eos_token_id"] == tok.eos_token_id
    assert json.loads((ck / "tokenizer_config.json").read_text())["eos_token"] == "<|endoftext|>"
    # a model saved without a tokenizer says bytes when its vocabulary holds them
    tiny_checkpoint(tmp_path / "plain")
    assert isinstance(load_tokenizer(tmp_path / "plain"), ByteTokenizer)
    # an unreadable --tokenizer is an error, not a silent fallback to bytes
    code, _, err = cli(capsys, "generate", "--model", str(ck), "--prompt", "x", "--tokenizer",
                       str(tmp_path / "missing"))  # fmt: skip
    assert code == 2
    one_line_error(err, "missing")
    (tmp_path / "bad.json").write_text("{")
    code, _, err = cli(capsys, "generate", "--model", str(ck), "--prompt", "x", "--tokenizer",
                       str(tmp_path / "bad.json"))  # fmt: skip
    assert code == 2
    one_line_error(err, "bad.json")


def test_checkpoint_from_before_tokenizers_were_saved_warns(tmp_path):
    tiny_checkpoint(tmp_path / "old")
    for name in ("tokenizer_config.json", "generation_config.json"):
        (tmp_path / "old" / name).unlink()
    with pytest.warns(UserWarning, match="holds no tokenizer"):
        assert isinstance(load_tokenizer(tmp_path / "old"), ByteTokenizer)
    # the command line shows it as one line (a fresh process: pytest captures warnings)
    run = subprocess.run(
        [sys.executable, "-m", "lightlong", "generate", "--model", str(tmp_path / "old"),
         "--prompt", "hi", "--max-new-tokens", "1"],
        capture_output=True, text=True, timeout=TIMEOUT_S,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "lightlong: warning:" in run.stderr and "holds no tokenizer" in run.stderr
    assert "UserWarning" not in run.stderr


# -------------------------------------------------------------------- training


def test_out_dir_that_cannot_be_a_directory(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="file"):
        Trainer(train_cfg(tmp_path / "file" / "run"))
    code, _, err = cli(capsys, "train", "model=tiny", f"out_dir={tmp_path / 'file'}")
    assert code == 2
    one_line_error(err, str(tmp_path / "file"), "is not a directory")


def test_resume_into_a_run_of_another_model_or_data_is_refused(tmp_path):
    Trainer(train_cfg(tmp_path / "run", steps=2)).fit()
    with pytest.raises(ValueError, match=r"another model \(attn_type_list"):
        Trainer(train_cfg(tmp_path / "run", model="tiny-linear", resume="auto"))
    with pytest.raises(ValueError, match="seq_len=64 there, 96 here"):
        Trainer(train_cfg(tmp_path / "run", seq_len=96, resume="auto"))


def test_resume_falls_back_past_a_truncated_checkpoint(tmp_path):
    Trainer(train_cfg(tmp_path / "run", save_every=2, keep_last=0)).fit()
    state = tmp_path / "run" / "step-4" / STATE_FILE
    with open(state, "r+b") as f:
        f.truncate(state.stat().st_size // 2)
    # an explicit checkpoint does not fall back
    with pytest.raises(CheckpointError, match=r"trainer_state\.pt"):
        Trainer(train_cfg(tmp_path / "run", resume=str(tmp_path / "run" / "step-4")))
    with pytest.warns(UserWarning, match=r"skipping .*step-4.*trainer_state\.pt"):
        trainer = Trainer(train_cfg(tmp_path / "run", steps=6, resume="auto"))
    assert trainer.resumed_from == tmp_path / "run" / "step-2" and trainer.step == 2


def test_data_file_not_utf8_is_named(tmp_path, capsys):
    (tmp_path / "latin.txt").write_bytes("café au lait\n".encode("latin-1"))
    code, _, err = cli(capsys, "train", "model=tiny", "task=text", "steps=1",
                       f"data_files={tmp_path / 'latin.txt'}", f"out_dir={tmp_path / 'run'}",
                       "progress=false")  # fmt: skip
    assert code == 2
    one_line_error(err, "latin.txt", "not UTF-8", "0xe9")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda_is_one_line(tmp_path, capsys):
    for command in (["generate", "--model", "tiny", "--prompt", "x", "--device", "cuda"],
                    ["train", "model=tiny", "device=cuda", f"out_dir={tmp_path}"]):  # fmt: skip
        code, _, err = cli(capsys, *command)
        assert code == 2
        one_line_error(err, "device 'cuda'", "CUDA is not available")


def test_harness_without_lm_eval_is_one_line():
    pytest.importorskip("torch")
    try:
        import lm_eval  # noqa: F401

        pytest.skip("lm_eval is installed")
    except ImportError:
        pass
    run = subprocess.run([sys.executable, "-m", "lightlong.eval.harness", "--help"],
                         capture_output=True, text=True, timeout=TIMEOUT_S)  # fmt: skip
    assert run.returncode == 2
    assert "Traceback" not in run.stderr and "pip install 'lightlong[lm_eval]'" in run.stderr


@pytest.mark.slow
def test_sigterm_stops_the_demo_cleanly(tmp_path):
    """The demo's run saves, says where, and exits 128 + SIGTERM without a traceback."""
    cmd = [sys.executable, "-m", "lightlong", "demo", "--steps", "3000", "--presets", "tiny",
           "--out-dir", str(tmp_path / "demo")]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            env=env)  # fmt: skip
    metrics = tmp_path / "demo" / "tiny" / "metrics.jsonl"
    deadline = time.monotonic() + TIMEOUT_S
    while not (metrics.is_file() and metrics.read_text()) and time.monotonic() < deadline:
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=TIMEOUT_S)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "Traceback" not in err
    assert "lightlong: interrupted: SIGTERM while training tiny" in err
    assert any(p.name.startswith("step-") for p in (tmp_path / "demo" / "tiny").iterdir())


# -------------------------------------------------------------------- found in review


def test_save_replaces_only_a_checkpoint(tmp_path, monkeypatch):
    model = tiny_checkpoint(tmp_path / "ck")
    model.save_pretrained(tmp_path / "ck")  # a checkpoint directory is replaced
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match=r"notes\.txt besides a checkpoint"):
        model.save_pretrained(tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="not a directory"):
        model.save_pretrained(tmp_path / "file")
    monkeypatch.chdir(tmp_path / "ck")
    with pytest.raises(ValueError, match="working directory"):
        model.save_pretrained(".")


@pytest.mark.parametrize("damage", ["head", "garbage", "no-config", "no-keys"])
def test_resume_falls_back_past_any_broken_newest_checkpoint(tmp_path, damage):
    Trainer(train_cfg(tmp_path / "run", save_every=2, keep_last=0)).fit()
    newest = tmp_path / "run" / "step-4"
    state = newest / STATE_FILE
    if damage == "head":  # cut early: torch.load fails with OSError, not RuntimeError
        state.write_bytes(state.read_bytes()[:5000])
    elif damage == "garbage":
        state.write_text("garbage\n")
    elif damage == "no-config":
        (newest / "config.json").unlink()
    else:
        torch.save({"step": 4}, state)
    skipped = damage != "no-config"  # a step without config.json is not complete at all
    with pytest.warns(UserWarning, match="skipping") if skipped else contextlib.nullcontext():
        trainer = Trainer(train_cfg(tmp_path / "run", steps=6, resume="auto"))
    assert trainer.resumed_from == tmp_path / "run" / "step-2"
    assert resolve_model(tmp_path / "run") == tmp_path / "run" / "step-2"
    # the broken one is moved aside: keep_last (2) keeps step-2 and the new step-6
    assert skipped == any(p.name.startswith("step-4.broken-") for p in newest.parent.iterdir())
    trainer.fit()
    assert [p.name for p in complete_checkpoints(tmp_path / "run")] == ["step-2", "step-6"]


def test_fine_tuning_keeps_the_checkpoint_tokenizer(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    train_bpe([corpus], 300, tmp_path / "tok")
    common = dict(task="text", data_files=[str(corpus)], steps=1)
    Trainer(train_cfg(tmp_path / "run", tokenizer=str(tmp_path / "tok"), **common)).fit()
    tuned = Trainer(train_cfg(tmp_path / "ft", model=str(tmp_path / "run"), **common))
    assert isinstance(tuned.tokenizer, HFTokenizer)
    tuned.fit()
    assert isinstance(load_model_tokenizer(str(tmp_path / "ft")), HFTokenizer)


def test_more_inputs_that_are_one_line(tmp_path, capsys, monkeypatch):
    (tmp_path / "latin.txt").write_bytes("café au lait\n".encode("latin-1"))
    code, _, err = cli(capsys, "tokenizer", "train", str(tmp_path / "latin.txt"),
                       "--vocab-size", "300", "--out", str(tmp_path / "t"))  # fmt: skip
    assert code == 2
    one_line_error(err, "latin.txt", "not UTF-8")
    tiny_checkpoint(tmp_path / "ck")
    (tmp_path / "ck" / "generation_config.json").write_text('{"eos_token_id": "x"}')
    code, _, err = cli(capsys, "generate", "--model", str(tmp_path / "ck"), "--prompt", "hi")
    assert code == 2
    one_line_error(err, "generation_config.json", "eos_token_id")
    raw = json.loads((tmp_path / "ck" / "config.json").read_text())
    (tmp_path / "ck" / "config.json").write_text(json.dumps(raw | {"rope_theta": [1]}))
    code, _, err = cli(capsys, "info", str(tmp_path / "ck"))
    assert code == 2
    one_line_error(err, "config.json", "wrong type")
    code, _, err = cli(capsys, "generate", "--model", "tiny", "--prompt", "x", "--device", "meta")
    assert code == 2
    one_line_error(err, "meta")
    (tmp_path / "notok").mkdir()
    code, _, err = cli(capsys, "generate", "--model", "tiny", "--prompt", "x", "--tokenizer",
                       str(tmp_path / "notok"))  # fmt: skip
    assert code == 2
    one_line_error(err, "notok", "holds no tokenizer")


def test_binary_stdin_prompt_is_one_line():
    run = subprocess.run(
        [sys.executable, "-m", "lightlong", "generate", "--model", "tiny", "--prompt", "-"],
        input=b"\xff\xfe\x00bad", capture_output=True, timeout=TIMEOUT_S,
    )  # fmt: skip
    assert run.returncode == 2
    err = run.stderr.decode()
    one_line_error(err, "stdin", "not UTF-8")
