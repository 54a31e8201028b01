"""The proxy's upstream client: a keep-alive pool of HTTP/1.1 connections (asyncio.Protocol
with the llhttp parser, see proxy.upstream.h1_connection), about three times cheaper per request
than aiohttp's ClientSession.

One request at a time per connection (no pipelining). A connection goes back to the pool only
when its response was read to the end, the upstream allows keep-alive (HTTP/1.1 without
`Connection: close`), the whole request body was sent, and nothing arrived outside the
response's framing; at reuse it must still have nothing waiting to be read.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator
from urllib.parse import urlsplit

from proxy.config.urls import redact_url
from proxy.http.headers import Headers
from proxy.upstream.h1_connection import Connection
from proxy.upstream.h1_state import Report, Violation
from proxy.upstream.h1_state import Stale as _Stale
from proxy.upstream.resend import may_repeat
from proxy.upstream.transport import (
    UpstreamBroken,
    UpstreamConnectTimeout,
    UpstreamNotSent,
    UpstreamResponse,
)

# Idle connections older than this are closed rather than reused: upstream servers drop idle
# keep-alive connections after a few seconds, and reusing one as it closes costs a retry.
IDLE_TIMEOUT = 4.0
# A request carrying one of these may be under an idempotency claim: never resent.
_KEY_HEADERS = frozenset({"idempotency-key", "x-idempotency-key"})
# Methods that carry no body by convention: no `Content-Length: 0` when there is none.
_NO_BODY_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "CONNECT"})


def _unreported(violation: Violation) -> None:
    """Default `report` for a transport built without one (benchmarks, unit tests)."""


class _Response:
    """The upstream response: head fields now, body via chunks(), and the connection's fate."""

    __slots__ = ("_conn", "_pool", "_timer", "content_length", "headers", "reason", "status")

    def __init__(self, pool: H1Transport, conn: Connection, timer: asyncio.TimerHandle) -> None:
        self._pool = pool
        self._conn = conn
        self._timer: asyncio.TimerHandle | None = timer
        self.status = conn.status
        self.reason = conn.reason
        self.headers = conn.headers
        self.content_length = conn.content_length

    def chunks(self) -> AsyncIterator[bytes]:
        return self._conn.chunks()

    def whole_body(self) -> bytes | None:
        return self._conn.whole_body()

    def release(self) -> None:
        timer = self._timer
        if timer is not None:
            self._timer = None
            timer.cancel()
            self._pool._done(self._conn)


class H1Transport:
    """Keep-alive connection pool to one upstream target (`max_connections` at once)."""

    def __init__(
        self,
        base_url: str,
        *,
        connect_timeout: float,
        timeout: float,
        max_connections: int,
        report: Report = _unreported,
    ) -> None:
        parts = urlsplit(base_url)
        self._report = report
        self._base = base_url
        self._shown = redact_url(base_url)  # for messages, which reach clients and logs
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
        self._idle: list[Connection] = []
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
                            f"{self._shown} closed a reused connection before answering; "
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
                    f"no free connection to {self._shown} within {self._timeout:g}s"
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

    def _idle_connection(self, now: float) -> Connection | None:
        idle = self._idle
        while idle:
            conn = idle.pop()
            if now - conn.idle_since < IDLE_TIMEOUT and _quiet(conn):
                conn.reused = True
                return conn
            conn._close()
        return None

    async def _connect(self, loop: asyncio.AbstractEventLoop, deadline: float) -> Connection:
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(
                    lambda: Connection(loop, self._report),
                    self._hostname,
                    self._port,
                    ssl=self._ssl,
                    server_hostname=self._hostname if self._ssl else None,
                ),
                min(self._connect_timeout, max(0.0, deadline - loop.time())),
            )
        except TimeoutError:
            raise UpstreamConnectTimeout(f"connect to {self._shown} timed out") from None
        except OSError as exc:
            raise UpstreamNotSent(f"cannot connect to {self._shown}: {exc}") from exc
        return conn

    def _encode(
        self,
        method: str,
        target: str,
        headers: Headers,
        body: bytes | AsyncIterable[bytes] | None,
    ) -> tuple[bytes, int | None]:
        """The request head, and the streamed body's declared length (None: chunked). A `Host`
        among `headers` (the client's, preserved) replaces the target's own."""
        lines = [f"{method} {self._prefix}{target} HTTP/1.1\r\n", self._host_line]
        length: int | None = None
        for name, value in headers:
            if len(name) in (14, 17) and name.lower() in ("content-length", "transfer-encoding"):
                if name.lower() == "content-length":
                    length = int(value)
                continue
            if len(name) == 4 and name.lower() == "host":
                lines[1] = f"Host: {value}\r\n"
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

    def _done(self, conn: Connection) -> None:
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


def _quiet(conn: Connection) -> bool:
    """At reuse: True when nothing is waiting to be read. Bytes the upstream sent after its
    response can sit in the socket before the loop hands them to data_received; reused, the
    connection would read them as the next request's answer. A readable socket holds either such
    bytes (a violation) or the upstream's close (stale): either way the connection is not used."""
    if conn.closed:
        return False  # and its descriptor may already belong to another socket
    poller = conn.poller
    if poller is None:
        return True  # TLS: records are not application bytes; data_received rules
    if not poller.poll(0):
        return True
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, fileno=conn.fd)
    try:
        waiting = sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except OSError:
        waiting = b""
    finally:
        sock.detach()
    if waiting:
        conn.violate(Violation.IDLE_BYTES)
    else:
        conn._close()
    return False


def _abandon(conn: Connection, timer: asyncio.TimerHandle) -> None:
    timer.cancel()
    conn.end()
    conn._close()


def may_resend(method: str, headers: Headers, body: bytes | AsyncIterable[bytes] | None) -> bool:
    """Whether a request whose connection failed before any answer may be sent again. The
    transport cannot see the claim itself; a forwarded Idempotency-Key marks every claimed one."""
    keyed = any(len(name) in (15, 17) and name.lower() in _KEY_HEADERS for name, _ in headers)
    return may_repeat(method, body, keyed)
