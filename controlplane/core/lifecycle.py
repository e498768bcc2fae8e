"""The request lifecycle as named, validated transition rules.

    QUEUED ──START_PREFILL──▶ PREFILLING ──PAUSE──▶ PAUSED
      ▲                        │   ▲                  │
      │                        │   └─────RESUME───────┘
      │            BEGIN_KV_TRANSFER / DECODE_IN_PLACE (from PREFILLING or PAUSED: a Pause
      │                        │    issued while the last chunk was in flight)
      │                        ▼
      │                 TRANSFERRING_KV ──START_DECODE──▶ DECODING ──FINISH──▶ FINISHED
      └──REQUEUE── (any running state: instance down, retryable failure)
    CANCEL / FAIL: any non-terminal state -> CANCELLED / FAILED.

Each rule receives an immutable `TransitionContext` and returns a `Verdict`; `transition()`
raises `IllegalTransitionError` (request id, both states, rule name) when the verdict refuses.
"""

from __future__ import annotations

from dataclasses import dataclass

from controlplane.core.errors import CoreError, ErrorCode
from controlplane.core.types import RequestState

_S = RequestState
_RUNNING = frozenset({_S.PREFILLING, _S.PAUSED, _S.TRANSFERRING_KV, _S.DECODING})
_NON_TERMINAL = _RUNNING | {_S.QUEUED}


class IllegalTransitionError(CoreError):
    """A lifecycle rule refused to move `request_id` from `from_state` to `to_state`."""

    def __init__(
        self, request_id: str, from_state: RequestState, to_state: RequestState, rule: str
    ) -> None:
        super().__init__(
            ErrorCode.ILLEGAL_TRANSITION,
            f"request {request_id!r}: illegal transition {from_state.value} -> "
            f"{to_state.value} (rule {rule})",
        )
        self.request_id = request_id
        self.from_state = from_state
        self.to_state = to_state
        self.rule = rule


@dataclass(frozen=True, slots=True)
class TransitionContext:
    """What a rule judges: which request, and the state it is in."""

    request_id: str  # the request
    from_state: RequestState  # its current state


@dataclass(frozen=True, slots=True)
class Verdict:
    """A rule's answer: `allowed`, and the state the request moves to."""

    allowed: bool  # True when the transition may happen
    rule: str  # name of the rule that judged
    to_state: RequestState  # the target state of the rule


@dataclass(frozen=True, slots=True)
class TransitionRule:
    """A named transition: allowed from `from_states`, always to `to_state`."""

    name: str  # stable rule name, used in errors and traces
    from_states: frozenset[RequestState]  # states the rule may start from
    to_state: RequestState  # state the rule moves to

    def check(self, ctx: TransitionContext) -> Verdict:
        """Judge `ctx` without side effects."""
        return Verdict(ctx.from_state in self.from_states, self.name, self.to_state)


START_PREFILL = TransitionRule("start_prefill", frozenset({_S.QUEUED}), _S.PREFILLING)
PAUSE = TransitionRule("pause", frozenset({_S.PREFILLING}), _S.PAUSED)
RESUME = TransitionRule("resume", frozenset({_S.PAUSED}), _S.PREFILLING)
BEGIN_KV_TRANSFER = TransitionRule(
    "begin_kv_transfer", frozenset({_S.PREFILLING, _S.PAUSED}), _S.TRANSFERRING_KV
)
DECODE_IN_PLACE = TransitionRule(
    "decode_in_place", frozenset({_S.PREFILLING, _S.PAUSED}), _S.DECODING
)
START_DECODE = TransitionRule("start_decode", frozenset({_S.TRANSFERRING_KV}), _S.DECODING)
FINISH = TransitionRule("finish", _RUNNING, _S.FINISHED)
REQUEUE = TransitionRule("requeue", _RUNNING, _S.QUEUED)
CANCEL = TransitionRule("cancel", _NON_TERMINAL, _S.CANCELLED)
FAIL = TransitionRule("fail", _NON_TERMINAL, _S.FAILED)

# Every rule, in lifecycle order (documentation and exhaustive tests iterate over it).
RULES: tuple[TransitionRule, ...] = (
    START_PREFILL,
    PAUSE,
    RESUME,
    BEGIN_KV_TRANSFER,
    DECODE_IN_PLACE,
    START_DECODE,
    FINISH,
    REQUEUE,
    CANCEL,
    FAIL,
)


def transition(rule: TransitionRule, request_id: str, from_state: RequestState) -> RequestState:
    """Return the state `rule` moves `request_id` to from `from_state`.

    Raises:
        IllegalTransitionError: the rule does not allow leaving `from_state`.
    """
    if from_state in rule.from_states:  # hot path: same answer as rule.check(), no allocation
        return rule.to_state
    verdict = rule.check(TransitionContext(request_id, from_state))
    raise IllegalTransitionError(request_id, from_state, verdict.to_state, verdict.rule)
