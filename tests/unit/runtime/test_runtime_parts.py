"""Runtime building blocks: token logs, agent registry, metrics text, config loading."""

from __future__ import annotations

import pytest

from controlplane.config import Config, TextTokenizer, load_config
from controlplane.core.types import SpKind
from controlplane.runtime.agents import AgentRegistry, Registration
from controlplane.runtime.errors import RuntimeServiceError
from controlplane.runtime.metrics import Metrics
from controlplane.runtime.tokens import TokenLog


def test_token_log_skips_repeats_refuses_gaps_and_caps_at_max():
    log = TokenLog([], max_new_tokens=5)
    assert log.accept(0, (1, 2)) == (1, 2)
    assert log.accept(1, (2, 3)) == (3,)  # index 1 repeated, 3 is new
    assert log.accept(5, (9,)) == ()  # gap: nothing stored
    assert log.accept(3, (4, 5, 6, 7)) == (4, 5)  # capped at max_new_tokens
    assert log.ids == [1, 2, 3, 4, 5] and log.committed == 0
    log.publish()
    assert log.committed == 5


def _reg(node: str, *instances: str, model: str = "tiny") -> Registration:
    return Registration(node, model, instances, "", ())


def test_registry_refuses_conflicts_and_replaces_a_reconnecting_node():
    registry = AgentRegistry(model=None)
    first, leave = registry.attach(_reg("n1", "a", "b"), 0.0)
    assert leave is None and registry.model == "tiny"
    with pytest.raises(RuntimeServiceError):
        registry.attach(_reg("n2", "b"), 0.0)  # b belongs to live n1
    with pytest.raises(RuntimeServiceError):
        registry.attach(_reg("n3", "c", model="other"), 0.0)
    second, leave = registry.attach(_reg("n1", "a"), 1.0)
    assert leave is not None and leave.instance_ids == ("a", "b") and not first.is_live
    assert registry.lose(first, "again") is None  # idempotent
    assert registry.expired(1.5, 0.2) == [] and registry.expired(1.7, 0.2) == [second]
    assert second.accept_seq(1) and not second.accept_seq(1) and second.accept_seq(0)


def test_metrics_render_prometheus_text():
    metrics = Metrics()
    metrics.queue_depth.set(3, request_class="short")
    metrics.ttft.observe(0.02, request_class="short")
    metrics.busy.inc(1.5, instance='a"b')
    text = metrics.render()
    assert 'pecsched_queue_depth{request_class="short"} 3' in text
    assert 'pecsched_ttft_seconds_bucket{request_class="short",le="0.025"} 1' in text
    assert 'pecsched_ttft_seconds_bucket{request_class="short",le="+Inf"} 1' in text
    assert 'pecsched_instance_busy_seconds_total{instance="a\\"b"} 1.5' in text
    assert "# TYPE pecsched_jct_seconds histogram" in text


def test_config_precedence_file_env_flags(tmp_path):
    file = tmp_path / "cp.toml"
    file.write_text(
        'policy = "fifo"\nmax_active_requests = 10\n[scheduler]\nsp_kind = "ring"\nchunk_tokens = 64\n'
    )
    env = {
        "PECSCHED_MAX_ACTIVE_REQUESTS": "20",
        "PECSCHED_AUTH_ENABLED": "false",
        "PECSCHED_TEXT_TOKENIZER": "none",
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://jaeger:4317",
    }
    config = load_config(file=file, env=env, overrides={"policy": "pecsched", "listen": None})
    assert config.policy == "pecsched" and config.max_active_requests == 20
    assert config.auth_enabled is False and config.text_tokenizer is TextTokenizer.NONE
    assert config.otlp_endpoint == "http://jaeger:4317"
    assert config.scheduler.sp_kind is SpKind.RING and config.scheduler.chunk_tokens == 64
    assert config.listen == Config().listen


@pytest.mark.parametrize(
    ("env", "field"),
    [
        ({"PECSCHED_HEARTBEAT_INTERVAL_S": "0"}, "heartbeat_interval_s"),
        ({"PECSCHED_MAX_ACTIVE_REQUESTS": "many"}, "max_active_requests"),
        ({"PECSCHED_LISTEN": "nowhere"}, "listen"),
    ],
)
def test_config_errors_name_the_field(env, field):
    with pytest.raises(ValueError, match=field):
        load_config(env=env)


def test_config_refuses_unknown_keys(tmp_path):
    file = tmp_path / "cp.toml"
    file.write_text("polcy = 'fifo'\n")
    with pytest.raises(ValueError, match="polcy"):
        load_config(file=file)
