"""One upstream HTTP/1.1 connection (asyncio.Protocol + llhttp via httptools) and the state of
the single exchange running on it.

The integrity rule: a connection carries exactly one response at a time. Any byte the upstream
sends outside the framing of the response it is answering (after its declared end, after a
bodiless 204/304/HEAD head, a second or interim head after the final one, or anything while the
connection sits idle in the pool) is a protocol violation: the connection is closed at once, the
bytes are dropped unread, and `report` hears about it. The response that was complete before the
violation is still relayed whole; nothing after its end reaches any client.
"""

from __future__ import annotations

import asyncio
import select
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator
from typing import cast

import httptools

from proxy.http.headers import Headers
from proxy.upstream.h1_state import BODY, DONE, FAILED, IDLE, WAITING, Report, Stale, Violation
from proxy.upstream.transport import UpstreamBroken, UpstreamError, UpstreamTimeout

# Buffered response bytes at which reading from the upstream pauses, and resumes.
HIGH_WATER = 256 * 1024
LOW_WATER = 64 * 1024
# A response head larger than this is refused (502) rather than buffered: Envoy's default
# max_response_headers_kb is 60, nginx's proxy_buffer_size a few KiB.
MAX_RESPONSE_HEAD = 64 * 1024
_CRLF = b"\r\n"


class _Beyond(Exception):
    """Raised from a parser callback to stop llhttp at the end of the final response."""


