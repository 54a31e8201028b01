"""Process lifecycle: the data and admin listeners, signals, shutdown."""

from __future__ import annotations

import asyncio
import signal
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import (
    BadHttpMessage,
    BadHttpMethod,
    BadStatusLine,
    InvalidHeader,
    InvalidURLError,
    LineTooLong,
)
from aiohttp.web_protocol import RequestHandler

from proxy import tracing
from proxy.app import DataPlane, Runtime, admin_app
from proxy.config import Config
from proxy.problem import problem, problem_body

# aiohttp's own parser limits; the proxy's limits (config `limits:`) apply inside them.
MAX_REQUEST_LINE = 8190
MAX_HEADERS = 128
# After an early answer (413, 408) aiohttp drains the unread body this long before closing;
# its default of 10s would let a slow client hold the connection well past the body deadline.
LINGERING_TIME = 1.0


# Parser errors whose message is (or quotes) the request line or a header: named, not echoed.
_QUOTING_ERRORS: dict[type[BadHttpMessage], str] = {
    InvalidURLError: "invalid request target",
    BadHttpMethod: "bad method in the request line",
    BadStatusLine: "bad request line",
    InvalidHeader: "invalid header",
}


def parser_reason(exc: BaseException | None, message: str) -> str:
    """The parser's reason without the request bytes it quotes (they may hold credentials)."""
    for kind, reason in _QUOTING_ERRORS.items():
        if isinstance(exc, kind):
            return reason
    reason = message.strip().splitlines()[0] if message.strip() else ""
    for quote in ("b'", 'b"', "bytearray("):
        reason = reason.split(quote, 1)[0]
    return reason.rstrip(" :") or "malformed request"


def parse_error_response(exc: BaseException | None) -> web.Response:
    """Problem+json for a request the HTTP parser rejected (it never reaches the pipeline)."""
    trace_id = tracing.new_trace_id()
    message = getattr(exc, "message", None) or str(exc or "malformed request")
    if isinstance(exc, LineTooLong):
        limit = exc.args[1]
        message = f"a line of the request is longer than {limit} bytes"
        if limit == MAX_REQUEST_LINE:
            # Both parsers name the limit they hit: the request line's, or a header field's.
            status, slug, title = 414, "uri-too-long", "Request line too long"
        else:
            status, slug, title = 431, "headers-too-large", "Request headers too large"
    elif isinstance(exc, BadHttpMessage) and "too many headers" in message.lower():
        status, slug, title = 431, "headers-too-large", "Too many request headers"
    else:
        status, slug, title = 400, "bad-request", "Malformed request"
    response = problem(status, slug, title, parser_reason(exc, message), trace_id)
    response.force_close()
    return response


class _ProtocolHandler(RequestHandler):
    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if status == 400 and request.writer.output_size == 0:
            return parse_error_response(exc)
        return super().handle_error(request, status, exc, message)


def over_capacity_response(max_connections: int) -> bytes:
    """The whole 503 written to a connection beyond `limits.max_connections` before closing it."""
    trace_id = tracing.new_trace_id()
    body = problem_body(
        503,
        "too-many-connections",
        "Too many connections",
        f"the proxy serves at most {max_connections} connections",
        trace_id,
    )
    head = (
        "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/problem+json\r\n"
        f"Content-Length: {len(body)}\r\nX-Trace-Id: {trace_id}\r\nRetry-After: 1\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode() + body


class _Server(web.Server):
    """aiohttp's low-level server with problem+json answers for parser rejections and a cap on
    open connections (asyncio cannot pause accepting, so the extra ones get a 503 and close)."""

    def __init__(self, handler: DataPlane, *, max_connections: int, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self.max_connections = max_connections

    def __call__(self) -> RequestHandler:
        return _ProtocolHandler(self, loop=self._loop, **self._kwargs)

    def connection_made(self, handler: RequestHandler, transport: asyncio.Transport) -> None:
        super().connection_made(handler, transport)
        if len(self._connections) > self.max_connections:
            transport.write(over_capacity_response(self.max_connections))
            transport.close()


def data_server(plane: DataPlane, config: Config) -> web.Server:
    limits = config.limits
    return _Server(
        plane,
        keepalive_timeout=limits.header_timeout,
        max_line_size=MAX_REQUEST_LINE,
        # One more than the request line's limit at least, so a LineTooLong names which one hit.
        max_field_size=max(limits.max_header_bytes, MAX_REQUEST_LINE + 1),
        max_headers=MAX_HEADERS,
        max_connections=limits.max_connections,
        lingering_time=LINGERING_TIME,
        auto_decompress=False,
        access_log=None,
    )


async def serve(config: Config) -> None:
    """Run until SIGTERM or SIGINT, then close listeners and finish in-flight requests."""
    runtime = Runtime(config)
    plane = DataPlane(runtime)
    data_runner = web.ServerRunner(data_server(plane, config), handle_signals=False)
    admin_runner = web.AppRunner(admin_app(), handle_signals=False, access_log=None)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await data_runner.setup()
    await admin_runner.setup()
    try:
        await web.TCPSite(
            data_runner, config.listen.host, config.listen.port, reuse_address=True
        ).start()
        await web.TCPSite(
            admin_runner, config.admin.host, config.admin.port, reuse_address=True
        ).start()
        await stop.wait()
    finally:
        await data_runner.shutdown()
        await data_runner.cleanup()
        await admin_runner.cleanup()
        await plane.runtime.close()
