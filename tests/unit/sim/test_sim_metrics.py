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


def _slo_records(gaps_over: list[int]) -> RequestRecords:
    # Five shorts and one long; the long finishes last, at 20 s.
    return RequestRecords(
        is_long=np.array([False, False, False, False, False, True]),
        arrival_s=np.array([0.0, 1.0, 2.0, 3.0, 4.0, 0.0]),
        first_scheduled_s=np.array([0.0, 1.0, 2.0, 3.0, 4.0, 0.0]),
        first_token_s=np.array([0.5, 2.5, 3.0, 3.5, NAN, 5.0]),
        finished_s=np.array([2.0, 4.0, 10.0, 4.0, NAN, 20.0]),
        output_tokens=np.array([11, 11, 201, 101, 5, 2]),
        preemptions=np.zeros(6, np.int64),
        isolated_jct_s=np.full(6, 10.0),
        tbt_gaps_over_slo=np.array(gaps_over),
        tbt_slo_s=0.1,
    )


def test_slo_attainment_needs_ttft_tbt_p99_and_a_finish() -> None:
    # 0: TTFT 0.5, 10 gaps none slow -> met. 1: TTFT 1.5 > 1 -> missed.
    # 2: 200 gaps, 2 slow: the nearest-rank p99 (the 198th) is fast -> met.
    # 3: 100 gaps, 2 slow: the 99th gap is slow -> missed. 4: never finished -> missed.
    s = summarize(_slo_records([0, 0, 2, 2, 0, 0]), 0.0, 1, end_s=20.0)
    assert s.short.slo_attainment == pytest.approx(2 / 5)

    # 2 has 3 slow of 200 gaps -> missed; 3 has 1 slow of 100 -> met.
    s = summarize(_slo_records([0, 0, 3, 1, 0, 0]), 0.0, 1, end_s=20.0)
    assert s.short.slo_attainment == pytest.approx(2 / 5)

    # A looser TTFT SLO admits 1; one slow gap of 0's 10 misses it.
    s = summarize(_slo_records([1, 0, 0, 0, 0, 0]), 0.0, 1, end_s=20.0, slo_ttft_s=2.0)
    assert s.short.slo_attainment == pytest.approx(3 / 5)


def test_slo_attainment_is_nan_when_gaps_were_not_measured() -> None:
    s = summarize(_records(), busy_gpu_s=30.0, num_gpus=4, end_s=20.0)
    assert np.isnan(s.short.slo_attainment)


def test_short_throughput_over_the_makespan_and_over_the_short_span() -> None:
    s = summarize(_slo_records([0] * 6), 0.0, 1, end_s=20.0)

    assert s.makespan_s == 20.0  # the long finishes last
    assert s.short.throughput_makespan_rps == pytest.approx(4 / 20.0)  # 4 shorts finished
    assert s.short.throughput_rps == pytest.approx(4 / 10.0)  # first short arrival .. last finish


def test_tbt_percentiles_are_over_per_request_mean_gaps() -> None:
    s = summarize(_slo_records([0] * 6), 0.0, 1, end_s=20.0)

    means = [1.5 / 10, 1.5 / 10, 7.0 / 200, 0.5 / 100]  # (finish - first token) / gaps
    assert s.short.tbt_s["p50"] == pytest.approx(np.percentile(means, 50))
    assert s.short.tbt_s["p99"] == pytest.approx(np.percentile(means, 99))
