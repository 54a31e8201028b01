"""The memory store's byte bound (store.max_bytes): honest accounting, the bound itself, the
policy at the limit (one caller cannot lock the others out) and its warning events."""

from __future__ import annotations

import gc
import random
import tracemalloc
from collections.abc import AsyncIterator, Iterator

import pytest

from proxy.observability import events, logsink
from proxy.stores import MemoryStore, StoreError
from proxy.stores.base import Lease, RecordState, StoredResponse
from proxy.stores.budget import BULK_SHARE, CLAIM_BYTES, HIGH_WATER, SMALL_RESPONSE
from tests.support.lines import Lines

# A route's claim terms: 60 s to finish, kept for an hour.
LEASE = Lease(60, 3600)

MiB = 1024 * 1024


def hexid(bits: int) -> str:
    """Like the stage's storage keys, owner tokens and fingerprints: fresh hex strings."""
    return f"{random.getrandbits(bits):0{bits // 4}x}"


def response(body_size: int, headers: int = 2) -> StoredResponse:
    fields = tuple((f"X-Header-{i}", hexid(128)) for i in range(headers))
    return StoredResponse(200, fields, random.randbytes(body_size), True)


@pytest.fixture
async def store() -> AsyncIterator[MemoryStore]:
    opened = MemoryStore(max_records=1_000_000, max_bytes=1 * MiB)
    yield opened
    await opened.close()


@pytest.fixture
def reported() -> Iterator[Lines]:
    lines = Lines()
    events.configure("info", lines)
    try:
        yield lines
    finally:
        events.configure("info", logsink.STDOUT)


async def fill(store: MemoryStore, count: int, body_size: int, headers: int = 2) -> list[str]:
    """`count` keys claimed and completed with responses of `body_size`; returns the keys."""
    keys = []
    for _ in range(count):
        key, token = hexid(160), hexid(128)
        assert await store.claim(key, token, hexid(160), LEASE) is None
        assert await store.complete(key, token, response(body_size, headers), 3600)
        keys.append(key)
    return keys


@pytest.mark.parametrize(
    ("count", "body_size", "headers", "complete"),
    [
        (4000, 0, 0, False),  # in-flight records only
        (4000, 0, 0, True),  # completed, empty responses
        (2000, 200, 8, True),  # typical small JSON answers
        (500, 8000, 3, True),
        (50, 200_000, 3, True),
    ],
)
async def test_accounting_matches_what_tracemalloc_measures(
    count: int, body_size: int, headers: int, complete: bool
) -> None:
    """The estimate never undercounts the heap the store really holds, and overcounts by less
    than half (the claim reserves the completion it may need)."""
    store = MemoryStore(max_records=1_000_000, max_bytes=1024 * MiB)
    await store.claim("warm-up", "t", "fp", LEASE)  # starts the sweeper outside the measurement
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(count):
            key, token = hexid(160), hexid(128)
            await store.claim(key, token, hexid(160), LEASE)
            if complete:
                await store.complete(key, token, response(body_size, headers), 3600)
        gc.collect()
        measured = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    estimated = store.budget.used - CLAIM_BYTES  # without the warm-up record
    try:
        assert measured <= estimated < 1.5 * measured, (measured, estimated)
    finally:
        await store.close()


async def test_bytes_stay_under_the_limit_and_are_returned(store: MemoryStore) -> None:
    limit = store.budget.limit
    for size in (100, 3000, 60_000, 250_000, 10, 0):
        for _ in range(40):
            key, token = hexid(160), hexid(128)
            try:
                await store.claim(key, token, hexid(160), LEASE)
            except StoreError:
                continue
            await store.complete(key, token, response(size), 0.05)
            assert store.budget.used <= limit
    assert store.budget.used > limit * BULK_SHARE
    store.sweep(now=float("inf"))
    assert (len(store), store.budget.used) == (0, 0)


