"""Cost-model formulas on known shapes, and the calibration fit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sim.calibration import calibration_error, fit_efficiency, load_calibration
from sim.cost_model import CostModel, Efficiency, causal_pairs
from sim.hardware import GPUS, MODELS, model_shape


def test_kv_bytes_per_token_of_llama_3_8b() -> None:
    # 2 (K,V) * 32 layers * 8 kv heads * 128 head dim * 2 bytes
    assert MODELS["llama-3-8b"].kv_bytes_per_token == 2 * 32 * 8 * 128 * 2 == 131072


@pytest.mark.parametrize(
    ("name", "billions"),
    [
        ("mistral-7b", 7.24),
        ("llama-3-8b", 8.03),
        ("llama-3.1-70b", 70.55),
        ("yi-34b", 34.39),
        ("phi-3-14b", 13.96),
        ("llama-3.2-1b", 1.24),
    ],
)
def test_parameter_counts_match_published_sizes(name: str, billions: float) -> None:
    assert MODELS[name].num_params / 1e9 == pytest.approx(billions, abs=0.01)


def test_causal_pairs_counts_every_query_key_pair() -> None:
    # 3 new tokens after 2 cached: they see 3, 4 and 5 keys.
    assert causal_pairs(3, 2) == 3 + 4 + 5
    assert causal_pairs(1, 0) == 1


def test_prefill_flops_linear_plus_quadratic_attention() -> None:
    cost = CostModel(MODELS["llama-3-8b"], GPUS["a100"])
    m = cost.model
    lm_head = m.vocab_size * m.hidden_size
    tokens = 1000

    flops = cost.flops(tokens, causal_pairs(tokens, 0), 1)

    linear = 2 * (m.matmul_params - lm_head) * tokens + 2 * lm_head
    attention = 4 * 32 * 32 * 128 * tokens * (tokens + 1) / 2
    assert flops == pytest.approx(linear + attention)


def test_long_prefill_is_compute_bound_and_decode_memory_bound() -> None:
    eff = Efficiency(mfu=0.5, bw_eff=0.5, overhead_s=0.0)
    cost = CostModel(MODELS["mistral-7b"], GPUS["a100"], efficiency=eff)
    tokens = 8192

    prefill = cost.prefill_s(tokens)
    decode = cost.decode_s(1, 1000)

    expected_prefill = cost.flops(tokens, causal_pairs(tokens, 0), 1) / (312e12 * 0.5)
    assert prefill == pytest.approx(expected_prefill)
    expected_decode = cost.hbm_bytes(1, 1000) / (2.0e12 * 0.5)
    assert decode == pytest.approx(expected_decode)


def test_prefill_grows_quadratically_at_long_context() -> None:
    cost = CostModel(MODELS["mistral-7b"], GPUS["a100"])

    ratio = cost.prefill_s(400_000) / cost.prefill_s(200_000)

    assert 3.0 < ratio < 4.0  # linear part alone would give 2, attention alone 4


def test_tensor_parallel_divides_work_and_adds_allreduce() -> None:
    eff = Efficiency(overhead_s=0.0)
    one = CostModel(MODELS["llama-3.1-70b"], GPUS["a100"], tp=2, efficiency=eff)
    four = CostModel(MODELS["llama-3.1-70b"], GPUS["a100"], tp=4, efficiency=eff)

    t2, t4 = one.prefill_s(4096), four.prefill_s(4096)

    assert four.allreduce_s(4096) > 0
    assert t4 == pytest.approx(t2 / 2 + four.allreduce_s(4096) - one.allreduce_s(4096) / 2)


def test_kv_capacity_is_free_memory_over_bytes_per_token() -> None:
    cost = CostModel(MODELS["llama-3-8b"], GPUS["h100"], memory_utilization=0.9)

    expected = (80e9 * 0.9 - MODELS["llama-3-8b"].weight_bytes) // 131072
    assert cost.kv_capacity_tokens == expected


def test_model_that_does_not_fit_is_rejected() -> None:
    with pytest.raises(ValueError, match="does not fit"):
        CostModel(MODELS["llama-3.1-70b"], GPUS["a100"], tp=1)


def test_ulysses_beats_ring_and_sp_speeds_up_long_prefill() -> None:
    cost = CostModel(MODELS["mistral-7b"], GPUS["a100"])

    alone = cost.sp_prefill_s(300_000, 0, 1)
    ulysses = cost.sp_prefill_s(300_000, 0, 4, "ulysses")
    ring = cost.sp_prefill_s(300_000, 0, 4, "ring")

    assert alone / ulysses > 3.5
    assert ring > ulysses


def test_ulysses_all_to_all_volume_formula() -> None:
    eff = Efficiency(overhead_s=0.0, comm_eff=1.0)
    cost = CostModel(MODELS["mistral-7b"], GPUS["a100"], efficiency=eff)
    m, k, tokens = cost.model, 2, 8192

    comm = cost.sp_prefill_s(tokens, 0, k, cross_node=True) - cost._roofline_s(
        cost.flops(tokens // k, 0, 1) + 4 * 32 * 32 * 128 * causal_pairs(tokens, 0) / k,
        cost.hbm_bytes(tokens // k, 0),
    )

    a2a_bytes = tokens / k * (2 * 32 + 2 * 8) * 128 * 2 * (k - 1) / k
    expected = m.num_layers * (a2a_bytes / 25e9 + 2 * 2e-5)
    assert comm == pytest.approx(expected)


def test_kv_transfer_time_is_bytes_over_link() -> None:
    eff = Efficiency(comm_eff=1.0)
    cost = CostModel(model_shape("llama-3-8b"), GPUS["a100"], efficiency=eff)

    assert cost.kv_transfer_s(1000, cross_node=True) == pytest.approx(131072e3 / 25e9 + 2e-5)
    assert cost.kv_transfer_s(1000, cross_node=False) == pytest.approx(131072e3 / 600e9 + 8e-6)


def test_unknown_model_lists_supported_names() -> None:
    with pytest.raises(KeyError, match="mistral-7b"):
        model_shape("gpt-9")


def test_calibration_fit_recovers_known_efficiencies(tmp_path: Path) -> None:
    truth = Efficiency(mfu=0.41, bw_eff=0.63, overhead_s=0.002)
    cost = CostModel(MODELS["llama-3-8b"], GPUS["h100"], efficiency=truth)
    data = {
        "gpu": "h100",
        "model": "llama-3-8b",
        "prefill": [
            {"tokens": t, "context_tokens": c, "time_s": cost.prefill_s(t, c)}
            for t, c in [(512, 0), (2048, 0), (8192, 0), (4096, 16384)]
        ],
        "decode": [
            {"batch": b, "context_tokens": c, "time_s": cost.decode_s(b, b * c)}
            for b, c in [(1, 1000), (16, 2000), (64, 3000)]
        ],
    }
    path = tmp_path / "cal.json"
    path.write_text(json.dumps(data))
    calibration = load_calibration(path)
    default = CostModel(MODELS["llama-3-8b"], GPUS["h100"])

    fitted = default.with_efficiency(fit_efficiency(default, calibration))

    assert calibration_error(fitted, calibration).mean_abs_rel < 0.03
    assert calibration_error(default, calibration).mean_abs_rel > 0.05


def test_calibration_with_missing_field_names_it(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"gpu": "h100", "model": "x", "decode": [{"batch": 1}]}))

    with pytest.raises(ValueError, match=r"decode\[0\]"):
        load_calibration(path)
