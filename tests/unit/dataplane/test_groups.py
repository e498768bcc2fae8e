"""Topology math, group specs, and the group manager's life cycle (in-process gloo ranks)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from dataplane.parallel.groups import (
    Group,
    GroupError,
    GroupManager,
    GroupSpec,
    connect_store,
    make_backend_factory,
)
from dataplane.parallel.topology import (
    HeadShard,
    SpKind,
    choose_sp_kind,
    chunk_bounds,
    decode_owner,
    head_shards,
    offsets,
    ring_neighbors,
    split_evenly,
    split_weighted,
)


@given(st.integers(0, 10_000), st.integers(1, 64))
def test_split_evenly_covers_total_with_sizes_within_one(total: int, parts: int) -> None:
    sizes = split_evenly(total, parts)

    assert sum(sizes) == total and len(sizes) == parts
    assert max(sizes) - min(sizes) <= 1
    assert list(sizes) == sorted(sizes, reverse=True)


@given(st.integers(0, 10_000), st.lists(st.floats(0.1, 10.0), min_size=1, max_size=8))
def test_split_weighted_sums_to_total_and_follows_weights(total: int, weights: list[float]) -> None:
    sizes = split_weighted(total, tuple(weights))

    assert sum(sizes) == total
    for size, weight in zip(sizes, weights, strict=True):
        assert abs(size - total * weight / sum(weights)) < 1.0 + 1e-9


def test_head_shards_replicate_kv_heads_under_gqa_and_reject_too_many_members() -> None:
    # 8 query heads, 2 KV heads over 4 members: each member reads one KV head, shared by two.
    assert head_shards(8, 2, 4) == (
        HeadShard(0, 2, 0, 1),
        HeadShard(2, 4, 0, 1),
        HeadShard(4, 6, 1, 2),
        HeadShard(6, 8, 1, 2),
    )
    # 4 query heads over 3 members (2, 1, 1) without GQA.
    assert [s.num_q_heads for s in head_shards(4, 4, 3)] == [2, 1, 1]
    # A member straddling two GQA groups gets both KV heads.
    assert head_shards(8, 2, 3)[1] == HeadShard(3, 6, 0, 2)
    with pytest.raises(ValueError, match="size <= num_heads"):
        head_shards(4, 2, 5)
    with pytest.raises(ValueError, match="num_kv_heads"):
        head_shards(6, 4, 2)


def test_small_topology_helpers() -> None:
    assert offsets((3, 0, 4)) == (0, 3, 3)
    assert choose_sp_kind(SpKind.ULYSSES, 4, 8) is SpKind.RING
    assert choose_sp_kind(SpKind.ULYSSES, 4, 4) is SpKind.ULYSSES
    assert choose_sp_kind(SpKind.RING, 32, 2) is SpKind.RING
    assert ring_neighbors(0, 3) == (1, 2) and ring_neighbors(2, 3) == (0, 1)
    assert decode_owner((5, 3, 3)) == 1
    assert chunk_bounds(10, 4) == ((0, 4), (4, 8), (8, 10))
    with pytest.raises(ValueError, match="chunk_tokens"):
        chunk_bounds(10, 0)
    with pytest.raises(ValueError, match="rank"):
        ring_neighbors(3, 3)


def test_group_spec_validates_and_names_the_group() -> None:
    spec = GroupSpec("sp-1", ("a", "b"))

    assert spec.size == 2 and spec.rank_of("b") == 1
    with pytest.raises(ValueError, match="'c' is not in group 'sp-1'"):
        spec.rank_of("c")
    with pytest.raises(ValueError, match="repeat"):
        GroupSpec("sp-2", ("a", "a"))
    with pytest.raises(ValueError, match="group_id"):
        GroupSpec("", ("a",))


@pytest.fixture
def managers() -> Any:
    master = connect_store("127.0.0.1", 0, 20.0, is_master=True)
    factory = make_backend_factory("cpu", "127.0.0.1")
    # One store client per manager, as in separate workers (a client serialises its calls).
    pair = [
        GroupManager(connect_store("127.0.0.1", master.port, 20.0), name, factory, 20.0)
        for name in ("w0", "w1")
    ]
    yield pair
    for manager in pair:
        manager.close()


def _connect_both(managers: list[GroupManager], spec: GroupSpec) -> list[Group]:
    with ThreadPoolExecutor(2) as pool:
        return list(pool.map(lambda m: m.connect(spec), managers))


def test_groups_are_created_on_demand_cached_and_exchange_tensors(
    managers: list[GroupManager],
) -> None:
    # Prepare: no default group exists; the pair rendezvous through the store only.
    spec = GroupSpec("pair-1", ("w0", "w1"))

    # Execute
    g0, g1 = _connect_both(managers, spec)
    out0, out1 = torch.zeros(3), torch.zeros(3)
    with ThreadPoolExecutor(2) as pool:
        pool.submit(g0.send_recv, torch.full((3,), 1.0), 1, out0, 1)
        pool.submit(g1.send_recv, torch.full((3,), 2.0), 0, out1, 0)

    # Assert
    assert managers[0].connect(spec) is g0  # cached
    assert (g0.rank, g1.rank) == (0, 1)
    assert torch.equal(out0, torch.full((3,), 2.0)) and torch.equal(out1, torch.full((3,), 1.0))


def test_member_left_destroys_its_groups_and_ids_are_single_use(
    managers: list[GroupManager],
) -> None:
    # Prepare
    spec = GroupSpec("sp-7", ("w0", "w1"))
    g0, _ = _connect_both(managers, spec)
    solo = managers[0].connect(GroupSpec("solo-1", ("w0",)))

    # Execute
    destroyed = managers[0].member_left("w1")

    # Assert
    assert destroyed == ("sp-7",) and managers[0].group_ids() == ("solo-1",)
    with pytest.raises(GroupError, match="used after close"):
        g0.barrier()
    with pytest.raises(ValueError, match="fresh id"):
        managers[0].connect(spec)
    solo.barrier()  # other groups keep working
    with pytest.raises(ValueError, match="not in group"):
        managers[0].connect(GroupSpec("other", ("w1", "w2")))


def test_rendezvous_without_the_peer_fails_within_the_timeout() -> None:
    # Prepare
    store = connect_store("127.0.0.1", 0, 5.0, is_master=True)
    manager = GroupManager(store, "w0", make_backend_factory("cpu", "127.0.0.1"), 1.0)

    # Execute / Assert
    with pytest.raises(GroupError, match="rendezvous failed"):
        manager.connect(GroupSpec("lonely", ("w0", "w-missing")))
    with pytest.raises(ValueError, match="fresh id"):
        manager.connect(GroupSpec("lonely", ("w0", "w-missing")))
    manager.close()


def test_a_rendezvous_waiting_for_an_absent_peer_holds_up_no_other_group(
    managers: list[GroupManager],
) -> None:
    # Prepare: w0 starts a group whose other member never comes (a transfer the control plane
    # gave up on). Before each group had a store connection of its own, that rendezvous held
    # w0's one connection for the whole group timeout (20 s here, 30 s live), and every other
    # group w0 started meanwhile waited behind it: the live cluster's transfers stalled so.
    stuck = managers[0].connect_async(GroupSpec("kv/abandoned", ("w0", "w-gone")))
    spec = GroupSpec("kv/next", ("w0", "w1"))

    # Execute
    futures = [manager.connect_async(spec) for manager in managers]

    # Assert: the next group forms while the first still waits
    g0, g1 = (future.result(timeout=10.0) for future in futures)
    assert (g0.rank, g1.rank) == (0, 1) and not stuck.done()


def test_all_to_all_checks_split_counts(managers: list[GroupManager]) -> None:
    solo = managers[0].connect(GroupSpec("solo-2", ("w0",)))

    with pytest.raises(ValueError, match="splits need 1 entries"):
        solo.all_to_all(torch.zeros(2), torch.zeros(2), [1, 1], [2])


def test_a_group_destroyed_during_its_rendezvous_is_closed_when_the_rendezvous_ends(
    managers: list[GroupManager],
) -> None:
    # Prepare: w0 starts joining, then gives the group up (its SP request was cancelled)
    spec = GroupSpec("sp/cancelled", ("w0", "w1"))
    abandoned = managers[0].connect_async(spec)
    managers[0].destroy(spec.group_id)

    # Execute: w1 joins late, so the rendezvous completes on both sides
    g1 = managers[1].connect(spec)

    # Assert: w0 keeps no group, and w1's first collective fails instead of waiting for w0
    # (within half the group timeout of 20 s)
    with pytest.raises(GroupError, match="destroyed during its rendezvous"):
        abandoned.result(timeout=10.0)
    assert managers[0].get(spec.group_id) is None
    with ThreadPoolExecutor(1) as pool:
        barrier = pool.submit(g1.barrier)
        with pytest.raises(GroupError):
            barrier.result(timeout=10.0)
