"""A tiny deterministic data plane that plays the agents' role against a core policy.

Time advances in steps of 1 s. Per step: every running prefill finishes one chunk (a pause
takes effect after that chunk), a KV transfer started in the previous step completes, and every
decoding request generates `tokens_per_step` tokens. Faults (transfer failures, instance
deaths, cancels, retryable failures) are injected by the caller through `inject` or the seeded
`fault_rate`. After each schedule() the caller may check the invariants with `check_invariants`.

Why it is not SimAgent (tests/integration/controlplane/cp_sim_agent.py, the one agent over the
wire): it works a layer below, on a core `Policy` alone (events in, actions out; no runtime,
store or gRPC) in virtual time, so the core's property and determinism tests run thousands of
seeded steps in milliseconds and replay exactly. SimAgent plays the Attach protocol against a
running control plane in real time.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass, field

from controlplane.core import actions as act
from controlplane.core import events as ev
from controlplane.core.policy import Policy
from controlplane.core.types import RequestSpec, RequestState


@dataclass
class Job:
    """A prefill running (or paused) on the fake data plane."""

    request_id: str
    num_chunks: int
    next_chunk: int
    decode_in_place: bool
    group: tuple[str, ...]
    pause_pending: bool = False
    paused: bool = False


@dataclass
class FakeDataPlane:
    """Carries out decisions and reports events, one step at a time."""

    policy: Policy
    specs: dict[str, RequestSpec] = field(default_factory=dict)
    tokens_per_step: int = 4
    fault_rate: float = 0.0
    rng: random.Random = field(default_factory=lambda: random.Random(0))
    now_s: float = 0.0
    jobs: dict[str, Job] = field(default_factory=dict)
    decoding: dict[str, int] = field(default_factory=dict)  # request -> tokens left
    decode_at: dict[str, tuple[str, ...]] = field(default_factory=dict)  # request -> instances
    transfers: dict[str, str] = field(default_factory=dict)  # request -> dst
    chunks_run: dict[str, list[int]] = field(default_factory=dict)
    log: list[str] = field(default_factory=list)
    pending: list[ev.Event] = field(default_factory=list)
    mixed: set[str] = field(default_factory=set)  # admitted as mixed prefills (no slot held)

    def inject(self, *events: ev.Event) -> None:
        """Report `events` with the next step's progress; a dead instance's work stops."""
        for event in events:
            if isinstance(event, ev.InstanceDown):
                self._kill(event.instance_id)
        self.pending.extend(events)

    def _kill(self, instance_id: str) -> None:
        for request_id in sorted(self.jobs):
            if instance_id in self.jobs[request_id].group:
                del self.jobs[request_id]
        for request_id in sorted(self.decoding):
            if instance_id in self.decode_at.get(request_id, ()):
                del self.decoding[request_id]
        for request_id in sorted(self.transfers):
            if self.transfers[request_id] == instance_id:
                del self.transfers[request_id]

    def submit(self, spec: RequestSpec) -> None:
        """A client submits `spec` now."""
        self.specs[spec.request_id] = spec
        self.pending.append(ev.RequestArrived(spec, self.now_s))

    def step(self) -> act.Decision:
        """Advance one step: report progress, observe, schedule, carry out the decision."""
        events = self.pending + self._progress()
        self.pending = []
        self.policy.observe(events)
        decision = self.policy.schedule(self.now_s)
        for action in decision.actions:
            self.log.append(f"{self.now_s:.1f} {action!r}")
            self._apply(action)
        self.now_s += 1.0
        return decision

    # ---- progress ------------------------------------------------------------------------

    def _progress(self) -> list[ev.Event]:
        out: list[ev.Event] = []
        t = self.now_s
        for request_id in sorted(self.transfers):
            dst = self.transfers.pop(request_id)
            ok = not (self.fault_rate and self.rng.random() < self.fault_rate)
            out.append(ev.KVTransferDone(request_id, dst, ok, t, "" if ok else "fake failure"))
        for request_id in sorted(self.jobs):
            job = self.jobs[request_id]
            if job.paused:
                continue
            self.chunks_run.setdefault(request_id, []).append(job.next_chunk)
            job.next_chunk += 1
            if job.next_chunk == job.num_chunks:
                del self.jobs[request_id]
                out.append(ev.PrefillDone(request_id, t))
                out.append(ev.TokensGenerated(request_id, 1, t))
                left = self.specs[request_id].max_new_tokens - 1
                if left == 0:
                    out.append(ev.RequestFinished(request_id, t))
                elif job.decode_in_place:
                    self.decoding[request_id] = left
                    self.decode_at[request_id] = job.group
                continue
            out.append(ev.PrefillChunkDone(request_id, job.next_chunk - 1, t))
            if job.pause_pending:
                job.paused, job.pause_pending = True, False
                out.append(ev.PrefillPaused(request_id, job.next_chunk, t))
        for request_id in sorted(self.decoding):
            n = min(self.tokens_per_step, self.decoding[request_id])
            self.decoding[request_id] -= n
            out.append(ev.TokensGenerated(request_id, n, t))
            if self.decoding[request_id] == 0:
                del self.decoding[request_id]
                out.append(ev.RequestFinished(request_id, t))
        return out

    # ---- actions -------------------------------------------------------------------------

    def _apply(self, action: act.Action) -> None:
        match action:
            case act.StartPrefill():
                self.mixed.discard(action.request_id)  # placed again, as a plain prefill
                self.jobs[action.request_id] = Job(
                    action.request_id,
                    action.num_chunks,
                    action.first_chunk_index,
                    action.decode_in_place,
                    action.instance_ids,
                )
            case act.Colocate():
                if action.mixed_batch_tokens:
                    self.mixed.add(action.request_id)
                else:
                    self.mixed.discard(action.request_id)
                self.jobs[action.request_id] = Job(
                    action.request_id,
                    action.num_chunks,
                    0,
                    action.decode_in_place,
                    (action.host_instance_id,),
                )
            case act.Pause():
                self.jobs[action.request_id].pause_pending = True
            case act.Resume():
                job = self.jobs[action.request_id]
                job.pause_pending = job.paused = False
            case act.TransferKV():
                self.transfers[action.request_id] = action.dst_instance_id
            case act.StartDecode():
                self.decoding[action.request_id] = self.specs[action.request_id].max_new_tokens - 1
                self.decode_at[action.request_id] = (action.instance_id,)
            case act.Cancel():
                self.jobs.pop(action.request_id, None)
                self.decoding.pop(action.request_id, None)
                self.transfers.pop(action.request_id, None)
            case act.Reject():
                pass


def check_invariants(
    policy: Policy, now_s: float, request_ids: Iterable[str] = (), mixed: Iterable[str] = ()
) -> None:
    """KV within capacity everywhere; every request is in at most one place at a time.

    `request_ids` (tracked, not yet taken) also get their prefill slots checked: a PREFILLING
    request holds the slot of every instance of its group (unless admitted as a mixed prefill,
    one of `mixed`, which shares its instance and holds no slot), a PAUSED one holds none.
    """
    view = policy.cluster_view(now_s)
    slot_of = {i.spec.instance_id: i.prefill_request_id for i in view.instances}
    mixed = set(mixed)
    for request_id in request_ids:
        req = policy.request_view(request_id)
        if req.state is RequestState.PREFILLING and request_id in mixed:
            assert request_id not in slot_of.values(), req
        elif req.state is RequestState.PREFILLING:
            assert all(slot_of.get(i) == request_id for i in req.prefill_instance_ids), req
        elif req.state is not RequestState.QUEUED:
            assert request_id not in slot_of.values(), req
    where: dict[str, set[str]] = {}
    for inst in view.instances:
        assert 0 <= inst.kv_used_tokens <= inst.spec.kv_capacity_tokens, inst
        for request_id in inst.request_ids:
            where.setdefault(request_id, set()).add(inst.spec.instance_id)
        if inst.prefill_request_id is not None:
            req = policy.request_view(inst.prefill_request_id)
            assert req.state is RequestState.PREFILLING, (inst, req)
            assert inst.spec.instance_id in req.prefill_instance_ids, (inst, req)
    for request_id, instance_ids in where.items():
        req = policy.request_view(request_id)
        assert not req.state.is_terminal and req.state is not RequestState.QUEUED, req
        allowed = set(req.prefill_instance_ids) | set(req.decode_instance_ids)
        extra = instance_ids - allowed
        if req.state is RequestState.TRANSFERRING_KV:
            assert len(extra) <= 1, (req, instance_ids)  # the reserved transfer destination
        else:
            assert not extra, (req, instance_ids)
        if req.state is RequestState.DECODING:
            assert instance_ids == set(req.decode_instance_ids), (req, instance_ids)
