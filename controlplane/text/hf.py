"""A model directory's own tokenizer through the `tokenizers` library (no torch, no transformers).

Read from the directory, as `transformers.AutoTokenizer` reads it: `tokenizer.json` (the
tokenizer itself), `tokenizer_config.json` (named special tokens; a `chat_template` string, or a
list of named templates of which "default" is used) and `chat_template.jinja`, which wins over
the config's template when present. Text prompts are encoded with the tokenizer's special tokens
(its post-processor adds a BOS where the model expects one, as `tokenizer(text)` does); chat
prompts are rendered by the template and encoded without them (the template writes them).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

from controlplane.text.chat import ChatTemplate, ChatTurn, ChatUnsupportedError

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
TEMPLATE_FILE = "chat_template.jinja"
# The named special tokens `transformers` passes to chat templates (SPECIAL_TOKENS_ATTRIBUTES).
SPECIAL_TOKEN_NAMES = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)


class HFStreamDecoder:
    """Incremental detokenization: text appears once a token completes it (multi-byte
    characters split over byte-level tokens wait for their last byte; merges that change
    earlier text are handled by the library's DecodeStream)."""

    def __init__(self, tokenizer: Tokenizer, prefix_ids: Sequence[int]) -> None:
        self._tokenizer = tokenizer
        self._stream = DecodeStream(skip_special_tokens=True)
        for token_id in prefix_ids:  # the state after the tokens already streamed
            self._stream.step(tokenizer, token_id)

    def feed(self, token_ids: Sequence[int], *, final: bool = False) -> str:
        """Text completed by `token_ids`; special tokens decode to nothing (`final` is unused:
        an incomplete character at the end of the output is never shown)."""
        pieces = [self._stream.step(self._tokenizer, t) for t in token_ids]
        return "".join(p for p in pieces if p)


class HFCodec:
    """The tokenizer and chat template of a local model directory."""

    def __init__(self, tokenizer: Tokenizer, chat_template: ChatTemplate | None, name: str):
        self._tokenizer = tokenizer
        self._chat_template = chat_template
        self.name = name  # where it was loaded from

    @classmethod
    def from_directory(cls, path: Path) -> HFCodec:
        """Load `path`'s tokenizer; ValueError naming the file when it is missing or bad."""
        if not (path / TOKENIZER_FILE).is_file():
            raise ValueError(f"tokenizer: {path} has no {TOKENIZER_FILE}")
        try:
            tokenizer = Tokenizer.from_file(str(path / TOKENIZER_FILE))
        except Exception as exc:  # the Rust library raises plain Exception on bad files
            raise ValueError(f"tokenizer: cannot load {path / TOKENIZER_FILE}: {exc}") from exc
        config: dict[str, Any] = {}
        if (path / CONFIG_FILE).is_file():
            config = json.loads((path / CONFIG_FILE).read_text(encoding="utf-8"))
        source = _template_source(path, config)
        special = {
            name: _token_text(config[name])
            for name in SPECIAL_TOKEN_NAMES
            if config.get(name) is not None
        }
        template = ChatTemplate(source, special) if source is not None else None
        return cls(tokenizer, template, str(path))

    @property
    def has_chat_template(self) -> bool:
        """True when chat prompts can be rendered."""
        return self._chat_template is not None

    def encode(self, text: str) -> list[int]:
        """Token ids of a text prompt, with the special tokens the tokenizer adds.

        Releases the GIL while it runs (a long prompt takes seconds): callers on an event loop
        run it in a thread.
        """
        return self._encode(text, add_special_tokens=True)

    def encode_chat(self, turns: Sequence[ChatTurn]) -> list[int]:
        """Token ids of a conversation rendered by the chat template, the assistant's turn open.

        Raises:
            ChatUnsupportedError: the directory has no chat template.
            ChatTemplateError: the template refused the conversation.
        """
        if self._chat_template is None:
            raise ChatUnsupportedError(f"the served model ({self.name}) has no chat template")
        text = self._chat_template.render(turns, add_generation_prompt=True)
        return self._encode(text, add_special_tokens=False)

    def _encode(self, text: str, *, add_special_tokens: bool) -> list[int]:
        # encode_batch, unlike encode, releases the GIL; the ids are the same.
        (encoding,) = self._tokenizer.encode_batch([text], add_special_tokens=add_special_tokens)
        ids: list[int] = encoding.ids
        return ids

    def stream_decoder(self, prefix_ids: Sequence[int]) -> HFStreamDecoder:
        """A decoder for the output tokens after `prefix_ids` (output tokens already sent)."""
        return HFStreamDecoder(self._tokenizer, prefix_ids)


def _template_source(path: Path, config: dict[str, Any]) -> str | None:
    if (path / TEMPLATE_FILE).is_file():
        return (path / TEMPLATE_FILE).read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": ..., "template": ...}, ...]
        named = {t["name"]: t["template"] for t in template}
        return named.get("default")
    return template if isinstance(template, str) else None


def _token_text(value: str | dict[str, Any]) -> str:
    """A special token as written in tokenizer_config.json: a string or an AddedToken dict."""
    return value if isinstance(value, str) else str(value["content"])
