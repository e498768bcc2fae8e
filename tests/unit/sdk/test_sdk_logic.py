"""The SDK's pure pieces: backoff, error mapping, conversions, stream cursor."""

from __future__ import annotations

import random

import pytest

from protos.pecsched.v1 import common_pb2, inference_pb2
from sdk import convert
from sdk.errors import (
    ERROR_DETAIL_KEY,
    DeadlineExceededError,
    InvalidArgumentError,
    PecSchedError,
    PermissionDeniedError,
    ResourceExhaustedError,
    error_from_status,
)
from sdk.retry import CallBudget, RetryPolicy
from sdk.stream import TokenCursor
from sdk.types import RequestClass, RequestState


def test_backoff_grows_caps_and_jitters_within_bounds() -> None:
    policy = RetryPolicy(initial_backoff_s=0.1, max_backoff_s=1.0, backoff_multiplier=3.0)
    rng = random.Random(0)

    delays = [[policy.backoff_s(n, rng) for _ in range(200)] for n in (1, 2, 3, 4)]

    for bound, samples in zip((0.1, 0.3, 0.9, 1.0), delays, strict=True):
        assert all(0.8 * bound <= d <= bound for d in samples)
        assert max(samples) - min(samples) > 0.1 * bound  # jitter actually spreads them


def test_only_unavailable_and_opt_in_resource_exhausted_are_retried() -> None:
    exhausted = ResourceExhaustedError("RESOURCE_EXHAUSTED", "full", retry_after_s=0.5)

    assert RetryPolicy().is_retryable(error_from_status("UNAVAILABLE", "down"))
    assert not RetryPolicy().is_retryable(exhausted)
    assert RetryPolicy(retry_resource_exhausted=True).is_retryable(exhausted)
    for status in ("INVALID_ARGUMENT", "NOT_FOUND", "DEADLINE_EXCEEDED", "INTERNAL"):
        assert not RetryPolicy().is_retryable(error_from_status(status, "x"))


def test_retry_after_raises_the_delay_and_the_deadline_stops_retrying() -> None:
    policy = RetryPolicy(initial_backoff_s=0.01, retry_resource_exhausted=True)
    exhausted = ResourceExhaustedError("RESOURCE_EXHAUSTED", "full", retry_after_s=0.5)

    assert CallBudget(policy, None, random.Random(0), "Get").next_delay_s(exhausted) == 0.5
    assert CallBudget(policy, 0.2, random.Random(0), "Get").next_delay_s(exhausted) is None


def test_spent_budget_raises_deadline_exceeded() -> None:
    budget = CallBudget(RetryPolicy(), 1e-9, random.Random(0), "Get")

    with pytest.raises(DeadlineExceededError):
        budget.attempt_timeout_s()


def test_error_mapping_reads_the_detail_and_survives_garbage() -> None:
    detail = common_pb2.ErrorDetail(code="BAD", field="tenant").SerializeToString()

    with_detail = error_from_status("INVALID_ARGUMENT", "no", [(ERROR_DETAIL_KEY, detail)])
    garbage = error_from_status("INVALID_ARGUMENT", "no", [(ERROR_DETAIL_KEY, b"\xff\xff")])
    other = error_from_status("PERMISSION_DENIED", "not yours")
    unknown = error_from_status("INTERNAL", "oops")

    assert isinstance(with_detail, InvalidArgumentError) and with_detail.field == "tenant"
    assert isinstance(garbage, InvalidArgumentError) and garbage.field == ""
    assert isinstance(other, PermissionDeniedError) and str(other) == "PERMISSION_DENIED: not yours"
    assert type(unknown) is PecSchedError and unknown.status == "INTERNAL"


def test_enums_round_trip_and_unknown_values_read_as_unspecified() -> None:
    for state in RequestState:
        assert convert.state_from_proto(convert.state_to_proto(state)) is state
    for request_class in RequestClass:
        assert convert.class_from_proto(convert.class_to_proto(request_class)) is request_class

    assert (
        convert.state_from_proto(common_pb2.RequestState.ValueType(99)) is RequestState.UNSPECIFIED
    )


def test_cursor_trims_overlap_drops_split_text_and_keeps_the_final_state() -> None:
    cursor = TokenCursor("r", from_token_index=2)

    overlap = cursor.accept(
        inference_pb2.TokenChunk(start_index=0, token_ids=[10, 11, 12, 13], text="abcd")
    )
    stale = cursor.accept(inference_pb2.TokenChunk(start_index=1, token_ids=[11, 12]))
    final = cursor.accept(
        inference_pb2.TokenChunk(start_index=0, token_ids=[10], final_state=6, error="")
    )

    assert overlap is not None and overlap.token_ids == (12, 13) and overlap.text == ""
    assert overlap.start_index == 2 and overlap.request_id == "r"
    assert stale is None
    assert (
        final is not None and final.token_ids == () and final.final_state is RequestState.FINISHED
    )
    assert cursor.next_index == 4 and cursor.final_state is RequestState.FINISHED


def test_cli_state_choices_match_the_sdk_states() -> None:
    from sdk import cli

    assert set(cli._STATES) == {s.value for s in RequestState} - {"unspecified"}
