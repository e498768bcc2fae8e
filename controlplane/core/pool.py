"""Indexed pools of instances: one heap per (role, Slot), best = most free KV first.

SHORT_DECODE pools also keep a second heap ordered the other way (most loaded first), so
KV transfers can be bin-packed onto busy decode instances and spare ones empty out.

Heaps use lazy invalidation: every refresh gives the instance a new version and pushes a fresh
entry; entries whose version is stale are skipped when met. Versions come from one counter per
pool, so the entries of an instance that went down never match the record of its return. Heaps are rebuilt when stale
entries dominate, so memory stays O(instances) and each operation is O(log instances).
"""

from __future__ import annotations

import heapq

from controlplane.core.accounting import KvLedger
from controlplane.core.records import InstanceRecord, Slot
from controlplane.core.types import InstanceRole

_Entry = tuple[int, float, str, int]  # (-free KV tokens, tiebreak, instance id, version)
_HeapKey = tuple[InstanceRole, Slot, bool]  # (role, slot, most loaded first)
_PACKED_ROLES = frozenset({InstanceRole.SHORT_DECODE})  # roles with a most-loaded heap too


class InstancePool:
    """Offers instances by (role, Slot), most free KV first; `classify` decides the Slot."""

    def __init__(self, ledger: KvLedger, max_decode_batch: int) -> None:
        self._ledger = ledger
        self._max_decode_batch = max_decode_batch
        self._instances: dict[str, InstanceRecord] = {}
        self._heaps: dict[_HeapKey, list[_Entry]] = {}
        self._num_entries = 0
        self._versions = 0  # the last version handed out, to any instance
        self.num_offers: dict[tuple[InstanceRole, Slot], int] = {}  # pushes per pool, ever
        self.total_offers = 0  # pushes in any pool, ever

    def add(self, inst: InstanceRecord) -> None:
        """Start offering `inst` (it must be in the ledger already)."""
        self._instances[inst.instance_id] = inst
        self.refresh(inst)

    def remove(self, inst: InstanceRecord) -> None:
        """Stop offering `inst`; its heap entries become stale."""
        del self._instances[inst.instance_id]
        self._bump(inst)
        inst.slot = Slot.BUSY

    def change_role(self, inst: InstanceRecord, role: InstanceRole) -> None:
        """Give `inst` another role and offer it in that role's pools."""
        inst.role = role
        self._bump(inst)
        inst.slot = Slot.BUSY
        inst.offered_free = -1  # forces a fresh offer
        self.refresh(inst)

    def classify(self, inst: InstanceRecord) -> Slot:
        """The Slot `inst` belongs in now (pure)."""
        if inst.role is InstanceRole.SHORT_DECODE:
            return Slot.OPEN if len(inst.decoding) < self._max_decode_batch else Slot.BUSY
        if inst.prefill_id is not None or inst.held_for is not None:
            return Slot.BUSY
        if len(inst.decoding) >= self._max_decode_batch:
            return Slot.BUSY
        if inst.paused:
            return Slot.PAUSED_HOST
        if inst.num_long_decoding:
            return Slot.LONG_DECODE
        return Slot.OPEN

    def refresh(self, inst: InstanceRecord) -> None:
        """Re-offer `inst` after any change to its work or KV (no-op when nothing moved)."""
        instance_id = inst.instance_id
        if instance_id not in self._instances:
            return
        slot = self.classify(inst)
        free = 0 if slot is Slot.BUSY else self._ledger.free_tokens(instance_id)
        if slot is inst.slot and free == inst.offered_free:
            return  # its heap entry (if any) is still exact
        self._bump(inst)
        inst.slot = slot
        inst.offered_free = free
        if slot is Slot.BUSY:
            return
        key = (inst.role, slot)
        entry = (-free, inst.tiebreak, instance_id, inst.version)
        heapq.heappush(self._heaps.setdefault((*key, False), []), entry)
        if inst.role in _PACKED_ROLES:
            packed = (free, inst.tiebreak, instance_id, inst.version)
            heapq.heappush(self._heaps.setdefault((*key, True), []), packed)
            self._num_entries += 1
        self.num_offers[key] = self.num_offers.get(key, 0) + 1
        self.total_offers += 1
        self._num_entries += 1
        if self._num_entries > 8 * len(self._instances) + 64:
            self._rebuild()

    def offers(self, role: InstanceRole, slot: Slot) -> int:
        """How many times an instance was (re-)offered in (role, slot): grows on every chance
        that a placement refused earlier would now succeed."""
        return self.num_offers.get((role, slot), 0)

    def best(self, role: InstanceRole, slot: Slot) -> InstanceRecord | None:
        """The instance of `role` in `slot` with the most free KV, or None. Changes nothing."""
        heap = self._heaps.get((role, slot, False))
        while heap:
            inst = self._valid(heap[0])
            if inst is not None:
                return inst
            heapq.heappop(heap)
            self._num_entries -= 1
        return None

    def top(
        self, role: InstanceRole, slot: Slot, limit: int, *, most_loaded: bool = False
    ) -> list[InstanceRecord]:
        """Up to `limit` instances of `role` in `slot`, most free KV first (least free first
        with `most_loaded`, SHORT_DECODE only). Changes nothing."""
        assert not most_loaded or role in _PACKED_ROLES, f"no most-loaded order for {role}"
        key = (role, slot, most_loaded)
        heap = self._heaps.get(key)
        found: list[tuple[_Entry, InstanceRecord]] = []
        while heap and len(found) < limit:
            entry = heapq.heappop(heap)
            self._num_entries -= 1
            inst = self._valid(entry)
            if inst is not None:
                found.append((entry, inst))
        for entry, _ in found:
            heapq.heappush(self._heaps[key], entry)
            self._num_entries += 1
        return [inst for _, inst in found]

    def _bump(self, inst: InstanceRecord) -> None:
        self._versions += 1
        inst.version = self._versions

    def _valid(self, entry: _Entry) -> InstanceRecord | None:
        inst = self._instances.get(entry[2])
        if inst is None or inst.version != entry[3]:
            return None
        return inst

    def _rebuild(self) -> None:
        self._heaps = {}
        self._num_entries = 0
        for inst in self._instances.values():
            if inst.slot is Slot.BUSY:
                continue
            entry = (-inst.offered_free, inst.tiebreak, inst.instance_id, inst.version)
            self._heaps.setdefault((inst.role, inst.slot, False), []).append(entry)
            self._num_entries += 1
            if inst.role in _PACKED_ROLES:
                packed = (inst.offered_free, inst.tiebreak, inst.instance_id, inst.version)
                self._heaps.setdefault((inst.role, inst.slot, True), []).append(packed)
                self._num_entries += 1
        for heap in self._heaps.values():
            heapq.heapify(heap)
