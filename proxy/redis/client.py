"""A `redis.asyncio` client built from a store URL (see `proxy.config.store_url`), with budgets that
never fall back to redis-py's defaults (5 s socket timeouts and 10 retries: a stalled Redis
would cost ~60 s).

Every connection gets `socket_timeout` and `socket_connect_timeout` = the store budget and at most
one retry, only on `ConnectionError` (a pooled connection that died with a restarted Redis); a
timeout is never retried, so a stalled Redis costs one budget. Standalone and Sentinel clients
draw from a `BlockingConnectionPool` that waits at most one budget for a free connection.
"""

from __future__ import annotations

from typing import Any

from redis.asyncio import BlockingConnectionPool, Redis, RedisCluster
from redis.asyncio.cluster import ClusterNode
from redis.asyncio.connection import SSLConnection
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool, SentinelManagedConnection
from redis.backoff import ConstantBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

from proxy.config.store_url import StoreKind, parse_url

MAX_CONNECTIONS = 64
RETRY_BACKOFF = 0.01

Client = Redis | RedisCluster


class BlockingSentinelConnectionPool(SentinelConnectionPool, BlockingConnectionPool):
    """Sentinel master discovery with the blocking pool's bounded wait for a free connection."""


class SentinelMasterConnection(SentinelManagedConnection):
    """A connection to the primary Sentinel names at each (re)connect.

    redis-py (#3874, open in 8.1) asks Sentinel only when the pool hands a connection out; the
    reconnect before a retried command goes back to the address the connection had. After a
    failover that is the demoted primary, so the retry meant for `READONLY` fails again.
    """

    async def connect(self) -> None:
        await self.connect_check_health(check_health=self.connection_pool.check_connection)

    async def connect_check_health(
        self, check_health: bool = True, retry_socket_connect: bool = True
    ) -> None:
        if self.is_connected:
            return
        self.host, self.port = await self.connection_pool.get_master_address()
        # No reconnect-retry to the same address: the command's own retry asks Sentinel again.
        await super().connect_check_health(check_health, retry_socket_connect=False)


def connect(url: str, timeout: float, max_connections: int = MAX_CONNECTIONS) -> Client:
    """A client for `url` whose every command is bounded by `timeout` seconds (plus one
    immediate reconnect). Creating it does no I/O."""
    target = parse_url(url)
    options: dict[str, Any] = {
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        "retry": Retry(ConstantBackoff(RETRY_BACKOFF), 1, (RedisConnectionError,)),
        "health_check_interval": 0,
    }
    auth: dict[str, Any] = {"username": target.username, "password": target.password}
    if target.kind is StoreKind.CLUSTER:
        return RedisCluster(
            startup_nodes=[ClusterNode(host, port) for host, port in target.hosts],
            max_connections=max_connections,
            **options,
            **auth,
        )
    if target.kind is StoreKind.SENTINEL:
        assert target.service is not None
        sentinel = Sentinel(  # type: ignore[no-untyped-call]
            target.hosts, sentinel_kwargs=dict(options), **options
        )
        client: Redis = sentinel.master_for(
            target.service,
            connection_pool_class=BlockingSentinelConnectionPool,
            connection_class=SentinelMasterConnection,
            db=target.db,
            max_connections=max_connections,
            timeout=timeout,
            **auth,
        )
        return client
    host, port = target.hosts[0]
    tls: dict[str, Any] = (
        {"connection_class": SSLConnection, **target.tls} if target.kind is StoreKind.REDISS else {}
    )
    pool = BlockingConnectionPool(
        host=host,
        port=port,
        db=target.db,
        max_connections=max_connections,
        timeout=timeout,
        **tls,
        **options,
        **auth,
    )
    return Redis.from_pool(pool)


async def close(client: Client) -> None:
    """Close the client, its pool and, for Sentinel, the connections to the sentinels."""
    pool = getattr(client, "connection_pool", None)
    sentinel = getattr(pool, "sentinel_manager", None)
    await client.aclose()
    if isinstance(sentinel, Sentinel):
        for node in sentinel.sentinels:
            await node.aclose()
