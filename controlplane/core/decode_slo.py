"""`DecodeBatchEstimator`: how large a short-decode batch may grow within a TBT target.

The core has no cost model, so the estimate is learned from what the data plane reports. A
short that decoded on a SHORT_DECODE instance gives one sample when it finishes: its mean time
between tokens over its decode, `(finish - decode start) / (tokens - 1)`, and the mean batch it
decoded in (members of its instance at start and at finish). An iteration costs a fixed part
(weights read once, colocated prefill work) plus a part per member (its KV read), so the
samples are fitted with TBT = fixed + batch x per-member: exponentially weighted least squares
(~20 recent decodes). The limit is the largest batch the fit keeps within the target, bounded:

* the per-member cost is at most the mean TBT over the mean batch (a zero fixed part), the
  cautious estimate that is all one batch size can tell; batches within that estimate's limit
  are always allowed;
* beyond it, no more than twice the largest batch sampled: a fit is trusted only near the
  batches it saw, and the samples of the larger batches then correct it.

On a model whose fixed part dominates (Llama-3.1-70B on 4 A100s: 0.034 s at batch 1, 0.049 s
at 128) the cautious estimate alone kept batches of 2-7 while their TBT was 0.035 s, so shorts
waited tens of seconds for a decode place. Before the first sample the limit is the
configured `max_decode_batch`.

A short prefill colocated on a short-decode instance shares its iterations, so its budget of
prompt tokens a step is priced by the same fit: the fitted decode iteration at the host's batch
plus the seconds per prompt token learned from colocated prefills that ran (their iteration time
beyond the fitted decode part) stays within the target. The price per token is the running mean
plus `PRICE_SPREAD` standard deviations: prompts differ (attention grows with them) and a short
meets its target only when nearly every gap does, so a step priced at the mean would overrun
it about half the time. Before one ran, the configured budget.
"""

from __future__ import annotations

import math

SAMPLE_WEIGHT = 0.05  # weight of each new sample in the running means (~20 recent decodes)
MIN_BATCH_VARIANCE = 0.25  # below this spread of sampled batches the slope is not fitted
GROWTH_FACTOR = 2  # the fit's limit stays within this many times the largest batch sampled
PRICE_SPREAD = 2.0  # standard deviations above the mean price of a colocated prompt token


class DecodeBatchEstimator:
    """Largest short-decode batch whose TBT stays within `tbt_slo_s`, learned from decodes."""

    def __init__(self, tbt_slo_s: float, max_batch: int) -> None:
        self._tbt_slo_s = tbt_slo_s
        self._max_batch = max_batch
        self._started: dict[str, tuple[float, int]] = {}  # request -> (start s, batch then)
        # running means of batch, TBT, batch^2 and batch x TBT over the samples (None: none)
        self._means: tuple[float, float, float, float] | None = None
        self._largest_batch = 0.0  # largest mean batch sampled
        # seconds per colocated prompt token beyond the decode: running mean and mean square
        self._prefill_price: tuple[float, float] | None = None

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
        mean_batch = max(1.0, (batch_then + batch) / 2.0)
        sample = (mean_batch, tbt_s, mean_batch * mean_batch, mean_batch * tbt_s)
        old = self._means
        if old is None:
            self._means = sample
        else:
            self._means = tuple(  # type: ignore[assignment]
                m + SAMPLE_WEIGHT * (x - m) for m, x in zip(old, sample, strict=True)
            )
        self._largest_batch = max(self._largest_batch, mean_batch)

    def colocated_prefill_ran(
        self, seconds: float, prompt_tokens: int, iterations: int, batch: int
    ) -> None:
        """A prefill of `prompt_tokens` colocated on a short-decode instance ran `iterations`
        iterations in `seconds` beside `batch` decodes: learn its seconds per prompt token
        beyond the fitted decode iteration (nothing before a decode sample)."""
        fitted = self.fit()
        if fitted is None or iterations < 1 or prompt_tokens < 1:
            return
        decode_s = fitted[0] + fitted[1] * batch
        sample = max(0.0, seconds / iterations - decode_s) * iterations / prompt_tokens
        old = self._prefill_price
        if old is None:
            self._prefill_price = (sample, sample * sample)
        else:
            mean, square = old
            mean += SAMPLE_WEIGHT * (sample - mean)
            square += SAMPLE_WEIGHT * (sample * sample - square)
            self._prefill_price = (mean, square)

    def prefill_s_per_token(self) -> float | None:
        """Price of one colocated prompt token: mean + `PRICE_SPREAD` standard deviations of
        the learned samples (None before one)."""
        if self._prefill_price is None:
            return None
        mean, square = self._prefill_price
        return mean + PRICE_SPREAD * math.sqrt(max(0.0, square - mean * mean))

    def colocation_budget(self, batch: int, most_tokens: int) -> int:
        """Prompt tokens a prefill colocated beside `batch` decodes may run per iteration so the
        iteration stays within the target (0: none fit); `most_tokens` at most, and before
        anything was learned."""
        fitted, per_token = self.fit(), self.prefill_s_per_token()
        if fitted is None or per_token is None or per_token <= 0.0:
            return most_tokens
        room = self._tbt_slo_s - (fitted[0] + fitted[1] * batch)
        return max(0, min(most_tokens, math.floor(room / per_token)))

    def forget(self, request_id: str) -> None:
        """Drop a decode that ended without finishing (cancelled, failed, re-queued)."""
        self._started.pop(request_id, None)

    def fit(self) -> tuple[float, float] | None:
        """(fixed seconds, seconds per member) of an iteration, fitted; None before a sample."""
        if self._means is None:
            return None
        batch, tbt, batch_sq, batch_tbt = self._means
        cautious = tbt / batch  # a zero fixed part: the most a member can cost
        variance = batch_sq - batch * batch
        slope = cautious
        if variance >= MIN_BATCH_VARIANCE:
            slope = min(cautious, max(0.0, (batch_tbt - batch * tbt) / variance))
        return tbt - slope * batch, slope

    def batch_limit(self) -> int:
        """Members one short-decode instance may decode at once (1..max_batch)."""
        fitted = self.fit()
        if fitted is None or self._means is None or self._means[1] <= 0.0:
            return self._max_batch
        fixed, per_member = fitted
        cautious = math.floor(self._tbt_slo_s * self._means[0] / self._means[1])
        room = self._tbt_slo_s - fixed
        limit = self._max_batch if per_member <= 0.0 else math.floor(room / per_member)
        limit = min(limit, max(cautious, math.floor(GROWTH_FACTOR * self._largest_batch)))
        return max(1, min(self._max_batch, limit))
