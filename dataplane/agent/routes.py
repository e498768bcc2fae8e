"""Per-request routing state of the agent: where each request lives on this node."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class Route:
    """Where a request lives on this node."""

    workers: set[int]  # worker indices holding (or about to hold) its KV
    offset_tokens: int  # output tokens generated before a re-queue
    prompt_tokens: int  # original prompt length
    paused: bool = False  # last report was Paused


@dataclass(frozen=True, slots=True)
class TransferInfo:
    """A KV transfer this node takes part in."""

    request_id: str
    source_id: str  # instance id of the sender
    destination_id: str  # instance id of the receiver
