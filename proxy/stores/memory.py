"""In-process record store (`memory://`): the Redis semantics for one replica.

Every operation runs without awaiting, so each is atomic under asyncio. Expiry is checked on
access and a background sweeper removes expired records. The number of live records and their
bytes (proxy/stores/budget.py) are bounded: a claim beyond either bound fails (the store is
full) rather than evicting a record, and a response that does not fit the byte budget is
recorded as not replayable. Leases run on the monotonic clock. The records live and die with
the process: after a restart every key is unknown again and its retry executes (see
docs/guarantees.md).

Each record is one bytes object (proxy/stores/packed.py) in a dict that therefore holds no
object the garbage collector tracks, and expiries are scheduled in untracked tuples
(proxy/stores/expiry.py): a million records add nothing to a collection's pause.
"""

from __future__ import annotations

import asyncio
import time

from proxy.config import DEFAULT_STORE_MAX_BYTES
from proxy.stores import packed
from proxy.stores.base import (
    COMPLETED,
    IN_FLIGHT,
    INDETERMINATE,
    Lease,
    Record,
    StoredResponse,
    StoreError,
)
from proxy.stores.budget import ByteBudget
from proxy.stores.expiry import Expiries

SWEEP_INTERVAL = 1.0


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
        self._records: dict[str, bytes] = {}
        self._expiries = Expiries(time.monotonic())
        # Who claimed, once per distinct holder (host and pid: one per process) rather than
        # once per record; a record keeps the index.
        self._holders: list[str] = []
        self._holder_index: dict[str, int] = {}
        self._sweeper: asyncio.Task[None] | None = None

    def __len__(self) -> int:
        return len(self._records)

    def _live(self, key: str, now: float) -> bytes | None:
        blob = self._records.get(key)
        if blob is not None and packed.expires(blob) <= now:
            self._remove(key, blob)
            return None
        return blob

    def _remove(self, key: str, blob: bytes) -> None:
        del self._records[key]
        self.budget.free(packed.payload(blob))

    def sweep(self, now: float | None = None) -> None:
        """Drop every record whose time is up."""
        now = time.monotonic() if now is None else now
        for key in self._expiries.take(now):
            blob = self._records.get(key)
            if blob is None:
                continue  # removed meanwhile
            expires = packed.expires(blob)
            if expires <= now:
                self._remove(key, blob)
            else:  # its deadline moved later (completed), or a new record took the key
                self._expiries.add(key, expires)

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(self._sweep_interval)
            self.sweep()

    def _holder(self, holder: str) -> int:
        index = self._holder_index.get(holder)
        if index is None:
            index = self._holder_index[holder] = len(self._holders)
            self._holders.append(holder)
        return index

    def _record(self, blob: bytes, now: float, expired_now: bool = False) -> Record:
        return packed.record(blob, now, self._holders, expired_now)

    async def claim(self, key: str, token: str, fingerprint: str, lease: Lease) -> Record | None:
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep_forever())
        now = time.monotonic()
        blob = self._live(key, now)
        if blob is not None:
            found = packed.fields(blob)
            if found.token == token:
                return None
            if found.lease_until > now:
                return self._record(blob, now)
            if not lease.hold and found.state != COMPLETED:
                blob = None  # release_after_lease: the key is taken over below
            elif found.state == IN_FLIGHT:  # the holder died: hold the key
                blob = self._records[key] = packed.with_state(blob, INDETERMINATE)
                return self._record(blob, now, expired_now=True)
            else:
                return self._record(blob, now)
        old = self._records.get(key)  # set when release_after_lease takes a key over
        if old is None and (len(self._records) >= self.max_records or not self.budget.claim_fits()):
            self.sweep(now)
            if len(self._records) >= self.max_records:
                raise StoreError(f"memory store is full ({self.max_records} records)")
            if not self.budget.claim_fits():
                self.budget.refuse_claim()
                raise StoreError(f"memory store is full ({self.budget.limit} bytes)")
        if old is not None:
            self._remove(key, old)  # the taken-over record's bytes go back first
        self.budget.claim()
        expires = now + max(lease.seconds, lease.retention)
        self._records[key] = packed.new(
            token, fingerprint, now + lease.seconds, self._holder(lease.holder), time.time(),
            expires,
        )
        self._expiries.add(key, expires)
        return None

    async def get(self, key: str) -> Record | None:
        now = time.monotonic()
        blob = self._live(key, now)
        return None if blob is None else self._record(blob, now)

    def _owned(self, key: str, token: str) -> tuple[bytes, packed.Fields] | None:
        blob = self._live(key, time.monotonic())
        if blob is None:
            return None
        found = packed.fields(blob)
        return (blob, found) if found.token == token else None

    async def complete(self, key: str, token: str, response: StoredResponse, ttl: float) -> bool:
        owned = self._owned(key, token)
        if owned is None or owned[1].state == COMPLETED:
            return owned is not None
        blob, found = owned
        headers, body, replayable = b"", b"", False
        if response.replayable:
            headers = packed.headers_blob(response.headers)
            if self.budget.keep(len(headers) + len(response.body)):
                body, replayable = response.body, True
            else:  # recorded as run, answered 422 on a retry: never executed again
                headers = b""
        expires = time.monotonic() + ttl
        self._records[key] = packed.completed(blob, response.status, headers, body, replayable,
                                              expires)
        if expires < found.expires:  # a later deadline is found by the entry already scheduled
            self._expiries.add(key, expires)
        return True

    async def mark_indeterminate(self, key: str, token: str) -> bool:
        owned = self._owned(key, token)
        if owned is None or owned[1].state == COMPLETED:
            return False
        self._records[key] = packed.with_state(owned[0], INDETERMINATE)
        return True

    async def release(self, key: str, token: str) -> bool:
        owned = self._owned(key, token)
        if owned is None or owned[1].state != IN_FLIGHT:
            return False
        self._remove(key, owned[0])
        return True

    async def discard(self, key: str) -> tuple[Record | None, bool]:
        now = time.monotonic()
        blob = self._live(key, now)
        if blob is None:
            return None, False
        record = self._record(blob, now)
        if record.state == IN_FLIGHT and record.lease_remaining > 0:
            return record, False
        self._remove(key, blob)
        return record, True

    async def ping(self) -> float:
        return 0.0

    async def eviction_policy(self) -> str | None:
        return None

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        self._records.clear()
        self._expiries.clear()
        self.budget.clear()
