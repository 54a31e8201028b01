"""The Store contract, against the memory store and a real redis-server."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest

from bench import record_memory
from proxy.config import Store as StoreConfig
from proxy.stores import MemoryStore, Store, StoreError, open_store
from proxy.stores.base import Lease, RecordState, StoredResponse
from proxy.stores.redis import RedisStore, redis_key
from tests.support.ports import free_port
from tests.support.redis_server import RedisServer

IN_FLIGHT, COMPLETED, INDETERMINATE = RecordState

RESPONSE = StoredResponse(201, (("Content-Type", "application/json"),), b'{"id":1}', True)


@pytest.fixture
async def store(store_url: str) -> AsyncIterator[Store]:
    opened = open_store(StoreConfig(url=store_url, timeout=0.5))
    yield opened
    await opened.close()


async def expire(store: Store, key: str) -> None:
    """Poll until the record at `key` is gone (server-side TTL or sweeper)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 5
    while await store.get(key) is not None:
        assert loop.time() < deadline, "record never expired"
        await asyncio.sleep(0.02)


async def test_claim_is_exclusive_and_repeatable_by_its_owner(store: Store) -> None:
    assert await store.claim("k", "owner", "fp", Lease(5, 60)) is None
    assert await store.claim("k", "owner", "fp", Lease(5, 60)) is None  # a retried claim is ours
    other = await store.claim("k", "other", "fp2", Lease(5, 60))
    assert other is not None
    assert (other.state, other.token, other.fingerprint) == (IN_FLIGHT, "owner", "fp")
    assert 4 < other.lease_remaining <= 5
    assert 59 < other.remaining <= 60, "an in-flight record is kept for the retention"


async def test_complete_replaces_the_lease_with_the_retention(store: Store) -> None:
    await store.claim("k", "owner", "fp", Lease(5, 60))
    assert not await store.complete("k", "intruder", RESPONSE, 60)
    assert await store.complete("k", "owner", RESPONSE, 60)
    assert await store.complete("k", "owner", RESPONSE, 60)  # repeated by a retry: still fine
    record = await store.claim("k", "other", "fp", Lease(5, 60))
    assert record is not None
    assert (record.state, record.response) == (COMPLETED, RESPONSE)
    assert 59 < record.remaining <= 60


async def test_release_only_by_the_owner(store: Store) -> None:
    await store.claim("k", "owner", "fp", Lease(5, 60))
    assert not await store.release("k", "intruder")
    assert await store.get("k") is not None
    assert await store.release("k", "owner")
    assert await store.get("k") is None
    assert await store.claim("k", "next", "fp", Lease(5, 60)) is None


