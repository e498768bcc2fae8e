"""The agent process: rendezvous store, workers, the Attach link, and the main loop.

`run_agent(config)` returns the exit code: 0 after a drain (SIGTERM, SIGINT or a Shutdown
command), 1 when a worker cannot start. The main loop is the only thread that touches
`AgentCore`; the link and the worker reader threads only post into its inbox.
"""

from __future__ import annotations

import logging
import queue
import signal
import threading
import time
from importlib.metadata import PackageNotFoundError, version
from types import FrameType
from typing import Any

from dataplane.agent.config import AgentConfig
from dataplane.agent.core import AgentCore
from dataplane.agent.link import AttachLink
from dataplane.agent.supervisor import WorkerSupervisor
from dataplane.agent.tracing import make_tracer
from dataplane.worker import messages as m
from dataplane.worker.memory import check_gpu_shares
from dataplane.worker.process import WorkerSpec, worker_memory
from protos.pecsched.v1 import cluster_pb2

log = logging.getLogger("pecsched.agent")

TICK_S = 0.05  # longest wait of the main loop for an input
GPU_MEMORY_FRACTION = 0.92  # share of a GPU its workers may take together (as one engine's)


class _Ports:
    """AgentCore's outputs: the supervisor's pipes and the link."""

    def __init__(self, supervisor: WorkerSupervisor, link: AttachLink) -> None:
        self.supervisor, self.link = supervisor, link

    def send_worker(self, index: int, cmd: m.WorkerCommand) -> bool:
        return self.supervisor.send(index, cmd)

    def respawn(self, index: int) -> None:
        log.warning("respawning worker %d", index)
        self.supervisor.respawn(index)

    def send_wire(self, epoch: int, message: cluster_pb2.AgentMessage) -> bool:
        return self.link.send(epoch, message)


def worker_specs(config: AgentConfig, store_address: str) -> tuple[list[WorkerSpec], list[int]]:
    """One WorkerSpec per worker and each worker's device index."""
    num_gpus = 0
    if config.device == "cuda":
        import torch

        num_gpus = torch.cuda.device_count()
        if num_gpus == 0:
            raise ValueError("--device cuda but no CUDA device is visible")
        if config.num_workers > num_gpus and config.kv_budget is None:
            # Each engine would size its pool from the same free memory: give each a share.
            raise ValueError(
                f"--kv-budget is required when {config.num_workers} workers share {num_gpus} GPU(s)"
            )
    specs: list[WorkerSpec] = []
    indices: list[int] = []
    budget = config.kv_budget
    tokens = budget.tokens if budget is not None else (4096 if config.device == "cpu" else None)
    for index in range(config.num_workers):
        device_index = index % num_gpus if num_gpus else index
        specs.append(
            WorkerSpec(
                member_id=config.instance_id(index),
                model=config.model,
                seed=config.seed,
                device=f"cuda:{device_index}" if num_gpus else "cpu",
                dtype=config.dtype or ("bfloat16" if num_gpus else "float32"),
                kv_budget_tokens=tokens,
                kv_budget_bytes=None if budget is None else budget.num_bytes,
                max_batch_tokens=config.max_batch_tokens,
                store_address=store_address,
                group_timeout_s=config.group_timeout_s,
                num_threads=config.threads_per_worker,
            )
        )
        indices.append(device_index)
    if num_gpus and config.kv_budget is not None:
        import torch

        totals = {i: torch.cuda.get_device_properties(i).total_memory for i in set(indices)}
        check_gpu_shares(indices, worker_memory(specs[0]), totals, GPU_MEMORY_FRACTION)
    return specs, indices


def run_agent(config: AgentConfig, *, install_signals: bool = True) -> int:
    """Run until drained; see the module docstring."""
    from dataplane.parallel.groups import connect_store

    store = connect_store(
        config.rendezvous_host, config.rendezvous_port, config.group_timeout_s, is_master=True
    )
    store_address = f"{config.rendezvous_host}:{store.port}"
    inbox: queue.Queue[Any] = queue.Queue()
    stop = threading.Event()
    if install_signals:
        _install_signals(stop, inbox)
    specs, device_indices = worker_specs(config, store_address)
    supervisor = WorkerSupervisor(specs, inbox)
    link = AttachLink(
        config.controlplane, config.api_key, inbox, config.reconnect_max_backoff_s, config.tls
    )
    tracer, flush_spans = make_tracer(config.otlp_endpoint, config.node_id)
    core = AgentCore(
        config, _Ports(supervisor, link), store_address, _version(), device_indices, tracer
    )
    log.info(
        "node %s: %d workers, rendezvous %s", config.node_id, config.num_workers, store_address
    )
    try:
        return _loop(core, link, inbox, stop)
    finally:
        link.close()
        supervisor.stop()
        core.spans.end_all()
        flush_spans()
        del store


def _loop(core: AgentCore, link: AttachLink, inbox: queue.Queue[Any], stop: threading.Event) -> int:
    attached = False
    while True:
        try:
            item = inbox.get(timeout=TICK_S)
        except queue.Empty:
            item = None
        if item is not None and item is not _WAKE:
            core.handle(item)
        if core.fatal is not None:
            log.error("%s", core.fatal)
            return 1
        if not attached and core.all_ready:
            link.start()
            attached = True
            log.info("workers ready; attaching to the control plane")
        if stop.is_set():
            if not attached:
                return 0
            core.start_drain(time.monotonic())
        core.tick(time.monotonic())
        if core.finished:
            log.info("drained; exiting")
            return 0


_WAKE = object()


def _install_signals(stop: threading.Event, inbox: queue.Queue[Any]) -> None:
    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()
        inbox.put(_WAKE)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)


def _version() -> str:
    try:
        return version("pecsched")
    except PackageNotFoundError:
        return "unknown"
