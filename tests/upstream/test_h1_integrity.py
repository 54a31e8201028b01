"""The h1 client's one-response-per-connection rule against raw socket upstreams: every byte
outside a response's framing discards the connection and is reported, and never becomes part
of this response or the next one's (by exact status, headers and body)."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import AsyncIterator, Iterator

import pytest

from proxy.upstream.h1 import H1Transport
from proxy.upstream.h1_state import Violation
from proxy.upstream.transport import UpstreamResponse
from tests.support.eventually import eventually
from tests.support.scripted_upstream import ScriptedUpstream

LENGTH = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
SECOND = b"HTTP/1.1 201 Created\r\nSet-Cookie: evil=1\r\nContent-Length: 4\r\n\r\nevil"
NEXT = b"HTTP/1.1 202 Accepted\r\nX-Next: 1\r\nContent-Length: 4\r\n\r\nnext"
NEXT_SEEN = (202, "Accepted", [("X-Next", "1"), ("Content-Length", "4")], b"next")


@pytest.fixture
async def raw() -> AsyncIterator[ScriptedUpstream]:
    upstream = await ScriptedUpstream().start()
    yield upstream
    await upstream.stop()


class Reported(list[Violation]):
    def __call__(self, violation: Violation) -> None:
        self.append(violation)


async def seen(response: UpstreamResponse) -> tuple[object, ...]:
    try:
        body = b"".join([chunk async for chunk in response.chunks()])
    finally:
        response.release()
    return response.status, response.reason, response.headers, body


# (method, answer, what the client gets, reason when extra bytes follow)
FRAMINGS = {
    "length": ("GET", LENGTH, (200, "OK", [("Content-Length", "2")], b"ok"),
               Violation.EXTRA_BYTES),
    "chunked": ("GET", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
                (200, "OK", [("Transfer-Encoding", "chunked")], b"ok"), Violation.EXTRA_BYTES),
    "chunked-trailer": (
        "GET", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\nT: t\r\n\r\n",
        (200, "OK", [("Transfer-Encoding", "chunked"), ("T", "t")], b"ok"),
        Violation.EXTRA_BYTES),
    "crlf-body": ("GET", b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\n\r\n\r\n",
                  (200, "OK", [("Content-Length", "4")], b"\r\n\r\n"), Violation.EXTRA_BYTES),
    "204": ("GET", b"HTTP/1.1 204 No Content\r\nContent-Length: 6\r\n\r\n",
            (204, "No Content", [("Content-Length", "6")], b""), Violation.BODY_NOT_ALLOWED),
    "304": ("GET", b"HTTP/1.1 304 Not Modified\r\nContent-Length: 6\r\n\r\n",
            (304, "Not Modified", [("Content-Length", "6")], b""), Violation.BODY_NOT_ALLOWED),
    "head": ("HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n",
             (200, "OK", [("Content-Length", "5")], b""), Violation.BODY_NOT_ALLOWED),
}
EXTRAS = {
    "second-head": SECOND,
    "continue": b"HTTP/1.1 100 Continue\r\n\r\n",
    "crlf": b"\r\n",
    "lf": b"\n",
    "body": b"hello",
    "cr-then-head": b"\r" + SECOND,
}


@pytest.mark.parametrize("extra", sorted(EXTRAS))
@pytest.mark.parametrize("framing", sorted(FRAMINGS))
async def test_extra_bytes_in_the_same_read_discard_the_connection(
    raw: ScriptedUpstream, framing: str, extra: str
) -> None:
    method, answer, expected, reason = FRAMINGS[framing]
    raw.answer(answer + EXTRAS[extra])
    raw.answer(NEXT)
    report = Reported()
    transport = H1Transport(raw.url, connect_timeout=1, timeout=2, max_connections=4,
                            report=report)
    try:
        assert await seen(await transport.send(method, "/a", [], None)) == expected
        assert await seen(await transport.send("GET", "/b", [], None)) == NEXT_SEEN
    finally:
        await transport.close()
    assert report == [reason]
    assert raw.connections == 2


@pytest.mark.parametrize("framing", sorted(FRAMINGS))
async def test_a_clean_response_keeps_its_connection(raw: ScriptedUpstream, framing: str) -> None:
    """The control: without extra bytes nothing is reported and the connection is reused."""
    method, answer, expected, _ = FRAMINGS[framing]
    raw.answer(answer)
    raw.answer(NEXT)
    report = Reported()
    transport = H1Transport(raw.url, connect_timeout=1, timeout=2, max_connections=4,
                            report=report)
    try:
        assert await seen(await transport.send(method, "/a", [], None)) == expected
        assert await seen(await transport.send("GET", "/b", [], None)) == NEXT_SEEN
    finally:
        await transport.close()
    assert (report, raw.connections) == ([], 1)


async def test_interim_heads_cannot_change_the_final_response(raw: ScriptedUpstream) -> None:
    raw.answer(
        b"HTTP/1.1 100 Continue\r\nSet-Cookie: a=1\r\n\r\nHTTP/1.1 103 Early Hints\r\n"
        b"Link: </x>\r\n\r\nHTTP/1.1 102 Processing\r\n\r\n" + LENGTH
    )
    report = Reported()
    transport = H1Transport(raw.url, connect_timeout=1, timeout=2, max_connections=4,
                            report=report)
    try:
        assert await seen(await transport.send("GET", "/", [], None)) == (
            200, "OK", [("Content-Length", "2")], b"ok"
        )
    finally:
        await transport.close()
    assert report == []


async def test_extra_bytes_after_the_head_was_handed_over(raw: ScriptedUpstream) -> None:
    """Bytes arriving in a later read, after the response is complete but before release."""
    transport = H1Transport(raw.url, connect_timeout=1, timeout=2, max_connections=4,
                            report=(report := Reported()))
    raw.answer(LENGTH)
    raw.answer(NEXT)
    try:
        response = await transport.send("GET", "/a", [], None)
        writer = raw._writers[0]
        writer.write(SECOND)
        await eventually(lambda: asyncio.sleep(0, report), 2, "the report")
        assert await seen(response) == (200, "OK", [("Content-Length", "2")], b"ok")
        assert await seen(await transport.send("GET", "/b", [], None)) == NEXT_SEEN
    finally:
        await transport.close()
    assert report == [Violation.EXTRA_BYTES]


async def test_bytes_on_an_idle_pooled_connection(raw: ScriptedUpstream) -> None:
    transport = H1Transport(raw.url, connect_timeout=1, timeout=2, max_connections=4,
                            report=(report := Reported()))
    raw.answer(LENGTH)
    raw.answer(NEXT)
    try:
        await seen(await transport.send("GET", "/a", [], None))
        raw._writers[0].write(SECOND)
        await eventually(lambda: asyncio.sleep(0, report), 2, "the report")
        assert await seen(await transport.send("GET", "/b", [], None)) == NEXT_SEEN
    finally:
        await transport.close()
    assert (report, raw.connections) == ([Violation.IDLE_BYTES], 2)


class ThreadUpstream:
    """A blocking upstream in its own thread, so bytes can land in the proxy's socket while
    the proxy's event loop is not running (it has not read them yet at reuse)."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.late = threading.Event()
        self.sent = threading.Event()
        self.connections = 0
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        first, _ = self.listener.accept()
        self.connections += 1
        first.recv(65536)
        first.sendall(LENGTH)
        self.late.wait(5)
        first.sendall(SECOND)
        self.sent.set()
        self.listener.settimeout(5)
        try:
            second, _ = self.listener.accept()
        except TimeoutError:
            return
        self.connections += 1
        second.recv(65536)
        second.sendall(NEXT)
        second.close()
        first.close()


@pytest.fixture
def threaded() -> Iterator[ThreadUpstream]:
    upstream = ThreadUpstream()
    yield upstream
    upstream.late.set()
    upstream.listener.close()
    upstream.thread.join(5)


async def test_bytes_waiting_in_the_socket_at_reuse(threaded: ThreadUpstream) -> None:
    """The late bytes are in the kernel's buffer but the loop has not delivered them: without
    the check at checkout the reused connection would read them as the next answer."""
    transport = H1Transport(f"http://127.0.0.1:{threaded.port}", connect_timeout=1, timeout=2,
                            max_connections=4, report=(report := Reported()))
    try:
        await seen(await transport.send("GET", "/a", [], None))
        threaded.late.set()
        assert threaded.sent.wait(5)  # blocks the loop on purpose: nothing is read meanwhile
        assert await seen(await transport.send("GET", "/b", [], None)) == NEXT_SEEN
    finally:
        await transport.close()
    assert (report, threaded.connections) == ([Violation.IDLE_BYTES], 2)
