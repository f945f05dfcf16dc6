"""Tokenizers: byte-level default, trained byte-level BPE, loading, streaming decode, CLI."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from conftest import lightlong_cli

from lightlong.tokenizer import (
    CONFIG_FILE,
    TOKENIZER_FILE,
    ByteTokenizer,
    HFTokenizer,
    IncrementalDecoder,
    Tokenizer,
    load_tokenizer,
    save_tokenizer,
    train_bpe,
)

TEXTS = {
    "ascii": "Hello, world! The quick brown fox.\n\tjumps  over 123",
    "multibyte": "héllo wörld — naïve café, 日本語のテキスト, Ελληνικά",
    "emoji": "ok 😀👍🏽 family: 👨‍👩‍👧 flag: 🇫🇷 end",
    "empty": "",
}
WORDS = ["the", "of", "and", "long", "context", "lightning", "attention", "decay", "state"]
WORDS += ["model", "héllo", "naïve", "日本", "😀"]


def write_corpus(path: Path, n_words: int = 4000, seed: int = 0) -> str:
    rng = random.Random(seed)
    lines = [" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(n_words // 12)]
    text = "\n".join(lines) + "\n"
    path.write_text(text, encoding="utf-8")
    return text


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[HFTokenizer, str]:
    root = tmp_path_factory.mktemp("bpe")
    text = write_corpus(root / "corpus.txt")
    return train_bpe([root / "corpus.txt"], 300, root / "tok"), text


@pytest.mark.parametrize("name", TEXTS)
def test_byte_tokenizer_round_trip(name):
    tok = ByteTokenizer()
    text = TEXTS[name]
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert tok.decode(ids) == text


def test_byte_tokenizer_specials():
    tok = ByteTokenizer()
    assert (tok.vocab_size, tok.eos_token_id, tok.bos_token_id) == (257, 256, None)
    assert isinstance(tok, Tokenizer)
    assert tok.decode([104, 256, 105, 256]) == "hi"  # eos is skipped
    # the literal string is bytes, not eos
    assert 256 not in tok.encode("<|endoftext|>")
    assert tok.decode([0xE6, 0x97]) == "\ufffd"  # a partial character
    with pytest.raises(ValueError, match="257"):
        tok.decode([257])
    with pytest.raises(ValueError, match="-1"):
        tok.decode([-1])


@pytest.mark.parametrize("name", TEXTS)
def test_trained_bpe_round_trip(trained, name):
    tok, _ = trained
    text = TEXTS[name]
    assert tok.decode(tok.encode(text)) == text


def test_trained_bpe_vocab_specials_and_compression(trained):
    tok, corpus = trained
    assert isinstance(tok, Tokenizer)
    assert tok.vocab_size == 300  # the corpus has far more than 43 frequent pairs
    assert (tok.eos_token_id, tok.bos_token_id) == (0, None)
    assert tok.decode([tok.eos_token_id]) == ""
    # special tokens written in the text are recognised, as in transformers
    assert tok.encode("a<|endoftext|>")[-1] == tok.eos_token_id
    n_tokens, n_bytes = len(tok.encode(corpus)), len(corpus.encode("utf-8"))
    assert n_tokens < n_bytes / 2, (n_tokens, n_bytes)  # 43 merges: about 2.3 bytes/token
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([300])


def test_trained_bpe_small_corpus_gives_fewer_ids(tmp_path):
    (tmp_path / "a.txt").write_text("ab ab ab cd\n", encoding="utf-8")
    tok = train_bpe([tmp_path / "a.txt"], 1000, tmp_path / "tok")
    # merges stop when no pair occurs min_frequency (2) times: ab, Ġab (maybe Ġ+a first)
    assert 257 < tok.vocab_size < 1000
    assert tok.decode(tok.encode("ab cd ef")) == "ab cd ef"
    assert len(tok.encode(" ab ab")) == 2


def test_train_errors(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("hello\n", encoding="utf-8")
    missing = tmp_path / "nope.txt"
    with pytest.raises(ValueError, match=r"nope\.txt"):
        train_bpe([corpus, missing], 300, tmp_path / "tok")
    with pytest.raises(ValueError, match=r"vocab-size.*>= 258.*got 257"):
        train_bpe([corpus], 257, tmp_path / "tok")
    with pytest.raises(ValueError, match="min-frequency"):
        train_bpe([corpus], 300, tmp_path / "tok", min_frequency=0)
    assert not (tmp_path / "tok").exists()


def test_load_tokenizer_picks_the_class(trained, tmp_path):
    tok, _ = trained
    assert isinstance(load_tokenizer(None), ByteTokenizer)
    assert isinstance(load_tokenizer(tmp_path), ByteTokenizer)  # a directory, no tokenizer.json
    for source in (tok.path.parent, tok.path, str(tok.path)):
        loaded = load_tokenizer(source)
        assert isinstance(loaded, HFTokenizer)
        assert loaded.encode(TEXTS["emoji"]) == tok.encode(TEXTS["emoji"])
        assert loaded.eos_token_id == tok.eos_token_id


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        load_tokenizer(tmp_path / "does-not-exist")
    (tmp_path / "tokenizer.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match=r"tokenizer\.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "vocab.txt").write_text("a\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"vocab\.txt"):
        load_tokenizer(tmp_path / "vocab.txt")


@pytest.mark.parametrize(
    ("config", "eos", "bos"),
    [
        (None, "<|endoftext|>", "<|endoftext|>"),  # no config: the <|endoftext|> fallback
        ({"eos_token": {"content": "<|im_end|>"}}, "<|im_end|>", "<|endoftext|>"),
        ({"eos_token": "<|im_end|>", "bos_token": None}, "<|im_end|>", None),
    ],
    ids=["no-config", "content-dict", "string-and-null"],
)
def test_hf_special_tokens_from_config(trained, tmp_path, config, eos, bos):
    from tokenizers import Tokenizer as RawTokenizer

    raw = RawTokenizer.from_file(str(trained[0].path))
    raw.add_special_tokens(["<|im_end|>"])
    raw.save(str(tmp_path / "tokenizer.json"))
    if config is not None:
        (tmp_path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    tok = HFTokenizer(tmp_path)
    assert tok.vocab_size == 301
    assert tok.eos_token_id == raw.token_to_id(eos)
    assert tok.bos_token_id == (None if bos is None else raw.token_to_id(bos))


def test_hf_config_token_not_in_vocab(trained, tmp_path):
    (tmp_path / "tokenizer.json").write_bytes(trained[0].path.read_bytes())
    (tmp_path / "tokenizer_config.json").write_text('{"eos_token": "</s>"}', encoding="utf-8")
    with pytest.raises(ValueError, match="</s>"):
        HFTokenizer(tmp_path)


def _stream(tok: Tokenizer, ids: list[int]) -> tuple[list[str], IncrementalDecoder]:
    dec = IncrementalDecoder(tok)
    pieces = [dec.push(i) for i in ids]
    pieces.append(dec.flush())
    return pieces, dec


@pytest.mark.parametrize("name", ["multibyte", "emoji"])
def test_incremental_decoder_byte_by_byte(name):
    tok, text = ByteTokenizer(), TEXTS[name]
    pieces, dec = _stream(tok, tok.encode(text))
    assert not any("\ufffd" in p for p in pieces)
    assert [p for p in pieces if p] == list(text)  # each character as soon as it is complete
    assert "".join(pieces) == dec.text == tok.decode(tok.encode(text)) == text


def test_incremental_decoder_bpe(trained):
    tok, _ = trained
    # Fraktur letters are not in the corpus, so their 4 bytes are split over several ids
    text = "héllo 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 " + TEXTS["emoji"]
    ids = tok.encode(text)
    assert len(ids) > len(text) // 2
    pieces, dec = _stream(tok, ids)
    assert not any("\ufffd" in p for p in pieces)
    assert "".join(pieces) == dec.text == tok.decode(ids) == text


def test_incremental_decoder_decodes_a_short_window(trained):
    tok, corpus = trained
    lengths = []

    class Counting:
        vocab_size, eos_token_id, bos_token_id = tok.vocab_size, tok.eos_token_id, None
        encode = tok.encode

        def decode(self, ids):
            lengths.append(len(ids))
            return tok.decode(ids)

    ids = tok.encode(corpus[:5000])
    pieces, _ = _stream(Counting(), ids)
    assert "".join(pieces) == corpus[:5000]
    assert max(lengths) <= 8, max(lengths)  # context + held-back ids, not the whole stream


def test_incremental_decoder_holds_back_and_flushes():
    tok = ByteTokenizer()
    dec = IncrementalDecoder(tok)
    smile = list("😀".encode())
    assert [dec.push(i) for i in [ord("a"), *smile[:2], 256]] == ["a", "", "", ""]
    assert dec.flush() == "\ufffd"  # the incomplete character, replaced
    assert dec.flush() == ""
    assert [dec.push(i) for i in [0xFF, ord("b")]] == ["", "\ufffdb"]  # invalid byte mid-text
    assert dec.text == "a\ufffd\ufffdb"


def test_cli_tokenizer_train(tmp_path):
    text = write_corpus(tmp_path / "corpus.txt", n_words=2000, seed=1)
    out = tmp_path / "tok"
    proc = lightlong_cli(
        "tokenizer", "train", str(tmp_path / "corpus.txt"), "--vocab-size", "280",
        "--out", str(out), "--min-frequency", "3",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert str(out / "tokenizer.json") in proc.stdout
    assert "vocab size 280" in proc.stdout
    tok = load_tokenizer(out)
    assert isinstance(tok, HFTokenizer)
    assert tok.vocab_size == 280
    assert tok.decode(tok.encode(text)) == text
    assert json.loads((out / "tokenizer_config.json").read_text())["eos_token"] == "<|endoftext|>"


def test_cli_tokenizer_train_error(tmp_path):
    proc = lightlong_cli(
        "tokenizer", "train", str(tmp_path / "missing.txt"), "--vocab-size", "300",
        "--out", str(tmp_path / "tok"),
    )  # fmt: skip
    assert proc.returncode == 2
    assert "lightlong: error: training file not found" in proc.stderr
    assert "missing.txt" in proc.stderr


def test_save_tokenizer_round_trips_and_keeps_the_config(trained, tmp_path):
    """A checkpoint's copy of a tokenizer encodes alike and keeps tokenizer_config.json's
    other fields (a chat template, pad_token) beside eos and bos."""
    src = tmp_path / "src"
    src.mkdir()
    (src / TOKENIZER_FILE).write_bytes(Path(trained[0].path).read_bytes())
    template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    config = {"eos_token": "<|endoftext|>", "bos_token": None, "pad_token": "<|endoftext|>",
              "chat_template": template}  # fmt: skip
    (src / CONFIG_FILE).write_text(json.dumps(config))
    tok = HFTokenizer(src)
    (tmp_path / "out").mkdir()
    save_tokenizer(tok, tmp_path / "out")
    saved = json.loads((tmp_path / "out" / CONFIG_FILE).read_text())
    assert saved["chat_template"] == template and saved["pad_token"] == "<|endoftext|>"
    back = load_tokenizer(tmp_path / "out")
    text = "hello world, again"
    assert back.encode(text) == tok.encode(text)
    assert (back.eos_token_id, back.bos_token_id) == (tok.eos_token_id, None)
    for marker, kind in ((ByteTokenizer(), ByteTokenizer), ("synthetic task recall", None)):
        d = tmp_path / f"m{kind is None}"
        d.mkdir()
        save_tokenizer(marker, d)
        if kind is None:
            with pytest.warns(UserWarning, match="synthetic task recall"):
                assert isinstance(load_tokenizer(d), ByteTokenizer)
        else:
            assert isinstance(load_tokenizer(d), ByteTokenizer)
