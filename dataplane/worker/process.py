"""The worker process: builds the model and engine, then loops over commands and iterations.

Started by the agent with `torch.multiprocessing` (spawn) as `worker_process(spec, commands,
reports)`, which runs `worker_main` and then ends the process at once: `commands` is the
receiving end of a one-way pipe from the agent, `reports` the sending end of one to it. The
loop, between engine iterations: take every pending command, poll transfers, run one
iteration, send the reports and (at most every `load_interval_s`, and whenever something
changed) a `Load`. Idle, it blocks on the command pipe for up to `idle_wait_s` (`join_poll_s`
while an SP group's rendezvous is pending: the loop notices its end that soon). The join does
not hold the loop (`dataplane.worker.runtime`): the pipe is read at every iteration, so the
agent's writes wait at most one iteration (an SP collective: at most the group timeout).
`Stop` (or the agent's end of the pipe closing) ends the process.

The process skips Python's interpreter teardown (`os._exit` once `worker_main` has released
its groups): with torch loaded that teardown is seconds of garbage collection over module
globals (2-3 s per worker, several times that with four workers on a busy host). The agent
waits for its workers before it exits, so it overran `pecsched up`'s 10 s grace and was killed
after "drained; exiting".
"""

from __future__ import annotations

import os
import signal
import sys
import time
import traceback
from dataclasses import dataclass
from multiprocessing.connection import Connection

from dataplane.worker import messages as m
from dataplane.worker.memory import WorkerMemory


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    """Everything one worker needs to start (picklable; built once by the agent)."""

    member_id: str  # the instance id, e.g. "node-a/0"
    model: str  # preset name or local HF directory
    seed: int  # weight seed for presets
    device: str  # "cpu" or "cuda:N"
    dtype: str  # float32 | bfloat16 | float16
    kv_budget_tokens: int | None  # KV pool rows; None: from kv_budget_bytes or free memory
    kv_budget_bytes: int | None  # KV pool bytes (used when kv_budget_tokens is None)
    max_batch_tokens: int  # tokens per iteration (decodes + prefill chunks)
    store_address: str  # host:port of the agent's rendezvous TCPStore
    group_timeout_s: float  # rendezvous and collective timeout
    num_threads: int  # torch intra-op threads (CPU)
    load_interval_s: float = 0.2  # most frequent Load report while busy
    idle_wait_s: float = 0.05  # blocking wait for a command when idle
    join_poll_s: float = 0.005  # the same while an SP group's rendezvous is pending


def engine_config(spec: WorkerSpec, kv_bytes_per_token: int):  # type: ignore[no-untyped-def]
    """The engine's limits for this spec (KV budget in bytes, from tokens when given so)."""
    from dataplane.engine.engine import EngineConfig

    budget = spec.kv_budget_bytes
    if spec.kv_budget_tokens is not None:
        budget = spec.kv_budget_tokens * kv_bytes_per_token
    chunk = min(512, spec.max_batch_tokens)
    return EngineConfig(
        max_batch_tokens=spec.max_batch_tokens, chunk_tokens=chunk, kv_budget_bytes=budget
    )


def build_engine(spec: WorkerSpec):  # type: ignore[no-untyped-def]
    """The model on its device and an engine whose KV pool follows the spec's budget."""
    import torch

    from dataplane.engine.engine import Engine
    from dataplane.models.loading import parse_dtype, resolve_model

    device = torch.device(spec.device)
    dtype = parse_dtype(spec.dtype)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    model = resolve_model(spec.model, seed=spec.seed, dtype=dtype, device=device)
    return Engine(model, engine_config(spec, model.shape.kv_bytes_per_token(dtype)))


