"""A scripted fake of the control plane's Inference service, served by a real gRPC server.

The real control plane is built elsewhere; the SDK is tested against the wire contract through
this fake, over loopback, so every byte goes through grpc exactly as in production. The fake
follows the server-side conventions the SDK documents (API key in `authorization: Bearer`,
`pecsched.v1.ErrorDetail` in trailing metadata `pecsched-error-detail-bin`).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import grpc

from protos.pecsched.v1 import common_pb2, inference_pb2, inference_pb2_grpc

DETAIL_KEY = "pecsched-error-detail-bin"
API_KEY = "test-key-123"


@dataclass
class Failure:
    """One scripted error: a status code, message, and optional ErrorDetail fields."""

    code: grpc.StatusCode
    message: str = "scripted failure"
    detail: common_pb2.ErrorDetail | None = None
    after_effect: bool = False  # Submit only: create the request first, then fail (lost reply)


@dataclass
class Call:
    """One call the fake received."""

    method: str
    request: object
    metadata: dict[str, str]
    at_s: float  # time.monotonic() at arrival


def output_tokens(prompt_tokens: int, max_new_tokens: int) -> list[int]:
    """The fake's deterministic output for a prompt length."""
    return [100 + prompt_tokens + i for i in range(max_new_tokens)]


def token_text(token_ids: list[int]) -> str:
    """The fake tokenizer: one letter per token."""
    return "".join(chr(ord("a") + t % 26) for t in token_ids)


