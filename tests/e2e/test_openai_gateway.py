"""The OpenAI-compatible endpoint end to end: the official `openai` client against `pecsched
gateway` in front of a real control plane and agent serving an exported tiny model directory
that carries its own tokenizer and chat template (tests/tokenizer_dir.py).

The oracle: transformers' greedy tokens on the same weights (the `reference` fixture), decoded
by transformers' tokenizer on the same directory.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from e2e_cluster import Cluster, Reference, start_cluster
from tokenizer_dir import write_chat_tokenizer
from transformers import AutoTokenizer
from waiting import wait_until

from pecsched.cluster import AgentSpec, free_port
from sdk.types import RequestInfo, RequestState

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

MODEL = "tiny-chat"  # the gateway's model id (e2e_cluster.start_cluster)
CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Schedule the short requests first, please."},
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory, reference: Reference) -> Path:
    """The reference's exported tiny weights with a trained tokenizer beside them."""
    directory = tmp_path_factory.mktemp("tiny-chat")
    for name in ("config.json", "model.safetensors"):
        shutil.copy(reference.directory / name, directory / name)
    return write_chat_tokenizer(directory)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Iterator[Cluster]:
    """Control plane (auth on, the model's tokenizer), one agent of 2 workers, the gateway."""
    agent = AgentSpec("node-a", ("general", "short_decode"), str(model_dir), "cpu", "4096", 0)
    started = start_cluster(
        tmp_path_factory.mktemp("gateway-cluster"),
        (agent,),
        tokenizer_dir=str(model_dir),
        http_port=free_port(),
    )
    yield started
    started.local.stop()


def _openai(cluster: Cluster, api_key: str | None = None, timeout_s: float = 60.0) -> openai.OpenAI:
    port = cluster.local.spec.http_port
    return openai.OpenAI(
        base_url=f"http://127.0.0.1:{port}/v1",
        api_key=api_key or cluster.client_key,
        max_retries=0,
        timeout=timeout_s,
    )


def _expected_text(reference: Reference, model_dir: Path, ids: list[int], n: int) -> str:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return tokenizer.decode(reference.greedy(ids, n), skip_special_tokens=True)


def test_completions_whole_and_streamed_equal_greedy_text(cluster, reference, model_dir):
    # Prepare
    client = _openai(cluster)
    prompt = "The quick brown fox"
    prompt_ids = AutoTokenizer.from_pretrained(model_dir).encode(prompt)
    expected = _expected_text(reference, model_dir, prompt_ids, 12)
    # Execute
    models = [m.id for m in client.models.list()]
    whole = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0)
    chunks = list(
        client.completions.create(
            model=MODEL,
            prompt=prompt,
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    # Assert
    assert models == [MODEL]
    assert whole.choices[0].text == expected and whole.choices[0].finish_reason == "length"
    assert whole.usage is not None
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (len(prompt_ids), 12)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens == len(prompt_ids) + 12
    with cluster.admin_client() as admin:
        info = admin.get(whole.id.removeprefix("cmpl-"))
    assert info.tenant == "e2e" and info.state is RequestState.FINISHED  # the key's tenant


def test_chat_completions_apply_the_template_and_stream(cluster, reference, model_dir):
    # Prepare
    client = _openai(cluster)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    chat_ids = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, return_dict=False)
    expected = _expected_text(reference, model_dir, list(chat_ids), 10)
    # Execute
    whole = client.chat.completions.create(
        model=MODEL, messages=CHAT, max_tokens=10, temperature=0, seed=1
    )
    stream = client.chat.completions.create(
        model=MODEL, messages=CHAT, max_completion_tokens=10, temperature=0, stream=True
    )
    deltas = [c.choices[0].delta for c in stream]
    # Assert
    assert whole.choices[0].message.role == "assistant"
    assert whole.choices[0].message.content == expected
    assert whole.usage is not None and whole.usage.prompt_tokens == len(chat_ids)
    assert deltas[0].role == "assistant"
    assert "".join(d.content or "" for d in deltas) == expected


def test_stop_strings_end_the_text_and_the_request(cluster, reference, model_dir):
    # Prepare: a stop string taken from the middle of the greedy text
    client = _openai(cluster)
    prompt = "Hello world"
    ids = AutoTokenizer.from_pretrained(model_dir).encode(prompt)
    full = _expected_text(reference, model_dir, ids, 24)
    stop = full[8:11]
    assert len(stop) == 3 and stop.strip(), full
    # Execute
    whole = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=24, temperature=0, stop=[stop]
    )
    streamed = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=24, temperature=0, stop=stop, stream=True
    )
    chunks = [c.choices[0] for c in streamed]
    # Assert
    assert whole.choices[0].text == full[: full.index(stop)]
    assert whole.choices[0].finish_reason == "stop"
    assert "".join(c.text for c in chunks) == full[: full.index(stop)]
    assert chunks[-1].finish_reason == "stop"


def test_errors_have_openai_shapes_and_codes(cluster):
    # Prepare
    client = _openai(cluster)
    # Execute / Assert
    with pytest.raises(openai.NotFoundError) as unknown:
        client.completions.create(model="gpt-4", prompt="hi", max_tokens=2)
    assert unknown.value.code == "model_not_found" and unknown.value.param == "model"
    with pytest.raises(openai.AuthenticationError):
        _openai(cluster, api_key="not-a-key").completions.create(
            model=MODEL, prompt="hi", max_tokens=2
        )
    with pytest.raises(openai.BadRequestError) as two:
        client.completions.create(model=MODEL, prompt="hi", max_tokens=2, n=2)
    assert two.value.param == "n"
    with pytest.raises(openai.BadRequestError) as too_many:
        client.completions.create(model=MODEL, prompt="hi", max_tokens=10**6)
    assert too_many.value.param == "max_tokens"
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "assistant", "content": "me first"}], max_tokens=2
        )
    assert refused.value.param == "messages" and "alternate" in refused.value.message


def _wait_cancelled(cluster: Cluster, request_id: str) -> None:
    with cluster.admin_client() as admin:

        def ended() -> RequestInfo | None:
            info = admin.get(request_id)
            return info if info.state.is_terminal else None

        info = wait_until(ended, f"{request_id} cancelled", 30)
        assert info.state is RequestState.CANCELLED, info


def test_disconnected_callers_have_their_requests_cancelled(cluster):
    # Prepare: outputs far longer than the time the callers wait
    streaming, patient = _openai(cluster), _openai(cluster, timeout_s=1.0)
    # Execute: a stream closed after its first chunk; a whole completion that times out
    stream = streaming.completions.create(
        model=MODEL, prompt="Hello", max_tokens=3000, temperature=0, stream=True
    )
    first = next(iter(stream))
    stream.close()
    with pytest.raises(openai.APITimeoutError):
        patient.completions.create(model=MODEL, prompt="Bye", max_tokens=3000, temperature=0)
    # Assert: both requests end CANCELLED on the cluster
    _wait_cancelled(cluster, first.id.removeprefix("cmpl-"))
    with cluster.admin_client() as admin:
        newest = next(iter(admin.list_requests(limit=1)))
    _wait_cancelled(cluster, newest.request_id)
