"""Encodings and argument checks shared by the repositories (packed ids, seeds, paging)."""

from __future__ import annotations

import base64
import binascii
import json
import math
import sys
from array import array
from collections.abc import Sequence

from sqlalchemy import String

from controlplane.store.records import ListOrder
from controlplane.store.tables import metadata

MAX_PAGE_SIZE = 1000
# Order names a page token may carry (a list or dict from a forged token is simply not one).
_LIST_ORDERS = tuple(order.value for order in ListOrder)
_INT64_SPAN = 2**64
_ID_TYPE = metadata.tables["requests"].c.id.type
assert isinstance(_ID_TYPE, String) and _ID_TYPE.length, "requests.id is a String(n)"
_REQUEST_ID_CHARS = _ID_TYPE.length


def pack_token_ids(token_ids: Sequence[int], field_name: str) -> bytes:
    """Token ids as little-endian uint32 bytes (4 bytes a token).

    Raises:
        ValueError: naming `field_name`, when an id is outside [0, 2**32 - 1].
    """
    try:
        packed = array("I", token_ids)
    except OverflowError as exc:
        raise ValueError(f"{field_name}: token ids must be in [0, 2**32 - 1]") from exc
    if packed.itemsize != 4:  # pragma: no cover - every supported platform has 32-bit "I"
        raise RuntimeError("array('I') is not 32-bit on this platform")
    if sys.byteorder != "little":  # pragma: no cover - stored order is little-endian
        packed.byteswap()
    return packed.tobytes()


def unpack_token_ids(data: bytes) -> tuple[int, ...]:
    """Inverse of `pack_token_ids`."""
    return tuple(unpack_token_array(data))


def unpack_token_array(data: bytes) -> array[int]:
    """Inverse of `pack_token_ids`, kept packed (4 bytes a token, not a Python int each)."""
    unpacked = array("I")
    unpacked.frombytes(data)
    if sys.byteorder != "little":  # pragma: no cover
        unpacked.byteswap()
    return unpacked


def seed_to_db(seed: int) -> int:
    """A uint64 seed as the signed 64-bit integer a BIGINT column holds (two's complement)."""
    return seed - _INT64_SPAN if seed >= 2**63 else seed


def seed_from_db(stored: int) -> int:
    """Inverse of `seed_to_db`."""
    return stored + _INT64_SPAN if stored < 0 else stored


def join_ids(ids: Sequence[str], field_name: str) -> str:
    """Comma-join ids for storage.

    Raises:
        ValueError: naming `field_name`, when an id is empty or contains a comma.
    """
    for one_id in ids:
        if not one_id or "," in one_id:
            raise ValueError(f"{field_name}: id {one_id!r} is empty or contains a comma")
    return ",".join(ids)


def split_ids(text: str) -> tuple[str, ...]:
    """Inverse of `join_ids`."""
    return tuple(text.split(",")) if text else ()


def join_ints(values: Sequence[int]) -> str:
    """Comma-join small non-negative integers (device indices)."""
    return ",".join(str(int(value)) for value in values)


def split_ints(text: str) -> tuple[int, ...]:
    """Inverse of `join_ints`."""
    return tuple(int(part) for part in text.split(",")) if text else ()


def check_page_size(page_size: int) -> None:
    """Raise ValueError naming `page_size` when it is outside 1..MAX_PAGE_SIZE."""
    if not 1 <= page_size <= MAX_PAGE_SIZE:
        raise ValueError(f"page_size: must be in 1..{MAX_PAGE_SIZE}, got {page_size}")


def encode_page_token(order: ListOrder, arrival_s: float, request_id: str) -> str:
    """An opaque token for the keyset position after (arrival_s, request_id) in `order`.

    The order is part of the token, so a token is only accepted by a listing in the same order.
    """
    raw = json.dumps([order.value, arrival_s, request_id], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_page_token(token: str, order: ListOrder) -> tuple[float, str]:
    """The keyset position (arrival_s, request_id) of a token `encode_page_token` made for `order`.

    Raises:
        ValueError: naming `page_token`, for anything `encode_page_token` did not produce, or a
            token of a listing in the other order.
    """
    malformed = "page_token: malformed; pass next_page_token unchanged"
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        token_order, arrival_s, request_id = json.loads(raw)
        if isinstance(arrival_s, bool) or not isinstance(arrival_s, int | float):
            raise TypeError("arrival_s is not a number")
        arrival_s = float(arrival_s)  # OverflowError for a huge integer
    except (binascii.Error, ValueError, TypeError, OverflowError, RecursionError) as exc:
        raise ValueError(malformed) from exc
    if (
        not isinstance(token_order, str)
        or token_order not in _LIST_ORDERS
        or not math.isfinite(arrival_s)
        or not isinstance(request_id, str)
        or len(request_id) > _REQUEST_ID_CHARS
        or "\x00" in request_id
    ):
        raise ValueError(malformed)
    if token_order != order.value:
        raise ValueError(f"page_token: from a listing in {token_order} order, not {order.value}")
    return arrival_s, request_id


def check_token_chunk(start_index: int, token_ids: Sequence[int]) -> None:
    """Raise ValueError naming the field for a negative start or an empty chunk."""
    if start_index < 0:
        raise ValueError(f"start_index: must be >= 0, got {start_index}")
    if not token_ids:
        raise ValueError("token_ids: must not be empty")


def check_tenant(tenant: str) -> None:
    """Raise ValueError when `tenant` is empty."""
    if not tenant:
        raise ValueError("tenant: must not be empty")
