"""`DecodeBatchEstimator`: how large a short-decode batch may grow within a TBT target.

The core has no cost model, so the estimate is learned from what the data plane reports. A
short that decoded on a SHORT_DECODE instance gives one sample when it finishes: its mean time
between tokens over its decode (`(finish - decode start) / (tokens - 1)`) divided by the mean
batch it decoded in (members of its instance at start and at finish). That is the TBT one
member of a batch costs, fixed per-iteration costs included, so `slo / cost` never
overestimates the batch that meets the target once batches are larger than the ones sampled
(TBT = fixed + batch x per-member <= batch x (fixed / sampled batch + per-member)). Samples
are averaged with an exponential weight; before the first one the limit is the configured
`max_decode_batch`.
"""

from __future__ import annotations

import math

SAMPLE_WEIGHT = 0.05  # weight of each new sample in the running mean (~20 recent decodes)


class DecodeBatchEstimator:
    """Largest short-decode batch whose TBT stays within `tbt_slo_s`, learned from decodes."""

    def __init__(self, tbt_slo_s: float, max_batch: int) -> None:
        self._tbt_slo_s = tbt_slo_s
        self._max_batch = max_batch
        self._started: dict[str, tuple[float, int]] = {}  # request -> (start s, batch then)
        self.seconds_per_member: float | None = None  # TBT one batch member costs

    def decode_started(self, request_id: str, at_s: float, batch: int) -> None:
        """`request_id` joined a decode batch of `batch` members (itself included) at `at_s`."""
        self._started[request_id] = (at_s, batch)

    def decode_ended(self, request_id: str, at_s: float, tokens: int, batch: int) -> None:
        """`request_id` left its batch of `batch` members (itself included) at `at_s`, after
        `tokens` output tokens in all (the first came with its prefill). Unknown ids (never
        started, or cancelled before) are ignored."""
        started = self._started.pop(request_id, None)
        if started is None or tokens < 2:
            return
        start_s, batch_then = started
        tbt_s = max(0.0, at_s - start_s) / (tokens - 1)
        sample = tbt_s / max(1.0, (batch_then + batch) / 2.0)
        old = self.seconds_per_member
        self.seconds_per_member = sample if old is None else old + SAMPLE_WEIGHT * (sample - old)

    def forget(self, request_id: str) -> None:
        """Drop a decode that ended without finishing (cancelled, failed, re-queued)."""
        self._started.pop(request_id, None)

    def batch_limit(self) -> int:
        """Members one short-decode instance may decode at once (1..max_batch)."""
        cost = self.seconds_per_member
        if cost is None or cost <= 0.0:
            return self._max_batch
        return max(1, min(self._max_batch, math.floor(self._tbt_slo_s / cost)))
