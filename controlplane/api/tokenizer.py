"""The control plane's text tokenizer: a mirror of the data plane's default byte tokenizer.

Rule (dataplane/models/tokenizer.py `ByteTokenizer`, which this module must match and never
imports): a text is encoded as its UTF-8 bytes, token id = byte value (offset 0, ids 0..255);
decoding keeps ids below 256 and decodes the bytes as UTF-8, replacing invalid sequences.
Models with their own HF tokenizer need `text_tokenizer = "none"`: text prompts are then
refused and clients send token ids.
"""

from __future__ import annotations

import codecs

BYTE_TOKEN_OFFSET = 0  # token id of byte value b is b + BYTE_TOKEN_OFFSET
NUM_BYTE_TOKENS = 256


def encode_text(text: str) -> list[int]:
    """Token ids of `text`: one per UTF-8 byte."""
    return [b + BYTE_TOKEN_OFFSET for b in text.encode("utf-8")]


class StreamDecoder:
    """Incremental decoding of a token stream; a character split across chunks waits."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, token_ids: list[int] | tuple[int, ...], *, final: bool = False) -> str:
        """Text completed by `token_ids` (ids outside the byte range decode to nothing)."""
        data = bytes(
            t - BYTE_TOKEN_OFFSET for t in token_ids if 0 <= t - BYTE_TOKEN_OFFSET < NUM_BYTE_TOKENS
        )
        return self._decoder.decode(data, final)
