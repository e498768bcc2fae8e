"""Paper-style figures: short queueing delay boxes, short throughput and long JCT bars."""

from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from sim.report import PolicyResult  # noqa: E402

_FLOOR_S = 1e-4  # log axes cannot show 0: delays below this are drawn at it


def _box(result: PolicyResult) -> dict[str, float | str]:
    q = result.summary.short.queueing_delay_s
    return {
        "label": result.policy,
        "whislo": max(q["p1"], _FLOOR_S),
        "q1": max(q["p25"], _FLOOR_S),
        "med": max(q["p50"], _FLOOR_S),
        "q3": max(q["p75"], _FLOOR_S),
        "whishi": max(q["p99"], _FLOOR_S),
    }


def plot_results(results: list[PolicyResult], path: str | Path, title: str) -> None:
    """Write a PNG: box plot of short queueing delay (whiskers p1/p99, box p25/p75, line p50),
    short throughput and long mean JCT, one entry per policy."""
    names = [r.policy for r in results]
    fig, axes = plt.subplots(1, 3, figsize=(max(11.0, 1.1 * len(results) * 3), 3.8))
    box_ax, rps_ax, jct_ax = axes
    box_ax.bxp([_box(r) for r in results], showfliers=False)
    box_ax.set_yscale("log")
    box_ax.set_ylabel("short queueing delay (s)")
    box_ax.set_title("short queueing delay\n(whiskers p1/p99)", fontsize=9)
    rps_ax.bar(names, [r.summary.short.throughput_rps for r in results], color="tab:green")
    rps_ax.set_ylabel("short throughput (req/s)")
    rps_ax.set_title("short throughput", fontsize=9)
    jct_ax.bar(names, [r.summary.long.jct_mean_s for r in results], color="tab:orange")
    jct_ax.set_ylabel("long mean JCT (s)")
    jct_ax.set_title("long mean JCT", fontsize=9)
    for ax in axes:
        ax.tick_params(axis="x", labelrotation=35, labelsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


_PANELS = (  # key, y label, log scale
    ("qd", "short p99 queueing delay (s)", True),
    ("slo", "short SLO attainment", False),
    ("jct", "long mean JCT / FIFO's", False),
)


def plot_load_curves(
    curves: dict[str, dict[str, list[tuple[float, list[float]]]]], path: str | Path, title: str
) -> None:
    """Write a PNG of three panels against offered load (keys "qd", "slo", "jct" of each
    policy's curves: (load, one value per seed) pairs): median points joined by lines, bars
    from the smallest to the largest seed's value."""
    fig, axes = plt.subplots(1, 3, figsize=(13.0, 3.8))
    for ax, (key, label, log) in zip(axes, _PANELS, strict=True):
        floor = _FLOOR_S if log else -np.inf  # log axes cannot show 0
        for policy, series in curves.items():
            points = sorted(series[key])
            loads = [load for load, _ in points]
            values = [np.maximum(np.array(v, dtype=np.float64), floor) for _, v in points]
            mid = np.array([np.median(v) for v in values])
            lo = mid - np.array([v.min() for v in values])
            hi = np.array([v.max() for v in values]) - mid
            ax.errorbar(loads, mid, yerr=[lo, hi], marker="o", capsize=3, label=policy)
        if log:
            ax.set_yscale("log")
        ax.set_xlabel("offered prefill load")
        ax.set_ylabel(label)
    axes[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
