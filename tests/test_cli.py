"""The `lightlong` command line as a user meets it: --version, defaults in every --help,
generate's output and stdin prompt, tokenizer training, info's units, the bench commands
that tests/test_bench_cli.py does not run, and the modes of the files it writes."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import stat
import typing
from importlib.metadata import version

import pytest

from lightlong import units
from lightlong.cli import build_parser
from lightlong.train.config import TrainConfig


def _leaf_parsers(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> list[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    """(command words, parser) of every command that runs something."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        return [(path, parser)]
    return [leaf for name, p in subs[0].choices.items() for leaf in _leaf_parsers(p, (*path, name))]


def _option_help(parser: argparse.ArgumentParser) -> dict[str, str]:
    """Each option's entry in --help (its flags and help text, whitespace joined), by its
    first flag."""
    blocks: dict[str, str] = {}
    current = None
    for line in parser.format_help().splitlines():
        m = re.match(r"  (-[-\w]+)", line)
        if m:
            current = m.group(1)
            blocks[current] = line
        elif current and line.startswith("   "):
            blocks[current] += " " + line
        else:
            current = None
    return {flag: " ".join(text.split()) for flag, text in blocks.items()}


def test_version(cli):
    code, out, _ = cli("--version")
    assert (code, out) == (0, f"lightlong {version('lightlong')}\n")


