"""`SchedulerConfig`: every threshold of the policies, with the paper's defaults.

Baselines read the shared fields (threshold, chunk size, SP, decode batch limit, reservation
size); the PecSched switches (`preemption`, `disaggregation`, `long_decode_sharing`) are what
the ablations change. One config object serves every policy; the registry applies each policy's
fixed settings on top.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum

from controlplane.core.errors import InvalidArgumentError
from controlplane.core.types import SpKind

CHUNK_BUDGET_TOKEN_PAIRS = 1024 * 250_000
"""Default chunk budget: 1024-token chunks for a 250K prompt on one instance (512 at 500K,
the full `chunk_tokens` up to ~31K). Measured in the simulator (Azure trace, 32 x A100, load
0.75): short p99 queueing 3.1 -> 0.70 s (Mistral-7B), 33 -> 1.3 s (Llama-3.1-70B) against
2048 tokens at 500K, for +2-5% long JCT."""


LONG_CHUNK_TARGET_S = 1.0
"""Default time of a long prefill's longest chunk. Rule: the TTFT SLO (1 s): a short that must
preempt waits for the victim's chunk in flight, at most about its longest one. On Mistral-7B
(32 x A100) the token-pair budget's last chunks take 0.9-1.1 s at 100-500K tokens, so this
keeps them and gives every other model chunks of the same time (Llama-3.1-70B's ~1.4x fewer
tokens)."""


PROTECTED_DUTY_CYCLE_CHUNKS = 4
"""Default duty cycle of protected long prefills (measured: core-requests.md)."""


class LongDecodeSharing(StrEnum):
    """What a short prefill may do on an instance that is decoding a long request."""

    NEVER = "never"  # nothing: the instance is off limits for prefills
    STALL = "stall"  # StartPrefill there; the long decode waits while the prefill runs
    COLOCATE = "colocate"  # Colocate there with a per-iteration prefill-token budget


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    """Thresholds and switches of the scheduling policies (validated, immutable)."""

    short_threshold_tokens: int = field(
        default=4096, metadata={"help": "prompts below this many tokens are SHORT"}
    )
    chunk_tokens: int = field(
        default=8192,
        metadata={
            "help": "prefill chunk size; a prefill may pause between chunks (with preemption "
            "and chunk_budget_token_pairs: the largest chunk)"
        },
    )
    chunk_budget_token_pairs: int | None = field(
        default=CHUNK_BUDGET_TOKEN_PAIRS,
        metadata={
            "help": "with preemption: a request's chunk is clamp(this x sp_degree / prompt, "
            "min_chunk_tokens, chunk_tokens) tokens, so the attention work of one chunk per "
            "instance (chunk x context) stays about the same at any depth and a short waits "
            "at most that long for a chunk boundary; None: fixed chunk_tokens"
        },
    )
    chunk_budget_without_preemption: bool = field(
        default=False,
        metadata={
            "help": "apply chunk_budget_token_pairs to the policies without preemption too; "
            "off: they keep fixed chunk_tokens, best for their short p99 queueing delay and "
            "long JCT (Azure traces, 32 x A100, Mistral-7B, native rate: fifo/priority "
            "queueing p99 +2%/+33% and long JCT +1.5% with the budget, for TBT p99 2.5 -> 0.5 s)"
        },
    )
    min_chunk_tokens: int = field(
        default=512, metadata={"help": "smallest chunk chunk_budget_token_pairs may give"}
    )
    long_chunk_target_s: float | None = field(
        default=LONG_CHUNK_TARGET_S,
        metadata={
            "help": "pecsched: a long prefill's chunk budget is learned per instance class so "
            "that its longest chunk (the prompt's last) takes about this long, from the chunk "
            "times reported (chunk_budget_token_pairs until the first); None: the fixed budget"
        },
    )
    sp_kind: SpKind = field(
        default=SpKind.ULYSSES, metadata={"help": "SP attention for long prefills"}
    )
    max_sp_degree: int = field(default=8, metadata={"help": "most instances in one SP group"})
    target_prefill_tokens_per_instance: int | None = field(
        default=None,
        metadata={
            "help": "when set, a long prefill uses at least ceil(prompt / this) instances "
            "(a prefill-time target expressed in tokens per instance)"
        },
    )
    max_decode_batch: int = field(
        default=256, metadata={"help": "most requests decoding on one instance at a time"}
    )
    preemption: bool = field(
        default=True, metadata={"help": "pecsched: short prefills may pause long prefills"}
    )
    disaggregation: bool = field(
        default=True,
        metadata={"help": "pecsched: short requests decode on SHORT_DECODE instances"},
    )
    long_decode_sharing: LongDecodeSharing = field(
        default=LongDecodeSharing.COLOCATE,
        metadata={"help": "pecsched: how a short prefill uses an instance decoding a long one"},
    )
    colocation_budget_tokens: int = field(
        default=512, metadata={"help": "prompt tokens per iteration of a colocated prefill"}
    )
    short_decode_gpu_fraction: float = field(
        default=0.125,
        metadata={"help": "share of GPUs given the SHORT_DECODE role (4 of 32 in the paper)"},
    )
    num_short_decode_instances: int | None = field(
        default=None,
        metadata={"help": "exact SHORT_DECODE instance count; overrides the GPU fraction"},
    )
    short_decode_elastic: bool = field(
        default=True,
        metadata={
            "help": "pecsched: the SHORT_DECODE pool starts at its configured size, then "
            "keeps the instances the shorts in flight need at the decode batch that meets "
            "short_tbt_slo_s (at least one): empty members beyond that go back to GENERAL, "
            "empty GENERAL instances join while fewer are there or a transfer waits for a "
            "place; False keeps the pool fixed as in the paper"
        },
    )
    short_decode_colocation: bool = field(
        default=True,
        metadata={
            "help": "pecsched, with colocation (long_decode_sharing=colocate) and "
            "disaggregation: a short prefill may run inside a short-decode instance's "
            "iterations while its batch is below the TBT target's, and decode there (tried "
            "after open general instances, before a long decode's instance or a preemption); "
            "at most colocation_budget_tokens a step, fewer when the step would exceed "
            "short_tbt_slo_s (priced from the decodes and colocations observed), none when "
            "the prefill would need more than 8 steps"
        },
    )
    lend_decoder_to_longs: bool = field(
        default=True,
        metadata={
            "help": "pecsched, with colocation and disaggregation: a long request no general "
            "SP group can take may prefill inside a short-decode instance's iterations (a "
            "small budget a step) and decode there, while that instance's batch is below half "
            "the TBT target's and half its KV stays free"
        },
    )
    short_tbt_slo_s: float = field(
        default=0.1,
        metadata={
            "help": "pecsched: time-between-tokens target of short decodes; the elastic "
            "short-decode pool keeps enough instances that each runs a decode batch whose "
            "observed TBT stays within it, and a decoder takes no more shorts than that batch"
        },
    )
    widen_sp_when_idle: bool = field(
        default=True,
        metadata={
            "help": "pecsched: a long prefill also takes open general instances no other "
            "request waits for (up to max_sp_degree, sharing them with the queued longs), so "
            "it finishes sooner; shorts take them back by preemption at chunk boundaries"
        },
    )
    max_pause_s: float = field(
        default=30.0,
        metadata={
            "help": "starvation bound: after this many seconds paused in total, a long "
            "prefill is no longer preempted and resumes as soon as its group is free"
        },
    )
    protected_duty_cycle_chunks: int | None = field(
        default=PROTECTED_DUTY_CYCLE_CHUNKS,
        metadata={
            "help": "a long prefill past max_pause_s may still be paused for one short prefill "
            "(its group held for it meanwhile) once it has run this many chunks since it last "
            "resumed; None: never paused again (shorts wait for the whole prefill)"
        },
    )
    min_chunks_between_pauses: int = field(
        default=0,
        metadata={
            "help": "a long prefill may be paused only after running this many chunks since "
            "it started or last resumed (0: at any chunk boundary)"
        },
    )
    short_preempt_delay_s: float = field(
        default=0.1,
        metadata={
            "help": "pecsched: a short request pauses a long prefill only after waiting this "
            "long for an instance that needs no pause (0: at once). Measured (Mistral-7B, "
            "32 x A100, merged Azure trace, load 0.75): 0 -> 0.1 s: preemptions 7.9K -> 3.2K, "
            "long JCT 1.060 -> 1.045 x FIFO, short p99 queueing 0.22 -> 0.27 s"
        },
    )
    short_preempt_early: bool = field(
        default=True,
        metadata={
            "help": "pecsched: a short may pause a long prefill before short_preempt_delay_s "
            "when waiting cannot help: at once when more shorts are queued than short prefills "
            "are running (a burst: waiting could place only some), else a long whose chunk in "
            "flight ends before the delay would (waiting would only miss that boundary)"
        },
    )
    max_preemptions_per_long: int | None = field(
        default=None,
        metadata={
            "help": "anti-thrash bound: a long prefill paused this many times is protected "
            "as if it had reached max_pause_s (its group held for it, paused again only on "
            "the protected duty cycle); None: no bound"
        },
    )
    long_aging_s: float | None = field(
        default=None,
        metadata={
            "help": "starvation bound for queued longs: after waiting this long, a long "
            "request goes before shorts and holds the instances it needs as they free up. "
            "Off by default: under sustained long overload it turns into long-first "
            "scheduling (measured: short p99 queueing x9 with no long JCT gain)"
        },
    )
    num_long_reserved_instances: int | None = field(
        default=None,
        metadata={
            "help": "reservation: LONG_RESERVED instance count (0 to all but one); None: "
            "the long class's share of the work of the arrivals so far, round(share x "
            "instances), at least what holds reservation_sized_for_tokens, at most all but one"
        },
    )
    reservation_sized_for_tokens: int = field(
        default=512_000,
        metadata={
            "help": "reservation: longest request (prompt + output) the reserve must hold in "
            "one SP group (the smallest reserve when sized by the work share)"
        },
    )
    max_kv_transfer_attempts: int = field(
        default=3,
        metadata={"help": "KV transfers tried before a short decodes where it was prefilled"},
    )

    refused_instance_backoff_s: float = field(
        default=2.0,
        metadata={
            "help": "after a retryable failure, the instances the request was on are not "
            "offered it again until their free KV changes or this many seconds pass "
            "(doubled for each further failure in a row, up to refused_instance_backoff_max_s)"
        },
    )
    refused_instance_backoff_max_s: float = field(
        default=30.0,
        metadata={"help": "longest refusal back-off of repeated retryable failures in a row"},
    )

    # ---- baselines: sarathi, distserve, reservation sizing -----------------------------------
    sarathi_batch_tokens: int = field(
        default=2048,
        metadata={
            "help": "sarathi: tokens per iteration, decodes + prefill chunks (vLLM "
            "max_num_batched_tokens; 2048 is vLLM V1's default for an API server on A100)"
        },
    )
    sarathi_long_prefill_tokens: int = field(
        default=512,
        metadata={
            "help": "sarathi: a prompt longer than this gets at most this many tokens per "
            "iteration (vLLM long_prefill_token_threshold), leaving the rest of the budget to "
            "other prompts (measured, Azure traces on 32 x A100 Mistral-7B at their native "
            "rate: 256/512/1024/2048 give short queueing p99 0.15/0.30/2.3/651 s, TBT p99 "
            "0.18/0.34/0.67/0.88 s, long JCT 1.08/1.04/1.03/1.01 x FIFO's)"
        },
    )
    sarathi_max_partial_prefills: int = field(
        default=4,
        metadata={
            "help": "sarathi: prefills in flight per instance at most (vLLM "
            "max_num_partial_prefills)"
        },
    )
    sarathi_max_long_partial_prefills: int = field(
        default=1,
        metadata={
            "help": "sarathi: LONG prefills in flight per instance at most (vLLM "
            "max_long_partial_prefills; below max_num_partial_prefills so shorts pass longs)"
        },
    )
    distserve_decode_gpu_fraction: float = field(
        default=0.0625,
        metadata={
            "help": "distserve: share of GPUs given the decode role, at least one instance "
            "(measured, Azure traces on 32 x A100 Mistral-7B at their native rate: 1/2/4/8 "
            "decode instances give short queueing p99 706/795/1025/1629 s, long JCT "
            "1.07/1.18/1.49/2.28 x FIFO's, TBT p99 0.21/0.05/0.03/0.02 s: the short outputs "
            "need little decode; 1/16 keeps TBT p99 under 0.1 s)"
        },
    )
    distserve_decode_instances: int | None = field(
        default=None,
        metadata={
            "help": "distserve: exact decode instance count (1 to all but one); overrides "
            "distserve_decode_gpu_fraction"
        },
    )
    reservation_attention_tokens: int = field(
        default=32_768,
        metadata={
            "help": "reservation: context length at which a token's attention FLOPs equal "
            "its linear FLOPs, P/(2·L·H·hd) (27K Mistral-7B, 53K Llama-3.1-70B); weighs "
            "long prompts in the work share that sizes the reserve"
        },
    )

    def __post_init__(self) -> None:
        for name, must_be in _RULES:
            value = getattr(self, name)
            expected = must_be(value, self)
            if expected is not None:
                raise InvalidArgumentError(name, f"must be {expected}, got {value}")

    def prefill_chunk_tokens(
        self, prompt_tokens: int, sp_degree: int, budget_pairs: int | None = None
    ) -> int:
        """Chunk size of a prefill of `prompt_tokens` on `sp_degree` instances.

        Fixed `chunk_tokens` without a budget, or without preemption unless
        `chunk_budget_without_preemption`; else clamp(budget x sp_degree // prompt,
        min_chunk_tokens, chunk_tokens), the budget `budget_pairs` when given (a learned one)
        else `chunk_budget_token_pairs`.
        """
        budget = self.chunk_budget_token_pairs
        if budget is not None and budget_pairs is not None:
            budget = budget_pairs
        if budget is None or not (self.preemption or self.chunk_budget_without_preemption):
            return self.chunk_tokens
        by_budget = budget * sp_degree // max(1, prompt_tokens)
        return max(min(self.min_chunk_tokens, self.chunk_tokens), min(by_budget, self.chunk_tokens))


# ---- validation: one rule per field, checked in this order ---------------------------------

# Each rule is the original comparison, so ill-typed values fail exactly as they always did.
_Rule = Callable[..., str | None]  # (value, config) -> None when valid, else what it must be


def _positive(value: float, config: SchedulerConfig) -> str | None:
    return ">= 1" if value < 1 else None


def _positive_if_set(value: float | None, config: SchedulerConfig) -> str | None:
    return ">= 1" if (value or 1) < 1 else None  # 0 and None both mean "not set"


def _positive_or_none(value: float | None, config: SchedulerConfig) -> str | None:
    return ">= 1" if value is not None and value < 1 else None


def _count_or_none(value: float | None, config: SchedulerConfig) -> str | None:
    return ">= 0" if value is not None and value < 0 else None


def _fraction(value: float, config: SchedulerConfig) -> str | None:
    return "in [0, 1)" if not 0.0 <= value < 1.0 else None


def _finite_non_negative(value: float, config: SchedulerConfig) -> str | None:
    return "finite and >= 0" if not (math.isfinite(value) and value >= 0.0) else None


def _finite_positive(value: float, config: SchedulerConfig) -> str | None:
    return "finite and > 0" if not (math.isfinite(value) and value > 0.0) else None


def _finite_positive_or_none(value: float | None, config: SchedulerConfig) -> str | None:
    return None if value is None else _finite_positive(value, config)


def _finite_non_negative_or_none(value: float | None, config: SchedulerConfig) -> str | None:
    bad = value is not None and not (math.isfinite(value) and value >= 0.0)
    return "finite and >= 0 or None" if bad else None


def _at_most_partial_prefills(value: int, config: SchedulerConfig) -> str | None:
    bound = config.sarathi_max_partial_prefills
    return f"<= sarathi_max_partial_prefills={bound}" if value > bound else None


def _backoff_cap(value: float, config: SchedulerConfig) -> str | None:
    low = config.refused_instance_backoff_s
    bad = not (math.isfinite(value) and value >= low)
    return f"finite and >= refused_instance_backoff_s={low}" if bad else None


_RULES: tuple[tuple[str, _Rule], ...] = (
    ("short_threshold_tokens", _positive),
    ("chunk_tokens", _positive),
    ("min_chunk_tokens", _positive),
    ("max_sp_degree", _positive),
    ("max_decode_batch", _positive),
    ("colocation_budget_tokens", _positive),
    ("reservation_sized_for_tokens", _positive),
    ("max_kv_transfer_attempts", _positive),
    ("protected_duty_cycle_chunks", _positive_if_set),
    ("sarathi_batch_tokens", _positive),
    ("sarathi_long_prefill_tokens", _positive),
    ("sarathi_max_partial_prefills", _positive),
    ("sarathi_max_long_partial_prefills", _positive),
    ("reservation_attention_tokens", _positive),
    ("chunk_budget_token_pairs", _positive_or_none),
    ("target_prefill_tokens_per_instance", _positive_or_none),
    ("short_decode_gpu_fraction", _fraction),
    ("distserve_decode_instances", _count_or_none),
    ("min_chunks_between_pauses", _count_or_none),
    ("num_short_decode_instances", _count_or_none),
    ("num_long_reserved_instances", _count_or_none),
    ("max_preemptions_per_long", _count_or_none),
    ("sarathi_max_long_partial_prefills", _at_most_partial_prefills),
    ("distserve_decode_gpu_fraction", _fraction),
    ("max_pause_s", _finite_non_negative),
    ("refused_instance_backoff_s", _finite_non_negative),
    ("refused_instance_backoff_max_s", _backoff_cap),
    ("short_preempt_delay_s", _finite_non_negative),
    ("short_tbt_slo_s", _finite_positive),
    ("long_aging_s", _finite_non_negative_or_none),
    ("long_chunk_target_s", _finite_positive_or_none),
)
"""Every field's validity rule as (field, rule); a rule returns None when the value is valid,
else what it must be (the error reads "must be <that>, got <value>")."""
