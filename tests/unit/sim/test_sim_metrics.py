"""Metric definitions on hand-computed tiny runs."""

from __future__ import annotations

import numpy as np
import pytest

from sim.metrics import RequestRecords, gpu_idle_rate, summarize

NAN = float("nan")


def _records() -> RequestRecords:
    # Three shorts and two longs, times chosen by hand.
    return RequestRecords(
        is_long=np.array([False, False, False, True, True]),
        arrival_s=np.array([0.0, 1.0, 2.0, 0.0, 1.0]),
        first_scheduled_s=np.array([0.0, 3.0, 2.5, 0.5, NAN]),
        first_token_s=np.array([0.5, 3.5, 3.0, 10.0, NAN]),
        finished_s=np.array([1.5, 4.5, 4.0, 12.0, NAN]),
        output_tokens=np.array([3, 1, 5, 11, 4]),
        preemptions=np.array([0, 0, 0, 2, 1]),
        isolated_jct_s=np.array([1.0, 1.0, 1.0, 6.0, 6.0]),
    )


def test_short_queueing_ttft_tbt_and_throughput() -> None:
    s = summarize(_records(), busy_gpu_s=30.0, num_gpus=4, end_s=20.0)

    assert s.short.count == 3
    # delays 0, 2, 0.5
    assert s.short.queueing_delay_s["p50"] == pytest.approx(0.5)
    assert s.short.queueing_delay_s["p99"] == pytest.approx(np.percentile([0, 2, 0.5], 99))
    assert s.short.ttft_s["p50"] == pytest.approx(1.0)  # 0.5, 2.5, 1.0
    # TBT: (1.5-0.5)/2 = 0.5 and (4.0-3.0)/4 = 0.25; the 1-token request has none.
    assert s.short.tbt_s["p50"] == pytest.approx(0.375)
    # 3 shorts over [0, 4.5]
    assert s.short.throughput_rps == pytest.approx(3 / 4.5)


def test_long_jct_starvation_preemptions_and_idle() -> None:
    s = summarize(_records(), busy_gpu_s=30.0, num_gpus=4, end_s=20.0, starvation_factor=1.5)

    assert s.long.count == 2
    assert s.long.jct_mean_s == pytest.approx(12.0)  # only the finished one
    # one unfinished, the other 12 s > 1.5 x 6 s
    assert s.long.starvation_rate == 1.0
    assert s.long.preemptions_total == 3
    # the unscheduled long waits from 1.0 to the end (20.0)
    assert s.long.queueing_delay_s["p99"] == pytest.approx(np.percentile([0.5, 19.0], 99))
    assert s.makespan_s == 12.0
    assert s.gpu_idle_rate == pytest.approx((4 * 12.0 - 30.0) / (4 * 12.0))


def test_starvation_threshold_is_strict() -> None:
    s = summarize(_records(), busy_gpu_s=0.0, num_gpus=1, end_s=20.0, starvation_factor=2.0)

    assert s.long.starvation_rate == 0.5  # 12 s == 2 x 6 s is not starved; unfinished is


def test_idle_rate_bounds() -> None:
    assert gpu_idle_rate(0.0, 8, 10.0) == 1.0
    assert gpu_idle_rate(80.0, 8, 10.0) == 0.0
    assert gpu_idle_rate(0.0, 8, 0.0) == 0.0


def test_mismatched_columns_are_rejected() -> None:
    with pytest.raises(ValueError, match="is_long"):
        RequestRecords(
            np.array([True]),
            np.zeros(2),
            np.zeros(2),
            np.zeros(2),
            np.zeros(2),
            np.zeros(2, np.int64),
            np.zeros(2, np.int64),
            np.zeros(2),
        )
