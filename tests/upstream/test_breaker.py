"""Circuit breaker: the state machine on a driven clock, then through the proxy against an
upstream that fails on command (refuse, 5xx), opens fast and recovers through half-open."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import aiohttp
from aiohttp import web

from proxy.config import CircuitBreaker as BreakerConfig
from proxy.upstream.breaker import CLOSED, HALF_OPEN, OPEN, CircuitBreaker
from tests.support.faults import hang_until, poll_status, refusing_url, status
from tests.support.proxy_process import base_config
from tests.support.upstream import RecordingUpstream, echo


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def outcome(breaker: CircuitBreaker, failed: bool | None) -> None:
    assert breaker.allows()
    breaker.release(breaker.acquire(), failed)


def test_consecutive_failures_open_and_a_probe_closes() -> None:
    clock = Clock()
    breaker = CircuitBreaker(BreakerConfig(consecutive_failures=3, open_for=10), clock)
    outcome(breaker, True)
    outcome(breaker, True)
    outcome(breaker, False)  # a success resets the run
    outcome(breaker, True)
    outcome(breaker, True)
    assert breaker.state == CLOSED
    outcome(breaker, True)
    assert breaker.state == OPEN
    assert not breaker.allows()
    assert breaker.retry_after() == 10
    clock.now += 10
    assert breaker.allows()
    assert breaker.state == HALF_OPEN
    probe = breaker.acquire()
    assert not breaker.allows(), "one probe at a time"
    breaker.release(probe, False)
    assert breaker.state == CLOSED


def test_failed_probe_reopens_and_stale_outcomes_are_ignored() -> None:
    clock = Clock()
    breaker = CircuitBreaker(BreakerConfig(consecutive_failures=1, open_for=5), clock)
    slow = breaker.acquire()  # admitted while closed, answers late
    outcome(breaker, True)
    assert breaker.state == OPEN
    clock.now += 5
    assert breaker.allows()
    probe = breaker.acquire()
    breaker.release(slow, True)  # from the old generation: must not reopen
    assert breaker.state == HALF_OPEN
    breaker.release(probe, True)
    assert breaker.state == OPEN
    assert breaker.retry_after() == 5


def test_abandoned_probe_frees_its_slot() -> None:
    clock = Clock()
    breaker = CircuitBreaker(BreakerConfig(consecutive_failures=1, open_for=1), clock)
    outcome(breaker, True)
    clock.now += 1
    assert breaker.allows()
    breaker.release(breaker.acquire(), None)
    assert breaker.state == HALF_OPEN
    assert breaker.allows()


def test_failure_ratio_needs_min_requests_within_window() -> None:
    clock = Clock()
    config = BreakerConfig(
        consecutive_failures=None, failure_ratio=0.5, min_requests=4, window=10, open_for=1
    )
    breaker = CircuitBreaker(config, clock)
    for failed in (True, False, True):
        outcome(breaker, failed)
    assert breaker.state == CLOSED, "3 requests are below min_requests"
    clock.now += 11  # the window forgets them
    for failed in (True, False, False):
        outcome(breaker, failed)
    assert breaker.state == CLOSED
    outcome(breaker, True)
    assert breaker.state == OPEN, "2 failures of 4 requests reach 50%"


def breaker_config(urls: list[str], **breaker: Any) -> dict[str, Any]:
    config = base_config(urls[0])
    app = config["upstreams"]["app"]
    del app["url"]
    app["targets"] = [{"url": url, "weight": 1} for url in urls]
    app["circuit_breaker"] = {"consecutive_failures": 3, "open_for": "300ms", **breaker}
    return config


async def test_5xx_opens_the_circuit_fast_and_recovery_closes_it(
    make_proxy: Any, upstream: RecordingUpstream
) -> None:
    upstream.respond = status(503)
    client = await make_proxy(breaker_config([upstream.url]))
    for _ in range(3):
        assert (await client.get("/x")).status == 503
    assert upstream.count == 3
    started = time.monotonic()
    response = await client.get("/x")
    elapsed = time.monotonic() - started
    assert response.status == 503
    body = await response.json()
    assert body["type"].endswith(":circuit-open")
    assert response.headers["Content-Type"] == "application/problem+json"
    assert response.headers["Retry-After"] == "1"
    assert response.headers["X-Trace-Id"]
    assert upstream.count == 3, "an open circuit makes no upstream attempt"
    assert elapsed < 0.5
    runtime = client.server.plane.runtime
    assert runtime.upstreams["app"].circuit_states() == [(upstream.url, OPEN)]

    upstream.respond = echo
    await poll_status(client, 200)
    assert runtime.upstreams["app"].circuit_states() == [(upstream.url, CLOSED)]


async def test_bodies_that_break_after_the_head_open_the_circuit(
    make_proxy: Any, upstream: RecordingUpstream
) -> None:
    async def head_then_reset(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        response.content_length = 1000
        await response.prepare(request)
        await response.write(b"x" * 10)
        assert request.transport is not None
        request.transport.close()
        return response

    upstream.respond = head_then_reset
    client = await make_proxy(breaker_config([upstream.url], consecutive_failures=2))
    for _ in range(2):
        with contextlib.suppress(aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError):
            response = await client.get("/x")
            assert response.status in (200, 502)
            await response.read()
            raise AssertionError("a broken upstream body must not look complete")
    response = await client.get("/x")
    assert (await response.json())["type"].endswith(":circuit-open")
    assert upstream.count == 2


async def test_refused_connections_open_and_a_failed_probe_reopens(make_proxy: Any) -> None:
    url = refusing_url()
    client = await make_proxy(breaker_config([url], consecutive_failures=2))
    for _ in range(2):
        assert (await client.get("/x")).status == 502
    response = await client.get("/x")
    assert (await response.json())["type"].endswith(":circuit-open")
    upstream = client.server.plane.runtime.upstreams["app"]
    breaker = upstream.targets[0].breaker
    opened = breaker.generation
    # After open_for a probe goes out, is refused, and the circuit opens again.
    await poll_status(client, 502)
    assert breaker.state == OPEN
    assert breaker.generation == opened + 2  # open -> half_open -> open


async def test_an_open_target_is_skipped_while_another_serves(
    make_proxy: Any, upstream: RecordingUpstream
) -> None:
    bad = refusing_url()
    client = await make_proxy(breaker_config([bad, upstream.url], consecutive_failures=1))
    statuses = [(await client.get(f"/{i}")).status for i in range(6)]
    assert statuses[0] == 502  # the first pick goes to the refusing target
    assert statuses[1:] == [200] * 5
    app = client.server.plane.runtime.upstreams["app"]
    assert dict(app.circuit_states()) == {bad: OPEN, upstream.url: CLOSED}
    first, second = app.snapshot()
    assert (first["url"], first["circuit"], first["healthy"]) == (bad, OPEN, True)
    assert 0 < first["retry_after"] <= 0.3
    assert (second["circuit"], second["retry_after"], second["weight"]) == (CLOSED, 0.0, 1)


async def test_failure_statuses_are_configurable(
    make_proxy: Any, upstream: RecordingUpstream
) -> None:
    upstream.respond = status(500)
    client = await make_proxy(breaker_config([upstream.url], consecutive_failures=1))
    for _ in range(3):
        assert (await client.get("/x")).status == 500
    assert upstream.count == 3, "500 is not a failure by default"
    client = await make_proxy(
        breaker_config([upstream.url], consecutive_failures=1, failure_statuses=[500])
    )
    assert (await client.get("/x")).status == 500
    assert (await client.get("/x")).status == 503
    assert upstream.count == 4


async def test_a_hanging_upstream_times_out_and_opens_the_circuit(
    make_proxy: Any, upstream: RecordingUpstream
) -> None:
    release = asyncio.Event()
    upstream.respond = hang_until(release)
    config = breaker_config([upstream.url], consecutive_failures=1, open_for="1m")
    config["upstreams"]["app"]["timeout"] = "200ms"
    client = await make_proxy(config)
    try:
        assert (await client.get("/x")).status == 504
        response = await client.get("/x")
        assert response.status == 503
        assert int(response.headers["Retry-After"]) == 60
        assert upstream.count == 1, "no upstream attempt while open"
    finally:
        release.set()
