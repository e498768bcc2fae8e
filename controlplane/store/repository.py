"""The `Repository` ABC: the control plane's state in domain terms, whatever the backend.

Transactions: the outermost caller owns the transaction. `transaction()` opens one (read-only
unless `write=True`) and is re-entrant: a nested `transaction()` joins the outer one. Every
method runs inside the caller's transaction when there is one, else inside its own that
commits when the method returns. Methods never commit a caller's transaction. A failure
inside rolls the whole outermost transaction back.

Calls block (SQL drivers are synchronous): asyncio code runs them in a worker thread
(`asyncio.to_thread`), with a whole `with repo.transaction(...)` block inside one such call.
Never await while a transaction is open: on SQLite a second writer would wait for the lock.

Every method returns core or store values (controlplane.core.types, controlplane.store.records),
never ORM rows, and raises only `StoreError` subclasses (plus ValueError for bad arguments).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from contextlib import AbstractContextManager

from controlplane.core.types import RequestView
from controlplane.store.records import (
    AddResult,
    ApiKeyRecord,
    ApiKeyRole,
    ListOrder,
    NewRequest,
    NodeRecord,
    RegisteredInstance,
    RequestEvent,
    RequestFilter,
    RequestPage,
    StoredInputs,
    UnfinishedRequest,
)


class ReadOnlyTransactionError(RuntimeError):
    """A write was attempted inside a read-only transaction (a programming error)."""


class Repository(ABC):
    """Persistent state of requests, their timelines and tokens, the cluster and API keys."""

    @abstractmethod
    def transaction(self, *, write: bool = False) -> AbstractContextManager[None]:
        """Open (or join) a transaction; commit on normal exit, roll back on an exception.

        Args:
            write: the transaction may write. A nested `transaction(write=True)` inside a
                read-only one raises ReadOnlyTransactionError, and so does any write method.

        Raises:
            Unavailable: the database cannot be reached or stays locked.
        """

    # -- requests -----------------------------------------------------------------------

    @abstractmethod
    def add_request(self, new: NewRequest) -> AddResult:
        """Persist a new QUEUED request, idempotently by (tenant, idempotency_key).

        Returns:
            The stored view and `created=True`; or, when the tenant already has a request with
            this idempotency key, that request's view and `created=False` (nothing written).

        Raises:
            AlreadyExists: a request with the same request_id exists (and no key matched).
        """

    @abstractmethod
    def add_requests(self, news: Sequence[NewRequest]) -> list[AddResult]:
        """`add_request` for many requests at once (group commit); results in input order.

        Two entries of `news` with the same (tenant, key) resolve to the first one.
        """

    @abstractmethod
    def get_request(self, request_id: str) -> RequestView:
        """The stored view of one request.

        Raises:
            NotFound: no request has this id.
        """

    @abstractmethod
    def get_request_inputs(self, request_id: str) -> StoredInputs:
        """Prompt token ids, sampling and idempotency key of one request.

        Raises:
            NotFound: no request has this id.
        """

    @abstractmethod
    def list_requests(
        self,
        request_filter: RequestFilter,
        *,
        page_size: int = 100,
        page_token: str = "",
        order: ListOrder = ListOrder.OLDEST_FIRST,
    ) -> RequestPage:
        """Requests matching `request_filter`, one page, ordered by (arrival_s, request_id).

        Keyset pagination: a page token holds the (arrival_s, request_id) of the page's last
        request, and the next page starts strictly after it in `order`. Both keys are immutable,
        so paging stays stable while requests are added or change state: every request stored
        before the first page, and matching when its page is read, is returned exactly once. A
        request added during paging is returned only if its key lies beyond the position
        already reached. Under NEWEST_FIRST a new arrival (arrival times are non-decreasing)
        sorts before that position, unless it ties its arrival_s, so it is left for the next
        listing.

        Args:
            request_filter: states / class / tenant to match.
            page_size: 1..codec.MAX_PAGE_SIZE requests per page.
            page_token: "" for the first page, else `next_page_token` of the previous page
                listed in the same `order`.
            order: OLDEST_FIRST (ascending) or NEWEST_FIRST (descending, the List RPC's order).

        Raises:
            ValueError: page_size out of range, a malformed page_token, or a page_token of a
                listing in the other order.
        """

    @abstractmethod
    def unfinished_with_inputs(self) -> list[UnfinishedRequest]:
        """Every request not in a terminal state with its prompt, sampling and stored output
        tokens, in arrival order: what recovery after a restart reads (in a few statements,
        whatever the number of requests)."""

    @abstractmethod
    def update_requests(self, views: Sequence[RequestView]) -> None:
        """Persist the mutable fields of each view (state, times, counters, instances, error).

        The spec (tenant, sizes, arrival, ...) and the request class are immutable and are not
        compared; `first_scheduled_s` and `first_token_s` keep their stored value once set.

        Raises:
            NotFound: one of the requests does not exist (nothing of the batch is kept once the
                caller's transaction rolls back).
        """

    # -- generated tokens ---------------------------------------------------------------

    @abstractmethod
    def append_output_tokens(
        self, request_id: str, start_index: int, token_ids: Sequence[int]
    ) -> None:
        """Store generated tokens `start_index .. start_index + len(token_ids) - 1`.

        Chunks must be appended contiguously (start_index == tokens stored so far); the
        request's `output_tokens` count is updated through `update_requests`.

        Raises:
            NotFound: no request has this id.
            AlreadyExists: a chunk starting at `start_index` is stored already.
            ValueError: empty `token_ids` or negative `start_index`.
        """

    @abstractmethod
    def get_output_tokens(self, request_id: str, from_index: int = 0) -> tuple[int, ...]:
        """Generated token ids from `from_index` on (empty for an unknown request)."""

    # -- timeline ------------------------------------------------------------------------

    @abstractmethod
    def record_events(self, events: Sequence[RequestEvent]) -> None:
        """Append timeline entries (one INSERT batch).

        Raises:
            NotFound: an event names a request that does not exist.
        """

    @abstractmethod
    def list_events(self, request_id: str) -> list[RequestEvent]:
        """The request's timeline in the order it was recorded (empty when none)."""

    # -- cluster -------------------------------------------------------------------------

    @abstractmethod
    def upsert_node(self, node: NodeRecord) -> None:
        """Insert the node or replace every field of the stored one."""

    @abstractmethod
    def touch_node(self, node_id: str, at_s: float) -> None:
        """Record a heartbeat: set `last_heartbeat_s`.

        Raises:
            NotFound: the node is not registered.
        """

    @abstractmethod
    def mark_node_down(self, node_id: str, at_s: float) -> list[str]:
        """Mark the node and every instance on it DOWN; returns those instance ids, sorted.

        Raises:
            NotFound: the node is not registered.
        """

    @abstractmethod
    def list_nodes(self) -> list[NodeRecord]:
        """Every node, sorted by id."""

    @abstractmethod
    def upsert_instance(self, instance: RegisteredInstance) -> None:
        """Insert the instance or replace every field of the stored one.

        Raises:
            NotFound: its node is not registered.
        """

    # -- API keys ------------------------------------------------------------------------

    @abstractmethod
    def create_api_key(
        self, role: ApiKeyRole, tenant: str, at_s: float
    ) -> tuple[ApiKeyRecord, str]:
        """Create a key; returns its record and the secret key string (shown once, not stored).

        Raises:
            ValueError: empty tenant.
        """

    @abstractmethod
    def verify_api_key(self, key: str) -> ApiKeyRecord | None:
        """The record of a valid key string; None when malformed, unknown or revoked."""

    @abstractmethod
    def revoke_api_key(self, key_id: str, at_s: float) -> None:
        """Revoke a key (verify returns None for it from now on).

        Raises:
            NotFound: no key has this id.
        """
