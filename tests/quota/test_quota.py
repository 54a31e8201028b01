"""Per-tenant quotas: GCRA exact under concurrency (memory, and Redis shared by replicas),
429 with Retry-After and the IETF RateLimit fields, store failures per `quota.on_error`."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from proxy.config import parse
from proxy.pipeline.runtime import Runtime
from proxy.quota.limiter import MemoryLimiter, decide
from proxy.quota.redis_limiter import RedisLimiter
from proxy.quota.stage import policy_header, state_header, storage_key
from tests.support.proxy_process import base_config
from tests.support.upstream import RecordingUpstream


def quota_config(url: str, **quota: Any) -> dict[str, Any]:
    config = base_config(url)
    config["routes"][0]["quota"] = {"rate": "1/h", "burst": 5, **quota}
    return config


async def burst(client: Any, count: int, headers: dict[str, str] | None = None) -> list[Any]:
    return list(await asyncio.gather(*(client.get(f"/{i}", headers=headers) for i in range(count))))


def test_decision_arithmetic() -> None:
    # burst 5 at 10/s: after the first request 4 remain and the bucket is full again in 0.1 s.
    assert decide(True, 0.1, 0.1, 5) == decide(True, 0.1, 0.1, 5)
    first = decide(True, 0.1, 0.1, 5)
    assert (first.remaining, first.retry_after, first.reset) == (4, 0.0, 0.1)
    denied = decide(False, 0.5, 0.1, 5)
    assert denied.remaining == 0
    assert denied.retry_after == pytest.approx(0.1)


def test_header_values() -> None:
    assert policy_header("default", 100.0, 50) == '"default";q=100;w=1'
    assert policy_header("slow", 1 / 60, 5) == '"slow";q=5;w=300'
    assert policy_header('we"ird\\', 1.0, 1) == '"we\\"ird\\\\";q=1;w=1'
    assert state_header("r", decide(False, 3.2, 1.0, 3)) == '"r";r=0;t=2'
    assert storage_key("r", "ip:1.2.3.4").startswith("quota:v1:{")
    assert "1.2.3.4" not in storage_key("r", "ip:1.2.3.4")


async def test_memory_quota_is_exact_under_concurrency(
    make_proxy: Any, upstream: RecordingUpstream
) -> None:
    client = await make_proxy(quota_config(upstream.url))
    responses = await burst(client, 30)
    allowed = [r for r in responses if r.status == 200]
    limited = [r for r in responses if r.status == 429]
    assert (len(allowed), len(limited)) == (5, 25)
    assert upstream.count == 5
    assert allowed[0].headers["RateLimit-Policy"] == '"default";q=5;w=18000'
    assert sorted(r.headers["RateLimit"] for r in allowed)[0].startswith('"default";r=0;')
    problem = await limited[0].json()
    assert problem["type"].endswith(":quota-exceeded")
    assert limited[0].headers["Content-Type"] == "application/problem+json"
    assert 3590 <= int(limited[0].headers["Retry-After"]) <= 3600  # one request per hour
    assert limited[0].headers["RateLimit"] == f'"default";r=0;t={limited[0].headers["Retry-After"]}'


async def test_tenants_by_header_are_separate(make_proxy: Any, upstream: RecordingUpstream) -> None:
    client = await make_proxy(quota_config(upstream.url, key="header:X-Tenant", burst=2))
    a = await burst(client, 4, {"X-Tenant": "a"})
    b = await burst(client, 4, {"X-Tenant": "b"})
    anonymous = await burst(client, 4)  # no header: counted by client address
    for group in (a, b, anonymous):
        assert sorted(r.status for r in group) == [200, 200, 429, 429]


async def test_rate_refills(make_proxy: Any, upstream: RecordingUpstream) -> None:
    client = await make_proxy(quota_config(upstream.url, rate="20/s", burst=1))
    assert [r.status for r in await burst(client, 2)] == [200, 429]
    limited = await client.get("/again")
    await asyncio.sleep(0.06)  # one emission interval (50 ms) is the behaviour under test
    assert limited.status == 429
    assert (await client.get("/later")).status == 200


async def test_memory_limiter_sweeps_idle_keys() -> None:
    limiter = MemoryLimiter(max_keys=10)
    for i in range(50):
        assert (await limiter.acquire(f"k{i}", 1e-6, 1)).allowed
    assert len(limiter._tat) <= 10


@pytest.mark.redis
async def test_redis_quota_is_exact_across_replicas(redis_server: Any) -> None:
    server = redis_server()
    replicas = [RedisLimiter(server.url, 1.0) for _ in range(2)]
    key = storage_key("default", "ip:10.0.0.1")
    try:
        decisions = await asyncio.gather(
            *(replicas[i % 2].acquire(key, 3600.0, 5) for i in range(40))
        )
        assert sum(d.allowed for d in decisions) == 5
        denied = [d for d in decisions if not d.allowed]
        assert all(3590 <= d.retry_after <= 3600 for d in denied)
        ttl = int(server.cli("PTTL", key))
        assert 0 < ttl <= 5 * 3600 * 1000 + 1000, "the key expires once its state is idle"
    finally:
        for limiter in replicas:
            await limiter.close()


@pytest.mark.redis
async def test_two_proxies_share_one_redis_quota(
    make_proxy: Any, upstream: RecordingUpstream, redis_server: Any
) -> None:
    server = redis_server()
    # fail_closed and a generous timeout: on a loaded machine a slow first script load must
    # not pass as "the quota let it through" (the default on_error is fail_open).
    config = quota_config(upstream.url, key="header:X-Tenant", burst=4, on_error="fail_closed")
    config["store"] = {"url": server.url, "timeout": "5s"}
    proxies = [await make_proxy(config), await make_proxy(config)]
    responses = await asyncio.gather(
        *(proxies[i % 2].get("/x", headers={"X-Tenant": "acme"}) for i in range(20))
    )
    assert sorted(r.status for r in responses) == [200] * 4 + [429] * 16
    assert upstream.count == 4


@pytest.mark.redis
@pytest.mark.parametrize(("on_error", "expected"), [("fail_open", 200), ("fail_closed", 503)])
async def test_quota_store_failure_follows_on_error(
    make_proxy: Any, upstream: RecordingUpstream, redis_server: Any, on_error: str, expected: int
) -> None:
    server = redis_server()
    config = quota_config(upstream.url, on_error=on_error)
    config["store"] = {"url": server.url, "timeout": "200ms"}
    client = await make_proxy(config)
    assert (await client.get("/before")).status == 200
    store_errors = client.server.plane.runtime.metrics.store_errors  # one per process
    errors_before = store_errors.value
    server.stall()  # SIGSTOP: the socket stays open and nothing answers
    try:
        started = time.monotonic()
        response = await client.get("/stalled")
        assert response.status == expected
        assert time.monotonic() - started < 2.0, "bounded by store.timeout, not redis-py defaults"
    finally:
        server.resume()
    server.kill()
    response = await client.get("/down")
    assert response.status == expected
    # Let through unlimited or refused, both requests met a store failure.
    assert store_errors.value - errors_before == 2
    if expected == 503:
        problem = await response.json()
        assert problem["type"].endswith(":quota-store-unavailable")
        assert response.headers["Retry-After"] == "1"


async def test_reload_keeps_memory_quota_counters(upstream: RecordingUpstream) -> None:
    config = parse(quota_config(upstream.url, burst=2), env={})
    old = Runtime(config)
    limiter = old.limiter
    assert limiter is not None
    key = storage_key("default", "ip:10.0.0.1")
    for _ in range(2):
        assert (await limiter.acquire(key, 3600, 2)).allowed
    new = Runtime(config, previous=old)
    await old.close()
    assert new.limiter is limiter
    assert not (await limiter.acquire(key, 3600, 2)).allowed, "spent quota survives a reload"
    await new.close()
