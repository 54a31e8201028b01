"""The data port: the listening socket, its connections, the connection cap and the drain.

A supervisor of `HttpProtocol`s (proxy/server/protocol.py), as uvicorn keeps protocols apart
from the server that owns them: it admits or refuses each new connection, hands each parsed
request to the data plane, answers what the parser refused, and closes connections when
draining.
"""

from __future__ import annotations

import asyncio
import time
import traceback
from typing import Protocol

from proxy.config import Limits
from proxy.http.problem import ProblemType, problem, retry_after
from proxy.http.request import Request
from proxy.http.response import Response, StreamResponse
from proxy.observability import tracing
from proxy.observability.access_log import MAX_FIELD
from proxy.observability.events import emit
from proxy.server.head import HeadLimits, Refusal
from proxy.server.protocol import HttpProtocol

# At most one `connections_rejected` warning per this many seconds, however many are refused.
REJECTED_EVENT_INTERVAL = 10.0
# Pending connections the kernel queues for accept (the default of asyncio.create_server).
BACKLOG = 100


def over_capacity_response(max_connections: int) -> bytes:
    """The whole 503 written to a connection beyond `limits.max_connections` before closing it
    (encoded like every other answer: no request was parsed, so none is answered)."""
    response = problem(
        ProblemType.TOO_MANY_CONNECTIONS,
        f"the proxy serves at most {max_connections} connections",
        tracing.new_trace_id(),
        (retry_after(1),),
    )
    response.force_close()
    return response.encode(Request.unparsed(""))


class Plane(Protocol):
    """What the server serves (proxy.pipeline.runtime.DataPlane; bench/floor_proxy.py's bare
    forwarder)."""

    async def __call__(self, request: Request) -> StreamResponse: ...

    def rejected(self, request: Request, response: StreamResponse) -> None:
        """Log and count a request the parser refused."""
        ...

    def connection_refused(self) -> None:
        """Count a connection refused beyond `limits.max_connections`."""
        ...


class DataServer:
    """The protocol factory and the owner of every open data connection."""

    def __init__(self, plane: Plane, limits: Limits) -> None:
        self.plane = plane
        self.loop = asyncio.get_running_loop()
        self.head_limits = HeadLimits.from_config(limits.max_header_bytes)
        self.header_timeout = limits.header_timeout
        self.write_timeout = limits.write_timeout
        self.max_connections = limits.max_connections
        self.connections: set[HttpProtocol] = set()
        self._listener: asyncio.Server | None = None
        # Rejections not yet reported in an event, and when the last event was written.
        self._unreported = 0
        self._reported_at = -REJECTED_EVENT_INTERVAL

    def __call__(self) -> HttpProtocol:
        return HttpProtocol(self)

    async def listen(self, host: str, port: int, reuse_port: bool = False) -> int:
        """Start accepting; returns the bound port (useful with port 0)."""
        self._listener = await self.loop.create_server(
            self, host, port, reuse_address=True, reuse_port=reuse_port, backlog=BACKLOG
        )
        return int(self._listener.sockets[0].getsockname()[1])

    async def stop_listening(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None

    # --- connections --------------------------------------------------------------------

    def admit(self, connection: HttpProtocol) -> bool:
        """Count a new connection in, or refuse it with a 503 (asyncio cannot pause accepting)."""
        self.connections.add(connection)
        if len(self.connections) <= self.max_connections:
            return True
        transport = connection.transport
        if transport is not None:
            transport.write(over_capacity_response(self.max_connections))
            transport.close()
        self._rejected()
        return False

    def forget(self, connection: HttpProtocol) -> None:
        self.connections.discard(connection)

    @property
    def open_connections(self) -> int:
        return len(self.connections)

    def close_connections(self, fresh_too: bool) -> None:
        """Close each connection once its current request is answered. A connection that has
        not sent a request yet (accepted just before the listener closed) is left to send it,
        unless `fresh_too`."""
        for connection in list(self.connections):
            connection.close_when_idle(fresh_too)

    def pre_shutdown(self) -> None:
        """Stop whatever is still being handled (the drain's deadline has passed)."""
        for connection in list(self.connections):
            connection.cancel()

    async def shutdown(self, timeout: float | None = None) -> None:
        """Give cancelled handlers `timeout` seconds to finish, then close every connection."""
        deadline = self.loop.time() + (timeout or 0.0)
        while self.connections and self.loop.time() < deadline:
            await asyncio.sleep(0.01)
        for connection in list(self.connections):
            if connection.transport is not None:
                connection.transport.close()

    # --- requests -----------------------------------------------------------------------

    def unhandled(self, exc: Exception) -> Response:
        """The answer when a failure escaped every stage of the data plane: a 500 and a close.
        (The protocol awaits the plane itself: a wrapper coroutine here would be one more level
        resumed on every wake-up of every request.)"""
        trace_id = tracing.new_trace_id()
        self.failed(exc, trace_id)
        response = problem(ProblemType.INTERNAL_ERROR,
                           "the proxy failed while handling this request", trace_id)
        response.force_close()
        return response

    def failed(self, exc: Exception, trace_id: str | None = None) -> None:
        """A failure no stage handled (a bug): said in an `unhandled_error` event."""
        emit("unhandled_error", "error", trace_id=trace_id, error=repr(exc)[:MAX_FIELD],
             traceback="".join(traceback.format_exception(exc)))

    def refused(self, remote: str, refusal: Refusal) -> Response:
        """The answer to input the parser refused, logged and counted like any request."""
        response = problem(refusal.problem, refusal.detail, tracing.new_trace_id())
        response.force_close()
        self.plane.rejected(Request.unparsed(remote), response)
        return response

    def _rejected(self) -> None:
        """Count a refused connection; warn at once, then at most every REJECTED_EVENT_INTERVAL
        with the number refused since the last warning (the counter has them all)."""
        self.plane.connection_refused()
        self._unreported += 1
        now = time.monotonic()
        if now - self._reported_at >= REJECTED_EVENT_INTERVAL:
            emit(
                "connections_rejected",
                "warning",
                rejected=self._unreported,
                max_connections=self.max_connections,
                detail="limits.max_connections reached: new connections get 503 and close",
            )
            self._unreported = 0
            self._reported_at = now
