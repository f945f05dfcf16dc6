"""Tokenizers: text <-> token ids.

- `ByteTokenizer` (the default) needs no files: ids 0..255 are UTF-8 bytes, 256 is
  `<|endoftext|>`.
- `HFTokenizer` wraps a checkpoint directory's `tokenizer.json` (the `tokenizers` library).
- `train_bpe` trains a byte-level BPE offline (`lightlong tokenizer train`).
- `save_tokenizer` / `load_tokenizer` keep a tokenizer in a checkpoint directory:
  `tokenizer.json` + `tokenizer_config.json`, or for bytes a `tokenizer_config.json` that
  says so (`"lightlong_tokenizer": "bytes"`).
- `IncrementalDecoder` turns a stream of ids into a stream of complete characters.

Both tokenizers encode without adding special tokens and decode skipping them, so
`decode(encode(text)) == text` and an eos id decodes to "".
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    import tokenizers

ENDOFTEXT = "<|endoftext|>"
TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
_BYTES_MARKER = {"lightlong_tokenizer": "bytes"}


@runtime_checkable
class Tokenizer(Protocol):
    """What the rest of lightlong needs from a tokenizer."""

    @property
    def vocab_size(self) -> int:
        """Number of ids, special tokens included; every id is in [0, vocab_size)."""
        ...

    @property
    def eos_token_id(self) -> int | None:
        """The end-of-text id, or None when the tokenizer has none."""
        ...

    @property
    def bos_token_id(self) -> int | None:
        """The beginning-of-text id, or None when the tokenizer has none."""
        ...

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without adding special tokens."""
        ...

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`, skipping special tokens; invalid UTF-8 becomes U+FFFD."""
        ...


def _check_ids(ids: Sequence[int], vocab_size: int) -> list[int]:
    ids = [int(i) for i in ids]
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise ValueError(f"token id {bad[0]} is outside the vocabulary [0, {vocab_size})")
    return ids


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255 and `<|endoftext|>` as 256 (eos); no bos. Needs no files."""

    vocab_size: int = 257
    eos_token_id: int | None = 256
    bos_token_id: int | None = None

    def encode(self, text: str) -> list[int]:
        """The UTF-8 bytes of `text` (the string "<|endoftext|>" is bytes too, not eos)."""
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        """The bytes of `ids` as UTF-8 (errors replaced by U+FFFD); eos decodes to ""."""
        ids = _check_ids(ids, self.vocab_size)
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return "ByteTokenizer()"


class HFTokenizer:
    """A `tokenizers` tokenizer from `tokenizer.json`: a checkpoint directory or the file.

    eos/bos come from `tokenizer_config.json` beside it (`eos_token`, `bos_token`: a string or
    `{"content": ...}`; null means none); without that file or key, `<|endoftext|>` when it is
    in the vocabulary, else None. Special tokens written in the text (e.g. "<|endoftext|>")
    are recognised by `encode`, as in `transformers`.
    """

    def __init__(self, path: str | Path) -> None:
        from tokenizers import Tokenizer as _HFTokenizer

        path = Path(path)
        file = path / TOKENIZER_FILE if path.is_dir() else path
        if not file.is_file():
            raise ValueError(f"tokenizer file not found: {file}")
        try:
            self.tokenizer: tokenizers.Tokenizer = _HFTokenizer.from_file(str(file))
        except Exception as e:  # tokenizers raises a bare Exception on bad JSON or schema
            raise ValueError(f"cannot load tokenizer {file}: {e}") from None
        self.path = file
        config = _read_config(file.parent / CONFIG_FILE)
        self.config: dict[str, Any] = dict(config or {})
        """tokenizer_config.json as read (chat_template, pad_token, ... are kept on save)."""
        self._eos = self._special_id(config, "eos_token", file.parent / CONFIG_FILE)
        self._bos = self._special_id(config, "bos_token", file.parent / CONFIG_FILE)

    def _special_id(self, config: dict[str, Any] | None, key: str, where: Path) -> int | None:
        if config is None or key not in config:
            return self.tokenizer.token_to_id(ENDOFTEXT)
        token = config[key]
        if isinstance(token, dict):
            token = token.get("content")
        if token is None:
            return None
        if not isinstance(token, str):
            raise ValueError(f"{where}: {key} must be a string or {{'content': str}}: {token!r}")
        token_id = self.tokenizer.token_to_id(token)
        if token_id is None:
            raise ValueError(f"{where}: {key} {token!r} is not in the vocabulary of {self.path}")
        return token_id

    @property
    def vocab_size(self) -> int:
        """Number of ids, added and special tokens included."""
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def eos_token_id(self) -> int | None:
        """The end-of-text id, or None."""
        return self._eos

    @property
    def bos_token_id(self) -> int | None:
        """The beginning-of-text id, or None."""
        return self._bos

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without the post-processor's special tokens."""
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`, skipping special tokens."""
        ids = _check_ids(ids, self.vocab_size)
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def __repr__(self) -> str:
        return f"HFTokenizer({str(self.path)!r})"


def _read_config(file: Path) -> dict[str, Any] | None:
    if not file.is_file():
        return None
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot parse {file}: {e}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{file}: expected a JSON object")
    return config


def load_tokenizer(source: str | Path | None, *, required: bool = False) -> Tokenizer:
    """The tokenizer for `source`.

    None: `ByteTokenizer()`. A directory (a checkpoint) with `tokenizer.json`, or a `.json`
    file: `HFTokenizer`; a directory whose `tokenizer_config.json` is the byte marker:
    `ByteTokenizer()`; a directory with neither (a checkpoint from before tokenizers were
    saved): `ByteTokenizer()` with a warning, or with `required` (a tokenizer the user
    named) FileNotFoundError. A path that does not exist raises FileNotFoundError; one that
    cannot be read as a tokenizer, ValueError naming it.
    """
    if source is None:
        return ByteTokenizer()
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"tokenizer path does not exist: {path}")
    if path.is_dir():
        if (path / TOKENIZER_FILE).is_file():
            return HFTokenizer(path)
        config = _read_config(path / CONFIG_FILE)
        kind = None if config is None else config.get("lightlong_tokenizer")
        if kind == "bytes":
            return ByteTokenizer()
        if kind == "none":
            why = f"was trained on token ids ({config.get('trained_on', 'no text')})"
        elif config is not None:
            raise ValueError(f"{path / CONFIG_FILE}: no {TOKENIZER_FILE} beside it")
        else:
            why = f"holds no tokenizer ({TOKENIZER_FILE} or {CONFIG_FILE})"
            if required:
                raise FileNotFoundError(f"tokenizer directory {path} {why}")
        warnings.warn(
            f"{path} {why}; reading text as UTF-8 bytes. If the model was trained on a "
            "tokenizer, pass it (--tokenizer).",
            stacklevel=2,
        )
        return ByteTokenizer()
    if path.suffix != ".json":
        raise ValueError(f"expected a directory or a tokenizer .json file, got {path}")
    return HFTokenizer(path)


def save_tokenizer(tokenizer: Tokenizer | str, directory: str | Path) -> None:
    """Writes `tokenizer` into `directory` so that `load_tokenizer(directory)` returns it:
    `tokenizer.json` + `tokenizer_config.json` (which `transformers`' AutoTokenizer reads
    too), or the byte marker. A string says the model was trained on token ids without a
    tokenizer (e.g. "synthetic task recall"): loading it then warns."""
    out = Path(directory)
    if isinstance(tokenizer, str):
        config: dict[str, Any] = {"lightlong_tokenizer": "none", "trained_on": tokenizer}
    elif isinstance(tokenizer, ByteTokenizer):
        config = dict(_BYTES_MARKER)
    elif isinstance(tokenizer, HFTokenizer):
        tok = tokenizer.tokenizer
        tok.save(str(out / TOKENIZER_FILE))
        # the source's other fields (chat_template, pad_token, ...) go along
        config = tokenizer.config | _hf_config(
            _token(tok, tokenizer.eos_token_id), _token(tok, tokenizer.bos_token_id)
        )
    else:
        raise ValueError(f"cannot save a {type(tokenizer).__name__} (ByteTokenizer or HFTokenizer)")
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def _token(tok: tokenizers.Tokenizer, token_id: int | None) -> str | None:
    return None if token_id is None else tok.id_to_token(token_id)


def _hf_config(eos: str | None, bos: str | None) -> dict[str, Any]:
    """tokenizer_config.json; tokenizer_class lets transformers' AutoTokenizer load it too."""
    return {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos, "bos_token": bos}


