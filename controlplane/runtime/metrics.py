"""Prometheus text-format metrics without a client library: counters, gauges, histograms.

`Metrics` holds the control plane's series; `render()` returns the exposition text
(version 0.0.4) that controlplane/api/metrics_http.py serves. All updates happen on the event
loop thread, so no locking is needed.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence

Labels = tuple[tuple[str, str], ...]

LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


def _fmt_labels(labels: Labels, extra: str = "") -> str:
    parts = [f'{k}="{_escape(v)}"' for k, v in labels]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _fmt_value(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


class _Family:
    def __init__(self, name: str, help_text: str, kind: str) -> None:
        self.name = name
        self.help_text = help_text
        self.kind = kind

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help_text}", f"# TYPE {self.name} {self.kind}"]


class Counter(_Family):
    """A monotonically increasing value per label set."""

    def __init__(self, name: str, help_text: str) -> None:
        super().__init__(name, help_text, "counter")
        self.values: dict[Labels, float] = defaultdict(float)

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        """Add `amount` (>= 0)."""
        assert amount >= 0, f"{self.name}: counter increment {amount} < 0"
        self.values[tuple(sorted(labels.items()))] += amount

    def lines(self) -> list[str]:
        """Exposition lines."""
        return [f"{self.name}{_fmt_labels(k)} {_fmt_value(v)}" for k, v in self.values.items()]


class Gauge(_Family):
    """A value that goes up and down, per label set."""

    def __init__(self, name: str, help_text: str) -> None:
        super().__init__(name, help_text, "gauge")
        self.values: dict[Labels, float] = {}

    def set(self, value: float, **labels: str) -> None:
        """Set the current value."""
        self.values[tuple(sorted(labels.items()))] = value

    def lines(self) -> list[str]:
        """Exposition lines."""
        return [f"{self.name}{_fmt_labels(k)} {_fmt_value(v)}" for k, v in self.values.items()]


class Histogram(_Family):
    """Cumulative buckets, sum and count per label set."""

    def __init__(self, name: str, help_text: str, buckets: Sequence[float]) -> None:
        super().__init__(name, help_text, "histogram")
        self.buckets = tuple(buckets)
        self.counts: dict[Labels, list[int]] = {}
        self.sums: dict[Labels, float] = defaultdict(float)

    def observe(self, value: float, **labels: str) -> None:
        """Record one observation."""
        key = tuple(sorted(labels.items()))
        counts = self.counts.setdefault(key, [0] * (len(self.buckets) + 1))
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                counts[i] += 1
        counts[-1] += 1
        self.sums[key] += value

    def lines(self) -> list[str]:
        """Exposition lines."""
        out: list[str] = []
        for key, counts in self.counts.items():
            for bound, count in zip((*self.buckets, math.inf), counts, strict=True):
                le = f'le="{_fmt_value(bound)}"'
                out.append(f"{self.name}_bucket{_fmt_labels(key, le)} {count}")
            out.append(f"{self.name}_sum{_fmt_labels(key)} {_fmt_value(self.sums[key])}")
            out.append(f"{self.name}_count{_fmt_labels(key)} {counts[-1]}")
        return out


class Metrics:
    """The control plane's metric families."""

    def __init__(self) -> None:
        self.queue_depth = Gauge("pecsched_queue_depth", "Requests QUEUED, by class")
        self.queued_tokens = Gauge("pecsched_queued_tokens", "Prompt tokens QUEUED, by class")
        self.requests = Gauge("pecsched_requests", "Unfinished requests by class and state")
        self.tokens = Counter(
            "pecsched_tokens_total", "Tokens by class and kind (prompt accepted, output made)"
        )
        self.submits = Counter("pecsched_submits_total", "Submit outcomes by result")
        self.preemptions = Gauge("pecsched_preemptions_total", "Long prefills paused (policy)")
        self.colocations = Gauge("pecsched_colocations_total", "Short prefills colocated")
        self.kv_transfers = Gauge("pecsched_kv_transfers_total", "KV transfers issued")
        self.busy = Counter(
            "pecsched_instance_busy_seconds_total", "Busy seconds reported per instance"
        )
        self.agents = Gauge("pecsched_agents_connected", "Agents attached")
        self.instances = Gauge("pecsched_instances_up", "Instances up, by role")
        self.queueing_delay = Histogram(
            "pecsched_queueing_delay_seconds", "Arrival to first scheduled", LATENCY_BUCKETS_S
        )
        self.ttft = Histogram("pecsched_ttft_seconds", "Arrival to first token", LATENCY_BUCKETS_S)
        self.jct = Histogram("pecsched_jct_seconds", "Arrival to finished", LATENCY_BUCKETS_S)
        self.decision = Histogram(
            "pecsched_decision_seconds",
            "policy.schedule() wall time",
            (1e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 1e-2, 0.1),
        )
        self.tick = Histogram(
            "pecsched_tick_seconds", "One tick: policy + transaction", LATENCY_BUCKETS_S
        )
        self.rebuilds = Counter(
            "pecsched_rebuilds_total", "Failed ticks after which the state was rebuilt"
        )
        self.serving = Gauge("pecsched_serving", "1 while serving, 0 while rebuilding")
        self.prompt_bytes = Gauge(
            "pecsched_prompt_bytes", "Bytes of prompts held for unfinished requests (4 a token)"
        )

    def render(self) -> str:
        """The exposition text of every family."""
        out: list[str] = []
        for family in vars(self).values():
            if isinstance(family, Counter | Gauge | Histogram):
                out.extend(family.header())
                out.extend(family.lines())
        return "\n".join(out) + "\n"
