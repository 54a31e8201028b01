"""Redis hazards of the bad-inputs catalogue (A4 #47, #48, #51) against real redis-servers:
a command cancelled after it was sent, an exhausted connection pool, and a primary demoted by a
Sentinel failover while it stays up."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest
from redis.asyncio.connection import AbstractConnection

from proxy.redis import client as redis_client
from proxy.redis.scripts import RedisPyRunner
from proxy.stores import StoreError, StoreTimeout
from proxy.stores.base import Lease
from proxy.stores.redis import RedisStore
from tests.support.eventually import eventually
from tests.support.ports import wait_until
from tests.support.redis_server import RedisServer
from tests.support.redis_topologies import Sentinels
from tests.support.tcp_delay import DelayingRelay

KEYS = [f"hazard-{i}" for i in range(24)]


def token(key: str) -> str:
    return f"token-of-{key}"


@pytest.fixture
async def relay(redis_server: Callable[..., RedisServer]) -> AsyncIterator[DelayingRelay]:
    """A relay in front of a fresh redis-server, holding `KEYS` claimed by their own tokens."""
    redis = redis_server()
    relayed = await DelayingRelay(redis.port).start()
    seeding = RedisStore.from_url(redis.url, 1.0)
    try:
        for key in KEYS:
            assert await seeding.claim(key, token(key), f"fp-{key}", Lease(60, 60)) is None
    finally:
        await seeding.close()
    yield relayed
    await relayed.stop()


async def assert_every_reply_is_its_own(store: RedisStore) -> None:
    """Read all records at once over several connections: each reply matches its command."""
    records = await asyncio.gather(*(store.get(key) for key in KEYS))
    for key, record in zip(KEYS, records, strict=True):
        assert record is not None, key
        assert (record.token, record.fingerprint) == (token(key), f"fp-{key}")


def store_over(client: str, url: str, budget: float) -> RedisStore:
    """A store on `url` through the RESP client (`redis://`) or redis-py (TLS, Sentinel, Cluster)."""
    if client == "redis-py":
        return RedisStore(RedisPyRunner(redis_client.connect(url, budget)), budget)
    return RedisStore.from_url(url, budget)


@pytest.mark.parametrize("client", ["resp", "redis-py"])
async def test_commands_cut_off_before_their_reply_never_hand_it_to_the_next(
    relay: DelayingRelay, client: str
) -> None:
    # The budget leaves room for redis-py to open and handshake fresh connections through the
    # relay on a loaded machine (the last phase); the delay is well past it.
    store = store_over(client, relay.url, 0.75)
    try:
        await assert_every_reply_is_its_own(store)
        # Replies now arrive after the budget: each command is sent, then abandoned mid-read.
        relay.reply_delay = 2.0
        timed_out = await asyncio.gather(
            *(store.get(key) for key in KEYS[:8]), return_exceptions=True
        )
        assert all(isinstance(outcome, StoreTimeout) for outcome in timed_out), timed_out
        # And a caller cancelled (client gone) after its command went out.
        sent = relay.commands

        async def command_sent() -> bool:
            return relay.commands > sent

        cancelled = asyncio.create_task(store.get(KEYS[8]))
        await eventually(command_sent, 2, "the command reached the relay")
        cancelled.cancel()
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        # The late replies are still on their way when the next commands run.
        relay.reply_delay = 0.0
        for _ in range(3):
            await assert_every_reply_is_its_own(store)
    finally:
        await store.close()


async def test_an_exhausted_pool_waits_for_a_connection_within_the_budget(
    relay: DelayingRelay,
) -> None:
    budget = 1.0
    # redis-py's pool (TLS, Sentinel, Cluster); the RESP client multiplexes instead of pooling.
    store = RedisStore(
        RedisPyRunner(redis_client.connect(relay.url, budget, max_connections=2)), budget
    )
    loop = asyncio.get_running_loop()
    try:
        # 24 commands of 20 ms on two connections: they queue for a connection and all succeed
        # (about 0.3 s with the two handshakes, well inside the 1 s budget on a busy machine).
        relay.reply_delay = 0.02
        await assert_every_reply_is_its_own(store)
        assert relay.connections == 2
        # Two stalled commands hold both connections past the budget: everyone waiting for a
        # connection fails within the same budget (fail closed) instead of waiting on.
        relay.reply_delay = 5.0
        started = loop.time()
        outcomes = await asyncio.gather(
            *(store.get(key) for key in KEYS[:6]), return_exceptions=True
        )
        elapsed = loop.time() - started
        assert all(isinstance(outcome, StoreError) for outcome in outcomes), outcomes
        assert elapsed < budget + 1.0
        # The pool recovers: the abandoned connections were replaced, not leaked.
        relay.reply_delay = 0.0
        await assert_every_reply_is_its_own(store)
    finally:
        await store.close()


async def test_readonly_from_a_demoted_primary_is_retried_on_the_new_one(
    redis_sentinels: Sentinels,
) -> None:
    old = redis_sentinels.primary
    store = RedisStore.from_url(redis_sentinels.url, 1.0)
    try:
        assert await store.claim("before-failover", "t0", "fp", Lease(60, 60)) is None  # scripts cached
        # Replication is asynchronous: a failover before the replica has the record loses it
        # (a documented limit, docs/guarantees.md). This test is about READONLY, so it waits.
        wait_until(lambda: int(redis_sentinels.replica.cli("DBSIZE")) == 1, 10, "replicated")
        redis_sentinels.failover()
        wait_until(lambda: "role:slave" in old.cli("INFO", "replication"), 15, "demoted")
        # A pooled connection still open to the demoted primary, as after a failover in which
        # the old primary never went down (Sentinel's CLIENT KILL came before it was opened),
        # and a primary that restarted on the way, so neither server has the scripts loaded.
        old.cli("SCRIPT", "FLUSH")
        assert isinstance(store.runner, RedisPyRunner)
        pool = store.runner.client.connection_pool
        connection = await pool.get_connection()
        await connection.disconnect()
        connection.host, connection.port = "127.0.0.1", old.port
        await AbstractConnection.connect_check_health(connection)  # no Sentinel lookup
        await pool.release(connection)
        assert await store.claim("after-failover", "t1", "fp", Lease(60, 60)) is None
        assert "errorstat_READONLY" in old.cli("INFO", "errorstats")
        record = await store.get("after-failover")
        assert record is not None and record.token == "t1"
        assert int(redis_sentinels.replica.cli("DBSIZE")) == 2  # the new primary has both
    finally:
        await store.close()
