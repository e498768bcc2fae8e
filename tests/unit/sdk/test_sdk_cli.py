"""The client subcommands of `pecsched`, run in-process against the fake control plane."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import signal
import struct
import subprocess
import sys
import termios
import time

import pytest
from sdk_fake_control_plane import API_KEY, FakeControlPlane, output_tokens, token_text

from pecsched.cli import main
from protos.pecsched.v1 import common_pb2, inference_pb2


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_submit_json_waits_for_the_output(
    fake: FakeControlPlane, target: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare
    fake.api_key = API_KEY

    # Execute
    code, out, _ = run(
        capsys,
        "submit",
        "hello",
        "--max-tokens",
        "5",
        "--target",
        target,
        "--api-key",
        API_KEY,
        "--json",
    )

    # Assert
    expected = output_tokens(5, 5)
    assert code == 0
    assert json.loads(out) == {
        "request_id": "req-001",
        "token_ids": expected,
        "text": token_text(expected),
        "state": "finished",
        "error": "",
    }


def test_submit_token_ids_sends_the_sampling_flags(
    fake: FakeControlPlane, target: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(
        capsys,
        "submit",
        "--token-ids",
        "1,2,3",
        "--max-tokens",
        "2",
        "--temperature",
        "0.5",
        "--top-p",
        "0.75",
        "--seed",
        "3",
        "--priority",
        "2",
        "--tenant",
        "acme",
        "--no-wait",
        "--target",
        target,
    )

    sent = fake.calls_of("Submit")[0].request
    assert isinstance(sent, inference_pb2.SubmitRequest)
    assert list(sent.token_ids.ids) == [1, 2, 3] and sent.max_new_tokens == 2
    assert (sent.sampling.temperature, sent.sampling.top_p, sent.sampling.seed) == (0.5, 0.75, 3)
    assert (sent.priority, sent.tenant) == (2, "acme")
    assert code == 0 and out == "req-001\n"
    assert fake.calls_of("Generate") == []


def test_submit_prints_text_and_request_id(
    fake: FakeControlPlane, target: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(capsys, "submit", "abc", "--max-tokens", "4", "--target", target)

    expected = output_tokens(3, 4)
    assert code == 0
    assert out == f"{token_text(expected)}\nrequest req-001 finished, 4 tokens\n"


def test_status_and_cancel(
    fake: FakeControlPlane, target: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare
    request_id = fake.add_request(prompt_tokens=9, preemptions=1, instance_ids=["n0-gpu0"])

    # Execute
    status_code, status_out, _ = run(capsys, "status", request_id, "--target", target)
    json_code, json_out, _ = run(capsys, "status", request_id, "--target", target, "--json")
    cancel_code, cancel_out, _ = run(capsys, "cancel", request_id, "--target", target)

    # Assert
    assert status_code == json_code == cancel_code == 0
    assert "state            queued" in status_out
    assert "instances        n0-gpu0" in status_out
    info = json.loads(json_out)
    assert info["request_id"] == request_id and info["prompt_tokens"] == 9
    assert info["timestamps"]["arrival"] == "2023-11-14T22:13:20+00:00"
    assert info["timestamps"]["finished"] is None
    assert cancel_out == f"request {request_id} cancelled\n"
    assert fake.requests[request_id].state == common_pb2.REQUEST_STATE_CANCELLED


def test_list_filters_and_limit(
    fake: FakeControlPlane, target: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare
    ids = [fake.add_request(tenant="acme") for _ in range(5)]

    # Execute
    code, out, _ = run(
        capsys,
        "list",
        "--state",
        "queued",
        "--state",
        "paused",
        "--class",
        "short",
        "--tenant",
        "acme",
        "--limit",
        "3",
        "--json",
        "--target",
        target,
    )
    table_code, table_out, _ = run(capsys, "list", "--target", target)

    # Assert
    assert code == table_code == 0
    assert [r["request_id"] for r in json.loads(out)] == ids[::-1][:3]
    sent = fake.calls_of("List")[0].request
    assert isinstance(sent, inference_pb2.ListRequest)
    assert list(sent.states) == [common_pb2.REQUEST_STATE_QUEUED, common_pb2.REQUEST_STATE_PAUSED]
    assert sent.request_class == common_pb2.REQUEST_CLASS_SHORT and sent.tenant == "acme"
    lines = table_out.splitlines()
    assert lines[0].split()[:3] == ["REQUEST", "STATE", "CLASS"] and len(lines) == 6


def test_top_once_prints_one_snapshot(
    fake: FakeControlPlane, target: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(capsys, "top", "--once", "--interval-s", "0.01", "--target", target)
    json_code, json_out, _ = run(capsys, "top", "--once", "--json", "--target", target)

    assert code == json_code == 0
    assert "policy pecsched" in out and "preemptions 0" in out
    assert "short  4       512" in out
    assert "n0-gpu0   n0    general       up     1   1024/4096    req-long" in out
    snapshot = json.loads(json_out)
    assert snapshot["instances"][1]["role"] == "short_decode"
    assert snapshot["num_kv_transfers_total"] == 3


def test_errors_give_messages_and_exit_codes(
    fake: FakeControlPlane, target: str, capsys: pytest.CaptureFixture[str]
) -> None:
    fake.api_key = API_KEY

    auth_code, _, auth_err = run(capsys, "status", "req-001", "--target", target)
    both_code, _, both_err = run(
        capsys, "submit", "x", "--token-ids", "1", "--max-tokens", "1", "--target", target
    )
    bad_code, _, bad_err = run(
        capsys, "submit", "--token-ids", "1,x", "--max-tokens", "1", "--target", target
    )

    assert auth_code == 1 and "UNAUTHENTICATED" in auth_err
    assert both_code == 2 and "either as TEXT or as --token-ids" in both_err
    assert bad_code == 2 and "--token-ids must be comma-separated integers" in bad_err


def test_top_on_a_terminal_redraws_one_screen_in_place(target: str) -> None:
    # Prepare: `pecsched top` on a pseudo-terminal of 8 lines x 40 columns
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 8, 40, 0, 0))
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "pecsched", "top", "--interval-s", "0.05", "--target", target],
        stdin=follower, stdout=follower, stderr=subprocess.PIPE, env=env,
    )  # fmt: skip
    os.close(follower)

    # Execute: read until three frames were drawn, then Ctrl-C
    out = b""
    deadline = time.monotonic() + 60
    while out.count(b"\x1b[H") < 3 and time.monotonic() < deadline:
        out += os.read(leader, 65536)
    proc.send_signal(signal.SIGINT)
    code = proc.wait(timeout=30)
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # EIO: the terminal's other side is closed
            break
        if not chunk:
            break
        out += chunk
    os.close(leader)

    # Assert: alternate screen in and out, every frame drawn from the top-left corner and cut
    # to the terminal (the pty turns "\n" into "\r\n")
    text = out.decode()
    assert code == 0, proc.stderr.read() if proc.stderr else ""
    assert text.startswith("\x1b[?1049h\x1b[?25l") and text.endswith("\x1b[?25h\x1b[?1049l")
    frames = text.removesuffix("\x1b[?25h\x1b[?1049l").split("\x1b[H")[1:]
    assert len(frames) >= 3
    for frame in frames[:3]:
        rows = frame.replace("\x1b[K", "").replace("\x1b[J", "").split("\r\n")
        assert len(rows) == 8 and all(len(row) <= 40 for row in rows), rows
        assert rows[0].startswith("policy pecsched")
        assert rows[-1] == "... 3 more lines (enlarge the terminal)"
