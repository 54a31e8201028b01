"""The h1 upstream transport, byte for byte against a raw socket upstream: request framing,
response framing, keep-alive reuse rules, flow control, timeouts and error classes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest

from proxy.upstream.h1 import H1Transport
from proxy.upstream.h1_connection import HIGH_WATER, MAX_RESPONSE_HEAD
from proxy.upstream.transport import (
    UpstreamBroken,
    UpstreamNotSent,
    UpstreamResponse,
    UpstreamTimeout,
)
from tests.support.ports import free_port
from tests.support.scripted_upstream import CLOSE, STALL, ScriptedUpstream

MakeTransport = Callable[..., H1Transport]


@pytest.fixture
async def raw() -> AsyncIterator[ScriptedUpstream]:
    upstream = await ScriptedUpstream().start()
    yield upstream
    await upstream.stop()


@pytest.fixture
async def h1() -> AsyncIterator[MakeTransport]:
    made: list[H1Transport] = []

    def factory(url: str, **overrides: float) -> H1Transport:
        options = {"connect_timeout": 1.0, "timeout": 2.0, "max_connections": 8, **overrides}
        transport = H1Transport(
            url,
            connect_timeout=options["connect_timeout"],
            timeout=options["timeout"],
            max_connections=int(options["max_connections"]),
        )
        made.append(transport)
        return transport

    yield factory
    for transport in made:
        await transport.close()


async def read_all(response: UpstreamResponse) -> bytes:
    try:
        return b"".join([chunk async for chunk in response.chunks()])
    finally:
        response.release()


async def parts(*chunks: bytes) -> AsyncIterator[bytes]:
    for chunk in chunks:
        yield chunk


OK_HELLO = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"


# --- request framing -------------------------------------------------------------------------


async def test_get_without_body_is_sent_exactly(raw: ScriptedUpstream, h1: MakeTransport) -> None:
    raw.answer(OK_HELLO)
    response = await h1(raw.url).send("GET", "/a%20b?x=1&y", [("X-One", "1"), ("x-two", "2")], None)
    assert await read_all(response) == b"hello"
    assert raw.requests == [
        f"GET /a%20b?x=1&y HTTP/1.1\r\nHost: 127.0.0.1:{raw.port}\r\n"
        "X-One: 1\r\nx-two: 2\r\n\r\n".encode()
    ]


async def test_base_url_path_prefixes_the_target(raw: ScriptedUpstream, h1: MakeTransport) -> None:
    raw.answer(OK_HELLO)
    await read_all(await h1(raw.url + "/api/").send("GET", "/v1", [], None))
    assert raw.requests[0].startswith(b"GET /api/v1 HTTP/1.1\r\n")


async def test_bytes_body_gets_its_content_length(raw: ScriptedUpstream, h1: MakeTransport) -> None:
    raw.answer(OK_HELLO)
    await read_all(await h1(raw.url).send("POST", "/p", [("Content-Type", "text/plain")], b"abc"))
    assert raw.requests[0].endswith(b"Content-Type: text/plain\r\nContent-Length: 3\r\n\r\nabc")


async def test_post_without_body_says_length_zero(raw: ScriptedUpstream, h1: MakeTransport) -> None:
    raw.answer(OK_HELLO)
    await read_all(await h1(raw.url).send("POST", "/p", [], None))
    assert raw.requests[0].endswith(b"\r\nContent-Length: 0\r\n\r\n")


async def test_stream_without_length_is_chunked(raw: ScriptedUpstream, h1: MakeTransport) -> None:
    raw.answer(OK_HELLO)
    await read_all(await h1(raw.url).send("PUT", "/p", [], parts(b"ab", b"", b"cdefghijklmnopq")))
    assert raw.requests[0].endswith(
        b"\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nab\r\nf\r\ncdefghijklmnopq\r\n0\r\n\r\n"
    )


async def test_stream_with_declared_length_is_sent_raw(raw: ScriptedUpstream, h1: MakeTransport) -> None:
    raw.answer(OK_HELLO)
    headers = [("Content-Length", "6")]
    await read_all(await h1(raw.url).send("POST", "/p", headers, parts(b"abc", b"def")))
    assert raw.requests[0].endswith(b"\r\nContent-Length: 6\r\n\r\nabcdef")
    assert raw.requests[0].count(b"Content-Length") == 1


async def test_stream_longer_than_its_length_is_cut(raw: ScriptedUpstream, h1: MakeTransport) -> None:
    with pytest.raises(UpstreamBroken, match="longer than its Content-Length"):
        await h1(raw.url).send("POST", "/p", [("Content-Length", "2")], parts(b"abc"))


async def test_failing_request_body_is_broken_not_not_sent(
    raw: ScriptedUpstream, h1: MakeTransport
) -> None:
    async def failing() -> AsyncIterator[bytes]:
        yield b"partial"
        raise ConnectionResetError("client went away")

    with pytest.raises(UpstreamBroken) as caught:
        await h1(raw.url).send("POST", "/p", [], failing())
    assert caught.value.sent


async def test_header_bytes_that_are_not_utf8_pass_unchanged(
    raw: ScriptedUpstream, h1: MakeTransport
) -> None:
    # aiohttp's server hands them over as surrogate escapes; aiohttp's client drops them.
    raw.answer(OK_HELLO)
    await read_all(await h1(raw.url).send("GET", "/", [("User-Agent", "a\udcff\tz")], None))
    assert b"\r\nUser-Agent: a\xff\tz\r\n" in raw.requests[0]


@pytest.mark.parametrize("value", ["a\r\nX-Injected: 1", "a\nb", "a\rb"])
async def test_cr_or_lf_in_a_header_is_never_sent(
    raw: ScriptedUpstream, h1: MakeTransport, value: str
) -> None:
    with pytest.raises(UpstreamNotSent):
        await h1(raw.url).send("GET", "/", [("X-Evil", value)], None)
    assert raw.connections == 0


# --- response framing and keep-alive --------------------------------------------------------


async def test_content_length_response_and_reuse(raw: ScriptedUpstream, h1: MakeTransport) -> None:
    raw.answer(b"HTTP/1.1 201 Created Here\r\nX-A: 1\r\nX-A: 2\r\nContent-Length: 3\r\n\r\nabc")
    raw.answer(OK_HELLO)
    transport = h1(raw.url)
    first = await transport.send("GET", "/1", [], None)
    assert (first.status, first.reason, first.content_length) == (201, "Created Here", 3)
    assert first.headers == [("X-A", "1"), ("X-A", "2"), ("Content-Length", "3")]
    assert await read_all(first) == b"abc"
    assert await read_all(await transport.send("GET", "/2", [], None)) == b"hello"
    assert raw.connections == 1


async def test_a_body_that_came_with_its_head_is_taken_whole(
    raw: ScriptedUpstream, h1: MakeTransport
) -> None:
    raw.answer(OK_HELLO)  # one write: the head and the body arrive together
    raw.answer(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
    )
    transport = h1(raw.url)
    response = await transport.send("GET", "/", [], None)
    assert response.whole_body() == b"hello"
    assert await read_all(response) == b""  # taken: nothing is yielded twice
    two_chunks = await transport.send("GET", "/", [], None)
    assert two_chunks.whole_body() is None  # more than one piece: streamed, nothing taken
    assert await read_all(two_chunks) == b"abcde"
    assert raw.connections == 1


async def test_chunked_response_is_decoded_and_reused(raw: ScriptedUpstream, h1: MakeTransport) -> None:
    raw.answer(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3\r\nabc\r\n5;ext=1\r\ndefgh\r\n0\r\nX-Trailer: t\r\n\r\n"
    )
    raw.answer(OK_HELLO)
    transport = h1(raw.url)
    response = await transport.send("GET", "/", [], None)
    assert response.content_length is None
    assert await read_all(response) == b"abcdefgh"
    assert await read_all(await transport.send("GET", "/", [], None)) == b"hello"
    assert raw.connections == 1


async def test_close_delimited_response_reads_to_eof(raw: ScriptedUpstream, h1: MakeTransport) -> None:
    raw.answer(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil the end", close=True)
    raw.answer(OK_HELLO)
    transport = h1(raw.url)
    response = await transport.send("GET", "/", [], None)
    assert response.content_length is None
    assert await read_all(response) == b"until the end"
    assert await read_all(await transport.send("GET", "/", [], None)) == b"hello"
    assert raw.connections == 2


async def test_long_idle_connection_is_not_reused(
    raw: ScriptedUpstream, h1: MakeTransport, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("proxy.upstream.h1.IDLE_TIMEOUT", 0.0)
    raw.answer(OK_HELLO)
    raw.answer(OK_HELLO)
    transport = h1(raw.url)
    await read_all(await transport.send("GET", "/", [], None))
    await read_all(await transport.send("GET", "/", [], None))
    assert raw.connections == 2


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 5\r\n\r\n",
        b"HTTP/1.0 200 OK\r\nContent-Length: 5\r\n\r\n",
    ],
    ids=["connection-close", "http-1.0"],
)
async def test_no_reuse_when_the_upstream_says_so(
    raw: ScriptedUpstream, h1: MakeTransport, head: bytes
) -> None:
    raw.answer(head + b"hello")
    raw.answer(OK_HELLO)
    transport = h1(raw.url)
    assert await read_all(await transport.send("GET", "/", [], None)) == b"hello"
    assert await read_all(await transport.send("GET", "/", [], None)) == b"hello"
    assert raw.connections == 2


async def test_http_1_0_keep_alive_is_honoured(raw: ScriptedUpstream, h1: MakeTransport) -> None:
    raw.answer(b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 5\r\n\r\nhello")
    raw.answer(OK_HELLO)
    transport = h1(raw.url)
    await read_all(await transport.send("GET", "/", [], None))
    await read_all(await transport.send("GET", "/", [], None))
    assert raw.connections == 1


async def test_head_response_has_no_body_whatever_its_length(
    raw: ScriptedUpstream, h1: MakeTransport
) -> None:
    raw.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n")
    raw.answer(OK_HELLO)
    transport = h1(raw.url)
    response = await transport.send("HEAD", "/", [], None)
    assert response.content_length == 1234
    assert await read_all(response) == b""
    assert await read_all(await transport.send("GET", "/", [], None)) == b"hello"
    assert raw.connections == 1


@pytest.mark.parametrize("status", [204, 304])
async def test_204_and_304_have_no_body(raw: ScriptedUpstream, h1: MakeTransport, status: int) -> None:
    raw.answer(f'HTTP/1.1 {status} X\r\nETag: "e"\r\n\r\n'.encode())
    raw.answer(OK_HELLO)
    transport = h1(raw.url)
    response = await transport.send("GET", "/", [], None)
    assert response.status == status
    assert await read_all(response) == b""
    assert await read_all(await transport.send("GET", "/", [], None)) == b"hello"
    assert raw.connections == 1


async def test_interim_responses_are_skipped(raw: ScriptedUpstream, h1: MakeTransport) -> None:
    raw.answer(b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n" + OK_HELLO)
    response = await h1(raw.url).send("GET", "/", [], None)
    assert response.status == 200
    assert response.headers == [("Content-Length", "5")]
    assert await read_all(response) == b"hello"


async def test_unread_body_closes_the_connection(raw: ScriptedUpstream, h1: MakeTransport) -> None:
    raw.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n0123456789")
    raw.answer(OK_HELLO)
    transport = h1(raw.url)
    (await transport.send("GET", "/", [], None)).release()
    assert await read_all(await transport.send("GET", "/", [], None)) == b"hello"
    assert raw.connections == 2


@pytest.mark.parametrize(
    "data",
    [
        b"NOT HTTP AT ALL\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
        b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nBad Header\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX-A: a\x01b\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX-A: a\x00b\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX-A: a\r\n folded\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nabc",
        b"HTTP/1.1 200 OK\nContent-Length: 0\n\n",
    ],
    ids=[
        "garbage",
        "two-lengths",
        "bad-length",
        "bad-header",
        "control-char",
        "nul",
        "obs-fold",
        "te-and-cl",
        "te-not-chunked",
        "bare-lf",
    ],
)
async def test_malformed_response_is_broken(
    raw: ScriptedUpstream, h1: MakeTransport, data: bytes
) -> None:
    raw.answer(data)
    with pytest.raises(UpstreamBroken) as caught:
        await h1(raw.url).send("GET", "/", [], None)
    assert caught.value.sent


async def test_an_oversized_response_head_is_refused_not_buffered(
    raw: ScriptedUpstream, h1: MakeTransport
) -> None:
    cookies = b"".join(b"Set-Cookie: c%d=%s\r\n" % (i, b"v" * 1000) for i in range(80))
    raw.answer(b"HTTP/1.1 200 OK\r\n" + cookies + b"Content-Length: 2\r\n\r\nok")
    with pytest.raises(UpstreamBroken, match=f"larger than {MAX_RESPONSE_HEAD} bytes"):
        await h1(raw.url).send("GET", "/", [], None)
    # Refused while it is still arriving, too: never buffered until it ends.
    raw.answer(b"HTTP/1.1 200 OK\r\nX-Endless: " + b"v" * (2 * MAX_RESPONSE_HEAD), close=False)
    with pytest.raises(UpstreamBroken, match=f"larger than {MAX_RESPONSE_HEAD} bytes"):
        await h1(raw.url).send("GET", "/", [], None)
    # A head just under the limit, arriving with a large body, is fine.
    body = b"x" * (4 * MAX_RESPONSE_HEAD)
    big = b"X-Big: " + b"v" * (MAX_RESPONSE_HEAD - 200) + b"\r\n"
    raw.answer(b"HTTP/1.1 200 OK\r\n" + big + b"Content-Length: %d\r\n\r\n" % len(body) + body)
    response = await h1(raw.url).send("GET", "/", [], None)
    assert await read_all(response) == body


async def test_a_bad_body_arriving_with_the_head_fails_the_send(
    raw: ScriptedUpstream, h1: MakeTransport
) -> None:
    raw.answer(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhello\r\n0\r\n\r\n")
    with pytest.raises(UpstreamBroken, match="malformed"):
        await h1(raw.url).send("GET", "/", [], None)


async def test_close_mid_body_is_broken(raw: ScriptedUpstream, h1: MakeTransport) -> None:
    raw.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly part", close=True)
    response = await h1(raw.url).send("GET", "/", [], None)
    with pytest.raises(UpstreamBroken, match="mid-response"):
        await read_all(response)


# --- stale connections, errors and timeouts ---------------------------------------------------


async def with_stale_connection(raw: ScriptedUpstream, h1: MakeTransport) -> H1Transport:
    """A transport holding one kept-alive connection that the upstream drops at the next request."""
    raw.answer(OK_HELLO)
    raw.answer(CLOSE)
    transport = h1(raw.url)
    await read_all(await transport.send("GET", "/", [], None))
    return transport


@pytest.mark.parametrize("method", ["GET", "HEAD", "OPTIONS", "TRACE"])
async def test_stale_reused_connection_is_resent_once_when_safe(
    raw: ScriptedUpstream, h1: MakeTransport, method: str
) -> None:
    transport = await with_stale_connection(raw, h1)
    raw.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    await read_all(await transport.send(method, "/again", [], None))
    assert raw.connections == 2
    assert [r.split(b" ")[1] for r in raw.requests] == [b"/", b"/again", b"/again"]


@pytest.mark.parametrize(
    ("method", "headers", "body"),
    [
        ("POST", [], b"pay"),
        ("PUT", [], b"two"),
        ("DELETE", [], None),
        ("PATCH", [], b"two"),
        ("POST", [("Idempotency-Key", "k1")], b"pay"),
        ("GET", [("Idempotency-Key", "k1")], None),
        ("GET", [("x-idempotency-key", "k1")], None),
        ("GET", [], b"body"),
    ],
    ids=["post", "put", "delete", "patch", "post-with-key", "get-with-key",
         "get-with-x-key", "get-with-body"],
)
async def test_stale_reused_connection_is_not_resent_unless_safe_to_repeat(
    raw: ScriptedUpstream, h1: MakeTransport, method: str, headers: list[tuple[str, str]],
    body: bytes | None,
) -> None:
    """Issue 13: the upstream may have read (and executed) the first copy. Only a safe method
    without a body and without an idempotency key is sent again; everything else is ambiguous."""
    transport = await with_stale_connection(raw, h1)
    with pytest.raises(UpstreamBroken, match="not safe to repeat") as caught:
        await transport.send(method, "/", headers, body)
    assert caught.value.sent  # it may have run: ambiguous, never silently repeated
    assert raw.connections == 1


async def test_stale_reused_connection_with_a_streamed_body_is_not_resent(
    raw: ScriptedUpstream, h1: MakeTransport
) -> None:
    transport = await with_stale_connection(raw, h1)
    with pytest.raises(UpstreamBroken) as caught:
        await transport.send("PUT", "/", [("Idempotency-Key", "k")], parts(b"streamed"))
    assert caught.value.sent
    assert raw.connections == 1


async def test_fresh_connection_closed_without_answer_is_broken(
    raw: ScriptedUpstream, h1: MakeTransport
) -> None:
    raw.answer(CLOSE)
    with pytest.raises(UpstreamBroken) as caught:
        await h1(raw.url).send("GET", "/", [], None)
    assert caught.value.sent
    assert len(raw.requests) == 1


async def test_refused_connection_is_not_sent(h1: MakeTransport) -> None:
    with pytest.raises(UpstreamNotSent) as caught:
        await h1(f"http://127.0.0.1:{free_port()}").send("POST", "/", [], b"x")
    assert not caught.value.sent


async def test_silent_upstream_times_out(raw: ScriptedUpstream, h1: MakeTransport) -> None:
    raw.answer(STALL)
    with pytest.raises(UpstreamTimeout):
        await h1(raw.url, timeout=0.3).send("GET", "/", [], None)


async def test_timeout_covers_the_body(raw: ScriptedUpstream, h1: MakeTransport) -> None:
    raw.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nslow")
    raw.answer(STALL)
    response = await h1(raw.url, timeout=0.3).send("GET", "/", [], None)
    with pytest.raises(UpstreamTimeout):
        await read_all(response)


async def test_pool_limit_waits_then_gives_up_before_sending(
    raw: ScriptedUpstream, h1: MakeTransport
) -> None:
    raw.answer(OK_HELLO)
    transport = h1(raw.url, max_connections=1, timeout=0.3)
    held = await transport.send("GET", "/", [], None)
    with pytest.raises(UpstreamNotSent, match="no free connection"):
        await transport.send("GET", "/", [], None)
    assert await read_all(held) == b"hello"
    assert await read_all(await transport.send("GET", "/", [], None)) == b""
    assert len(raw.requests) == 2


async def test_a_released_slot_goes_to_the_waiting_request(
    raw: ScriptedUpstream, h1: MakeTransport
) -> None:
    raw.answer(OK_HELLO)
    raw.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nnext")
    transport = h1(raw.url, max_connections=1)
    held = await transport.send("GET", "/", [], None)
    waiting = asyncio.create_task(transport.send("GET", "/", [], None))
    await asyncio.sleep(0)  # let it queue for the slot
    assert not waiting.done()
    assert await read_all(held) == b"hello"
    assert await read_all(await asyncio.wait_for(waiting, 2)) == b"next"
    assert raw.connections == 1


async def test_early_answer_stops_the_request_body(raw: ScriptedUpstream, h1: MakeTransport) -> None:
    started = asyncio.Event()

    async def endless() -> AsyncIterator[bytes]:
        while True:
            started.set()
            yield b"x" * 65536
            await asyncio.sleep(0)

    # The upstream answers 413 after the head, never reading the body.
    server = await asyncio.start_server(
        lambda r, w: _answer_after_head(r, w, b"HTTP/1.1 413 Too Big\r\nContent-Length: 0\r\n\r\n"),
        "127.0.0.1",
        0,
    )
    port = server.sockets[0].getsockname()[1]
    try:
        transport = h1(f"http://127.0.0.1:{port}")
        response = await transport.send("POST", "/", [("Content-Length", str(1 << 40))], endless())
        assert response.status == 413
        assert started.is_set()
        assert await read_all(response) == b""
    finally:
        server.close()


async def _answer_after_head(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, answer: bytes
) -> None:
    await reader.readuntil(b"\r\n\r\n")
    writer.write(answer)
    await writer.drain()
    await asyncio.sleep(1)
    writer.close()


# --- flow control -----------------------------------------------------------------------------


async def test_slow_consumer_pauses_reading(h1: MakeTransport) -> None:
    size = 64 * 1024 * 1024
    sent = 0

    async def big(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal sent
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
        block = b"y" * 65536
        for _ in range(size // len(block)):
            writer.write(block)
            sent += len(block)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(big, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        response = await h1(f"http://127.0.0.1:{port}", timeout=20.0).send("GET", "/", [], None)
        conn = response._conn  # type: ignore[attr-defined]
        deadline = asyncio.get_running_loop().time() + 5
        while not conn.reading_paused:  # poll with a deadline: nobody consumes the body
            assert asyncio.get_running_loop().time() < deadline, "reading never paused"
            await asyncio.sleep(0.01)
        assert conn.buffered <= HIGH_WATER + 512 * 1024
        assert sent < size  # the upstream is held back by TCP, not buffered by us
        assert len(await read_all(response)) == size
    finally:
        server.close()