@dataclass
class FakeControlPlane(inference_pb2_grpc.InferenceServicer):
    """Scripted Inference servicer; tests set the knobs, then inspect `calls`."""

    api_key: str | None = None  # when set, calls without `Bearer <api_key>` are UNAUTHENTICATED
    failures: dict[str, list[Failure]] = field(default_factory=dict)  # method -> next errors
    delay_s: dict[str, float] = field(default_factory=dict)  # method -> sleep before answering
    chunk_size: int = 2  # tokens per TokenChunk
    drop_after_chunks: list[int] = field(default_factory=list)  # per stream: abort after N chunks
    drop_with_clean_close: bool = False  # end the dropped stream cleanly instead of UNAVAILABLE
    ignore_from_index: bool = False  # resend from token 0 on every stream (a sloppy server)
    chunk_interval_s: float = 0.0  # pause between chunks (a slow decode)
    num_chunks_sent: int = 0  # TokenChunks sent over all streams
    skip_tokens: int = 0  # start streams this many tokens past from_token_index (a broken server)
    calls: list[Call] = field(default_factory=list)
    requests: dict[str, inference_pb2.Request] = field(default_factory=dict)
    outputs: dict[str, list[int]] = field(default_factory=dict)
    keys: dict[str, str] = field(default_factory=dict)  # idempotency key -> request id
    lock: threading.Lock = field(default_factory=threading.Lock)

    def calls_of(self, method: str) -> list[Call]:
        """The recorded calls of one method, in arrival order."""
        return [c for c in self.calls if c.method == method]

    def add_request(self, prompt_tokens: int = 3, max_new_tokens: int = 4, **kw: object) -> str:
        """Store a request directly (as if submitted earlier); returns its id."""
        request_id = f"req-{len(self.requests) + 1:03d}"
        request = inference_pb2.Request(
            request_id=request_id,
            prompt_tokens=prompt_tokens,
            max_new_tokens=max_new_tokens,
            state=common_pb2.REQUEST_STATE_QUEUED,
            request_class=common_pb2.REQUEST_CLASS_SHORT,
            **kw,  # type: ignore[arg-type]
        )
        request.timestamps.arrival.FromSeconds(1_700_000_000 + len(self.requests))
        self.requests[request_id] = request
        self.outputs[request_id] = output_tokens(prompt_tokens, max_new_tokens)
        return request_id

    # -- plumbing ---------------------------------------------------------------------------

    def _enter(self, method: str, request: object, context: grpc.ServicerContext) -> None:
        metadata = {k: v for k, v in context.invocation_metadata() if isinstance(v, str)}
        with self.lock:
            self.calls.append(Call(method, request, metadata, time.monotonic()))
        if self.api_key is not None and metadata.get("authorization") != f"Bearer {self.api_key}":
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or unknown API key")
        time.sleep(self.delay_s.get(method, 0.0))  # scripted latency (the scenario, not a wait)

    def _fail_if_scripted(self, method: str, context: grpc.ServicerContext) -> Failure | None:
        queue = self.failures.get(method)
        if not queue:
            return None
        failure = queue.pop(0)
        if not failure.after_effect:
            self._abort(failure, context)
        return failure

    @staticmethod
    def _abort(failure: Failure, context: grpc.ServicerContext) -> None:
        if failure.detail is not None:
            context.set_trailing_metadata(((DETAIL_KEY, failure.detail.SerializeToString()),))
        context.abort(failure.code, failure.message)

    def _request(self, request_id: str, context: grpc.ServicerContext) -> inference_pb2.Request:
        if request_id not in self.requests:
            context.abort(grpc.StatusCode.NOT_FOUND, f"no request {request_id}")
        return self.requests[request_id]

    # -- Inference --------------------------------------------------------------------------

    def Submit(self, request, context):  # type: ignore[no-untyped-def]  # noqa: N802
        self._enter("Submit", request, context)
        failure = self._fail_if_scripted("Submit", context)
        with self.lock:
            existing = self.keys.get(request.idempotency_key)
            if existing is None:
                prompt_tokens = (
                    len(request.text) if request.HasField("text") else len(request.token_ids.ids)
                )
                existing = self.add_request(
                    prompt_tokens, request.max_new_tokens, tenant=request.tenant or "default"
                )
                self.keys[request.idempotency_key] = existing
                deduplicated = False
            else:
                deduplicated = True
        if failure is not None:
            self._abort(failure, context)
        stored = self.requests[existing]
        return inference_pb2.SubmitResponse(
            request_id=existing,
            request_class=stored.request_class,
            prompt_tokens=stored.prompt_tokens,
            deduplicated=deduplicated,
        )

    def Generate(self, request, context):  # type: ignore[no-untyped-def]  # noqa: N802
        self._enter("Generate", request, context)
        self._fail_if_scripted("Generate", context)
        tokens = self.outputs[self._request(request.request_id, context).request_id]
        start = 0 if self.ignore_from_index else request.from_token_index + self.skip_tokens
        drop_after = self.drop_after_chunks.pop(0) if self.drop_after_chunks else None
        for num_sent, begin in enumerate(range(start, len(tokens), self.chunk_size)):
            if num_sent == drop_after:
                if self.drop_with_clean_close:
                    return
                context.abort(grpc.StatusCode.UNAVAILABLE, "agent connection lost")
            ids = tokens[begin : begin + self.chunk_size]
            time.sleep(self.chunk_interval_s)  # a decode's pace (the scenario, not a wait)
            self.num_chunks_sent += 1
            is_last = begin + self.chunk_size >= len(tokens)
            yield inference_pb2.TokenChunk(
                request_id=request.request_id,
                start_index=begin,
                token_ids=ids,
                text=token_text(ids),
                final_state=common_pb2.REQUEST_STATE_FINISHED if is_last else 0,
            )

    def Get(self, request, context):  # type: ignore[no-untyped-def]  # noqa: N802
        self._enter("Get", request, context)
        self._fail_if_scripted("Get", context)
        return self._request(request.request_id, context)

    def Cancel(self, request, context):  # type: ignore[no-untyped-def]  # noqa: N802
        self._enter("Cancel", request, context)
        self._fail_if_scripted("Cancel", context)
        stored = self._request(request.request_id, context)
        stored.state = common_pb2.REQUEST_STATE_CANCELLED
        stored.timestamps.finished.FromSeconds(1_700_000_100)
        return stored

    def List(self, request, context):  # type: ignore[no-untyped-def]  # noqa: N802
        self._enter("List", request, context)
        self._fail_if_scripted("List", context)
        matching = [
            r
            for r in reversed(self.requests.values())  # newest first
            if (not request.states or r.state in request.states)
            and (not request.request_class or r.request_class == request.request_class)
            and (not request.tenant or r.tenant == request.tenant)
        ]
        page_size = request.page_size or 100
        offset = int(request.page_token or 0)
        page = matching[offset : offset + page_size]
        has_more = offset + page_size < len(matching)
        return inference_pb2.ListResponse(
            requests=page, next_page_token=str(offset + page_size) if has_more else ""
        )

    def Watch(self, request, context):  # type: ignore[no-untyped-def]  # noqa: N802
        self._enter("Watch", request, context)
        self._fail_if_scripted("Watch", context)
        num_sent = 0
        while context.is_active():
            snapshot = inference_pb2.ClusterSnapshot(
                policy="pecsched",
                preemptions_total=num_sent,
                colocations_total=2,
                kv_transfers_total=3,
                throughput_rps=1.5,
                classes=[
                    inference_pb2.ClassStats(
                        request_class=common_pb2.REQUEST_CLASS_SHORT, queued=4, queued_tokens=512
                    ),
                    inference_pb2.ClassStats(
                        request_class=common_pb2.REQUEST_CLASS_LONG, paused=1, decoding=1
                    ),
                ],
                instances=[
                    common_pb2.Instance(
                        instance_id="n0-gpu0",
                        node_id="n0",
                        role=common_pb2.INSTANCE_ROLE_GENERAL,
                        state=common_pb2.INSTANCE_STATE_UP,
                        tp=1,
                        device_indices=[0],
                        kv_capacity_tokens=4096,
                        kv_used_tokens=1024,
                        request_ids=["req-long"],
                    ),
                    common_pb2.Instance(
                        instance_id="n0-gpu1",
                        node_id="n0",
                        role=common_pb2.INSTANCE_ROLE_SHORT_DECODE,
                        state=common_pb2.INSTANCE_STATE_UP,
                        tp=1,
                        device_indices=[1],
                        kv_capacity_tokens=4096,
                    ),
                ],
            )
            snapshot.at.FromSeconds(1_700_000_000 + num_sent)
            yield snapshot
            num_sent += 1
            time.sleep(request.interval_s or 1.0)  # the asked interval, as the real server
