"""The Store contract, against the memory store and a real redis-server."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest

from proxy.config import Store as StoreConfig
from proxy.stores import MemoryStore, RedisStore, Store, StoreError, open_store
from proxy.stores.base import COMPLETED, IN_FLIGHT, INDETERMINATE, StoredResponse
from proxy.stores.redis import redis_key
from tests.support.redis_server import RedisServer

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
    assert await store.claim("k", "owner", "fp", 5) is None
    assert await store.claim("k", "owner", "fp", 5) is None  # a retried claim is ours
    other = await store.claim("k", "other", "fp2", 5)
    assert other is not None
    assert (other.state, other.token, other.fingerprint) == (IN_FLIGHT, "owner", "fp")
    assert 4 < other.remaining <= 5


async def test_complete_replaces_the_lease_with_the_retention(store: Store) -> None:
    await store.claim("k", "owner", "fp", 5)
    assert not await store.complete("k", "intruder", RESPONSE, 60)
    assert await store.complete("k", "owner", RESPONSE, 60)
    assert await store.complete("k", "owner", RESPONSE, 60)  # repeated by a retry: still fine
    record = await store.claim("k", "other", "fp", 5)
    assert record is not None
    assert (record.state, record.response) == (COMPLETED, RESPONSE)
    assert 59 < record.remaining <= 60


async def test_release_only_by_the_owner(store: Store) -> None:
    await store.claim("k", "owner", "fp", 5)
    assert not await store.release("k", "intruder")
    assert await store.get("k") is not None
    assert await store.release("k", "owner")
    assert await store.get("k") is None
    assert await store.claim("k", "next", "fp", 5) is None


async def test_indeterminate_lasts_until_the_lease_ends(store: Store) -> None:
    await store.claim("k", "owner", "fp", 0.3)
    assert await store.mark_indeterminate("k", "owner")
    record = await store.get("k")
    assert record is not None
    assert record.state == INDETERMINATE
    assert record.remaining <= 0.3
    assert not await store.release("k", "owner")  # not released: it may have run
    await expire(store, "k")
    assert await store.claim("k", "next", "fp", 5) is None


async def test_stale_owner_cannot_overwrite_a_takeover(store: Store) -> None:
    await store.claim("k", "stale", "fp", 0.2)
    await expire(store, "k")
    assert await store.claim("k", "fresh", "fp", 5) is None
    assert not await store.complete("k", "stale", RESPONSE, 60)
    assert not await store.mark_indeterminate("k", "stale")
    assert not await store.release("k", "stale")
    record = await store.get("k")
    assert record is not None
    assert (record.state, record.token) == (IN_FLIGHT, "fresh")


async def test_completed_record_expires_after_its_ttl(store: Store) -> None:
    await store.claim("k", "owner", "fp", 5)
    await store.complete("k", "owner", RESPONSE, 0.2)
    await expire(store, "k")


async def test_not_replayable_record_keeps_its_status(store: Store) -> None:
    await store.claim("k", "owner", "fp", 5)
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
        await store.claim("a", "t", "fp", 0.1)
        await store.claim("b", "t", "fp", 60)
        with pytest.raises(StoreError, match="full"):
            await store.claim("c", "t", "fp", 60)
        # The sweeper, not an access, removes the expired record.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 5
        while len(store) > 1:
            assert loop.time() < deadline, "the sweeper never ran"
            await asyncio.sleep(0.02)
        assert await store.claim("c", "t", "fp", 60) is None
    finally:
        await store.close()


async def test_redis_record_layout(redis_server: Callable[..., RedisServer]) -> None:
    redis = redis_server()
    store = RedisStore.from_url(redis.url, 0.5)
    try:
        await store.claim("abc", "owner", "fp", 5)
        key = redis_key("abc")
        assert key == "idem:v1:{abc}"
        assert redis.cli("HGET", key, "v") == "1"
        assert 0 < int(redis.cli("PTTL", key)) <= 5000
        assert await store.eviction_policy() == "noeviction"
    finally:
        await store.close()


async def test_redis_unknown_schema_is_an_error(redis_server: Callable[..., RedisServer]) -> None:
    redis = redis_server()
    store = RedisStore.from_url(redis.url, 0.5)
    try:
        redis.cli("HSET", redis_key("k"), "v", "99", "state", "x", "token", "t", "fp", "f")
        with pytest.raises(StoreError, match="schema"):
            await store.claim("k", "owner", "fp", 5)
    finally:
        await store.close()


async def test_redis_reports_an_evicting_policy(redis_server: Callable[..., RedisServer]) -> None:
    redis = redis_server("--maxmemory-policy", "allkeys-lru")
    store = RedisStore.from_url(redis.url, 0.5)
    try:
        assert await store.eviction_policy() == "allkeys-lru"
    finally:
        await store.close()
