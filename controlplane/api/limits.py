"""Every limit on an incoming field, in one table, derived from the SQL columns values land in.

`LIMITS` maps each string and numeric field of every message a caller sends (clients, admins
and agents alike), keyed by the field's full proto name, to what it may hold:

- `Text(max_chars)`: at most `max_chars` characters and no NUL character (PostgreSQL refuses
  NUL in text). `chars_of("table.column")` reads `max_chars` from the String(n) column the
  value is stored in (controlplane/store/tables.py), so a value the database would refuse is
  refused here first. Strings stored nowhere get a fixed bound, so no message echoes or keeps
  an unbounded string.
- `Number(low, high)`: an inclusive range; floating-point values must also be finite.
  `range_of("table.column")` is the range of an Integer/BigInteger column.
- `Items(max_items, each)`: a repeated field of at most `max_items` elements, each checked
  against `each` (None: the wire type's range is the limit, e.g. token ids, which the Submit
  checks against the model's vocabulary).
- `ByConfig(check)`: a limit that depends on the configuration, checked by `check` (named
  for the reader) after this table.

Enum fields must hold a value the schema defines; message fields are walked recursively;
booleans need no limit.
`check_message` raises ApiError(INVALID_ARGUMENT) naming the first field out of its limit
(`register.instances[0].instance_id`), with the limit and never the value. A request whose
bytes do not decode (`UNDECODABLE`, from `lenient`) is refused the same way.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, NoReturn

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from sqlalchemy import BigInteger, Integer, String

from controlplane.api.errors import ApiError, ApiErrorCode
from controlplane.store.tables import metadata

UINT32_MAX = 2**32 - 1
UINT64_MAX = 2**64 - 1
MAX_EPOCH_S = 253_402_300_799  # 9999-12-31T23:59:59Z, the last second a Timestamp may hold
MAX_DURATION_S = 366 * 86_400.0  # a year: longer reported durations are bogus
MAX_LABEL_CHARS = 256  # free-form strings stored nowhere (model names, versions, reasons)
MAX_ERROR_CHARS = 4096  # error texts (stored in TEXT columns and timeline details)
MAX_PAGE_TOKEN_CHARS = 512  # tokens made by codec.encode_page_token are < 200 characters
MAX_INSTANCES_PER_NODE = 1024
MAX_DEVICES_PER_INSTANCE = 64  # with indices <= 999 the joined list fits instances.device_indices
MAX_DEVICE_INDEX = 999
MAX_ITEMS = 1_048_576  # other repeated fields (resident requests, token chunks)


@dataclass(frozen=True, slots=True)
class Text:
    """At most `max_chars` characters, no NUL."""

    max_chars: int
    column: str = ""  # "table.column" it was derived from ("" when stored nowhere)


@dataclass(frozen=True, slots=True)
class Number:
    """A value in [low, high]; floats must be finite as well."""

    low: float
    high: float


@dataclass(frozen=True, slots=True)
class Items:
    """A repeated field: at most `max_items` elements, each within `each` (None: unchecked)."""

    max_items: int
    each: Text | Number | None = None


@dataclass(frozen=True, slots=True)
class ByConfig:
    """A limit set by the configuration, checked after this table by `check`."""

    check: str  # where, e.g. "validate.prompt_ids (max_prompt_tokens)"


Limit = Text | Number | Items | ByConfig


def _column(name: str) -> Any:
    table, column = name.split(".")
    return metadata.tables[table].c[column]


def chars_of(column: str) -> Text:
    """The Text limit of a String(n) column "table.column"."""
    sql_type = _column(column).type
    assert isinstance(sql_type, String) and sql_type.length, f"{column} is not a String(n)"
    return Text(sql_type.length, column)


def range_of(column: str, low: int | None = None) -> Number:
    """The Number range of an Integer/BigInteger column (optionally raising the lower end)."""
    sql_type = _column(column).type
    assert isinstance(sql_type, Integer), f"{column} is not an integer column"
    bits = 63 if isinstance(sql_type, BigInteger) else 31
    return Number(-(2**bits) if low is None else low, 2**bits - 1)


_REQUEST_ID = chars_of("requests.id")
_INSTANCE_ID = chars_of("instances.id")
_LABEL = Text(MAX_LABEL_CHARS)
_ERROR = Text(MAX_ERROR_CHARS)
_U32 = Number(0, UINT32_MAX)
_U64 = Number(0, UINT64_MAX)
_DURATION = Number(0, MAX_DURATION_S)
_INT32 = range_of("requests.priority")
_COUNT = range_of("requests.output_tokens", low=0)  # token counts, indices, chunks

_V1 = "pecsched.v1."
LIMITS: dict[str, Limit] = {
    # ---- clients: pecsched.v1.Inference ----
    _V1 + "SubmitRequest.text": ByConfig("validate.prompt_ids (max_prompt_tokens)"),
    _V1 + "TokenIds.ids": ByConfig("validate.prompt_ids (max_prompt_tokens, vocabulary)"),
    _V1 + "ChatMessage.role": _LABEL,  # a chat template's role name
    _V1 + "ChatMessage.content": ByConfig("validate.prompt_ids (max_prompt_tokens)"),
    _V1 + "SubmitRequest.max_new_tokens": range_of("requests.max_new_tokens", low=0),
    _V1 + "SubmitRequest.priority": _INT32,
    _V1 + "SubmitRequest.tenant": chars_of("requests.tenant"),
    _V1 + "SubmitRequest.idempotency_key": chars_of("requests.idempotency_key"),
    _V1 + "SamplingParams.temperature": Number(0, 1e6),
    _V1 + "SamplingParams.top_p": Number(0, 1),
    _V1 + "SamplingParams.seed": _U64,  # stored two's complement in requests.seed
    "google.protobuf.Timestamp.seconds": Number(0, MAX_EPOCH_S),
    "google.protobuf.Timestamp.nanos": Number(0, 999_999_999),
    _V1 + "GenerateRequest.request_id": _REQUEST_ID,
    _V1 + "GenerateRequest.from_token_index": _U32,
    _V1 + "GetRequest.request_id": _REQUEST_ID,
    _V1 + "CancelRequest.request_id": _REQUEST_ID,
    _V1 + "ListRequest.states": Items(16),
    _V1 + "ListRequest.tenant": chars_of("requests.tenant"),
    _V1 + "ListRequest.page_size": _U32,  # capped at codec.MAX_PAGE_SIZE
    _V1 + "ListRequest.page_token": Text(MAX_PAGE_TOKEN_CHARS),
    _V1 + "WatchRequest.interval_s": Number(0, 3600),
    # ---- agents: pecsched.v1.Cluster ----
    _V1 + "AgentMessage.seq": _U64,
    _V1 + "Register.node_id": chars_of("nodes.id"),
    _V1 + "Register.model": _LABEL,
    _V1 + "Register.instances": Items(MAX_INSTANCES_PER_NODE),
    _V1 + "Register.rendezvous_address": chars_of("nodes.address"),
    _V1 + "Register.resident_request_ids": Items(MAX_ITEMS, _REQUEST_ID),
    _V1 + "Register.agent_version": _LABEL,
    _V1 + "Register.vocab_size": _U32,
    _V1 + "InstanceSpec.instance_id": _INSTANCE_ID,
    _V1 + "InstanceSpec.tp": Number(0, MAX_DEVICES_PER_INSTANCE),
    _V1 + "InstanceSpec.device_indices": Items(
        MAX_DEVICES_PER_INSTANCE, Number(0, MAX_DEVICE_INDEX)
    ),
    _V1 + "InstanceSpec.kv_capacity_tokens": range_of("instances.kv_capacity_tokens", low=0),
    _V1 + "InstanceSpec.device": _LABEL,
    _V1 + "Heartbeat.loads": Items(MAX_INSTANCES_PER_NODE),
    _V1 + "InstanceLoad.instance_id": _INSTANCE_ID,
    _V1 + "InstanceLoad.kv_used_tokens": range_of("instances.kv_capacity_tokens", low=0),
    _V1 + "InstanceLoad.running_requests": _U32,
    _V1 + "InstanceLoad.busy_s": _DURATION,
    _V1 + "Event.request_id": _REQUEST_ID,
    _V1 + "Event.instance_id": chars_of("request_events.instance_id"),
    _V1 + "Event.at_s": Number(0, MAX_EPOCH_S),
    _V1 + "PrefillChunkDone.chunk_index": _COUNT,
    _V1 + "PrefillChunkDone.chunks_total": _COUNT,
    _V1 + "PrefillChunkDone.tokens_done": _U32,
    _V1 + "PrefillChunkDone.duration_s": _DURATION,
    _V1 + "PrefillChunkDone.iteration": Number(0, 2**53),  # exact in a JSON detail
    _V1 + "PrefillChunkDone.iteration_tokens": _U32,
    _V1 + "PrefillChunkDone.chunk_tokens": _U32,
    _V1 + "PrefillDone.prompt_tokens": _U32,
    _V1 + "PrefillDone.first_token_id": _U32,  # stored packed uint32
    _V1 + "Paused.chunks_done": _COUNT,
    _V1 + "KvTransferUpdate.transfer_id": _LABEL,
    _V1 + "KvTransferUpdate.destination_instance_id": _INSTANCE_ID,
    _V1 + "KvTransferUpdate.bytes": range_of("instances.kv_capacity_tokens", low=0),
    _V1 + "KvTransferUpdate.duration_s": _DURATION,
    _V1 + "KvTransferUpdate.error": _ERROR,
    _V1 + "Tokens.start_index": range_of("request_tokens.start_index", low=0),
    _V1 + "Tokens.token_ids": Items(MAX_ITEMS),
    _V1 + "Finished.output_tokens": _COUNT,
    _V1 + "Finished.reason": _LABEL,
    _V1 + "Failed.error": _ERROR,
}

# The joined device list of an instance must fit its column.
assert (
    MAX_DEVICES_PER_INSTANCE * (len(str(MAX_DEVICE_INDEX)) + 1) - 1
    <= chars_of("instances.device_indices").max_chars
)

_FLOATS = (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT)


class Undecodable:
    """What `lenient` deserializers return for bytes that are not the expected message."""

    def __init__(self, what: str) -> None:
        self.what = what  # e.g. "Submit request"


def lenient(deserialize: Callable[[bytes], Any], what: str) -> Callable[[bytes], Any]:
    """`deserialize`, returning an `Undecodable(what)` instead of raising on malformed bytes."""

    def run(data: bytes) -> Any:
        try:
            return deserialize(data)
        except Exception:  # any parse failure of the protobuf runtime
            return Undecodable(what)

    return run


def check_request(request: Any) -> None:
    """Refuse an undecodable request or one with a field out of its limit (ApiError)."""
    if isinstance(request, Undecodable):
        raise ApiError(
            ApiErrorCode.INVALID_ARGUMENT,
            f"request: not a valid {request.what} message",
            field="request",
        )
    if isinstance(request, Message):
        check_message(request)


async def checked_stream(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    """The messages of a client stream, each passed through `check_request` first."""
    async for request in requests:
        check_request(request)
        yield request


def check_message(message: Message, prefix: str = "") -> None:
    """Raise ApiError(INVALID_ARGUMENT) for the first set field out of its limit (recursive)."""
    for field, value in message.ListFields():
        path = f"{prefix}{field.name}"
        if field.is_repeated:
            _check_repeated(field, value, path)
        else:
            _check_one(field, value, path, _limit_of(field))


_BY_FIELD: dict[FieldDescriptor, Limit | None] = {}  # LIMITS by descriptor, filled on use


def _limit_of(field: FieldDescriptor) -> Limit | None:
    try:
        return _BY_FIELD[field]
    except KeyError:
        limit = _BY_FIELD[field] = LIMITS.get(field.full_name)
        return limit


def _check_repeated(field: FieldDescriptor, values: Any, path: str) -> None:
    limit = _limit_of(field)
    if isinstance(limit, ByConfig):
        return
    if isinstance(limit, Items) and len(values) > limit.max_items:
        _refuse(path, f"at most {limit.max_items} elements")
    each = limit.each if isinstance(limit, Items) else None
    if each is None and field.type not in (FieldDescriptor.TYPE_MESSAGE, field.TYPE_ENUM):
        return
    for i, value in enumerate(values):
        _check_one(field, value, f"{path}[{i}]", each)


def _check_one(field: FieldDescriptor, value: Any, path: str, limit: Limit | None) -> None:
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        check_message(value, f"{path}.")
    elif field.type == FieldDescriptor.TYPE_ENUM:
        enum = field.enum_type
        assert enum is not None
        if enum.values_by_number.get(value) is None:
            _refuse(path, "not a value of " + enum.name)
    elif field.type == FieldDescriptor.TYPE_BOOL:
        return  # both values are valid
    elif isinstance(limit, Text):
        if len(value) > limit.max_chars:
            _refuse(path, f"at most {limit.max_chars} characters")
        if "\x00" in value:
            _refuse(path, "must not contain NUL characters")
    elif isinstance(limit, Number):
        if field.type in _FLOATS and not math.isfinite(value):
            _refuse(path, "must be a finite number")
        if not limit.low <= value <= limit.high:
            _refuse(path, f"must be in [{limit.low:g}, {limit.high:g}]")
    elif not isinstance(limit, ByConfig):
        raise AssertionError(f"{field.full_name} has no limit in LIMITS")


def _refuse(path: str, rule: str) -> NoReturn:
    raise ApiError(ApiErrorCode.INVALID_ARGUMENT, f"{path}: {rule}", field=path)


def walk_fields(descriptor: Descriptor, seen: set[str] | None = None) -> list[FieldDescriptor]:
    """Every field reachable from `descriptor` (each message type once), for tests and docs."""
    seen = set() if seen is None else seen
    if descriptor.full_name in seen:
        return []
    seen.add(descriptor.full_name)
    fields: list[FieldDescriptor] = []
    for field in descriptor.fields:
        fields.append(field)
        if field.message_type is not None:
            fields.extend(walk_fields(field.message_type, seen))
    return fields