def train_bpe(
    files: Sequence[str | Path], vocab_size: int, out_dir: str | Path, *, min_frequency: int = 2
) -> HFTokenizer:
    """Trains a byte-level BPE on text `files` (offline) and saves it to `out_dir`.

    Writes `out_dir/tokenizer.json` and `out_dir/tokenizer_config.json` (eos
    `<|endoftext|>`, id 0; no bos). The vocabulary starts from the 256 byte symbols, so every
    string round-trips; merges stop at `vocab_size` ids or when no pair occurs
    `min_frequency` times, so a small corpus can give fewer ids than asked for.
    """
    from tokenizers import Tokenizer as _HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    if not files:
        raise ValueError("no training files given")
    paths = [Path(f) for f in files]
    for p in paths:
        if not p.is_file():
            raise ValueError(f"training file not found: {p}")
        try:
            p.read_bytes().decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"training file {p}: not UTF-8 (byte offset {e.start})") from None
    min_vocab = 256 + 1 + 1  # bytes, <|endoftext|>, at least one merge
    if vocab_size < min_vocab:
        raise ValueError(
            f"vocab_size (--vocab-size) must be >= {min_vocab}: the 256 byte symbols and "
            f"{ENDOFTEXT} take 257 ids; got {vocab_size}"
        )
    if min_frequency < 1:
        raise ValueError(f"min_frequency (--min-frequency) must be >= 1, got {min_frequency}")

    tok = _HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[ENDOFTEXT],
        show_progress=False,
    )
    tok.train([str(p) for p in paths], trainer=trainer)

    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"--out {out}: cannot create the directory ({e.strerror})") from None
    tok.save(str(out / TOKENIZER_FILE))
    config = _hf_config(ENDOFTEXT, None)
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return HFTokenizer(out)


