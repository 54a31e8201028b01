"""Redis faults and proxy crashes against a real `idemproxy run` process and redis-server."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
import uuid
from collections import Counter
from collections.abc import Callable
from typing import Any

import aiohttp
from aiohttp import web

from proxy.redis import client as redis_client
from tests.support.eventually import eventually
from tests.support.idempotency import assert_problem, idem_config
from tests.support.proxy_process import ProxyProcess
from tests.support.redis_server import RedisServer
from tests.support.upstream import RecordingUpstream

StartProxy = Callable[..., ProxyProcess]
StartRedis = Callable[..., RedisServer]
BUDGET = 0.25
# A generous bound for "answered within the store budget" on a shared 2-core machine.
WITHIN_BUDGET = 2.0
STALLED = redis_client.MAX_CONNECTIONS + 16


def start(proxy_process: StartProxy, upstream: RecordingUpstream, redis: RedisServer,
          **store: Any) -> ProxyProcess:
    config = idem_config(upstream.url, redis.url, store={"timeout": f"{BUDGET}s", **store},
                         upstream={"timeout": "1s"})
    return proxy_process(config)


async def post(session: aiohttp.ClientSession, url: str, key: str | None,
               payload: Any = None) -> tuple[aiohttp.ClientResponse, float]:
    headers = {"Idempotency-Key": key} if key else {}
    started = time.perf_counter()
    async with session.post(url + "/v1/pay", json=payload or {}, headers=headers) as response:
        await response.read()
    return response, time.perf_counter() - started


def hold_first_request(upstream: RecordingUpstream) -> asyncio.Event:
    """The upstream's first request waits for the returned event; later ones answer at once."""
    gate = asyncio.Event()

    async def first_waits(request: web.Request) -> web.StreamResponse:
        if upstream.count == 1:
            await gate.wait()
        return web.json_response({"n": upstream.count})

    upstream.respond = first_waits
    return gate


async def test_fail_closed_killed_redis_is_503_within_budget_and_recovers(
    proxy_process: StartProxy, redis_server: StartRedis, upstream: RecordingUpstream
) -> None:
    redis = redis_server()
    proxy = start(proxy_process, upstream, redis)
    async with aiohttp.ClientSession() as session:
        assert (await post(session, proxy.url, "before"))[0].status == 200
        await asyncio.to_thread(redis.kill)
        response, elapsed = await post(session, proxy.url, "during")
        await assert_problem(response, 503, "store-unavailable")
        assert response.headers["Retry-After"] == "1"
        assert elapsed < WITHIN_BUDGET
        # Requests without a key do not depend on the store.
        assert (await post(session, proxy.url, None))[0].status == 200
        await asyncio.to_thread(redis.start)
        response, _ = await post(session, proxy.url, "during")
        assert response.status == 200  # recovered without a proxy restart
    keys = Counter(r.header("Idempotency-Key") for r in upstream.received)
    assert keys == {"before": 1, None: 1, "during": 1}


async def test_fail_closed_stalled_redis_is_503_within_budget_then_the_key_runs_once(
    proxy_process: StartProxy, redis_server: StartRedis, upstream: RecordingUpstream
) -> None:
    redis = redis_server()
    proxy = start(proxy_process, upstream, redis)
    async with aiohttp.ClientSession() as session:
        assert (await post(session, proxy.url, "warm"))[0].status == 200
        redis.stall()
        try:
            # More requests than the pool has connections: the rest wait within the budget.
            results = await asyncio.gather(
                *(post(session, proxy.url, f"stalled-{i}") for i in range(STALLED))
            )
        finally:
            redis.resume()
        for response, elapsed in results:
            assert response.status == 503
            assert elapsed < WITHIN_BUDGET
        # The stalled claims reach Redis after the resume; the proxy takes them back, so a
        # retry with the same key gets 409 for a moment and then runs, exactly once.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        for i in range(STALLED):
            while (response := (await post(session, proxy.url, f"stalled-{i}"))[0]).status != 200:
                assert response.status in (409, 503), response.status
                assert loop.time() < deadline, "the key never became usable again"
                await asyncio.sleep(0.1)  # client retry pacing
    keys = Counter(r.header("Idempotency-Key") for r in upstream.received)
    assert all(keys[f"stalled-{i}"] == 1 for i in range(STALLED)), keys


async def test_fail_open_keeps_serving_without_redis(
    proxy_process: StartProxy, redis_server: StartRedis, upstream: RecordingUpstream
) -> None:
    redis = redis_server()
    proxy = start(proxy_process, upstream, redis, on_error="fail_open")
    await asyncio.to_thread(redis.kill)
    async with aiohttp.ClientSession() as session:
        for _ in range(2):
            response, elapsed = await post(session, proxy.url, "k")
            assert response.status == 200
            assert elapsed < WITHIN_BUDGET
    assert upstream.count == 2  # unprotected, as configured


