"""The access log: one typed JSON line per request on every outcome, and what it never holds."""

from __future__ import annotations

import asyncio
import re
import socket
import time
from typing import Any

import pytest
from aiohttp import ClientSession, web

from proxy.config import Logging
from proxy.http.context import RequestContext
from proxy.observability import events, logsink
from proxy.observability.access_log import AccessLog, allowed_query, encode, server_of
from proxy.observability.metrics import Metrics
from tests.support.lines import Lines
from tests.support.observed import observe
from tests.support.ports import free_port, wait_until
from tests.support.proxy_process import base_config
from tests.support.raw_client import RawConnection
from tests.support.raw_http import exchange, status_of
from tests.support.requests import make_request
from tests.support.upstream import RecordingUpstream

FIELDS = {
    "timestamp": str,
    "trace_id": str,
    "span_id": str,
    "trace_flags": str,
    "http.request.method": str,
    "url.path": str,
    "url.query": type(None),
    "url.scheme": str,
    "server.address": str,
    "server.port": int,
    "network.protocol.version": str,
    "http.route": str,
    "http.response.status_code": int,
    "duration_ms": float,
    "upstream.duration_ms": float,
    "upstream.name": str,
    "upstream.target": str,
    "http.request.resend_count": int,
    "client.address": str,
    "user_agent.original": str,
    "http.request.header.x-request-id": type(None),
    "http.request.body.size": int,
    "http.response.body.size": int,
    "idempotency.outcome": type(None),
    "idempotency.key_hash": type(None),
    "user.hash": type(None),
    "error.type": type(None),
    "trace.replaced": type(None),
}
SECRETS = ("Bearer sekret-token", "session=cookie-value", "key-abc-123", "hunter2")


async def test_success_line_has_every_field_typed(aiohttp_client, upstream: RecordingUpstream) -> None:
    seen = await observe(aiohttp_client, base_config(upstream.url))
    response = await seen.client.post("/orders", data=b"12345", headers={"User-Agent": "curl/8.4.0"})
    body = await response.read()
    [line] = await seen.lines.wait_for(1)
    assert {name: type(line[name]) for name in FIELDS} == FIELDS
    assert list(line) == list(FIELDS)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", line["timestamp"])
    assert line["trace_id"] == response.headers["X-Trace-Id"]
    assert (line["http.request.method"], line["url.path"], line["http.route"]) == ("POST", "/orders", "default")
    assert line["http.response.status_code"] == 200
    assert line["http.request.body.size"] == 5
    assert line["http.response.body.size"] == len(body)
    assert line["upstream.name"] == "app"
    assert line["upstream.target"] == upstream.url.removeprefix("http://")  # host:port
    assert line["http.request.resend_count"] == 0
    assert (line["url.scheme"], line["network.protocol.version"]) == ("http", "1.1")
    assert (line["server.address"], line["server.port"]) == ("127.0.0.1", seen.port)
    assert 0 < line["upstream.duration_ms"] <= line["duration_ms"]
    assert line["client.address"] == "127.0.0.1"
    assert line["user_agent.original"] == "curl/8.4.0"
    assert seen.lines.raw[0].endswith(b"}\n") and seen.lines.raw[0].count(b"\n") == 1


async def test_secrets_and_query_never_reach_the_log(aiohttp_client, upstream: RecordingUpstream) -> None:
    config = base_config(upstream.url, logging={"query_allowlist": ["page"]})
    seen = await observe(aiohttp_client, config)
    await seen.client.get(
        "/search?page=2&token=hunter2&key-abc-123",
        headers={
            "Authorization": SECRETS[0],
            "Cookie": SECRETS[1],
            "Idempotency-Key": SECRETS[2],
        },
    )
    await seen.client.get("/search?token=hunter2")
    await seen.lines.wait_for(2)
    raw = b"".join(seen.lines.raw)
    for secret in SECRETS:
        assert secret.encode() not in raw
    first, second = seen.lines.json()
    assert first["url.query"] == "page=2"
    assert first["url.path"] == second["url.path"] == "/search"
    assert second["url.query"] is None


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("page=2&token=x", "page=2"),
        ("a%20b=1&page=3&page=4", "page=3&page=4"),
        ("pa%67e=1", "pa%67e=1"),  # keys are compared decoded, logged as sent
        ("token=x", None),
        ("", None),
    ],
)
def test_allowed_query(query: str, expected: str | None) -> None:
    assert allowed_query(query, frozenset({"page"})) == expected


