"""Process lifecycle: the data and admin listeners, signals, shutdown."""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import time
from pathlib import Path
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

from proxy.admin import auth, keys
from proxy.admin.health import HealthMonitor
from proxy.admin.thread import AdminThread
from proxy.config import Config, config_hash
from proxy.http.context import CLIENT_LOST
from proxy.http.problem import ProblemType, problem, problem_body
from proxy.observability import events, logsink, tracing
from proxy.observability.events import emit
from proxy.pipeline.runtime import DataPlane, Runtime, admin_app
from proxy.server import reload
from proxy.server.lifecycle import Lifecycle
from proxy.server.reload import Reloader
from proxy.server.wiring import wire
from proxy.server.worker_role import WorkerRole
from proxy.stores import MemoryStore, Store, StoreError, open_store

# aiohttp's own parser limits; the proxy's limits (config `limits:`) apply inside them.
MAX_REQUEST_LINE = 8190
MAX_HEADERS = 128
# At exit, how long buffered log lines may take to reach a slow stdout before they are dropped.
FLUSH_TIMEOUT = 2.0
# After an early answer (413, 408) aiohttp drains the unread body this long before closing;
# its default of 10s would let a slow client hold the connection well past the body deadline.
LINGERING_TIME = 1.0
# Bound on waiting for runtimes retired by a reload to finish their requests at exit.
CLEANUP_TIMEOUT = 0.5
# At most one `connections_rejected` warning per this many seconds, however many are refused.
REJECTED_EVENT_INTERVAL = 10.0
# How often a worker checks that its supervisor still runs (it drains when orphaned).
ORPHAN_CHECK = 1.0


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
            kind = ProblemType.URI_TOO_LONG
        else:
            kind = ProblemType.HEADERS_TOO_LARGE
    elif isinstance(exc, BadHttpMessage) and "too many headers" in message.lower():
        kind = ProblemType.HEADERS_TOO_LARGE
    else:
        kind = ProblemType.BAD_REQUEST
    response = problem(kind, parser_reason(exc, message), trace_id)
    response.force_close()
    return response


class _ProtocolHandler(RequestHandler):
    def connection_lost(self, exc: BaseException | None) -> None:
        # aiohttp leaves the handler running when its client goes away (handler_cancellation
        # off, which claimed idempotent requests need); forward registers what to abort.
        request = self._current_request
        super().connection_lost(exc)
        if request is not None:
            lost = request.get(CLIENT_LOST)
            if lost is not None:
                lost()

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


