"""The Attach stream to the control plane, re-opened with backoff whenever it ends.

A background thread loops: open a channel, start `Cluster.Attach` with a request iterator fed
by this connection's own outbound queue, post `Connected(epoch)` to the agent's inbox, forward
every `ControlMessage` as `ControlIn(epoch, msg)`, and when the stream ends post
`Disconnected(epoch, reason)`, wait (0.25 s doubling up to the maximum; reset after a stream
that delivered something) and try again. `send(epoch, msg)` drops messages for an epoch that
is no longer current, so nothing meant for a dead stream leaks into the next one; the agent
buffers what must survive a reconnect.

With `tls` the channel is TLS (the control plane verified against `tls.root_certificates`, or
the system roots; a client certificate when given). The first failed attempt after a working
stream (or at start) is logged with the target, once until a stream opens again.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import grpc

from dataplane.agent.config import LinkTls
from protos.pecsched.v1 import cluster_pb2, cluster_pb2_grpc

log = logging.getLogger("pecsched.agent")

_CLOSE = object()  # sentinel that ends a request iterator


@dataclass(frozen=True, slots=True)
class Connected:
    """A new Attach stream is open; the agent must send Register first."""

    epoch: int


@dataclass(frozen=True, slots=True)
class ControlIn:
    """A message from the control plane on stream `epoch`."""

    epoch: int
    message: cluster_pb2.ControlMessage


@dataclass(frozen=True, slots=True)
class Disconnected:
    """Stream `epoch` ended (server gone, stream error, or closed by us)."""

    epoch: int
    reason: str


class AttachLink:
    """Keeps one Attach stream open to `target`; see the module docstring."""

    def __init__(
        self,
        target: str,
        api_key: str | None,
        inbox: queue.Queue[Any],
        max_backoff_s: float,
        tls: LinkTls | None = None,
    ) -> None:
        self._target = target
        self._credentials = (
            None
            if tls is None
            else grpc.ssl_channel_credentials(
                tls.root_certificates, tls.private_key, tls.certificate_chain
            )
        )
        self._warned = False  # an unreachable control plane was logged
        self._metadata = [] if api_key is None else [("authorization", f"Bearer {api_key}")]
        self._inbox = inbox
        self._max_backoff_s = max_backoff_s
        self._lock = threading.Lock()
        self._epoch = 0
        self._outbound: queue.Queue[Any] | None = None
        self._call: Any = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pecsched-attach", daemon=True)

    def start(self) -> None:
        """Begin connecting (in the background)."""
        self._thread.start()

    def send(self, epoch: int, message: cluster_pb2.AgentMessage) -> bool:
        """Queue `message` on stream `epoch`; False if that stream is no longer current."""
        with self._lock:
            if epoch != self._epoch or self._outbound is None:
                return False
            self._outbound.put(message)
            return True

    def close(self, flush_timeout_s: float = 2.0) -> None:
        """Send what is queued (up to the timeout), end the stream and stop reconnecting.

        Also safe before `start` (an agent whose workers never became ready): there is no
        thread to wait for, and a later `start` returns at once."""
        self._stop.set()
        if self._thread.ident is None:
            return
        with self._lock:
            outbound, call = self._outbound, self._call
        if outbound is not None:
            outbound.put(_CLOSE)
        self._thread.join(timeout=flush_timeout_s)
        if call is not None and self._thread.is_alive():
            call.cancel()
        self._thread.join(timeout=flush_timeout_s)

    def _run(self) -> None:
        backoff_s = 0.25
        while not self._stop.is_set():
            delivered = self._attach_once(wait_ready_s=max(1.0, backoff_s))
            if delivered:
                backoff_s = 0.25
            if self._stop.wait(backoff_s):
                return
            backoff_s = min(backoff_s * 2, self._max_backoff_s)

    def _attach_once(self, wait_ready_s: float) -> bool:
        """One stream's life; returns whether the control plane sent anything on it."""
        if self._credentials is None:
            channel = grpc.insecure_channel(self._target)
        else:
            channel = grpc.secure_channel(self._target, self._credentials)
        try:
            grpc.channel_ready_future(channel).result(timeout=wait_ready_s)
        except grpc.FutureTimeoutError:
            channel.close()
            if not self._warned:
                self._warned = True
                log.warning(
                    "control plane %s not reachable%s; retrying",
                    self._target,
                    "" if self._credentials is None else " over TLS (check its certificate)",
                )
            return False
        self._warned = False
        outbound: queue.Queue[Any] = queue.Queue()
        with self._lock:
            self._epoch += 1
            epoch = self._epoch
            self._outbound = outbound
        delivered = False
        reason = "stream closed by the control plane"
        try:
            call = cluster_pb2_grpc.ClusterStub(channel).Attach(
                _drain(outbound), metadata=self._metadata
            )
            with self._lock:
                self._call = call
            self._inbox.put(Connected(epoch))
            for message in call:
                delivered = True
                self._inbox.put(ControlIn(epoch, message))
        except grpc.RpcError as exc:
            code = exc.code() if hasattr(exc, "code") else None
            details = exc.details() if hasattr(exc, "details") else str(exc)
            reason = f"{getattr(code, 'name', code)}: {details}"
        finally:
            with self._lock:
                self._outbound, self._call = None, None
                self._epoch += 1  # messages for the dead stream are dropped from now on
            outbound.put(_CLOSE)
            channel.close()
            self._inbox.put(Disconnected(epoch, reason))
        return delivered


def _drain(outbound: queue.Queue[Any]) -> Iterator[cluster_pb2.AgentMessage]:
    """The request iterator of one stream: yields queued messages until the sentinel."""
    while True:
        item = outbound.get()
        if item is _CLOSE:
            return
        yield item
