"""End-to-end simulations through the real policies: determinism, every policy, the CLI."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from controlplane.core.config import SchedulerConfig
from pecsched.cli import main as pecsched_main
from sim.cost_model import CostModel
from sim.engine import ClusterSpec
from sim.hardware import GPUS, MODELS
from sim.runner import Outcome, run_policy
from sim.workloads import SyntheticSpec, Workload, synthetic

ALL_POLICIES = (
    "fifo",
    "reservation",
    "priority",
    "pecsched",
    "pecsched-no-preempt",
    "pecsched-no-disagg",
    "pecsched-no-coloc",
    "pecsched-ring",
)
COST = CostModel(MODELS["llama-3.2-1b"], GPUS["a100"])


def _workload(seed: int = 5, n: int = 400) -> Workload:
    spec = SyntheticSpec(
        n,
        rate_rps=20.0,
        long_fraction=0.05,
        long_prompt_tokens=(20_000, 80_000),
        short_prompt_tokens=(64, 2048),
        output_tokens=(1, 64),
        burstiness_cv=2.0,
    )
    return synthetic(spec, seed)


def _run(policy: str, seed: int = 0, log: bool = False) -> Outcome:
    config = SchedulerConfig(num_long_reserved_instances=2)
    return run_policy(_workload(), ClusterSpec(8, COST), policy, config, seed, log_decisions=log)


def test_same_seed_gives_identical_decisions_and_records() -> None:
    a, b = _run("pecsched", log=True), _run("pecsched", log=True)

    assert a.run.decisions == b.run.decisions
    assert len(a.run.decisions) > 400
    for field in ("first_scheduled_s", "first_token_s", "finished_s", "preemptions"):
        assert np.array_equal(getattr(a.run.records, field), getattr(b.run.records, field))
    assert a.result.summary == b.result.summary


@pytest.mark.parametrize("policy", ALL_POLICIES)
def test_every_policy_serves_every_request(policy: str) -> None:
    out = _run(policy)

    records = out.run.records
    assert not np.isnan(records.finished_s).any(), "some requests never finished"
    delays = records.first_scheduled_s - records.arrival_s
    assert (delays >= 0).all()
    assert (records.first_token_s >= records.first_scheduled_s).all()
    assert (records.finished_s >= records.first_token_s).all()
    assert 0.0 <= out.result.summary.gpu_idle_rate < 1.0
    assert out.result.summary.short.count + out.result.summary.long.count == 400


def test_pecsched_preempts_and_baselines_do_not() -> None:
    # An overloaded mix: long prefills alone need about twice the cluster.
    spec = SyntheticSpec(
        300,
        rate_rps=5.0,
        long_fraction=0.15,
        long_prompt_tokens=(150_000, 300_000),
        short_prompt_tokens=(64, 2048),
        output_tokens=(1, 32),
    )
    workload, cluster, config = synthetic(spec, 11), ClusterSpec(8, COST), SchedulerConfig()
    # preempting at once: with the default delay the decoder's colocation absorbs these shorts
    pec = run_policy(workload, cluster, "pecsched", replace(config, short_preempt_delay_s=0.0))
    fifo = run_policy(workload, cluster, "fifo", config)

    assert pec.result.summary.long.preemptions_total > 0
    assert fifo.result.summary.long.preemptions_total == 0
    short_p99 = pec.result.summary.short.queueing_delay_s["p99"]
    assert short_p99 < fifo.result.summary.short.queueing_delay_s["p99"]


def test_cli_writes_the_json_contract_and_a_plot(tmp_path: Path) -> None:
    trace = tmp_path / "trace.csv"
    rng = np.random.default_rng(0)
    rows = ["TIMESTAMP,ContextTokens,GeneratedTokens"]
    for i in range(200):
        prompt = int(rng.integers(5000, 8000)) if i % 25 == 0 else int(rng.integers(50, 3000))
        rows.append(
            f"2023-11-16 18:{i // 60:02d}:{i % 60:02d}.0000000,{prompt},{rng.integers(1, 50)}"
        )
    trace.write_text("\n".join(rows) + "\n")
    out_json, out_png = tmp_path / "r.json", tmp_path / "r.png"

    code = pecsched_main(
        [
            "sim",
            "--trace",
            str(trace),
            "--long-rescale",
            "20000:60000",
            "--time-scale",
            "0.5",
            "--gpus",
            "8",
            "--gpu",
            "h100",
            "--model",
            "llama-3.2-1b",
            "--policy",
            "all",
            "--json",
            str(out_json),
            "--plot",
            str(out_png),
        ]
    )

    assert code == 0
    data = json.loads(out_json.read_text())
    assert data["config"]["gpus"] == 8
    assert [r["policy"] for r in data["results"]] == ["fifo", "reservation", "priority", "pecsched"]
    for r in data["results"]:
        assert set(r["short"]["queueing_delay_s"]) == {"p1", "p25", "p50", "p75", "p99"}
        assert set(r["short"]["ttft_s"]) == {"p50", "p99"}
        assert r["short"]["count"] + r["long"]["count"] == 200
        for key in ("jct_mean_s", "jct_p99_s", "starvation_rate", "preemptions_total"):
            assert key in r["long"]
        for key in ("gpu_idle_rate", "makespan_s", "wall_s"):
            assert isinstance(r[key], float)
        assert isinstance(r["short"]["throughput_rps"], float)
    assert out_png.read_bytes()[:4] == b"\x89PNG"


def test_cli_rejects_unknown_model_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    trace = tmp_path / "t.csv"
    trace.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:00:00.0,10,1\n")

    code = pecsched_main(
        [
            "sim",
            "--trace",
            str(trace),
            "--gpus",
            "8",
            "--gpu",
            "a100",
            "--model",
            "gpt-9",
            "--policy",
            "fifo",
        ]
    )

    assert code == 2
    assert "gpt-9" in capsys.readouterr().err


def test_batch_window_merges_rounds_and_keeps_event_times() -> None:
    config = SchedulerConfig(num_long_reserved_instances=2)
    exact = run_policy(_workload(), ClusterSpec(8, COST), "pecsched", config, 0)
    windowed = run_policy(
        _workload(), ClusterSpec(8, COST), "pecsched", config, 0, batch_window_s=0.05
    )

    assert windowed.result.schedule_calls < exact.result.schedule_calls
    assert not np.isnan(windowed.run.records.finished_s).any()
    # Decisions wait at most one window per round, so delays grow only a little.
    exact_p50 = exact.result.summary.short.ttft_s["p50"]
    assert windowed.result.summary.short.ttft_s["p50"] == pytest.approx(exact_p50, abs=0.2)


@settings(max_examples=8, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    policy=st.sampled_from(ALL_POLICIES),
    gpus=st.sampled_from([2, 4, 8]),
    rate=st.floats(1.0, 40.0),
    long_fraction=st.floats(0.0, 0.3),
)
def test_engine_invariants_hold_for_random_workloads(
    seed: int, policy: str, gpus: int, rate: float, long_fraction: float
) -> None:
    spec = SyntheticSpec(
        120,
        rate_rps=rate,
        long_fraction=long_fraction,
        long_prompt_tokens=(10_000, 200_000),
        short_prompt_tokens=(16, 4000),
        output_tokens=(1, 100),
        burstiness_cv=2.0,
    )
    config = SchedulerConfig(num_long_reserved_instances=1)

    out = run_policy(synthetic(spec, seed), ClusterSpec(gpus, COST), policy, config, seed)

    r = out.run.records
    assert not np.isnan(r.finished_s).any()
    assert (r.first_scheduled_s >= r.arrival_s).all()
    assert (r.first_token_s > r.first_scheduled_s).all()  # every prefill takes time
    assert (r.finished_s >= r.first_token_s).all()
    assert 0.0 < out.run.busy_gpu_s <= gpus * out.run.end_s + 1e-6
    assert out.run.end_s == pytest.approx(float(r.finished_s.max()))


def test_cli_short_decode_instances_sets_the_pecsched_roles(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    trace = tmp_path / "t.csv"
    rows = ["TIMESTAMP,ContextTokens,GeneratedTokens"]
    rows += [f"2023-11-16 18:00:{i:02d}.0,{500 + 10 * i},{20}" for i in range(40)]
    trace.write_text("\n".join(rows) + "\n")
    base = ["sim", "--trace", str(trace), "--long-rescale", "none", "--gpus", "2"]
    base += ["--gpu", "h100", "--model", "llama-3-8b", "--tp", "1", "--policy", "pecsched"]
    out = tmp_path / "r.json"

    default_out = tmp_path / "default.json"

    ok = pecsched_main([*base, "--short-decode-instances", "1", "--json", str(out)])
    default = pecsched_main([*base, "--json", str(default_out)])
    bad = pecsched_main([*base, "--short-decode-instances", "-1"])

    # Assert: at 2 GPUs the paper's share gives no decoder; one decoder idles one GPU more
    assert ok == default == 0
    one_decoder, paper_share = (json.loads(p.read_text()) for p in (out, default_out))
    assert one_decoder["config"]["short_decode_instances"] == 1
    assert one_decoder["results"][0]["gpu_idle_rate"] > paper_share["results"][0]["gpu_idle_rate"]
    assert bad == 2 and "num_short_decode_instances" in capsys.readouterr().err


def test_cli_seeds_runs_each_policy_per_seed_with_the_new_metrics(tmp_path: Path) -> None:
    trace = tmp_path / "t.csv"
    rng = np.random.default_rng(1)
    rows = ["TIMESTAMP,ContextTokens,GeneratedTokens"]
    for i in range(120):
        prompt = int(rng.integers(5000, 8000)) if i % 20 == 0 else int(rng.integers(50, 3000))
        rows.append(f"2023-11-16 18:{i // 60:02d}:{i % 60:02d}.0,{prompt},{rng.integers(2, 60)}")
    trace.write_text("\n".join(rows) + "\n")
    base = ["sim", "--trace", str(trace), "--long-rescale", "20000:60000", "--time-scale", "0.2"]
    base += ["--gpus", "4", "--gpu", "a100", "--model", "llama-3.2-1b", "--policy"]
    many, one = tmp_path / "many.json", tmp_path / "one.json"

    code = pecsched_main([*base, "fifo,pecsched", "--seeds", "1,2,3", "--json", str(many)])
    single = pecsched_main([*base, "pecsched", "--seed", "2", "--json", str(one)])

    assert code == single == 0
    data = json.loads(many.read_text())
    assert data["config"]["seeds"] == [1, 2, 3]
    assert data["config"]["slo_ttft_s"] == 1.0 and data["config"]["slo_tbt_s"] == 0.1
    runs = [(r["policy"], r["seed"]) for r in data["results"]]
    assert runs == [(p, s) for p in ("fifo", "pecsched") for s in (1, 2, 3)]
    for r in data["results"]:
        assert 0.0 <= r["short"]["slo_attainment"] <= 1.0
        assert 0.0 < r["short"]["throughput_makespan_rps"] <= r["short"]["throughput_rps"]
    # The seed-2 run of a multi-seed call is the same run as a single --seed 2 call.
    alone = json.loads(one.read_text())["results"][0]
    assert alone["seed"] == 2
    together = data["results"][4]
    for key in ("short", "long", "preemptions_total", "gpu_idle_rate", "makespan_s"):
        assert together[key] == alone[key]


def test_cli_rejects_bad_seed_lists(capsys: pytest.CaptureFixture[str]) -> None:
    base = ["sim", "--gpus", "4", "--gpu", "a100", "--model", "llama-3.2-1b", "--policy", "fifo"]
    for bad in (["--seeds", "1,x"], ["--seeds", "1,1"], ["--seed", "1", "--seeds", "2,3"]):
        with pytest.raises(SystemExit):
            pecsched_main([*base, *bad])
    assert "--seeds" in capsys.readouterr().err


def test_cli_baseline_knobs_reach_sarathi_and_distserve(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare: a short trace with a few long prompts on 4 instances
    trace = tmp_path / "t.csv"
    rng = np.random.default_rng(3)
    rows = ["TIMESTAMP,ContextTokens,GeneratedTokens"]
    for i in range(80):
        prompt = int(rng.integers(5000, 8000)) if i % 10 == 0 else int(rng.integers(200, 3000))
        rows.append(f"2023-11-16 18:{i // 60:02d}:{i % 60:02d}.0,{prompt},{rng.integers(2, 40)}")
    trace.write_text("\n".join(rows) + "\n")
    base = ["sim", "--trace", str(trace), "--long-rescale", "20000:60000", "--time-scale", "0.1"]
    base += ["--gpus", "4", "--gpu", "a100", "--model", "llama-3.2-1b", "--jobs", "1"]
    base += ["--policy", "sarathi,distserve"]
    paths = {name: tmp_path / f"{name}.json" for name in ("default", "knobs")}
    knobs = ["--sarathi-batch-tokens", "256", "--distserve-decode-instances", "3"]

    # Execute
    default = pecsched_main([*base, "--json", str(paths["default"])])
    tuned = pecsched_main([*base, *knobs, "--json", str(paths["knobs"])])
    bad = pecsched_main([*base, "--distserve-decode-instances", "-1"])

    # Assert: both knobs change their policy's run and are recorded; a bad one names its field
    assert default == tuned == 0
    before, after = (json.loads(p.read_text()) for p in paths.values())
    assert after["config"]["baseline_knobs"] == {
        "sarathi_batch_tokens": 256,
        "distserve_decode_instances": 3,
    }
    assert before["config"]["baseline_knobs"] == {}
    for i in (0, 1):  # sarathi, distserve
        assert before["results"][i]["short"] != after["results"][i]["short"]
    assert bad == 2 and "distserve_decode_instances" in capsys.readouterr().err
