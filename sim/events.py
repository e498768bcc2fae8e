"""`SimEvent`: the named records of the simulator's event heap, and their kinds.

The heap (`sim.execution.Executor.heap`) orders events by (time, kind priority, push order), as
Vidur does, so equal-time completions run in a fixed order and runs are deterministic.
"""

from __future__ import annotations

from typing import NamedTuple

# Kind priorities at equal times: decode/colocation milestones, chunk ends, transfers, mixed
# iteration ends.
TICK, CHUNK, TRANSFER, MIXED = 0, 1, 2, 3


class SimEvent(NamedTuple):
    """A completion due at `at_s`; the heap orders them by time, then kind, then push order.

    kind      subject            tag
    TICK      instance index     the instance's `version` it was computed for (milestone due)
    CHUNK     request index      the prefill job's `seq` (its chunk in flight ends)
    TRANSFER  request index      destination instance index (the KV arrived there)
    MIXED     instance index     the instance's `mixed_seq` (its mixed iteration ends)
    A TICK, CHUNK or MIXED whose tag is no longer current is stale and ignored.
    """

    at_s: float
    kind: int  # TICK, CHUNK, TRANSFER or MIXED
    seq: int  # push order: ties keep it
    subject: int
    tag: int
