"""The error catalog covers every domain code and sanitizes everything else."""

from __future__ import annotations

import grpc
import pytest

from controlplane.api.errors import (
    CATALOG,
    INTERNAL,
    ApiError,
    ApiErrorCode,
    error_detail,
    resolve,
)
from controlplane.core.errors import ErrorCode, InvalidArgumentError
from controlplane.runtime.errors import RuntimeErrorCode, RuntimeServiceError
from controlplane.store.errors import NotFound, StoreError, StoreErrorCode, Unavailable
from protos.pecsched.v1 import common_pb2


@pytest.mark.parametrize(
    ("owner", "codes"),
    [
        (ApiError, ApiErrorCode),
        (RuntimeServiceError, RuntimeErrorCode),
        (StoreError, StoreErrorCode),
    ],
)
def test_every_api_runtime_and_store_code_has_an_entry(owner, codes):
    assert set(CATALOG[owner]) == set(codes)


@pytest.mark.parametrize(
    ("exc", "status", "name", "field"),
    [
        (
            ApiError(ApiErrorCode.PROMPT_EMPTY, "prompt: empty", field="prompt"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "PROMPT_EMPTY",
            "prompt",
        ),
        (
            RuntimeServiceError(RuntimeErrorCode.QUEUE_FULL, "full", retry_after_s=2.0),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "QUEUE_FULL",
            "",
        ),
        (
            Unavailable("psycopg: connection refused at 10.0.0.5"),
            grpc.StatusCode.UNAVAILABLE,
            "DATABASE_UNAVAILABLE",
            "",
        ),
        (NotFound("request 'x' not found"), grpc.StatusCode.NOT_FOUND, "NOT_FOUND", ""),
        (
            InvalidArgumentError("max_new_tokens", "must be >= 1"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_ARGUMENT",
            "max_new_tokens",
        ),
    ],
)
def test_domain_errors_resolve_to_their_status(exc, status, name, field):
    resolved = resolve(exc)
    assert (resolved.entry.status, resolved.entry.name, resolved.field) == (status, name, field)


def test_internal_details_never_reach_the_public_message():
    db = resolve(Unavailable("psycopg: connection refused at 10.0.0.5"))
    assert "10.0.0.5" not in db.message
    boom = resolve(KeyError("secret internal state"))
    assert boom.entry is INTERNAL and "secret" not in boom.message
    assert resolve(Exception()).entry.status == grpc.StatusCode.INTERNAL
    _ = ErrorCode  # core codes without an entry (driver bugs) are INTERNAL too


def test_error_detail_carries_code_field_and_retry_hint():
    resolved = resolve(RuntimeServiceError(RuntimeErrorCode.TENANT_LIMIT, "x", retry_after_s=3))
    detail = common_pb2.ErrorDetail.FromString(error_detail(resolved))
    assert (detail.code, detail.retry_after_s) == ("TENANT_LIMIT", 3.0)
