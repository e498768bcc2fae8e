"""The control plane's text codec: the served model's tokenizer, or the data plane's byte one.

`load_text_codec(config)` picks, once at start:
- `config.tokenizer` set (a model directory with `tokenizer.json`): that tokenizer and its chat
  template (`hf.HFCodec`); prompts are counted and classified in its tokens;
- else `text_tokenizer = "byte"`: `ByteCodec`, the rule of the data plane's default tokenizer
  (dataplane/models/tokenizer.py `ByteTokenizer`, which this module must match and never
  imports): token id = UTF-8 byte value (ids 0..255), ids >= 256 decode to nothing; chats are
  rendered as plain "role: content" lines (`chat.PLAIN_CHAT_TEMPLATE`);
- else (`"none"`): None, text and chat prompts are refused and clients send token ids.
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from controlplane.config import Config, TextTokenizer
from controlplane.text.chat import PLAIN_CHAT_TEMPLATE, ChatTemplate, ChatTurn
from controlplane.text.hf import HFCodec

BYTE_TOKEN_OFFSET = 0  # token id of byte value b is b + BYTE_TOKEN_OFFSET
NUM_BYTE_TOKENS = 256


class StreamDecoder(Protocol):
    """Incremental decoding of one request's output tokens."""

    def feed(self, token_ids: Sequence[int], *, final: bool = False) -> str:
        """Text completed by `token_ids` (text still incomplete waits for later tokens)."""
        ...


class TextCodec(Protocol):
    """Text and chat prompts -> token ids, output token ids -> text."""

    name: str  # "byte" or the tokenizer's directory

    def encode(self, text: str) -> list[int]:
        """Token ids of a text prompt."""
        ...

    def encode_chat(self, turns: Sequence[ChatTurn]) -> list[int]:
        """Token ids of a conversation with the assistant's turn opened.

        Raises:
            ChatUnsupportedError: the model has no chat template.
            ChatTemplateError: the template refused the conversation.
        """
        ...

    def stream_decoder(self, prefix_ids: Sequence[int]) -> StreamDecoder:
        """A decoder positioned after `prefix_ids`, the output tokens already streamed."""
        ...


class ByteStreamDecoder:
    """UTF-8 decoding of byte tokens; a character split across chunks waits."""

    def __init__(self, prefix_ids: Sequence[int] = ()) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.feed(prefix_ids)

    def feed(self, token_ids: Sequence[int], *, final: bool = False) -> str:
        """Text completed by `token_ids`; `final` flushes an incomplete character as U+FFFD."""
        data = bytes(
            t - BYTE_TOKEN_OFFSET for t in token_ids if 0 <= t - BYTE_TOKEN_OFFSET < NUM_BYTE_TOKENS
        )
        return self._decoder.decode(data, final)


class ByteCodec:
    """The data plane's default tokenizer: one token per UTF-8 byte."""

    name = "byte"

    def __init__(self) -> None:
        self._chat_template = ChatTemplate(PLAIN_CHAT_TEMPLATE, {})

    def encode(self, text: str) -> list[int]:
        """One id per UTF-8 byte."""
        return [b + BYTE_TOKEN_OFFSET for b in text.encode("utf-8")]

    def encode_chat(self, turns: Sequence[ChatTurn]) -> list[int]:
        """The bytes of the conversation as plain "role: content" lines, "assistant:" last."""
        return self.encode(self._chat_template.render(turns, add_generation_prompt=True))

    def stream_decoder(self, prefix_ids: Sequence[int]) -> ByteStreamDecoder:
        """A UTF-8 decoder after `prefix_ids`."""
        return ByteStreamDecoder(prefix_ids)


def load_text_codec(config: Config) -> TextCodec | None:
    """The codec `config` asks for (see the module docstring); ValueError for a bad directory."""
    if config.tokenizer is not None:
        return HFCodec.from_directory(Path(config.tokenizer))
    if config.text_tokenizer is TextTokenizer.BYTE:
        return ByteCodec()
    return None
