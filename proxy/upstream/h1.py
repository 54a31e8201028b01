"""A minimal pooled HTTP/1.1 upstream client on asyncio.Protocol with the llhttp parser
(httptools): the `Transport` the proxy uses by default, about three times cheaper per request
than aiohttp's ClientSession.

One request at a time per connection (no pipelining). A connection goes back to the pool only
when its response was read to the end, the upstream allows keep-alive (HTTP/1.1 without
`Connection: close`), the whole request body was sent, and nothing unexpected arrived.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator
from typing import cast
from urllib.parse import urlsplit

import httptools

from proxy.http.headers import Headers
from proxy.upstream.resend import may_repeat
from proxy.upstream.transport import (
    UpstreamBroken,
    UpstreamConnectTimeout,
    UpstreamError,
    UpstreamNotSent,
    UpstreamResponse,
    UpstreamTimeout,
)

# Buffered response bytes at which reading from the upstream pauses, and resumes.
HIGH_WATER = 256 * 1024
LOW_WATER = 64 * 1024
# A response head larger than this is refused (502) rather than buffered: Envoy's default
# max_response_headers_kb is 60, nginx's proxy_buffer_size a few KiB.
MAX_RESPONSE_HEAD = 64 * 1024
# Idle connections older than this are closed rather than reused: upstream servers drop idle
# keep-alive connections after a few seconds, and reusing one as it closes costs a retry.
IDLE_TIMEOUT = 4.0
# A request carrying one of these may be under an idempotency claim: never resent.
_KEY_HEADERS = frozenset({"idempotency-key", "x-idempotency-key"})
# Methods that carry no body by convention: no `Content-Length: 0` when there is none.
_NO_BODY_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "CONNECT"})


class _Stale(Exception):
    """A reused keep-alive connection closed before any response byte arrived."""


class _Connection(asyncio.Protocol):
    """One upstream connection and the state of the exchange running on it."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.parser: httptools.HttpResponseParser | None = None
        self.reused = False
        self.idle_since = 0.0
        self.head_only = False
        self.received = False
        self.head_size = 0  # header bytes parsed so far
        self.head_received = 0  # bytes received while the head was incomplete
        self.status = 0
        self.reason = ""
        self.headers: Headers = []
        self.content_length: int | None = None
        self.delimited = False  # framed by Content-Length or chunked (else: until close)
        self.head_done = False
        self.head: asyncio.Future[None] | None = None
        self.body: deque[bytes] = deque()
        self.buffered = 0
        self.complete = False
        self.keep_alive = False
        self.sent_all = False
        self.error: UpstreamError | _Stale | None = None
        self.waiter: asyncio.Future[None] | None = None
        self.reading_paused = False
        self.writing_paused = False
        self.informational = False

    # --- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        parser = self.parser
        if parser is None or self.complete:
            # Bytes outside an exchange: the upstream is out of step; never reuse this one.
            self.keep_alive = False
            self._close()
            return
        self.received = True
        if not self.head_done:
            self.head_received += len(data)
        try:
            parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(UpstreamBroken("the upstream switched protocols"))
        except httptools.HttpParserError as exc:
            self._fail(UpstreamBroken(f"malformed upstream response: {exc}"))
        else:
            if self.head_size > MAX_RESPONSE_HEAD or (
                not self.head_done and self.head_received > MAX_RESPONSE_HEAD
            ):
                self._fail(UpstreamBroken(
                    f"upstream response head larger than {MAX_RESPONSE_HEAD} bytes"
                ))

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.parser is None or self.complete or self.error is not None:
            return
        if not self.received:
            if self.reused:
                self._fail(_Stale())
            else:
                self._fail(UpstreamBroken("the upstream closed the connection without answering"))
        elif self.head_done and not self.delimited:
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

    def on_status(self, reason: bytes) -> None:
        self.reason = reason.decode("latin-1")

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.decode("latin-1"), value.decode("latin-1")))
        self.head_size += len(name) + len(value)

    def on_headers_complete(self) -> None:
        assert self.parser is not None
        status = self.parser.get_status_code()
        if status < 200:
            # 100 Continue, 103 Early Hints: interim, not relayed; the real head follows.
            self.informational = True
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
        self.content_length = None if chunked else length
        self.delimited = chunked or length is not None or status in (204, 304)
        self.head_done = True
        if self.head is not None and not self.head.done():
            self.head.set_result(None)
        if self.head_only:
            # A HEAD response has no body whatever its headers say; llhttp cannot be told so.
            self.keep_alive = self.parser.should_keep_alive() and self.delimited
            self._finish()
        self._wake()

    def on_body(self, chunk: bytes) -> None:
        if self.complete:
            self.keep_alive = False
            return
        self.body.append(chunk)
        self.buffered += len(chunk)
        if self.buffered > HIGH_WATER and not self.reading_paused and self.transport:
            self.reading_paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if self.informational:
            self.informational = False
            return
        if self.complete:
            return
        assert self.parser is not None
        self.keep_alive = self.parser.should_keep_alive()
        self._finish()

    # --- the exchange ----------------------------------------------------------------------

    def begin(self, head_only: bool) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.head_only = head_only
        self.received = self.head_done = self.complete = self.sent_all = False
        self.head_size = self.head_received = 0
        self.informational = False
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
                if self.error is not None or self.head_done:
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
                while self.writing_paused and self.error is None and not self.head_done:
                    await self._wait()
        except UpstreamError:
            self._close()
            raise
        except Exception as exc:
            # The client's body failed (the caller finds the cause on its context).
            self._close()
            raise UpstreamBroken(f"the request body could not be read: {exc}") from exc
        if self.error is not None or self.head_done:
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
                chunk = body.popleft()
                self.buffered -= len(chunk)
                if self.reading_paused and self.buffered <= LOW_WATER and self.transport:
                    self.reading_paused = False
                    self.transport.resume_reading()
                yield chunk
            elif self.error is not None:
                raise self.error
            elif self.complete:
                return
            else:
                await self._wait()

    def timed_out(self, seconds: float) -> None:
        if not self.complete and self.error is None:
            self._fail(UpstreamTimeout(f"no complete upstream response within {seconds:g}s"))

    @property
    def reusable(self) -> bool:
        return (
            self.complete
            and self.keep_alive
            and self.sent_all
            and not self.body
            and not self.closed
            and self.error is None
        )

    def end(self) -> None:
        """Detach the finished exchange from the connection."""
        head = self.head
        if head is not None and head.done() and not head.cancelled():
            head.exception()  # retrieved: a failure after the request failed is not news
        self.parser = None
        self.head = None

    def _finish(self) -> None:
        self.complete = True
        self._wake()

    def _fail(self, error: UpstreamError | _Stale) -> None:
        self.error = error
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


