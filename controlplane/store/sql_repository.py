"""SqlRepository: the Repository contract on SQLite or PostgreSQL through SQLAlchemy Core.

The hot paths are one statement each: Submit is one INSERT ... ON CONFLICT DO NOTHING (a
SELECT follows only for an idempotent replay), a batch of submits is one multi-row INSERT,
state updates are one executemany UPDATE. Statements are built once; SQLAlchemy caches their
compiled form and psycopg prepares them on the server after a few executions.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import Any

from sqlalchemy import Engine, Row, bindparam, func, select, text, tuple_
from sqlalchemy.dialects import postgresql, sqlite

from controlplane.core.types import (
    RequestClass,
    RequestSpec,
    RequestState,
    RequestView,
)
from controlplane.store import codec
from controlplane.store.cluster_sql import ClusterSqlMixin
from controlplane.store.errors import NotFound
from controlplane.store.records import (
    AddResult,
    ListOrder,
    NewRequest,
    RequestEvent,
    RequestEventKind,
    RequestFilter,
    RequestInputs,
    RequestPage,
    SamplingParams,
)
from controlplane.store.repository import Repository
from controlplane.store.sql_session import SqlUnitOfWork
from controlplane.store.tables import UNFINISHED_PREDICATE, metadata

_requests = metadata.tables["requests"]
_tokens = metadata.tables["request_tokens"]
_events = metadata.tables["request_events"]

# Columns a RequestView is built from (the prompt blob is left out).
_VIEW_COLUMNS = tuple(
    _requests.c[name]
    for name in (
        "id tenant request_class state prompt_tokens max_new_tokens priority arrival_s "
        "deadline_s first_scheduled_s prefill_done_s first_token_s finished_s chunks_done "
        "chunks_total num_preemptions num_requeues paused_total_s prefill_instance_ids "
        "decode_instance_ids output_tokens error"
    ).split()
)
_MUTABLE = (
    "state prefill_done_s finished_s chunks_done chunks_total num_preemptions num_requeues "
    "paused_total_s prefill_instance_ids decode_instance_ids output_tokens error"
).split()
_SET_ONCE = ("first_scheduled_s", "first_token_s")
_INSERT_COLUMNS = tuple(column.name for column in _requests.columns)


class SqlRepository(ClusterSqlMixin, Repository):
    """Repository over an Engine made by `controlplane.store.engine.make_engine`."""

    def __init__(self, engine: Engine) -> None:
        self.uow = SqlUnitOfWork(engine)
        dialect_insert = postgresql.insert if engine.dialect.name == "postgresql" else sqlite.insert
        self._dialect_insert = dialect_insert
        self._insert_request = dialect_insert(_requests).on_conflict_do_nothing(
            index_elements=["tenant", "idempotency_key"]
        )
        self._insert_returning = self._insert_request.returning(_requests.c.id)
        # The batch path bypasses SQLAlchemy's multi-row VALUES rewrite: the driver's own
        # executemany reuses one short prepared statement (a long multi-row text is re-parsed
        # by psycopg on every call).
        self._insert_many_sql = (
            f"INSERT INTO requests ({', '.join(_INSERT_COLUMNS)}) VALUES "
            f"({', '.join(_placeholder(engine.dialect.name, c) for c in _INSERT_COLUMNS)}) "
            "ON CONFLICT (tenant, idempotency_key) DO NOTHING"
        )
        values: dict[str, Any] = {name: bindparam(f"b_{name}") for name in _MUTABLE}
        for name in _SET_ONCE:
            values[name] = func.coalesce(_requests.c[name], bindparam(f"b_{name}"))
        self._update_request = (
            _requests.update().where(_requests.c.id == bindparam("b_id")).values(**values)
        )
        self._select_view = select(*_VIEW_COLUMNS)

    def transaction(self, *, write: bool = False) -> AbstractContextManager[Any]:
        """See Repository.transaction."""
        return self.uow.scope(write=write)

    # -- requests -----------------------------------------------------------------------

    def add_request(self, new: NewRequest) -> AddResult:
        """See Repository.add_request."""
        row = _insert_params(new)
        with self.uow.scope(write=True) as connection:
            inserted = connection.execute(self._insert_returning, row).first()
            if inserted is not None:
                return AddResult(_queued_view(new), True)
            return AddResult(self._by_keys(connection, [new])[0], False)

    def add_requests(self, news: Sequence[NewRequest]) -> list[AddResult]:
        """See Repository.add_requests.

        One executemany INSERT ... ON CONFLICT DO NOTHING (pipelined and prepared by psycopg),
        then, only when some requests carry an idempotency key, one SELECT of those keys to
        tell new rows from replays.
        """
        if not news:
            return []
        rows = [_insert_params(new) for new in news]
        with self.uow.scope(write=True) as connection:
            connection.exec_driver_sql(self._insert_many_sql, rows)
            keyed = [new for new in news if new.idempotency_key is not None]
            stored = iter(self._by_keys(connection, keyed)) if keyed else iter(())
            results = []
            claimed: set[str] = set()
            for new in news:
                view = next(stored) if new.idempotency_key is not None else None
                request_id = new.spec.request_id
                if view is None or (view.request_id == request_id and request_id not in claimed):
                    claimed.add(request_id)
                    results.append(AddResult(_queued_view(new), True))
                else:
                    results.append(AddResult(view, False))
            return results

    def _by_keys(self, connection: Any, news: Sequence[NewRequest]) -> list[RequestView]:
        """Views of the stored requests matching each new request's (tenant, key)."""
        pairs = [(n.spec.tenant, n.idempotency_key) for n in news]
        rows = connection.execute(
            self._select_view.add_columns(_requests.c.idempotency_key).where(
                tuple_(_requests.c.tenant, _requests.c.idempotency_key).in_(pairs)
            )
        ).all()
        by_key = {(row.tenant, row.idempotency_key): _view_from_row(row) for row in rows}
        assert len(by_key) == len(set(pairs)), f"idempotent replays without a stored row: {pairs}"
        return [by_key[pair] for pair in pairs]

    def get_request(self, request_id: str) -> RequestView:
        """See Repository.get_request."""
        with self.uow.scope(write=False) as connection:
            row = connection.execute(
                self._select_view.where(_requests.c.id == request_id)
            ).one_or_none()
        if row is None:
            raise NotFound(f"request {request_id!r} not found")
        return _view_from_row(row)

    def get_request_inputs(self, request_id: str) -> RequestInputs:
        """See Repository.get_request_inputs."""
        columns = ("prompt_token_ids", "temperature", "top_p", "seed", "stop_at_eos")
        query = select(*(_requests.c[c] for c in columns), _requests.c.idempotency_key)
        with self.uow.scope(write=False) as connection:
            row = connection.execute(query.where(_requests.c.id == request_id)).one_or_none()
        if row is None:
            raise NotFound(f"request {request_id!r} not found")
        sampling = SamplingParams(
            row.temperature, row.top_p, codec.seed_from_db(row.seed), row.stop_at_eos
        )
        return RequestInputs(
            codec.unpack_token_ids(row.prompt_token_ids), sampling, row.idempotency_key
        )

    def list_requests(
        self,
        request_filter: RequestFilter,
        *,
        page_size: int = 100,
        page_token: str = "",
        order: ListOrder = ListOrder.OLDEST_FIRST,
    ) -> RequestPage:
        """See Repository.list_requests.

        One keyset query: `(arrival_s, id) > / < (token)` with ORDER BY both columns in the
        same direction, which the (arrival_s, id) and (tenant, arrival_s, id) indexes serve by
        a forward or backward range scan on SQLite and PostgreSQL alike.
        """
        codec.check_page_size(page_size)
        query = self._select_view
        if request_filter.states:
            query = query.where(_requests.c.state.in_(sorted(request_filter.states)))
        if request_filter.request_class is not None:
            query = query.where(_requests.c.request_class == request_filter.request_class.value)
        if request_filter.tenant is not None:
            query = query.where(_requests.c.tenant == request_filter.tenant)
        key = tuple_(_requests.c.arrival_s, _requests.c.id)
        newest_first = order is ListOrder.NEWEST_FIRST
        if page_token:
            after = codec.decode_page_token(page_token, order)
            query = query.where(key < after if newest_first else key > after)
        if newest_first:
            query = query.order_by(_requests.c.arrival_s.desc(), _requests.c.id.desc())
        else:
            query = query.order_by(_requests.c.arrival_s, _requests.c.id)
        with self.uow.scope(write=False) as connection:
            rows = connection.execute(query.limit(page_size + 1)).all()
        views = tuple(_view_from_row(row) for row in rows[:page_size])
        next_token = ""
        if len(rows) > page_size:
            last = views[-1]
            next_token = codec.encode_page_token(order, last.spec.arrival_s, last.request_id)
        return RequestPage(views, next_token)

    def unfinished_requests(self) -> list[RequestView]:
        """See Repository.unfinished_requests."""
        query = self._select_view.where(text(UNFINISHED_PREDICATE)).order_by(
            _requests.c.arrival_s, _requests.c.id
        )
        with self.uow.scope(write=False) as connection:
            return [_view_from_row(row) for row in connection.execute(query)]

    def update_requests(self, views: Sequence[RequestView]) -> None:
        """See Repository.update_requests."""
        if not views:
            return
        params = [_update_params(view) for view in views]
        with self.uow.scope(write=True) as connection:
            updated = connection.execute(self._update_request, params).rowcount
            if updated != len(views):
                ids = [view.request_id for view in views]
                found = set(
                    connection.execute(select(_requests.c.id).where(_requests.c.id.in_(ids)))
                    .scalars()
                    .all()
                )
                missing = sorted(set(ids) - found)
                if missing:
                    raise NotFound(f"requests not found: {missing}")

    # -- generated tokens ---------------------------------------------------------------

    def append_output_tokens(
        self, request_id: str, start_index: int, token_ids: Sequence[int]
    ) -> None:
        """See Repository.append_output_tokens."""
        codec.check_token_chunk(start_index, token_ids)
        packed = codec.pack_token_ids(token_ids, "token_ids")
        with self.uow.scope(write=True) as connection:
            connection.execute(
                _tokens.insert(),
                {"request_id": request_id, "start_index": start_index, "token_ids": packed},
            )

    def get_output_tokens(self, request_id: str, from_index: int = 0) -> tuple[int, ...]:
        """See Repository.get_output_tokens."""
        query = (
            select(_tokens.c.token_ids)
            .where(_tokens.c.request_id == request_id)
            .order_by(_tokens.c.start_index)
        )
        with self.uow.scope(write=False) as connection:
            chunks = connection.execute(query).scalars().all()
        return codec.unpack_token_ids(b"".join(chunks))[from_index:]

    # -- timeline ------------------------------------------------------------------------

    def record_events(self, events: Sequence[RequestEvent]) -> None:
        """See Repository.record_events."""
        if not events:
            return
        rows = [
            {
                "request_id": event.request_id,
                "kind": RequestEventKind(event.kind).value,
                "at_s": event.at_s,
                "instance_id": event.instance_id,
                "details": dict(event.details),
            }
            for event in events
        ]
        with self.uow.scope(write=True) as connection:
            connection.execute(_events.insert(), rows)

    def list_events(self, request_id: str) -> list[RequestEvent]:
        """See Repository.list_events."""
        query = (
            select(_events.c.kind, _events.c.at_s, _events.c.instance_id, _events.c.details)
            .where(_events.c.request_id == request_id)
            .order_by(_events.c.id)
        )
        with self.uow.scope(write=False) as connection:
            return [
                RequestEvent(request_id, RequestEventKind(kind), at_s, instance_id, details)
                for kind, at_s, instance_id, details in connection.execute(query)
            ]