def test_every_subcommand_help_says_each_default_once(monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    leaves = _leaf_parsers(build_parser())
    assert {" ".join(p) for p, _ in leaves} >= {
        "bench attention", "bench model", "bench generate", "bench train", "train", "demo",
        "ablate", "eval", "info", "tokenizer train", "generate",
    }  # fmt: skip
    for path, parser in leaves:
        command = " ".join(path)
        entries = _option_help(parser)
        # flags from a config dataclass (add_config_args) keep argparse's default None, so
        # that only flags given override --config; their help shows the dataclass's
        from_config = "--print-config" in entries and command != "train"
        for action in parser._actions:
            flag = action.option_strings[0] if action.option_strings else None
            if flag in (None, "--config") or action.nargs == 0 or action.required:
                continue
            text = entries[flag]
            if from_config:
                assert text.count("(default:") == 1, f"{command} {flag}: {text}"
            else:
                assert text.count("(default:") <= 1, f"{command} {flag}: {text}"
                if action.default not in (None, []):
                    assert f"(default: {action.default})" in text, f"{command}: {text}"
    help_ = _option_help(dict(leaves)[("bench", "generate")])
    assert help_["--long-prompt"].endswith("(default: 1000000)")
    assert help_["--contexts"].endswith("(default: empty)")
    assert help_["--transformers"].endswith("(default: True)")
    help_ = _option_help(dict(leaves)[("demo",)])
    assert help_["--presets"].endswith("(default: demo demo-linear demo-softmax)")
    # a help text that names its default keeps it and gets no second one
    help_ = _option_help(dict(leaves)[("eval",)])
    assert "(default: the model directory's, else bytes)" in help_["--tokenizer"]
    assert help_["--tokenizer"].count("default") == 1
    help_ = _option_help(dict(leaves)[("generate",)])
    assert help_["--max-new-tokens"].endswith("tokens to generate at most (default: 128)")
    assert help_["--tokenizer"].count("default") == 1


def test_train_help_lists_every_key_with_type_default_and_docstring(cli):
    code, out, _ = cli("train", "--help")
    assert code == 0
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        table = hints[f.name]  # parallel: a table, listed as its keys parallel.NAME
        names = [f"{f.name}.{sub.name}" for sub in dataclasses.fields(table)] if \
            dataclasses.is_dataclass(table) else [f.name]  # fmt: skip
        for name in names:
            assert re.search(rf"^  {re.escape(name)} \(", out, re.MULTILINE), name
    assert "parallel.sequence (int, default 1) Sequence-parallel degree" in " ".join(out.split())
    joined = " ".join(out.split())
    assert "warmup_steps (int, default 20) Linear warmup from 0." in joined
    assert "eval_lengths (list[int], default empty) Synthetic tasks: also measure" in joined
    assert "tokenizer (str, default '')" in joined
    # a docstring over several source lines reads as one paragraph
    assert "Preset name or config .json file (fresh weights from `seed`), or a checkpoint " \
        "directory to start from." in joined  # fmt: skip


# -- generate ------------------------------------------------------------------------------

STATS = re.compile(
    r"^\[(\d+) prompt tokens at [\d,]+ tok/s; (\d+) new at [\d,.]+ tok/s; finish: \w+; "
    r"cache [\d,.]+ MiB \(lightning [\d,.]+, softmax KV [\d,.]+\)\]$"
)


def test_generate_ends_its_text_with_a_newline_and_reports_on_stderr(cli):
    code, out, err = cli("generate", "--model", "tiny", "--prompt", "hi", "--max-new-tokens",
                         "4", "--ignore-eos")  # fmt: skip
    assert code == 0, err
    assert out.endswith("\n") and not out.endswith("\n\n")
    stats = STATS.match(err.strip().splitlines()[-1])
    assert stats, err
    assert stats.groups() == ("2", "4")  # "hi" is 2 bytes; 4 new tokens


@pytest.mark.parametrize("flag", ["--prompt", "--prompt-file"])
def test_generate_reads_the_prompt_from_stdin(cli, flag):
    prompt = "hello there\n"
    args = ("generate", "--model", "tiny", "--max-new-tokens", "3", "--ignore-eos")
    code, out, err = cli(*args, flag, "-", stdin=prompt)
    assert code == 0, err
    code, ref_out, ref_err = cli(*args, "--prompt", prompt)
    assert code == 0, ref_err
    assert STATS.match(err.splitlines()[-1]).group(1) == str(len(prompt.encode()))
    assert out == ref_out  # greedy: the same prompt gives the same text


def test_generate_empty_stdin_is_a_clear_error(cli):
    code, out, err = cli("generate", "--model", "tiny", "--prompt", "-", stdin="")
    assert code == 2 and out == ""
    assert "the prompt is empty" in err


# -- tokenizer, info ---------------------------------------------------------------------------


def test_tokenizer_train_writes_files_and_says_the_vocab_size(cli, tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog\n" * 50, encoding="utf-8")
    out_dir = tmp_path / "tok"
    code, out, err = cli("tokenizer", "train", str(corpus), "--vocab-size", "300", "--out",
                         str(out_dir))  # fmt: skip
    assert code == 0, err
    assert (out_dir / "tokenizer.json").is_file()
    assert (out_dir / "tokenizer_config.json").is_file()
    m = re.fullmatch(r"wrote (.+) \(vocab size (\d+)\)\n", out)
    assert m, out
    assert 258 <= int(m.group(2)) <= 300
    vocab = json.loads((out_dir / "tokenizer.json").read_text())["model"]["vocab"]
    assert int(m.group(2)) == len(vocab)


def test_human_units():
    assert [units.count(n) for n in (0, 999, 1000, 534_000, 999_950, 1.2e9, 456.09e9)] == [
        "0", "999", "1K", "534K", "1M", "1.2B", "456B",
    ]  # fmt: skip
    assert units.count(0.001) == "0.001" and units.count(1e-5) == "0.00001"
    assert [units.size(n) for n in (0, 512, 2**10, 3 * 2**20, 1.5 * 2**30, 850 * 2**30)] == [
        "0 B", "512 B", "1 KiB", "3 MiB", "1.5 GiB", "850 GiB",
    ]  # fmt: skip
    assert units.size(1023.9 * 2**20) == "1 GiB"  # rounds up into the next unit
    assert [units.length(n) for n in (96, 1024, 4096, 65536, 2**20)] == [
        "96", "1K", "4K", "64K", "1M",
    ]  # fmt: skip


def test_info_prints_human_units(cli):
    code, out, err = cli("info", "tiny", "--context", "1000")
    assert code == 0, err
    params = next(line for line in out.splitlines() if line.startswith("parameters"))
    assert re.fullmatch(
        r"parameters +total \d+(\.\d+)?K, active/token \d+(\.\d+)?K "
        r"\(without \d+(\.\d+)?K embedding/LM head\)",
        params,
    ), params
    memory = out.split("weights:\n")[1].splitlines()
    assert [line.split()[0] for line in memory] == ["weights", "lightning", "softmax", "total"]
    for line in memory:
        # a number >= 1 in the unit that fits: no "0.00 GiB", no "0.0117 GiB"
        assert re.search(r"\s[1-9]\d{0,2}(\.\d+)? (B|KiB|MiB)\b", line), line


# -- files written -------------------------------------------------------------------------


@pytest.mark.parametrize("umask", [0o022, 0o077], ids=["umask022", "umask077"])
def test_checkpoint_modes_follow_the_umask(tmp_path, umask):
    from lightlong.model import HybridConfig, HybridLM

    model = HybridLM(HybridConfig.from_preset("tiny"))
    old = os.umask(umask)
    try:
        model.save_pretrained(tmp_path / "ck")
        model.save_pretrained(tmp_path / "ck")  # replacing one too
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "ck").iterdir()}
    assert stat.S_IMODE((tmp_path / "ck").stat().st_mode) == 0o777 & ~umask
    assert modes and set(modes.values()) == {0o666 & ~umask}, modes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]  # no temporary left


