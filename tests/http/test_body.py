"""Reading the request body: a body that arrived whole with its head is taken at once, one still
arriving is read as it comes, and both give the same bytes and the same refusals."""

from __future__ import annotations

import asyncio

import pytest

from proxy.http import body
from proxy.http.context import RequestContext
from proxy.http.request import HTTP_10, HTTP_11, Body, Request, Version

PIECES = [b'{"amount":', b"1000", b',"note":"', b"x" * 300, b'"}']
WHOLE = b"".join(PIECES)


class Channel:
    """The connection as the body reader sees it: what was written to the client."""

    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.transport = None

    def write(self, data: bytes) -> None:
        self.written.append(data)

    async def drain(self) -> None: ...

    def abort(self) -> None: ...


def context(content: Body, expect: bool = False, version: Version = HTTP_11
            ) -> tuple[RequestContext, Channel]:
    channel = Channel()
    headers = ((b"Host", b"a"), *([(b"Expect", b"100-continue")] if expect else []))
    request = Request("POST", "/", "", version, headers, "127.0.0.1", channel, content)
    return RequestContext(request, "127.0.0.1"), channel


def arrived(pieces: list[bytes], high: int = 1 << 20) -> Body:
    content = Body(high)
    for piece in pieces:
        content.feed(piece)
    content.feed_eof()
    return content


async def read_while_arriving(pieces: list[bytes], max_size: int, expect: bool = False
                              ) -> tuple[RequestContext, Channel, asyncio.Task[bytes]]:
    content = Body(high=1 << 20)
    ctx, channel = context(content, expect)
    reading = asyncio.ensure_future(body.read(ctx, max_size, timeout=5))
    for piece in pieces:
        await asyncio.sleep(0)  # the reader waits for each piece
        assert not reading.done()
        content.feed(piece)
    content.feed_eof()
    await asyncio.wait([reading], timeout=5)
    return ctx, channel, reading


@pytest.mark.parametrize("pieces", [PIECES, [WHOLE], [b""], []], ids=["pieces", "one", "empty-chunk", "none"])
async def test_an_arrived_body_is_read_whole_with_its_size(pieces: list[bytes]) -> None:
    content = arrived(pieces)
    ctx, channel = context(content)
    expected = b"".join(pieces)
    assert await body.read(ctx, len(expected) or 1, timeout=5) == expected
    assert ctx.request_body_size == len(expected)
    assert content.complete, "nothing of the body is left for another reader"
    assert channel.written == []


async def test_a_body_still_arriving_reads_the_same_bytes() -> None:
    ctx, _, reading = await read_while_arriving(PIECES, len(WHOLE))
    assert reading.result() == WHOLE
    assert ctx.request_body_size == len(WHOLE)


@pytest.mark.parametrize("whole", [True, False], ids=["arrived", "arriving"])
async def test_a_body_one_byte_over_the_limit_is_refused(whole: bool) -> None:
    limit = len(WHOLE) - 1
    if whole:
        ctx, _ = context(arrived(PIECES))
        with pytest.raises(body.BodyTooLarge):
            await body.read(ctx, limit, timeout=5)
    else:
        ctx, _, reading = await read_while_arriving(PIECES, limit)
        assert isinstance(reading.exception(), body.BodyTooLarge)
    assert ctx.error_type == "request_body_too_large"
    assert isinstance(ctx.request_error, body.BodyTooLarge)


@pytest.mark.parametrize("whole", [True, False], ids=["arrived", "arriving"])
async def test_100_continue_is_sent_once_before_the_body_is_read(whole: bool) -> None:
    if whole:
        ctx, channel = context(arrived(PIECES), expect=True)
        assert await body.read(ctx, len(WHOLE), timeout=5) == WHOLE
    else:
        ctx, channel, reading = await read_while_arriving(PIECES, len(WHOLE), expect=True)
        assert reading.result() == WHOLE
    assert channel.written == [b"HTTP/1.1 100 Continue\r\n\r\n"]


async def test_an_http10_client_gets_no_100_continue() -> None:
    ctx, channel = context(arrived(PIECES), expect=True, version=HTTP_10)
    assert await body.read(ctx, len(WHOLE), timeout=5) == WHOLE
    assert channel.written == []


async def test_no_body_reads_empty() -> None:
    request = Request("POST", "/", "", HTTP_11, ((b"Host", b"a"),), "127.0.0.1", None, None)
    assert await body.read(RequestContext(request, "127.0.0.1"), 10, timeout=5) == b""


@pytest.mark.parametrize("reader", ["read", "stream"])
async def test_reading_a_body_over_the_high_water_mark_resumes_the_connection(reader: str) -> None:
    """The server stops reading the socket once more than `high` bytes wait; reading the body
    must hand reading back, also when the body ended in the same read that crossed the mark
    (or the connection's next request is never read). `read` takes such a body whole."""
    content = arrived(PIECES, high=len(WHOLE) // 2)
    assert content.buffered > content.high, "over the mark: the server has paused"
    resumed: list[int] = []
    content.on_drained = lambda: resumed.append(content.buffered)
    ctx, _ = context(content)
    if reader == "read":
        got = await body.read(ctx, len(WHOLE), timeout=5)
    else:
        got = b"".join([chunk async for chunk in body.stream(ctx, len(WHOLE), timeout=5)])
    assert got == WHOLE
    assert len(resumed) == 1, "reading resumed once"
    assert content.complete and content.buffered == 0
