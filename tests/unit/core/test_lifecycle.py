"""Lifecycle rules: each allows exactly its source states; refusals carry ids and states."""

from __future__ import annotations

import pytest

from controlplane.core import lifecycle
from controlplane.core.errors import ErrorCode
from controlplane.core.lifecycle import IllegalTransitionError
from controlplane.core.types import RequestState

_PAIRS = [(rule, state) for rule in lifecycle.RULES for state in RequestState]


@pytest.mark.parametrize(("rule", "state"), _PAIRS, ids=lambda x: getattr(x, "name", str(x)))
def test_rule_allows_exactly_its_from_states(
    rule: lifecycle.TransitionRule, state: RequestState
) -> None:
    # Execute / Assert
    if state in rule.from_states:
        assert lifecycle.transition(rule, "r1", state) is rule.to_state
    else:
        with pytest.raises(IllegalTransitionError) as info:
            lifecycle.transition(rule, "r1", state)
        error = info.value
        assert error.code is ErrorCode.ILLEGAL_TRANSITION
        assert (error.request_id, error.from_state, error.to_state) == ("r1", state, rule.to_state)
        assert "r1" in str(error) and state.value in str(error) and rule.name in str(error)


def test_terminal_states_have_no_way_out() -> None:
    # Prepare
    terminal = [s for s in RequestState if s.is_terminal]

    # Assert
    assert terminal == [RequestState.FINISHED, RequestState.CANCELLED, RequestState.FAILED]
    for rule in lifecycle.RULES:
        assert not (rule.from_states & set(terminal)), rule.name


def test_rule_check_is_a_pure_verdict() -> None:
    # Execute
    verdict = lifecycle.PAUSE.check(lifecycle.TransitionContext("r9", RequestState.DECODING))

    # Assert
    assert verdict == lifecycle.Verdict(False, "pause", RequestState.PAUSED)