async def test_kill_stall_and_restart_under_load_never_run_a_key_twice(
    proxy_process: StartProxy, redis_server: StartRedis, upstream: RecordingUpstream
) -> None:
    async def slowish(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(0.01)
        return web.json_response({"ok": True})

    upstream.respond = slowish
    redis = redis_server()
    proxy = start(proxy_process, upstream, redis)
    refusals: list[float] = []

    async def operation(session: aiohttp.ClientSession, key: str) -> int:
        """One client operation: retry with the same key until it is answered."""
        while True:
            response, elapsed = await post(session, proxy.url, key, {"op": key})
            if response.status not in (409, 503):
                return response.status
            if response.status == 503:
                refusals.append(elapsed)
            await asyncio.sleep(0.05)  # client retry pacing

    async def wait_for(condition: Callable[[], bool], what: str) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while not condition():
            assert loop.time() < deadline, what
            await asyncio.sleep(0.01)

    async with aiohttp.ClientSession() as session:
        stop = asyncio.Event()
        answered: list[tuple[str, int]] = []

        async def worker() -> None:
            while not stop.is_set():
                key = str(uuid.uuid4())
                answered.append((key, await operation(session, key)))

        workers = [asyncio.create_task(worker()) for _ in range(8)]
        await wait_for(lambda: len(answered) >= 10, "traffic before the kill")
        await asyncio.to_thread(redis.kill)
        await wait_for(lambda: len(refusals) >= 5, "refusals while Redis is down")
        await asyncio.to_thread(redis.start)
        progress = len(answered)
        await wait_for(lambda: len(answered) >= progress + 10, "traffic after the restart")
        refused = len(refusals)
        redis.stall()
        try:
            await wait_for(lambda: len(refusals) >= refused + 5, "refusals while Redis stalls")
        finally:
            redis.resume()
        progress = len(answered)
        await wait_for(lambda: len(answered) >= progress + 10, "traffic after the stall")
        stop.set()
        await asyncio.wait_for(asyncio.gather(*workers), 30)
    assert {status for _, status in answered} == {200}
    executions = Counter(r.header("Idempotency-Key") for r in upstream.received)
    assert set(executions) == {key for key, _ in answered}
    assert max(executions.values()) == 1, executions
    assert max(refusals) < WITHIN_BUDGET


async def test_crashed_owners_key_is_held_indeterminate_after_its_lease(
    proxy_process: StartProxy, redis_server: StartRedis, upstream: RecordingUpstream
) -> None:
    """Issue 13: a holder that died mid-request may have run it; after its lease the key is
    indeterminate (never run again), and the replica that finds it says so in an event."""
    gate = hold_first_request(upstream)
    redis = redis_server()
    crashed, survivor = (start(proxy_process, upstream, redis) for _ in range(2))
    async with aiohttp.ClientSession() as session:
        first = asyncio.create_task(post(session, crashed.url, "k"))
        await asyncio.wait_for(upstream.arrived.wait(), 10)
        assert crashed.process is not None
        crashed_pid = crashed.process.pid
        crashed.kill()
        with contextlib.suppress(aiohttp.ClientError):
            await first
        response, _ = await post(session, survivor.url, "k")
        await assert_problem(response, 409, "in-progress")
        assert 1 <= int(response.headers["Retry-After"]) <= 3
        # Lease = 1 s upstream timeout + 1 s margin + 2 budgets; then it is held.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 8
        while (response := (await post(session, survivor.url, "k"))[0]).status == 409:
            body = await response.json(content_type="application/problem+json")
            if body["type"].endswith("outcome-indeterminate"):
                break
            assert loop.time() < deadline, "the crashed owner's lease never ended"
            await asyncio.sleep(0.1)  # client retry pacing
        await assert_problem(response, 409, "outcome-indeterminate")
        assert "Retry-After" not in response.headers
        gate.set()
    assert upstream.count == 1

    async def lease_expired_events() -> list[dict[str, Any]]:
        return [e for e in survivor.json_lines() if e.get("event") == "idempotency_lease_expired"]

    expired = await eventually(lease_expired_events, 5, "the lease-expired event")
    assert len(expired) == 1
    assert expired[0]["holder"].endswith(f"/{crashed_pid}")


async def test_startup_warns_when_redis_may_evict(
    proxy_process: StartProxy, redis_server: StartRedis, upstream: RecordingUpstream
) -> None:
    redis = redis_server("--maxmemory-policy", "allkeys-lru")
    proxy = start(proxy_process, upstream, redis)
    events = [line for line in proxy.json_lines() if line.get("event") == "store_eviction_policy"]
    assert events
    assert events[0]["level"] == "warning"
    assert events[0]["maxmemory_policy"] == "allkeys-lru"


async def test_startup_warns_that_the_memory_store_forgets_on_restart(
    proxy_process: StartProxy, upstream: RecordingUpstream
) -> None:
    """Issue 13: a memory-store restart forgets every key; each start says so in an event."""
    proxy = proxy_process(idem_config(upstream.url, "memory://"))

    async def warned() -> list[dict[str, Any]]:
        return [e for e in proxy.json_lines() if e.get("event") == "store_memory"]

    (event,) = await eventually(warned, 5, "the store_memory event")
    assert event["level"] == "warning"
    assert "restart" in event["detail"]


async def closed(port: int) -> None:
    """Wait until the port refuses new connections."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while True:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            return
        writer.close()
        assert loop.time() < deadline, f"port {port} still accepts connections"
        await asyncio.sleep(0.02)


async def test_sigterm_finishes_the_request_and_its_record(
    proxy_process: StartProxy, redis_server: StartRedis, upstream: RecordingUpstream
) -> None:
    gate = hold_first_request(upstream)
    redis = redis_server()
    stopping, other = (start(proxy_process, upstream, redis) for _ in range(2))
    async with aiohttp.ClientSession() as session:
        first = asyncio.create_task(post(session, stopping.url, "k"))
        await asyncio.wait_for(upstream.arrived.wait(), 10)
        stopping.signal(signal.SIGTERM)
        await closed(stopping.port)  # shutting down, with the request still in flight
        gate.set()
        response, _ = await first
        assert response.status == 200
        assert stopping.process is not None
        assert await asyncio.to_thread(stopping.process.wait, 10) == 0
        replay, _ = await post(session, other.url, "k")
        assert (replay.status, replay.headers["Idempotent-Replayed"]) == (200, "true")
    assert upstream.count == 1
