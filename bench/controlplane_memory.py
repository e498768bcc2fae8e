"""Memory the control plane holds per queued prompt token.

Starts `python -m controlplane` (SQLite, no auth, no agents: every request stays queued),
submits `--requests` prompts of `--prompt-tokens` token ids one after the other, and prints the
server's resident set size before and after, and the bytes per queued prompt token. With
`--baseline-tree DIR` the same is measured, in the same run, for the control plane of another
source tree (e.g. an export of an earlier commit: `git archive REV | tar -x -C DIR`).

    python3 bench/controlplane_memory.py --requests 20 --prompt-tokens 500000 \
        --baseline-tree /tmp/pecsched-base
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from protos.pecsched.v1 import inference_pb2, inference_pb2_grpc  # noqa: E402


def rss_bytes(pid: int) -> int:
    """Resident set size of a process (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def measure(tree: Path, num_requests: int, prompt_tokens: int) -> tuple[int, int]:
    """(RSS before, RSS after) the submits, for the control plane of `tree`."""
    with tempfile.TemporaryDirectory() as tmp:
        db = f"sqlite:///{tmp}/bench.db"
        env = {**os.environ, "PYTHONPATH": str(tree)}
        py = sys.executable
        subprocess.run([py, "-m", "pecsched.cli", "db", "upgrade", "--db", db], env=env,
                       cwd=tree, check=True, capture_output=True)  # fmt: skip
        server = subprocess.Popen(
            [py, "-m", "controlplane", "--db", db, "--no-auth", "--listen", "127.0.0.1:0",
             "--log-level", "WARNING"],
            env=env, cwd=tree, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            assert server.stdout is not None
            line = server.stdout.readline()
            target = line.strip().rsplit(" ", 1)[-1]
            channel = grpc.insecure_channel(
                target, options=[("grpc.max_send_message_length", 64 * 2**20)]
            )
            stub = inference_pb2_grpc.InferenceStub(channel)
            stub.Submit(_request(list(range(1, 9))), timeout=60)  # warm up
            time.sleep(0.5)
            before = rss_bytes(server.pid)
            for i in range(num_requests):
                ids = [(i * 7919 + j) % 100_000 + 300 for j in range(prompt_tokens)]
                stub.Submit(_request(ids), timeout=120)
            time.sleep(0.5)
            after = rss_bytes(server.pid)
            channel.close()
            return before, after
        finally:
            server.terminate()
            server.wait(30)


def _request(ids: list[int]) -> inference_pb2.SubmitRequest:
    return inference_pb2.SubmitRequest(token_ids=inference_pb2.TokenIds(ids=ids), max_new_tokens=16)


def main() -> None:
    """Measure and print the table."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--prompt-tokens", type=int, default=500_000)
    parser.add_argument("--baseline-tree", type=Path, help="source tree measured as the baseline")
    args = parser.parse_args()
    trees = [("this tree", ROOT)]
    if args.baseline_tree is not None:
        trees.append(("baseline", args.baseline_tree.resolve()))
    tokens = args.requests * args.prompt_tokens
    print(f"{args.requests} queued prompts x {args.prompt_tokens:,} tokens ({tokens:,} tokens)")
    print("| code | RSS before | RSS after | bytes per queued prompt token |")
    print("|---|---:|---:|---:|")
    for name, tree in trees:
        before, after = measure(tree, args.requests, args.prompt_tokens)
        print(
            f"| {name} | {before / 2**20:,.0f} MiB | {after / 2**20:,.0f} MiB "
            f"| {(after - before) / tokens:.1f} |"
        )


if __name__ == "__main__":
    main()