class IncrementalDecoder:
    """Streams text from ids one at a time, never emitting half a character.

    `push(id)` returns the text completed by that id ("" while a multi-byte character is still
    incomplete, i.e. the decoded text ends in U+FFFD); `flush()` returns what is held back.
    Only a short window is decoded per push: the ids after `read` are new, those in
    `[0, read)` were emitted already and are decoded again only as context (a decoder may
    treat the start of a sequence differently, e.g. strip a leading space).
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self._window: list[int] = []  # context ids, then ids not yet emitted
        self._read = 0  # window[:read] is context, already emitted
        self._pieces: list[str] = []

    def push(self, token_id: int) -> str:
        """Adds `token_id`; returns the newly completed text (possibly "")."""
        self._window.append(token_id)
        context = self.tokenizer.decode(self._window[: self._read])
        full = self.tokenizer.decode(self._window)
        if len(full) <= len(context) or full.endswith("\ufffd"):
            return ""
        piece = full[len(context) :]
        # the ids just emitted become the context of the next push
        self._window = self._window[self._read :]
        self._read = len(self._window)
        self._pieces.append(piece)
        return piece

    def flush(self) -> str:
        """Returns the held-back text, incomplete characters as U+FFFD ("" if none)."""
        context = self.tokenizer.decode(self._window[: self._read])
        piece = self.tokenizer.decode(self._window)[len(context) :]
        if piece:
            self._window = self._window[self._read :]
            self._read = len(self._window)
            self._pieces.append(piece)
        return piece

    @property
    def text(self) -> str:
        """Everything emitted so far."""
        return "".join(self._pieces)