# -- the bench commands test_bench_cli.py does not run -------------------------------------


@pytest.fixture
def bench_in_process(monkeypatch):
    """Each measurement in this process, timed once or twice: what the command does with
    the numbers is under test here, not the numbers."""
    from lightlong.bench import generate, machine, model, train, worker

    def here(spec: dict, timeout_s: float, failed: list | None = None) -> dict:
        return worker._KINDS[spec["kind"]](spec)

    def roofline(device: str = "cpu"):  # a few milliseconds: sizes far below the caches
        return machine.measure_roofline(device, gemm_n=64, matvec_bytes=2**16,
                                        copy_bytes=2**16, budget_s=0.0)  # fmt: skip

    monkeypatch.setattr(worker, "_BUDGET_S", 0.0)
    monkeypatch.setattr(worker, "_MIN_REPS", 1)
    for module in (generate, model, train):
        monkeypatch.setattr(module, "run_in_fresh_process", here)
        monkeypatch.setattr(module, "measure_roofline", roofline)


# The benches run a preset as transformers can (post-norm, full-head RoPE): `tiny` is quick.
BENCHES = {
    "model": ["--lengths", "32", "--fwdbwd-max-len", "16"],  # prefill only
    "generate": ["--contexts", "32", "--long-prompt", "0", "--new-tokens", "2", "--batch", "2",
                 "--batch-context", "16", "--prefix", "64", "--suffix", "8",
                 "--prefill-chunk", "64",  # the prefix cache keeps whole chunks
                 "--precision-context", "32"],
    "train": ["--lengths", "32", "--tokens", "64"],
}  # fmt: skip


@pytest.mark.parametrize("command", list(BENCHES))
def test_bench_command_small_run_writes_its_report(cli, bench_in_process, tmp_path, command):
    code, out, err = cli("bench", command, "--preset", "tiny", "--no-transformers",
                         "--out-dir", str(tmp_path), *BENCHES[command])  # fmt: skip
    assert code == 0, err
    assert "targets:" in out
    report = json.loads((tmp_path / f"{command}-cpu.json").read_text())
    assert report["config"]["preset"] == "tiny"
    assert (tmp_path / f"{command}-cpu.md").read_text().startswith("|")
    assert (tmp_path / f"{command}-cpu.png").stat().st_size > 0


def test_help_of_a_config_subclass_has_its_base_fields_docstrings():
    """demo and ablate share the recipe's fields (RecipeConfig): their help keeps the docs."""
    from lightlong.config import field_docs
    from lightlong.train.ablate import AblateConfig
    from lightlong.train.demo import DemoConfig

    for cls in (DemoConfig, AblateConfig):
        docs = field_docs(cls)
        assert docs["min_pairs"].startswith("Recall: training samples have min_pairs")
        assert set(docs) == {f.name for f in dataclasses.fields(cls)}
