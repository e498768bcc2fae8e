"""A worker's sequence-parallel requests: chunked SP prefill and sharded decode, in lockstep
with the other members of each request's group.

Every member holds an `SpJob` for the request, in the same admission order (the agent sends
the commands to all members in one order, and a job connects its group before the next is
admitted, so collectives of different jobs never interleave differently on two members).
The group's rendezvous runs off the worker's thread (`admit` starts it, `poll_join` finishes
the admission once it completed); meanwhile no job issues a collective (as if the join
blocked), and `abort_join` gives the join up at once (a Cancel of the request).
Each `run_once` advances every live job by one collective step: a 2-flag `all_reduce_max`
agreement (pause requested, cancel requested) so that all members stop at the same chunk
boundary, then one prefill chunk or one decode token. Only the prefill pauses: a Pause agreed
on once the prompt is done is dropped. A paused job issues no collectives;
its KV (rows of the engine's pool) stays resident. Resume re-enters the agreement, which
waits for the members that have not seen Resume yet.

Rank 0 reports the progress (PrefillChunkDone, PrefillDone, Tokens); every member reports Paused,
Finished, Cancelled and Failed, so that the agent of each node in the group knows what its own
members hold (it sends progress on from rank 0 only, and de-duplicates the rest). A failed
collective (peer died, timeout) frees this member's KV and reports Failed(retryable).
"""

from __future__ import annotations

import math
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from dataplane.engine.engine import Engine
from dataplane.engine.errors import EngineError, EngineErrorCode
from dataplane.engine.sampling import sample_tokens
from dataplane.engine.types import FinishReason, SamplingParams
from dataplane.parallel.groups import Group, GroupError, GroupManager, GroupSpec
from dataplane.parallel.sp_runner import SpRequest
from dataplane.parallel.topology import SpKind, head_shards
from dataplane.worker import messages as m


@dataclass(slots=True)
class SpJob:
    """One member's side of one SP request."""

    request: SpRequest
    group: Group
    manager: GroupManager  # destroys the group when the job ends
    sampling: SamplingParams
    generator: torch.Generator | None  # per-request RNG (sampled requests), same seed everywhere
    pause_requested: bool = False  # Pause arrived (or the group agreed to pause)
    cancel_requested: bool = False  # Cancel arrived while running
    paused: bool = False  # the group agreed to pause; no collectives until Resume
    output: list[int] = field(default_factory=list)  # generated tokens

    @property
    def is_reporter(self) -> bool:
        """Rank 0 reports progress for the group."""
        return self.group.rank == 0


@dataclass(frozen=True, slots=True)
class _Join:
    """An admission waiting for its group's rendezvous."""

    cmd: m.SpPrefill
    manager: GroupManager
    group: Future[Group]


