"""`pecsched agent`: run this node's agent (workers + Attach stream to the control plane).

Only argparse is imported here; torch and grpc load inside the handler.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any


def register(subparsers: Any) -> None:
    """Add `agent` to the `pecsched` command."""
    p = subparsers.add_parser(
        "agent", help="run a node agent: one worker process per GPU (or CPU slot)"
    )
    p.add_argument("--controlplane", required=True, help="control plane address host:port")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="worker device")
    p.add_argument("--workers", type=int, default=1, help="worker processes (instances, tp=1)")
    p.add_argument("--model", required=True, help="preset name or local HF model directory")
    p.add_argument("--roles", help="comma-separated role per worker: general|short_decode|...")
    p.add_argument(
        "--kv-budget",
        help="KV pool per worker: TOKENS or a size like 512MiB "
        "(default: 4096 tokens on cpu, free memory on cuda)",
    )
    p.add_argument("--node-id", help="this node's id (default: the host name)")
    p.add_argument(
        "--api-key",
        help="API key for the control plane (visible in the process list: prefer "
        "--api-key-file or PECSCHED_AGENT_API_KEY)",
    )
    p.add_argument("--api-key-file", metavar="PATH", help="file whose first line is the API key")
    p.add_argument(
        "--tls",
        action="store_true",
        help="attach over TLS, verifying the control plane with "
        "the system roots (implied by the other --tls-* flags)",
    )
    p.add_argument("--tls-ca-file", metavar="PEM", help="CA to verify the control plane with")
    p.add_argument(
        "--tls-cert-file", metavar="PEM", help="client certificate for mutual TLS (with the key)"
    )
    p.add_argument("--tls-key-file", metavar="PEM", help="private key of --tls-cert-file")
    p.add_argument("--seed", type=int, default=0, help="weight seed of presets (same everywhere)")
    p.add_argument("--dtype", help="float32|bfloat16|float16 (default: fp32 cpu, bf16 cuda)")
    p.add_argument("--max-batch-tokens", type=int, default=2048, help="tokens per iteration")
    p.add_argument(
        "--rendezvous-host", default="127.0.0.1", help="address of this node's rendezvous store"
    )
    p.add_argument("--rendezvous-port", type=int, default=0, help="its port (0: any free one)")
    p.add_argument("--drain-timeout", type=float, default=60.0, help="seconds to drain on SIGTERM")
    p.add_argument("--threads-per-worker", type=int, default=1, help="torch threads (cpu)")
    p.add_argument(
        "--otlp-endpoint",
        help="OTLP/gRPC collector for spans, e.g. http://host:4317 "
        "(default: OTEL_EXPORTER_OTLP_ENDPOINT, else no spans are exported)",
    )
    p.set_defaults(handler=_agent)


def _agent(args: argparse.Namespace) -> int:
    from dataplane.agent.config import (
        AgentConfig,
        default_node_id,
        load_api_key,
        load_link_tls,
        otlp_endpoint,
        parse_kv_budget,
        parse_roles,
    )

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        config = AgentConfig(
            controlplane=args.controlplane,
            device=args.device,
            num_workers=args.workers,
            model=args.model,
            roles=parse_roles(args.roles, args.workers),
            kv_budget=None if args.kv_budget is None else parse_kv_budget(args.kv_budget),
            node_id=args.node_id or default_node_id(),
            api_key=load_api_key(args.api_key, args.api_key_file, os.environ),
            seed=args.seed,
            dtype=args.dtype,
            max_batch_tokens=args.max_batch_tokens,
            rendezvous_host=args.rendezvous_host,
            rendezvous_port=args.rendezvous_port,
            drain_timeout_s=args.drain_timeout,
            threads_per_worker=args.threads_per_worker,
            otlp_endpoint=otlp_endpoint(args.otlp_endpoint, os.environ),
            tls=load_link_tls(args.tls, args.tls_ca_file, args.tls_cert_file, args.tls_key_file),
        )
        _check_model(config.model)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from dataplane.agent.agent import run_agent

    try:
        return run_agent(config)
    except ValueError as exc:  # e.g. workers sharing a GPU without --kv-budget
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _check_model(spec: str) -> None:
    from pathlib import Path

    from dataplane.models.presets import PRESET_NAMES

    if not Path(spec).is_dir() and spec not in PRESET_NAMES:
        raise ValueError(
            f"--model {spec!r} is neither a directory nor a preset (presets: {', '.join(PRESET_NAMES)})"
        )
