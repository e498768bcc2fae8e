"""API key strings: `pecsched_<key id>_<secret>`, stored only as their SHA-256.

The secret has 256 bits of entropy, so a plain SHA-256 (no salt, no slow hash) cannot be
brute-forced; the key id (public, 64 bits) finds the row, and the digest is compared in
constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import string

_PREFIX = "pecsched"
_KEY_ID_HEX_CHARS = 16


def generate_api_key() -> tuple[str, str]:
    """A new (key_id, key string) pair; the key string is shown to the user once."""
    key_id = secrets.token_hex(_KEY_ID_HEX_CHARS // 2)
    return key_id, f"{_PREFIX}_{key_id}_{secrets.token_urlsafe(32)}"


def key_sha256(key: str) -> str:
    """Hex SHA-256 of a key string (what the database stores)."""
    return hashlib.sha256(key.encode()).hexdigest()


def parse_key_id(key: str) -> str | None:
    """The key id embedded in a key string; None when it is not shaped like one."""
    parts = key.split("_", 2)
    if len(parts) != 3 or parts[0] != _PREFIX or len(parts[1]) != _KEY_ID_HEX_CHARS:
        return None
    if not parts[2] or any(c not in string.hexdigits for c in parts[1]):
        return None
    return parts[1]


def digest_matches(key: str, stored_sha256: str) -> bool:
    """Whether `key` hashes to `stored_sha256` (constant-time comparison)."""
    return hmac.compare_digest(key_sha256(key), stored_sha256)
