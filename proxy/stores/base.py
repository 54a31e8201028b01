"""The idempotency record store: one small protocol, implemented in memory and on Redis.

A record lives under a storage key (a hex digest chosen by the caller) and moves through
`in_flight` (owned by a random token, expiring with the lease) to `completed` (kept for the
retention ttl) or `indeterminate` (kept until the lease ends), or is deleted on release.
Completion and release succeed only for the owner token, so a stale owner whose lease expired
and was taken over can never overwrite the new record.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

SCHEMA_VERSION = 1

IN_FLIGHT = "in_flight"
COMPLETED = "completed"
INDETERMINATE = "indeterminate"


class StoreError(Exception):
    """The store did not answer within its budget, refused, or is full."""


class StoreTimeout(StoreError):
    """No answer within the budget: the write may or may not have been applied."""


@dataclass(frozen=True, slots=True)
class StoredResponse:
    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes
    replayable: bool


@dataclass(frozen=True, slots=True)
class Record:
    state: str
    token: str
    fingerprint: str
    remaining: float  # seconds until the record expires
    response: StoredResponse | None = None


class Store(Protocol):
    async def claim(self, key: str, token: str, fingerprint: str, lease: float) -> Record | None:
        """Create an in-flight record owned by `token` for `lease` seconds and return None, or
        return the record already there. Claiming again with the same token returns None, so a
        retried claim whose first reply was lost recognises its own reservation."""
        ...

    async def get(self, key: str) -> Record | None: ...

    async def complete(self, key: str, token: str, response: StoredResponse, ttl: float) -> bool:
        """Owner only: in_flight -> completed, kept for `ttl` seconds."""
        ...

    async def mark_indeterminate(self, key: str, token: str) -> bool:
        """Owner only: in_flight -> indeterminate, kept until the lease ends."""
        ...

    async def release(self, key: str, token: str) -> bool:
        """Owner only: delete an in-flight record so the next request runs."""
        ...

    async def ping(self) -> float:
        """Round trip in seconds; raises StoreError when the store is unreachable."""
        ...

    async def eviction_policy(self) -> str | None:
        """Redis `maxmemory-policy` (None when not applicable or not readable)."""
        ...

    async def close(self) -> None: ...
