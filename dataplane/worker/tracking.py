"""What a worker keeps per request besides the engine, and its engine events turned into reports.

`Tracked` is the per-request bookkeeping the engine does not keep (chunk counts, the prompt
length, whether StartDecode came for an import still in flight). `report_events` turns the events
of one engine iteration into `WorkerReport`s, in order: PrefillChunkDone per chunk, PrefillDone
with the first token, Tokens (one report per request and iteration, the tokens in order; output
indices relative to what this engine generated), Finished (after the request's last Tokens). A
request that finished is no longer tracked. `is_resident` asks the engine whether it holds a
request.
"""

from __future__ import annotations

from dataclasses import dataclass

from dataplane.engine import types as ev
from dataplane.engine.engine import Engine
from dataplane.engine.errors import EngineError
from dataplane.worker import messages as m


@dataclass(slots=True)
class Tracked:
    """Per-request bookkeeping the engine does not keep."""

    chunk_tokens: int  # prompt tokens per chunk (0 for an imported request)
    chunks_total: int  # chunks of the prompt
    chunks_done: int = 0  # chunks that ran
    pending_first_token: bool = False  # PrefillDone seen, first token not yet
    prompt_tokens: int = 0  # prompt length
    decode_requested: bool = False  # StartDecode arrived (destination of a transfer)


def report_events(
    engine: Engine,
    tracked_requests: dict[str, Tracked],
    events: list[ev.EngineEvent],
    duration_s: float,
    reports: list[m.WorkerReport],
) -> None:
    """Append the reports of one iteration's `events` (it took `duration_s`) to `reports`."""
    tokens: dict[str, list[tuple[int, int]]] = {}
    for event in events:
        rid = event.request_id
        tracked = tracked_requests.get(rid)
        if isinstance(event, ev.ChunkDone) and tracked is not None:
            tracked.chunks_done += 1
            reports.append(
                m.PrefillChunkDone(
                    rid,
                    tracked.chunks_done - 1,
                    max(tracked.chunks_total, tracked.chunks_done),
                    event.num_prefilled_tokens,
                    duration_s,
                    engine.num_iterations,
                    engine.last_iteration_tokens,
                    event.num_chunk_tokens,
                )
            )
        elif isinstance(event, ev.PrefillDone) and tracked is not None:
            tracked.pending_first_token = True
        elif isinstance(event, ev.TokenGenerated):
            if tracked is not None and tracked.pending_first_token:
                tracked.pending_first_token = False
                reports.append(m.PrefillDone(rid, tracked.prompt_tokens, event.token_id))
            tokens.setdefault(rid, []).append((event.num_output_tokens - 1, event.token_id))
        elif isinstance(event, ev.Finished):
            _flush_tokens(rid, tokens.pop(rid, []), reports)
            tracked_requests.pop(rid, None)
            reports.append(m.Finished(rid, len(event.output_token_ids), event.reason.value))
    for rid, items in tokens.items():
        _flush_tokens(rid, items, reports)


def _flush_tokens(
    request_id: str, items: list[tuple[int, int]], reports: list[m.WorkerReport]
) -> None:
    if items:
        reports.append(m.Tokens(request_id, items[0][0], tuple(token for _, token in items)))


def is_resident(engine: Engine, request_id: str) -> bool:
    """Whether the engine holds `request_id` (in any state)."""
    try:
        engine.request_state(request_id)
    except EngineError:
        return False
    return True
