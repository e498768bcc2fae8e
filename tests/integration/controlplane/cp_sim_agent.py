"""An in-test agent that speaks the Attach protocol and executes commands with simulated timing.

Prefill takes `chunk_s` per chunk (pausing at chunk boundaries), KV transfer `transfer_s`,
decode `token_s` per token. Output token number i of a request is `expected_token(prompt, i)`,
so a test can check that continuation after a re-queue or restart produced the right output.
Only rank 0 of an SP group (instance_ids[0]) reports; KV transfer progress is reported by the
source. `on_command` lets a test observe every command (e.g. to echo its trace context).

This is the one fake agent over the wire: control-plane tests use it (or a real agent), and
`Reattaching` keeps one node attached across control-plane failures. The policy-level fake
(tests/unit/core/fake_dataplane.py) drives a core policy without a control plane.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import grpc

from protos.pecsched.v1 import cluster_pb2, cluster_pb2_grpc, common_pb2

# Prompts by request id, shared by every agent of the process (stands in for the KV a
# transfer carries to another node).
PROMPTS: dict[str, list[int]] = {}


def expected_token(prompt: Sequence[int], index: int) -> int:
    """The deterministic output token `index` of a prompt."""
    return 32 + (sum(prompt) + 7 * index) % 90


@dataclass
class _Work:
    prompt: list[int]
    instance_ids: list[str]
    chunk_tokens: int
    max_new_tokens: int
    generated: list[int]
    decode_in_place: bool
    paused: bool = False
    resume: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None


class SimAgent:
    """One node with the given instances: (instance_id, role, kv_capacity_tokens)."""

    def __init__(
        self,
        target: str,
        node_id: str,
        instances: Sequence[tuple[str, int, int]],
        *,
        api_key: str | None = None,
        chunk_s: float = 0.004,
        transfer_s: float = 0.004,
        token_s: float = 0.002,
        on_command: Callable[[cluster_pb2.Command], None] | None = None,
        fail_prefills: int = 0,
        lose_transfers: int = 0,
        vocab_size: int = 0,
    ) -> None:
        self.target = target
        self.node_id = node_id
        self.instances = list(instances)
        self.api_key = api_key
        self.chunk_s, self.transfer_s, self.token_s = chunk_s, transfer_s, token_s
        self.on_command = on_command
        self.commands: list[cluster_pb2.Command] = []
        self.command_times: list[float] = []  # monotonic receipt time of each command
        self.fail_prefills = fail_prefills  # refuse this many prefills (retryable failure)
        self.lose_transfers = lose_transfers  # never report this many KV transfers
        self.vocab_size = vocab_size  # reported in Register (0: not reported)
        self.registered: cluster_pb2.Registered | None = None
        self.resident: list[str] = []
        self._work: dict[str, _Work] = {}
        self._out: asyncio.Queue[cluster_pb2.AgentMessage | None] = asyncio.Queue()
        self._seq = 0
        self._tasks: list[asyncio.Task[None]] = []
        self._channel: grpc.aio.Channel | None = None
        self._call: object | None = None
        self.ended = asyncio.Event()
        self.frozen = False

    async def start(self) -> None:
        """Attach and register; returns once Registered arrived."""
        self._channel = grpc.aio.insecure_channel(self.target)
        stub = cluster_pb2_grpc.ClusterStub(self._channel)
        metadata = (("authorization", f"Bearer {self.api_key}"),) if self.api_key else ()
        register = cluster_pb2.Register(
            node_id=self.node_id,
            model="tiny",
            rendezvous_address=f"{self.node_id}:29500",
            resident_request_ids=self.resident,
            vocab_size=self.vocab_size,
            instances=[
                cluster_pb2.InstanceSpec(
                    instance_id=iid, role=role, tp=1, kv_capacity_tokens=cap, device="cpu"
                )
                for iid, role, cap in self.instances
            ],
        )
        self._send(register=register)
        call = stub.Attach(self._outgoing(), metadata=metadata)
        self._call = call
        first = await call.read()
        assert first.WhichOneof("body") == "registered", first
        self.registered = first.registered
        self._tasks.append(asyncio.create_task(self._read(call)))
        self._tasks.append(asyncio.create_task(self._beat()))

    async def stop(self) -> None:
        """Drop the stream and all work (like a crashed agent)."""
        for work in self._work.values():
            if work.task is not None:
                work.task.cancel()
        for task in self._tasks:
            task.cancel()
        self._out.put_nowait(None)
        if self._call is not None:
            self._call.cancel()  # type: ignore[attr-defined]
        if self._channel is not None:
            await self._channel.close()

    # ---- wire -------------------------------------------------------------------------------

    def freeze(self) -> None:
        """Go silent (a hung agent): nothing is sent from now on, the stream stays open."""
        self.frozen = True

    def _send(self, **body: object) -> None:
        if self.frozen:
            return
        self._seq += 1
        self._out.put_nowait(cluster_pb2.AgentMessage(seq=self._seq, **body))  # type: ignore[arg-type]

    async def _outgoing(self):  # type: ignore[no-untyped-def]
        while True:
            message = await self._out.get()
            if message is None:
                return
            yield message

    def _event(self, request_id: str, instance_id: str, **kind: object) -> None:
        event = cluster_pb2.Event(
            request_id=request_id, instance_id=instance_id, at_s=time.time(), **kind
        )  # type: ignore[arg-type]
        self._send(event=event)

    async def _beat(self) -> None:
        interval = self.registered.heartbeat_interval_s if self.registered else 1.0
        while True:
            await asyncio.sleep(interval)  # the heartbeat period (simulated timing, not a wait)
            loads = [
                cluster_pb2.InstanceLoad(instance_id=i, busy_s=0.01) for i, _, _ in self.instances
            ]
            self._send(heartbeat=cluster_pb2.Heartbeat(loads=loads))

    async def _read(self, call) -> None:  # type: ignore[no-untyped-def]
        try:
            while True:
                message = await call.read()
                if message is grpc.aio.EOF:
                    break
                if message.WhichOneof("body") == "command":
                    self.commands.append(message.command)
                    self.command_times.append(time.monotonic())
                    if self.on_command is not None:
                        self.on_command(message.command)
                    self._execute(message.command)
        except (grpc.aio.AioRpcError, asyncio.CancelledError):
            pass
        finally:
            self.ended.set()

    # ---- execution ------------------------------------------------------------------------

    def _execute(self, command: cluster_pb2.Command) -> None:
        kind = command.WhichOneof("kind")
        if kind in ("start_prefill", "colocate"):
            p = command.start_prefill if kind == "start_prefill" else command.colocate.prefill
            work = _Work(
                list(p.prompt_token_ids),
                list(p.instance_ids),
                p.chunk_tokens,
                p.max_new_tokens,
                list(p.generated_token_ids),
                p.decode_in_place,
            )
            self._cancel_work(p.request_id)
            self._work[p.request_id] = work
            PROMPTS[p.request_id] = work.prompt
            if self._owns(p.instance_ids[0]) and self.fail_prefills > 0:
                self.fail_prefills -= 1
                failed = cluster_pb2.Failed(error="DOES_NOT_FIT (simulated)", retryable=True)
                self._event(p.request_id, p.instance_ids[0], failed=failed)
            elif self._owns(p.instance_ids[0]):
                work.task = asyncio.create_task(self._prefill(p.request_id, work))
        elif kind == "pause":
            work = self._work.get(command.pause.request_id)
            if work is not None:
                work.paused = True
                work.resume.clear()
        elif kind == "resume":
            work = self._work.get(command.resume.request_id)
            if work is not None:
                work.paused = False
                work.resume.set()
        elif kind == "transfer_kv":
            t = command.transfer_kv
            if self._owns(t.source_instance_id) and self.lose_transfers > 0:
                self.lose_transfers -= 1
            elif self._owns(t.source_instance_id):
                asyncio.create_task(self._transfer(t))
        elif kind == "start_decode":
            d = command.start_decode
            work = self._work.get(d.request_id)
            if work is None:  # KV arrived from another node
                prompt = PROMPTS.get(d.request_id, [])
                work = _Work(prompt, [], 1, d.max_new_tokens, [], False)
                self._work[d.request_id] = work
            work.generated = list(d.generated_token_ids)
            work.max_new_tokens = d.max_new_tokens
            instance = self._decode_instance(d, work)
            work.task = asyncio.create_task(self._decode(d.request_id, instance, work))
        elif kind == "cancel":
            self._cancel_work(command.cancel.request_id)

    def _owns(self, instance_id: str) -> bool:
        return any(instance_id == i for i, _, _ in self.instances)

    def _decode_instance(self, d: cluster_pb2.StartDecode, work: _Work) -> str:
        for command in reversed(self.commands):
            if command.WhichOneof("kind") == "transfer_kv":
                t = command.transfer_kv
                if t.transfer_id == d.transfer_id and d.transfer_id:
                    return t.destination_instance_id
        return work.instance_ids[0]

    def _cancel_work(self, request_id: str) -> None:
        work = self._work.pop(request_id, None)
        if work is not None and work.task is not None:
            work.task.cancel()

    async def _prefill(self, rid: str, work: _Work) -> None:
        rank0 = work.instance_ids[0]
        total = len(work.prompt) + len(work.generated)
        chunks = -(-total // max(1, work.chunk_tokens))
        for index in range(chunks):
            await asyncio.sleep(self.chunk_s)  # a chunk's compute (simulated timing, not a wait)
            last = index == chunks - 1
            if not last:
                self._event(
                    rid,
                    rank0,
                    chunk_done=cluster_pb2.PrefillChunkDone(chunk_index=index, chunks_total=chunks),
                )
            if work.paused and not last:
                self._event(rid, rank0, paused=cluster_pb2.Paused(chunks_done=index + 1))
                await work.resume.wait()
        first_index = len(work.generated)
        first = expected_token(work.prompt, first_index)
        self._event(
            rid,
            rank0,
            prefill_done=cluster_pb2.PrefillDone(
                prompt_tokens=len(work.prompt), first_token_id=first
            ),
        )
        work.generated.append(first)
        if work.decode_in_place:
            await self._decode(rid, rank0, work)

    async def _transfer(self, t: cluster_pb2.TransferKv) -> None:
        await asyncio.sleep(self.transfer_s)  # the copy (simulated timing, not a wait)
        self._event(
            t.request_id,
            t.source_instance_id,
            kv_transfer=cluster_pb2.KvTransferUpdate(
                transfer_id=t.transfer_id,
                state=common_pb2.TRANSFER_STATE_DONE,
                destination_instance_id=t.destination_instance_id,
                bytes=1024,
            ),
        )
        self._work.pop(t.request_id, None)

    async def _decode(self, rid: str, instance: str, work: _Work) -> None:
        while len(work.generated) < work.max_new_tokens:
            await asyncio.sleep(self.token_s)  # a decode step (simulated timing, not a wait)
            index = len(work.generated)
            work.generated.append(expected_token(work.prompt, index))
            self._event(
                rid,
                instance,
                tokens=cluster_pb2.Tokens(start_index=index, token_ids=[work.generated[-1]]),
            )
        self._event(
            rid,
            instance,
            finished=cluster_pb2.Finished(output_tokens=len(work.generated), reason="length"),
        )
        self._work.pop(rid, None)


class Reattaching:
    """SimAgents of one node, one after another: a new one attaches whenever the last one's
    stream ended or its attach was refused, as a real agent reconnects. `make()` builds each."""

    RETRY_S = 0.05  # back-off after a refused attach (a real agent's, so it does not spin)

    def __init__(self, make: Callable[[], SimAgent]) -> None:
        self.num_attaches = 0  # attaches that got Registered
        self._make = make
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            agent = self._make()
            try:
                await agent.start()
                self.num_attaches += 1
                await agent.ended.wait()
            except grpc.aio.AioRpcError:
                await asyncio.sleep(self.RETRY_S)  # the back-off itself, not a wait
            finally:
                await agent.stop()

    async def stop(self) -> None:
        """Stop attaching and drop the current agent."""
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
