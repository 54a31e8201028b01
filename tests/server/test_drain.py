"""Drain against a real `idemproxy run` process: SIGTERM under load, POST /admin/drain, the
shutdown deadline, and the admin port's POST-only rule."""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from tests.support.eventually import eventually
from tests.support.idempotency import idem_config
from tests.support.ports import wait_until
from tests.support.proxy_process import ProxyProcess, base_config
from tests.support.raw_upstream import RawUpstream
from tests.support.strict_http import StrictReader, closed_within, connect
from tests.support.upstream import RecordingUpstream

WORKERS = 8
MAX_REQUESTS = 4000  # the client is bounded even if the proxy never stops


async def exit_code(process: ProxyProcess, timeout: float) -> tuple[int, float]:
    """Wait for the process to exit without blocking the loop the upstream runs on."""
    assert process.process is not None
    started = time.monotonic()
    code = await asyncio.to_thread(process.process.wait, timeout)
    return code, time.monotonic() - started


async def ready_status(session: aiohttp.ClientSession, admin_url: str) -> int | None:
    try:
        async with session.get(admin_url + "/ready") as response:
            return response.status
    except aiohttp.ClientError:
        return None


async def test_sigterm_under_load_loses_no_accepted_request(
    proxy_process: Any, upstream: RecordingUpstream
) -> None:
    async def slow(request: web.Request) -> web.Response:
        await request.read()
        await asyncio.sleep(0.2)  # keeps requests in flight when the listener closes
        return web.Response(text="done")

    upstream.respond = slow
    timeout = 10.0
    proc = proxy_process(
        base_config(upstream.url, shutdown={"drain_delay": "1s", "timeout": f"{timeout:g}s"})
    )
    answered: list[tuple[float, int, str | None]] = []  # (sent at, status, Connection header)
    refused: list[float] = []
    failed: list[tuple[float, str]] = []
    readiness: list[tuple[float, int | None]] = []
    sent = 0

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal sent
        while sent < MAX_REQUESTS:
            sent += 1
            at = time.monotonic()
            try:
                async with session.post(proc.url + "/work", data=b"x" * 512) as response:
                    await response.read()
                    answered.append((at, response.status, response.headers.get("Connection")))
            except aiohttp.ClientConnectorError:
                refused.append(at)  # the listener is closed: never accepted
                return
            except aiohttp.ClientError as exc:
                failed.append((at, repr(exc)))

    async def watch_ready(session: aiohttp.ClientSession) -> None:
        while not refused:
            readiness.append((time.monotonic(), await ready_status(session, proc.admin_url)))
            await asyncio.sleep(0.02)

    async with aiohttp.ClientSession() as session, aiohttp.ClientSession() as probe:
        workers = [asyncio.create_task(worker(session)) for _ in range(WORKERS)]
        watcher = asyncio.create_task(watch_ready(probe))
        await eventually(lambda: asyncio.sleep(0, len(answered) >= 30), 10, "load running")
        term_at = time.monotonic()
        proc.signal(signal.SIGTERM)
        code, took = await exit_code(proc, timeout + 5)
        await asyncio.gather(*workers)
        await watcher

    assert failed == []
    assert refused, "the listener never closed"
    closed_at = min(refused)
    accepted = [a for a in answered if a[0] < closed_at]
    assert len(accepted) == len(answered) >= 30
    assert {status for _, status, _ in answered} == {200}
    # /ready said 503 after the signal and before the listener closed ...
    assert any(term_at < at < closed_at and status == 503 for at, status in readiness)
    # ... while the proxy kept serving for the drain delay, with Connection: close.
    during_drain = [a for a in answered if term_at + 0.2 < a[0]]
    assert during_drain
    assert {header for _, _, header in during_drain} == {"close"}
    assert closed_at - term_at >= 0.9
    assert code == 0
    assert took < timeout
    events = {line["event"]: line for line in proc.json_lines() if "event" in line}
    assert events["drain_started"]["trigger"] == "SIGTERM"
    assert events["drained"]["clean"] is True
    assert events["listener_closed"]["inflight"] >= 1  # some requests had to be finished
    assert "drain_timeout" not in events


async def test_shutdown_timeout_aborts_what_is_left_and_exits(
    proxy_process: Any, upstream: RecordingUpstream
) -> None:
    async def hang(request: web.Request) -> web.Response:
        await asyncio.sleep(60)
        return web.Response(text="too late")

    upstream.respond = hang
    upstream.arrived.clear()
    proc = proxy_process(base_config(upstream.url, shutdown={"drain_delay": "0s", "timeout": "2s"}))
    async with aiohttp.ClientSession() as session:
        stuck = asyncio.create_task(session.get(proc.url + "/slow"))
        await asyncio.wait_for(upstream.arrived.wait(), 10)
        proc.signal(signal.SIGTERM)
        code, took = await exit_code(proc, 10)
        outcome = await asyncio.gather(stuck, return_exceptions=True)
    assert code == 0
    assert 1.0 <= took < 4.0
    assert isinstance(outcome[0], aiohttp.ClientError)  # cut, not answered after the deadline
    events = {line["event"]: line for line in proc.json_lines() if "event" in line}
    assert events["drain_timeout"]["aborted"] == 1
    assert events["drained"]["clean"] is False