class SpJobs:
    """The SP requests of one worker; reports go to the shared `reports` list."""

    def __init__(self, engine: Engine, member_id: str, reports: list[m.WorkerReport]) -> None:
        self.engine = engine
        self.member_id = member_id
        self._reports = reports
        self._jobs: dict[str, SpJob] = {}  # admission order = collective order
        self._join: _Join | None = None  # at most one admission waits for its group

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._jobs

    def __len__(self) -> int:
        return len(self._jobs)

    @property
    def joining(self) -> str | None:
        """The request whose group is being joined (None when no join is pending)."""
        return None if self._join is None else self._join.cmd.request_id

    def has_work(self) -> bool:
        """Whether any job would issue a collective (none does while a join is pending)."""
        return self._join is None and any(not j.paused for j in self._jobs.values())

    def admit(self, cmd: m.SpPrefill, manager: GroupManager) -> None:
        """Start joining the request's group (every member does it now); `poll_join` admits
        the request once the rendezvous completed. No join may be pending."""
        if self._join is not None:
            raise RuntimeError(f"SP group {self._join.cmd.group_id!r} is still being joined")
        if cmd.chunk_tokens < 1:
            raise ValueError(f"chunk_tokens must be >= 1, got {cmd.chunk_tokens}")
        group = manager.connect_async(GroupSpec(cmd.group_id, cmd.member_ids))
        self._join = _Join(cmd, manager, group)

    def poll_join(self) -> None:
        """Admit the joining request if its rendezvous completed (`joining` is None after).

        Raises what admitting raises (GroupError when the rendezvous failed, EngineError
        DOES_NOT_FIT); the join is over then too.
        """
        join = self._join
        if join is None or not join.group.done():
            return
        self._join = None
        self._admit(join.cmd, join.manager, join.group.result())

    def abort_join(self) -> None:
        """Give up the pending join (the request holds nothing yet): its group id is retired,
        and the group closed once its rendezvous ends, so that members that joined fail."""
        join, self._join = self._join, None
        if join is not None:
            join.manager.destroy(join.cmd.group_id)

    def _admit(self, cmd: m.SpPrefill, manager: GroupManager, group: Group) -> None:
        """Reserve the KV on the connected group, atomically over the group.

        The members agree (`all_reduce_max`) on whether every one of them reserved its KV,
        and all refuse with DOES_NOT_FIT otherwise, so no member ever waits in a collective
        for one that refused.
        """
        kind = self.choose_kind(cmd, group.size)
        request: SpRequest | None = None
        error = ""
        try:
            request = SpRequest(
                self.engine.model,
                group,
                cmd.request_id,
                list(cmd.prompt_token_ids),
                max_new_tokens=cmd.sampling.max_new_tokens,
                chunk_tokens=cmd.chunk_tokens,
                kind=kind,
                pool=self.engine.kv,
            )
        except EngineError as exc:
            error = str(exc)
        refused = torch.tensor([int(request is None)], dtype=torch.int64, device=self.engine.device)
        try:
            group.all_reduce_max(refused)
        finally:
            if request is None or refused.item():
                if request is not None:
                    request.free()
                manager.destroy(cmd.group_id)
        if refused.item():
            raise EngineError(
                EngineErrorCode.DOES_NOT_FIT,
                error or "another member of the SP group could not reserve its KV",
            )
        assert request is not None
        generator = None
        if not cmd.sampling.is_greedy:
            generator = torch.Generator(device=self.engine.device).manual_seed(cmd.sampling.seed)
        self._jobs[cmd.request_id] = SpJob(request, group, manager, cmd.sampling, generator)

    def choose_kind(self, cmd: m.SpPrefill, size: int) -> SpKind:
        """The requested kind, except Ulysses falls back to ring when replicating KV heads
        (fewer KV heads than members) would need more rows than this worker's whole pool, while
        ring keeps only each member's own tokens. Depends only on the model, the group size,
        the request and the pool size, so every member of the group decides the same."""
        if cmd.ring:
            return SpKind.RING
        shape = self.engine.model.shape
        if size > shape.num_q_heads:
            return SpKind.RING
        total = len(cmd.prompt_token_ids) + cmd.sampling.max_new_tokens
        widest = max(
            s.num_kv_heads for s in head_shards(shape.num_q_heads, shape.num_kv_heads, size)
        )
        ulysses_rows = math.ceil(total * widest / shape.num_kv_heads)
        return SpKind.RING if ulysses_rows > self.engine.kv.pool_tokens else SpKind.ULYSSES

    def pause(self, request_id: str) -> None:
        """Ask the group to pause at the next chunk boundary."""
        self._jobs[request_id].pause_requested = True

    def resume(self, request_id: str) -> None:
        """Leave the pause (the next agreement waits for the other members)."""
        job = self._jobs[request_id]
        job.pause_requested = job.paused = False

    def cancel(self, request_id: str) -> None:
        """Cancel: at once if paused (no collectives), else at the next agreement."""
        job = self._jobs[request_id]
        if job.paused:
            self._drop(request_id)
            self._reports.append(m.Cancelled(request_id))
        else:
            job.cancel_requested = True

    def request_ids(self) -> list[str]:
        """The SP requests resident here."""
        return list(self._jobs)

    def drop(self, request_id: str) -> None:
        """Free one job without collectives and without a report (a silent drop)."""
        self._drop(request_id)

    # ------------------------------------------------------------------ iteration
    def run_once(self) -> float:
        """One collective step of every live job (none while a join is pending: it keeps its
        place in every member's collective order, as a blocking join did); returns the busy
        seconds."""
        busy_s = 0.0
        if self._join is not None:
            return busy_s
        for rid in list(self._jobs):
            job = self._jobs[rid]
            if job.paused:
                continue
            start_s = time.perf_counter()
            try:
                self._step(rid, job, start_s)
            except GroupError as exc:
                self._drop(rid)
                self._reports.append(m.Failed(rid, f"SP group failed: {exc}", True))
            busy_s += time.perf_counter() - start_s
        return busy_s

    def _step(self, rid: str, job: SpJob, start_s: float) -> None:
        flags = torch.tensor(
            [int(job.pause_requested), int(job.cancel_requested)],
            dtype=torch.int64,
            device=self.engine.device,
        )
        job.group.all_reduce_max(flags)
        pause, cancel = (bool(x) for x in flags.tolist())
        req = job.request
        if pause and req.is_prefill_done:
            # A Pause that crossed the last chunk: only a prefill pauses (the control plane
            # moved the request to decode on PrefillDone and will never resume it). Every
            # member sees the same state here, so all of them go on decoding.
            pause = job.pause_requested = False
        if cancel:
            self._drop(rid)
            self._reports.append(m.Cancelled(rid))
        elif pause:
            job.paused = job.pause_requested = True
            self._reports.append(m.Paused(rid, req.num_chunks_done))
        elif not req.is_prefill_done:
            logits = req.run_next_chunk()
            if job.is_reporter:
                done = req.chunks[req.num_chunks_done - 1][1]  # (start, end) of this chunk
                self._reports.append(
                    m.PrefillChunkDone(
                        rid,
                        req.num_chunks_done - 1,
                        req.num_chunks,
                        done,
                        time.perf_counter() - start_s,
                    )
                )
            if req.is_prefill_done:
                mine = None if logits is None else self._sample(job, logits)
                token = req.share_token(mine)
                if job.is_reporter:
                    self._reports.append(m.PrefillDone(rid, len(req.prompt), token))
                self._emit_token(rid, job, token)
        else:
            self._emit_token(rid, job, self._sample(job, req.decode(job.output[-1])))

    def _sample(self, job: SpJob, logits: torch.Tensor) -> int:
        return sample_tokens(logits[None], [job.sampling], [job.generator])[0]

    def _emit_token(self, rid: str, job: SpJob, token: int) -> None:
        job.output.append(token)
        if job.is_reporter:
            self._reports.append(m.Tokens(rid, len(job.output) - 1, (token,)))
        reason = None
        if token in job.sampling.eos_token_ids:
            reason = FinishReason.EOS
        elif len(job.output) >= job.sampling.max_new_tokens:
            reason = FinishReason.LENGTH
        if reason is not None:
            self._drop(rid)
            self._reports.append(m.Finished(rid, len(job.output), reason.value))

    def _drop(self, request_id: str) -> None:
        job = self._jobs.pop(request_id)
        job.request.free()
        job.manager.destroy(job.group.group_id)
