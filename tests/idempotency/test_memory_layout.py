"""The memory store's records as the garbage collector sees them (not at all), their packed
form read back unchanged, and the sweep of the per-second expiry schedule."""

from __future__ import annotations

import gc
import random
import time
from collections.abc import AsyncIterator

import pytest

from proxy.stores import MemoryStore
from proxy.stores.base import Lease, RecordState, StoredResponse

LEASE = Lease(30, 3600, holder="host-a:12")


@pytest.fixture
async def store() -> AsyncIterator[MemoryStore]:
    opened = MemoryStore(max_records=100_000)
    yield opened
    await opened.close()


def hexid(bits: int) -> str:
    return f"{random.getrandbits(bits):0{bits // 4}x}"


async def test_no_record_is_walked_by_the_collector(store: MemoryStore) -> None:
    """After a collection, nothing the store holds per record is tracked: a full collection's
    cost does not grow with the number of records."""
    for i in range(3000):
        key, token = hexid(160), hexid(128)
        await store.claim(key, token, hexid(160), LEASE)
        if i % 3 == 1:
            response = StoredResponse(200, (("Content-Type", "text/plain"),), b"x" * i, True)
            await store.complete(key, token, response, 3600)
        elif i % 3 == 2:
            await store.mark_indeterminate(key, token)
    store.sweep()  # groups the scheduled expiries
    gc.collect()
    held = [*vars(store).values(), *gc.get_referents(store._expiries)]
    tracked = [o for o in gc.get_referents(*held) if gc.is_tracked(o)]
    assert len(store) == 3000
    # Classes, the sweeper task's objects, the empty list of new expiries: a fixed handful,
    # not one per record (3000 here).
    assert len(tracked) < 20, [type(o).__name__ for o in tracked]
    assert not gc.is_tracked(store._records)


@pytest.mark.parametrize(
    ("token", "fingerprint", "headers"),
    [
        (hexid(128), hexid(160), (("Content-Type", "application/json"), ("ETag", '"1"'))),
        ("Owner-Token", "fp ünïcode", (("X-Ünïcode", "välue"),)),  # not hex: kept as text
        ("ABCDEF", "abc", ()),  # uppercase and odd-length hex are text too
    ],
)
async def test_a_record_reads_back_as_it_was_stored(
    store: MemoryStore, token: str, fingerprint: str, headers: tuple[tuple[str, str], ...]
) -> None:
    before = time.time()
    await store.claim("k", token, fingerprint, LEASE)
    record = await store.get("k")
    assert record is not None
    assert (record.state, record.token, record.fingerprint, record.holder, record.response) == (
        RecordState.IN_FLIGHT, token, fingerprint, "host-a:12", None
    )
    assert 29 < record.lease_remaining <= 30 and 3599 < record.remaining <= 3600
    assert before <= record.created <= time.time()
    stored = StoredResponse(201, headers, bytes(range(256)), True)
    assert await store.complete("k", token, stored, 60)
    record = await store.get("k")
    assert record is not None and record.state == RecordState.COMPLETED
    assert record.response == stored and 59 < record.remaining <= 60


async def test_the_sweep_follows_deadlines_that_move(store: MemoryStore) -> None:
    """A record scheduled at its claim's deadline and completed with a later or an earlier one
    is removed at the deadline it has, not at the one it was scheduled for."""
    now = time.monotonic()
    await store.claim("later", "t", "fp", Lease(1, 1))
    await store.complete("later", "t", StoredResponse(200, (), b"", True), 10)
    await store.claim("earlier", "t", "fp", Lease(1, 100))
    await store.complete("earlier", "t", StoredResponse(200, (), b"", True), 5)
    await store.claim("gone", "t", "fp", Lease(1, 1))
    store.sweep(now + 3)  # "gone" expired; "later" is rescheduled, not removed
    assert sorted(store._records) == ["earlier", "later"]
    store.sweep(now + 7)
    assert sorted(store._records) == ["later"]
    store.sweep(now + 12)
    assert len(store) == 0 and store.budget.used == 0