class _Response:
    """The upstream response: head fields now, body via chunks(), and the connection's fate."""

    __slots__ = ("_conn", "_pool", "_timer", "content_length", "headers", "reason", "status")

    def __init__(self, pool: H1Transport, conn: _Connection, timer: asyncio.TimerHandle) -> None:
        self._pool = pool
        self._conn = conn
        self._timer: asyncio.TimerHandle | None = timer
        self.status = conn.status
        self.reason = conn.reason
        self.headers = conn.headers
        self.content_length = conn.content_length

    def chunks(self) -> AsyncIterator[bytes]:
        return self._conn.chunks()

    def release(self) -> None:
        timer = self._timer
        if timer is not None:
            self._timer = None
            timer.cancel()
            self._pool._done(self._conn)


class H1Transport:
    """Keep-alive connection pool to one upstream target (`max_connections` at once)."""

    def __init__(
        self, base_url: str, *, connect_timeout: float, timeout: float, max_connections: int
    ) -> None:
        parts = urlsplit(base_url)
        self._base = base_url
        self._hostname = parts.hostname or ""
        self._port = parts.port or (443 if parts.scheme == "https" else 80)
        self._ssl = ssl.create_default_context() if parts.scheme == "https" else None
        self._host_line = f"Host: {parts.netloc.rpartition('@')[2]}\r\n"
        self._prefix = parts.path.rstrip("/")
        self._connect_timeout = connect_timeout
        self._timeout = timeout
        self._max_connections = max_connections
        self._active = 0  # exchanges holding a connection slot
        self._slot_waiters: deque[asyncio.Future[None]] = deque()
        self._idle: list[_Connection] = []
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None

    async def send(
        self,
        method: str,
        target: str,
        headers: Headers,
        body: bytes | AsyncIterable[bytes] | None,
        deadline: float | None = None,
    ) -> UpstreamResponse:
        # Flat on purpose: every coroutine level between the handler and the awaited response
        # head is resumed on each wake-up, so the exchange is not split into helpers.
        loop = self._loop
        if loop is None:
            # Once: on Python 3.11 every get_running_loop() is a getpid() syscall.
            loop = self._loop = asyncio.get_running_loop()
        own_deadline = loop.time() + self._timeout
        deadline = own_deadline if deadline is None else min(deadline, own_deadline)
        if self._active < self._max_connections:
            self._active += 1
        else:
            await self._wait_for_slot(loop, deadline)
        try:
            head, length = self._encode(method, target, headers, body)
            conn = self._idle_connection(loop.time()) or await self._connect(loop, deadline)
            while True:
                timer = loop.call_at(deadline, conn.timed_out, self._timeout)
                conn.begin(method == "HEAD")
                try:
                    if body is None or isinstance(body, bytes):
                        conn.write(head, body)
                    else:
                        await conn.stream(head, body, length)
                    answered = conn.head
                    assert answered is not None
                    if not answered.done():
                        await answered
                    else:
                        answered.result()
                    if conn.error is not None:
                        # The head was fine but what came with it was not: still time for a 502.
                        raise conn.error
                    return _Response(self, conn, timer)
                except _Stale:
                    # The upstream closed an idle connection as we reused it. It most likely
                    # never read the request, but only a request that is safe to run twice is
                    # resent (proxy.upstream.resend).
                    _abandon(conn, timer)
                    if not may_resend(method, headers, body):
                        raise UpstreamBroken(
                            f"{self._base} closed a reused connection before answering; "
                            "not resent: the request is not safe to repeat"
                        ) from None
                    conn = await self._connect(loop, deadline)
                except BaseException:
                    _abandon(conn, timer)
                    raise
        except BaseException:
            self._release_slot()
            raise

    async def _wait_for_slot(self, loop: asyncio.AbstractEventLoop, deadline: float) -> None:
        waiter: asyncio.Future[None] = loop.create_future()
        self._slot_waiters.append(waiter)
        try:
            async with asyncio.timeout_at(deadline):
                await waiter
        except BaseException as exc:
            if waiter.done() and not waiter.cancelled():
                self._release_slot()  # handed a slot just as we gave up: pass it on
            else:
                waiter.cancel()
            if isinstance(exc, TimeoutError):
                raise UpstreamNotSent(
                    f"no free connection to {self._base} within {self._timeout:g}s"
                ) from None
            raise

    def _release_slot(self) -> None:
        waiters = self._slot_waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot passes straight to the next in line
                return
        self._active -= 1

    def _idle_connection(self, now: float) -> _Connection | None:
        idle = self._idle
        while idle:
            conn = idle.pop()
            if not conn.closed and now - conn.idle_since < IDLE_TIMEOUT:
                conn.reused = True
                return conn
            conn._close()
        return None

    async def _connect(self, loop: asyncio.AbstractEventLoop, deadline: float) -> _Connection:
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(
                    lambda: _Connection(loop),
                    self._hostname,
                    self._port,
                    ssl=self._ssl,
                    server_hostname=self._hostname if self._ssl else None,
                ),
                min(self._connect_timeout, max(0.0, deadline - loop.time())),
            )
        except TimeoutError:
            raise UpstreamConnectTimeout(f"connect to {self._base} timed out") from None
        except OSError as exc:
            raise UpstreamNotSent(f"cannot connect to {self._base}: {exc}") from exc
        return conn

    def _encode(
        self,
        method: str,
        target: str,
        headers: Headers,
        body: bytes | AsyncIterable[bytes] | None,
    ) -> tuple[bytes, int | None]:
        """The request head, and the streamed body's declared length (None: chunked)."""
        lines = [f"{method} {self._prefix}{target} HTTP/1.1\r\n", self._host_line]
        length: int | None = None
        for name, value in headers:
            if len(name) in (14, 17) and name.lower() in ("content-length", "transfer-encoding"):
                if name.lower() == "content-length":
                    length = int(value)
                continue
            lines.append(f"{name}: {value}\r\n")
        if isinstance(body, bytes):
            length = len(body)
            if body or method not in _NO_BODY_METHODS:
                lines.append(f"Content-Length: {length}\r\n")
        elif body is None:
            if method not in _NO_BODY_METHODS:
                lines.append("Content-Length: 0\r\n")
        elif length is None:
            lines.append("Transfer-Encoding: chunked\r\n")
        else:
            lines.append(f"Content-Length: {length}\r\n")
        lines.append("\r\n")
        head = "".join(lines)
        # Every CR and LF must be ours: one pair per line; anything else would split the head.
        if head.count("\n") != len(lines) or head.count("\r") != len(lines):
            raise UpstreamNotSent("a request header contains CR or LF")
        return head.encode("utf-8", "surrogateescape"), length

    def _done(self, conn: _Connection) -> None:
        reusable = conn.reusable
        conn.end()
        if reusable and not self._closed:
            conn.idle_since = conn.loop.time()
            self._idle.append(conn)
        else:
            conn._close()
        self._release_slot()

    async def close(self) -> None:
        self._closed = True
        for conn in self._idle:
            conn._close()
        self._idle.clear()


def _abandon(conn: _Connection, timer: asyncio.TimerHandle) -> None:
    timer.cancel()
    conn.end()
    conn._close()


def may_resend(method: str, headers: Headers, body: bytes | AsyncIterable[bytes] | None) -> bool:
    """Whether a request whose connection failed before any answer may be sent again. The
    transport cannot see the claim itself; a forwarded Idempotency-Key marks every claimed one."""
    keyed = any(len(name) in (15, 17) and name.lower() in _KEY_HEADERS for name, _ in headers)
    return may_repeat(method, body, keyed)