def _placeholder(dialect: str, column: str) -> str:
    """A named parameter in the driver's style; blobs go to psycopg in binary (`%(x)b`)."""
    if dialect != "postgresql":
        return f":{column}"
    return f"%({column})b" if column == "prompt_token_ids" else f"%({column})s"


def _insert_params(new: NewRequest) -> dict[str, Any]:
    spec = new.spec
    sampling = new.sampling
    return {
        "id": spec.request_id,
        "tenant": spec.tenant,
        "request_class": new.request_class.value,
        "state": RequestState.QUEUED.value,
        "prompt_token_ids": codec.pack_token_ids(new.prompt_token_ids, "prompt_token_ids"),
        "prompt_tokens": spec.prompt_tokens,
        "max_new_tokens": spec.max_new_tokens,
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "seed": codec.seed_to_db(sampling.seed),
        "stop_at_eos": sampling.stop_at_eos,
        "priority": spec.priority,
        "deadline_s": spec.deadline_s,
        "idempotency_key": new.idempotency_key,
        "output_tokens": 0,
        "error": None,
        "num_preemptions": 0,
        "num_requeues": 0,
        "paused_total_s": 0.0,
        "prefill_instance_ids": "",
        "decode_instance_ids": "",
        "chunks_done": 0,
        "chunks_total": 0,
        "arrival_s": spec.arrival_s,
        "first_scheduled_s": None,
        "prefill_done_s": None,
        "first_token_s": None,
        "finished_s": None,
    }


