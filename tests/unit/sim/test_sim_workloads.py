"""Trace loading, time scaling, long-input rescaling, tiling and synthetic generators."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from sim.workloads import (
    AZURE_TRACES,
    HeavyTailSpec,
    LogNormal,
    SyntheticSpec,
    Workload,
    head,
    heavy_tail,
    load_azure_traces,
    rescale_long,
    scale_time,
    set_rate,
    synthetic,
    tile,
    write_azure_csv,
)


def _write(path: Path, rows: list[tuple[str, int, int]]) -> Path:
    lines = ["TIMESTAMP,ContextTokens,GeneratedTokens"]
    lines += [f"{t},{c},{g}" for t, c, g in rows]
    path.write_text("\r\n".join(lines) + "\r\n")
    return path


def _workload(prompts: list[int]) -> Workload:
    n = len(prompts)
    return Workload(
        np.arange(n, dtype=np.float64), np.array(prompts, dtype=np.int64), np.ones(n, np.int64)
    )


def test_two_traces_merge_by_timestamp(tmp_path: Path) -> None:
    a = _write(
        tmp_path / "a.csv",
        [("2023-11-16 18:00:00.5000000", 10, 1), ("2023-11-16 18:00:02.0000000", 30, 3)],
    )
    b = _write(tmp_path / "b.csv", [("2023-11-16 18:00:01.2500000", 20, 2)])

    w = load_azure_traces([a, b])

    assert w.arrival_s.tolist() == pytest.approx([0.0, 0.75, 1.5])
    assert w.prompt_tokens.tolist() == [10, 20, 30]
    assert w.output_tokens.tolist() == [1, 2, 3]


def test_written_trace_reads_back_to_the_microsecond(tmp_path: Path) -> None:
    # Prepare
    w = Workload(
        np.array([0.0, 0.000001, 3.5, 7200.123456]),
        np.array([10, 5000, 20, 100000], dtype=np.int64),
        np.array([1, 2, 300, 4], dtype=np.int64),
    )

    # Execute
    write_azure_csv(w, tmp_path / "w.csv")
    back = load_azure_traces([tmp_path / "w.csv"])

    # Assert
    np.testing.assert_allclose(back.arrival_s, w.arrival_s, atol=1e-6, rtol=0)
    assert back.prompt_tokens.tolist() == w.prompt_tokens.tolist()
    assert back.output_tokens.tolist() == w.output_tokens.tolist()


def test_bad_row_names_file_and_line(tmp_path: Path) -> None:
    bad = _write(tmp_path / "bad.csv", [("2023-11-16 18:00:00.0", 10, 1), ("oops", 1, 1)])

    with pytest.raises(ValueError, match=r"bad.csv: line 3"):
        load_azure_traces([bad])


def test_azure_traces_load_with_expected_sizes() -> None:
    code = load_azure_traces([AZURE_TRACES[0]])
    both = load_azure_traces(list(AZURE_TRACES))

    assert len(code) == 8819
    assert len(both) == 8819 + 19366
    assert 3500 < both.duration_s < 3600
    assert int((both.prompt_tokens >= 4096).sum()) == 1241 + 416


def test_time_scale_and_rate() -> None:
    w = _workload([1, 2, 3, 4, 5])  # arrivals 0..4 s -> 1 rps

    assert scale_time(w, 2.0).arrival_s[-1] == 8.0
    assert set_rate(w, 4.0).rate_rps == pytest.approx(4.0)
    assert len(head(w, 3)) == 3
    with pytest.raises(ValueError, match="time_scale"):
        scale_time(w, 0.0)


def test_minmax_rescale_maps_long_prompts_linearly() -> None:
    w = _workload([100, 4096, 5000, 6000, 8096])

    out = rescale_long(w, 100_000, 500_000, "minmax")

    assert out.prompt_tokens.tolist() == [100, 100_000, 190_400, 290_400, 500_000]


def test_quantile_rescale_is_robust_to_one_outlier() -> None:
    w = _workload([4096, 4200, 4300, 4400, 100_000])

    minmax = rescale_long(w, 100_000, 500_000, "minmax").prompt_tokens
    quantile = rescale_long(w, 100_000, 500_000, "quantile").prompt_tokens

    assert minmax[:4].max() < 102_000  # squeezed by the outlier
    assert quantile.tolist() == [100_000, 200_000, 300_000, 400_000, 500_000]


def test_quantile_ties_share_their_mean_rank() -> None:
    w = _workload([5000, 5000, 6000])

    out = rescale_long(w, 100_000, 500_000, "quantile").prompt_tokens

    assert out.tolist() == [200_000, 200_000, 500_000]


def test_tile_multiplies_rate_and_keeps_mix() -> None:
    w = synthetic(SyntheticSpec(1000, 10.0, long_fraction=0.1), seed=1)

    big = tile(w, 5, seed=2)

    assert len(big) == 5000
    assert big.rate_rps == pytest.approx(5 * w.rate_rps, rel=0.05)
    assert sorted(big.prompt_tokens.tolist()) == sorted(np.tile(w.prompt_tokens, 5).tolist())


def test_synthetic_is_seeded_and_honours_the_spec() -> None:
    spec = SyntheticSpec(20_000, 50.0, long_fraction=0.2, burstiness_cv=1.0)

    a, b, c = synthetic(spec, 7), synthetic(spec, 7), synthetic(spec, 8)

    assert np.array_equal(a.arrival_s, b.arrival_s) and np.array_equal(
        a.prompt_tokens, b.prompt_tokens
    )
    assert not np.array_equal(a.arrival_s, c.arrival_s)
    assert a.rate_rps == pytest.approx(50.0, rel=0.05)
    assert float((a.prompt_tokens >= 100_000).mean()) == pytest.approx(0.2, abs=0.02)


def test_bursty_arrivals_have_the_requested_variability() -> None:
    w = synthetic(SyntheticSpec(20_000, 10.0, burstiness_cv=3.0), seed=3)

    gaps = np.diff(w.arrival_s)

    assert float(gaps.std() / gaps.mean()) == pytest.approx(3.0, rel=0.15)


def test_heavy_tail_is_seeded_and_has_the_stated_statistics() -> None:
    spec = HeavyTailSpec(20_000, 5.0, long_fraction=0.3, burstiness_cv=1.0)

    a, b, c = heavy_tail(spec, 7), heavy_tail(spec, 7), heavy_tail(spec, 8)

    assert all(np.array_equal(getattr(a, f), getattr(b, f)) for f in Workload.__slots__)
    assert not np.array_equal(a.prompt_tokens, c.prompt_tokens)
    assert a.rate_rps == pytest.approx(5.0, rel=0.05)
    is_long = a.prompt_tokens >= 4096
    assert float(is_long.mean()) == pytest.approx(0.3, abs=0.02)
    long_prompts, short_prompts = a.prompt_tokens[is_long], a.prompt_tokens[~is_long]
    assert float(np.median(long_prompts)) == pytest.approx(160_000, rel=0.05)
    assert float((long_prompts >= 100_000).mean()) == pytest.approx(0.78, abs=0.03)
    assert long_prompts.max() <= 500_000 and long_prompts.max() > 450_000  # the tail is there
    assert float(np.median(short_prompts)) == pytest.approx(700, rel=0.05)
    # The log of a log-normal is normal: its spread is the spec's sigma (truncation trims it).
    assert float(np.log(short_prompts).std()) == pytest.approx(1.0, rel=0.1)
    assert 1 <= a.output_tokens.min() and a.output_tokens.max() <= 4096


@pytest.mark.parametrize("cv", [1.0, 4.0])
def test_heavy_tail_arrivals_are_poisson_or_bursty(cv: float) -> None:
    w = heavy_tail(HeavyTailSpec(20_000, 2.0, long_fraction=0.05, burstiness_cv=cv), seed=1)

    gaps = np.diff(w.arrival_s)

    assert float(gaps.mean()) == pytest.approx(0.5, rel=0.08)
    assert float(gaps.std() / gaps.mean()) == pytest.approx(cv, rel=0.15)


def test_lognormal_rejects_an_empty_range() -> None:
    with pytest.raises(ValueError, match="LogNormal"):
        LogNormal(100, 1.0, 200, 300)
