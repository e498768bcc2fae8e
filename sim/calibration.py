"""Fit the cost model's efficiency factors to measured iteration times and report the error.

Calibration file (JSON), e.g. written by the data-plane benchmark on a real GPU::

    {"gpu": "h100", "model": "llama-3-8b",
     "prefill": [{"tokens": 2048, "context_tokens": 0, "time_s": 0.051}, ...],
     "decode":  [{"batch": 32, "context_tokens": 65536, "time_s": 0.012}, ...]}

`decode.context_tokens` is each sequence's cached tokens (every sequence of the batch holds
that many), as `bench/engine_gpu.py` measures it. The fit searches `mfu`, `bw_eff`
and `overhead_s` on a grid (log-spaced fractions, linear overhead) for the least mean squared
*relative* error, so short and long iterations weigh the same; the cost model's `max(compute,
memory)` makes the problem non-smooth, which a grid handles exactly.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sim.cost_model import CostModel, Efficiency


@dataclass(frozen=True, slots=True)
class CalibrationPoint:
    """One measured iteration."""

    kind: str  # "prefill" or "decode"
    tokens: int  # prefill chunk tokens, or decode batch size
    context_tokens: int  # cached tokens before the chunk / of each decoding sequence
    time_s: float  # measured wall time of the iteration


@dataclass(frozen=True, slots=True)
class Calibration:
    """Measured points for one (gpu, model)."""

    gpu: str
    model: str
    points: tuple[CalibrationPoint, ...]


@dataclass(frozen=True, slots=True)
class CalibrationError:
    """The model's error against the points: relative error (predicted / measured − 1)."""

    mean_abs_rel: float  # mean |relative error|
    max_abs_rel: float  # worst |relative error|
    per_point: tuple[float, ...]  # signed relative error, in the order of the points


def load_calibration(path: str | Path) -> Calibration:
    """Read a calibration JSON; ValueError names the missing or bad field."""
    raw = json.loads(Path(path).read_text())
    if not isinstance(raw, dict):
        raise ValueError(f"calibration {path}: top level must be an object")
    points: list[CalibrationPoint] = []
    for kind, size_key in (("prefill", "tokens"), ("decode", "batch")):
        for i, item in enumerate(raw.get(kind, [])):
            try:
                point = CalibrationPoint(
                    kind,
                    int(item[size_key]),
                    int(item["context_tokens"]),
                    float(item["time_s"]),
                )
            except (KeyError, TypeError, ValueError) as exc:
                raise ValueError(
                    f"calibration {path}: {kind}[{i}] needs {size_key}, "
                    f"context_tokens, time_s ({exc})"
                ) from None
            if point.time_s <= 0 or point.tokens <= 0 or point.context_tokens < 0:
                raise ValueError(f"calibration {path}: {kind}[{i}] has non-positive values")
            points.append(point)
    for key in ("gpu", "model"):
        if not isinstance(raw.get(key), str):
            raise ValueError(f"calibration {path}: field {key!r} must be a string")
    if not points:
        raise ValueError(f"calibration {path}: no prefill or decode points")
    return Calibration(str(raw["gpu"]), str(raw["model"]), tuple(points))


def predict_s(cost: CostModel, point: CalibrationPoint) -> float:
    """The cost model's time for the iteration `point` measured."""
    if point.kind == "prefill":
        return cost.prefill_s(point.tokens, point.context_tokens)
    return cost.decode_s(point.tokens, point.tokens * point.context_tokens)


def calibration_error(cost: CostModel, calibration: Calibration) -> CalibrationError:
    """Relative error of `cost` against every measured point."""
    rel = tuple(predict_s(cost, p) / p.time_s - 1.0 for p in calibration.points)
    absolute = [abs(r) for r in rel]
    return CalibrationError(float(np.mean(absolute)), float(max(absolute)), rel)


def fit_efficiency(cost: CostModel, calibration: Calibration) -> Efficiency:
    """Efficiency factors minimising the mean squared relative error over the points.

    Compute and memory parts scale as 1/mfu and 1/bw_eff, so each point's roofline terms are
    evaluated once at mfu = bw_eff = 1 and the grid is a broadcast over the factors.
    """
    unit = cost.with_efficiency(Efficiency(1.0, 1.0, 0.0, cost.efficiency.comm_eff))
    compute = np.empty(len(calibration.points))
    memory = np.empty(len(calibration.points))
    fixed = np.empty(len(calibration.points))  # tensor-parallel all-reduce, efficiency-free
    for i, p in enumerate(calibration.points):
        new, pairs, ctx, seqs = _iteration_terms(p)
        compute[i] = unit.flops(new, pairs, seqs) / (cost.tp * cost.gpu.peak_flops)
        memory[i] = unit.hbm_bytes(new, ctx) / (cost.tp * cost.gpu.hbm_bytes_per_s)
        fixed[i] = unit.allreduce_s(new)
    measured = np.array([p.time_s for p in calibration.points])
    mfus = np.geomspace(0.02, 1.0, 120)
    bws = np.geomspace(0.02, 1.0, 120)
    overheads = np.linspace(0.0, float(measured.min()), 60)
    best = (np.inf, Efficiency())
    for overhead in overheads:
        pred = (
            np.maximum(
                compute[None, None, :] / mfus[:, None, None],
                memory[None, None, :] / bws[None, :, None],
            )
            + fixed
            + overhead
        )
        err = np.mean((pred / measured - 1.0) ** 2, axis=2)
        mi, bj = np.unravel_index(int(np.argmin(err)), err.shape)
        if err[mi, bj] < best[0]:
            eff = Efficiency(
                float(mfus[mi]), float(bws[bj]), float(overhead), cost.efficiency.comm_eff
            )
            best = (float(err[mi, bj]), eff)
    return best[1]


def _iteration_terms(p: CalibrationPoint) -> tuple[int, float, float, int]:
    """(new tokens, attention pairs, cached tokens read, logit rows) of a measured point."""
    if p.kind == "prefill":
        pairs = p.tokens * p.context_tokens + p.tokens * (p.tokens + 1) / 2.0
        return p.tokens, pairs, float(p.context_tokens), 1
    cached = float(p.tokens * p.context_tokens)
    return p.tokens, cached + p.tokens, cached, p.tokens
