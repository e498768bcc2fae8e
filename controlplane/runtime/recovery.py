"""Start-up recovery: replay every unfinished request of the database into a fresh policy.

Every node is marked DOWN (agents re-register when they reconnect and are told to drop what
they still hold). Each unfinished request is re-queued in arrival order with its inputs and
its persisted output tokens: a request that was decoding continues after those tokens (its
next StartPrefill carries them as `generated_token_ids`). A request that already has all its
tokens is finished at once. Counters from before the restart are carried over.
"""

from __future__ import annotations

from dataclasses import replace

from controlplane.core.events import Event, RequestArrived
from controlplane.core.types import RequestState, RequestView
from controlplane.runtime.state import Carryover, RequestInputs, Tracked
from controlplane.runtime.ticker import Ticker
from controlplane.runtime.tokens import TokenLog
from controlplane.store.records import DetailValue, NodeState, RequestEvent, RequestEventKind

_S = RequestState
_K = RequestEventKind
RESTART_REASON = "control plane restarted"


def recover(ticker: Ticker, now_s: float) -> tuple[dict[str, TokenLog], list[RequestView]]:
    """Replay the database into `ticker`'s fresh policy in one transaction.

    Returns:
        The token logs of the recovered requests, and the views persisted by recovery
        (re-queued or finished requests).
    """
    repo, st = ticker.repo, ticker.state
    logs: dict[str, TokenLog] = {}
    written: list[RequestView] = []
    timeline: list[RequestEvent] = []
    events: list[Event] = []
    with repo.transaction(write=True):
        for node in repo.list_nodes():
            if node.state is NodeState.UP:
                repo.mark_node_down(node.node_id, now_s)
        for stored in repo.unfinished_with_inputs():
            view, tokens = stored.view, list(stored.output_token_ids)
            rid, spec = view.request_id, view.spec
            if len(tokens) >= spec.max_new_tokens:
                done = replace(view, state=_S.FINISHED, finished_s=now_s, output_tokens=len(tokens))
                written.append(done)
                details: dict[str, DetailValue] = {"output_tokens": len(tokens)}
                timeline.append(RequestEvent(rid, _K.FINISHED, now_s, None, details))
                continue
            log = TokenLog(tokens, spec.max_new_tokens)
            was_running = view.state is not _S.QUEUED
            inputs = RequestInputs(
                spec.tenant, stored.prompt_token_ids, spec.max_new_tokens, stored.sampling
            )
            requeues = view.num_requeues + int(was_running)
            carry = Carryover(view.num_preemptions, requeues, view.paused_total_s)
            st.track(rid, Tracked(inputs, log, num_requeues=requeues, carry=carry))
            logs[rid] = log
            events.append(RequestArrived(spec, now_s))
            if was_running:
                timeline.append(
                    RequestEvent(rid, _K.REQUEUED, now_s, None, {"reason": RESTART_REASON})
                )
                written.append(
                    replace(
                        view,
                        state=_S.QUEUED,
                        chunks_done=0,
                        chunks_total=0,
                        prefill_instance_ids=(),
                        decode_instance_ids=(),
                        num_requeues=view.num_requeues + 1,
                        output_tokens=len(tokens),
                    )
                )
        ticker.policy.observe(events)
        repo.update_requests(written)
        repo.record_events(timeline)
    return logs, written
