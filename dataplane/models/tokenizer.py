"""Tokenizers: byte-level by default, a model directory's own HF tokenizer when it has one."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

_HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


class Tokenizer(Protocol):
    """Text <-> token ids."""

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` (no special tokens added)."""
        ...

    def decode(self, token_ids: list[int]) -> str:
        """Text of `token_ids`."""
        ...


class ByteTokenizer:
    """UTF-8 bytes as token ids 0..255; ids >= 256 decode to nothing."""

    def encode(self, text: str) -> list[int]:
        """One id per UTF-8 byte."""
        return list(text.encode("utf-8"))

    def decode(self, token_ids: list[int]) -> str:
        """Bytes of the ids below 256, decoded as UTF-8 with replacement characters."""
        return bytes(t for t in token_ids if 0 <= t < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A `transformers` tokenizer loaded from a local directory."""

    def __init__(self, path: Path) -> None:
        from transformers import AutoTokenizer

        self._tokenizer = AutoTokenizer.from_pretrained(path)

    def encode(self, text: str) -> list[int]:
        """Ids from the HF tokenizer, without special tokens."""
        ids: list[int] = self._tokenizer.encode(text, add_special_tokens=False)
        return ids

    def decode(self, token_ids: list[int]) -> str:
        """Text from the HF tokenizer, special tokens skipped."""
        return str(self._tokenizer.decode(token_ids, skip_special_tokens=True))


def load_tokenizer(model_spec: str) -> Tokenizer:
    """The HF tokenizer of a model directory that has one, else the byte tokenizer."""
    path = Path(model_spec)
    if path.is_dir() and any((path / name).is_file() for name in _HF_TOKENIZER_FILES):
        return HFTokenizer(path)
    return ByteTokenizer()
