"""The one upstream client against recorded raw bytes: each scripted upstream answer (as real
servers send them) must come out as exactly the recorded status, reason, headers, length and
body, and each request must reach the upstream as exactly the recorded bytes. This replaced the
differential test against aiohttp's ClientSession when that transport was removed."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from proxy.config import ConfigError, UpstreamHost, parse
from proxy.upstream.h1 import H1Transport
from tests.support.scripted_upstream import ScriptedUpstream


async def through(url: str, requests: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    transport = H1Transport(url, connect_timeout=1.0, timeout=3.0, max_connections=4)
    seen = []
    try:
        for method, target, headers, body in requests:
            payload = body() if callable(body) else body
            response = await transport.send(method, target, list(headers), payload)
            try:
                data = b"".join([chunk async for chunk in response.chunks()])
            finally:
                response.release()
            seen.append(
                (response.status, response.reason, response.headers, response.content_length, data)
            )
    finally:
        await transport.close()
    return seen


def streamed(*chunks: bytes) -> Callable[[], AsyncIterator[bytes]]:
    async def body() -> AsyncIterator[bytes]:
        for chunk in chunks:
            yield chunk

    return body


# name: (raw answer, (status, reason, headers, content_length, body))
RECORDED: dict[str, tuple[bytes, tuple[Any, ...]]] = {
    "content-length": (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n\r\nhello",
        (200, "OK", [("Content-Type", "text/plain"), ("Content-Length", "5")], 5, b"hello"),
    ),
    "chunked": (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
        (200, "OK", [("Transfer-Encoding", "chunked")], None, b"abcde"),
    ),
    "chunk-extensions-and-trailer": (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3;x=y\r\nabc\r\n0\r\n"
        b"X-Trailer: t\r\n\r\n",
        (200, "OK", [("Transfer-Encoding", "chunked"), ("X-Trailer", "t")], None, b"abc"),
    ),
    "repeated-headers": (
        b"HTTP/1.1 418 I'm a teapot\r\nSet-Cookie: a=1\r\nSet-Cookie: b=2\r\n"
        b"X-Mixed-Case: Yes\r\nContent-Length: 3\r\n\r\ntea",
        (418, "I'm a teapot",
         [("Set-Cookie", "a=1"), ("Set-Cookie", "b=2"), ("X-Mixed-Case", "Yes"),
          ("Content-Length", "3")], 3, b"tea"),
    ),
    "no-content": (
        b'HTTP/1.1 204 No Content\r\nETag: "x"\r\n\r\n',
        (204, "No Content", [("ETag", '"x"')], None, b""),
    ),
    "not-modified": (
        b'HTTP/1.1 304 Not Modified\r\nETag: "x"\r\n\r\n',
        (304, "Not Modified", [("ETag", '"x"')], None, b""),
    ),
    "http-1.0": (
        b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok",
        (200, "OK", [("Content-Length", "2")], 2, b"ok"),
    ),
    "connection-close": (
        b"HTTP/1.1 500 Boom\r\nConnection: close\r\nContent-Length: 4\r\n\r\nboom",
        (500, "Boom", [("Connection", "close"), ("Content-Length", "4")], 4, b"boom"),
    ),
    "close-delimited": (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil close",
        (200, "OK", [("Content-Type", "text/plain")], None, b"until close"),
    ),
    "empty-reason": (
        b"HTTP/1.1 200 \r\nContent-Length: 0\r\n\r\n",
        (200, "", [("Content-Length", "0")], 0, b""),
    ),
    "interim": (
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nLocation: /x\r\n"
        b"Content-Length: 0\r\n\r\n",
        (201, "Created", [("Location", "/x"), ("Content-Length", "0")], 0, b""),
    ),
    "several-interims": (
        b"HTTP/1.1 100 Continue\r\nX-I: 1\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nx",
        (200, "OK", [("Content-Length", "1")], 1, b"x"),
    ),
}


@pytest.mark.parametrize("case", sorted(RECORDED))
async def test_recorded_answers_come_out_exactly(case: str) -> None:
    raw = await ScriptedUpstream().start()
    answer, expected = RECORDED[case]
    raw.answer(answer, close=case == "close-delimited")
    try:
        assert await through(raw.url, [("GET", "/", [], None)]) == [expected]
    finally:
        await raw.stop()


async def test_head_answer_has_no_body_whatever_its_length() -> None:
    raw = await ScriptedUpstream().start()
    raw.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\nContent-Type: a/b\r\n\r\n")
    try:
        seen = await through(raw.url, [("HEAD", "/", [], None)])
    finally:
        await raw.stop()
    assert seen == [(200, "OK", [("Content-Length", "99"), ("Content-Type", "a/b")], 99, b"")]


# (method, target, headers, body) -> the exact bytes after the request line and Host.
REQUESTS: list[tuple[tuple[Any, ...], bytes]] = [
    (("GET", "/a%20b/%7E?x=%2F&y=a+b&z", [("Accept", "*/*"), ("X-Custom", "1")], None),
     b"GET /a%20b/%7E?x=%2F&y=a+b&z HTTP/1.1\r\n{host}Accept: */*\r\nX-Custom: 1\r\n\r\n"),
    (("HEAD", "/head", [], None), b"HEAD /head HTTP/1.1\r\n{host}\r\n"),
    (("POST", "/bytes", [("Content-Type", "application/json")], b'{"a": 1}'),
     b'POST /bytes HTTP/1.1\r\n{host}Content-Type: application/json\r\nContent-Length: 8\r\n'
     b'\r\n{"a": 1}'),
    (("POST", "/empty", [], None), b"POST /empty HTTP/1.1\r\n{host}Content-Length: 0\r\n\r\n"),
    (("PUT", "/chunked", [], streamed(b"abc", b"defg")),
     b"PUT /chunked HTTP/1.1\r\n{host}Transfer-Encoding: chunked\r\n\r\n"
     b"3\r\nabc\r\n4\r\ndefg\r\n0\r\n\r\n"),
    (("PATCH", "/sized", [("Content-Length", "7")], streamed(b"abc", b"defg")),
     b"PATCH /sized HTTP/1.1\r\n{host}Content-Length: 7\r\n\r\nabcdefg"),
    (("DELETE", "/thing", [], None), b"DELETE /thing HTTP/1.1\r\n{host}Content-Length: 0\r\n\r\n"),
    (("OPTIONS", "/", [], None), b"OPTIONS / HTTP/1.1\r\n{host}\r\n"),
    (("PURGE", "/cache", [], b"x"), b"PURGE /cache HTTP/1.1\r\n{host}Content-Length: 1\r\n\r\nx"),
]


async def test_the_upstream_receives_the_recorded_requests() -> None:
    raw = await ScriptedUpstream().start()
    try:
        await through(raw.url, [request for request, _ in REQUESTS])
    finally:
        await raw.stop()
    host = f"Host: 127.0.0.1:{raw.port}\r\n".encode()
    assert raw.requests == [expected.replace(b"{host}", host) for _, expected in REQUESTS]


def test_the_removed_aiohttp_transport_is_refused_by_name() -> None:
    upstream = {"url": "http://127.0.0.1:8080", "transport": "aiohttp"}
    data = {"upstreams": {"app": upstream},
            "routes": [{"name": "r", "match": {"path_prefix": "/"}, "upstream": "app"}]}
    with pytest.raises(ConfigError) as caught:
        parse(data, {})
    [problem] = caught.value.problems
    assert problem.startswith("upstreams.app.transport:")
    assert "'aiohttp' was removed" in problem
    upstream["transport"] = "h1"  # the one client, still accepted by name
    assert parse(data, {}).upstreams["app"].transport == "h1"


def test_host_defaults_to_the_clients() -> None:
    data = {"upstreams": {"app": {"url": "http://127.0.0.1:8080"}},
            "routes": [{"name": "r", "match": {"path_prefix": "/"}, "upstream": "app"}]}
    assert parse(data, {}).upstreams["app"].host == UpstreamHost.PRESERVE
