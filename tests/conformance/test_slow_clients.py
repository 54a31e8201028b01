"""A2 slow clients: slowloris headers, slow body, slow reader and an idle connection are each cut
at their deadline while an ordinary request on another connection is answered promptly."""

from __future__ import annotations

import contextlib
import threading
import time

import pytest

from tests.conformance.conftest import Stack
from tests.support.raw_client import RawConnection, exchange
from tests.support.raw_upstream import endless

DEADLINE = 1.0
LIMITS = {"header_timeout": "1s", "body_timeout": "1s", "write_timeout": "1s"}
# aiohttp drains an unread body for at most server.LINGERING_TIME after an error answer.
SLACK = 2.5
PROMPT = 0.5
BIG = 64 * 1024 * 1024


def assert_prompt_answer(stack: Stack) -> None:
    started = time.monotonic()
    response, connection = exchange(stack.port, b"GET /normal HTTP/1.1\r\nHost: a\r\n\r\n")
    connection.close()
    assert response is not None
    assert response.status == 200
    assert time.monotonic() - started < PROMPT


def trickle(connection: RawConnection, data: bytes, stack: Stack) -> float:
    """Send `data` a byte every 100 ms until the proxy closes; the seconds that took."""
    started = time.monotonic()
    for i, byte in enumerate(data):
        try:
            connection.send(bytes([byte]))
        except OSError:
            break
        if i == 3:
            assert_prompt_answer(stack)
        if connection.closed_within(0.1):
            break
    return time.monotonic() - started


def test_idle_connection_is_closed(stack: Stack) -> None:
    with RawConnection(stack.port) as connection:
        started = time.monotonic()
        assert_prompt_answer(stack)
        assert connection.closed_within(DEADLINE + SLACK)
        assert time.monotonic() - started > DEADLINE * 0.8


def test_slowloris_headers_are_cut_at_header_timeout(stack: Stack) -> None:
    before = stack.upstream.count
    with RawConnection(stack.port) as connection:
        head = b"GET /slow HTTP/1.1\r\nHost: a\r\n" + b"X-A: b\r\n" * 20
        elapsed = trickle(connection, head, stack)
        assert connection.eof
    assert DEADLINE * 0.8 < elapsed < DEADLINE + SLACK
    assert [r.target for r in stack.upstream.requests[before:]] == ["/normal"]


def test_slowloris_on_a_kept_alive_connection(stack: Stack) -> None:
    """After a first answered request, the next head gets the same deadline (the idle timer)."""
    with RawConnection(stack.port) as connection:
        assert connection.still_serves()
        elapsed = trickle(connection, b"GET /second HTTP/1.1\r\nHost: a\r\n" + b"X-A: b\r\n" * 20, stack)
        assert connection.eof
    assert DEADLINE * 0.8 < elapsed < DEADLINE + SLACK


def test_slow_body_gets_408_at_body_timeout(stack: Stack) -> None:
    before = stack.upstream.count
    stop = threading.Event()
    with RawConnection(stack.port) as connection:
        connection.send(b"POST /slow-body HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\n")
        started = time.monotonic()

        def drip() -> None:
            with contextlib.suppress(OSError):
                while not stop.wait(0.1):
                    connection.send(b"x")

        sender = threading.Thread(target=drip)
        sender.start()
        try:
            assert_prompt_answer(stack)
            response = connection.read_response()
            elapsed = time.monotonic() - started
            assert response is not None
            assert response.status == 408
            assert response.problem()["type"].endswith("body-timeout")
            assert connection.closed_within(SLACK)
        finally:
            stop.set()
            sender.join(5)
    assert DEADLINE * 0.8 < elapsed < DEADLINE + SLACK
    # The upstream saw a head and a truncated body, never a complete request it could act on.
    assert "/slow-body" not in [r.target for r in stack.upstream.requests[before:]]


@pytest.fixture
def big_download(stack: Stack) -> threading.Event:
    cut = threading.Event()
    stack.upstream.scripts["/big"] = endless(BIG, cut)
    return cut


def test_slow_reader_is_cut_at_write_timeout(stack: Stack, big_download: threading.Event) -> None:
    with RawConnection(stack.port, rcvbuf=4096) as connection:
        connection.send(b"GET /big HTTP/1.1\r\nHost: a\r\n\r\n")
        started = time.monotonic()
        assert_prompt_answer(stack)
        # The proxy gives up on the client, then drops the upstream exchange it cannot deliver.
        assert big_download.wait(DEADLINE + 10)
        assert time.monotonic() - started > DEADLINE * 0.8
        response = connection.read_response()
        assert response is not None
        assert not response.complete
        assert len(response.body) < BIG
