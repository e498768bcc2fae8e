"""ONE contract suite for every Repository implementation (memory, SQLite, PostgreSQL).

Subclasses implement `repo_factory()` returning a fresh, empty repository; every test here
runs against each of them.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Sequence

import pytest

from controlplane.core.types import (
    InstanceRole,
    InstanceSpec,
    RequestClass,
    RequestSpec,
    RequestState,
    RequestView,
)
from controlplane.store import codec
from controlplane.store.errors import AlreadyExists, NotFound
from controlplane.store.records import (
    ApiKeyRole,
    InstanceState,
    ListOrder,
    NewRequest,
    NodeRecord,
    NodeState,
    RegisteredInstance,
    RequestEvent,
    RequestEventKind,
    RequestFilter,
    SamplingParams,
)
from controlplane.store.repository import ReadOnlyTransactionError, Repository


def make_new_request(
    request_id: str,
    *,
    tenant: str = "acme",
    prompt: Sequence[int] = (1, 2, 3),
    arrival_s: float = 100.0,
    request_class: RequestClass = RequestClass.SHORT,
    key: str | None = None,
    sampling: SamplingParams | None = None,
    max_new_tokens: int = 16,
) -> NewRequest:
    """A NewRequest with defaults for every field a test does not care about."""
    spec = RequestSpec(
        request_id=request_id,
        tenant=tenant,
        prompt_tokens=len(prompt),
        max_new_tokens=max_new_tokens,
        priority=0,
        arrival_s=arrival_s,
    )
    return NewRequest(spec, request_class, prompt, sampling or SamplingParams(), key)


def make_node(node_id: str = "node-a", *, at_s: float = 1.0) -> NodeRecord:
    """An UP node registered at `at_s`."""
    return NodeRecord(node_id, f"{node_id}:7000", NodeState.UP, at_s, at_s)


def make_instance(instance_id: str, node_id: str = "node-a", *, tp: int = 1) -> RegisteredInstance:
    """An UP general instance on `node_id` using devices 0..tp-1."""
    spec = InstanceSpec(instance_id, node_id, InstanceRole.GENERAL, tp, 100_000)
    return RegisteredInstance(spec, InstanceState.UP, tuple(range(tp)), 1.0)


def running(view: RequestView, **changes: object) -> RequestView:
    """`view` with `changes` applied (a new state, times, counters...)."""
    return dataclasses.replace(view, **changes)  # type: ignore[arg-type]


class RepositoryContract(ABC):
    """The behaviour every Repository must have."""

    @abstractmethod
    def repo_factory(self) -> Repository:
        """A fresh, empty repository."""

    @pytest.fixture
    def repo(self) -> Repository:
        return self.repo_factory()

    # -- adding and reading requests -------------------------------------------------------

    def test_add_then_get_returns_a_queued_view_and_the_inputs(self, repo: Repository) -> None:
        # Prepare
        sampling = SamplingParams(temperature=0.7, top_p=0.9, seed=2**64 - 1, stop_at_eos=False)
        new = make_new_request("r1", prompt=(0, 7, 2**32 - 1), sampling=sampling, key="k1")
        # Execute
        result = repo.add_request(new)
        view = repo.get_request("r1")
        inputs = repo.get_request_inputs("r1")
        # Assert
        assert result.created
        assert result.view == view == RequestView(new.spec, RequestClass.SHORT, RequestState.QUEUED)
        assert inputs.prompt_token_ids == (0, 7, 2**32 - 1)
        assert inputs.sampling == sampling
        assert inputs.idempotency_key == "k1"

    def test_idempotent_replay_returns_the_first_request(self, repo: Repository) -> None:
        first = repo.add_request(make_new_request("r1", key="same"))

        replay = repo.add_request(make_new_request("r2", key="same", arrival_s=200.0))
        other_tenant = repo.add_request(make_new_request("r3", key="same", tenant="other"))

        assert not replay.created and replay.view == first.view
        assert other_tenant.created
        with pytest.raises(NotFound):
            repo.get_request("r2")

    def test_same_request_id_twice_is_already_exists(self, repo: Repository) -> None:
        repo.add_request(make_new_request("r1"))

        with pytest.raises(AlreadyExists):
            repo.add_request(make_new_request("r1", arrival_s=5.0))

    def test_add_requests_batch_resolves_replays_in_input_order(self, repo: Repository) -> None:
        stored = repo.add_request(make_new_request("r0", key="k0"))
        batch = [
            make_new_request("r1", key="k1"),
            make_new_request("r2", key="k0"),  # replay of a stored request
            make_new_request("r3"),
            make_new_request("r4", key="k1"),  # replay of r1 from the same batch
        ]

        results = repo.add_requests(batch)

        assert [r.created for r in results] == [True, False, True, False]
        assert [r.view.request_id for r in results] == ["r1", "r0", "r3", "r1"]
        assert results[1].view == stored.view
        assert repo.add_requests([]) == []
        ids = [v.request_id for v in repo.list_requests(RequestFilter()).views]
        assert ids == ["r0", "r1", "r3"]

    def test_unknown_request_is_not_found(self, repo: Repository) -> None:
        with pytest.raises(NotFound):
            repo.get_request("nope")
        with pytest.raises(NotFound):
            repo.get_request_inputs("nope")

    def test_bad_token_ids_name_the_field(self, repo: Repository) -> None:
        with pytest.raises(ValueError, match="prompt_token_ids"):
            repo.add_request(make_new_request("r1", prompt=(1, 2**32)))
        with pytest.raises(ValueError, match="prompt_token_ids"):
            repo.add_request(make_new_request("r1", prompt=(-1,)))

    # -- updating ------------------------------------------------------------------------

    def test_update_persists_every_mutable_field(self, repo: Repository) -> None:
        view = repo.add_request(make_new_request("r1")).view
        changed = running(
            view,
            state=RequestState.DECODING,
            first_scheduled_s=101.0,
            prefill_done_s=102.5,
            first_token_s=102.5,
            chunks_done=3,
            chunks_total=3,
            num_preemptions=2,
            num_requeues=1,
            paused_total_s=0.75,
            prefill_instance_ids=("i-1", "i-2"),
            decode_instance_ids=("i-9",),
            output_tokens=5,
        )

        repo.update_requests([changed])

        assert repo.get_request("r1") == changed

    def test_update_keeps_first_times_and_the_spec(self, repo: Repository) -> None:
        view = repo.add_request(make_new_request("r1")).view
        repo.update_requests([running(view, state=RequestState.PREFILLING, first_scheduled_s=1.0)])
        tampered_spec = dataclasses.replace(view.spec, tenant="evil", prompt_tokens=99)

        repo.update_requests(
            [
                running(
                    view,
                    spec=tampered_spec,
                    request_class=RequestClass.LONG,
                    state=RequestState.FAILED,
                    first_scheduled_s=7.0,
                    finished_s=8.0,
                    error="boom",
                )
            ]
        )

        stored = repo.get_request("r1")
        assert stored.spec == view.spec and stored.request_class is RequestClass.SHORT
        assert stored.first_scheduled_s == 1.0
        assert (stored.state, stored.finished_s, stored.error) == (RequestState.FAILED, 8.0, "boom")

    def test_update_of_unknown_request_rolls_the_batch_back(self, repo: Repository) -> None:
        view = repo.add_request(make_new_request("r1")).view
        ghost = running(view, spec=dataclasses.replace(view.spec, request_id="ghost"))

        with pytest.raises(NotFound), repo.transaction(write=True):
            repo.update_requests([running(view, state=RequestState.PREFILLING), ghost])

        assert repo.get_request("r1").state is RequestState.QUEUED
        assert repo.update_requests([]) is None

    # -- listing -------------------------------------------------------------------------

    def test_list_filters_by_state_class_and_tenant(self, repo: Repository) -> None:
        repo.add_request(make_new_request("a", tenant="t1", arrival_s=1.0))
        b = repo.add_request(make_new_request("b", tenant="t2", arrival_s=2.0)).view
        repo.add_request(
            make_new_request("c", tenant="t1", arrival_s=3.0, request_class=RequestClass.LONG)
        )
        repo.update_requests([running(b, state=RequestState.DECODING)])

        def ids(request_filter: RequestFilter) -> list[str]:
            return [v.request_id for v in repo.list_requests(request_filter).views]

        assert ids(RequestFilter()) == ["a", "b", "c"]
        assert ids(RequestFilter(states=frozenset({RequestState.QUEUED}))) == ["a", "c"]
        assert ids(RequestFilter(request_class=RequestClass.LONG)) == ["c"]
        assert ids(RequestFilter(tenant="t1", request_class=RequestClass.SHORT)) == ["a"]
        states = frozenset({RequestState.DECODING, RequestState.FINISHED})
        assert ids(RequestFilter(states=states, tenant="t2")) == ["b"]

    def test_pages_cover_everything_once_in_arrival_order(self, repo: Repository) -> None:
        # Equal arrival times are ordered by id; a request added after page 1 with an earlier
        # key must not shift later pages.
        for i in range(7):
            repo.add_request(make_new_request(f"r{i}", arrival_s=float(i // 2)))
        seen: list[str] = []
        token = ""
        pages = 0
        while True:
            page = repo.list_requests(RequestFilter(), page_size=3, page_token=token)
            seen += [v.request_id for v in page.views]
            pages += 1
            if pages == 1:
                repo.add_request(make_new_request("early", arrival_s=-1.0))
            token = page.next_page_token
            if not token:
                break

        assert seen == [f"r{i}" for i in range(7)]
        assert pages == 3

    def test_newest_first_filters_in_reverse_arrival_order(self, repo: Repository) -> None:
        # Prepare
        repo.add_request(make_new_request("a", tenant="t1", arrival_s=1.0))
        b = repo.add_request(make_new_request("b", tenant="t2", arrival_s=2.0)).view
        repo.add_request(
            make_new_request("c", tenant="t1", arrival_s=3.0, request_class=RequestClass.LONG)
        )
        repo.add_request(make_new_request("d", tenant="t1", arrival_s=4.0))
        repo.update_requests([running(b, state=RequestState.DECODING)])

        def ids(request_filter: RequestFilter) -> list[str]:
            page = repo.list_requests(request_filter, order=ListOrder.NEWEST_FIRST)
            return [v.request_id for v in page.views]

        # Execute / Assert
        assert ids(RequestFilter()) == ["d", "c", "b", "a"]
        assert ids(RequestFilter(tenant="t1")) == ["d", "c", "a"]
        assert ids(RequestFilter(states=frozenset({RequestState.QUEUED}))) == ["d", "c", "a"]
        assert ids(RequestFilter(tenant="t1", request_class=RequestClass.SHORT)) == ["d", "a"]
        assert ids(RequestFilter(states=frozenset({RequestState.DECODING}))) == ["b"]

    def test_newest_first_pages_are_stable_while_requests_arrive_and_change(
        self, repo: Repository
    ) -> None:
        # Prepare: pairs of equal arrival times, ordered by id among themselves (r7 > r6), so
        # the first page boundary (after r5) falls inside the tie of r5 and r4.
        views = [
            repo.add_request(make_new_request(f"r{i}", arrival_s=float(i // 2))).view
            for i in range(8)
        ]
        seen: list[str] = []
        token = ""
        pages = 0
        # Execute
        for _ in range(5):  # bounded: a token that does not advance fails instead of looping
            page = repo.list_requests(
                RequestFilter(), page_size=3, page_token=token, order=ListOrder.NEWEST_FIRST
            )
            seen += [v.request_id for v in page.views]
            pages += 1
            if pages == 1:
                # Between pages: newer arrivals (one tying the newest arrival time with a
                # larger id), and state changes of requests already read and still to come.
                repo.add_request(make_new_request("new", arrival_s=9.0))
                repo.add_request(make_new_request("r9", arrival_s=3.0))
                repo.update_requests(
                    [
                        running(views[6], state=RequestState.PREFILLING),
                        running(views[1], state=RequestState.DECODING),
                    ]
                )
            token = page.next_page_token
            if not token:
                break
        fresh = repo.list_requests(RequestFilter(), page_size=3, order=ListOrder.NEWEST_FIRST)
        # Assert: every request stored before the first page, exactly once, newest first
        assert seen == ["r7", "r6", "r5", "r4", "r3", "r2", "r1", "r0"]
        assert pages == 3
        assert [v.request_id for v in fresh.views] == ["new", "r9", "r7"]

    def test_page_token_continues_only_a_listing_in_its_own_order(self, repo: Repository) -> None:
        for i in range(3):
            repo.add_request(make_new_request(f"r{i}", arrival_s=float(i)))
        oldest = repo.list_requests(RequestFilter(), page_size=1).next_page_token
        newest = repo.list_requests(
            RequestFilter(), page_size=1, order=ListOrder.NEWEST_FIRST
        ).next_page_token

        with pytest.raises(ValueError, match="page_token"):
            repo.list_requests(RequestFilter(), page_token=oldest, order=ListOrder.NEWEST_FIRST)
        with pytest.raises(ValueError, match="page_token"):
            repo.list_requests(RequestFilter(), page_token=newest)
        with pytest.raises(ValueError, match="page_token"):
            repo.list_requests(
                RequestFilter(), page_token="not-a-token", order=ListOrder.NEWEST_FIRST
            )
        after_newest = repo.list_requests(
            RequestFilter(), page_token=newest, order=ListOrder.NEWEST_FIRST
        )
        assert [v.request_id for v in after_newest.views] == ["r1", "r0"]

    def test_bad_paging_arguments_name_the_field(self, repo: Repository) -> None:
        with pytest.raises(ValueError, match="page_size"):
            repo.list_requests(RequestFilter(), page_size=0)
        with pytest.raises(ValueError, match="page_size"):
            repo.list_requests(RequestFilter(), page_size=codec.MAX_PAGE_SIZE + 1)
        with pytest.raises(ValueError, match="page_token"):
            repo.list_requests(RequestFilter(), page_token="not-a-token")

    def test_unfinished_with_inputs_carry_prompt_sampling_and_output(
        self, repo: Repository
    ) -> None:
        sampling = SamplingParams(temperature=0.5, top_p=0.9, seed=2**64 - 1, stop_at_eos=False)
        decoding = repo.add_request(
            make_new_request("r1", prompt=(7, 2**32 - 1), arrival_s=2.0, sampling=sampling)
        ).view
        repo.add_request(make_new_request("r2", prompt=(1, 2, 3), arrival_s=1.0))
        done = repo.add_request(make_new_request("r3", arrival_s=0.5)).view
        repo.update_requests(
            [
                running(decoding, state=RequestState.DECODING),
                running(done, state=RequestState.FINISHED),
            ]
        )
        repo.append_output_tokens("r1", 0, [5, 6])
        repo.append_output_tokens("r1", 2, [8])
        repo.append_output_tokens("r3", 0, [9])

        unfinished = repo.unfinished_with_inputs()

        assert [u.view.request_id for u in unfinished] == ["r2", "r1"]
        assert unfinished[1].view.state is RequestState.DECODING
        assert list(unfinished[1].prompt_token_ids) == [7, 2**32 - 1]
        assert unfinished[1].prompt_token_ids.itemsize == 4  # held packed
        assert unfinished[1].sampling == sampling
        assert unfinished[1].output_token_ids == (5, 6, 8)
        assert (list(unfinished[0].prompt_token_ids), unfinished[0].output_token_ids) == (
            [1, 2, 3],
            (),
        )

    def test_unfinished_requests_skip_terminal_states(self, repo: Repository) -> None:
        views = [
            repo.add_request(make_new_request(f"r{i}", arrival_s=10.0 - i)).view for i in range(5)
        ]
        terminal = (RequestState.FINISHED, RequestState.CANCELLED, RequestState.FAILED)
        repo.update_requests(
            [running(v, state=s) for v, s in zip(views[:3], terminal, strict=True)]
        )
        repo.update_requests([running(views[3], state=RequestState.PAUSED)])

        unfinished = [u.view for u in repo.unfinished_with_inputs()]

        assert [v.request_id for v in unfinished] == ["r4", "r3"]
        assert unfinished[1].state is RequestState.PAUSED

    # -- tokens and timeline ---------------------------------------------------------------

    def test_output_tokens_append_and_read(self, repo: Repository) -> None:
        repo.add_request(make_new_request("r1"))
        repo.append_output_tokens("r1", 0, [5, 6])
        repo.append_output_tokens("r1", 2, [7, 2**32 - 1])

        assert repo.get_output_tokens("r1") == (5, 6, 7, 2**32 - 1)
        assert repo.get_output_tokens("r1", from_index=3) == (2**32 - 1,)
        with pytest.raises(AlreadyExists):
            repo.append_output_tokens("r1", 2, [9])
        with pytest.raises(NotFound):
            repo.append_output_tokens("ghost", 0, [1])
        with pytest.raises(ValueError, match="token_ids"):
            repo.append_output_tokens("r1", 4, [])
        assert repo.get_output_tokens("ghost") == ()

    def test_events_keep_their_order_and_details(self, repo: Repository) -> None:
        repo.add_request(make_new_request("r1"))
        events = [
            RequestEvent("r1", RequestEventKind.QUEUED, 1.0, None, {"prompt_tokens": 3}),
            RequestEvent("r1", RequestEventKind.PAUSED, 2.0, "i-1", {"reason": "short s9"}),
            RequestEvent(
                "r1",
                RequestEventKind.KV_TRANSFER_DONE,
                2.0,
                "i-2",
                {"bytes": 2**40, "duration_s": 0.25, "ok": True},
            ),
        ]

        repo.record_events(events[:1])
        repo.record_events(events[1:])

        assert repo.list_events("r1") == events
        assert repo.list_events("ghost") == []
        with pytest.raises(NotFound):
            repo.record_events([RequestEvent("ghost", RequestEventKind.QUEUED, 1.0)])

    # -- cluster -------------------------------------------------------------------------

    def test_nodes_and_instances_upsert_and_go_down(self, repo: Repository) -> None:
        repo.upsert_node(make_node("node-a"))
        repo.upsert_node(make_node("node-b"))
        repo.upsert_instance(make_instance("i-2", "node-a", tp=2))
        repo.upsert_instance(make_instance("i-1", "node-a"))
        repo.upsert_instance(make_instance("i-3", "node-b"))
        repo.upsert_instance(make_instance("i-2", "node-b"))  # moved: node-a no longer has it
        repo.touch_node("node-a", 9.0)

        down = repo.mark_node_down("node-a", 10.0)

        assert down == ["i-1"]
        nodes = repo.list_nodes()
        assert [(n.node_id, n.state, n.last_heartbeat_s) for n in nodes] == [
            ("node-a", NodeState.DOWN, 9.0),
            ("node-b", NodeState.UP, 1.0),
        ]
        assert repo.mark_node_down("node-b", 11.0) == ["i-2", "i-3"]

    def test_missing_cluster_rows(self, repo: Repository) -> None:
        repo.upsert_node(make_node())

        with pytest.raises(NotFound):
            repo.upsert_instance(make_instance("i-9", "ghost-node"))
        with pytest.raises(NotFound):
            repo.touch_node("ghost", 3.0)
        with pytest.raises(NotFound):
            repo.mark_node_down("ghost", 3.0)
        with pytest.raises(ValueError, match="instance_id"):
            repo.upsert_instance(make_instance("a,b"))

    # -- API keys ------------------------------------------------------------------------

    def test_api_keys_verify_until_revoked(self, repo: Repository) -> None:
        record, key = repo.create_api_key(ApiKeyRole.ADMIN, "acme", 5.0)
        _, other_key = repo.create_api_key(ApiKeyRole.CLIENT, "beta", 6.0)

        assert repo.verify_api_key(key) == record
        assert record.role is ApiKeyRole.ADMIN and record.tenant == "acme"
        verified_other = repo.verify_api_key(other_key)
        assert verified_other is not None and verified_other.role is ApiKeyRole.CLIENT
        tampered = key[:-1] + ("A" if key[-1] != "A" else "B")
        for bad in (tampered, "", "garbage", key.replace(record.key_id, "0" * 16)):
            assert repo.verify_api_key(bad) is None
        repo.revoke_api_key(record.key_id, 7.0)
        assert repo.verify_api_key(key) is None
        with pytest.raises(NotFound):
            repo.revoke_api_key("ghost", 7.0)
        with pytest.raises(ValueError, match="tenant"):
            repo.create_api_key(ApiKeyRole.CLIENT, "", 1.0)

    # -- transactions --------------------------------------------------------------------

    def test_outer_transaction_owns_commit_and_rollback(self, repo: Repository) -> None:
        class Boom(Exception):
            pass

        with pytest.raises(Boom), repo.transaction(write=True):
            repo.add_request(make_new_request("r1"))
            repo.record_events([RequestEvent("r1", RequestEventKind.QUEUED, 1.0)])
            with repo.transaction(write=True):  # joins, does not commit
                repo.add_request(make_new_request("r2"))
            raise Boom

        assert repo.list_requests(RequestFilter()).views == ()
        assert repo.list_events("r1") == []
        with repo.transaction(write=True):
            repo.add_request(make_new_request("r3"))
            assert repo.get_request("r3").request_id == "r3"  # reads its own writes
        assert repo.get_request("r3").state is RequestState.QUEUED

    def test_read_only_transactions_refuse_writes(self, repo: Repository) -> None:
        with repo.transaction():
            with pytest.raises(ReadOnlyTransactionError):
                repo.add_request(make_new_request("r1"))
            with pytest.raises(ReadOnlyTransactionError):
                repo.upsert_node(make_node())
            assert repo.list_nodes() == []

        with pytest.raises(NotFound):
            repo.get_request("r1")
