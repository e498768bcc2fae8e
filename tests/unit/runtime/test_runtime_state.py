"""The runtime's record of a request (Ticker + RuntimeState, fifo policy, in-memory store):
a queued prompt is held once, and settling a request is one removal."""

from __future__ import annotations

from array import array

from controlplane.core.policies.registry import make_policy
from controlplane.core.types import RequestClass, RequestSpec
from controlplane.runtime.inputs import CancelAsk, PendingSubmit, TickInput
from controlplane.runtime.state import RuntimeState
from controlplane.runtime.ticker import Ticker
from controlplane.store.memory import InMemoryRepository
from controlplane.store.records import NewRequest
from controlplane.telemetry import Telemetry


def _ticker() -> Ticker:
    return Ticker(
        make_policy("fifo"),
        InMemoryRepository(),
        RuntimeState(),
        Telemetry.noop(),
        transfer_timeout_s=60.0,
    )


def _submit(request_id: str, tenant: str, prompt: array[int]) -> PendingSubmit:
    spec = RequestSpec(request_id, tenant, len(prompt), 4, 0, 0.0)
    return PendingSubmit(NewRequest(spec, RequestClass.SHORT, prompt), None)


def test_a_queued_prompt_is_the_submitted_array_not_a_copy():
    # Prepare: a prompt packed by the API layer
    ticker = _ticker()
    prompt = array("I", range(1000))

    # Execute
    ticker.run(TickInput(0.0, [_submit("r1", "acme", prompt)]))

    # Assert: the runtime holds that very array, counted once in the tenant's prompt bytes
    assert ticker.state.requests["r1"].inputs.prompt_token_ids is prompt
    assert ticker.state.tenant_prompt_bytes == {"acme": 4000}


def test_settling_a_request_forgets_it_and_its_tenant_counts():
    # Prepare: two queued requests of two tenants
    ticker = _ticker()
    submits = [_submit("r1", "acme", array("I", [1, 2])), _submit("r2", "beta", array("I", [3]))]
    ticker.run(TickInput(0.0, submits))

    # Execute: one is cancelled
    out = ticker.run(TickInput(1.0, happenings=[CancelAsk("r1", "changed my mind")]))

    # Assert: its record and its tenant's counts are gone; the other's stay
    assert out.cancels["r1"].state.is_terminal
    assert list(ticker.state.requests) == ["r2"]
    assert dict(ticker.state.tenant_active) == {"beta": 1}
    assert dict(ticker.state.tenant_prompt_bytes) == {"beta": 4}
