"""Request bodies of the OpenAI API that the gateway serves, validated with pydantic.

Unknown fields are ignored (as OpenAI-compatible servers do); fields whose non-default values
the gateway cannot honour (`n` > 1, `echo`, `logprobs`, `best_of` > 1, `suffix`, `tools`) are
refused with the parameter named. Defaults are OpenAI's: temperature 1, top_p 1, no seed (a
random one per request); `max_tokens` defaults to the gateway's setting.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from gateway.errors import OpenAIError, invalid_request

MAX_STOP_SEQUENCES = 4  # as OpenAI


class StreamOptions(BaseModel):
    """`stream_options`: a last chunk with the usage counts when `include_usage`."""

    include_usage: bool = False


class _Sampled(BaseModel):
    """Fields common to completions and chat completions."""

    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    stop: str | list[str] | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int) -> int:
        if n != 1:
            raise ValueError("only n=1 is supported")
        return n

    @field_validator("stop")
    @classmethod
    def _stops(cls, stop: str | list[str] | None) -> str | list[str] | None:
        stops = [stop] if isinstance(stop, str) else stop or []
        if len(stops) > MAX_STOP_SEQUENCES or any(not s for s in stops):
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} non-empty stop sequences")
        return stop

    @property
    def stop_sequences(self) -> tuple[str, ...]:
        """The stop strings as a tuple."""
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    @property
    def max_tokens_asked(self) -> int | None:
        """The output limit the caller set, if any."""
        return self.max_tokens

    @property
    def include_usage(self) -> bool:
        """True when a streamed response ends with a usage chunk."""
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(_Sampled):
    """POST /v1/completions."""

    prompt: str | list[int] | list[str]
    echo: Literal[False] = False
    logprobs: None = None
    best_of: Literal[1] | None = None
    suffix: None = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, prompt: str | list[int] | list[str]) -> str | list[int] | list[str]:
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str) and len(prompt) > 1:
            raise ValueError("one prompt per request (a batch of prompts is not supported)")
        if not prompt or prompt == [""]:
            raise ValueError("the prompt must not be empty")
        return prompt

    @property
    def prompt_value(self) -> str | list[int]:
        """The prompt as text or token ids."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return prompt
        if isinstance(prompt[0], str):  # a batch of one prompt
            return prompt[0]
        return [int(t) for t in prompt]


class TextPart(BaseModel):
    """A text part of a message's content."""

    type: Literal["text"]
    text: str


class ChatMessageIn(BaseModel):
    """One message of `messages`."""

    model_config = ConfigDict(extra="ignore")

    role: str
    content: str | list[TextPart] | None = None

    @property
    def text(self) -> str:
        """The content as one string (text parts joined)."""
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatCompletionRequest(_Sampled):
    """POST /v1/chat/completions."""

    messages: list[ChatMessageIn] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: Literal[False] | None = None
    tools: None = None

    @property
    def max_tokens_asked(self) -> int | None:
        """`max_completion_tokens` (the newer name) or `max_tokens`."""
        return self.max_completion_tokens or self.max_tokens


def parse_body(model: type[_Sampled], body: Any) -> Any:
    """`body` validated as `model`; OpenAIError (400, naming the parameter) otherwise."""
    if not isinstance(body, dict):
        raise invalid_request("the request body must be a JSON object", None)
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(part) for part in first["loc"]) or None
        raise _refusal(param, first["msg"]) from exc


def _refusal(param: str | None, message: str) -> OpenAIError:
    return invalid_request(f"{param}: {message}" if param else message, param)
