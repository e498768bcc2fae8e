"""KV ledger, even splits and the pure admission check."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from controlplane.core.accounting import KvLedger, check_fits, split_tokens
from controlplane.core.errors import CoreError, ErrorCode, KvCapacityError


def test_allocate_free_and_refuse_over_capacity() -> None:
    # Prepare
    ledger = KvLedger()
    ledger.add_instance("a", 100)
    ledger.allocate("r1", "a", 60)

    # Execute / Assert
    assert ledger.can_allocate("a", 40) and not ledger.can_allocate("a", 41)
    with pytest.raises(KvCapacityError) as info:
        ledger.allocate("r2", "a", 41)
    assert info.value.code is ErrorCode.KV_CAPACITY_EXCEEDED
    assert (info.value.tokens, info.value.free_tokens) == (41, 40)
    assert ledger.used("a") == 60 and ledger.requests_on("a") == ("r1",)
    assert ledger.free("r1", "a") == 60 and ledger.used("a") == 0
    assert ledger.free("r1", "a") == 0


def test_remove_instance_drops_its_allocations_only() -> None:
    # Prepare
    ledger = KvLedger()
    ledger.add_instance("a", 100)
    ledger.add_instance("b", 100)
    ledger.allocate("r1", "a", 10)
    ledger.allocate("r1", "b", 20)

    # Execute
    holders = ledger.remove_instance("a")

    # Assert
    assert holders == ("r1",)
    assert ledger.holdings("r1") == {"b": 20}
    with pytest.raises(CoreError) as info:
        ledger.used("a")
    assert info.value.code is ErrorCode.UNKNOWN_INSTANCE


def test_duplicate_instance_is_refused() -> None:
    ledger = KvLedger()
    ledger.add_instance("a", 1)
    with pytest.raises(CoreError) as info:
        ledger.add_instance("a", 1)
    assert info.value.code is ErrorCode.DUPLICATE_INSTANCE


@given(
    ops=st.lists(
        st.tuples(st.sampled_from("abc"), st.sampled_from(["r1", "r2", "r3"]), st.integers(0, 70)),
        max_size=60,
    )
)
def test_ledger_never_exceeds_capacity(ops: list[tuple[str, str, int]]) -> None:
    # Prepare
    ledger = KvLedger()
    for name in "abc":
        ledger.add_instance(name, 100)

    # Execute: allocate when it fits, otherwise free that request there
    for instance_id, request_id, tokens in ops:
        if ledger.can_allocate(instance_id, tokens):
            ledger.allocate(request_id, instance_id, tokens)
        else:
            ledger.free(request_id, instance_id)

        # Assert
        for name in "abc":
            held = sum(ledger.holdings(r).get(name, 0) for r in ("r1", "r2", "r3"))
            assert held == ledger.used(name) <= ledger.capacity(name)


@given(tokens=st.integers(0, 10_000), free=st.lists(st.integers(0, 5_000), min_size=1, max_size=8))
def test_split_tokens_is_even_within_room(tokens: int, free: list[int]) -> None:
    if sum(free) < tokens:
        return
    shares = split_tokens(tokens, free)
    assert sum(shares) == tokens
    assert all(0 <= s <= f for s, f in zip(shares, free, strict=True))
    uncapped = [s for s, f in zip(shares, free, strict=True) if s < f]
    if uncapped:  # instances with room left got the largest shares (water-filling)
        assert max(shares) - min(uncapped) <= 1


def test_check_fits_names_the_numbers() -> None:
    # Execute
    ok = check_fits(250, [100, 100, 100], 3, "general instances")
    too_big = check_fits(250, [100, 100, 100], 2, "general instances")
    empty = check_fits(10**9, [], 8, "general instances")

    # Assert
    assert ok.ok and empty.ok
    assert not too_big.ok and too_big.field == "prompt_tokens"
    assert "250" in too_big.reason and "200" in too_big.reason
