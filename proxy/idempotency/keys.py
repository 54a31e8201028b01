"""Pure functions for the Idempotency-Key header and the hashes derived from it."""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets

MAX_KEY_LENGTH = 255
# A bare token: visible ASCII without the double quote. A quoted RFC 8941 sf-string: visible
# ASCII where `"` and `\` appear only escaped.
_BARE = re.compile(r'[!#-~]{1,255}')
_QUOTED = re.compile(r'"((?:[!#-\[\]-~]|\\["\\])+)"')
_ESCAPE = re.compile(r'\\(["\\])')

# Keys the storage-key identity HMAC when `logging.hash_salt` is empty. It must be the same in
# every replica and across restarts, or a retry served by another process would run again.
DEFAULT_SCOPE_SECRET = b"idemproxy/scope/v1"
# Keys the hashes written to logs when `logging.hash_salt` is empty: random per process.
PROCESS_SALT = secrets.token_bytes(16)


def parse_key(value: str) -> str | None:
    """The key from an `Idempotency-Key` value (bare or quoted), or None when malformed."""
    if _BARE.fullmatch(value):
        return value
    match = _QUOTED.fullmatch(value)
    if match is None:
        return None
    key = _ESCAPE.sub(r"\1", match[1])
    return key if len(key) <= MAX_KEY_LENGTH else None


class KeyHasher:
    """The storage key and the log hashes for one process and config."""

    __slots__ = ("_log", "_scope")

    def __init__(self, hash_salt: str) -> None:
        salt = hash_salt.encode()
        self._scope = hmac.new(salt or DEFAULT_SCOPE_SECRET, digestmod=hashlib.sha256)
        self._log = hmac.new(salt or PROCESS_SALT, digestmod=hashlib.sha256)

    def identity(self, value: str) -> str:
        """The scope identity that goes into the storage key (never the raw header)."""
        mac = self._scope.copy()
        mac.update(value.encode("utf-8", "surrogateescape"))
        return mac.hexdigest()

    def log_hash(self, value: str) -> str:
        """A short salted hash for log lines (`idempotency.key_hash`, `user.hash`)."""
        mac = self._log.copy()
        mac.update(value.encode("utf-8", "surrogateescape"))
        return mac.hexdigest()[:16]


def storage_key(route: str, identity: str, key: str) -> str:
    """hash(route, scope identity, key): two identities never share a record."""
    digest = hashlib.sha256()
    for part in (route, identity, key):
        digest.update(part.encode("utf-8", "surrogateescape"))
        digest.update(b"\0")
    return digest.hexdigest()[:40]


def record_key(
    hasher: KeyHasher, route: str, key: str, scope_value: str | None
) -> tuple[str, str]:
    """(storage key, scope identity) of a raw key and the raw scope header value (None when
    absent): the one derivation, used by the stage and by the admin lookup."""
    identity = "" if scope_value is None else hasher.identity(scope_value)
    return storage_key(route, identity, key), identity
