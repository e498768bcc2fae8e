"""A simulated agent for the control-plane benchmarks (bench/controlplane_load.py): it attaches
over loopback and finishes every StartPrefill at once. Imported by that script (its folder is
on sys.path); run alone it does nothing."""

from __future__ import annotations

import asyncio

import grpc

from protos.pecsched.v1 import cluster_pb2, cluster_pb2_grpc, common_pb2


async def fast_agent(target: str, node_id: str, num_instances: int, stop: asyncio.Event) -> None:
    """Attach as `node_id` with `num_instances` instances and finish every StartPrefill at
    once (prefill done, one token, finished) until `stop` is set or the stream ends."""
    queue: asyncio.Queue[cluster_pb2.AgentMessage | None] = asyncio.Queue()
    seq = 0

    def send(**body: object) -> None:
        nonlocal seq
        seq += 1
        queue.put_nowait(cluster_pb2.AgentMessage(seq=seq, **body))  # type: ignore[arg-type]

    async def outgoing():  # type: ignore[no-untyped-def]
        while (message := await queue.get()) is not None:
            yield message

    send(register=_register(node_id, num_instances))
    async with grpc.aio.insecure_channel(target) as channel:
        call = cluster_pb2_grpc.ClusterStub(channel).Attach(outgoing())
        registered = (await call.read()).registered

        async def beat() -> None:
            while True:
                await asyncio.sleep(registered.heartbeat_interval_s / 2)
                send(heartbeat=cluster_pb2.Heartbeat())

        beating = asyncio.ensure_future(beat())
        reader = asyncio.ensure_future(call.read())
        stopper = asyncio.ensure_future(stop.wait())
        while True:
            done, _ = await asyncio.wait((reader, stopper), return_when=asyncio.FIRST_COMPLETED)
            if stopper in done or reader.result() is grpc.aio.EOF:
                break
            message = reader.result()
            reader = asyncio.ensure_future(call.read())
            if message.command.WhichOneof("kind") != "start_prefill":
                continue
            prefill = message.command.start_prefill
            for event in _finish(prefill.request_id, prefill.instance_ids[0]):
                send(event=event)
        reader.cancel()
        beating.cancel()
        queue.put_nowait(None)
        call.cancel()


def _register(node_id: str, num_instances: int) -> cluster_pb2.Register:
    return cluster_pb2.Register(
        node_id=node_id,
        model="tiny",
        instances=[
            cluster_pb2.InstanceSpec(
                instance_id=f"{node_id}/{i}",
                role=common_pb2.INSTANCE_ROLE_GENERAL,
                tp=1,
                kv_capacity_tokens=1_000_000,
            )
            for i in range(num_instances)
        ],
    )


def _finish(rid: str, iid: str) -> list[cluster_pb2.Event]:
    """The events that finish a request at once: prefill done, its one token, finished."""
    return [
        cluster_pb2.Event(
            request_id=rid,
            instance_id=iid,
            prefill_done=cluster_pb2.PrefillDone(first_token_id=65),
        ),
        cluster_pb2.Event(
            request_id=rid,
            instance_id=iid,
            tokens=cluster_pb2.Tokens(start_index=0, token_ids=[65]),
        ),
        cluster_pb2.Event(
            request_id=rid, instance_id=iid, finished=cluster_pb2.Finished(output_tokens=1)
        ),
    ]