async def test_release_returns_the_claim(store: MemoryStore) -> None:
    await store.claim("k", "owner", "fp", LEASE)
    assert store.budget.used == CLAIM_BYTES
    assert await store.release("k", "owner")
    assert store.budget.used == 0


async def test_one_caller_with_large_responses_cannot_lock_out_small_ones(
    store: MemoryStore,
) -> None:
    """A flood of large responses fills at most BULK_SHARE of the store; then they are recorded
    as run but not replayable, while other callers' claims and small responses still fit."""
    flood = await fill(store, 40, 60_000)  # 2.3 MiB offered to a 1 MiB store
    # The kept responses stay under the share; the claims' own bytes may come on top.
    assert store.budget.used - len(flood) * CLAIM_BYTES <= store.budget.limit * BULK_SHARE
    records = [await store.get(key) for key in flood]
    kept = [r for r in records if r is not None and r.response and r.response.replayable]
    unkept = [r for r in records if r is not None and r.response and not r.response.replayable]
    assert kept and unkept and len(kept) + len(unkept) == len(flood)
    # Never dropped: a retry of every flooded key finds a completed record, never a free key.
    assert all(r is not None and r.state == RecordState.COMPLETED for r in records)
    assert store.budget.unkept_responses == len(unkept)
    # Another caller: a small request claims, completes and stays replayable.
    for _ in range(50):
        (key,) = await fill(store, 1, 500)
        record = await store.get(key)
        assert record is not None and record.response is not None
        assert record.response.replayable and len(record.response.body) == 500
    assert store.budget.refused_claims == 0


async def test_claims_are_refused_only_when_the_store_is_full(
    store: MemoryStore, reported: Lines
) -> None:
    fitting = store.budget.limit // CLAIM_BYTES
    for _ in range(fitting):
        await store.claim(hexid(160), hexid(128), hexid(160), LEASE)
    with pytest.raises(StoreError, match=rf"full \({store.budget.limit} bytes\)"):
        await store.claim(hexid(160), hexid(128), hexid(160), LEASE)
    assert store.budget.refused_claims == 1
    assert [line["event"] for line in reported.json()] == ["store_memory_high"]


async def test_a_full_store_still_records_that_a_claim_ran(
    store: MemoryStore, reported: Lines
) -> None:
    """Completing never needs bytes a claim did not reserve: at-most-once holds when full."""
    await store.claim("mine", "owner", "fp", LEASE)
    while True:
        try:
            await store.claim(hexid(160), hexid(128), hexid(160), LEASE)
        except StoreError:
            break
    assert await store.complete("mine", "owner", response(SMALL_RESPONSE // 2), 3600)
    record = await store.get("mine")
    assert record is not None and record.state == RecordState.COMPLETED and record.response is not None
    assert not record.response.replayable and record.response.status == 200
    assert store.budget.used <= store.budget.limit


async def test_warning_once_per_crossing(store: MemoryStore, reported: Lines) -> None:
    """Large responses stop at BULK_SHARE without a warning (they are counted); small records
    crossing HIGH_WATER warn once, and again only after the store went back under LOW_WATER."""
    await fill(store, 40, 60_000)
    assert not reported.raw
    high_water = store.budget.limit * HIGH_WATER
    while store.budget.used < high_water:
        await fill(store, 1, 500)
    await fill(store, 20, 500)  # stays above the mark: nothing more
    (high,) = reported.json()
    assert (high["event"], high["level"]) == ("store_memory_high", "warning")
    assert high["limit_bytes"] == store.budget.limit and high["used_bytes"] >= high_water
    store.sweep(now=float("inf"))  # everything expires
    assert [line["event"] for line in reported.json()] == [
        "store_memory_high", "store_memory_normal"
    ]
    while store.budget.used < high_water:
        await fill(store, 1, 500)
    assert [line["event"] for line in reported.json()][-1] == "store_memory_high"
    assert len(reported.raw) == 3
