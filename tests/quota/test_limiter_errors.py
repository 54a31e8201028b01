"""Only a store failure takes the quota's fail-open / fail-closed path: the Redis limiter turns
every way the store can fail into QuotaStoreError, and anything else a limiter raises (a bug) is
answered 500 with an `unhandled_error` event instead of silently switching quotas off."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from proxy.observability import events, logsink
from proxy.quota.limiter import Decision, MemoryLimiter, QuotaStoreError
from proxy.quota.redis_limiter import RedisLimiter
from proxy.quota.stage import storage_key
from tests.support.lines import Lines
from tests.support.proxy_process import base_config
from tests.support.upstream import RecordingUpstream

KEY = storage_key("default", "ip:127.0.0.1")
BUGS = [TypeError("bug"), KeyError("bug"), AttributeError("bug"), ValueError("bug"),
        ZeroDivisionError("bug"), AssertionError("bug")]


@pytest.fixture
def reported() -> Iterator[Lines]:
    lines = Lines()
    events.configure("info", lines)
    yield lines
    events.configure("info", logsink.STDOUT)


@pytest.mark.parametrize("on_error", ["fail_open", "fail_closed"])
@pytest.mark.parametrize("bug", BUGS, ids=lambda e: type(e).__name__)
async def test_a_limiter_bug_is_a_500_not_quotas_off(
    make_proxy: Any,
    upstream: RecordingUpstream,
    reported: Lines,
    monkeypatch: pytest.MonkeyPatch,
    on_error: str,
    bug: Exception,
) -> None:
    async def broken(self: MemoryLimiter, key: str, interval: float, burst: int) -> Decision:
        raise bug

    monkeypatch.setattr(MemoryLimiter, "acquire", broken)
    config = base_config(upstream.url)
    config["routes"][0]["quota"] = {"rate": "1/h", "burst": 5, "on_error": on_error}
    client = await make_proxy(config)
    store_errors = client.server.plane.runtime.metrics.store_errors  # one per process
    errors_before = store_errors.value
    response = await client.get("/pay")
    assert response.status == 500
    assert (await response.json())["type"].endswith(":internal-error")
    assert upstream.count == 0, "a request whose quota could not be checked is not forwarded"
    unhandled = [e for e in reported.json() if e["event"] == "unhandled_error"]
    assert [e["error"] for e in unhandled] == [repr(bug)]
    assert store_errors.value == errors_before, "a bug is not counted as a store failure"


def _dead_port(redis_server: Any) -> int:
    """A loopback port nothing listens on: one a redis-server had until it was killed."""
    server = redis_server()
    server.kill()
    port: int = server.port
    return port


@pytest.mark.redis
@pytest.mark.parametrize(
    "url",
    [
        "redis://127.0.0.1:{port}/0",  # the own RESP client
        "redis+sentinel://127.0.0.1:{port}/mymaster",  # redis-py: no sentinel answers
        "redis+cluster://127.0.0.1:{port}",  # redis-py: RedisClusterException, not a RedisError
    ],
)
async def test_an_unreachable_store_is_a_quota_store_error(redis_server: Any, url: str) -> None:
    limiter = RedisLimiter(url.format(port=_dead_port(redis_server)), timeout=0.5)
    try:
        with pytest.raises(QuotaStoreError):
            await limiter.acquire(KEY, 1.0, 5)
    finally:
        await limiter.close()


@pytest.mark.redis
async def test_a_stalled_or_stopped_store_is_a_quota_store_error(redis_server: Any) -> None:
    server = redis_server()
    limiter = RedisLimiter(server.url, timeout=0.2)
    try:
        assert (await limiter.acquire(KEY, 1.0, 5)).allowed
        server.stall()  # SIGSTOP: connected, nothing answers; the check's budget runs out
        try:
            with pytest.raises(QuotaStoreError) as stalled:
                await limiter.acquire(KEY, 1.0, 5)
            assert isinstance(stalled.value.__cause__, TimeoutError)
        finally:
            server.resume()
        server.kill()  # the open connection breaks, and reconnecting is refused
        with pytest.raises(QuotaStoreError):
            await limiter.acquire(KEY, 1.0, 5)
    finally:
        await limiter.close()


@pytest.mark.redis
async def test_an_error_reply_is_a_quota_store_error(redis_server: Any) -> None:
    server = redis_server()
    server.cli("HSET", KEY, "field", "value")  # the script's GET now answers -WRONGTYPE
    limiter = RedisLimiter(server.url, timeout=0.5)
    try:
        with pytest.raises(QuotaStoreError, match="WRONGTYPE"):
            await limiter.acquire(KEY, 1.0, 5)
    finally:
        await limiter.close()
