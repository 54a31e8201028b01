"""A `redis.asyncio` client built from a store URL, with budgets that never fall back to
redis-py's defaults (5 s socket timeouts and 10 retries: a stalled Redis would cost ~60 s).

    redis://[user:pw@]host:port/db          rediss://... (TLS)
    redis+sentinel://[user:pw@]host:26379,host2:26379/service/db
    redis+cluster://[user:pw@]host:7000,host2:7001

Every connection gets `socket_timeout` and `socket_connect_timeout` = the store budget and at most
one retry, only on `ConnectionError` (a pooled connection that died with a restarted Redis); a
timeout is never retried, so a stalled Redis costs one budget. Standalone and Sentinel clients
draw from a `BlockingConnectionPool` that waits at most one budget for a free connection.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

from redis.asyncio import BlockingConnectionPool, Redis, RedisCluster
from redis.asyncio.cluster import ClusterNode
from redis.asyncio.connection import SSLConnection
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import ConstantBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

MAX_CONNECTIONS = 64
RETRY_BACKOFF = 0.01

Client = Redis | RedisCluster


class BlockingSentinelConnectionPool(SentinelConnectionPool, BlockingConnectionPool):
    """Sentinel master discovery with the blocking pool's bounded wait for a free connection."""


@dataclass(frozen=True, slots=True)
class StoreUrl:
    scheme: str
    hosts: list[tuple[str, int]]
    username: str | None
    password: str | None
    db: int
    service: str | None  # Sentinel service (master group) name


def parse_url(url: str) -> StoreUrl:
    """Split a store URL; several comma-separated hosts are allowed for Sentinel and Cluster."""
    parts = urlsplit(url)
    scheme = parts.scheme
    userinfo, _, hostlist = parts.netloc.rpartition("@")
    username, _, password = userinfo.partition(":")
    default_port = 26379 if scheme == "redis+sentinel" else 6379
    hosts = [_host_port(item, default_port) for item in hostlist.split(",") if item]
    if not hosts:
        raise ValueError(f"store URL {_redact(url)!r} names no host")
    if len(hosts) > 1 and scheme in ("redis", "rediss"):
        raise ValueError(f"store URL {_redact(url)!r}: use redis+sentinel or redis+cluster for "
                         "several hosts")
    segments = [s for s in parts.path.split("/") if s]
    service = None
    if scheme == "redis+sentinel":
        if not segments:
            raise ValueError(f"store URL {_redact(url)!r} needs the Sentinel service name: "
                             "redis+sentinel://host:26379/mymaster/0")
        service = unquote(segments.pop(0))
    if len(segments) > 1 or (segments and not segments[0].isdigit()):
        raise ValueError(f"store URL {_redact(url)!r}: the database must be a number")
    db = int(segments[0]) if segments else 0
    if db and scheme == "redis+cluster":
        raise ValueError("Redis Cluster has only database 0")
    return StoreUrl(
        scheme, hosts, unquote(username) or None, unquote(password) or None, db, service
    )


def _host_port(item: str, default_port: int) -> tuple[str, int]:
    if item.startswith("["):  # [::1]:6379
        host, _, rest = item[1:].partition("]")
        port = rest.removeprefix(":")
    else:
        host, _, port = item.partition(":")
    if not host or (port and not port.isdigit()):
        raise ValueError(f"bad host in store URL: {item!r}")
    return host, int(port) if port else default_port


def _redact(url: str) -> str:
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return parts._replace(netloc="***@" + parts.netloc.rpartition("@")[2]).geturl()


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
    if target.scheme == "redis+cluster":
        return RedisCluster(
            startup_nodes=[ClusterNode(host, port) for host, port in target.hosts],
            max_connections=max_connections,
            **options,
            **auth,
        )
    if target.scheme == "redis+sentinel":
        assert target.service is not None
        sentinel = Sentinel(  # type: ignore[no-untyped-call]
            target.hosts, sentinel_kwargs=dict(options), **options
        )
        client: Redis = sentinel.master_for(
            target.service,
            connection_pool_class=BlockingSentinelConnectionPool,
            db=target.db,
            max_connections=max_connections,
            timeout=timeout,
            **auth,
        )
        return client
    host, port = target.hosts[0]
    tls: dict[str, Any] = {"connection_class": SSLConnection} if target.scheme == "rediss" else {}
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
