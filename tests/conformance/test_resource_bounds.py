"""A1/A2 resource bounds on the real proxy: the connection cap, pipelining, header count and
size, bodies over the limit (declared and chunked), and compressed bodies relayed as bytes."""

from __future__ import annotations

import asyncio
import gzip
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from tests.conformance.conftest import Stack
from tests.support.ports import wait_until
from tests.support.raw_client import RawConnection, exchange

CAP = 8
BODY_LIMIT = 64 * 1024
LIMITS = {"max_connections": CAP, "max_request_body": "64KiB", "max_header_bytes": "16KiB"}
BOMB = gzip.compress(bytes(16 * 1024 * 1024), compresslevel=9)


def get(path: str, extra: bytes = b"") -> bytes:
    return b"GET " + path.encode() + b" HTTP/1.1\r\nHost: a\r\n" + extra + b"\r\n"


def served(stack: Stack) -> bool:
    with RawConnection(stack.port) as connection:
        return connection.still_serves()


def rejected_total(stack: Stack) -> float:
    with urllib.request.urlopen(stack.proxy.admin_url + "/metrics", timeout=2) as response:
        text = response.read().decode()
    [value] = [
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "idemproxy_connections_rejected_total"
    ]
    return value


def rejection_events(stack: Stack) -> list[dict[str, object]]:
    return [e for e in stack.proxy.json_lines() if e.get("event") == "connections_rejected"]


def test_connection_cap(stack: Stack) -> None:
    held = [RawConnection(stack.port) for _ in range(CAP)]
    try:
        for connection in held:
            assert connection.still_serves()
        for _ in range(3):
            response, extra = exchange(stack.port, get("/over-cap"))
            with extra:
                assert response is not None
                assert response.status == 503
                assert response.header("Retry-After") == "1"
                assert response.problem()["type"].endswith("too-many-connections")
                assert extra.closed_within(2)
        assert rejected_total(stack) == 3
        assert held[0].still_serves(), "connections under the cap keep working"
        with urllib.request.urlopen(stack.proxy.admin_url + "/live", timeout=2) as live:
            assert live.status == 200, "the admin port is not counted against the data port cap"
        held.pop().close()
        wait_until(lambda: served(stack), 5, "a connection accepted once one closed")
    finally:
        for connection in held:
            connection.close()
    wait_until(lambda: served(stack), 5, "the proxy noticing the closed connections")
    assert "/over-cap" not in [r.target for r in stack.upstream.requests]
    # One warning per REJECTED_EVENT_INTERVAL (10 s), not one per connection; the counter has
    # them all. Events are written at once, but by the log thread: poll for the line.
    wait_until(lambda: rejection_events(stack), 5, "the connections_rejected warning")
    [event] = rejection_events(stack)
    assert (event["level"], event["rejected"], event["max_connections"]) == ("warning", 1, CAP)
    assert not any(line.get("url.path") == "/over-cap" for line in stack.proxy.json_lines()), (
        "a refused connection never reaches the pipeline, so it has no access line"
    )


def test_pipelined_requests_are_answered_in_order(stack: Stack) -> None:
    count = 300
    ids = [f"{i + 1:032x}" for i in range(count)]
    before = stack.upstream.count
    with RawConnection(stack.port) as connection:
        connection.send(b"".join(get(f"/pipe/{i}", f"X-Trace-Id: {ids[i]}\r\n".encode())
                                 for i in range(count)))
        for trace_id in ids:
            response = connection.read_response()
            assert response is not None
            assert response.status == 200
            assert response.header("X-Trace-Id") == trace_id
    targets = [r.target for r in stack.upstream.requests[before:]]
    assert targets == [f"/pipe/{i}" for i in range(count)]


def test_pipelined_requests_behind_a_slow_one_keep_their_order(stack: Stack) -> None:
    async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(0.3)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nslow")
        await writer.drain()

    stack.upstream.scripts["/slow-first"] = slow
    with RawConnection(stack.port) as connection:
        connection.send(get("/slow-first") + b"".join(get(f"/after/{i}") for i in range(50)))
        first = connection.read_response()
        assert first is not None
        assert first.body == b"slow"
        for _ in range(50):
            response = connection.read_response()
            assert response is not None
            assert response.body == b"ok"


