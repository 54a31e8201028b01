"""A3 response side: malformed, smuggling-shaped or endless upstream answers never reach the
client as a broken response; before any header went out they become 502/504 problem+json."""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.conformance.conftest import Stack
from tests.support.raw_client import RawConnection, exchange
from tests.support.raw_upstream import Script, stall_after

UPSTREAM = {"timeout": "500ms"}
TIMEOUT = 0.5


async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Read the request, answer nothing, close."""


def head(*lines: str, body: bytes = b"") -> bytes:
    return ("HTTP/1.1 200 OK\r\n" + "".join(line + "\r\n" for line in lines) + "\r\n").encode(
        "latin-1"
    ) + body


SCRIPTS: dict[str, Script] = {
    "/te-cl": head("Transfer-Encoding: chunked", "Content-Length: 5",
                   body=b"5\r\nhello\r\n0\r\n\r\n"),
    "/ctl-value": head("X-A: b\x01c", "Content-Length: 2", body=b"ok"),
    "/cr-injection": head("X-A: b\rSet-Cookie: evil=1", "Content-Length: 2", body=b"ok"),
    "/nul-value": head("X-A: b\x00c", "Content-Length: 2", body=b"ok"),
    "/bad-chunk-size": head("Transfer-Encoding: chunked", body=b"zz\r\nhello\r\n0\r\n\r\n"),
    "/chunk-too-long": head("Transfer-Encoding: chunked", body=b"2\r\nhello\r\n0\r\n\r\n"),
    "/hang-up": hang_up,
    "/head-then-stall": stall_after(head("Content-Length: 10")),
    "/partial-then-stall": stall_after(head("Content-Length: 10", body=b"hello")),
    "/chunk-then-stall": stall_after(head("Transfer-Encoding: chunked", body=b"5\r\nhello\r\n")),
    "/hop-by-hop": head(
        "Connection: X-Secret", "X-Secret: s", "Keep-Alive: timeout=5",
        "Proxy-Authenticate: Basic", "Trailer: X-T", "Upgrade: h2c", "X-Kept: yes",
        "Content-Length: 2", body=b"ok",
    ),
    "/redirect": b"HTTP/1.1 302 Found\r\nLocation: http://127.0.0.1:1/elsewhere\r\n"
                 b"Content-Length: 0\r\n\r\n",
    "/obs-fold": head("X-A: b", " c", "Content-Length: 2", body=b"ok"),
    "/bare-lf": b"HTTP/1.1 200 OK\nX-A: b\nContent-Length: 2\n\nok",
    "/chunk-size-space": head("Transfer-Encoding: chunked", body=b"5 \r\nhello\r\n0\r\n\r\n"),
    "/cl-short": head(
        "Content-Length: 2", body=b"helloHTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nevil"
    ),
    "/te-chunked-relayed": head("Transfer-Encoding: chunked", body=b"5\r\nhello\r\n0\r\n\r\n"),
}


@pytest.fixture(autouse=True)
def scripts(stack: Stack) -> None:
    stack.upstream.scripts.update(SCRIPTS)


def get(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: a\r\n\r\n".encode()


@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("/te-cl", 502),
        ("/ctl-value", 502),
        ("/cr-injection", 502),
        ("/nul-value", 502),
        ("/bad-chunk-size", 502),
        ("/chunk-too-long", 502),
        ("/hang-up", 502),
        ("/head-then-stall", 504),
    ],
)
def test_bad_upstream_answer_becomes_problem(stack: Stack, path: str, status: int) -> None:
    started = time.monotonic()
    response, connection = exchange(stack.port, get(path))
    with connection:
        assert response is not None
        assert response.status == status
        assert response.complete
        problem = response.problem()
        assert len(problem["trace_id"]) == 32
        assert response.header("Set-Cookie") is None
        assert response.header("X-A") is None
    assert time.monotonic() - started < TIMEOUT + 3


@pytest.mark.parametrize("path", ["/partial-then-stall", "/chunk-then-stall"])
def test_stall_after_first_bytes_cuts_the_client(stack: Stack, path: str) -> None:
    """Headers are out: the proxy cannot change the status, so the client sees a cut, never a
    response that looks complete."""
    started = time.monotonic()
    response, connection = exchange(stack.port, get(path))
    with connection:
        assert response is not None
        assert response.status == 200
        assert response.body == b"hello"
        assert not response.complete
        assert connection.eof
    assert TIMEOUT * 0.9 < time.monotonic() - started < TIMEOUT + 3


def test_hop_by_hop_response_headers_are_stripped(stack: Stack) -> None:
    response, connection = exchange(stack.port, get("/hop-by-hop"))
    with connection:
        assert response is not None
        assert response.status == 200
        for name in ("X-Secret", "Keep-Alive", "Proxy-Authenticate", "Trailer", "Upgrade"):
            assert response.header(name) is None, name
        assert response.header("Connection") in (None, "keep-alive")
        assert response.header("X-Kept") == "yes"
        assert response.body == b"ok"


def test_redirect_is_relayed_not_followed(stack: Stack) -> None:
    before = stack.upstream.count
    response, connection = exchange(stack.port, get("/redirect"))
    with connection:
        assert response is not None
        assert response.status == 302
        assert response.header("Location") == "http://127.0.0.1:1/elsewhere"
    assert stack.upstream.count == before + 1


def test_upstream_chunked_is_reframed(stack: Stack) -> None:
    response, connection = exchange(stack.port, get("/te-chunked-relayed"))
    with connection:
        assert response is not None
        assert response.status == 200
        assert response.complete
        assert response.body == b"hello"
        assert connection.still_serves()


def test_bad_answers_do_not_poison_the_pool(stack: Stack) -> None:
    """After every failure above, an ordinary request on a fresh client still gets its 200."""
    for path in SCRIPTS:
        exchange(stack.port, get(path), timeout=TIMEOUT + 3)[1].close()
    with RawConnection(stack.port) as connection:
        assert connection.still_serves()



@pytest.mark.parametrize("path", ["/obs-fold", "/bare-lf", "/chunk-size-space"])
def test_lenient_upstream_syntax_is_refused(stack: Stack, path: str) -> None:
    """Obsolete or lenient upstream syntax (obs-fold, bare LF, space after a chunk size) is
    refused by the strict default transport (llhttp, RFC 9112 §5.2 allows 502) with a problem
    answer; it never turns into a malformed downstream message, and the connection serves on."""
    response, connection = exchange(stack.port, get(path))
    with connection:
        assert response is not None
        assert response.status == 502
        response.problem()
        assert connection.still_serves()


def test_extra_bytes_after_the_body_never_answer_another_request(stack: Stack) -> None:
    """Response splitting: bytes beyond Content-Length must not become the next response."""
    response, connection = exchange(stack.port, get("/cl-short"))
    with connection:
        assert response is not None
        if response.status == 502:
            response.problem()
        else:
            assert (response.status, response.body) == (200, b"he")
    for _ in range(3):
        follow_up, connection = exchange(stack.port, get("/after"))
        connection.close()
        assert follow_up is not None
        assert (follow_up.status, follow_up.body) == (200, b"ok")
