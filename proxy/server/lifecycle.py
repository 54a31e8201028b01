"""Drain on SIGTERM or `POST /admin/drain`, and the admin actions.

Drain order (as Traefik, Envoy and Kong do it): /ready turns 503 at once; the listener keeps
accepting for `shutdown.drain_delay` while load balancers notice; then it closes; requests in
progress finish with `Connection: close`; whatever is still running at `shutdown.timeout` (minus
a margin for cleanup) is aborted and logged.
"""

from __future__ import annotations

import asyncio
import time
from typing import Protocol

import orjson
from aiohttp import web

from proxy.admin.health import HealthMonitor
from proxy.admin.thread import run_on
from proxy.observability.events import emit, iso_time
from proxy.pipeline.runtime import AdminHandler, DataPlane, same_origin_only
from proxy.server.reload import Reloader

# Part of shutdown.timeout kept for closing connections, pools and the store after the wait.
CLEANUP_MARGIN = 1.0
# How long an aborted handler gets to run its finally blocks before its connection is cut.
ABORT_GRACE = 0.25
# A connection accepted just before the listener closed gets this long to send its request.
FIRST_REQUEST_GRACE = 1.0
SETTLE_POLL = 0.02


class Connections(Protocol):
    """The data server, as the drain needs it (see proxy/server/listener.py)."""

    async def stop_listening(self) -> None: ...

    @property
    def open_connections(self) -> int: ...

    def close_connections(self, fresh_too: bool) -> None: ...

    def pre_shutdown(self) -> None: ...

    async def shutdown(self, timeout: float | None = None) -> None: ...


class Lifecycle:
    """Turns signals and admin actions into a drain or a reload, always on the main loop."""

    def __init__(self, plane: DataPlane, monitor: HealthMonitor, reloader: Reloader) -> None:
        self.plane = plane
        self.monitor = monitor
        self.reloader = reloader
        self.stop = asyncio.Event()
        self._main = asyncio.get_running_loop()
        self.trigger = ""
        self._reloads: set[asyncio.Task[object]] = set()

    def request_stop(self, trigger: str) -> None:
        """Start the drain (idempotent): /ready fails from this moment on."""
        if self.stop.is_set():
            return
        self.trigger = trigger
        self.monitor.draining = True
        self.plane.start_drain()
        self.stop.set()

    async def _stop_from_admin(self) -> None:
        self.request_stop("admin")

    def request_reload(self, trigger: str) -> None:
        task = asyncio.create_task(self.reloader.reload(trigger))
        self._reloads.add(task)
        task.add_done_callback(self._reloads.discard)

    async def drain(self, server: Connections) -> bool:
        """Run the drain after `request_stop`; True when nothing had to be aborted."""
        shutdown = self.plane.runtime.config.shutdown
        loop = asyncio.get_running_loop()
        began = loop.time()
        deadline = began + shutdown.timeout - CLEANUP_MARGIN
        emit(
            "drain_started",
            trigger=self.trigger,
            drain_delay_s=shutdown.drain_delay,
            timeout_s=shutdown.timeout,
            inflight=self.plane.inflight.count,
        )
        await asyncio.sleep(shutdown.drain_delay)
        await server.stop_listening()
        emit(
            "listener_closed",
            inflight=self.plane.inflight.count,
            connections=server.open_connections,
        )
        clean = await self._settle(server, deadline)
        if not clean:
            emit(
                "drain_timeout",
                "warning",
                aborted=self.plane.inflight.count,
                timeout_s=shutdown.timeout,
            )
        # Cancels whatever is still running and closes what is left.
        server.pre_shutdown()
        await server.shutdown(ABORT_GRACE)
        emit("drained", clean=clean, duration_s=round(loop.time() - began, 3))
        return clean

    async def _settle(self, server: Connections, deadline: float) -> bool:
        """Wait until every request has been answered and every connection closed, giving a
        connection accepted just before the listener closed a moment to send its request."""
        loop = asyncio.get_running_loop()
        fresh_until = loop.time() + FIRST_REQUEST_GRACE
        while loop.time() < deadline:
            server.close_connections(fresh_too=loop.time() >= fresh_until)
            if server.open_connections == 0 and self.plane.inflight.count == 0:
                return True
            await asyncio.sleep(SETTLE_POLL)
        return self.plane.inflight.count == 0

    # --- admin actions (POST only; see app.admin_app) -----------------------------------

    def actions(self) -> dict[str, AdminHandler]:
        return {
            "/admin/drain": same_origin_only(self._drain_action),
            "/admin/reload": same_origin_only(self._reload_action),
        }

    # These run on the admin thread's loop; the work itself belongs to the main loop.

    async def _drain_action(self, request: web.BaseRequest) -> web.Response:
        await run_on(self._main, self._stop_from_admin())  # /ready fails before the 202
        body = {"status": "draining", "since": iso_time(time.time())}
        return web.Response(status=202, body=orjson.dumps(body), content_type="application/json")

    async def _reload_action(self, request: web.BaseRequest) -> web.Response:
        attempt = await run_on(self._main, self.reloader.reload("admin"))
        return web.Response(
            status=422 if attempt.result == "failure" else 200,
            body=orjson.dumps(attempt.render()),
            content_type="application/json",
        )

