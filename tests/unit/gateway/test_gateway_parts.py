"""The gateway's pure parts: stop-string matching on streamed text, body validation and the
mapping of control-plane errors to OpenAI's HTTP codes and parameters."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.errors import OpenAIError, from_sdk_error
from gateway.generation import StopMatcher
from gateway.schemas import ChatCompletionRequest, CompletionRequest, parse_body
from sdk.errors import (
    InvalidArgumentError,
    PecSchedError,
    ResourceExhaustedError,
    UnauthenticatedError,
    UnavailableError,
)


def _run(matcher: StopMatcher, chunks: list[str]) -> tuple[str, bool]:
    sent = []
    for chunk in chunks:
        text, stopped = matcher.feed(chunk)
        sent.append(text)
        if stopped:
            return "".join(sent), True
    return "".join(sent) + matcher.flush(), False


@given(
    text=st.text(alphabet="abc ", max_size=40),
    cuts=st.lists(st.integers(0, 40), max_size=8),
    stops=st.lists(st.text(alphabet="abc ", min_size=1, max_size=4), max_size=3),
)
def test_stop_matching_sends_exactly_the_text_before_the_first_stop(text, cuts, stops):
    # Prepare: the text split into chunks at arbitrary points
    bounds = sorted({0, len(text), *(c for c in cuts if c <= len(text))})
    chunks = [text[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    # Execute
    sent, stopped = _run(StopMatcher(tuple(stops)), chunks)
    # Assert
    assert stopped == bool(hits)
    assert sent == (text[: min(hits)] if hits else text)


def test_stop_matching_holds_back_only_what_could_start_a_stop():
    matcher = StopMatcher(("o w",))
    assert matcher.feed("Hel") == ("H", False)  # "el" could precede a stop 3 chars long
    assert matcher.feed("lo wo") == ("ell", True)


@pytest.mark.parametrize(
    ("model", "body", "param"),
    [
        (CompletionRequest, {"prompt": "hi"}, "model"),
        (CompletionRequest, {"model": "m", "prompt": "hi", "n": 2}, "n"),
        (CompletionRequest, {"model": "m", "prompt": ["a", "b"]}, "prompt"),
        (CompletionRequest, {"model": "m", "prompt": "hi", "echo": True}, "echo"),
        (CompletionRequest, {"model": "m", "prompt": "hi", "temperature": 3}, "temperature"),
        (CompletionRequest, {"model": "m", "prompt": "hi", "stop": ["a"] * 5}, "stop"),
        (ChatCompletionRequest, {"model": "m", "messages": []}, "messages"),
        (ChatCompletionRequest, {"model": "m", "messages": [{"content": "x"}]}, "messages.0.role"),
        (
            ChatCompletionRequest,
            {"model": "m", "messages": [{"role": "user", "content": "x"}], "tools": [{}]},
            "tools",
        ),
    ],
)
def test_bodies_are_refused_with_the_parameter_named(model, body, param):
    with pytest.raises(OpenAIError) as refused:
        parse_body(model, body)
    assert refused.value.status_code == 400 and refused.value.param == param
    assert refused.value.body()["error"]["type"] == "invalid_request_error"


def test_bodies_parse_with_openai_defaults():
    chat = parse_body(
        ChatCompletionRequest,
        {
            "model": "m",
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
                }
            ],
            "max_completion_tokens": 7,
            "stop": "x",
            "frequency_penalty": 0.5,  # unknown to the gateway: ignored
        },
    )
    completion = parse_body(CompletionRequest, {"model": "m", "prompt": [1, 2, 3]})
    assert chat.messages[0].text == "ab" and chat.max_tokens_asked == 7
    assert chat.stop_sequences == ("x",) and (chat.temperature, chat.top_p) == (1.0, 1.0)
    assert completion.prompt_value == [1, 2, 3] and completion.max_tokens_asked is None


@pytest.mark.parametrize(
    ("error", "status", "param"),
    [
        (InvalidArgumentError("INVALID_ARGUMENT", "m", "BAD_MAX_NEW_TOKENS", "max_new_tokens"), 400, "max_tokens"),
        (InvalidArgumentError("INVALID_ARGUMENT", "m", "CHAT_UNSUPPORTED", "prompt.chat"), 400, "messages"),
        (UnauthenticatedError("UNAUTHENTICATED", "no key"), 401, None),
        (ResourceExhaustedError("RESOURCE_EXHAUSTED", "full", "QUEUE_FULL", 2.0), 429, None),
        (UnavailableError("UNAVAILABLE", "down"), 503, None),
        (PecSchedError("INTERNAL", "boom"), 500, None),
    ],
)  # fmt: skip
def test_control_plane_errors_keep_their_meaning_over_http(error, status, param):
    converted = from_sdk_error(error)
    response = converted.response()
    assert (converted.status_code, converted.param) == (status, param)
    assert response.status_code == status
    assert (response.headers.get("retry-after") == "2") == (status == 429)