def worker_memory(spec: WorkerSpec) -> WorkerMemory:
    """The GPU memory this spec's worker takes (its KV budget must be set), without loading it."""
    from pathlib import Path

    import torch

    from dataplane.engine.config import activation_reserve_bytes
    from dataplane.models.llama import ModelShape
    from dataplane.models.loading import parse_dtype
    from dataplane.models.presets import preset_config

    if Path(spec.model).is_dir():
        from transformers import AutoConfig

        shape = ModelShape.from_config(AutoConfig.from_pretrained(spec.model))
    else:
        shape = ModelShape.from_config(preset_config(spec.model))
    dtype = parse_dtype(spec.dtype)
    per_token = shape.kv_bytes_per_token(dtype)
    config = engine_config(spec, per_token)
    if config.kv_budget_bytes is None:
        raise ValueError("a memory share needs a KV budget (--kv-budget)")
    item = torch.empty((), dtype=dtype).element_size()
    return WorkerMemory(
        weights_bytes=shape.num_params() * item,
        kv_bytes=config.kv_budget_bytes // per_token * per_token,
        activation_bytes=activation_reserve_bytes(shape, config, dtype),
    )


def device_name(device: str) -> str:
    """ "cpu" or "cuda:<GPU name>" for InstanceSpec.device."""
    import torch

    dev = torch.device(device)
    if dev.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(dev)}"
    return dev.type


def worker_process(spec: WorkerSpec, commands: Connection, reports: Connection) -> None:
    """Process target: `worker_main`, then `os._exit` (0, or 1 after printing an exception)."""
    code = 1
    try:
        worker_main(spec, commands, reports)
        code = 0
    except BaseException:  # what multiprocessing would print, before we skip its exit path
        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(code)


def worker_main(spec: WorkerSpec, commands: Connection, reports: Connection) -> None:
    """The worker's life in this process (see the module docstring); returns after `Stop`."""
    import torch

    from dataplane.parallel.groups import GroupManager, connect_store, make_backend_factory
    from dataplane.parallel.kv_ipc import IpcRegistry
    from dataplane.worker.runtime import WorkerRuntime

    # The agent owns shutdown: a terminal's Ctrl-C or a group-wide SIGTERM must not kill the
    # workers under a draining agent (it stops them with Stop; its death closes the pipe).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    torch.set_num_threads(spec.num_threads)
    engine = build_engine(spec)
    factory = make_backend_factory(spec.device, "127.0.0.1" if _is_local(spec) else "")
    managers: dict[str, GroupManager] = {}

    def manager_for(address: str) -> GroupManager:
        address = address or spec.store_address
        if address not in managers:
            host, port = address.rsplit(":", 1)
            store = connect_store(host, int(port), spec.group_timeout_s)
            managers[address] = GroupManager(store, spec.member_id, factory, spec.group_timeout_s)
        return managers[address]

    ipc = IpcRegistry(engine.device) if engine.device.type == "cuda" else None
    runtime = WorkerRuntime(engine, spec.member_id, manager_for, ipc)
    eos = engine.model.config.eos_token_id
    eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
    vocab_size = engine.model.shape.vocab_size
    device = device_name(spec.device)
    reports.send(m.Ready(engine.kv.pool_tokens, device, eos_ids, os.getpid(), vocab_size))
    last_load_s, last_load = 0.0, None
    try:
        while True:
            wait_s = spec.join_poll_s if runtime.joining else spec.idle_wait_s
            if runtime.has_work():
                wait_s = 0.0
            while commands.poll(wait_s):
                cmd = commands.recv()
                if isinstance(cmd, m.Stop):
                    return
                runtime.handle(cmd)
                wait_s = 0.0
            runtime.run_once()
            for report in runtime.take_reports():
                reports.send(report)
            now_s = time.monotonic()
            load = runtime.load()
            changed = (
                last_load is None or load.resident_request_ids != last_load.resident_request_ids
            )
            if changed or (now_s - last_load_s >= spec.load_interval_s and load != last_load):
                reports.send(load)
                last_load_s, last_load = now_s, load
    except (EOFError, BrokenPipeError):
        return  # the agent is gone: nothing to report to
    finally:
        for manager in managers.values():
            manager.close()


def _is_local(spec: WorkerSpec) -> bool:
    return spec.store_address.startswith(("127.", "localhost"))
