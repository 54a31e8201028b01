"""Differential test: the same requests through AiohttpTransport and H1Transport must give the
same status, reason, headers, length and body, and the upstream must see the same request."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson
import pytest

from proxy.upstream.h1 import H1Transport
from proxy.upstream.transport import AiohttpTransport, Transport
from tests.support.scripted_upstream import RawUpstream
from tests.support.upstream import RecordingUpstream

KINDS: dict[str, Callable[..., Transport]] = {"aiohttp": AiohttpTransport, "h1": H1Transport}


async def through(kind: str, url: str, requests: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    transport = KINDS[kind](url, connect_timeout=1.0, timeout=3.0, max_connections=4)
    seen = []
    try:
        for method, target, headers, body in requests:
            payload = body() if callable(body) else body
            response = await transport.send(method, target, list(headers), payload)
            try:
                data = b"".join([chunk async for chunk in response.chunks()])
            finally:
                response.release()
            head = [(k, v) for k, v in response.headers if k.lower() != "date"]
            seen.append((response.status, response.reason, head, response.content_length, data))
    finally:
        await transport.close()
    return seen


def streamed(*chunks: bytes) -> Callable[[], AsyncIterator[bytes]]:
    async def body() -> AsyncIterator[bytes]:
        for chunk in chunks:
            yield chunk

    return body


SCRIPTED = {
    "content-length": b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n\r\nhello",
    "chunked": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
    "repeated-headers": b"HTTP/1.1 418 I'm a teapot\r\nSet-Cookie: a=1\r\nSet-Cookie: b=2\r\n"
    b"X-Mixed-Case: Yes\r\nContent-Length: 3\r\n\r\ntea",
    "no-content": b'HTTP/1.1 204 No Content\r\nETag: "x"\r\n\r\n',
    "not-modified": b'HTTP/1.1 304 Not Modified\r\nETag: "x"\r\n\r\n',
    "http-1.0": b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok",
    "connection-close": b"HTTP/1.1 500 Boom\r\nConnection: close\r\nContent-Length: 4\r\n\r\nboom",
    "close-delimited": b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil close",
    "interim": b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nLocation: /x\r\n"
    b"Content-Length: 0\r\n\r\n",
}


@pytest.mark.parametrize("case", sorted(SCRIPTED))
async def test_scripted_responses_match(case: str) -> None:
    results = {}
    for kind in KINDS:
        raw = await RawUpstream().start()
        raw.answer(SCRIPTED[case], close=case == "close-delimited")
        try:
            results[kind] = await through(kind, raw.url, [("GET", "/", [], None)])
        finally:
            await raw.stop()
    assert results["h1"] == results["aiohttp"]


async def test_head_responses_match() -> None:
    results = {}
    for kind in KINDS:
        raw = await RawUpstream().start()
        raw.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\nContent-Type: a/b\r\n\r\n")
        try:
            results[kind] = await through(kind, raw.url, [("HEAD", "/", [], None)])
        finally:
            await raw.stop()
    assert results["h1"] == results["aiohttp"]
    assert results["h1"][0][3:] == (99, b"")


REQUESTS = [
    ("GET", "/a%20b/%7E?x=%2F&y=a+b&z", [("Accept", "*/*"), ("X-Custom", "1")], None),
    ("HEAD", "/head", [], None),
    ("POST", "/bytes", [("Content-Type", "application/json")], b'{"a": 1}'),
    ("POST", "/empty", [], None),
    ("PUT", "/chunked", [], streamed(b"abc", b"defg")),
    ("PATCH", "/sized", [("Content-Length", "7")], streamed(b"abc", b"defg")),
    ("DELETE", "/thing", [], None),
    ("OPTIONS", "/", [], None),
    ("PURGE", "/cache", [], b"x"),
]


async def test_the_upstream_sees_the_same_requests(aiohttp_server: Any) -> None:
    """Through the echo upstream: the echoed method, path, headers and body are compared."""
    results = {}
    for kind in KINDS:
        upstream = RecordingUpstream()
        server = await aiohttp_server(upstream.app)
        url = str(server.make_url("")).rstrip("/")
        responses = await through(kind, url, REQUESTS)
        results[kind] = [
            (status, reason, _normalised(body)) for status, reason, _, _, body in responses
        ]
        await server.close()
    assert results["h1"] == results["aiohttp"]


def _normalised(body: bytes) -> Any:
    if not body:
        return body
    echoed = orjson.loads(body)
    # Header order is not semantic; the port differs between the two upstream servers.
    echoed["headers"] = sorted((k.lower(), v) for k, v in echoed["headers"] if k.lower() != "host")
    return echoed
