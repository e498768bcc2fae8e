"""The one refusal back-off rule (controlplane.core.refusals) and the config's rule table."""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import pytest

from controlplane.core.accounting import KvLedger
from controlplane.core.config import _RULES, SchedulerConfig
from controlplane.core.errors import InvalidArgumentError
from controlplane.core.records import RequestRecord
from controlplane.core.refusals import RefusalBackoff, refusal_backoff_s
from controlplane.core.types import RequestClass
from tests.builders import make_config, make_request


def test_backoff_doubles_per_failure_in_a_row_up_to_the_cap() -> None:
    # Prepare
    config = make_config(refused_instance_backoff_s=0.5, refused_instance_backoff_max_s=3.0)

    # Execute
    backoffs = [refusal_backoff_s(config, k) for k in range(1, 7)]

    # Assert
    assert backoffs == [0.5, 1.0, 2.0, 3.0, 3.0, 3.0]
    assert refusal_backoff_s(config, 10_000) == 3.0  # no overflow for long streaks


def test_a_refusal_stands_until_free_kv_changes_or_the_backoff_ends() -> None:
    # Prepare
    config = make_config(refused_instance_backoff_s=1.0, refused_instance_backoff_max_s=8.0)
    ledger = KvLedger()
    ledger.add_instance("i0", 1000)
    ledger.add_instance("i1", 1000)
    backoff = RefusalBackoff(config, ledger)
    req = RequestRecord(make_request("r"), RequestClass.SHORT, 0)

    # Execute
    backoff.remember(req, ["i0", "i1"], at_s=10.0)  # first failure: 1 s
    backoff.remember(req, ["i0"], at_s=10.0)  # second in a row: 2 s for i0

    # Assert
    assert backoff.next_lapse_s() == 11.0
    assert backoff.is_refused(req, "i0", 11.5) and backoff.is_refused(req, "i1", 10.5)
    assert not backoff.is_refused(req, "i1", 11.0)  # back-off over: forgotten
    assert "i1" not in req.refusals
    ledger.allocate("other", "i0", 10)  # i0's free KV changed: worth another try
    assert not backoff.is_refused(req, "i0", 11.5)
    assert not backoff.pop_lapsed(10.5) and backoff.pop_lapsed(12.0)
    assert backoff.next_lapse_s() == float("inf")


def test_every_validation_rule_names_a_field() -> None:
    names = {f.name for f in dataclasses.fields(SchedulerConfig)}
    assert {name for name, _ in _RULES} <= names


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"chunk_tokens": 0}, "chunk_tokens: must be >= 1, got 0"),
        ({"protected_duty_cycle_chunks": -2}, "must be >= 1, got -2"),
        ({"short_decode_gpu_fraction": 1.0}, "must be in [0, 1), got 1.0"),
        (
            {"sarathi_max_partial_prefills": 1, "sarathi_max_long_partial_prefills": 2},
            "must be <= sarathi_max_partial_prefills=1, got 2",
        ),
        (
            {"refused_instance_backoff_s": 5.0, "refused_instance_backoff_max_s": 1.0},
            "must be finite and >= refused_instance_backoff_s=5.0, got 1.0",
        ),
        ({"long_aging_s": float("nan")}, "must be finite and >= 0 or None, got nan"),
    ],
)
def test_invalid_values_name_the_field_and_the_rule(
    overrides: dict[str, Any], message: str
) -> None:
    with pytest.raises(InvalidArgumentError, match=re.escape(message)):
        SchedulerConfig(**overrides)