async def test_admin_drain_and_post_only_admin_paths(
    proxy_process: Any, upstream: RecordingUpstream
) -> None:
    proc = proxy_process(base_config(upstream.url, shutdown={"drain_delay": "1s", "timeout": "5s"}))
    admin = proc.admin_url
    async with aiohttp.ClientSession() as session:
        async with session.get(admin + "/admin/drain") as response:
            assert response.status == 405
            assert response.headers["Allow"] == "POST"
        async with session.put(admin + "/admin/reload") as response:
            assert response.status == 405
        async with session.post(admin + "/admin/nothing") as response:
            assert response.status == 404
        async with session.post(
            admin + "/admin/drain", headers={"Origin": "https://evil.example"}
        ) as response:
            assert response.status == 403
        assert await ready_status(session, admin) == 200

        async with session.post(admin + "/admin/drain") as response:
            assert response.status == 202
            assert (await response.json())["status"] == "draining"
        assert await ready_status(session, admin) == 503
        async with session.get(admin + "/live") as response:
            assert response.status == 200
        async with session.get(proc.url + "/still-serving") as response:
            assert response.status == 200
            assert response.headers["Connection"] == "close"
        code, took = await exit_code(proc, 10)
    assert code == 0
    assert took < 5
    assert upstream.received[-1].raw_path == "/still-serving"


async def test_idempotency_record_in_flight_at_sigterm_is_finalised(
    proxy_process: Any, upstream: RecordingUpstream, redis_server: Any
) -> None:
    """The request finishes during the drain and its record is completed in Redis, so a
    retry on another replica is replayed instead of executed again."""
    release = asyncio.Event()

    async def gated(request: web.Request) -> web.Response:
        await release.wait()
        return web.json_response({"charged": 1}, status=201)

    upstream.respond = gated
    upstream.arrived.clear()
    redis = redis_server()
    config = idem_config(upstream.url, redis.url)
    config["shutdown"] = {"drain_delay": "0s", "timeout": "10s"}
    first = proxy_process(config)
    headers = {"Idempotency-Key": "drain-1"}
    async with aiohttp.ClientSession() as session:
        pending = asyncio.create_task(session.post(first.url + "/v1/pay", json={}, headers=headers))
        await asyncio.wait_for(upstream.arrived.wait(), 10)
        first.signal(signal.SIGTERM)
        await eventually(
            lambda: asyncio.sleep(
                0, any(e.get("event") == "listener_closed" for e in first.json_lines())
            ),
            10,
            "the listener closed while the request is in flight",
        )
        release.set()
        response = await pending
        assert response.status == 201
        assert response.headers["Connection"] == "close"
        code, _ = await exit_code(first, 10)
        assert code == 0

        second = proxy_process(idem_config(upstream.url, redis.url))
        async with session.post(second.url + "/v1/pay", json={}, headers=headers) as replay:
            assert replay.status == 201
            assert replay.headers["Idempotent-Replayed"] == "true"
    assert upstream.count == 1


@pytest.mark.slow
def test_sigterm_closes_idle_keep_alive_connections_and_answers_the_request_in_flight(
    proxy_process: Any, tmp_path: Any
) -> None:
    """Raw sockets: idle kept-alive connections are closed at once (long before
    header_timeout); a request in flight gets its answer with `Connection: close`, then EOF."""
    gate = threading.Event()

    async def gated(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.to_thread(gate.wait, 10)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\ndone")
        await writer.drain()

    upstream = RawUpstream().start()
    upstream.scripts["/in-flight"] = gated
    try:
        config = base_config(upstream.url, limits={"header_timeout": "30s"},
                             shutdown={"drain_delay": "0s", "timeout": "10s"})
        proc = proxy_process(config)
        idle = [connect(proc.port) for _ in range(3)]
        for count, sock in enumerate(idle, start=1):  # 1, 2 and 3 requests answered on each
            sock.sendall(b"GET /before HTTP/1.1\r\nHost: a\r\n\r\n" * count)
            assert [a.status for a in StrictReader(sock).read(count)] == [200] * count
        busy = connect(proc.port)
        busy.sendall(b"POST /in-flight HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nhi")
        wait_until(lambda: any(r.target == "/in-flight" for r in upstream.requests), 5,
                   "the request in flight at the upstream")
        proc.signal(signal.SIGTERM)
        closed = [closed_within(sock, 5) for sock in idle]
        assert all(seconds is not None and seconds < 2 for seconds in closed), closed
        gate.set()
        reader = StrictReader(busy)
        [answer] = reader.read(1)
        reader.read_to_eof()
        assert (answer.status, answer.body) == (200, b"done")
        assert answer.header("connection") == "close"
        assert proc.process is not None
        assert proc.process.wait(10) == 0
        for sock in [*idle, busy]:
            sock.close()
    finally:
        gate.set()
        upstream.stop()
