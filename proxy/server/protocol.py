"""One client connection of the data port: llhttp (httptools) parsing, keep-alive, pipelining.

An `asyncio.Protocol` (on `ClientConnection`, proxy/server/connection.py, which owns the socket's
lifetime and flow control), the way uvicorn's httptools_impl is built. The connection moves through
explicit states (`Phase`): waiting for a head (under `limits.header_timeout`, which is also the
keep-alive idle time), handling requests one at a time in arrival order (a pipelined request
waits its turn, and reading pauses until it gets it), and lingering after an early answer
(reading and discarding the unread body a moment, so the answer is not lost to a reset).

Flow control runs both ways: reading pauses while a request body waits unread beyond
`BODY_HIGH_WATER` (a slow upstream slows the client), and writers wait in `drain()` while the
transport holds more than its high-water mark (a slow client slows the upstream), for at most
`limits.write_timeout`.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import TYPE_CHECKING, cast

import httptools

from proxy.http.problem import ProblemType
from proxy.http.request import HTTP_10, HTTP_11, Body, BodyFramingError, Request, Version
from proxy.http.response import Response, StreamResponse
from proxy.server.connection import BUSY, CLOSED, HEAD, IDLE, LINGER, ClientConnection, Pause
from proxy.server.head import HeadLimits, Refusal, refusal_for, target_parts

if TYPE_CHECKING:
    from proxy.server.listener import DataServer

# A request body waiting unread beyond this pauses reading from the client.
BODY_HIGH_WATER = 256 * 1024

_VERSIONS = {"1.1": HTTP_11, "1.0": HTTP_10}


class HttpProtocol(ClientConnection):
    # Slotted: an idle connection is this object, its parser, its timer and two empty
    # containers for the garbage collector to walk (docs/performance.md, idle connections).
    __slots__ = (
        "_close_after", "_current", "_head_bytes", "_headers", "_parser", "_queue", "_raw_body",
        "_reading", "_refusal", "_task", "_url", "limits", "remote", "requests", "server",
    )

    def __init__(self, server: DataServer) -> None:
        super().__init__(server.loop, server.write_timeout)
        self.server = server
        self.limits: HeadLimits = server.head_limits
        self.remote = ""
        self.requests = 0  # answered on this connection
        self._parser = httptools.HttpRequestParser(self)
        # The head being parsed.
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._head_bytes = 0
        # The request whose body is being parsed, and the requests parsed but not yet handled.
        self._reading: Request | None = None
        self._raw_body = 0  # bytes of an upgrade request's body llhttp leaves to us
        self._queue: deque[Request] = deque()
        self._current: Request | None = None
        self._task: asyncio.Task[None] | None = None
        # What ends the connection once the current request is answered.
        self._close_after = False
        self._refusal: Response | None = None  # a later pipelined head the parser refused

    # --- asyncio.Protocol --------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TCPTransport has the Transport interface without subclassing it.
        self.transport = transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self.remote = peer[0] if isinstance(peer, tuple) else ""
        if not self.server.admit(self):
            return
        self._set_deadline(self.loop.time() + self.server.header_timeout)

    def data_received(self, data: bytes) -> None:
        if self.phase is LINGER or self.phase is CLOSED:
            return  # dropped: the connection is ending
        if self._raw_body:
            data = self._feed_raw_body(data)
            if not data:
                return
        if self.phase is IDLE:
            self.phase = HEAD
        if self._reading is None:
            self._head_bytes += len(data)  # reset when a head completes
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            self._upgraded(data[upgrade.args[0]:])
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            self._refuse(cause if isinstance(cause, Refusal) else refusal_for(exc))
        except httptools.HttpParserError as exc:
            self._refuse(refusal_for(exc))
        else:
            if self._reading is None and self._head_bytes > self.limits.head:
                # httptools buffers a header line until it ends: the head is bounded here.
                self._refuse(Refusal(ProblemType.HEADERS_TOO_LARGE,
                                     f"the request head exceeds {self.limits.head} bytes"))

    def eof_received(self) -> bool | None:
        # The client half-closed: as aiohttp did, the connection is treated as lost (an
        # unfinished body fails, a request being handled learns its client is gone).
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.forget(self)
        gone = ConnectionResetError("client connection lost")
        self._lost(gone)
        for request in (self._current, self._reading, *self._queue):
            if request is not None and request.content is not None:
                request.content.fail(gone)
        self._queue.clear()
        current, task = self._current, self._task
        if current is None or task is None or current.on_lost is None:
            return
        if current.on_lost():
            task.cancel()  # the stage that set on_lost decided: the upstream exchange stops

    # --- httptools callbacks ----------------------------------------------------------

    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = []

    def on_url(self, url: bytes) -> None:
        self._url += url
        if len(self._url) > self.limits.request_line:
            raise Refusal(ProblemType.URI_TOO_LONG,
                          f"a line of the request is longer than {self.limits.request_line} bytes")

    def on_header(self, name: bytes, value: bytes) -> None:
        limits = self.limits
        if len(name) + len(value) > limits.field:
            raise Refusal(ProblemType.HEADERS_TOO_LARGE,
                          f"a line of the request is longer than {limits.field} bytes")
        headers = self._headers
        headers.append((name, value))
        if len(headers) > limits.count:
            raise Refusal(ProblemType.HEADERS_TOO_LARGE, "too many headers")

    def on_headers_complete(self) -> None:
        parser = self._parser
        version = _VERSIONS.get(parser.get_http_version())
        if version is None:
            major, _, minor = parser.get_http_version().partition(".")
            version = Version(int(major or 0), int(minor or 0))
        headers = tuple(self._headers)
        self.limits.check(version, headers)
        path, query = target_parts(self._url)
        request = Request(
            parser.get_method().decode("ascii"), path, query, version, headers, self.remote,
            self, None, keep_alive=parser.should_keep_alive(),
        )
        chunked = "Transfer-Encoding" in request.headers
        upgrade = parser.should_upgrade() and request.method != "CONNECT"
        if upgrade and chunked:
            # llhttp hands an upgrade request's body back unparsed: chunks cannot be framed.
            raise Refusal(ProblemType.BAD_REQUEST, "an upgrade request with a chunked body")
        if chunked or request.content_length:
            request.content = Body(BODY_HIGH_WATER)
            request.content.on_drained = lambda: self._resume(Pause.BODY)
            if upgrade:
                # No upgrade is served: the Content-Length frames the body llhttp left to us.
                self._raw_body = request.content_length or 0
        self._reading = request
        self._headers = []  # from here on: trailers, counted and dropped
        self._head_bytes = 0
        self.phase = BUSY
        self._set_deadline(None)
        if self._current is None and not self._queue:
            self._start(request)
        else:
            self._queue.append(request)
            self._pause(Pause.PIPELINE)  # one waiting request at most: the rest stays in the socket

    def on_body(self, body: bytes) -> None:
        request = self._reading
        if request is not None and request.content is not None and request.content.feed(body):
            self._pause(Pause.BODY)

    def on_message_complete(self) -> None:
        request = self._reading
        if request is None or self._raw_body:
            return
        if request.content is not None:
            request.content.feed_eof()
        self._reading = None

    # --- requests -----------------------------------------------------------------------

    def _start(self, request: Request) -> None:
        self._current = request
        self._task = self.loop.create_task(self._handle(request))

    async def _handle(self, request: Request) -> None:
        try:
            response = await self.server.plane(request)
        except Exception as exc:
            response = self.server.unhandled(exc)
        try:
            if not response.prepared:
                if isinstance(response, Response):
                    await response.send(request)
                else:
                    await response.prepare(request)
                    await response.write_eof()
            elif not response.finished:
                await response.write_eof()
        except (ConnectionError, OSError):
            response.keep_alive = False
        except Exception as exc:
            # Nothing else may leave a connection waiting for an answer that will not come.
            self.server.failed(exc)
            self.abort()
            return
        self.requests += 1
        self._finished(request, response)

    def _finished(self, request: Request, response: StreamResponse) -> None:
        self._current = None
        self._task = None
        if self.phase is CLOSED:
            return
        body = request.content
        unread = body is not None and not body.is_eof()
        if unread or not response.keep_alive or self._close_after or not request.keep_alive:
            if self._queue or self._refusal is not None:
                self._queue.clear()  # a closing connection answers nothing after this
                self._refusal = None
            self._close(linger=unread)
            return
        if self._queue:
            self._start(self._queue.popleft())
            self._resume(Pause.PIPELINE)
            return
        if self._refusal is not None:
            self._send_refusal(self._refusal)
            return
        if self._reading is None:
            self.phase = IDLE if not self._head_bytes else HEAD
            self._set_deadline(self.loop.time() + self.server.header_timeout)
        self._resume(Pause.PIPELINE)

    def _upgraded(self, rest: bytes) -> None:
        """llhttp stopped at an upgrade request: none is served, so a fresh parser goes on
        after its body, which it left to us. After CONNECT nothing is read: its answer (400)
        closes the connection, and what follows is a tunnel's bytes, not requests."""
        connect = self._parser.get_method() == b"CONNECT"
        self._parser = httptools.HttpRequestParser(self)
        if connect:
            self._pause(Pause.REFUSED)
            return
        if self._raw_body:
            rest = self._feed_raw_body(rest)
        if rest:
            self.data_received(rest)

    def _feed_raw_body(self, data: bytes) -> bytes:
        request = self._reading
        take = data[: self._raw_body]
        self._raw_body -= len(take)
        if request is not None and request.content is not None and take \
                and request.content.feed(take):
            self._pause(Pause.BODY)
        if not self._raw_body:
            self.on_message_complete()
        return data[len(take):]

    def _refuse(self, refusal: Refusal) -> None:
        """The parser refused the input: answer (in turn) and close; nothing after it is read."""
        self._pause(Pause.REFUSED)
        self.phase = BUSY
        reading = self._reading
        if reading is not None and reading.content is not None:
            # The head was accepted and is being handled: its body fails with the reason, and
            # its own answer says so.
            reading.content.fail(BodyFramingError(refusal.problem, refusal.detail))
            self._reading = None
            self._close_after = True
            return
        response = self.server.refused(self.remote, refusal)
        if self._current is None and not self._queue:
            self._send_refusal(response)
        else:
            self._refusal = response  # the requests before it are still answered, in order

    def _send_refusal(self, response: Response) -> None:
        try:
            self.write(response.encode(Request.unparsed(self.remote)))
        except ConnectionResetError:
            return
        self._close(linger=False)

    # --- connection end and deadlines ---------------------------------------------------

    def close_when_idle(self, fresh_too: bool) -> None:
        """Drain: close now if no request is in progress (and one was answered already, unless
        `fresh_too`), else after the current answer."""
        if self.phase is CLOSED:
            return
        if self._current is None and not self._queue and self._reading is None:
            if fresh_too or self.requests > 0 or self.phase is LINGER:
                self._close(linger=False)
        else:
            self._close_after = True

    def cancel(self) -> None:
        """Shutdown: stop the request being handled."""
        if self._task is not None:
            self._task.cancel()
