"""Property: for any sequence of submits and state changes, the in-memory and SQL repositories
answer listing, paging, recovery and Watch counters identically."""

from __future__ import annotations

import dataclasses

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from repository_contract import make_new_request

from controlplane.core.types import RequestClass, RequestState
from controlplane.store.engine import make_engine
from controlplane.store.memory import InMemoryRepository
from controlplane.store.records import RequestFilter
from controlplane.store.repository import Repository
from controlplane.store.sql_repository import SqlRepository
from controlplane.store.tables import metadata


@dataclasses.dataclass(frozen=True, slots=True)
class Submit:
    """One submit, then a move of the (new) request to `state`."""

    tenant: str
    request_class: RequestClass
    arrival_s: float
    key: str | None
    prompt_tokens: int
    state: RequestState


submits = st.lists(
    st.builds(
        Submit,
        tenant=st.sampled_from(["t1", "t2"]),
        request_class=st.sampled_from(list(RequestClass)),
        arrival_s=st.integers(0, 4).map(float),  # few distinct times: many ties
        key=st.one_of(st.none(), st.sampled_from(["k1", "k2", "k3"])),  # replays
        prompt_tokens=st.integers(1, 9),
        state=st.sampled_from(list(RequestState)),
    ),
    max_size=25,
)
filters = st.builds(
    RequestFilter,
    states=st.frozensets(st.sampled_from(list(RequestState)), max_size=3),
    request_class=st.one_of(st.none(), st.sampled_from(list(RequestClass))),
    tenant=st.one_of(st.none(), st.sampled_from(["t1", "t2"])),
)


def _apply(repo: Repository, operations: list[Submit]) -> None:
    with repo.transaction(write=True):
        for i, op in enumerate(operations):
            new = make_new_request(
                f"r{i:02d}",
                tenant=op.tenant,
                request_class=op.request_class,
                arrival_s=op.arrival_s,
                key=op.key,
                prompt=(1,) * op.prompt_tokens,
            )
            result = repo.add_request(new)
            if result.created:
                repo.update_requests([dataclasses.replace(result.view, state=op.state)])


def _all_pages(repo: Repository, request_filter: RequestFilter, page_size: int) -> list[str]:
    ids: list[str] = []
    token = ""
    while True:
        page = repo.list_requests(request_filter, page_size=page_size, page_token=token)
        assert len(page.views) <= page_size
        ids += [view.request_id for view in page.views]
        token = page.next_page_token
        if not token:
            return ids


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(operations=submits, request_filter=filters, page_size=st.integers(1, 7))
def test_memory_and_sql_agree(
    operations: list[Submit], request_filter: RequestFilter, page_size: int
) -> None:
    engine = make_engine("sqlite://")
    metadata.create_all(engine)
    memory, sql = InMemoryRepository(), SqlRepository(engine)

    for repo in (memory, sql):
        _apply(repo, operations)

    try:
        assert _all_pages(memory, request_filter, page_size) == _all_pages(
            sql, request_filter, page_size
        )
        assert memory.unfinished_requests() == sql.unfinished_requests()
        assert memory.class_stats() == sql.class_stats()
    finally:
        engine.dispose()
