"""A scripted control plane: a real gRPC `Cluster` server on loopback that tests drive.

It answers every Register with Registered (heartbeat interval and drop list set by the test),
records everything the agent sends, and lets the test push commands onto the live stream.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any

import grpc

from protos.pecsched.v1 import cluster_pb2, cluster_pb2_grpc


class ScriptedControlPlane(cluster_pb2_grpc.ClusterServicer):
    """Records AgentMessages; `command(...)` sends a Command on the current stream."""

    def __init__(self, heartbeat_interval_s: float = 0.2) -> None:
        self.heartbeat_interval_s = heartbeat_interval_s
        self.drop_request_ids: list[str] = []
        self.messages: list[cluster_pb2.AgentMessage] = []
        self.registers: list[cluster_pb2.Register] = []
        self.metadata: list[dict[str, str]] = []
        self._cond = threading.Condition()
        self._out: queue.Queue[Any] | None = None
        self._seq = 0
        self._server: grpc.Server | None = None
        self.port = 0

    # ---------------------------------------------------------------- server
    def start(self, port: int = 0, credentials: grpc.ServerCredentials | None = None) -> int:
        """Serve on 127.0.0.1:port (0: a free port), over TLS with `credentials`; returns the
        port."""
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        cluster_pb2_grpc.add_ClusterServicer_to_server(self, server)
        address = f"127.0.0.1:{port}"
        if credentials is None:
            self.port = server.add_insecure_port(address)
        else:
            self.port = server.add_secure_port(address, credentials)
        server.start()
        self._server = server
        return self.port

    def stop(self) -> None:
        """Stop serving (the agent sees its stream end)."""
        with self._cond:
            out, self._out = self._out, None
        if out is not None:
            out.put(None)
        if self._server is not None:
            self._server.stop(grace=0).wait()
            self._server = None

    def Attach(self, request_iterator: Iterator[Any], context: Any) -> Iterator[Any]:  # noqa: N802
        out: queue.Queue[Any] = queue.Queue()
        with self._cond:
            if self._out is not None:
                self._out.put(None)
            self._out = out
            self.metadata.append(dict(context.invocation_metadata()))

        def read() -> None:
            try:
                for msg in request_iterator:
                    if msg.WhichOneof("body") == "register":
                        out.put(
                            cluster_pb2.ControlMessage(
                                registered=cluster_pb2.Registered(
                                    heartbeat_interval_s=self.heartbeat_interval_s,
                                    drop_request_ids=self.drop_request_ids,
                                )
                            )
                        )
                    with self._cond:
                        if msg.WhichOneof("body") == "register":
                            self.registers.append(msg.register)
                        self.messages.append(msg)
                        self._cond.notify_all()
            except grpc.RpcError:
                pass
            out.put(None)

        threading.Thread(target=read, daemon=True).start()
        while True:
            item = out.get()
            if item is None:
                return
            yield item

    # ---------------------------------------------------------------- driving
    def command(self, **kind: Any) -> None:
        """Send Command(**kind) on the current stream, e.g. command(pause=Pause(...))."""
        with self._cond:
            out = self._out
            self._seq += 1
            seq = self._seq
        assert out is not None, "no agent attached"
        out.put(cluster_pb2.ControlMessage(seq=seq, command=cluster_pb2.Command(**kind)))

    def events(self, request_id: str | None = None) -> list[cluster_pb2.Event]:
        """Events received so far (of one request, if given)."""
        with self._cond:
            evs = [m.event for m in self.messages if m.WhichOneof("body") == "event"]
        return [e for e in evs if request_id is None or e.request_id == request_id]

    def heartbeats(self) -> list[cluster_pb2.Heartbeat]:
        """Heartbeats received so far."""
        with self._cond:
            return [m.heartbeat for m in self.messages if m.WhichOneof("body") == "heartbeat"]

    def wait_for(
        self, predicate: Callable[[], Any], timeout_s: float = 60.0, what: str = ""
    ) -> Any:
        """Wait until predicate() is truthy; returns its value or fails with the events seen."""
        deadline = time.monotonic() + timeout_s
        while True:
            value = predicate()
            if value:
                return value
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"timed out waiting for {what}; events: {self.events()}")
            with self._cond:
                self._cond.wait(min(remaining, 0.1))

    def wait_event(self, request_id: str, kind: str, timeout_s: float = 60.0) -> cluster_pb2.Event:
        """The first event of `kind` (e.g. "finished") for the request."""

        def find() -> cluster_pb2.Event | None:
            for e in self.events(request_id):
                if e.WhichOneof("kind") == kind:
                    return e
            return None

        event: cluster_pb2.Event = self.wait_for(find, timeout_s, f"{kind} of {request_id}")
        return event

    def wait_end(self, request_id: str, timeout_s: float = 60.0) -> cluster_pb2.Event:
        """The request's terminal event (finished, failed or cancelled)."""

        def find() -> cluster_pb2.Event | None:
            for e in self.events(request_id):
                if e.WhichOneof("kind") in ("finished", "failed", "cancelled"):
                    return e
            return None

        event: cluster_pb2.Event = self.wait_for(find, timeout_s, f"end of {request_id}")
        return event

    def output(self, request_id: str) -> list[int]:
        """The request's tokens assembled from Tokens events (checks contiguity)."""
        tokens: list[int] = []
        for e in self.events(request_id):
            if e.WhichOneof("kind") == "tokens":
                assert e.tokens.start_index == len(tokens), (e.tokens.start_index, len(tokens))
                tokens.extend(e.tokens.token_ids)
        return tokens
