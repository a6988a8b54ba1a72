"""Tokenizers: a local Hugging Face tokenizer directory, or a built-in byte-level one.

Both map text to a 1-D int64 numpy array of token ids. Nothing is downloaded: an HF tokenizer
is read from ``DIR/tokenizer.json`` with the ``tokenizers`` library.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol

import numpy as np


class Tokenizer(Protocol):
    name: str
    vocab_size: int
    bos_id: int | None  # framing each pretraining document (None: the tokenizer has none)
    eos_id: int | None

    def encode(self, text: str) -> np.ndarray: ...


class ByteTokenizer:
    """UTF-8 bytes as token ids 0..255; needs no files and no vocabulary."""

    name = "byte"
    vocab_size = 256
    bos_id = eos_id = None  # bytes have no document markers

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return bytes(ids).decode("utf-8", errors="replace")  # bytes have no special tokens


def read_tokenizer_config(path: str | Path) -> tuple[Path, dict]:
    """(``tokenizer_config.json`` beside a tokenizer named by its directory or by its
    ``tokenizer.json`` file, what it holds: chat template, special tokens); ``{}`` when there is
    no such file, and a ValueError naming it when it is not JSON."""
    path = Path(path)
    file = (path if path.is_dir() else path.parent) / "tokenizer_config.json"
    if not file.is_file():
        return file, {}
    try:
        return file, json.loads(file.read_text())
    except ValueError as exc:
        raise ValueError(f"{file}: not valid JSON ({exc})") from None


def token_text(value) -> str:
    """A special token's text from ``tokenizer_config.json`` (a string or an AddedToken dict)."""
    return value.get("content", "") if isinstance(value, dict) else (value or "")


class HFTokenizer:
    """A Hugging Face ``tokenizer.json`` loaded from a local directory (or given as the file)."""

    def __init__(self, directory: str | Path):
        from tokenizers import Tokenizer as _Tokenizer

        path = Path(directory)
        file = path / "tokenizer.json" if path.is_dir() else path
        if file.suffix == ".gguf" and file.is_file():  # a GGUF model carries its tokenizer
            self._from_gguf(file)
            return
        if not file.is_file():
            raise FileNotFoundError(f"data.tokenizer: {file} does not exist "
                                    f"(expected a directory holding tokenizer.json)")
        try:
            self._tok = _Tokenizer.from_file(str(file))
        except Exception as exc:  # the Rust library raises plain Exceptions for bad files
            raise ValueError(f"data.tokenizer: {file} is not a valid tokenizer.json: {exc}") from exc
        self.name = str(path)
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        _, config = read_tokenizer_config(path)
        specials = (token_text(config.get(key)) for key in ("bos_token", "eos_token"))
        self.bos_id, self.eos_id = (self._tok.token_to_id(t) if t else None for t in specials)

    def _from_gguf(self, file: Path) -> None:
        """The tokenizer a GGUF file holds, as transformers reads it (needs ``gguf``)."""
        try:
            from transformers import AutoTokenizer

            fast = AutoTokenizer.from_pretrained(str(file.parent), gguf_file=file.name)
        except (ImportError, OSError, ValueError, KeyError) as exc:
            raise ValueError(f"data.tokenizer: {file}: no tokenizer read from it ({exc})") from exc
        self._tok = fast.backend_tokenizer
        self.name = str(file)
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.bos_id, self.eos_id = fast.bos_token_id, fast.eos_token_id

    def encode(self, text: str) -> np.ndarray:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        return np.asarray(ids, dtype=np.int64)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_id(self, text: str) -> int | None:
        """The id of a token spelled ``text`` (say the eos token), or None."""
        return self._tok.token_to_id(text)


def load_tokenizer(path: str | None) -> Tokenizer:
    """The HF tokenizer at ``path``, or the byte-level tokenizer when ``path`` is None."""
    return ByteTokenizer() if path is None else HFTokenizer(path)
