"""The idempotency record store: one small protocol, implemented in memory and on Redis.

A record lives under a storage key (a hex digest chosen by the caller) and moves through
`in_flight` (owned by a random token, with a lease deadline stored in the record) to `completed`
(kept for the retention ttl) or `indeterminate` (kept for the retention too), or is deleted on
release. The lease does not end the record: a claim that finds an `in_flight` record whose lease
ran out (its holder died) turns it `indeterminate` in the same atomic step, unless the route opted
into `release_after_lease`, where that claim takes the key over instead. Completion and release
succeed only for the owner token, so a stale owner whose key was taken over can never overwrite
the new record, while a live but slow owner still completes a record that was declared
indeterminate meanwhile (its answer is better than "unknown").
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol


class RecordState(StrEnum):
    IN_FLIGHT = "in_flight"
    COMPLETED = "completed"
    INDETERMINATE = "indeterminate"


# The states as module globals, which the stores and the idempotency stage read per request: on
# Python 3.11 reading `RecordState.COMPLETED` goes through EnumType.__getattr__'s slot, a call
# (docs/performance.md, "Enum members and config fields").
IN_FLIGHT, COMPLETED, INDETERMINATE = (
    RecordState.IN_FLIGHT, RecordState.COMPLETED, RecordState.INDETERMINATE
)


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
class Lease:
    """The terms of a claim, fixed per route at config load.

    `seconds`: how long the holder may take; `retention`: how long the record is kept (the
    route's `ttl`); `hold`: a claim whose lease ran out becomes indeterminate (True) or may be
    taken over (False, `on_indeterminate: release_after_lease`); `holder`: who claims (host and
    pid, shown by the admin lookup)."""

    seconds: float
    retention: float
    hold: bool = True
    holder: str = ""


@dataclass(frozen=True, slots=True)
class Record:
    state: RecordState
    token: str
    fingerprint: str
    remaining: float  # seconds until the record expires
    response: StoredResponse | None = None
    # Seconds left of the holder's lease (0 once it ran out; for in_flight records).
    lease_remaining: float = 0.0
    holder: str = ""
    created: float = 0.0  # epoch seconds of the claim (0 when unknown: version 1)
    # True on the one claim that found the holder's lease run out and made the record
    # indeterminate (for the event line; every later reader sees a plain indeterminate record).
    lease_expired_now: bool = False


class Store(Protocol):
    async def claim(self, key: str, token: str, fingerprint: str, lease: Lease) -> Record | None:
        """Create an in-flight record owned by `token` and return None, or return the record
        already there (made indeterminate first if its holder's lease ran out and `lease.hold`;
        taken over, returning None, if it ran out and not `lease.hold`). Claiming again with
        the same token returns None, so a retried claim whose first reply was lost recognises
        its own reservation."""
        ...

    async def get(self, key: str) -> Record | None: ...

    async def complete(self, key: str, token: str, response: StoredResponse, ttl: float) -> bool:
        """Owner only: in_flight or indeterminate -> completed, kept for `ttl` seconds."""
        ...

    async def mark_indeterminate(self, key: str, token: str) -> bool:
        """Owner only: in_flight -> indeterminate, kept for the retention."""
        ...

    async def release(self, key: str, token: str) -> bool:
        """Owner only: delete an in-flight record so the next request runs (an indeterminate
        one stays: only an operator releases it, see `discard`)."""
        ...

    async def discard(self, key: str) -> tuple[Record | None, bool]:
        """An operator's release: delete the record unless it is in flight with a live lease
        (its holder is still working on it). Returns the record as it was and whether it was
        deleted, decided in one atomic step."""
        ...

    async def ping(self) -> float:
        """Round trip in seconds; raises StoreError when the store is unreachable."""
        ...

    async def eviction_policy(self) -> str | None:
        """Redis `maxmemory-policy` (None when not applicable or not readable)."""
        ...

    async def close(self) -> None: ...
