import time
from collections.abc import Callable

import pytest
from redis.asyncio import BlockingConnectionPool, RedisCluster
from redis.exceptions import TimeoutError as RedisTimeoutError

from proxy.redis_client import BlockingSentinelConnectionPool, close, connect, parse_url
from tests.support.redis_server import RedisServer


def test_parse_standalone() -> None:
    url = parse_url("redis://:pw@cache:6380/2")
    assert (url.scheme, url.hosts, url.password, url.db) == ("redis", [("cache", 6380)], "pw", 2)
    assert parse_url("rediss://user:p%40ss@h").username == "user"
    assert parse_url("rediss://user:p%40ss@h").password == "p@ss"
    assert parse_url("redis://h").hosts == [("h", 6379)]
    assert parse_url("redis://[::1]:7000").hosts == [("::1", 7000)]


def test_parse_sentinel_and_cluster() -> None:
    url = parse_url("redis+sentinel://s1:26379,s2,s3:26380/mymaster/3")
    assert url.hosts == [("s1", 26379), ("s2", 26379), ("s3", 26380)]
    assert (url.service, url.db) == ("mymaster", 3)
    cluster = parse_url("redis+cluster://a:7000,b:7001")
    assert (cluster.hosts, cluster.db, cluster.service) == ([("a", 7000), ("b", 7001)], 0, None)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("redis://", "no host"),
        ("redis://a:1,b:2", "several hosts"),
        ("redis+sentinel://s:26379", "service name"),
        ("redis://h/x", "number"),
        ("redis+cluster://a:7000/1", "database 0"),
        ("redis://h:port", "bad host"),
    ],
)
def test_bad_urls(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_url(url)


async def test_clients_carry_the_budget_and_a_blocking_pool() -> None:
    standalone = connect("redis://127.0.0.1:1/0", 0.2)
    pool = standalone.connection_pool
    assert isinstance(pool, BlockingConnectionPool)
    assert pool.timeout == 0.2
    kwargs = pool.connection_kwargs
    assert (kwargs["socket_timeout"], kwargs["socket_connect_timeout"]) == (0.2, 0.2)
    assert kwargs["retry"].get_retries() == 1
    await close(standalone)
    sentinel = connect("redis+sentinel://127.0.0.1:1/mymaster/0", 0.2)
    assert isinstance(sentinel.connection_pool, BlockingSentinelConnectionPool)
    assert sentinel.connection_pool.timeout == 0.2
    await close(sentinel)
    cluster = connect("redis+cluster://127.0.0.1:1", 0.2)
    assert isinstance(cluster, RedisCluster)
    await close(cluster)


async def test_a_stalled_redis_costs_one_budget_not_redis_py_defaults(
    redis_server: Callable[..., RedisServer],
) -> None:
    redis = redis_server()
    client = connect(redis.url, 0.2)
    try:
        await client.ping()
        redis.stall()
        started = time.perf_counter()
        with pytest.raises(RedisTimeoutError):
            await client.get("x")
        assert time.perf_counter() - started < 2  # redis-py 8 defaults: about 60 s
    finally:
        redis.resume()
        await close(client)
