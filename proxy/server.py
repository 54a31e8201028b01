"""Process lifecycle: the data and admin listeners, signals, shutdown."""

from __future__ import annotations

import asyncio
import signal

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage, LineTooLong
from aiohttp.web_protocol import RequestHandler

from proxy import events, logsink, tracing
from proxy.app import DataPlane, Runtime, admin_app
from proxy.config import Config, config_hash
from proxy.events import emit
from proxy.problem import problem

# aiohttp's own parser limits; the proxy's limits (config `limits:`) apply inside them.
MAX_REQUEST_LINE = 8190
MAX_HEADERS = 128
# At exit, how long buffered log lines may take to reach a slow stdout before they are dropped.
FLUSH_TIMEOUT = 2.0
# After an early answer (413, 408) aiohttp drains the unread body this long before closing;
# its default of 10s would let a slow client hold the connection well past the body deadline.
LINGERING_TIME = 1.0


def parse_error_response(exc: BaseException | None) -> web.Response:
    """Problem+json for a request the HTTP parser rejected (it never reaches the pipeline)."""
    trace_id = tracing.new_trace_id()
    message = getattr(exc, "message", None) or str(exc or "malformed request")
    if isinstance(exc, LineTooLong) and "status line" not in message.lower():
        status, slug, title = 431, "headers-too-large", "Request headers too large"
    elif isinstance(exc, LineTooLong):
        status, slug, title = 414, "uri-too-long", "Request line too long"
    elif isinstance(exc, BadHttpMessage) and "too many headers" in message.lower():
        status, slug, title = 431, "headers-too-large", "Too many request headers"
    else:
        status, slug, title = 400, "bad-request", "Malformed request"
    response = problem(status, slug, title, message, trace_id)
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
            response = parse_error_response(exc)
            plane = self._manager.request_handler if self._manager is not None else None
            if isinstance(plane, DataPlane):
                plane.rejected(request, response)
            return response
        return super().handle_error(request, status, exc, message)


class _Server(web.Server):
    """aiohttp's low-level server with problem+json answers for parser rejections."""

    def __call__(self) -> RequestHandler:
        return _ProtocolHandler(self, loop=self._loop, **self._kwargs)


def data_server(plane: DataPlane, config: Config) -> web.Server:
    limits = config.limits
    return _Server(
        plane,
        keepalive_timeout=limits.header_timeout,
        max_line_size=MAX_REQUEST_LINE,
        max_field_size=limits.max_header_bytes,
        max_headers=MAX_HEADERS,
        lingering_time=LINGERING_TIME,
        auto_decompress=False,
        access_log=None,
    )


async def serve(config: Config) -> None:
    """Run until SIGTERM or SIGINT, then close listeners and finish in-flight requests."""
    logsink.STDOUT.limit = config.logging.buffer_size
    events.configure(config.logging.level)
    runtime = Runtime(config)
    plane = DataPlane(runtime)
    data_runner = web.ServerRunner(data_server(plane, config), handle_signals=False)
    admin_runner = web.AppRunner(admin_app(runtime.metrics), handle_signals=False, access_log=None)
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
        if not config.logging.hash_salt:
            emit(
                "hash_salt_random",
                "warning",
                detail="logging.hash_salt is empty: user.hash and idempotency.key_hash use a "
                "random per-process salt and cannot be correlated across replicas or restarts",
            )
        emit(
            "started", hash=config_hash(config), listen=config.listen.port, admin=config.admin.port
        )
        await stop.wait()
    finally:
        await data_runner.shutdown()
        await data_runner.cleanup()
        await admin_runner.cleanup()
        await plane.runtime.close()
        emit("stopped")
        logsink.STDOUT.flush(FLUSH_TIMEOUT)