async def lease_over(store: Store, key: str) -> None:
    """Poll until the holder's lease of the record at `key` has run out."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 5
    while (record := await store.get(key)) is not None and record.lease_remaining > 0:
        assert loop.time() < deadline, "the lease never ran out"
        await asyncio.sleep(0.02)


async def test_indeterminate_is_held_for_the_retention(store: Store) -> None:
    await store.claim("k", "owner", "fp", Lease(0.2, 60))
    assert await store.mark_indeterminate("k", "owner")
    assert not await store.release("k", "owner")  # not released: it may have run
    await lease_over(store, "k")
    for _ in range(2):  # still held after the lease, at every later claim
        record = await store.claim("k", "next", "fp", Lease(5, 60))
        assert record is not None
        assert (record.state, record.token) == (INDETERMINATE, "owner")
        assert record.remaining > 50
        assert not record.lease_expired_now


async def test_a_claim_whose_holder_died_becomes_indeterminate(store: Store) -> None:
    await store.claim("k", "dead", "fp", Lease(0.2, 60, holder="host/1"))
    await lease_over(store, "k")
    record = await store.claim("k", "retry", "fp", Lease(5, 60))
    assert record is not None
    assert (record.state, record.holder, record.lease_expired_now) == (
        INDETERMINATE, "host/1", True
    )
    again = await store.claim("k", "retry2", "fp", Lease(5, 60))
    assert again is not None
    assert (again.state, again.lease_expired_now) == (INDETERMINATE, False)  # reported once


async def test_a_slow_live_holder_still_completes_after_its_lease(store: Store) -> None:
    await store.claim("k", "slow", "fp", Lease(0.2, 60))
    await lease_over(store, "k")
    seen = await store.claim("k", "retry", "fp", Lease(5, 60))
    assert seen is not None
    assert seen.state == INDETERMINATE
    assert await store.complete("k", "slow", RESPONSE, 60)
    record = await store.claim("k", "retry", "fp", Lease(5, 60))
    assert record is not None
    assert (record.state, record.response) == (COMPLETED, RESPONSE)


async def test_release_after_lease_takes_over_and_fences_the_stale_owner(store: Store) -> None:
    await store.claim("k", "stale", "fp", Lease(0.2, 60, hold=False))
    await lease_over(store, "k")
    assert await store.claim("k", "fresh", "fp", Lease(5, 60, hold=False)) is None
    assert not await store.complete("k", "stale", RESPONSE, 60)
    assert not await store.mark_indeterminate("k", "stale")
    assert not await store.release("k", "stale")
    record = await store.get("k")
    assert record is not None
    assert (record.state, record.token) == (IN_FLIGHT, "fresh")


async def test_release_after_lease_reruns_an_indeterminate_key(store: Store) -> None:
    await store.claim("k", "owner", "fp", Lease(0.2, 60, hold=False))
    assert await store.mark_indeterminate("k", "owner")
    held = await store.claim("k", "early", "fp", Lease(5, 60, hold=False))
    assert held is not None
    assert held.state == INDETERMINATE  # not before the lease is over
    await lease_over(store, "k")
    assert await store.claim("k", "next", "fp", Lease(5, 60, hold=False)) is None


async def test_discard_spares_a_live_holder_only(store: Store) -> None:
    assert await store.discard("none") == (None, False)
    await store.claim("live", "owner", "fp", Lease(5, 60))
    record, released = await store.discard("live")
    assert record is not None
    assert (record.state, released) == (IN_FLIGHT, False)
    assert await store.get("live") is not None
    await store.claim("held", "owner", "fp", Lease(5, 60))
    await store.mark_indeterminate("held", "owner")
    await store.claim("done", "owner", "fp", Lease(5, 60))
    await store.complete("done", "owner", RESPONSE, 60)
    await store.claim("dead", "owner", "fp", Lease(0.2, 60))
    await lease_over(store, "dead")
    for key, state in (("held", INDETERMINATE), ("done", COMPLETED), ("dead", IN_FLIGHT)):
        record, released = await store.discard(key)
        assert record is not None
        assert (record.state, released) == (state, True)
        assert await store.get(key) is None
        assert await store.claim(key, "next", "fp", Lease(5, 60)) is None


async def test_completed_record_expires_after_its_ttl(store: Store) -> None:
    await store.claim("k", "owner", "fp", Lease(5, 60))
    await store.complete("k", "owner", RESPONSE, 0.2)
    await expire(store, "k")


async def test_not_replayable_record_keeps_its_status(store: Store) -> None:
    await store.claim("k", "owner", "fp", Lease(5, 60))
    await store.complete("k", "owner", StoredResponse(200, (), b"", False), 60)
    record = await store.get("k")
    assert record is not None
    assert record.response is not None
    assert (record.response.status, record.response.replayable) == (200, False)


async def test_ping(store: Store) -> None:
    assert 0 <= await store.ping() < 0.5


async def test_memory_store_is_bounded_and_sweeps() -> None:
    store = MemoryStore(max_records=2, sweep_interval=0.05)
    try:
        await store.claim("a", "t", "fp", Lease(0.1, 0.1))
        await store.claim("b", "t", "fp", Lease(60, 60))
        with pytest.raises(StoreError, match="full"):
            await store.claim("c", "t", "fp", Lease(60, 60))
        # The sweeper, not an access, removes the expired record.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 5
        while len(store) > 1:
            assert loop.time() < deadline, "the sweeper never ran"
            await asyncio.sleep(0.02)
        assert await store.claim("c", "t", "fp", Lease(60, 60)) is None
    finally:
        await store.close()


async def test_redis_record_layout(redis_server: Callable[..., RedisServer]) -> None:
    """Schema 3: one string, the state in byte 1, the body last; expiry at the retention."""
    redis = redis_server()
    store = RedisStore.from_url(redis.url, 0.5)
    try:
        await store.claim("abc", "owner", "fp", Lease(5, 60))
        key = redis_key("abc")
        assert key == "idem:v1:{abc}"  # the key namespace did not change with the layout
        assert redis.cli("TYPE", key) == "string"
        assert redis.cli("GETRANGE", key, "0", "1") == "\x03f"
        assert 59000 < int(redis.cli("PTTL", key)) <= 60000  # the retention, not the lease
        assert await store.complete("abc", "owner", RESPONSE, 30)
        assert redis.cli("GETRANGE", key, "1", "1") == "c"
        assert redis.cli("GETRANGE", key, "-8", "-1") == '{"id":1}'
        assert 29000 < int(redis.cli("PTTL", key)) <= 30000
        assert await store.eviction_policy() == "noeviction"
    finally:
        await store.close()


async def test_redis_reads_version_2_records(redis_server: Callable[..., RedisServer]) -> None:
    """Hashes written by the previous release: a completed one replays; an in-flight one whose
    holder died turns indeterminate (still a hash), and an operator can release it."""
    redis = redis_server()
    store = RedisStore.from_url(redis.url, 0.5)
    try:
        redis.cli("HSET", redis_key("v2-done"), "v", "2", "state", "completed", "token", "t",
                  "fp", "fp", "lease_until", "1", "holder", "h/1", "created", "1000",
                  "status", "201", "headers", '[["Content-Type","application/json"]]',
                  "body", '{"id":1}', "replayable", "1")
        redis.cli("PEXPIRE", redis_key("v2-done"), "60000")
        done = await store.claim("v2-done", "new", "fp", Lease(5, 60))
        assert done is not None
        assert (done.response, done.holder, done.created) == (RESPONSE, "h/1", 1.0)
        redis.cli("HSET", redis_key("v2-dead"), "v", "2", "state", "in_flight", "token", "t",
                  "fp", "fp", "lease_until", "1", "holder", "h/1", "created", "1000")
        redis.cli("PEXPIRE", redis_key("v2-dead"), "60000")
        dead = await store.claim("v2-dead", "new", "fp", Lease(5, 60))
        assert dead is not None
        assert (dead.state, dead.token, dead.lease_expired_now) == (INDETERMINATE, "t", True)
        assert redis.cli("HGET", redis_key("v2-dead"), "state") == "indeterminate"
        assert not await store.complete("v2-dead", "new", RESPONSE, 60)  # not the owner
        record, released = await store.discard("v2-dead")
        assert record is not None and record.state == INDETERMINATE and released
        assert await store.get("v2-dead") is None
    finally:
        await store.close()


async def test_redis_reads_version_1_records(redis_server: Callable[..., RedisServer]) -> None:
    """Records written by the previous release: a completed one replays, an in-flight one (no
    lease deadline) is never taken over or turned indeterminate before its PEXPIRE ends it."""
    redis = redis_server()
    store = RedisStore.from_url(redis.url, 0.5)
    try:
        redis.cli("HSET", redis_key("old-done"), "v", "1", "state", "completed", "token", "t",
                  "fp", "fp", "status", "201", "headers", '[["Content-Type","text/plain"]]',
                  "body", "ok", "replayable", "1")
        redis.cli("PEXPIRE", redis_key("old-done"), "60000")
        done = await store.claim("old-done", "new", "fp", Lease(5, 60))
        assert done is not None
        assert done.response == StoredResponse(201, (("Content-Type", "text/plain"),), b"ok", True)
        redis.cli("HSET", redis_key("old-busy"), "v", "1", "state", "in_flight", "token", "t",
                  "fp", "fp")
        redis.cli("PEXPIRE", redis_key("old-busy"), "60000")
        busy = await store.claim("old-busy", "new", "fp", Lease(0.001, 60, hold=False))
        assert busy is not None
        assert (busy.state, busy.token) == (IN_FLIGHT, "t")
        assert (await store.discard("old-busy"))[1] is False
    finally:
        await store.close()


async def test_redis_unknown_schema_is_an_error(redis_server: Callable[..., RedisServer]) -> None:
    redis = redis_server()
    store = RedisStore.from_url(redis.url, 0.5)
    try:
        redis.cli("HSET", redis_key("k"), "v", "99", "state", "x", "token", "t", "fp", "f")
        with pytest.raises(StoreError, match="schema"):
            await store.claim("k", "owner", "fp", Lease(5, 60))
        redis.cli("SET", redis_key("s"), "9: a later layout")
        with pytest.raises(StoreError, match="schema"):
            await store.claim("s", "owner", "fp", Lease(5, 60))
        assert redis.cli("GET", redis_key("s")) == "9: a later layout"  # left untouched
    finally:
        await store.close()


async def test_redis_reports_an_evicting_policy(redis_server: Callable[..., RedisServer]) -> None:
    redis = redis_server("--maxmemory-policy", "allkeys-lru")
    store = RedisStore.from_url(redis.url, 0.5)
    try:
        assert await store.eviction_policy() == "allkeys-lru"
    finally:
        await store.close()


@pytest.mark.parametrize("scheme", ["redis", "redis+sentinel", "redis+cluster"])
async def test_an_unreachable_store_of_any_kind_is_a_store_error(scheme: str) -> None:
    """redis-py's cluster client raises RedisClusterException, which is not a RedisError: it
    must still be a StoreError (503 or fail_open), never a 500."""
    port = free_port()  # nothing listens there
    path = "/mymaster" if scheme == "redis+sentinel" else ""
    store = RedisStore.from_url(f"{scheme}://127.0.0.1:{port}{path}", 1.0)
    try:
        with pytest.raises(StoreError):
            await store.claim("k", "owner", "fp", Lease(5, 60))
    finally:
        await store.close()


async def test_a_redis_record_costs_its_bytes_and_at_most_300_more(
    redis_server: Callable[..., RedisServer],
) -> None:
    """Issue 18's bound, with a 1 KiB body (a hash record cost about 1.2 KB more)."""
    redis = redis_server()
    used, stored = await record_memory.measure(redis.port, 2000, b"x" * 1024)
    assert 0 < used - stored <= 300 * 2000
