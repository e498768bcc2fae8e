"""The demo's load rule (`pecsched/demo_load.py`): pure parts, no cluster."""

from __future__ import annotations

import numpy as np
import pytest

from pecsched.demo_load import ServiceModel, choose_time_scale


def test_time_scale_fills_the_target_share_of_the_servers() -> None:
    # Prepare: one request a second, 1 s of work each
    arrival_s = np.arange(1000, dtype=np.float64)

    # Execute: 70% of 2 servers over 60 s is 84 s of work
    scale = choose_time_scale(arrival_s, float, window_s=60.0, servers=2, target_busy=0.7)

    # Assert: 84 requests arrive in the window (arrivals 0..83 scaled below 60 s), not 85
    assert int((arrival_s * scale < 60.0).sum()) == 84
    assert scale == pytest.approx(60.0 / 84.0, rel=1e-6)


def test_time_scale_grows_with_the_work() -> None:
    # Prepare
    arrival_s = np.arange(1000, dtype=np.float64)

    # Execute: the same arrivals with twice the work per request
    light = choose_time_scale(arrival_s, float, window_s=60.0, servers=2)
    heavy = choose_time_scale(arrival_s, lambda n: 2.0 * n, window_s=60.0, servers=2)

    # Assert: half as many requests fit, so arrivals are stretched (less compressed)
    assert heavy > light
    assert int((arrival_s * heavy < 60.0).sum()) == 42


@pytest.mark.parametrize(
    ("window_s", "servers", "target"), [(0.0, 2, 0.7), (60.0, 0, 0.7), (60.0, 2, 1.5)]
)
def test_time_scale_rejects_bad_arguments(window_s: float, servers: int, target: float) -> None:
    with pytest.raises(ValueError, match="bad window"):
        choose_time_scale(np.zeros(3), float, window_s, servers, target)


def test_work_counts_shorts_at_the_mean_and_longs_on_a_power_law() -> None:
    # Prepare: longs take 1 s at 4,000 tokens and 9 s at 16,000 (time ~ length^1.585)
    model = ServiceModel(short_s=0.1, long_low=(4000, 1.0), long_high=(16000, 9.0))

    # Execute
    work = model.work_s(np.array([100, 500, 4000, 8000, 16000]), np.array([0, 0, 1, 1, 1], bool))

    # Assert: 8,000 tokens is halfway on a log scale, so sqrt(1 * 9) = 3 s
    assert work == pytest.approx(0.1 + 0.1 + 1.0 + 3.0 + 9.0)