def over_capacity_response(max_connections: int) -> bytes:
    """The whole 503 written to a connection beyond `limits.max_connections` before closing it."""
    trace_id = tracing.new_trace_id()
    body = problem_body(
        ProblemType.TOO_MANY_CONNECTIONS,
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
        self.plane = handler
        self.max_connections = max_connections
        # Rejections not yet reported in an event, and when the last event was written.
        self._unreported = 0
        self._reported_at = -REJECTED_EVENT_INTERVAL

    def __call__(self) -> RequestHandler:
        return _ProtocolHandler(self, loop=self._loop, **self._kwargs)

    @property
    def open_connections(self) -> int:
        return len(self.connections)

    def connection_made(self, handler: RequestHandler, transport: asyncio.Transport) -> None:
        super().connection_made(handler, transport)
        if len(self._connections) > self.max_connections:
            transport.write(over_capacity_response(self.max_connections))
            transport.close()
            self._rejected()

    def _rejected(self) -> None:
        """Count a refused connection; warn at once, then at most every REJECTED_EVENT_INTERVAL
        with the number refused since the last warning (the counter has them all)."""
        self.plane.runtime.metrics.connections_rejected.value += 1
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

    def close_connections(self, fresh_too: bool) -> None:
        """Close each connection once its current request is answered. A connection that has
        not sent a request yet (accepted just before the listener closed) is left to send it,
        unless `fresh_too`."""
        for connection in self.connections:
            if fresh_too or connection._request_count > 0:
                connection.close()


def data_server(plane: DataPlane, config: Config) -> _Server:
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


async def check_store(store: Store) -> None:
    """Warn when records may be forgotten (Redis may evict them; the memory store loses them
    with the process): a forgotten key's retry runs again."""
    if isinstance(store, MemoryStore):
        emit(
            "store_memory",
            "warning",
            detail="memory store: records live in this process only; keys claimed before a "
            "restart are forgotten and their retries run again (use redis:// to keep them)",
        )
        return
    try:
        policy = await store.eviction_policy()
    except StoreError as exc:
        emit("store_unreachable", "warning", detail=str(exc))
        return
    if policy is not None and policy != "noeviction":
        emit(
            "store_eviction_policy",
            "warning",
            maxmemory_policy=policy,
            detail="Redis may evict idempotency records under memory pressure; "
            "set maxmemory-policy noeviction",
        )


async def serve(
    config: Config, path: str, role: WorkerRole | None = None, admin_token: str | None = None
) -> None:
    """Run until SIGTERM, SIGINT or POST /admin/drain, then drain (see proxy.server.lifecycle).

    SIGHUP, POST /admin/reload and changes of the file at `path` reload the config; the one
    idempotency store outlives reloads. As one of a supervisor's workers (`role`), the data
    port is shared (SO_REUSEPORT), the admin app listens on the worker's private unix socket,
    and every log line carries `worker`. `admin_token` (auth.load_token) guards a TCP admin
    listener; a worker's socket is private to its supervisor, which checks the token itself.
    """
    logsink.STDOUT.limit = config.logging.buffer_size
    if role is not None:
        logsink.STDOUT.label("worker", role.index)
    events.configure(config.logging.level)
    store = open_store(config.store)
    await check_store(store)
    plane = DataPlane(Runtime(config, store))
    monitor = HealthMonitor()
    wire(plane, monitor, store)
    await monitor.attach(config, store)
    reloader = Reloader(path, plane, monitor)
    lifecycle = Lifecycle(plane, monitor, reloader)
    server = data_server(plane, config)
    data_runner = web.ServerRunner(server, handle_signals=False)
    admin = AdminThread(
        admin_app(
            plane.probes,
            {**lifecycle.actions(), **keys.for_plane(plane, asyncio.get_running_loop()).actions()},
            plane.runtime.metrics.handle,
            auth.guard(config.admin, admin_token) if role is None else (),
        ),
        config.admin.host,
        config.admin.port,
        role.admin_socket if role is not None else None,
    )
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lifecycle.request_stop, sig.name)
    loop.add_signal_handler(signal.SIGHUP, lifecycle.request_reload, "signal")
    tasks: list[asyncio.Task[None]] = []
    await data_runner.setup()
    try:
        data_site = web.TCPSite(
            data_runner,
            config.listen.host,
            config.listen.port,
            reuse_address=True,
            reuse_port=role is not None,
        )
        await data_site.start()
        await admin.start()
        if config.reload.watch:
            tasks.append(asyncio.create_task(_watch(config, Path(path), reloader)))
        if role is not None:
            tasks.append(asyncio.create_task(_drain_when_orphaned(role, lifecycle)))
        if not config.logging.hash_salt:
            emit(
                "hash_salt_random",
                "warning",
                detail="logging.hash_salt is empty: user.hash and idempotency.key_hash use a "
                "random per-process salt and cannot be correlated across replicas or restarts",
            )
        # What start-up built (modules, config, runtime: ~70,000 objects) lives as long as the
        # process. Frozen, the full collections that traffic triggers every few seconds skip
        # it: ~1 ms of CPU each instead of ~50 ms (docs/performance.md, "Garbage collection").
        # The one cost: after a config reload, whatever cyclic garbage the first runtime leaves
        # is never collected (once, bounded; later runtimes are not frozen).
        gc.collect()
        gc.freeze()
        emit(
            "started",
            hash=config_hash(config),
            listen=config.listen.port,
            admin=config.admin.port if role is None else role.admin_socket,
        )
        await lifecycle.stop.wait()
        await lifecycle.drain(data_site, server)
    finally:
        for task in tasks:
            task.cancel()
        await data_runner.cleanup()
        await reloader.close(CLEANUP_TIMEOUT)
        await plane.runtime.close()
        await monitor.close()
        await admin.stop()
        await store.close()
        emit("stopped")
        logsink.STDOUT.flush(FLUSH_TIMEOUT)


async def _drain_when_orphaned(role: WorkerRole, lifecycle: Lifecycle) -> None:
    """A worker whose supervisor died (SIGKILL, OOM) drains and exits instead of serving on
    unsupervised."""
    while os.getppid() == role.supervisor_pid:
        await asyncio.sleep(ORPHAN_CHECK)
    lifecycle.request_stop("supervisor_gone")


async def _watch(config: Config, path: Path, reloader: Reloader) -> None:
    settings = config.reload

    async def changed() -> None:
        await reloader.reload("file")

    await reload.watch(path, settings.poll_interval, settings.debounce, changed)
