"""InMemoryRepository: the Repository contract in process memory (unit tests, dev runs).

Transactions are real: the outermost write transaction snapshots every table (shallow copies;
stored values are immutable) and restores the snapshot when it exits with an exception. One
lock serialises transactions across threads.
"""

from __future__ import annotations

import dataclasses
import threading
from array import array
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

from controlplane.core.types import RequestState, RequestView
from controlplane.store import codec, keys
from controlplane.store.errors import AlreadyExists, NotFound
from controlplane.store.records import (
    AddResult,
    ApiKeyRecord,
    ApiKeyRole,
    InstanceState,
    ListOrder,
    NewRequest,
    NodeRecord,
    NodeState,
    RegisteredInstance,
    RequestEvent,
    RequestFilter,
    RequestPage,
    StoredInputs,
    UnfinishedRequest,
)
from controlplane.store.repository import ReadOnlyTransactionError, Repository

_TABLES = ("views", "inputs", "keys_by_tenant", "tokens", "events", "nodes", "instances", "api")


class InMemoryRepository(Repository):
    """Repository over dicts; same semantics as SqlRepository, no durability."""

    def __init__(self) -> None:
        self.views: dict[str, RequestView] = {}
        self.inputs: dict[str, StoredInputs] = {}
        self.keys_by_tenant: dict[tuple[str, str], str] = {}  # (tenant, key) -> request id
        self.tokens: dict[str, dict[int, tuple[int, ...]]] = {}  # id -> start -> chunk
        self.events: dict[str, list[RequestEvent]] = {}
        self.nodes: dict[str, NodeRecord] = {}
        self.instances: dict[str, RegisteredInstance] = {}
        self.api: dict[str, tuple[ApiKeyRecord, str]] = {}  # key id -> (record, sha256)
        self._lock = threading.RLock()
        # Per context: None outside a transaction, else whether the open one may write.
        self._scope: ContextVar[bool | None] = ContextVar(f"memrepo-{id(self)}", default=None)

    @contextmanager
    def transaction(self, *, write: bool = False) -> Iterator[None]:
        """See Repository.transaction."""
        outer = self._scope.get()
        if outer is not None:
            if write and not outer:
                raise ReadOnlyTransactionError("write transaction nested in a read-only one")
            yield
            return
        with self._lock:
            snapshot = {name: _copy(getattr(self, name)) for name in _TABLES} if write else {}
            token = self._scope.set(write)
            try:
                yield
            except BaseException:
                for name, saved in snapshot.items():
                    setattr(self, name, saved)
                raise
            finally:
                self._scope.reset(token)

    # -- requests -----------------------------------------------------------------------

    def add_request(self, new: NewRequest) -> AddResult:
        """See Repository.add_request."""
        return self.add_requests([new])[0]

    def add_requests(self, news: Sequence[NewRequest]) -> list[AddResult]:
        """See Repository.add_requests."""
        with self.transaction(write=True):
            results = []
            for new in news:
                spec = new.spec
                codec.pack_token_ids(new.prompt_token_ids, "prompt_token_ids")  # validates
                key = (spec.tenant, new.idempotency_key) if new.idempotency_key else None
                if key is not None and key in self.keys_by_tenant:
                    results.append(AddResult(self.views[self.keys_by_tenant[key]], False))
                    continue
                if spec.request_id in self.views:
                    raise AlreadyExists(f"request {spec.request_id!r} exists already")
                view = RequestView(spec, new.request_class, RequestState.QUEUED)
                self.views[spec.request_id] = view
                self.inputs[spec.request_id] = StoredInputs(
                    tuple(new.prompt_token_ids), new.sampling, new.idempotency_key
                )
                if key is not None:
                    self.keys_by_tenant[key] = spec.request_id
                results.append(AddResult(view, True))
            return results

    def get_request(self, request_id: str) -> RequestView:
        """See Repository.get_request."""
        with self.transaction():
            if request_id not in self.views:
                raise NotFound(f"request {request_id!r} not found")
            return self.views[request_id]

    def get_request_inputs(self, request_id: str) -> StoredInputs:
        """See Repository.get_request_inputs."""
        with self.transaction():
            if request_id not in self.inputs:
                raise NotFound(f"request {request_id!r} not found")
            return self.inputs[request_id]

    def list_requests(
        self,
        request_filter: RequestFilter,
        *,
        page_size: int = 100,
        page_token: str = "",
        order: ListOrder = ListOrder.OLDEST_FIRST,
    ) -> RequestPage:
        """See Repository.list_requests."""
        codec.check_page_size(page_size)
        newest_first = order is ListOrder.NEWEST_FIRST
        after = codec.decode_page_token(page_token, order) if page_token else None
        with self.transaction():
            matching = sorted(
                (v for v in self.views.values() if _matches(v, request_filter)),
                key=_list_key,
                reverse=newest_first,
            )
        if after is not None:
            matching = [v for v in matching if _is_past(_list_key(v), after, newest_first)]
        page = tuple(matching[:page_size])
        next_token = ""
        if len(matching) > page_size:
            last = page[-1]
            next_token = codec.encode_page_token(order, last.spec.arrival_s, last.request_id)
        return RequestPage(page, next_token)

    def unfinished_with_inputs(self) -> list[UnfinishedRequest]:
        """See Repository.unfinished_with_inputs."""
        with self.transaction():
            unfinished = [v for v in self.views.values() if not v.state.is_terminal]
            unfinished.sort(key=lambda v: (v.spec.arrival_s, v.request_id))
            return [
                UnfinishedRequest(
                    view,
                    array("I", self.inputs[view.request_id].prompt_token_ids),
                    self.inputs[view.request_id].sampling,
                    self.get_output_tokens(view.request_id),
                )
                for view in unfinished
            ]

    def update_requests(self, views: Sequence[RequestView]) -> None:
        """See Repository.update_requests."""
        with self.transaction(write=True):
            for view in views:
                stored = self.views.get(view.request_id)
                if stored is None:
                    raise NotFound(f"request {view.request_id!r} not found")
                codec.join_ids(view.prefill_instance_ids, "prefill_instance_ids")
                codec.join_ids(view.decode_instance_ids, "decode_instance_ids")
                self.views[view.request_id] = dataclasses.replace(
                    view,
                    spec=stored.spec,
                    request_class=stored.request_class,
                    first_scheduled_s=_first(stored.first_scheduled_s, view.first_scheduled_s),
                    first_token_s=_first(stored.first_token_s, view.first_token_s),
                )

    # -- generated tokens ---------------------------------------------------------------

    def append_output_tokens(
        self, request_id: str, start_index: int, token_ids: Sequence[int]
    ) -> None:
        """See Repository.append_output_tokens."""
        codec.check_token_chunk(start_index, token_ids)
        codec.pack_token_ids(token_ids, "token_ids")
        with self.transaction(write=True):
            if request_id not in self.views:
                raise NotFound(f"request {request_id!r} not found")
            chunks = self.tokens.setdefault(request_id, {})
            if start_index in chunks:
                raise AlreadyExists(f"request {request_id!r}: tokens at {start_index} stored")
            chunks[start_index] = tuple(token_ids)

    def get_output_tokens(self, request_id: str, from_index: int = 0) -> tuple[int, ...]:
        """See Repository.get_output_tokens."""
        with self.transaction():
            chunks = self.tokens.get(request_id, {})
            ordered = [chunks[start] for start in sorted(chunks)]
        return tuple(token for chunk in ordered for token in chunk)[from_index:]

    # -- timeline ------------------------------------------------------------------------

    def record_events(self, events: Sequence[RequestEvent]) -> None:
        """See Repository.record_events."""
        with self.transaction(write=True):
            for event in events:
                if event.request_id not in self.views:
                    raise NotFound(f"event for unknown request {event.request_id!r}")
                self.events.setdefault(event.request_id, []).append(
                    dataclasses.replace(event, details=dict(event.details))
                )

    def list_events(self, request_id: str) -> list[RequestEvent]:
        """See Repository.list_events."""
        with self.transaction():
            return list(self.events.get(request_id, []))

    # -- cluster -------------------------------------------------------------------------

    def upsert_node(self, node: NodeRecord) -> None:
        """See Repository.upsert_node."""
        with self.transaction(write=True):
            self.nodes[node.node_id] = node

    def touch_node(self, node_id: str, at_s: float) -> None:
        """See Repository.touch_node."""
        with self.transaction(write=True):
            node = self._node(node_id)
            self.nodes[node_id] = dataclasses.replace(node, last_heartbeat_s=at_s)

    def mark_node_down(self, node_id: str, at_s: float) -> list[str]:
        """See Repository.mark_node_down."""
        with self.transaction(write=True):
            node = self._node(node_id)
            self.nodes[node_id] = dataclasses.replace(node, state=NodeState.DOWN)
            down = sorted(i for i, r in self.instances.items() if r.spec.node_id == node_id)
            for instance_id in down:
                self.instances[instance_id] = dataclasses.replace(
                    self.instances[instance_id], state=InstanceState.DOWN, updated_s=at_s
                )
            return down

    def list_nodes(self) -> list[NodeRecord]:
        """See Repository.list_nodes."""
        with self.transaction():
            return [self.nodes[node_id] for node_id in sorted(self.nodes)]

    def upsert_instance(self, instance: RegisteredInstance) -> None:
        """See Repository.upsert_instance."""
        codec.join_ids([instance.spec.instance_id], "instance_id")
        with self.transaction(write=True):
            self._node(instance.spec.node_id)
            self.instances[instance.spec.instance_id] = instance

    def _node(self, node_id: str) -> NodeRecord:
        if node_id not in self.nodes:
            raise NotFound(f"node {node_id!r} not found")
        return self.nodes[node_id]

    # -- API keys ------------------------------------------------------------------------

    def create_api_key(
        self, role: ApiKeyRole, tenant: str, at_s: float
    ) -> tuple[ApiKeyRecord, str]:
        """See Repository.create_api_key."""
        codec.check_tenant(tenant)
        key_id, key = keys.generate_api_key()
        record = ApiKeyRecord(key_id, ApiKeyRole(role), tenant, at_s)
        with self.transaction(write=True):
            self.api[key_id] = (record, keys.key_sha256(key))
        return record, key

    def verify_api_key(self, key: str) -> ApiKeyRecord | None:
        """See Repository.verify_api_key."""
        key_id = keys.parse_key_id(key)
        with self.transaction():
            found = self.api.get(key_id) if key_id is not None else None
        if found is None or found[0].revoked_s is not None:
            return None
        return found[0] if keys.digest_matches(key, found[1]) else None

    def revoke_api_key(self, key_id: str, at_s: float) -> None:
        """See Repository.revoke_api_key."""
        with self.transaction(write=True):
            if key_id not in self.api:
                raise NotFound(f"API key {key_id!r} not found")
            record, digest = self.api[key_id]
            if record.revoked_s is None:
                self.api[key_id] = (dataclasses.replace(record, revoked_s=at_s), digest)


def _copy(table: Any) -> Any:
    """Shallow copy of a table; the per-request containers inside are copied one level more."""
    return {k: (v.copy() if isinstance(v, dict | list) else v) for k, v in table.items()}


def _first(stored: float | None, new: float | None) -> float | None:
    return stored if stored is not None else new


def _list_key(view: RequestView) -> tuple[float, str]:
    """The keyset `list_requests` orders and pages by."""
    return (view.spec.arrival_s, view.request_id)


def _is_past(key: tuple[float, str], after: tuple[float, str], newest_first: bool) -> bool:
    """Whether `key` comes strictly after the page-token position `after` in the listing."""
    return key < after if newest_first else key > after


def _matches(view: RequestView, request_filter: RequestFilter) -> bool:
    if request_filter.states and view.state not in request_filter.states:
        return False
    if request_filter.request_class is not None:
        if view.request_class is not request_filter.request_class:
            return False
    return request_filter.tenant is None or view.spec.tenant == request_filter.tenant