def test_126_header_fields_pass_and_arrive(stack: Stack) -> None:
    """Host plus 125: the pure-Python parser counts the request line and the blank line against
    max_headers (128), so 126 fields is the most both parsers take (llhttp takes 128; 129 is
    rejected by both: test_request_framing)."""
    extra = b"".join(b"X-H%d: %d\r\n" % (i, i) for i in range(125))
    before = stack.upstream.count
    response, connection = exchange(stack.port, get("/many", extra))
    with connection:
        assert response is not None
        assert response.status == 200
    request = stack.upstream.requests[before]
    assert [request.header(f"X-H{i}") for i in range(125)] == [str(i) for i in range(125)]


def test_header_bytes_over_the_limit_in_many_fields(stack: Stack) -> None:
    """Each field is within the parser's line limit; together they pass max_header_bytes."""
    extra = b"".join(b"X-Big%d: %s\r\n" % (i, b"v" * 2000) for i in range(9))
    before = stack.upstream.count
    response, connection = exchange(stack.port, get("/big-headers", extra))
    with connection:
        assert response is not None
        assert response.status == 431
        assert response.problem()["type"].endswith("headers-too-large")
        assert connection.closed_within(2)
    assert stack.upstream.count == before


def test_large_header_value_under_the_limit_is_relayed_intact(stack: Stack) -> None:
    value = b"v" * 8000
    before = stack.upstream.count
    response, connection = exchange(stack.port, get("/big-value", b"X-Big: " + value + b"\r\n"))
    with connection:
        assert response is not None
        assert response.status == 200
    assert stack.upstream.requests[before].header("X-Big") == value.decode()


def post(path: str, headers: bytes, body: bytes) -> bytes:
    return b"POST " + path.encode() + b" HTTP/1.1\r\nHost: a\r\n" + headers + b"\r\n" + body


def test_declared_body_over_the_limit(stack: Stack) -> None:
    before = stack.upstream.count
    response, connection = exchange(
        stack.port, post("/declared", b"Content-Length: %d\r\n" % (BODY_LIMIT + 1), b"")
    )
    with connection:
        assert response is not None
        assert response.status == 413
        assert connection.closed_within(2)
    assert stack.upstream.count == before


def test_body_at_the_limit_passes(stack: Stack) -> None:
    body = b"b" * BODY_LIMIT
    before = stack.upstream.count
    response, connection = exchange(
        stack.port, post("/at-limit", b"Content-Length: %d\r\n" % len(body), body)
    )
    with connection:
        assert response is not None
        assert response.status == 200
    assert stack.upstream.requests[before].body == body


def test_chunked_body_over_the_limit(stack: Stack) -> None:
    chunk = b"c" * 8192
    body = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(10)) + b"0\r\n\r\n"
    before = stack.upstream.count
    response, connection = exchange(
        stack.port, post("/chunked-over", b"Transfer-Encoding: chunked\r\n", body)
    )
    with connection:
        assert response is not None
        assert response.status == 413
        assert response.problem()["type"].endswith("body-too-large")
        assert connection.closed_within(3)
    # Streaming: the upstream may have seen a head and part of the body, never a whole request.
    assert "/chunked-over" not in [r.target for r in stack.upstream.requests[before:]]


def test_compressed_request_body_is_relayed_as_bytes(stack: Stack) -> None:
    """16 MiB of zeros gzipped fits the 64 KiB limit only if nobody inflates it."""
    assert len(BOMB) < BODY_LIMIT
    before = stack.upstream.count
    response, connection = exchange(
        stack.port,
        post("/bomb-up", b"Content-Encoding: gzip\r\nContent-Length: %d\r\n" % len(BOMB), BOMB),
    )
    with connection:
        assert response is not None
        assert response.status == 200
    request = stack.upstream.requests[before]
    assert request.header("Content-Encoding") == "gzip"
    assert request.body == BOMB


def test_compressed_response_is_relayed_as_bytes(stack: Stack) -> None:
    stack.upstream.scripts["/bomb-down"] = (
        b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Type: application/octet-stream\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(BOMB), BOMB)
    )
    response, connection = exchange(stack.port, get("/bomb-down", b"Accept-Encoding: gzip\r\n"))
    with connection:
        assert response is not None
        assert response.status == 200
        assert response.header("Content-Encoding") == "gzip"
        assert response.header("Content-Length") == str(len(BOMB))
        assert response.body == BOMB
