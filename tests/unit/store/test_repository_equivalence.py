"""Property: for any sequence of submits and state changes, the in-memory and SQL repositories
answer listing and paging (in both orders), recovery and Watch counters identically."""

from __future__ import annotations

import dataclasses

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from repository_contract import make_new_request

from controlplane.core.types import RequestClass, RequestState
from controlplane.store.engine import make_engine
from controlplane.store.memory import InMemoryRepository
from controlplane.store.records import ListOrder, RequestFilter
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


def _all_pages(
    repo: Repository, request_filter: RequestFilter, page_size: int, order: ListOrder
) -> list[str]:
    ids: list[str] = []
    token = ""
    for _ in range(100):  # more pages than 25 requests can fill: a stuck token fails
        page = repo.list_requests(
            request_filter, page_size=page_size, page_token=token, order=order
        )
        assert len(page.views) <= page_size
        ids += [view.request_id for view in page.views]
        token = page.next_page_token
        if not token:
            return ids
    raise AssertionError(f"paging did not end; listed so far: {ids}")


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
        oldest_first = _all_pages(memory, request_filter, page_size, ListOrder.OLDEST_FIRST)
        newest_first = _all_pages(memory, request_filter, page_size, ListOrder.NEWEST_FIRST)
        assert oldest_first == _all_pages(sql, request_filter, page_size, ListOrder.OLDEST_FIRST)
        assert newest_first == _all_pages(sql, request_filter, page_size, ListOrder.NEWEST_FIRST)
        assert newest_first == oldest_first[::-1]
        assert memory.unfinished_with_inputs() == sql.unfinished_with_inputs()
    finally:
        engine.dispose()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    arrivals=st.lists(st.integers(0, 4).map(float), min_size=1, max_size=15),
    late=st.lists(st.tuples(st.integers(0, 3), st.integers(0, 2)), max_size=10),
    page_size=st.integers(1, 4),
)
def test_newest_first_paging_under_concurrent_arrivals(
    arrivals: list[float], late: list[tuple[int, int]], page_size: int
) -> None:
    """Requests submitted between pages (arrival times never decrease: they tie or follow the
    newest stored one) never repeat or hide a request: on memory and SQLite, every request
    stored before the first page comes exactly once, and the listing stays strictly newest
    first."""
    engine = make_engine("sqlite://")
    metadata.create_all(engine)
    try:
        for repo in (InMemoryRepository(), SqlRepository(engine)):
            # Prepare
            for i, arrival_s in enumerate(arrivals):
                repo.add_request(make_new_request(f"r{i:02d}", arrival_s=arrival_s))
            newest_s = max(arrivals)
            pending = list(late)
            late_ids: set[str] = set()
            # Execute: page, submitting one late request after each page
            seen: list[tuple[float, str]] = []
            token = ""
            for _ in range(len(arrivals) + len(late) + 1):  # a token that never ends fails
                page = repo.list_requests(
                    RequestFilter(),
                    page_size=page_size,
                    page_token=token,
                    order=ListOrder.NEWEST_FIRST,
                )
                seen += [(v.spec.arrival_s, v.request_id) for v in page.views]
                if pending:
                    delay_s, id_rank = pending.pop()
                    newest_s += delay_s  # 0: ties the newest arrival time
                    # Sorts before, among or after the stored ids ("r00", "r01", ...).
                    late_id = f"{('a', 'r00x', 'z')[id_rank]}{len(pending):02d}"
                    late_ids.add(late_id)
                    repo.add_request(make_new_request(late_id, arrival_s=newest_s))
                token = page.next_page_token
                if not token:
                    break
            else:
                raise AssertionError(f"paging did not end; seen so far: {seen}")
            # Assert
            stored = [(arrival_s, f"r{i:02d}") for i, arrival_s in enumerate(arrivals)]
            assert seen == sorted(seen, reverse=True) and len(set(seen)) == len(seen)
            assert [key for key in seen if key[1] not in late_ids] == sorted(stored, reverse=True)
    finally:
        engine.dispose()
