"""`sarathi`: vLLM-v1 / Sarathi-Serve chunked-prefill mixing behind a load-balancing router.

Every instance runs mixed batches (`actions.Colocate` with `mixed_batch_tokens`): each iteration
takes its decodes first, then its prefills in flight in admission order, each at most its chunk,
until `sarathi_batch_tokens` tokens in all (vLLM `max_num_batched_tokens`). A prompt longer than
`sarathi_long_prefill_tokens` gets at most that many tokens per iteration (vLLM V1's use of
`long_prefill_token_threshold`); shorter ones take what the budget leaves. An instance has at
most `sarathi_max_partial_prefills` prefills in flight (`max_num_partial_prefills`), at most
`sarathi_max_long_partial_prefills` of them LONG (`max_long_partial_prefills`). vLLM V0 counts
every prompt above `long_prefill_token_threshold` as long there; here the LONG class does (the
threshold every policy uses), so a 1-4K prompt never waits for a long place (in sarathi's
favour). Nothing is preempted; every request decodes where it prefilled (no disaggregation).

Routing (the cluster router in front of the engines): requests leave one queue first come first
served; each goes to the instance with the fewest outstanding prefill tokens (prompt tokens of
its prefills in flight), then the fewest decodes, that has a free prefill place of its kind, KV
room for prompt + output and a decode place. The router binds a request only once an instance
can take it (late binding, a little better than a router that queues at the engines). A long
prompt waiting for a long place does not hold back the shorter prompts behind it; a request that
finds no place otherwise stops the queue.

A prompt whose KV no single instance holds runs as `fifo` runs it: a chunked SP prefill over the
fewest instances that hold it, then decodes there. Its instances are gathered one by one as their
mixed prefills drain (held meanwhile, so a stream of short prompts cannot starve it).
"""

from __future__ import annotations

from controlplane.core.actions import Action
from controlplane.core.base import BasePolicy, rank_order
from controlplane.core.config import SchedulerConfig
from controlplane.core.records import InstanceRecord, RequestRecord
from controlplane.core.roles import all_general
from controlplane.core.tiebreak import Tiebreak
from controlplane.core.types import InstanceRole, RequestClass, RequestState

_PREFILLING = RequestState.PREFILLING


class SarathiPolicy(BasePolicy):
    """Mixed prefill/decode batches on every instance, routed by outstanding prefill tokens."""

    def __init__(self, name: str, config: SchedulerConfig, rng: Tiebreak) -> None:
        super().__init__(name, config, rng, all_general)
        # instance id -> {request id: is LONG} of its mixed prefills in flight;
        # entries of requests no longer prefilling there are dropped when next looked at
        self._in_flight: dict[str, dict[str, bool]] = {}

    def _plan(self, now_s: float, out: list[Action]) -> None:
        longs_open = True  # False once the oldest long found no place: shorts may pass it
        while True:
            short = self._head(RequestClass.SHORT)
            long = self._head(RequestClass.LONG) if longs_open else None
            if long is not None and (short is None or _key(long) < _key(short)):
                req = long
            elif short is not None:
                req = short
            else:
                return
            if self._place(req, now_s, out) or self._reject_if_never_fits(req, out):
                continue
            if req is short:
                return
            longs_open = False

    def _place(self, req: RequestRecord, now_s: float, out: list[Action]) -> bool:
        cfg, st = self._config, self._state
        capacities = st.census.capacities(InstanceRole.GENERAL)
        if capacities and req.spec.total_tokens > capacities[-1]:
            return self._place_sp(req, now_s, out)
        is_long = req.request_class is RequestClass.LONG
        inst = self._route(req, is_long)
        if inst is None:
            return False
        chunk = cfg.sarathi_batch_tokens
        if req.spec.prompt_tokens > cfg.sarathi_long_prefill_tokens:
            chunk = cfg.sarathi_long_prefill_tokens
        load = self._outstanding_tokens(inst.instance_id)
        reason = f"least outstanding prefill tokens ({load}): {inst.instance_id}"
        action = st.start_mixed_prefill(
            req,
            inst,
            chunk_tokens=chunk,
            batch_tokens=cfg.sarathi_batch_tokens,
            now_s=now_s,
            reason=reason,
        )
        self._in_flight.setdefault(inst.instance_id, {})[req.request_id] = is_long
        out.append(action)
        return True

    def _route(self, req: RequestRecord, is_long: bool) -> InstanceRecord | None:
        """The least loaded instance with a free prefill place of `req`'s kind and room."""
        cfg, st = self._config, self._state
        need = req.spec.total_tokens
        best: InstanceRecord | None = None
        best_key: tuple[int, int, float] | None = None
        for inst in st.instances.values():
            iid = inst.instance_id
            if (
                inst.prefill_id is not None
                or inst.held_for is not None
                or len(inst.decoding) >= cfg.max_decode_batch
                or not st.ledger.can_allocate(iid, need)
            ):
                continue
            flight = self._live(iid)
            num_long = sum(flight.values())
            if len(flight) >= cfg.sarathi_max_partial_prefills or (
                is_long and num_long >= cfg.sarathi_max_long_partial_prefills
            ):
                continue
            key = (self._outstanding_tokens(iid), len(inst.decoding), inst.tiebreak)
            if best_key is None or key < best_key:
                best, best_key = inst, key
        return best

    def _place_sp(self, req: RequestRecord, now_s: float, out: list[Action]) -> bool:
        """Hold drained instances until they can hold `req`'s KV, then SP-prefill it there."""
        cfg, st = self._config, self._state
        held = [st.instances[i] for i in req.held_ids if i in st.instances]
        need = req.spec.total_tokens
        capacity = sum(st.ledger.capacity(i.instance_id) for i in held)
        if capacity < need:
            for inst in self._drained():
                if len(held) >= cfg.max_sp_degree or capacity >= need:
                    break
                st.hold(req, inst)
                held.append(inst)
                capacity += st.ledger.capacity(inst.instance_id)
        if sum(st.ledger.free_tokens(i.instance_id) for i in held) < need:
            return False  # the held instances' decodes still hold KV: they finish
        group = rank_order(st.release_holds(req))
        reason = f"SP group of {len(group)} holding {need} KV tokens (too long for one)"
        out.append(st.start_prefill(req, group, decode_in_place=True, now_s=now_s, reason=reason))
        return True

    def _drained(self) -> list[InstanceRecord]:
        """GENERAL instances free for an SP prefill (no prefill in flight, not held), most free
        KV first."""
        st = self._state
        free = [
            inst
            for inst in st.instances.values()
            if inst.role is InstanceRole.GENERAL
            and inst.prefill_id is None
            and inst.held_for is None
            and not self._live(inst.instance_id)
        ]
        return sorted(free, key=lambda i: (-st.ledger.free_tokens(i.instance_id), i.tiebreak))

    def _live(self, instance_id: str) -> dict[str, bool]:
        """The mixed prefills still in flight on `instance_id` (drops finished ones)."""
        flight = self._in_flight.get(instance_id)
        if not flight:
            return {}
        requests = self._state.requests
        for rid in [r for r in flight if not _prefilling_on(requests.get(r), instance_id)]:
            del flight[rid]
        return flight

    def _outstanding_tokens(self, instance_id: str) -> int:
        requests = self._state.requests
        return sum(requests[r].spec.prompt_tokens for r in self._live(instance_id))


def _key(req: RequestRecord) -> tuple[int, int]:
    return (-req.spec.priority, req.seq)


def _prefilling_on(req: RequestRecord | None, instance_id: str) -> bool:
    return req is not None and req.state is _PREFILLING and req.prefill_ids == (instance_id,)
