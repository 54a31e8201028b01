"""In-process record store (`memory://`): the Redis semantics for one replica.

Every operation runs without awaiting, so each is atomic under asyncio. Expiry is checked on
access and a background sweeper removes expired records. The number of live records and their
bytes (proxy/stores/budget.py) are bounded: a claim beyond either bound fails (the store is
full) rather than evicting a record, and a response that does not fit the byte budget is
recorded as not replayable. Leases run on the monotonic clock. The records live and die with
the process: after a restart every key is unknown again and its retry executes (see
docs/guarantees.md).
"""

from __future__ import annotations

import asyncio
import heapq
import time

from proxy.config import DEFAULT_STORE_MAX_BYTES
from proxy.stores.base import Lease, Record, RecordState, StoredResponse, StoreError
from proxy.stores.budget import ByteBudget

SWEEP_INTERVAL = 1.0


class _Entry:
    __slots__ = (
        "created", "expires", "fingerprint", "holder", "lease_until", "response", "state", "token"
    )

    def __init__(self, token: str, fingerprint: str, lease: Lease, now: float) -> None:
        self.state = RecordState.IN_FLIGHT
        self.token = token
        self.fingerprint = fingerprint
        self.lease_until = now + lease.seconds
        self.holder = lease.holder
        self.created = time.time()
        self.expires = 0.0
        self.response: StoredResponse | None = None


class MemoryStore:
    def __init__(
        self,
        max_records: int,
        sweep_interval: float = SWEEP_INTERVAL,
        max_bytes: int = DEFAULT_STORE_MAX_BYTES,
    ) -> None:
        self.max_records = max_records
        self.budget = ByteBudget(max_bytes)
        self._sweep_interval = sweep_interval
        self._entries: dict[str, _Entry] = {}
        self._expiries: list[tuple[float, str]] = []  # heap; stale items are skipped
        self._sweeper: asyncio.Task[None] | None = None

    def __len__(self) -> int:
        return len(self._entries)

    def _live(self, key: str, now: float) -> _Entry | None:
        entry = self._entries.get(key)
        if entry is not None and entry.expires <= now:
            del self._entries[key]
            self.budget.free(entry.response)
            return None
        return entry

    def _expire_at(self, key: str, entry: _Entry, when: float) -> None:
        entry.expires = when
        heapq.heappush(self._expiries, (when, key))

    def sweep(self, now: float | None = None) -> None:
        """Drop every record whose time is up."""
        now = time.monotonic() if now is None else now
        heap = self._expiries
        while heap and heap[0][0] <= now:
            when, key = heapq.heappop(heap)
            entry = self._entries.get(key)
            if entry is not None and entry.expires == when:
                del self._entries[key]
                self.budget.free(entry.response)

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(self._sweep_interval)
            self.sweep()

    def _record(self, entry: _Entry, now: float, expired_now: bool = False) -> Record:
        return Record(
            entry.state,
            entry.token,
            entry.fingerprint,
            entry.expires - now,
            entry.response,
            max(0.0, entry.lease_until - now),
            entry.holder,
            entry.created,
            expired_now,
        )

    async def claim(self, key: str, token: str, fingerprint: str, lease: Lease) -> Record | None:
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep_forever())
        now = time.monotonic()
        entry = self._live(key, now)
        if entry is not None and entry.token != token and entry.lease_until <= now:
            if not lease.hold and entry.state != RecordState.COMPLETED:
                entry = None  # release_after_lease: the key is taken over below
            elif entry.state == RecordState.IN_FLIGHT:
                entry.state = RecordState.INDETERMINATE  # the holder died: hold the key
                return self._record(entry, now, expired_now=True)
        if entry is None:
            old = self._entries.get(key)  # set when release_after_lease takes a key over
            if old is None and (
                len(self._entries) >= self.max_records or not self.budget.claim_fits()
            ):
                self.sweep(now)
                if len(self._entries) >= self.max_records:
                    raise StoreError(f"memory store is full ({self.max_records} records)")
                if not self.budget.claim_fits():
                    self.budget.refuse_claim()
                    raise StoreError(f"memory store is full ({self.budget.limit} bytes)")
            if old is not None:
                self.budget.free(old.response)  # the taken-over record's bytes go back first
            self.budget.claim()
            entry = self._entries[key] = _Entry(token, fingerprint, lease, now)
            self._expire_at(key, entry, now + max(lease.seconds, lease.retention))
            return None
        if entry.token == token:
            return None
        return self._record(entry, now)

    async def get(self, key: str) -> Record | None:
        now = time.monotonic()
        entry = self._live(key, now)
        return None if entry is None else self._record(entry, now)

    def _owned(self, key: str, token: str) -> _Entry | None:
        entry = self._live(key, time.monotonic())
        return entry if entry is not None and entry.token == token else None

    async def complete(self, key: str, token: str, response: StoredResponse, ttl: float) -> bool:
        entry = self._owned(key, token)
        if entry is None or entry.state == RecordState.COMPLETED:
            return entry is not None
        entry.state = RecordState.COMPLETED
        entry.response = self.budget.keep(response)
        self._expire_at(key, entry, time.monotonic() + ttl)
        return True

    async def mark_indeterminate(self, key: str, token: str) -> bool:
        entry = self._owned(key, token)
        if entry is None or entry.state == RecordState.COMPLETED:
            return False
        entry.state = RecordState.INDETERMINATE
        return True

    async def release(self, key: str, token: str) -> bool:
        entry = self._owned(key, token)
        if entry is None or entry.state != RecordState.IN_FLIGHT:
            return False
        del self._entries[key]
        self.budget.free(None)
        return True

    async def discard(self, key: str) -> tuple[Record | None, bool]:
        now = time.monotonic()
        entry = self._live(key, now)
        if entry is None:
            return None, False
        record = self._record(entry, now)
        if entry.state == RecordState.IN_FLIGHT and entry.lease_until > now:
            return record, False
        del self._entries[key]
        self.budget.free(entry.response)
        return record, True

    async def ping(self) -> float:
        return 0.0

    async def eviction_policy(self) -> str | None:
        return None

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        self._entries.clear()
        self._expiries.clear()
        self.budget.clear()