class Connection(asyncio.Protocol):
    """One upstream connection and the state of the exchange running on it."""

    def __init__(self, loop: asyncio.AbstractEventLoop, report: Report) -> None:
        self.loop = loop
        self.report = report
        self.transport: asyncio.Transport | None = None
        self.fd = -1  # the plain TCP socket's descriptor, for the check at reuse (-1: TLS)
        self.poller: select.poll | None = None  # watches `fd` (made once: half the cost)
        self.state = IDLE
        self.closed = False
        self.parser: httptools.HttpResponseParser | None = None
        self.reused = False
        self.idle_since = 0.0
        self.head_only = False
        self.head_size = 0  # header bytes parsed so far
        self.head_received = 0  # bytes received while no final head was complete
        self.status = 0
        self.reason = ""
        self.headers: Headers = []
        self.content_length: int | None = None
        self.delimited = False  # framed by Content-Length or chunked (else: until close)
        self.body_left: int | None = None  # Content-Length body bytes still to come
        self.head: asyncio.Future[None] | None = None
        self.body: deque[bytes] = deque()
        self.buffered = 0
        self.keep_alive = False
        self.sent_all = False
        self.error: UpstreamError | Stale | None = None
        self.waiter: asyncio.Future[None] | None = None
        self.reading_paused = False
        self.writing_paused = False

    # --- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        if transport.get_extra_info("sslcontext") is None:
            sock = transport.get_extra_info("socket")
            if sock is not None:
                self.fd = sock.fileno()
                self.poller = select.poll()
                self.poller.register(self.fd, select.POLLIN)

    def data_received(self, data: bytes) -> None:
        state = self.state
        parser = self.parser
        if parser is None or (state is not WAITING and state is not BODY):
            if state is not FAILED:
                self.violate(self._stray())
            return
        if state is WAITING:
            self.head_received += len(data)
        try:
            used = self._feed(parser, data)
        except httptools.HttpParserUpgrade:
            self._fail(UpstreamBroken("the upstream switched protocols"))
            return
        except httptools.HttpParserError as exc:
            if self.state is DONE:
                self.violate(self._stray())  # stopped by _Beyond, or llhttp's own error
            elif self.state is not FAILED:
                self._fail(UpstreamBroken(f"malformed upstream response: {exc}"))
            return
        if self.state is DONE and used < len(data):
            self.violate(self._stray())
        elif self.head_size > MAX_RESPONSE_HEAD or (
            self.state is WAITING and self.head_received > MAX_RESPONSE_HEAD
        ):
            self._fail(UpstreamBroken(
                f"upstream response head larger than {MAX_RESPONSE_HEAD} bytes"
            ))

    def _feed(self, parser: httptools.HttpResponseParser, data: bytes) -> int:
        """Feed `data` to llhttp up to the end of the response at most; return the bytes used.

        llhttp parses on past the end of a message, into the next one: a byte that starts
        another message stops it (_Beyond from on_message_begin), but CR and LF between
        messages it skips silently. So the end must never fall inside one feed followed only by
        CR/LF: a Content-Length body is fed exactly to its end, and a trailing run of CR/LF
        (where a head or a chunked body ends) one byte at a time, stopping at the end.
        """
        size = len(data)
        end = len(data.rstrip(_CRLF))
        used = 0
        while used < size and (self.state is WAITING or self.state is BODY):
            left = self.body_left
            if left is not None and self.state is BODY:
                step = min(left, size - used)
            elif used < end:
                step = end - used
            else:
                step = 1
            parser.feed_data(data if step == size else memoryview(data)[used : used + step])
            used += step
        return used

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        state = self.state
        if state is not WAITING and state is not BODY:
            return
        if state is WAITING and not self.head_received:
            if self.reused:
                self._fail(Stale())
            else:
                self._fail(UpstreamBroken("the upstream closed the connection without answering"))
        elif state is BODY and not self.delimited:
            self.keep_alive = False
            self._finish()  # a close-delimited body ends here
        else:
            self._fail(UpstreamBroken("the upstream closed the connection mid-response"))

    def pause_writing(self) -> None:
        self.writing_paused = True

    def resume_writing(self) -> None:
        self.writing_paused = False
        self._wake()

    # --- llhttp callbacks ------------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.state is DONE:
            raise _Beyond  # a second head (a stray 100 Continue too) or garbage: stop here

    def on_status(self, reason: bytes) -> None:
        self.reason = reason.decode("latin-1")

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.decode("latin-1"), value.decode("latin-1")))
        self.head_size += len(name) + len(value)

    def on_headers_complete(self) -> None:
        assert self.parser is not None
        status = self.parser.get_status_code()
        if status < 200:
            # 100 Continue, 103 Early Hints: interim, not relayed; the real head follows. The
            # state stays WAITING, so an interim head can never touch a final response.
            self.headers = []
            return
        self.status = status
        length: int | None = None
        chunked = False
        for name, value in self.headers:
            lowered = name.lower()
            if lowered == "content-length":
                length = int(value)
            elif lowered == "transfer-encoding":
                if value.rpartition(",")[2].strip().lower() != "chunked":
                    # Only chunked is decoded; relaying other codings raw would corrupt the body.
                    self._fail(UpstreamBroken(f"unsupported Transfer-Encoding {value!r}"))
                    return
                chunked = True
        self.content_length = self.body_left = None if chunked else length
        self.delimited = chunked or length is not None or status in (204, 304)
        self.state = BODY
        if self.head is not None and not self.head.done():
            self.head.set_result(None)
        if self.head_only:
            # A HEAD response has no body whatever its headers say; llhttp cannot be told so,
            # so the exchange ends here and any body llhttp goes on to parse is a violation.
            self.keep_alive = self.parser.should_keep_alive() and self.delimited
            self._finish()
        self._wake()

    def on_body(self, chunk: bytes) -> None:
        if self.state is not BODY:
            raise _Beyond  # a body after a HEAD response's head
        self.body.append(chunk)
        self.buffered += len(chunk)
        if self.body_left is not None:
            self.body_left -= len(chunk)
        if self.buffered > HIGH_WATER and not self.reading_paused and self.transport:
            self.reading_paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if self.state is BODY:
            assert self.parser is not None
            self.keep_alive = self.parser.should_keep_alive()
            self._finish()
        # WAITING: the end of an interim head; the final one follows.

    # --- the exchange ----------------------------------------------------------------------

    def begin(self, head_only: bool) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.state = WAITING
        self.head_only = head_only
        self.sent_all = False
        self.head_size = self.head_received = 0
        self.body_left = None
        self.keep_alive = False
        self.headers = []
        self.body.clear()
        self.buffered = 0
        self.error = None
        self.head = self.loop.create_future()

    def write(self, head: bytes, body: bytes | None) -> None:
        assert self.transport is not None
        self.transport.write(head + body if body else head)
        self.sent_all = True

    async def stream(self, head: bytes, body: AsyncIterable[bytes], length: int | None) -> None:
        """Write the head, then the body as it comes (chunked unless `length` is declared)."""
        transport = self.transport
        assert transport is not None
        transport.write(head)
        written = 0
        try:
            async for chunk in body:
                if self.state is not WAITING:
                    return  # the upstream answered (or failed) before taking the whole body
                if not chunk:
                    continue
                written += len(chunk)
                if length is None:
                    transport.write(b"%x\r\n%b\r\n" % (len(chunk), chunk))
                elif written > length:
                    raise UpstreamBroken("the request body is longer than its Content-Length")
                else:
                    transport.write(chunk)
                while self.writing_paused and self.state is WAITING:
                    await self._wait()
        except UpstreamError:
            self._close()
            raise
        except Exception as exc:
            # The client's body failed (the caller finds the cause on its context).
            self._close()
            raise UpstreamBroken(f"the request body could not be read: {exc}") from exc
        if self.state is not WAITING:
            return
        if length is None:
            transport.write(b"0\r\n\r\n")
        elif written != length:
            self._close()
            raise UpstreamBroken("the request body is shorter than its Content-Length")
        self.sent_all = True

    async def chunks(self) -> AsyncIterator[bytes]:
        body = self.body
        while True:
            if body:
                yield self._take()
            elif self.error is not None:
                raise self.error
            elif self.state is DONE:
                return
            else:
                await self._wait()

    def whole_body(self) -> bytes | None:
        """The whole body, taken at once, when the response is complete and its body came as
        one chunk at most (almost every small response); None otherwise: read chunks().

        No async generator is started for it: one left suspended after its only chunk is
        closed by the loop's finaliser, which costs a task and a cross-thread wake-up (two
        system calls) per request."""
        if self.state is not DONE or len(self.body) > 1:
            return None
        return self._take() if self.body else b""

    def _take(self) -> bytes:
        chunk = self.body.popleft()
        self.buffered -= len(chunk)
        if self.reading_paused and self.buffered <= LOW_WATER and self.transport:
            self.reading_paused = False
            self.transport.resume_reading()
        return chunk

    def timed_out(self, seconds: float) -> None:
        if self.state is WAITING or self.state is BODY:
            self._fail(UpstreamTimeout(f"no complete upstream response within {seconds:g}s"))

    @property
    def reusable(self) -> bool:
        return (
            self.state is DONE
            and self.keep_alive
            and self.sent_all
            and not self.body
            and not self.closed
        )

    def end(self) -> None:
        """Detach the finished exchange from the connection: from now on it is idle."""
        head = self.head
        if head is not None and head.done() and not head.cancelled():
            head.exception()  # retrieved: a failure after the request failed is not news
        self.parser = None
        self.head = None
        self.state = IDLE

    def violate(self, violation: Violation) -> None:
        """Discard the connection over bytes outside any response's framing, and say so."""
        if self.closed:
            return
        self._close()
        self.report(violation)

    def _stray(self) -> Violation:
        """What bytes arriving now are: the state says whether any response is outstanding."""
        if self.state is IDLE:
            return Violation.IDLE_BYTES
        bodiless = self.head_only or self.status in (204, 304)
        return Violation.BODY_NOT_ALLOWED if bodiless else Violation.EXTRA_BYTES

    def _finish(self) -> None:
        self.state = DONE
        self._wake()

    def _fail(self, error: UpstreamError | Stale) -> None:
        self.error = error
        self.state = FAILED
        if self.head is not None and not self.head.done():
            self.head.set_exception(error)
        self._close()
        self._wake()

    def _close(self) -> None:
        self.keep_alive = False
        if self.transport is not None and not self.closed:
            self.closed = True
            self.transport.abort()

    async def _wait(self) -> None:
        self.waiter = self.loop.create_future()
        try:
            await self.waiter
        finally:
            self.waiter = None

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
