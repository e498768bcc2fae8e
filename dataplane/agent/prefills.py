"""Starting a prefill on this node: a StartPrefill (or a Colocate's) checked field by field and
turned into worker commands and a route (wire semantics: `dataplane.agent.commands`). Pure:
no I/O, no clock."""

from __future__ import annotations

from collections.abc import Sequence

from dataplane.agent import convert
from dataplane.agent.routes import RequestTable, Route
from dataplane.agent.steps import CommandError, Node, Retryable, Step
from dataplane.engine.types import SamplingParams
from dataplane.parallel.topology import shared_devices
from dataplane.worker import messages as m
from protos.pecsched.v1 import cluster_pb2, common_pb2

DEFAULT_CHUNK_TOKENS = 512


class PrefillStarter:
    """Checks and starts prefills on `node`'s workers, routing them in `table`."""

    def __init__(self, node: Node, table: RequestTable) -> None:
        self.node = node
        self.table = table
        self.eos_token_ids: list[tuple[int, ...] | None] = [None] * node.num_workers
        self.sp_groups = 0  # SP groups started here (fresh group ids when the CP sends none)

    def worker_ready(self, index: int, eos_token_ids: Sequence[int]) -> None:
        """Worker `index` runs a model with these end-of-sequence tokens."""
        self.eos_token_ids[index] = tuple(eos_token_ids)

    def start(
        self,
        step: Step,
        cmd: cluster_pb2.StartPrefill,
        budget_tokens: int | None,
        batch_tokens: int,
        draining: bool,
    ) -> None:
        """Route the request and add its Prefill (or SpPrefills) to `step`; CommandError names
        the bad field (Retryable while `draining`)."""
        if not cmd.request_id:
            raise CommandError("request_id must not be empty")
        if draining:
            raise Retryable(f"node {self.node.node_id} is draining; run it elsewhere")
        if cmd.request_id in self.table.routes:
            raise CommandError(f"request_id {cmd.request_id!r} is already resident here")
        if not cmd.prompt_token_ids:
            raise CommandError("prompt_token_ids must not be empty")
        if cmd.max_new_tokens < 1:
            raise CommandError(f"max_new_tokens must be >= 1, got {cmd.max_new_tokens}")
        if not cmd.instance_ids:
            raise CommandError("instance_ids must not be empty")
        if len(set(cmd.instance_ids)) != len(cmd.instance_ids):
            raise CommandError(f"instance_ids repeat an instance: {list(cmd.instance_ids)}")
        indices = self._members(cmd)
        eos_token_ids = self.eos_token_ids[indices[0]]
        assert eos_token_ids is not None, f"worker {indices[0]} is not ready"
        generated = tuple(cmd.generated_token_ids)
        remaining = cmd.max_new_tokens - len(generated)
        if remaining < 1:
            raise CommandError(
                f"generated_token_ids has {len(generated)} tokens: nothing left of "
                f"max_new_tokens={cmd.max_new_tokens}"
            )
        try:
            sampling = convert.sampling_from_proto(cmd.sampling, remaining, eos_token_ids)
        except ValueError as exc:
            raise CommandError(str(exc)) from exc
        chunk = cmd.chunk_tokens or DEFAULT_CHUNK_TOKENS
        if budget_tokens is not None:
            chunk = min(chunk, budget_tokens)
        prompt = tuple(cmd.prompt_token_ids) + generated
        if len(cmd.instance_ids) > 1:
            self._start_sp(step, cmd, indices, prompt, sampling, chunk, len(generated))
            return
        index = indices[0]
        self.table.routes[cmd.request_id] = Route(
            {index}, len(generated), len(cmd.prompt_token_ids)
        )
        step.send(
            index,
            m.Prefill(
                request_id=cmd.request_id,
                prompt_token_ids=prompt,
                sampling=sampling,
                chunk_tokens=chunk,
                decode_in_place=cmd.decode_in_place,
                batch_tokens=batch_tokens,
            ),
        )

    def _start_sp(
        self,
        step: Step,
        cmd: cluster_pb2.StartPrefill,
        indices: list[int],
        prompt: tuple[int, ...],
        sampling: SamplingParams,
        chunk: int,
        offset: int,
    ) -> None:
        """Every member of an SP group on this node gets its SpPrefill, in rank order."""
        node = self.node
        if not cmd.decode_in_place:
            raise CommandError(
                "decode_in_place must be set for an SP group (its sharded KV decodes in place)"
            )
        on_cuda = node.device == "cuda"
        devices = [f"cuda:{node.device_indices[i]}" for i in indices] if on_cuda else []
        shared = shared_devices(tuple(devices))
        if shared:
            raise CommandError(
                f"SP group {list(cmd.instance_ids)} shares GPU(s) {', '.join(shared)}: NCCL "
                "cannot put two ranks of one group on one GPU (run SP over distinct GPUs)"
            )
        self.sp_groups += 1
        group_id = cmd.group_id or f"sp/{cmd.request_id}/{node.node_id}/{self.sp_groups}"
        lead = node.index_of(cmd.instance_ids[0])  # None: rank 0 is on another node
        followers = {index for index in indices if index != lead}
        route = Route(set(indices), offset, len(cmd.prompt_token_ids), followers=followers)
        self.table.routes[cmd.request_id] = route
        for index in indices:
            step.send(
                index,
                m.SpPrefill(
                    request_id=cmd.request_id,
                    prompt_token_ids=prompt,
                    sampling=sampling,
                    chunk_tokens=chunk,
                    ring=cmd.sp_kind == common_pb2.SP_KIND_RING,
                    group_id=group_id,
                    member_ids=tuple(cmd.instance_ids),
                    store_address=cmd.rendezvous_address or node.rendezvous_address,
                ),
            )

    def _members(self, cmd: cluster_pb2.StartPrefill) -> list[int]:
        """The worker indices of this node's members, in rank order (at least one).

        Members on other nodes are allowed only in an SP group that names where to meet
        (`rendezvous_address`) and its id (`group_id`), the same on every node."""
        node = self.node
        spans = len(cmd.instance_ids) > 1 and bool(cmd.rendezvous_address and cmd.group_id)
        indices = []
        for i, member in enumerate(cmd.instance_ids):
            index = node.index_of(member)
            if index is not None:
                indices.append(index)
            elif not spans:
                hint = " (an SP group spanning nodes needs rendezvous_address and group_id)"
                raise CommandError(
                    f"instance_ids[{i}] {member!r} is not an instance of node "
                    f"{node.node_id!r}" + (hint if len(cmd.instance_ids) > 1 else "")
                )
        if not indices:
            raise CommandError(
                f"no instance of instance_ids {list(cmd.instance_ids)} is on node {node.node_id!r}"
            )
        return indices