async def test_header_values_cannot_break_the_line(aiohttp_client, upstream: RecordingUpstream) -> None:
    seen = await observe(aiohttp_client, base_config(upstream.url))
    # Quotes, backslashes, tabs and bytes that are not UTF-8, straight onto the socket.
    nasty = b'evil"}\n{"injected":true} \\"x\\\t\xff\xfe end'
    request = (
        b"GET /x HTTP/1.1\r\nHost: t\r\nUser-Agent: " + nasty + b"\r\nX-Request-Id: a\"b\r\n"
        b"Connection: close\r\n\r\n"
    )
    # A raw LF inside a value is refused by the parser; that refusal is logged as one line too.
    reply, _ = await exchange(seen.port, request, until_close=True)
    split = b"GET /x HTTP/1.1\r\nHost: t\r\nUser-Agent: a\r\n\"injected\": 1\r\n\r\n"
    reply2, _ = await exchange(seen.port, split, until_close=True)
    clean = b'GET /x HTTP/1.1\r\nHost: t\r\nUser-Agent: q"uo\\te\t\xff\r\nConnection: close\r\n\r\n'
    reply3, _ = await exchange(seen.port, clean, until_close=True)
    lines = await seen.lines.wait_for(3)
    for raw in seen.lines.raw:
        assert raw.count(b"\n") == 1 and raw.endswith(b"\n")
    assert all("injected" not in line for line in lines)
    statuses = [status_of(reply), status_of(reply2), status_of(reply3)]
    assert sorted(line["http.response.status_code"] for line in lines) == sorted(statuses)
    ok = next(line for line in lines if line["http.response.status_code"] == 200)
    assert ok["user_agent.original"] == 'q"uo\\te\t\\udcff'


def test_encode_escapes_surrogates_instead_of_failing() -> None:
    line = encode({"user_agent.original": "a\udcff\"\n", "n": 1})
    assert line == b'{"user_agent.original":"a\\\\udcff\\"\\n","n":1}\n'


async def test_rejections_before_routing_are_logged(aiohttp_client, upstream: RecordingUpstream) -> None:
    config = base_config(upstream.url, limits={"max_request_body": "8B", "max_header_bytes": "1KiB"})
    config["routes"] = [{"name": "api", "match": {"path_prefix": "/api"}, "upstream": "app"}]
    seen = await observe(aiohttp_client, config)
    not_found = await seen.client.get("/elsewhere")
    too_big = await seen.client.post("/api", data=b"x" * 9)
    too_many = await seen.client.get("/api", headers={"X-Big": "y" * 1100})
    garbage, _ = await exchange(seen.port, b"NOT HTTP AT ALL\r\n\r\n", until_close=True)
    lines = await seen.lines.wait_for(4)
    by_status = {line["http.response.status_code"]: line for line in lines}
    assert set(by_status) == {404, 413, 431, status_of(garbage)} and status_of(garbage) == 400
    for response in (not_found, too_big, too_many):
        assert by_status[response.status]["trace_id"] == response.headers["X-Trace-Id"]
    assert by_status[404]["error.type"] == "no_route"
    assert by_status[413]["error.type"] == "request_body_too_large"
    assert by_status[431]["error.type"] == "request_headers_too_large"
    assert all(line["http.route"] is None and line["upstream.name"] is None for line in lines)
    parser = by_status[400]
    assert parser["error.type"] == "malformed_request"
    assert parser["http.request.method"] is None and parser["url.path"] is None
    assert f"X-Trace-Id: {parser['trace_id']}".encode() in garbage


async def test_upstream_failure_is_logged(aiohttp_client) -> None:
    seen = await observe(aiohttp_client, base_config(f"http://127.0.0.1:{free_port()}"))
    response = await seen.client.get("/x")
    assert response.status == 502
    [line] = await seen.lines.wait_for(1)
    assert line["http.response.status_code"] == 502
    assert line["upstream.name"] == "app"
    assert line["error.type"] == "upstream_unreachable"
    assert line["trace_id"] == response.headers["X-Trace-Id"]


