"""Salted hashes for values that must be correlatable in logs but never readable there."""

from __future__ import annotations

import hashlib
import hmac
import secrets

_process_salt: bytes | None = None


def hmac_hex(salt: bytes, value: str | bytes) -> str:
    """HMAC-SHA256 of `value` under `salt` as lowercase hex (for user.hash, key_hash)."""
    data = value.encode("utf-8", "surrogateescape") if isinstance(value, str) else value
    return hmac.new(salt, data, hashlib.sha256).hexdigest()


def salt(configured: str) -> bytes:
    """The configured `logging.hash_salt`, else one random salt kept for the process lifetime.

    A random salt makes hashes uncorrelatable across replicas and restarts (startup warns).
    """
    global _process_salt
    if configured:
        return configured.encode()
    if _process_salt is None:
        _process_salt = secrets.token_bytes(32)
    return _process_salt
