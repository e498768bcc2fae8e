"""Chat templates rendered as Hugging Face `transformers` renders them, with jinja2 alone.

The conventions copied from `transformers.utils.chat_template_utils` (the reference the tests
compare against): an immutable sandboxed environment with `trim_blocks` and `lstrip_blocks`, the
`loopcontrols` extension, a `{% generation %}` block that renders its body, a `tojson` filter
that does not escape HTML, the globals `raise_exception(message)` and `strftime_now(format)`,
and the render variables `messages`, `add_generation_prompt`, `tools`, `documents` and the
tokenizer's named special tokens (`bos_token`, `eos_token`, ...). The rendered text is tokenized
without adding special tokens: the template writes them itself.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.parser
from jinja2.sandbox import ImmutableSandboxedEnvironment

# The byte tokenizer's chat format (models without a tokenizer of their own, such as the random
# presets): one "role: content" line per message, then "assistant:" to open the reply.
PLAIN_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'] }}: {{ message['content'] }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


@dataclass(frozen=True, slots=True)
class ChatTurn:
    """One message of a conversation."""

    role: str  # "system", "user", "assistant", ... as the template knows them
    content: str


class ChatTemplateError(ValueError):
    """The template refused the conversation (its `raise_exception`, or a rendering error)."""


class ChatUnsupportedError(ValueError):
    """The served model has no chat template."""


class _GenerationBlock(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (HF's assistant-mask marker) renders its body."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        call = self.call_method("_render_body")
        return jinja2.nodes.CallBlock(call, [], [], body).set_lineno(lineno)

    def _render_body(self, caller: Any) -> str:
        return str(caller())


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class ChatTemplate:
    """A compiled chat template and the special tokens it may refer to."""

    def __init__(self, source: str, special_tokens: Mapping[str, str]) -> None:
        """Compile `source`; `special_tokens` maps e.g. "bos_token" to "<s>".

        Raises:
            ChatTemplateError: the template does not compile.
        """
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True,
            lstrip_blocks=True,
            extensions=[_GenerationBlock, jinja2.ext.loopcontrols],
        )
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        try:
            self._template = env.from_string(source)
        except jinja2.TemplateError as exc:
            raise ChatTemplateError(f"chat template does not compile: {exc}") from exc
        self._special_tokens = dict(special_tokens)

    def render(self, turns: Sequence[ChatTurn], *, add_generation_prompt: bool = True) -> str:
        """The conversation as the model's prompt text (the assistant's turn opened by default).

        Raises:
            ChatTemplateError: the conversation is empty or the template refused it.
        """
        if not turns:
            raise ChatTemplateError("a chat needs at least one message")
        messages = [{"role": t.role, "content": t.content} for t in turns]
        try:
            return self._template.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                tools=None,
                documents=None,
                **self._special_tokens,
            )
        except jinja2.TemplateError as exc:
            raise ChatTemplateError(f"chat template: {exc}") from exc
