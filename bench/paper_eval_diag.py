"""Why a simulation's numbers are what they are: a breakdown computed from its per-request
records and (when logged) its decision log, stored with each run of `bench/paper_eval.py` under
`diagnosis` so the document can explain every missed target from the run's own numbers.

* `long`: the mean long request's JCT split into queued (arrival to first prefill start),
  paused (between each Pause and the next Resume of its prefill) and the rest (running:
  prefill chunks, decode), in seconds, and the mean preemptions per long.
* `short_tail` (decision log only): the shorts whose queueing delay is at or above the run's
  p99 and above 0, counted by how the policy placed them (the reason of their StartPrefill /
  Colocate: `PATHS`), with their mean wait for the decision and from the decision to the
  first prefill execution (for a preempting short: the victim's chunk in flight).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import Any

import numpy as np

from sim.metrics import RequestRecords

# (label, reason prefix) of the ways a short prefill is placed, most specific first
PATHS: tuple[tuple[str, str], ...] = (
    ("preempted a long prefill", "preempted long request"),
    ("behind a paused long's chunk", "instance holding a paused long prefill"),
    ("beside a long decode", "instance decoding a long request"),
    ("colocated on a short decoder", "colocated on short-decode instance"),
    ("open instance", "open instance"),
    ("open instance", "least outstanding prefill tokens"),
)
OTHER = "other"
_ACTION = re.compile(r"^(\S+) (\w+)\(request_id='([^']*)'.*reason='([^']*)'")


def _path(reason: str) -> str:
    for label, prefix in PATHS:
        if reason.startswith(prefix):
            return label
    return OTHER


def diagnose(records: RequestRecords, decisions: tuple[str, ...]) -> dict[str, Any]:
    """The breakdown of one run (module docstring); `decisions` may be empty (no log)."""
    started: dict[int, tuple[float, str]] = {}  # short index -> (decision s, path)
    paused: dict[int, float] = {}  # long index -> paused since
    paused_s = np.zeros(len(records.arrival_s))
    for line in decisions:
        m = _ACTION.match(line)
        if m is None:
            continue
        at_s, kind, rid, reason = float(m[1]), m[2], int(m[3]), m[4]
        if kind in ("StartPrefill", "Colocate") and not records.is_long[rid]:
            started.setdefault(rid, (at_s, _path(reason)))
        elif kind == "Pause":
            paused[rid] = at_s
        elif kind == "Resume" and rid in paused:
            paused_s[rid] += at_s - paused.pop(rid)
    out: dict[str, Any] = {"long": _long(records, paused_s)}
    if started:
        out["short_tail"] = _short_tail(records, started)
    return out


def _long(records: RequestRecords, paused_s: np.ndarray) -> dict[str, float]:
    long = records.is_long & ~np.isnan(records.finished_s)
    if not long.any():
        return {}
    queued = records.first_scheduled_s[long] - records.arrival_s[long]
    jct = records.finished_s[long] - records.arrival_s[long]
    paused = paused_s[long]
    return {
        "finished": int(long.sum()),
        "queued_s_mean": float(queued.mean()),
        "paused_s_mean": float(paused.mean()),
        "running_s_mean": float((jct - queued - paused).mean()),
        "preemptions_mean": float(records.preemptions[long].mean()),
    }


def _short_tail(records: RequestRecords, started: dict[int, tuple[float, str]]) -> dict[str, Any]:
    short = np.nonzero(~records.is_long & ~np.isnan(records.first_scheduled_s))[0]
    delay = records.first_scheduled_s[short] - records.arrival_s[short]
    if not len(short):
        return {}
    threshold = float(np.percentile(delay, 99))
    tail = short[(delay >= threshold) & (delay > 0)]  # (none waited: no tail)
    paths: Counter[str] = Counter()
    decide, execute = [], []
    for i in tail.tolist():
        at_s, path = started.get(i, (math.nan, OTHER))
        paths[path] += 1
        decide.append(at_s - records.arrival_s[i])
        execute.append(records.first_scheduled_s[i] - at_s)
    return {
        "count": len(tail),
        "threshold_s": threshold,
        "paths": dict(paths.most_common()),
        "decision_wait_s_mean": float(np.nanmean(decide)),
        "start_wait_s_mean": float(np.nanmean(execute)),
    }