async def test_streamed_body_is_counted_and_disconnect_is_logged(
    aiohttp_client, upstream: RecordingUpstream
) -> None:
    release = asyncio.Event()

    async def stream(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        for _ in range(3):
            await response.write(b"x" * 1000)
        if request.path == "/hang":
            await release.wait()
            for _ in range(50):
                await response.write(b"y" * 65536)
        await response.write_eof()
        return response

    upstream.respond = stream
    seen = await observe(aiohttp_client, base_config(upstream.url))
    full = await seen.client.get("/full")
    assert len(await full.read()) == 3000
    [line] = await seen.lines.wait_for(1)
    assert line["http.response.body.size"] == 3000

    async with ClientSession() as session:
        response = await session.get(f"http://127.0.0.1:{seen.port}/hang")
        assert len(await response.content.readexactly(3000)) == 3000
        response.close()  # the client walks away mid-body
    release.set()
    lines = await seen.lines.wait_for(2)
    gone = lines[1]
    assert gone["url.path"] == "/hang"
    assert gone["http.response.status_code"] == 200  # what was sent before the client left
    assert gone["error.type"] == "client_disconnect"
    assert gone["http.response.body.size"] >= 3000


async def test_access_log_off_still_counts(aiohttp_client, upstream: RecordingUpstream) -> None:
    seen = await observe(aiohttp_client, base_config(upstream.url, logging={"access_log": False}))
    assert (await seen.client.get("/x")).status == 200
    assert seen.lines.raw == []
    assert seen.samples()[("idemproxy_requests_total", (("method", "GET"), ("route", "default"), ("status_class", "2xx")))] == 1


def _ctx() -> RequestContext:
    ctx = RequestContext(make_request("POST", "/pay"), "10.0.0.7")
    ctx.trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    return ctx


async def test_idempotency_fields_are_logged_and_counted() -> None:
    lines, metrics = Lines(), Metrics()
    log = AccessLog(Logging(), metrics, lines)

    async def store_down(ctx: RequestContext) -> web.StreamResponse:
        ctx.idempotency_outcome = "store_error"
        ctx.idempotency_key_hash = "ab" * 32
        ctx.user_hash = "cd" * 32
        ctx.error_type = "store_unavailable"
        return web.Response(status=503, body=b"{}")

    response = await log.stage(store_down)(_ctx())
    assert response.status == 503
    [line] = lines.json()
    assert line["idempotency.outcome"] == "store_error"
    assert (line["idempotency.key_hash"], line["user.hash"]) == ("ab" * 32, "cd" * 32)
    assert line["error.type"] == "store_unavailable"
    assert line["http.response.body.size"] == 2
    assert metrics.store_errors.value == 1
    assert metrics.idempotency[("", "store_error")].value == 1


async def test_an_unexpected_error_still_answers_with_a_trace_id_and_a_line() -> None:
    lines, metrics = Lines(), Metrics()

    async def broken(ctx: RequestContext) -> web.StreamResponse:
        raise KeyError("bug")

    reported = Lines()
    events.configure("info", reported)
    try:
        response = await AccessLog(Logging(), metrics, lines).stage(broken)(_ctx())
    finally:
        events.configure("info", logsink.STDOUT)
    [event] = reported.json()
    assert (event["event"], event["level"], event["error"]) == ("unhandled_error", "error", "KeyError('bug')")
    assert "raise KeyError" in event["traceback"]
    assert response.status == 500
    assert response.headers["X-Trace-Id"] == "4bf92f3577b34da6a3ce929d0e0e4736"
    [line] = lines.json()
    assert (line["http.response.status_code"], line["error.type"]) == (500, "KeyError")
    assert metrics.inflight.value == 0


async def test_a_real_process_writes_one_line_per_request_whatever_the_outcome(
    proxy_process, upstream: RecordingUpstream
) -> None:
    config = base_config(
        upstream.url,
        upstreams={
            "app": {"url": upstream.url},
            "dead": {"url": f"http://127.0.0.1:{free_port()}", "connect_timeout": "1s"},
        },
        routes=[
            {"name": "down", "match": {"path_prefix": "/down"}, "upstream": "dead"},
            {"name": "api", "match": {"path_prefix": "/api"}, "upstream": "app"},
        ],
        limits={"max_request_body": "4B"},
    )
    process = proxy_process(config)
    statuses = []
    async with ClientSession() as session:
        for method, path, data in (
            ("GET", "/api/ok", None),
            ("GET", "/down/x", None),
            ("GET", "/missing", None),
            ("POST", "/api/big", b"12345"),
        ):
            async with session.request(method, process.url + path, data=data) as response:
                statuses.append(response.status)
    garbage, _ = await exchange(process.port, b"\x16\x03\x01 not http\r\n\r\n", until_close=True)
    statuses.append(status_of(garbage))
    assert statuses == [200, 502, 404, 413, 400]

    def access_lines() -> list[dict[str, object]] | None:
        lines = [line for line in process.json_lines() if "http.response.status_code" in line]
        return lines if len(lines) >= len(statuses) else None

    lines = await asyncio.to_thread(wait_until, access_lines, 5, "five access log lines")
    assert [line["http.response.status_code"] for line in lines] == statuses
    assert all(set(FIELDS) <= set(line) for line in lines)


async def test_concurrent_requests_give_whole_lines_in_a_real_process(
    proxy_process, upstream: RecordingUpstream
) -> None:
    process = proxy_process(base_config(upstream.url))
    async with ClientSession() as session:

        async def one(i: int) -> str:
            async with session.get(f"{process.url}/c/{i}", headers={"User-Agent": f'ua "{i}"\t\\'}) as response:
                await response.read()
                return response.headers["X-Trace-Id"]

        trace_ids = await asyncio.gather(*(one(i) for i in range(60)))

    def lines() -> list[dict[str, object]] | None:
        found = [line for line in process.json_lines() if str(line.get("url.path", "")).startswith("/c/")]
        return found if len(found) >= 60 else None

    logged = await asyncio.to_thread(wait_until, lines, 5, "60 access lines")
    assert sorted(str(line["trace_id"]) for line in logged) == sorted(trace_ids)
    assert {line["user_agent.original"] for line in logged} == {f'ua "{i}"\t\\' for i in range(60)}


async def test_in_process_proxies_keep_their_lines_off_stdout(
    make_proxy: Any, upstream: RecordingUpstream, capfd: pytest.CaptureFixture[str]
) -> None:
    client = await make_proxy(base_config(upstream.url))
    response = await client.get("/kept?secret=1", headers={"X-Request-Id": "r1"})
    assert response.status == 200
    await response.read()
    [line] = await client.server.lines.wait_for(1)
    assert (line["url.path"], line["http.request.header.x-request-id"]) == ("/kept", "r1")
    logsink.STDOUT.flush(2)
    assert "/kept" not in capfd.readouterr().out


@pytest.mark.parametrize(
    ("host", "scheme", "expected"),
    [
        ("api.example.com:8443", "http", ("api.example.com", 8443)),
        ("api.example.com", "http", ("api.example.com", 80)),
        ("api.example.com", "https", ("api.example.com", 443)),
        ("[::1]:9000", "http", ("[::1]", 9000)),
        ("[::1]", "http", ("[::1]", 80)),
        ("h:99999999999999999999", "http", ("h:99999999999999999999", 80)),  # no huge ints
        ("", "http", (None, None)),
        (None, "http", (None, None)),
    ],
)
def test_server_address_and_port_come_from_the_host_header(
    host: str | None, scheme: str, expected: tuple[str | None, int | None]
) -> None:
    assert server_of(host, scheme) == expected


async def test_retries_and_the_target_that_failed_are_logged(aiohttp_client) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    config = base_config(dead)
    config["routes"][0]["retries"] = {"attempts": 3, "backoff": "1ms", "max_backoff": "2ms"}
    seen = await observe(aiohttp_client, config)
    assert (await seen.client.get("/x")).status == 502
    [line] = await seen.lines.wait_for(1)
    assert line["http.request.resend_count"] == 2  # three attempts: two resends
    assert line["upstream.target"] == dead.removeprefix("http://")


async def test_duration_includes_the_wait_for_a_slow_reader(
    aiohttp_client, upstream: RecordingUpstream
) -> None:
    """A body the kernel cannot take at once (the client reads nothing for a while): the line's
    duration ends when the last byte was accepted, so it covers the client's pause."""
    body = b"x" * (48 * 1024)  # under asyncio's 64 KiB high-water mark: written without a wait
    seen = await observe(aiohttp_client, base_config(upstream.url))

    async def big(request: web.Request) -> web.StreamResponse:
        # Pin the proxy's send buffer small (loopback autotuning would take megabytes), so the
        # body cannot all be in the kernel while the client is not reading.
        for ctx in seen.client.server.plane._live.values():
            ctx.request.transport.get_extra_info("socket").setsockopt(
                socket.SOL_SOCKET, socket.SO_SNDBUF, 4096
            )
        return web.Response(body=body)

    upstream.respond = big
    pause = 0.4
    with RawConnection(seen.port, timeout=5, rcvbuf=2048) as client:
        client.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        client.send(b"GET /big HTTP/1.1\r\nHost: svc\r\n\r\n")
        await asyncio.wait_for(upstream.arrived.wait(), 5)
        await asyncio.sleep(pause)  # the slow reader's pause is the thing measured
        started = time.monotonic()
        response = await asyncio.to_thread(client.read_response)
        assert response is not None and response.body == body
        read_for = time.monotonic() - started
    [line] = await seen.lines.wait_for(1)
    assert line["http.response.body.size"] == len(body)
    assert line["duration_ms"] >= pause * 1000 * 0.9, (line["duration_ms"], read_for)
