"""The `Engine`'s iterations: which requests run, the forward, and the results applied.

`EngineIteration.step` runs one iteration: one token for every DECODING request (up to
`max_batch_seqs`; beyond that they take turns round robin), then prefill chunks of PREFILLING
requests in admission order, each at most its chunk size, until the iteration's token budget is
used: `max_batch_tokens`, or less while a PREFILLING request admitted with `batch_tokens` asks for
less (the smallest such; a mixed prefill of the `sarathi` policy, whose per-iteration budget comes
with the command). The budget counts the decodes too, one token each. A request whose last chunk ran samples its first token and becomes DECODING (HELD
with `hold_after_prefill`); a request that samples EOS or its `max_new_tokens`-th token is
finished and leaves the engine (`cancel`) within the same `step`. Decode-only iterations replay
the CUDA graphs when they were captured and the batch fits them; everything else runs the eager
forward, which builds its attention batch from the current KV starts (compaction may have moved
them since the last step).
"""

from __future__ import annotations

import torch

from dataplane.engine.base import EngineBase
from dataplane.engine.requests import RequestState, RunningRequest
from dataplane.engine.sampling import sample_tokens
from dataplane.engine.types import (
    ChunkDone,
    EngineEvent,
    Finished,
    FinishReason,
    PrefillDone,
    TokenGenerated,
)
from dataplane.models.attention import CachedAttention, make_attention_batch


class EngineIteration(EngineBase):
    """`step()` and the forward it runs."""

    def step(self) -> list[EngineEvent]:
        """Run one iteration (decodes first, then prefill chunks) and return its events."""
        cfg = self.config
        decodes = [r for r in self._requests.values() if r.state is RequestState.DECODING]
        prefills = [r for r in self._requests.values() if r.state is RequestState.PREFILLING]
        budget = min([cfg.max_batch_tokens] + [r.batch_tokens for r in prefills if r.batch_tokens])
        cap = min(cfg.max_batch_seqs, budget)
        if len(decodes) > cap:  # more decodes than fit: take turns, round robin
            first = self._decode_turn % len(decodes)
            decodes = (decodes[first:] + decodes[:first])[:cap]
            self._decode_turn = first + cap
        budget -= len(decodes)
        chunks: list[tuple[RunningRequest, int]] = []
        for req in prefills:
            if budget <= 0 or len(decodes) + len(chunks) >= cfg.max_batch_seqs:
                break
            n = min(req.num_prompt_tokens - req.num_computed_tokens, req.chunk_tokens, budget)
            chunks.append((req, n))
            budget -= n
        if not decodes and not chunks:
            return []
        self.num_iterations += 1
        self.last_iteration_tokens = len(decodes) + sum(n for _, n in chunks)
        return self._run(decodes, chunks)

    def _run(
        self, decodes: list[RunningRequest], chunks: list[tuple[RunningRequest, int]]
    ) -> list[EngineEvent]:
        ids = [r.output_token_ids[-1] for r in decodes]
        pos = [r.num_computed_tokens for r in decodes]
        id_parts, pos_parts = [torch.tensor(ids, dtype=torch.int64)], [torch.tensor(pos)]
        num_new, num_kv = [1] * len(decodes), [p + 1 for p in pos]
        starts = [r.kv_start for r in decodes]
        logits_rows = list(range(len(decodes)))
        row = len(decodes)
        for req, n in chunks:
            done = req.num_computed_tokens
            id_parts.append(req.prompt_tensor[done : done + n])
            pos_parts.append(torch.arange(done, done + n))
            num_new.append(n)
            num_kv.append(done + n)
            starts.append(req.kv_start)
            row += n
            if done + n == req.num_prompt_tokens:
                logits_rows.append(row - 1)
        with torch.inference_mode():
            if (
                not chunks
                and self.graphs is not None
                and len(decodes) <= self.graphs.max_batch_seqs
            ):
                logits = self.graphs.run(ids, pos, starts, num_kv)
            else:
                logits = self._forward(id_parts, pos_parts, num_new, num_kv, starts, logits_rows)
            finishing = [r for r, n in chunks if r.num_computed_tokens + n == r.num_prompt_tokens]
            sampled = decodes + finishing
            tokens = sample_tokens(
                logits, [r.sampling for r in sampled], [r.generator for r in sampled]
            )
        events: list[EngineEvent] = []
        for req in decodes:
            req.num_computed_tokens += 1
        for req, n in chunks:
            req.num_computed_tokens += n
            events.append(
                ChunkDone(req.request_id, n, req.num_computed_tokens, req.num_prompt_tokens)
            )
            if req.num_computed_tokens == req.num_prompt_tokens:
                events.append(PrefillDone(req.request_id, req.num_prompt_tokens))
                req.state = RequestState.HELD if req.hold_after_prefill else RequestState.DECODING
        for req, token in zip(sampled, tokens, strict=True):
            events.extend(self._append_token(req, token))
        return events

    def _forward(
        self,
        id_parts: list[torch.Tensor],
        pos_parts: list[torch.Tensor],
        num_new: list[int],
        num_kv: list[int],
        starts: list[int],
        logits_rows: list[int],
    ) -> torch.Tensor:
        """The eager forward of one iteration; logits (len(logits_rows), vocab) float32."""
        device = self.device
        batch = make_attention_batch(num_new, num_kv, starts, device)
        attend = CachedAttention(self.kv.k_pools, self.kv.v_pools, batch, **self.attention_kernels)
        logits: torch.Tensor = self.model(
            torch.cat(id_parts).to(device, non_blocking=True),
            torch.cat(pos_parts).to(device, non_blocking=True),
            attend,
            torch.tensor(logits_rows, dtype=torch.int64).to(device, non_blocking=True),
        )
        return logits

    def _append_token(self, req: RunningRequest, token: int) -> list[EngineEvent]:
        req.output_token_ids.append(token)
        events: list[EngineEvent] = [
            TokenGenerated(req.request_id, token, len(req.output_token_ids))
        ]
        reason = None
        if token in req.sampling.eos_token_ids:
            reason = FinishReason.EOS
        elif len(req.output_token_ids) >= req.sampling.max_new_tokens:
            reason = FinishReason.LENGTH
        if reason is not None:
            self.cancel(req.request_id)
            events.append(Finished(req.request_id, reason, tuple(req.output_token_ids)))
        return events