def _queued_view(new: NewRequest) -> RequestView:
    return RequestView(new.spec, new.request_class, RequestState.QUEUED)


def _update_params(view: RequestView) -> dict[str, Any]:
    return {
        "b_id": view.request_id,
        "b_state": view.state.value,
        "b_first_scheduled_s": view.first_scheduled_s,
        "b_prefill_done_s": view.prefill_done_s,
        "b_first_token_s": view.first_token_s,
        "b_finished_s": view.finished_s,
        "b_chunks_done": view.chunks_done,
        "b_chunks_total": view.chunks_total,
        "b_num_preemptions": view.num_preemptions,
        "b_num_requeues": view.num_requeues,
        "b_paused_total_s": view.paused_total_s,
        "b_prefill_instance_ids": codec.join_ids(view.prefill_instance_ids, "prefill_instance_ids"),
        "b_decode_instance_ids": codec.join_ids(view.decode_instance_ids, "decode_instance_ids"),
        "b_output_tokens": view.output_tokens,
        "b_error": view.error or None,
    }


def _view_from_row(row: Row[Any]) -> RequestView:
    spec = RequestSpec(
        request_id=row.id,
        tenant=row.tenant,
        prompt_tokens=row.prompt_tokens,
        max_new_tokens=row.max_new_tokens,
        priority=row.priority,
        arrival_s=row.arrival_s,
        deadline_s=row.deadline_s,
    )
    return RequestView(
        spec=spec,
        request_class=RequestClass(row.request_class),
        state=RequestState(row.state),
        first_scheduled_s=row.first_scheduled_s,
        prefill_done_s=row.prefill_done_s,
        first_token_s=row.first_token_s,
        finished_s=row.finished_s,
        chunks_done=row.chunks_done,
        chunks_total=row.chunks_total,
        num_preemptions=row.num_preemptions,
        num_requeues=row.num_requeues,
        paused_total_s=row.paused_total_s,
        prefill_instance_ids=codec.split_ids(row.prefill_instance_ids),
        decode_instance_ids=codec.split_ids(row.decode_instance_ids),
        output_tokens=row.output_tokens,
        error=row.error or "",
    )
