"""Drain on SIGTERM or `POST /admin/drain`, and the admin actions.

Drain order (as Traefik, Envoy and Kong do it): /ready turns 503 at once; the listener keeps
accepting for `shutdown.drain_delay` while load balancers notice; then it closes; requests in
progress finish with `Connection: close`; whatever is still running at `shutdown.timeout` (minus
a margin for cleanup) is aborted and logged.
"""

from __future__ import annotations

import asyncio
import time

import orjson
from aiohttp import web

from proxy.app import AdminHandler, DataPlane
from proxy.events import emit, iso_time
from proxy.health import HealthMonitor
from proxy.reload import Reloader

# Part of shutdown.timeout kept for closing connections, pools and the store after the wait.
CLEANUP_MARGIN = 1.0
# How long an aborted handler gets to run its finally blocks before its connection is cut.
ABORT_GRACE = 0.25


class Lifecycle:
    def __init__(self, plane: DataPlane, monitor: HealthMonitor, reloader: Reloader) -> None:
        self.plane = plane
        self.monitor = monitor
        self.reloader = reloader
        self.stop = asyncio.Event()
        self.trigger = ""
        self._reloads: set[asyncio.Task[object]] = set()

    def request_stop(self, trigger: str) -> None:
        """Start the drain (idempotent): /ready fails from this moment on."""
        if self.stop.is_set():
            return
        self.trigger = trigger
        self.monitor.draining = True
        self.plane.draining = True
        self.stop.set()

    def request_reload(self, trigger: str) -> None:
        task = asyncio.create_task(self.reloader.reload(trigger))
        self._reloads.add(task)
        task.add_done_callback(self._reloads.discard)

    async def drain(self, site: web.BaseSite, server: web.Server) -> bool:
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
        await site.stop()
        # Idle keep-alive connections close now, busy ones after their response.
        server.pre_shutdown()
        emit("listener_closed", inflight=self.plane.inflight.count)
        clean = await self.plane.inflight.wait_idle(max(deadline - loop.time(), 0.0))
        if not clean:
            emit(
                "drain_timeout",
                "warning",
                aborted=self.plane.inflight.count,
                timeout_s=shutdown.timeout,
            )
        # Lets finished handlers write their last bytes; cancels what is still running.
        await server.shutdown(max(deadline - loop.time(), ABORT_GRACE))
        emit("drained", clean=clean, duration_s=round(loop.time() - began, 3))
        return clean

    # --- admin actions (POST only; see app.admin_app) -----------------------------------

    def actions(self) -> dict[str, AdminHandler]:
        return {
            "/admin/drain": _same_origin_only(self._drain_action),
            "/admin/reload": _same_origin_only(self._reload_action),
        }

    async def _drain_action(self, request: web.BaseRequest) -> web.Response:
        self.request_stop("admin")
        body = {"status": "draining", "since": iso_time(time.time())}
        return web.Response(status=202, body=orjson.dumps(body), content_type="application/json")

    async def _reload_action(self, request: web.BaseRequest) -> web.Response:
        attempt = await self.reloader.reload("admin")
        return web.Response(
            status=422 if attempt.result == "failure" else 200,
            body=orjson.dumps(attempt.render()),
            content_type="application/json",
        )


def _same_origin_only(action: AdminHandler) -> AdminHandler:
    """Browsers send `Origin` on cross-site POSTs; curl, kubectl exec and preStop hooks do not.
    Refusing it keeps a web page from draining the proxy through a developer's localhost."""

    async def guarded(request: web.BaseRequest) -> web.StreamResponse:
        if "Origin" in request.headers:
            return web.Response(status=403, text="403: admin actions refuse browser requests\n")
        return await action(request)

    return guarded
